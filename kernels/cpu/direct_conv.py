"""CPU direct convolution for few channels (stride 1, dilation 1, one group): forward, input and
weight gradient, no columns and no GEMM.

A layer such as LeNet-5's (1->6 5x5 on 28x28, 6->16 5x5 on 14x14) makes im2col GEMMs with K = 25
or 150 and 6 or 16 output rows: BLAS runs them far below its peak and im2col/col2im move K times
the input. Here each sample's input is copied once into a zero-padded plane buffer (C, Hp, Wp),
rows Wp apart, and an output plane is computed in the padded width: with t = oh·Wp + ow,

    forward   Z[co, t]  = Σ_{c, i, j} W[co, c, i, j] · Xp[c, i·Wp + j + t]
    dX        dX[c, t'] = Σ_{co, i, j} W[co, c, kh−1−i, kw−1−j] · dZq[co, (ph + i)·Wq + pw + j + t']
    BP3       dW[co, c, i, j] = Σ_n Σ_t dZp[n, co, t] · Xp[n, c, i·Wp + j + t]

over t in [0, OH·Wp): every (c, i, j) is one contiguous shifted row of OH·Wp elements, a loop LLVM
vectorises, at the cost of the Wp − OW columns past each output row (computed and dropped; dZp is
zero there, so they add nothing to dW). dX is the same correlation on dZq, dZ zero-padded by
kh−1, kw−1 (width Wq, t' = h·Wq + w), with the flipped weights. The buffers have a tail so that
the last shifted row stays inside. The sums run in a fixed order (c, i, j for Z; co, i, j for dX; t
for dW, reassociated by LLVM into vector lanes: ``fastmath`` reassoc/contract, fixed at compile
time), so the bits do not depend on the thread count: the batch is split into ``DIRECT_CHUNKS``
fixed chunks, each with its own buffers and its own partial dW, summed in chunk order, run over
Numba's threads (prange) where ``DirectConvOps.direct_parallel`` says so, else in two halves on the
calling thread and the worker thread (``direct_halves``, kernels/cpu/worker.py: one thread that
spins only briefly between calls, unlike a pool's), or one after the other on one thread.

5-wide kernels (LeNet-5's) take register-blocked kernels (``_forward_chunk5``, ``_backward_chunk5``):
a kernel row's 5 taps for a block of 4 (2, 1; 2 where the CPU has no AVX-512: ``DIRECT_BLOCK``)
output planes in one pass over t, BP3's 20 sums of
a block in one pass, and dX as the forward's adjoint rather than the gather above,

    dX        dXp[c, i·Wp + t] += Σ_{co, j} W[co, c, i, j] · dZp[co, t − j]    for each i < kh

(each dZ row spread over the kh rows of the padded dX plane it reaches, the taps read from dZp
shifted: Wp·OH·kh·5 multiply-adds a pair of channels where the gather takes Wq·H·kh·5: conv2 140
against 252 a row of taps). The layer's bias and ReLU (``direct_activations``) fuse into the
forward's write of Z, and Δ = dA ⊙ ReLU'(A) with BP4 (float64 sums, chunks in order) into the
backward's read of dZ. Measured for LeNet-5 (batch 128, float32, 2-core AMD EPYC znver4, AVX-512,
one thread, CPU time, interleaved medians, against the per-channel kernels above): conv1 forward
0.97 -> 0.50 ms, BP3 1.43 -> 0.50; conv2 forward 1.85 -> 1.0, BP3 + dX 5.4 -> 2.4 (the
multiply-adds alone, dropped columns included, would take ~0.36, 0.36, 0.9 and 1.8 ms at one
AVX-512 FMA a cycle); the step 9.8 ms (conv2 on im2col + GEMM) -> 7.2.
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.worker import in_halves

# Fixed sample chunks of a call (the partial dW sums): independent of the thread count, and enough
# for the two cores here with a few to balance.
DIRECT_CHUNKS = 8
NAMES_FORWARD = ("X", "W", "Z")
NAMES_BACKWARD = ("X", "dZ", "W", "dW", "dX")
DIRECT_ACTIVATIONS = ("identity", "relu")
_FM = {"reassoc", "contract"}


def _wide_vectors():
    """Whether the host has AVX-512 (32 vector registers; AVX2 has 16), as Numba compiles for it."""
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001 (no feature map on this LLVM build: the narrower choice)
        return False


# Output planes a register block of the 5-wide kernels covers (forward, BP3, dX): a block of 4
# holds 20 weights (or 20 BP3 sums) and 5 shifted input vectors in registers, which fit AVX-512's
# 32 but spill from AVX2's 16. Measured on LeNet-5's layers (batch 128, float32, one thread,
# medians of 60 calls, interleaved runs) on a 2-core AMD EPYC znver3 (AVX2): conv2 forward
# 1.84 / 1.32 ms in blocks of 4 / 2, backward 4.96 / 4.07; conv1 forward 0.58 / 0.57, backward
# 2.07 / 1.87 (blocks of 1: 1.92, 8.75, 1.08, 2.72). Blocks of 4 on AVX-512 (znver4): the figures
# in the module docstring. ``DirectConvOps.direct_block``: the same bits either way (each plane's
# sums in the same order), so tests run both.
DIRECT_BLOCK = 4 if _wide_vectors() else 2


# Flat loops with uint64 indices (as kernels/cpu/conv.py's copies): with int64 ones Numba wraps
# negative indices, a compare and a select per access, and LLVM keeps them scalar.
@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _axpy(dst, d, w, src, s, count):
    """dst[d + t] += w · src[s + t] for t < count (d, s, count: uint64)."""
    for t in range(count):
        dst[d + t] += w * src[s + t]


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _taps(dst, w, src, s, count):
    """dst[t] += Σ_j w[j] · src[s + j + t] for t < count: a kernel row's taps in one pass over dst
    (one load and store of dst for kw multiply-adds, rather than one each; 3 and 5 taps unrolled
    so that LLVM vectorises over t), taps in order j = 0, 1, …"""
    u = np.uint64  # (uint64 + an int literal is a float64 in Numba: offsets made as uint64)
    kw = w.shape[0]
    s1, s2 = s + u(1), s + u(2)
    if kw == 5:
        s3, s4 = s + u(3), s + u(4)
        w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
        for t in range(count):
            dst[t] += (w0 * src[s + t] + w1 * src[s1 + t] + w2 * src[s2 + t]
                       + w3 * src[s3 + t] + w4 * src[s4 + t])
    elif kw == 3:
        w0, w1, w2 = w[0], w[1], w[2]
        for t in range(count):
            dst[t] += w0 * src[s + t] + w1 * src[s1 + t] + w2 * src[s2 + t]
    else:
        for j in range(kw):
            _axpy(dst, u(0), w[j], src, s + u(j), count)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _tap_dots(out, a, ia, b, ib, count):
    """out[j] += Σ_t a[ia + t] · b[ib + j + t] for each tap j of a kernel row (out: kw values): one
    pass over a for all kw sums (3 and 5 unrolled), lanes reassociated."""
    u = np.uint64
    kw = out.shape[0]
    zero = a.dtype.type(0)
    b1, b2 = ib + u(1), ib + u(2)
    if kw == 5:
        b3, b4 = ib + u(3), ib + u(4)
        s0 = s1 = s2 = s3 = s4 = zero
        for t in range(count):
            v = a[ia + t]
            s0 += v * b[ib + t]
            s1 += v * b[b1 + t]
            s2 += v * b[b2 + t]
            s3 += v * b[b3 + t]
            s4 += v * b[b4 + t]
        out[0] += s0
        out[1] += s1
        out[2] += s2
        out[3] += s3
        out[4] += s4
    elif kw == 3:
        s0 = s1 = s2 = zero
        for t in range(count):
            v = a[ia + t]
            s0 += v * b[ib + t]
            s1 += v * b[b1 + t]
            s2 += v * b[b2 + t]
        out[0] += s0
        out[1] += s1
        out[2] += s2
    else:
        for j in range(kw):
            out[j] += _dot(a, ia, b, ib + u(j), count)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dot(a, ia, b, ib, count):
    """Σ_t a[ia + t] · b[ib + t] (uint64 indices), in LLVM's vector lanes (reassoc)."""
    acc = a.dtype.type(0)
    for t in range(count):
        acc += a[ia + t] * b[ib + t]
    return acc


# The register-blocked kernels for 5-wide kernels (LeNet-5's): a kernel row of 5 taps for a block
# of 4 (2, 1) planes in one pass over t, so that each shifted load of the source row feeds 4 planes'
# multiply-adds (the one-plane _taps: 5 loads and an accumulator's load and store for 5; here 5 + 8
# for 20), and BP3's 20 sums of a block in one pass (_tap_dots: 6 loads for 5). Measured (2-core
# AMD EPYC znver4, AVX-512, one thread, CPU time, batch 128, interleaved medians), the blocks alone:
# LeNet-5's conv1 forward 0.97 -> 0.78 ms, its BP3 1.43 -> 0.75; conv2 (6->16 on 14x14) forward
# 1.85 -> 1.20; then the copies on flat uint64 indices (_pad_sample5, _store_planes, _load_dz: with
# 4-D indices those short rows stayed scalar and cost as much as the multiply-adds): conv1 forward
# 0.77 -> 0.52, BP3 0.75 -> 0.48. Block sizes 2, 3, 4 and 6 measured alike for conv1; 4 (and a
# multiple-of-16 count) best for conv2. A full 5x5 kernel unrolled inside the loop over t was 1.4x
# (2 planes) to 8x (3, 4) slower: LLVM spilled it. Rows of t are counted up to a multiple of ROUND
# (the vector loop's step) so no row ends in a scalar remainder (the buffers' tails are zero: those
# outputs are dropped, and add nothing to BP3 or dX).
ROUND = 16


@njit(cache=True, error_model="numpy", inline="always")
def _add5(r, p0, p1, p2, p3, p4):
    r[0] += p0
    r[1] += p1
    r[2] += p2
    r[3] += p3
    r[4] += p4

@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rows5x4(acc, a, stride, w, o, c, i, src, s, count):
    """acc[a + q·stride + t] += Σ_j w[o + q, c, i, j] · src[s + j + t] for q < 4, t < count: a
    kernel row of 5 taps for 4 output planes in one pass (each src load feeds 4 planes' multiply-adds,
    the 20 weights held in registers); taps in order j = 0, 1, …"""
    u = np.uint64
    r0, r1, r2, r3 = w[o, c, i], w[o + 1, c, i], w[o + 2, c, i], w[o + 3, c, i]
    w00, w01, w02, w03, w04 = r0[0], r0[1], r0[2], r0[3], r0[4]
    w10, w11, w12, w13, w14 = r1[0], r1[1], r1[2], r1[3], r1[4]
    w20, w21, w22, w23, w24 = r2[0], r2[1], r2[2], r2[3], r2[4]
    w30, w31, w32, w33, w34 = r3[0], r3[1], r3[2], r3[3], r3[4]
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    a1, a2, a3 = a + stride, a + u(2) * stride, a + u(3) * stride
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        acc[a + t] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3 + w04 * x4
        acc[a1 + t] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3 + w14 * x4
        acc[a2 + t] += w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3 + w24 * x4
        acc[a3 + t] += w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3 + w34 * x4


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rows5x2(acc, a, stride, w, o, c, i, src, s, count):
    """_rows5x4 for 2 planes."""
    u = np.uint64
    r0, r1 = w[o, c, i], w[o + 1, c, i]
    w00, w01, w02, w03, w04 = r0[0], r0[1], r0[2], r0[3], r0[4]
    w10, w11, w12, w13, w14 = r1[0], r1[1], r1[2], r1[3], r1[4]
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    a1 = a + stride
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        acc[a + t] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3 + w04 * x4
        acc[a1 + t] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3 + w14 * x4


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _rows5x1(acc, a, stride, w, o, c, i, src, s, count):
    """_rows5x4 for 1 plane."""
    u = np.uint64
    r0 = w[o, c, i]
    w00, w01, w02, w03, w04 = r0[0], r0[1], r0[2], r0[3], r0[4]
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        acc[a + t] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3 + w04 * x4


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dots5x4(dw, o, c, i, dz, a, src, s, count):
    """dw[o + q, c, i, j] += Σ_t dz[a + q·count + t] · src[s + j + t] for q < 4, j < 5: 20 sums in
    one pass over the 4 planes of dz (each src load feeds 4 planes' sums), lanes reassociated."""
    u = np.uint64
    zero = src.dtype.type(0)
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    a1, a2, a3 = a + count, a + u(2) * count, a + u(3) * count
    p00 = p01 = p02 = p03 = p04 = zero
    p10 = p11 = p12 = p13 = p14 = zero
    p20 = p21 = p22 = p23 = p24 = zero
    p30 = p31 = p32 = p33 = p34 = zero
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        d = dz[a + t]
        p00, p01, p02, p03, p04 = p00 + d * x0, p01 + d * x1, p02 + d * x2, p03 + d * x3, p04 + d * x4
        d = dz[a1 + t]
        p10, p11, p12, p13, p14 = p10 + d * x0, p11 + d * x1, p12 + d * x2, p13 + d * x3, p14 + d * x4
        d = dz[a2 + t]
        p20, p21, p22, p23, p24 = p20 + d * x0, p21 + d * x1, p22 + d * x2, p23 + d * x3, p24 + d * x4
        d = dz[a3 + t]
        p30, p31, p32, p33, p34 = p30 + d * x0, p31 + d * x1, p32 + d * x2, p33 + d * x3, p34 + d * x4
    r0, r1, r2, r3 = dw[o, c, i], dw[o + 1, c, i], dw[o + 2, c, i], dw[o + 3, c, i]
    _add5(r0, p00, p01, p02, p03, p04)
    _add5(r1, p10, p11, p12, p13, p14)
    _add5(r2, p20, p21, p22, p23, p24)
    _add5(r3, p30, p31, p32, p33, p34)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dots5x2(dw, o, c, i, dz, a, src, s, count):
    """_dots5x4 for 2 planes."""
    u = np.uint64
    zero = src.dtype.type(0)
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    a1 = a + count
    p00 = p01 = p02 = p03 = p04 = zero
    p10 = p11 = p12 = p13 = p14 = zero
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        d = dz[a + t]
        p00, p01, p02, p03, p04 = p00 + d * x0, p01 + d * x1, p02 + d * x2, p03 + d * x3, p04 + d * x4
        d = dz[a1 + t]
        p10, p11, p12, p13, p14 = p10 + d * x0, p11 + d * x1, p12 + d * x2, p13 + d * x3, p14 + d * x4
    r0, r1 = dw[o, c, i], dw[o + 1, c, i]
    _add5(r0, p00, p01, p02, p03, p04)
    _add5(r1, p10, p11, p12, p13, p14)


@njit(cache=True, error_model="numpy", fastmath=_FM, inline="always")
def _dots5x1(dw, o, c, i, dz, a, src, s, count):
    """_dots5x4 for 1 plane."""
    u = np.uint64
    zero = src.dtype.type(0)
    s1, s2, s3, s4 = s + u(1), s + u(2), s + u(3), s + u(4)
    p00 = p01 = p02 = p03 = p04 = zero
    for t in range(count):
        x0, x1, x2, x3, x4 = src[s + t], src[s1 + t], src[s2 + t], src[s3 + t], src[s4 + t]
        d = dz[a + t]
        p00, p01, p02, p03, p04 = p00 + d * x0, p01 + d * x1, p02 + d * x2, p03 + d * x3, p04 + d * x4
    r0 = dw[o, c, i]
    _add5(r0, p00, p01, p02, p03, p04)


@njit(cache=True, error_model="numpy", inline="always")
def _block(left, most):
    """Planes in the next block: ``most`` (4 or 2) while as many are left, then 2, then 1."""
    return most if left >= most else (2 if left >= 2 else 1)


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _corr5(acc, w, src, C, Hs, Ws, kh, off, count, o, nb):
    """acc[q·count + t] += Σ_{c, i, j} w[o + q, c, i, j] · src[(c·Hs + i)·Ws + off + j + t] for q < nb
    (4, 2 or 1), t < count: a 5-wide kernel's correlation, sums in order c, i, j."""
    u = np.uint64
    for c in range(C):
        for i in range(kh):
            s = u((c * Hs + i) * Ws + off)
            if nb == 4:
                _rows5x4(acc, u(0), u(count), w, o, c, i, src, s, u(count))
            elif nb == 2:
                _rows5x2(acc, u(0), u(count), w, o, c, i, src, s, u(count))
            else:
                _rows5x1(acc, u(0), u(count), w, o, c, i, src, s, u(count))


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _scatter5(acc, P, w, src, C, Wp, kh, count, o, nb):
    """acc[q·P + i·Wp + t] += Σ_{c, j} w[o + q, c, i, j] · src[c·count + j + t] for q < nb, i < kh,
    t < count: dX as the adjoint of the forward, each dZ row spread over the kh rows it reaches
    (planes P apart), sums in order c, i, j."""
    u = np.uint64
    for c in range(C):
        s = u(c * count)
        for i in range(kh):
            a = u(i * Wp)
            if nb == 4:
                _rows5x4(acc, a, u(P), w, o, c, i, src, s, u(count))
            elif nb == 2:
                _rows5x2(acc, a, u(P), w, o, c, i, src, s, u(count))
            else:
                _rows5x1(acc, a, u(P), w, o, c, i, src, s, u(count))


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _dots5(dw, dz, src, C, Hs, Ws, kh, count, o, nb):
    """dw[o + q, c, i, j] += Σ_t dz[(o + q)·count + t] · src[(c·Hs + i)·Ws + j + t] for q < nb."""
    u = np.uint64
    a = u(o * count)
    for c in range(C):
        for i in range(kh):
            s = u((c * Hs + i) * Ws)
            if nb == 4:
                _dots5x4(dw, o, c, i, dz, a, src, s, u(count))
            elif nb == 2:
                _dots5x2(dw, o, c, i, dz, a, src, s, u(count))
            else:
                _dots5x1(dw, o, c, i, dz, a, src, s, u(count))


@njit(cache=True, error_model="numpy", inline="always")
def _store_planes(out, n, o, nb, acc, stride, off, Wp):
    """out[n, o + q, h, w] = acc[q·stride + off + h·Wp + w] for q < nb: the planes of a block, the
    columns past each row dropped (flat uint64 indices, as _pad_sample5)."""
    u = np.uint64
    H, W = out.shape[2], out.shape[3]
    flat = out.reshape(-1)
    for q in range(nb):
        d = u(((n * out.shape[1] + o + q) * H) * W)
        b = u(q * stride + off)
        for h in range(H):
            for w in range(u(W)):
                flat[d + w] = acc[b + w]
            d += u(W)
            b += u(Wp)


@njit(cache=True, error_model="numpy", inline="always")
def _store_act(out, n, o, nb, acc, count, Wp, b, relu):
    """out[n, o + q, h, w] = σ(acc[q·count + h·Wp + w] + b[o + q]), σ ReLU or the identity: the
    conv layer's bias and activation in the forward's one write (ReLU as kernels/cpu/dense.py's:
    z < 0 gives 0, NaN kept), the layer's separate channel_bias_act pass saved."""
    u = np.uint64
    H, W = out.shape[2], out.shape[3]
    zero = acc.dtype.type(0)
    flat = out.reshape(-1)
    for q in range(nb):
        d = u(((n * out.shape[1] + o + q) * H) * W)
        a = u(q * count)
        bq = b[o + q]
        for h in range(H):
            if relu:
                for w in range(u(W)):
                    v = acc[a + w] + bq
                    flat[d + w] = zero if v < zero else v
            else:
                for w in range(u(W)):
                    flat[d + w] = acc[a + w] + bq
            d += u(W)
            a += u(Wp)


@njit(cache=True, error_model="numpy", inline="always")
def _load_dz(dzp, b, dzf, Af, s, count, relu, zero):
    """dzp[b + t] = Δ = dA[s + t] ⊙ ReLU'(A[s + t]) (dA where A > 0, else 0, as act_backward; the
    identity: dA) for t < count; returns Σ_t Δ in float64 (BP4's share of the row)."""
    total = 0.0
    if relu:
        for t in range(count):
            v = dzf[s + t] if Af[s + t] > zero else zero
            dzp[b + t] = v
            total += v
    else:
        for t in range(count):
            v = dzf[s + t]
            dzp[b + t] = v
            total += v
    return total


@njit(cache=True, error_model="numpy", inline="always")
def _pad_sample5(X, n, xp, ph, pw, Hp, Wp):
    """_pad_sample with flat uint64 indices: with X's 4-D ones the row copies (28 or 14 values)
    stayed scalar and cost as much as the blocked multiply-adds (LeNet-5's conv1 forward)."""
    u = np.uint64
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    flat = X.reshape(-1)
    s = u(n * C * H * W)
    for c in range(C):
        for h in range(H):
            b = u((c * Hp + h + ph) * Wp + pw)
            for w in range(u(W)):
                xp[b + w] = flat[s + w]
            s += u(W)


@njit(cache=True, error_model="numpy", inline="always")
def _pad_sample(X, n, xp, ph, pw, Hp, Wp):
    """The interior of the padded planes xp (flat, C·Hp·Wp + tail) from X[n]; the borders stay
    as they are (zero: written once per chunk)."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    for c in range(C):
        for h in range(H):
            b = (c * Hp + h + ph) * Wp + pw
            for w in range(W):
                xp[b + w] = X[n, c, h, w]


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _forward_chunk(X, Wt, Z, ph, pw, n0, n1, b, relu):
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    OH, OW = Z.shape[2], Z.shape[3]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    T = OH * Wp
    xp = np.zeros(C * Hp * Wp + kw, X.dtype)
    acc = np.empty(T, X.dtype)
    zero = X.dtype.type(0)
    u = np.uint64
    for n in range(n0, n1):
        _pad_sample(X, n, xp, ph, pw, Hp, Wp)
        for co in range(Co):
            for t in range(T):
                acc[t] = zero
            for c in range(C):
                for i in range(kh):
                    _taps(acc, Wt[co, c, i], xp, u((c * Hp + i) * Wp), u(T))
            bc = b[co]
            for oh in range(OH):
                for ow in range(OW):
                    v = acc[oh * Wp + ow] + bc
                    Z[n, co, oh, ow] = zero if relu and v < zero else v


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _forward_chunk5(X, Wt, Z, ph, pw, n0, n1, b, relu, block):
    """_forward_chunk for 5-wide kernels, register-blocked: a block of planes at a time."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh = Wt.shape[0], Wt.shape[2]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    count = -(-(Z.shape[2] * Wp) // ROUND) * ROUND
    xp = np.zeros(C * Hp * Wp + 5 + ROUND, X.dtype)
    acc = np.empty(4 * count, X.dtype)
    zero = X.dtype.type(0)
    for n in range(n0, n1):
        _pad_sample5(X, n, xp, ph, pw, Hp, Wp)
        o = 0
        while o < Co:
            nb = _block(Co - o, block)
            for t in range(nb * count):
                acc[t] = zero
            _corr5(acc, Wt, xp, C, Hp, Wp, kh, 0, count, o, nb)
            _store_act(Z, n, o, nb, acc, count, Wp, b, relu)
            o += nb


@njit(cache=True, error_model="numpy")
def _forward_part(X, Wt, Z, ph, pw, k, chunks, b, relu, block):
    """Chunk k of ``chunks``: the forward on its samples."""
    N = X.shape[0]
    size = -(-N // chunks)
    n0 = min(N, k * size)
    if Wt.shape[3] == 5:
        _forward_chunk5(X, Wt, Z, ph, pw, n0, min(N, n0 + size), b, relu, block)
    else:
        _forward_chunk(X, Wt, Z, ph, pw, n0, min(N, n0 + size), b, relu)


@njit(cache=True, error_model="numpy", parallel=True)
def _forward(X, Wt, Z, ph, pw, chunks, b, relu, block):
    for k in prange(chunks):
        _forward_part(X, Wt, Z, ph, pw, k, chunks, b, relu, block)


# The serial twins are functions of their own, not njit(_forward.py_func): Numba's cache names a
# function's entries by its name and first line, so a twin sharing the parallel one's Python
# function shared its cache entries, and whichever compiled first ran for both (the "parallel"
# kernels ran on one thread: the split measured x1.00 where a plain parallel loop gained x2).
@njit(cache=True, error_model="numpy", nogil=True)
def _forward_serial(X, Wt, Z, ph, pw, chunks, b, relu, block, k0, k1):
    """Chunks k0..k1-1 of ``chunks`` on the calling thread (all of them: the serial kernel; half
    of them: one of ``DirectConvOps``' two halves)."""
    for k in range(k0, k1):
        _forward_part(X, Wt, Z, ph, pw, k, chunks, b, relu, block)


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _backward_chunk(X, dZ, A, relu, Wt, dWp, dbp, dX, ph, pw, n0, n1, input_grad):
    """dWp (Co, C, kh, kw) = this chunk's BP3 sum (written), dbp (Co,) its BP4 sum (float64, added
    to); dX[n0:n1] if ``input_grad``; Δ = dZ ⊙ ReLU'(A) where ``relu`` (_load_dz), else dZ."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    OH, OW = dZ.shape[2], dZ.shape[3]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    T = OH * Wp
    xp = np.zeros(C * Hp * Wp + kw, X.dtype)
    dzp = np.zeros(Co * T, X.dtype)  # dZ in the padded width: zeros past OW stay zero
    # dX as a forward correlation (a gather: shifted reads, aligned writes; scattering shifted rows
    # into dX's planes made each row's stores wait on the previous row's): dZ zero-padded by
    # kh−1, kw−1 (planes Hq x Wq), the flipped weights, the output rows offset by (ph, pw).
    Hq, Wq = OH + 2 * (kh - 1), OW + 2 * (kw - 1)
    TX = H * Wq
    dzq = np.zeros(Co * Hq * Wq + pw + kw, X.dtype)
    acc = np.empty(TX, X.dtype)
    zero = X.dtype.type(0)
    u = np.uint64
    for co in range(Co):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    dWp[co, c, i, j] = zero
    dzf, Af = dZ.reshape(-1), A.reshape(-1)
    for n in range(n0, n1):
        _pad_sample(X, n, xp, ph, pw, Hp, Wp)
        for co in range(Co):
            for oh in range(OH):
                b = co * T + oh * Wp
                s = u(((n * Co + co) * OH + oh) * OW)
                dbp[co] += _load_dz(dzp, u(b), dzf, Af, s, u(OW), relu, zero)
                q = (co * Hq + oh + kh - 1) * Wq + kw - 1
                for ow in range(OW):
                    dzq[q + ow] = dzp[b + ow]
        # BP3: one dot product over t per weight
        for c in range(C):
            for i in range(kh):
                s = u((c * Hp + i) * Wp)
                for co in range(Co):
                    _tap_dots(dWp[co, c, i], dzp, u(co * T), xp, s, u(T))
        if not input_grad:
            continue
        # dX[c, h, w] = Σ_{co, i, j} W[co, c, kh−1−i, kw−1−j] · dZq[co, h + ph + i, w + pw + j]
        for c in range(C):
            for t in range(TX):
                acc[t] = zero
            for co in range(Co):
                for i in range(kh):
                    _taps(acc, Wt[co, c, kh - 1 - i, ::-1], dzq, u((co * Hq + ph + i) * Wq + pw),
                          u(TX))
            for h in range(H):
                for w_ in range(W):
                    dX[n, c, h, w_] = acc[h * Wq + w_]


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _backward_chunk5(X, dZ, A, relu, Wt, dWp, dbp, dX, ph, pw, n0, n1, input_grad, block):
    """_backward_chunk for 5-wide kernels, register-blocked: BP3 a block of dZ's planes at a time;
    dX a block of X's planes as the adjoint of the forward (_scatter5: dXp[c, (oh + i)·Wp + ow + j]
    += W[co, c, i, j] · dZ[co, oh, ow], the taps gathered from dZp shifted by 4 − j, weights
    Wg[c, co, i, j'] = W[co, c, i, 4 − j']): C_out·kh·C_in·OH·Wp·5 multiply-adds, where the
    gather on dZ padded by k − 1 (_backward_chunk's) takes C_out·kh·C_in·H·(OW + 4)·5 (conv2:
    OH·Wp = 140 against H·(OW + 4) = 252)."""
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    Co, kh = Wt.shape[0], Wt.shape[2]
    OH, OW = dZ.shape[2], dZ.shape[3]
    Hp, Wp = H + 2 * ph, W + 2 * pw
    count = -(-(OH * Wp) // ROUND) * ROUND
    xp = np.zeros(C * Hp * Wp + 5 + ROUND, X.dtype)
    # dZ in the padded width, planes ``count`` apart after 4 leading zeros: the 4 columns past OW
    # in each row (Wp − OW = 4) and the tails stay zero, so dZp[4 + co·count + t − j] reads zero
    # outside plane co for j <= 4.
    dzp = np.zeros(4 + Co * count, X.dtype)
    P = Hp * Wp + ROUND  # a padded dX plane and the tail the last row's count reaches
    acc = np.empty(4 * P, X.dtype)
    Wg = np.empty((C, Co, kh, 5), X.dtype)
    for co in range(Co):
        for c in range(C):
            for i in range(kh):
                for j in range(5):
                    Wg[c, co, i, j] = Wt[co, c, i, 4 - j]
    zero = X.dtype.type(0)
    dWp[...] = zero
    u = np.uint64
    dzf, Af = dZ.reshape(-1), A.reshape(-1)
    for n in range(n0, n1):
        _pad_sample5(X, n, xp, ph, pw, Hp, Wp)
        for co in range(Co):
            for oh in range(OH):
                s = u(((n * Co + co) * OH + oh) * OW)
                b = u(4 + co * count + oh * Wp)
                dbp[co] += _load_dz(dzp, b, dzf, Af, s, u(OW), relu, zero)
        o = 0  # BP3
        while o < Co:
            nb = _block(Co - o, block)
            _dots5(dWp, dzp[4:], xp, C, Hp, Wp, kh, count, o, nb)
            o += nb
        if not input_grad:
            continue
        o = 0  # dX
        while o < C:
            nb = _block(C - o, block)
            for t in range(nb * P):
                acc[t] = zero
            _scatter5(acc, P, Wg, dzp, Co, Wp, kh, count, o, nb)
            _store_planes(dX, n, o, nb, acc, P, ph * Wp + pw, Wp)
            o += nb


@njit(cache=True, error_model="numpy")
def _backward_part(X, dZ, A, relu, Wt, parts, bparts, dX, ph, pw, k, chunks, input_grad, block):
    """Chunk k of ``chunks``: its BP3 sum into parts[k], BP4 into bparts[k], dX of its samples."""
    N = X.shape[0]
    size = -(-N // chunks)
    n0 = min(N, k * size)
    if Wt.shape[3] == 5:
        _backward_chunk5(X, dZ, A, relu, Wt, parts[k], bparts[k], dX, ph, pw, n0, min(N, n0 + size),
                         input_grad, block)
    else:
        _backward_chunk(X, dZ, A, relu, Wt, parts[k], bparts[k], dX, ph, pw, n0, min(N, n0 + size),
                        input_grad)


@njit(cache=True, error_model="numpy")
def _backward_sums(parts, bparts, dW, db, bias_grad, accumulate):
    """dW (+)= Σ_k parts[k] and db (+)= Σ_k bparts[k], chunks in order."""
    chunks = parts.shape[0]
    Co, C, kh, kw = dW.shape
    if bias_grad:
        for co in range(Co):
            t = bparts[0, co]
            for k in range(1, chunks):
                t += bparts[k, co]
            total = db.dtype.type(t)
            db[co] = db[co] + total if accumulate else total
    for co in range(Co):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    s = parts[0, co, c, i, j]
                    for k in range(1, chunks):
                        s += parts[k, co, c, i, j]
                    dW[co, c, i, j] = dW[co, c, i, j] + s if accumulate else s


@njit(cache=True, error_model="numpy", parallel=True)
def _backward(X, dZ, A, relu, Wt, dW, db, dX, ph, pw, chunks, input_grad, bias_grad, accumulate,
              block):
    parts = np.empty((chunks,) + Wt.shape, dW.dtype)
    bparts = np.zeros((chunks, Wt.shape[0]))  # BP4 in float64, a chunk's rows in order
    for k in prange(chunks):
        _backward_part(X, dZ, A, relu, Wt, parts, bparts, dX, ph, pw, k, chunks, input_grad, block)
    _backward_sums(parts, bparts, dW, db, bias_grad, accumulate)


@njit(cache=True, error_model="numpy", nogil=True)
def _backward_chunks(X, dZ, A, relu, Wt, parts, bparts, dX, ph, pw, chunks, input_grad, block, k0,
                     k1):
    """Chunks k0..k1-1 of ``chunks`` on the calling thread, each into its parts[k], bparts[k]."""
    for k in range(k0, k1):
        _backward_part(X, dZ, A, relu, Wt, parts, bparts, dX, ph, pw, k, chunks, input_grad, block)


def _check(X, Wt, out, padding, out_name):
    """(ph, pw) after checking the shapes of a stride-1 convolution X (N, C, H, W) * W (Co, C, kh,
    kw) -> ``out`` (N, Co, OH, OW)."""
    for name, a in (("X", X), ("W", Wt), (out_name, out)):
        if a.ndim != 4:
            raise ValueError(f"{name}: expected a 4-D array, got shape {tuple(a.shape)}")
    ph, pw = (padding, padding) if isinstance(padding, (int, np.integer)) else padding
    ph, pw = int(ph), int(pw)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected values >= 0, got {padding!r}")
    N, C, H, W = X.shape
    Co, kh, kw = Wt.shape[0], Wt.shape[2], Wt.shape[3]
    if Wt.shape[1] != C:
        raise ValueError(f"W: expected {C} input channels (X's), got shape {tuple(Wt.shape)}")
    OH, OW = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"W: kernel {kh}x{kw} larger than the padded input "
                         f"{H + 2 * ph}x{W + 2 * pw}")
    if tuple(out.shape) != (N, Co, OH, OW):
        raise ValueError(f"{out_name}: expected shape {(N, Co, OH, OW)}, got {tuple(out.shape)}")
    return ph, pw


class DirectConvOps:
    """Fused direct convolution (a mixin of ``CpuOps``): Conv2d takes it for few channels."""

    direct_conv = True
    # Whether the direct kernels split the batch over Numba's threads (where the set has 2+). Off:
    # in a training step BLAS's threads keep spinning on the other core after each GEMM (the
    # dense layers'), and a parallel region's second thread then runs at a fraction of a core
    # (LeNet-5, 2-core Xeon, whole step: 24 ms with the split against 11 without; the layers alone,
    # no GEMM around them, gain 1.6-1.9x from it). Re-measured on the 2-core AMD EPYC once the
    # split really ran on two threads (see _forward_serial), the kernels alone, LeNet-5's conv2,
    # batch 128: idle machine, forward 1.02 -> 0.70 ms, backward 2.51 -> 1.48 (conv1 0.46 -> 0.42,
    # 0.51 -> 0.46); with the other core busy (another process), forward 1.3 -> 8 ms, backward
    # 2.6 -> 16 (the region waits for the second thread's time slices). A split pays only where
    # the second core is free for the whole region: hence the halves below, on the worker thread
    # (which spins a few ms at most after a call, then sleeps), with the dense layers' small GEMMs
    # on one BLAS thread
    # (kernels/cpu/dense.py dense_gemm_threads) so that OpenBLAS's worker does not spin there.
    # LeNet-5 step, 2-core AMD EPYC znver3, interleaved medians: halves 10.8 ms, one thread 11.3.
    direct_parallel = False

    # Whether the direct kernels run the first and the second half of the sample chunks on the
    # calling thread and the worker thread (kernels/cpu/worker.py, where the set has 2+ threads):
    # the same chunks and sums, so the same bits.
    direct_halves = True

    direct_block = DIRECT_BLOCK  # planes a register block of the 5-wide kernels: 4 or 2

    def _direct_parallel(self):
        return self.direct_parallel and getattr(self, "nchunks", 1) >= 2

    def _direct_halves(self, chunks, run):
        """``run(k0, k1)`` over the chunks: in two halves at once, or all on this thread."""
        if self.direct_halves and getattr(self, "nchunks", 1) >= 2 and chunks >= 2:
            in_halves(chunks, run)
        else:
            run(0, chunks)

    # The activations the direct kernels fuse (into the forward's write and backward's read of dZ);
    # the layer runs any other as separate passes.
    direct_activations = DIRECT_ACTIVATIONS

    def _direct_act(self, activation):
        if activation not in DIRECT_ACTIVATIONS:
            raise ValueError(f"activation: expected one of {DIRECT_ACTIVATIONS}, got {activation!r}")
        return activation == "relu"

    def direct_conv_forward(self, X, W, Z, padding, b=None, activation="identity"):
        """Z (N, Co, OH, OW) = σ(Σ_{c, i, j} W[co, c, i, j] · Xpad[n, c, oh + i, ow + j] + b[co])
        (stride 1; b None: no bias; σ "identity" or "relu"); one pass over X."""
        relu = self._direct_act(activation)
        if b is None:
            b = np.zeros(W.shape[0], W.dtype)
        checks.float_arrays(NAMES_FORWARD + ("b",), X, W, Z, b)
        ph, pw = _check(X, W, Z, padding, "Z")
        if b.shape != (W.shape[0],):
            raise ValueError(f"b: expected shape {(W.shape[0],)}, got {tuple(b.shape)}")
        chunks = min(DIRECT_CHUNKS, X.shape[0])
        if self._direct_parallel():
            _forward(X, W, Z, ph, pw, chunks, b, relu, self.direct_block)
        else:
            self._direct_halves(chunks, lambda k0, k1: _forward_serial(
                X, W, Z, ph, pw, chunks, b, relu, self.direct_block, k0, k1))
        return Z

    def direct_conv_backward(self, X, dZ, W, dW, dX, padding, accumulate=False, activation="identity",
                             A=None, db=None):
        """Δ = dZ ⊙ σ'(A) (σ "relu": dZ is dA, A the forward's output; "identity": Δ = dZ); dW (+)=
        Σ_n Δ[n] ⋆ Xpad[n] (BP3), db (+)= Σ over n and positions of Δ (BP4, summed in float64; None:
        skipped), and dX = the full convolution of Δ with the flipped W (None: skipped); one pass
        over X and dZ."""
        relu = self._direct_act(activation)
        if relu and A is None:
            raise ValueError("A: the forward's output is needed for activation 'relu'")
        arrays = (X, dZ, W, dW) + (() if dX is None else (dX,))
        checks.float_arrays(NAMES_BACKWARD[:len(arrays)], *arrays)
        ph, pw = _check(X, W, dZ, padding, "dZ")
        if dW.shape != W.shape:
            raise ValueError(f"dW: expected shape {tuple(W.shape)}, got {tuple(dW.shape)}")
        if dX is not None and dX.shape != X.shape:
            raise ValueError(f"dX: expected shape {tuple(X.shape)}, got {tuple(dX.shape)}")
        if relu:
            checks.float_arrays(("dZ", "A"), dZ, A)
            if A.shape != dZ.shape:
                raise ValueError(f"A: expected shape {tuple(dZ.shape)}, got {tuple(A.shape)}")
        if db is not None:
            checks.float_arrays(("dW", "db"), dW, db)
            if db.shape != (W.shape[0],):
                raise ValueError(f"db: expected shape {(W.shape[0],)}, got {tuple(db.shape)}")
        chunks = min(DIRECT_CHUNKS, X.shape[0])
        A = A if relu else dZ
        bias_grad = db is not None
        db = np.zeros(W.shape[0], W.dtype) if db is None else db
        dXo = X if dX is None else dX
        if self._direct_parallel():
            _backward(X, dZ, A, relu, W, dW, db, dXo, ph, pw, chunks, dX is not None, bias_grad,
                      bool(accumulate), self.direct_block)
            return dW, dX
        parts = np.empty((chunks,) + W.shape, dW.dtype)
        bparts = np.zeros((chunks, W.shape[0]))  # BP4 in float64, a chunk's rows in order
        self._direct_halves(chunks, lambda k0, k1: _backward_chunks(
            X, dZ, A, relu, W, parts, bparts, dXo, ph, pw, chunks, dX is not None, self.direct_block,
            k0, k1))
        _backward_sums(parts, bparts, dW, db, bias_grad, bool(accumulate))
        return dW, dX
