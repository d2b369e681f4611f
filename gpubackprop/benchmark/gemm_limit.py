"""The GEMM limit of a network's training step: the GEMMs the step performs, listed from its plan
(gpubackprop.modelspec) and timed alone, back to back, in the layouts the layers use.

A GEMM is (what, count, m, k, n): ``count`` products of (m×k)·(k×n). How ``count`` is run and
which operand is a transposed view follows the layer code (layers/conv.py, dense.py,
recurrent.py, attention.py); ``LAYOUTS`` holds it, one line per kind.
"""

import math

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.gemm import gemm_flops
from gpubackprop.benchmark.timing import Contender, sync_for, xp_for

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
}


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def plan_step_gemms(p, batch):
    """The GEMMs of one training step of a plan's model, as (what, count, m, k, n), in the layouts
    Conv2d, Dense and the recurrent layers use. Residual blocks count their layers; the model's
    first layer computes no input gradient (nor does a first layer inside a first block)."""
    return _entries_gemms(p.entries, batch, first=True)


def _entries_gemms(entries, batch, first):
    out = []
    for i, (kind, kw, ins, outs, _) in enumerate(entries):
        first_here = first and i == 0
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
            out += _recurrent_gemms(kind, kw, ins[0], batch, first_here)
        elif kind == "Residual":
            out += _entries_gemms(kw["block"], batch, first_here)
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


def _recurrent_gemms(kind, kw, T, N, first):
    H, F, GH = kw["hidden_size"], kw["input_size"], GATES[kind] * kw["hidden_size"]
    out = []
    for k in range(kw["num_layers"]):
        F_k = F if k == 0 else H
        out.append(("recurrent input projection", 1, T * N, F_k, GH))
        out.append(("recurrent hidden", T, N, H, GH))  # t = 0 too: h_0 may be given
        if T > 1:
            out.append(("recurrent hidden gradient", T - 1, N, GH, H))
        out.append(("recurrent weight gradient", 1, GH, T * N, F_k))  # dW_ih
        out.append(("recurrent weight gradient", 1, GH, T * N, H))    # dW_hh
        if k > 0 or not first:
            out.append(("recurrent input gradient", 1, T * N, GH, F_k))
    return out


def plan_step_flops(p, batch):
    """FLOPs of the GEMMs a step performs (2 a multiply-add)."""
    return sum(count * gemm_flops(m, k, n) for _, count, m, k, n in plan_step_gemms(p, batch))


def gemm_limit_contender(gemms, batch, device="cpu", library="gpubackprop"):
    """The GEMMs ``gemms`` alone, back to back with out=, in the layouts of ``LAYOUTS``: NumPy/CuPy
    (gpubackprop's) or torch.matmul (``library="pytorch"``)."""
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
    calls = []
    for what, count, m, k, n in gemms:
        a_t, b_t, how = LAYOUTS[what]
        lead = (count,) if how == "stacked" else ()
        A = tr(arr(*lead, k, m)) if a_t else arr(*lead, m, k)
        B = tr(arr(*lead, n, k)) if b_t else arr(*lead, k, n)
        if how == "batched":
            B = arr(count, k, n)
        C = arr(count, m, n) if how in ("batched", "stacked") else arr(m, n)
        calls += [(A, B, C)] * (count if how == "loop" else 1)

    def step():
        for A, B, C in calls:
            mm(A, B, out=C)

    name = "GEMMs only (torch)" if library == "pytorch" else "GEMMs only"
    return Contender(name, step, sync, batch, library, device, note="the step's GEMMs alone")
