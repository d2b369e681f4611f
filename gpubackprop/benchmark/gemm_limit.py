"""The GEMM limit of a network's training step: the GEMMs the step performs, listed from its plan
(gpubackprop.modelspec) and timed alone, back to back, in the layouts the layers use.

A GEMM is (what, count, m, k, n): ``count`` products of (m×k)·(k×n). How ``count`` is run and
which operand is a transposed view follows the layer code (layers/conv.py, dense.py,
recurrent.py, attention.py); ``LAYOUTS`` holds it, one line per kind.

Without a model, ``plan_step_gemms`` gives the nominal GEMMs: every convolution as im2col + GEMM
(the direct convolution's FLOPs, which PyTorch's count too), every recurrent GEMM one call over
the batch, as the reference kernel set runs them. With the contender's built model it gives the
GEMMs that model's step really runs, as its layers choose on its kernel set: a Conv2d on Winograd
F(2×2, 3×3) (the fused CPU set, where the layer's own rule picks it) as 16 GEMMs
(C_out×C_in)·(C_in×tiles) a chunk of samples, forward, BP3 (dU = dM·Vᵀ) and dV = Uᵀ·dM; Winograd
and im2col alike in the layer's two halves of chunks on two threads; a direct convolution as
none; the fused CPU recurrent ops' GEMMs in their row chunks, each on its own thread with one BLAS thread
(``ops.row_chunks``). ``plan_step_schedule`` says which of them run concurrently (``Region``).
"""

import collections
import contextlib
import math

import numpy as np
from numba import njit, prange

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.gemm import gemm_flops
from gpubackprop.benchmark.timing import Contender, sync_for, xp_for
from gpubackprop.kernels.cpu.recurrent import _gemm, _gemm_tn

GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}

# what: (A a transposed view, B a transposed view, how count runs). "batched": one xp.matmul over
# (count, k, n) with A shared, as Conv2d's W · cols over the samples of a chunk; "stacked": one
# batched call with both operands (count, ., .); "loop": count separate calls (a time loop).
LAYOUTS = {
    "conv forward": (False, False, "batched"),            # Z = W · cols
    "conv input gradient": (True, False, "batched"),      # dcols = Wᵀ · Δ
    "conv weight gradient": (False, True, "stacked"),     # dW = Δ · colsᵀ, inner size batch·L
    "dense forward": (False, True, "loop"),               # X · Wᵀ
    "dense weight gradient": (True, False, "loop"),       # Δᵀ · X
    "dense input gradient": (False, False, "loop"),       # Δ · W
    "recurrent input projection": (False, True, "loop"),  # X W_ihᵀ over all steps at once
    "recurrent hidden": (False, True, "loop"),            # h_t W_hhᵀ, one call a step
    "recurrent hidden gradient": (False, False, "loop"),  # dG_t W_hh, one call a step (t > 0)
    "recurrent weight gradient": (True, False, "loop"),   # dGᵀ A over all T·N rows
    "recurrent input gradient": (False, False, "loop"),   # dG W_ih: the layer below's gradient
    # MultiheadAttention (layers/attention.py): its projections (q, k, v as one, out_proj) as
    # dense's; then per (sample, head) over N·H, the heads strided views of the projections (timed
    # here as plain stacks)
    "attention projection": (False, True, "loop"),              # X W_inᵀ, O W_outᵀ
    "attention projection weight gradient": (True, False, "loop"),  # dPᵀ X
    "attention projection input gradient": (False, False, "loop"),  # dP W
    "attention scores": (False, True, "stacked"),           # S = Q Kᵀ
    "attention values": (False, False, "stacked"),          # O = A V
    "attention value gradient": (True, False, "stacked"),   # dV = Aᵀ dO
    "attention weight gradient": (False, True, "stacked"),  # dA = dO Vᵀ
    "attention query gradient": (False, False, "stacked"),  # dQ = dS K
    "attention key gradient": (True, False, "stacked"),     # dK = dSᵀ Q
    # Conv2d on Winograd F(2x2, 3x3) (layers/conv.py, _winograd_forward/_backward), one call a
    # chunk of n samples (T tiles a sample) over the 16 tile positions
    "winograd forward": (False, False, "stacked"),          # M = U · V, (Co×Ci)·(Ci×n·T)
    "winograd weight gradient": (False, True, "stacked"),   # dU = dM · Vᵀ, inner size n·T
    "winograd input gradient": (True, False, "stacked"),    # dV = Uᵀ · dM
}
# The buffers of a Winograd GEMM's operands A, B, C (Conv2d's U, V, M, and dU): A or B a
# transposed view where LAYOUTS says so.
WINOGRAD_OPERANDS = {"winograd forward": ("U", "V", "M"),
                     "winograd weight gradient": ("M", "V", "dU"),
                     "winograd input gradient": ("U", "M", "V")}
# Which size of a GEMM the fused CPU recurrent ops split into row chunks: the rows (m) of A, or for
# the weight gradients the inner size (k: each chunk a partial dW, summed after).
SPLIT_AXIS = {"recurrent weight gradient": "k"}

# How a region of the step's GEMMs runs (``plan_step_schedule``): "serial", its one lane on the
# calling thread through xp.matmul (BLAS's own threads); "halves", Conv2d's halves of chunks, lane 0
# on the calling thread and lane 1 on the layers' worker thread at once (xp.matmul; the same
# hand-off as the layers', kernels/cpu/worker.py); "row chunks", the fused
# CPU recurrent ops, each lane one chunk's rows on its own thread (Numba prange), their GEMM
# (NumPy's OpenBLAS, kernels/cpu/blas.py) on one BLAS thread. A lane is a list of GEMMs. ``threads``:
# None, or the context the layer runs a region's GEMMs in (Conv2d's im2col GEMMs: the kernel set's
# ``conv_gemm_threads``, one BLAS thread in the fused CPU set).
Region = collections.namedtuple("Region", ["how", "lanes", "threads"], defaults=[None])


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def plan_step_gemms(p, batch, model=None):
    """The GEMMs of one training step of a plan's model, as (what, count, m, k, n), in the layouts
    Conv2d, Dense and the recurrent layers use: nominal without ``model`` (im2col convolutions,
    unsplit recurrent GEMMs: the reference kernel set's), else those ``model`` (built from ``p``)
    runs on its kernel set. Residual blocks count their layers; the model's first layer computes
    no input gradient (nor does a first layer inside a first block)."""
    return [g for region in plan_step_schedule(p, batch, model) for lane in region.lanes
            for g in lane]


def plan_step_schedule(p, batch, model=None):
    """The GEMMs of ``plan_step_gemms`` as [Region], a layer's in regions of their own: which run
    one after the other, which at once."""
    layers = None if model is None else list(model.layers)
    return _entries_gemms(p.entries, batch, True, layers)  # a region a layer at least


def _serial(gemms):
    return [Region("serial", [list(gemms)])] if gemms else []


def _entries_gemms(entries, batch, first, layers=None):
    """[Region] of the entries (with ``layers``, the built layers they became, one an entry)."""
    out = []
    for i, (kind, kw, ins, outs, _) in enumerate(entries):
        first_here = first and i == 0
        layer = None if layers is None else layers[i]
        if kind == "Conv2d" and layer is not None:
            out += _conv_regions(layer, batch, not first_here)
        elif kind in GATES and layer is not None:
            out += _recurrent_regions(kind, kw, ins[0], batch, first_here, layer.backend.ops)
        elif kind == "Residual":
            out += _entries_gemms(kw["block"], batch, first_here,
                                  None if layer is None else list(layer.block.layers))
        else:
            out += _serial(_entry_gemms(kind, kw, ins, outs, batch, first_here))
    return out


def conv_path(layer, N):
    """How a training step over N samples runs built Conv2d ``layer``, as the layer itself chooses
    (its ``_direct``/``_winograd`` rules on its kernel set, its ``_chunks`` and ``_batch_inner``):
    ("direct" | "winograd" | "pointwise" | "batch-inner" | "im2col", chunks [(start, stop)])."""
    winograd = layer._winograd()
    direct = getattr(layer, "_direct", None)  # the direct convolution, where the layer has one
    if direct is not None and direct() and not winograd:
        return "direct", [(0, N)]
    chunks = layer._chunks(N, winograd)
    if winograd:
        return "winograd", chunks
    if layer._pointwise:
        return "pointwise", chunks
    return ("batch-inner" if layer._batch_inner(chunks) else "im2col"), chunks


def _conv_regions(layer, N, input_grad):
    """A built Conv2d's GEMMs as the layer runs them (layers/conv.py)."""
    path, chunks = conv_path(layer, N)
    Ci, Co, G = layer.in_channels, layer.out_channels, layer.groups
    cog, K = Co // G, layer._K
    L = layer.output_shape[1] * layer.output_shape[2]
    if path == "direct":
        return []
    if path == "winograd":
        T = layer._tiles()[2]

        def lane(part):
            fwd = [("winograd forward", 16, Co, Ci, (e - s) * T) for s, e in part]
            bwd = []
            for s, e in reversed(part):  # backprop: each half's chunks last first
                bwd.append(("winograd weight gradient", 16, Co, (e - s) * T, Ci))
                if input_grad:
                    bwd.append(("winograd input gradient", 16, Ci, Co, (e - s) * T))
            return fwd + bwd
        threads = None
    else:
        def lane(part):
            fwd, bwd = [], []
            for s, e in part:
                n = e - s
                if path == "batch-inner":  # one GEMM a group over the chunk's n·L columns
                    fwd.append(("conv forward", G, cog, K, n * L))
                    bwd.append(("conv weight gradient", G, cog, n * L, K))
                    if input_grad:
                        bwd.append(("conv input gradient", G, K, cog, n * L))
                    continue
                fwd.append(("conv forward", n * G, cog, K, L))
                # BP3 (Conv2d._weight_grad): a sample's GEMMs, or one over the chunk (inner n·L)
                if n > 1 and cog > L:
                    bwd.append(("conv weight gradient", G, cog, n * L, K))
                else:
                    bwd.append(("conv weight gradient", n * G, cog, L, K))
                if input_grad:
                    bwd.append(("conv input gradient", n * G, K, cog, L))
            return fwd + bwd
        threads = layer.backend.ops.conv_gemm_threads
    if len(chunks) < 2 or (path != "winograd" and not layer._im2col_halves()):
        return [Region("serial", [lane(chunks)], threads)]  # (im2col: one pass then)
    k = (len(chunks) + 1) // 2  # Conv2d._in_halves
    if layer._two_halves():
        return [Region("halves", [lane(chunks[:k]), lane(chunks[k:])], threads)]
    return [Region("serial", [lane(chunks[:k]) + lane(chunks[k:])], threads)]


def _span(c, nchunks, n):
    """The c-th of nchunks near-equal pieces of range(n) (kernels/cpu/numerics.py's)."""
    return c * n // nchunks, (c + 1) * n // nchunks


def _recurrent_regions(kind, kw, T, N, first, ops):
    """A built recurrent layer's GEMMs as its kernel set runs them: the fused CPU set's in row
    chunks (``ops.row_chunks``), one region an op; else serially (one call a GEMM or a step)."""
    out = []
    # The fused CPU set's weight_gemm runs an RNN's or LSTM's two weight gradients as one GEMM.
    merged = kind != "GRU" and ops.row_chunks("weight_gemm", T * N) > 0
    # and may run an LSTM's input projection in its forward time loop (ops.lstm_input_in_steps)
    in_steps = kind == "LSTM" and getattr(ops, "lstm_input_in_steps", False)
    for what, count, m, k, n, op in _recurrent_ops(kind, kw, T, N, first, merged, in_steps):
        split = "k" if SPLIT_AXIS.get(what) == "k" else "m"
        rows = k if split == "k" else m
        chunks = ops.row_chunks(op, rows)
        if not chunks:
            out += _serial([(what, count, m, k, n)])
            continue
        lanes = []
        for c in range(chunks):
            r0, r1 = _span(c, chunks, rows)
            lanes.append([(what, count, m, r1 - r0, n) if split == "k" else
                          (what, count, r1 - r0, k, n)])
        out.append(Region("row chunks", lanes))
    return out


def _entry_gemms(kind, kw, ins, outs, batch, first_here):
    """The nominal GEMMs of one plan entry (a Residual is ``_entries_gemms``'s)."""
    out = []
    if kind == "Conv2d":
        G = kw["groups"]
        cog = kw["out_channels"] // G
        kh, kwid = _pair(kw["kernel_size"])
        K = kw["in_channels"] // G * kh * kwid
        L = outs[1] * outs[2]
        out.append(("conv forward", batch * G, cog, K, L))
        out.append(("conv weight gradient", G, cog, batch * L, K))
        if not first_here:
            out.append(("conv input gradient", batch * G, K, cog, L))
    elif kind == "Dense":  # on the last axis: one row per sample and leading position
        n_in, n_out = kw["n_in"], kw["n_out"]
        rows = batch * math.prod(ins[:-1])
        out.append(("dense forward", 1, rows, n_in, n_out))
        out.append(("dense weight gradient", 1, n_out, rows, n_in))
        if not first_here:
            out.append(("dense input gradient", 1, rows, n_out, n_in))
    elif kind in GATES:
        out += [g[:5] for g in _recurrent_ops(kind, kw, ins[0], batch, first_here)]
    elif kind == "TransformerEncoderLayer":
        out += _encoder_gemms(kw, ins[0], batch, first_here)
    return out


def _dense(n_rows, n_in, n_out, input_gradient=True, what="dense"):
    """A Dense layer's GEMMs (or the attention's projections: ``what="attention projection"``)."""
    out = [(f"{what} forward" if what == "dense" else what, 1, n_rows, n_in, n_out),
           (f"{what} weight gradient", 1, n_out, n_rows, n_in)]
    return out + ([(f"{what} input gradient", 1, n_rows, n_out, n_in)] if input_gradient else [])


def _encoder_gemms(kw, T, N, first):
    """A TransformerEncoderLayer's: the q, k, v projection as one GEMM, the attention's batched
    GEMMs over N·H, out_proj, linear1, linear2; a first post-norm layer computes no input
    gradient through the attention (pre-norm: norm1's parameters need it)."""
    E, F, H = kw["d_model"], kw.get("dim_feedforward", 2048), kw["nhead"]
    D, rows, NH = E // H, N * T, N * H
    input_gradient = not first or kw.get("norm_first", False)
    proj = "attention projection"
    out = _dense(rows, E, 3 * E, input_gradient, proj)
    out += [("attention scores", NH, T, D, T), ("attention values", NH, T, T, D),
            ("attention value gradient", NH, T, T, D), ("attention weight gradient", NH, T, D, T),
            ("attention query gradient", NH, T, T, D), ("attention key gradient", NH, T, T, D)]
    return out + _dense(rows, E, E, True, proj) + _dense(rows, E, F) + _dense(rows, F, E)


def _recurrent_ops(kind, kw, T, N, first, merged=False, in_steps=False):
    """A recurrent layer's GEMMs, each with the op that runs it (layers/recurrent.py): per layer
    and direction the input projection (rows_gemm; with ``in_steps`` in the forward step GEMMs,
    on [x_t, h_prev], as the fused CPU set runs an LSTM's), the time loops' step GEMMs (forward
    and backward; "steps"), the two weight gradients (weight_gemm; with ``merged`` one GEMM on
    [x, h_prev], as the fused CPU set runs an RNN's or LSTM's) and the input gradient
    (rows_gemm)."""
    H, F, GH = kw["hidden_size"], kw["input_size"], GATES[kind] * kw["hidden_size"]
    D = 2 if kw.get("bidirectional") else 1
    out = []
    for k in range(kw["num_layers"]):
        F_k = F if k == 0 else D * H
        for _ in range(D):
            if not in_steps:
                out.append(("recurrent input projection", 1, T * N, F_k, GH, "rows_gemm"))
            # t = 0 too: h_0 may be given
            out.append(("recurrent hidden", T, N, F_k + H if in_steps else H, GH, "steps"))
            if T > 1:
                out.append(("recurrent hidden gradient", T - 1, N, GH, H, "steps"))
            if merged:  # [dW_ih, dW_hh]
                out.append(("recurrent weight gradient", 1, GH, T * N, F_k + H, "weight_gemm"))
            else:
                out.append(("recurrent weight gradient", 1, GH, T * N, F_k, "weight_gemm"))  # dW_ih
                out.append(("recurrent weight gradient", 1, GH, T * N, H, "weight_gemm"))    # dW_hh
            if k > 0 or not first:
                out.append(("recurrent input gradient", 1, T * N, GH, F_k, "rows_gemm"))
    return out


def plan_step_flops(p, batch, model=None):
    """FLOPs of the GEMMs a step performs (2 a multiply-add): nominal without ``model`` (the direct
    convolution's, as PyTorch's), else those ``model`` runs (Winograd's fewer multiplications)."""
    return sum(count * gemm_flops(m, k, n) for _, count, m, k, n in plan_step_gemms(p, batch, model))


@njit(cache=True, parallel=True)
def _row_chunk_gemms(A, B, C, spans, count):
    # The fused CPU time loops' and rows_gemm's GEMMs: chunk c's rows, count times (one a step),
    # through the kernels' own GEMM.
    for c in prange(spans.shape[0]):
        r0, r1 = spans[c, 0], spans[c, 1]
        for _ in range(count):
            _gemm(A[r0:r1], B, C[r0:r1])


@njit(cache=True, parallel=True)
def _inner_chunk_gemms(dG, A, partial, spans):
    # weight_gemm's: chunk c's rows of dG and A into its partial dWᵀ, as the kernel computes it.
    for c in prange(spans.shape[0]):
        r0, r1 = spans[c, 0], spans[c, 1]
        _gemm_tn(dG[r0:r1], A[r0:r1], partial[c])


def _row_chunks_call(lanes, arr):
    """One row-chunk region (all lanes one GEMM kind, split along m or k) as a call of the Numba
    loops above, with BLAS on one thread, as kernels/cpu/recurrent.py runs it."""
    from gpubackprop.kernels.cpu.blas import one_blas_thread

    (what, count, _, k, n), = lanes[0]
    sizes = [lane[0][3] if SPLIT_AXIS.get(what) == "k" else lane[0][2] for lane in lanes]
    ends = np.cumsum([0] + sizes)
    spans = np.stack([ends[:-1], ends[1:]], axis=1).astype(np.int64)
    rows = int(ends[-1])
    if SPLIT_AXIS.get(what) == "k":  # dW (m×n) = dGᵀ A over rows chunks: dG (rows, m), A (rows, n)
        m = lanes[0][0][2]
        dG, A, partial = arr(rows, m), arr(rows, n), arr(len(lanes), n, m)

        def call():
            with one_blas_thread():
                _inner_chunk_gemms(dG, A, partial, spans)
        return call
    A = arr(rows, k)
    B = arr(k, n)  # the kernels take W_hhᵀ, W_ihᵀ as C-contiguous copies (recurrent.py)
    C = arr(rows, n)

    def call():
        with one_blas_thread():
            _row_chunk_gemms(A, B, C, spans, count)
    return call


def gemm_limit_contender(gemms, batch, device="cpu", library="gpubackprop"):
    """The GEMMs ``gemms`` alone, back to back with out=, in the layouts of ``LAYOUTS``: NumPy/CuPy
    (gpubackprop's) or torch.matmul (``library="pytorch"``). ``gemms``: a list of GEMMs (run one
    after the other) or ``plan_step_schedule``'s regions, each run as the layers run it (Winograd's
    halves on two threads, the fused CPU recurrent ops' row chunks; PyTorch runs every region's
    GEMMs one after the other). A region's GEMMs of one shape share their buffers, as a layer's
    chunks share its workspace (a Winograd half its U, V and M), so that they run from the cache
    where the layer's do."""
    regions = gemms if gemms and isinstance(gemms[0], Region) else _serial(gemms)
    if library == "pytorch":
        torch = contenders.torch_module()
        dev = "cuda" if device == "cuda" else "cpu"
        gen = torch.Generator().manual_seed(0)

        def arr(*shape):
            return torch.randn(*shape, generator=gen).to(dev)

        def tr(a):
            return a.transpose(-1, -2)
        mm = torch.matmul
        sync = torch.cuda.synchronize if dev == "cuda" else None
    else:
        xp = xp_for(device)
        rng = np.random.default_rng(0)

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(np.float32))

        def tr(a):
            return a.swapaxes(-1, -2)
        mm = xp.matmul
        sync = sync_for(device)

    def zeros(*shape):
        return arr(*shape) * 0

    def tiles(shape):
        """A (16, C, P) Winograd tile buffer as Conv2d's: its rows TILE_PAD elements further apart."""
        if library == "pytorch":
            return arr(*shape)
        from gpubackprop.kernels.reference.winograd import TILE_PAD

        _, C, P = shape
        return zeros(16, C * P + TILE_PAD)[:, :C * P].reshape(16, C, P)

    def serial_calls(lane):
        calls, buffers = [], {}
        for what, count, m, k, n in lane:
            a_t, b_t, how = LAYOUTS[what]
            if what in WINOGRAD_OPERANDS:
                # A Winograd half reuses its buffers chunk after chunk, as the layer's scratch: U,
                # V (16, C_in, n·T) and M (16, C_out, n·T), in the cache (the chunks are sized so)
                a, b, c = ((m, k), (k, n), (m, n))
                shapes = {"winograd forward": (a, b, c), "winograd weight gradient": (a, b[::-1], c),
                          "winograd input gradient": (a[::-1], b, c)}[what]
                ops = []
                for name, shape in zip(WINOGRAD_OPERANDS[what], shapes, strict=True):
                    key = (name, shape)
                    if key not in buffers:
                        # zeros: the products feed each other, and stay 0 (no overflow)
                        buffers[key] = tiles((16, *shape)) if name in ("V", "M") else \
                            zeros(16, *shape)
                    ops.append(buffers[key])
                A, B, C = ops
                calls.append((tr(A) if a_t else A, tr(B) if b_t else B, C))
                continue
            same = (what, count, m, k, n)
            if same in buffers:  # a layer's chunks of one shape: its workspace's buffers again
                calls += buffers[same]
                continue
            lead = (count,) if how == "stacked" else ()
            A = tr(arr(*lead, k, m)) if a_t else arr(*lead, m, k)
            B = tr(arr(*lead, n, k)) if b_t else arr(*lead, k, n)
            if how == "batched":
                B = arr(count, k, n)
            C = arr(count, m, n) if how in ("batched", "stacked") else arr(m, n)
            buffers[same] = [(A, B, C)] * (count if how == "loop" else 1)
            calls += buffers[same]

        def run():
            for A, B, C in calls:
                mm(A, B, out=C)
        return run

    from gpubackprop.kernels.cpu.worker import in_two  # the layers' own hand-off

    steps = []
    for region in regions:
        if library != "pytorch" and region.how == "halves":
            first, second = (serial_calls(lane) for lane in region.lanes)

            def halves(first=first, second=second,
                       threads=region.threads or contextlib.nullcontext):
                with threads():
                    in_two(first, second)
            steps.append(halves)
        elif library != "pytorch" and region.threads is not None:
            def in_threads(runs=[serial_calls(lane) for lane in region.lanes],
                           threads=region.threads):
                with threads():
                    for run in runs:
                        run()
            steps.append(in_threads)
        elif library == "pytorch" or region.how == "serial":
            steps += [serial_calls(lane) for lane in region.lanes]
        else:  # "row chunks"
            steps.append(_row_chunks_call(region.lanes, arr))

    def step():
        for run in steps:
            run()

    name = "GEMMs only (torch)" if library == "pytorch" else "GEMMs only"
    return Contender(name, step, sync, batch, library, device, note="the step's GEMMs alone")
