"""What ``gpubackprop info`` says about the kernel sets: which one is active, and its compile time."""

import time

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS


def describe(device, kernels):
    """{"set", "device", "detail"} for the set a model with ``device`` and ``kernels`` would use.

    ``device`` is "cpu" or "cuda" (already resolved from "auto"); ``kernels`` "fused" or
    "reference". Imports nothing heavy: safe to call on any machine.
    """
    from gpubackprop.backend import is_cudasim

    if kernels == "reference":
        xp = "CuPy" if device == "cuda" and not is_cudasim() else "NumPy"
        return {"set": "reference", "device": device,
                "detail": f"plain {xp} expressions, unfused (the baseline)"}
    if device == "cuda":
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


def compile_time(device, dtype="float32"):
    """Seconds to compile (or load from Numba's on-disk cache) the fused set's kernels for
    ``dtype``: every op run once on tiny arrays, the parallel CPU kernels included."""
    from gpubackprop.backend import Backend

    t0 = time.perf_counter()
    ops = Backend(device=device, dtype=dtype, kernels="fused").ops
    if hasattr(ops, "warm_up"):
        ops.warm_up(dtype)
    else:
        run_every_op(ops, dtype)
    if ops.xp is not np:
        ops.xp.cuda.get_current_stream().synchronize()
    return time.perf_counter() - t0


def run_every_op(ops, dtype):
    """Run every op of a kernel set once on tiny arrays of ``dtype`` (which compiles them)."""
    xp, dt = ops.xp, np.dtype(dtype)
    Z, b, A = xp.zeros((2, 3), dt), xp.zeros(3, dt), xp.zeros((2, 3), dt)
    for act in ACTIVATIONS:
        ops.bias_act(Z, b, act, A)
        ops.act_backward(A, Z, act, A)
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
