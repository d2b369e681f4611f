"""What ``gpubackprop info`` says about the kernel sets: which one is active, and its compile time."""

import time

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS
from gpubackprop.kernels.reference.winograd import TILE_PAD


def describe(device, kernels):
    """{"set", "device", "detail"} for the set a model with ``device`` and ``kernels`` would use.

    ``device`` is "cpu" or "cuda" (already resolved from "auto"); ``kernels`` "fused" or
    "reference". Imports nothing heavy: safe to call on any machine.
    """
    from gpubackprop.backend import is_cudasim, kernel_set

    name = kernel_set(device, kernels)
    if name == "reference":
        xp = "CuPy" if device == "cuda" and not is_cudasim() else "NumPy"
        return {"set": "reference", "device": device,
                "detail": f"plain {xp} expressions, unfused (the baseline)"}
    if name == "fused-cuda":
        if is_cudasim():
            detail = ("Numba CUDA kernels in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), "
                      "on NumPy arrays: correct but slow")
        else:
            detail = "Numba CUDA kernels on CuPy arrays, launched on CuPy's current stream"
        return {"set": "fused-cuda", "device": "cuda", "detail": detail}
    import numba

    return {"set": "fused-cpu", "device": "cpu",
            "detail": f"Numba njit kernels; parallel ones above a size threshold, on "
                      f"{numba.get_num_threads()} threads"}


def compile_time(device, dtype="float32", every=False):
    """Seconds to compile (or load from Numba's on-disk cache) the fused set's kernels for
    ``dtype``, each op run once on tiny arrays, the parallel CPU kernels included: the MLP ops
    (dense, loss, optimizers), or with ``every`` every op (minutes on a cold cache)."""
    from gpubackprop.backend import Backend

    t0 = time.perf_counter()
    ops = Backend(device=device, dtype=dtype, kernels="fused").ops
    if hasattr(ops, "warm_up"):
        ops.warm_up(dtype, every)
    else:
        (run_every_op if every else run_mlp_ops)(ops, dtype)
    if ops.xp is not np:
        ops.xp.cuda.get_current_stream().synchronize()
    return time.perf_counter() - t0


def run_mlp_ops(ops, dtype):
    """Run the ops an MLP step uses (dense, loss, optimizers) once on tiny arrays of ``dtype``."""
    xp, dt = ops.xp, np.dtype(dtype)
    Z, b, A = xp.zeros((2, 3), dt), xp.zeros(3, dt), xp.zeros((2, 3), dt)
    for act in ACTIVATIONS:
        ops.bias_act(Z, b, act, A)
        ops.act_backward(A, Z, act, A)
        ops.activation(Z, act, A)
    ops.softmax_ce(Z, xp.zeros(2, np.int64), A, xp.zeros(2, dt))
    ops.bias_grad(Z, b)
    ops.bias_grad(Z, b, accumulate=True)
    p, s = xp.zeros(4, dt), xp.ones(1, dt)
    ops.sq_norm(p)
    ops.clip_scale(p, 1.0, s)
    ops.sgd(p, p, p, 0.1, 0.0, False, 0.0, s)
    ops.sgd(p, p, p, 0.1, 0.9, True, 0.1, s)
    ops.rmsprop(p, p, p, p, 0.1, 0.9, 1e-8, 0.1, 0.9, s)
    ops.adam(p, p, p, p, 0.1, 0.9, 0.99, 1e-8, 0.1, True, 1, s)


def run_every_op(ops, dtype):
    """Run every op of a kernel set once on tiny arrays of ``dtype`` (which compiles them)."""
    run_mlp_ops(ops, dtype)
    xp, dt = ops.xp, np.dtype(dtype)
    Z, b = xp.zeros((2, 3), dt), xp.zeros(3, dt)
    # Convolution, pooling, normalisation and dropout (geometry: 2x2 windows over 3x3 images).
    X = xp.zeros((1, 2, 3, 3), dt)
    cols = xp.zeros((1, 8, 4), dt)
    geometry = ((2, 2), (1, 1), (0, 0), (1, 1))
    ops.im2col(X, cols, *geometry)
    ops.col2im(cols, X, *geometry)
    # Winograd F(2x2, 3x3) on the 3x3 images, padding 1: a 3x3 output, 2x2 tiles of 2x2 (ragged).
    # V and M with their rows apart as Conv2d lays them out (TILE_PAD), which the CPU set compiles
    # for on its own.
    W3, U = xp.zeros((2, 2, 3, 3), dt), xp.zeros((16, 2, 2), dt)
    V, M = (xp.zeros((16, 8 + TILE_PAD), dt)[:, :8].reshape(16, 2, 4) for _ in range(2))
    ops.winograd_filter(W3, U)
    ops.winograd_filter_backward(U, W3, accumulate=True)
    ops.winograd_input(X, V, 1)
    ops.winograd_input_backward(V, X, 1)
    ops.winograd_output(M, X)
    ops.winograd_output_backward(X, M)
    if getattr(ops, "direct_conv", False):  # the fused CPU set's direct convolution (3x3, pad 1)
        Zd = xp.zeros_like(X)
        ops.direct_conv_forward(X, W3, Zd, 1)
        ops.direct_conv_backward(X, Zd, W3, xp.zeros_like(W3), xp.zeros_like(X), 1, accumulate=True)
    Y, argmax = xp.zeros((1, 2, 2, 2), dt), xp.zeros((1, 2, 2, 2), np.int64)
    ops.max_pool2d(X, Y, argmax, *geometry)
    ops.max_pool2d_backward(Y, argmax, X, *geometry)
    ops.avg_pool2d(X, Y, *geometry[:3])
    ops.avg_pool2d_backward(Y, X, *geometry[:3])
    # Max pooling over tiling windows (kernel == stride): the fused CPU set's own kernels, which it
    # takes from 4096 input elements.
    tiles = ((2, 2), (2, 2), (0, 0), (1, 1))
    Xt, Yt = xp.zeros((1, 1, 64, 64), dt), xp.zeros((1, 1, 32, 32), dt)
    at = xp.zeros((1, 1, 32, 32), np.int64)
    ops.max_pool2d(Xt, Yt, at, *tiles)
    ops.max_pool2d_backward(Yt, at, Xt, *tiles)
    Z3, b2 = xp.zeros((2, 2, 4), dt), xp.ones(2, dt)
    for act in ACTIVATIONS:
        ops.channel_bias_act(Z3, b2, act, xp.zeros_like(Z3))
    ops.channel_bias_grad(Z3, b2)
    ops.channel_bias_grad(Z3, b2, accumulate=True)
    stats = xp.zeros(2, dt), xp.ones(2, dt)
    ops.batch_norm_train(Z3, b2, b2, 1e-5, xp.zeros_like(Z3), *stats)
    ops.batch_norm_eval(Z3, b2, b2, *stats, 1e-5, xp.zeros_like(Z3))
    ops.batch_norm_backward(Z3, Z3, b2, *stats, xp.zeros_like(Z3), xp.zeros(2, dt), xp.zeros(2, dt))
    ops.layer_norm(Z, b[:3] + 1, b[:3], 1e-5, xp.zeros_like(Z), *stats)
    ops.layer_norm_backward(Z, Z, b[:3] + 1, *stats, xp.zeros_like(Z), xp.zeros(3, dt), xp.zeros(3, dt))
    ops.dropout(Z, xp.zeros_like(Z), 0.5, 0, 0, 0)
    ops.dropout_backward(Z, xp.zeros_like(Z), 0.5, 0, 0, 0)
    # Recurrent cells (N = 2 samples, H = 1 hidden unit; G gates wide where it says so).
    def cell(width):
        return xp.zeros((2, width), dt)

    for act in ("tanh", "relu"):
        ops.rnn_cell(cell(1), cell(1), xp.zeros(1, dt), cell(1), act)
        ops.rnn_cell_backward(cell(1), cell(1), cell(1), cell(1), act)
    ops.lstm_cell(cell(4), cell(4), xp.zeros(4, dt), cell(1), cell(1), cell(1), cell(4))
    ops.lstm_cell_backward(cell(1), cell(1), cell(1), cell(1), cell(1), cell(4), cell(4))
    ops.gru_cell(cell(3), cell(3), xp.zeros(3, dt), cell(1), cell(1), cell(4))
    ops.gru_cell_backward(cell(1), cell(1), cell(1), cell(1), cell(4), cell(3), cell(3))
    # The time loops over T = 2 steps of those cells, both directions (each step's GEMM inside).
    def seq(width, steps=2):
        return xp.zeros((steps, 2, width), dt)

    W1, W3, W4 = xp.zeros((1, 1), dt), xp.zeros((3, 1), dt), xp.zeros((4, 1), dt)
    for reverse in (False, True):
        for act in ("tanh", "relu"):
            ops.rnn_forward_steps(seq(1), W1, xp.zeros(1, dt), seq(1, 3), cell(1), act, reverse)
            ops.rnn_backward_steps(seq(1), W1, seq(1, 3), seq(1), cell(1), act, reverse)
        ops.lstm_forward_steps(seq(4), W4, xp.zeros(4, dt), seq(1, 3), seq(1, 3), seq(4), cell(4),
                               reverse)
        if getattr(ops, "lstm_input_in_steps", False):  # the input projection in the loop
            ops.lstm_forward_steps(seq(4), W4, xp.zeros(4, dt), seq(1, 3), seq(1, 3), seq(4),
                                   cell(4), reverse, x=seq(2), W_ih=xp.zeros((4, 2), dt),
                                   b_ih=xp.zeros(4, dt))
        ops.lstm_backward_steps(seq(1), W4, seq(1, 3), seq(4), seq(4), cell(1), cell(1), reverse)
        ops.gru_forward_steps(seq(3), W3, xp.zeros(3, dt), seq(1, 3), seq(4), cell(3), reverse)
        ops.gru_backward_steps(seq(1), W3, seq(1, 3), seq(4), seq(3), seq(3), cell(1), cell(1),
                               reverse)
    # The layers' GEMMs over all rows: B plain and a transposed view.
    ops.rows_gemm(cell(4), W4, cell(1))
    ops.rows_gemm(cell(1), W4.T, cell(4))
    ops.weight_gemm(cell(4), cell(1), W4)
    # Embedding: a gather of 3 rows of a (4, 2) weight and its scatter-add, both index dtypes.
    for index_dtype in (np.int32, np.int64):
        idx = xp.asarray(np.array([0, 3, 0], index_dtype))
        W = xp.zeros((4, 2), dt)
        ops.embedding(W, idx, xp.zeros((3, 2), dt))
        ops.embedding_backward(xp.zeros((3, 2), dt), idx, W, 1, accumulate=True)
    # Attention's masked softmax: 2 rows of 3 scores, without and with a mask.
    S = xp.zeros((2, 3), dt)
    for mask in (None, xp.zeros((2, 3), dt)):
        ops.masked_softmax(S, mask, xp.zeros_like(S))
    ops.masked_softmax_backward(S, S, xp.zeros_like(S))
