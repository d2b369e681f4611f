"""CPU Winograd F(2×2, 3×3) transforms (the layouts and the math: kernels/reference/winograd.py).

Each transform is one pass over its planes: a (sample, channel) plane of X, dX, Z or dZ is owned
by one loop iteration, which also writes (or reads) that plane's tiles in V, dV, M or dM, so the
results do not depend on the thread count. The serial kernels release the GIL (``nogil``): Conv2d
runs two halves of a batch's chunks on two threads at once (layers/conv.py, ``_in_halves``). The
tile transforms are split into a pass down the columns over a whole tile row (contiguous) and a
pass across each tile, four of the 16 rows of V or M at a time. The input gradient is the
overlapping sum of each tile's B dV Bᵀ, written as a gather: each row of the padded plane takes
the two tile rows that cover it, each pixel the two tiles of a row, in a fixed order.

V, dV, M and dM may have their 16 rows apart by more than C·P elements (each row C-contiguous):
Conv2d pads that stride (``TILE_PAD``, kernels/reference/winograd.py), since with C·P·4 bytes a
multiple of 4 KiB the four rows a loop writes or reads at once share L1 cache sets. Measured
(float32, one thread, a sample of the VGG-style 32->32 layer on 32x32): rows contiguous -> padded,
input 87 -> 73 µs, output 35 -> 32, output gradient 69 -> 39; then the input and its gradient on
flat arrays with uint64 indices and the padded plane split into even and odd columns (unit-stride
loops): input 73 -> 62, input gradient 77 -> 68; against 58 for the 16 GEMMs and 12 for filling
V: the transforms are compute-bound on their short rows (16 tiles), not at memory speed.

Then (2-core AMD EPYC znver4, AVX-512, float32, one thread, a chunk of Conv2d's as the benchmark
nets run them, min of interleaved rounds, µs; the resnet preset's 2x16x32x32 and 4x32x16x16, the
VGG-style net's 1x32x32x32): the output transform and its adjoint on flat uint64 indices with dZ's
rows split into even and odd columns, 34 -> 18 and 43 -> 24 (2x16x32x32); every pass that reads
or writes V or M then one loop over all of a plane's tiles instead of one a tile row ("long rows":
a 16-wide AVX-512 loop over the 8 tiles of a row on 16x16 ran its scalar remainder only; the last
tile of each row, whose patch overruns into the next row, redone from the rows' last columns),
4x32x16x16: output 42 -> 23, output gradient 68 -> 23, input 80 -> 67, input gradient 134 -> 73;
1x32x32x32: 34 -> 17, 43 -> 15, 47 -> 43, 73 -> 44 (the same bits as before throughout); the
input's even and odd columns then split in one loop, 67 -> 60 and 43 -> 39. All of it, the op
calls as Conv2d makes them (bias and BP4 in): 4x32x16x16 input 80 -> 63, input gradient 124 -> 72,
output 44 -> 24, output gradient + bias gradient 64 + 11 -> 27; 1x32x32x32 53 -> 38, 72 -> 43,
35 -> 17, 45 + 11 -> 20. (Writing dX's even and odd columns in one loop instead made the input
gradient 1.4x slower: its 8 loads a pixel pair did not vectorize as a group.) The flat
views of V and M are made inside the kernels (NumPy's as_strided in the wrappers cost ~6 µs a
call). The output transform adds Conv2d's bias (and applies ReLU) and its adjoint sums BP4's
bias gradient in the same pass (``b=``, ``activation=``, ``db=``): ~0 and ~2 µs a chunk, against
8 and 11 µs for the separate ``channel_bias_act``/``channel_bias_grad`` passes over the chunk's Z.
With all of this round (bench/winograd_cpu.py, one thread, CPU time, interleaved medians, loaded
machine), the layers forward + backward: 16->16 on 32x32 18.4 -> 13.3 ms, 32->32 on 16x16 14.7 ->
10.5, 32->32 on 32x32 43.1 -> 33.7, 32->64 on 16x16 22.6 -> 16.6; the VGG-style net's step 84.7 ->
70.6 ms (PyTorch at one thread: 122-128), the resnet preset's 88.1 -> 75.6 (PyTorch 78-79).
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu import tile_gemm
from gpubackprop.kernels.cpu.blas import gemm
from gpubackprop.kernels.reference.conv import expect_shape
from gpubackprop.kernels.reference.winograd import (
    TILE_PAD,
    check_filter,
    check_input,
    check_output,
    output_activation,
    padding_pair,
    tiles,
)

NAMES_FILTER = ("W", "U")
NAMES_FILTER_BACKWARD = ("dU", "dW")


@njit(cache=True, inline="always")
def _rows(a):
    """(flat, P, ks): the 1-D C-contiguous view of (16, C, P) tiles with C-contiguous rows ks
    elements apart (``_check_tiles``), element [k, c, p] at k·ks + c·P + p. Made in the kernel:
    NumPy's as_strided in the wrapper cost ~6 µs a call, a quarter of a chunk's output transform."""
    ks = a.strides[0] // a.itemsize
    flat = np.lib.stride_tricks.as_strided(a, shape=(15 * ks + a.shape[1] * a.shape[2],),
                                           strides=(a.itemsize,))
    return np.ascontiguousarray(flat), a.shape[2], ks  # (a view: its one stride is the item's)


# ---- U = G g Gᵀ and its adjoint dg = Gᵀ dU G, filter by filter ------------------------------------
@njit(cache=True, error_model="numpy", nogil=True)
def _filter(W, U):
    Co, C = W.shape[0], W.shape[1]
    half = W.dtype.type(0.5)
    t = np.empty((4, 3), W.dtype)
    for o in range(Co):
        for c in range(C):
            for j in range(3):  # G · g: rows g0, (g0 + g1 + g2)/2, (g0 − g1 + g2)/2, g2
                g0, g1, g2 = W[o, c, 0, j], W[o, c, 1, j], W[o, c, 2, j]
                t[0, j] = g0
                t[1, j] = half * (g0 + g1 + g2)
                t[2, j] = half * (g0 - g1 + g2)
                t[3, j] = g2
            for x in range(4):  # (G g) · Gᵀ: the same along each row
                a0, a1, a2 = t[x, 0], t[x, 1], t[x, 2]
                U[4 * x + 0, o, c] = a0
                U[4 * x + 1, o, c] = half * (a0 + a1 + a2)
                U[4 * x + 2, o, c] = half * (a0 - a1 + a2)
                U[4 * x + 3, o, c] = a2


@njit(cache=True, error_model="numpy", nogil=True)
def _filter_backward(dU, dW, accumulate):
    Co, C = dW.shape[0], dW.shape[1]
    half = dW.dtype.type(0.5)
    t = np.empty((4, 3), dW.dtype)
    for o in range(Co):
        for c in range(C):
            for x in range(4):  # (dU) · G along each row: Gᵀ's columns
                u0, u1, u2, u3 = dU[4 * x, o, c], dU[4 * x + 1, o, c], dU[4 * x + 2, o, c], \
                    dU[4 * x + 3, o, c]
                t[x, 0] = u0 + half * (u1 + u2)
                t[x, 1] = half * (u1 - u2)
                t[x, 2] = half * (u1 + u2) + u3
            for j in range(3):  # Gᵀ · (dU G)
                u0, u1, u2, u3 = t[0, j], t[1, j], t[2, j], t[3, j]
                r0 = u0 + half * (u1 + u2)
                r1 = half * (u1 - u2)
                r2 = half * (u1 + u2) + u3
                if accumulate:
                    dW[o, c, 0, j] += r0
                    dW[o, c, 1, j] += r1
                    dW[o, c, 2, j] += r2
                else:
                    dW[o, c, 0, j] = r0
                    dW[o, c, 1, j] = r1
                    dW[o, c, 2, j] = r2


# ---- V = Bᵀ d B, plane by plane ------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _input_plane(x, v, q, C, H, W, ph, pw, TH, TW, P, ks, pe, po):
    """The T = TH·TW tiles of plane q = n·C + c of the flat X ``x`` into the flat ``v`` (V[k, c, p]
    at k·ks + c·P + p). The padded plane (zeros outside X, also past a ragged last tile) is first
    split into its even and odd columns, ``pe`` and ``po``, and its even and odd rows: padded row
    2σ + ρ, columns 2t and 2t + 1 (t < TW), at ρ·L + σ·TW + t (L = (TH + 1)·TW + 1), so that tile
    p = s·TW + t reads patch row i at p (i = 0: ρ 0; 1: ρ 1), or p + TW (i = 2, 3), and its right
    half at p + 1: every pass after is one loop over all T tiles (long rows, vectorized; over one
    tile row, 8 tiles on 16x16, the loops ran without their vectors). Each row's column 2·TW
    (and 2·TW + 1), which the last tile of a row reads, lies at 2L + ρ·(TH + 1) + σ, and the long
    loop's last tile of each row (which read the next row's first) is then redone from it. Per
    row x of Bᵀ (d0 − d2, d1 + d2, d2 − d1, d1 − d3: row a plus ±row b, exact), the four entries of
    Bᵀ d B in that row. Indices are uint64, so that Numba emits no negative-index checks (as in
    kernels/cpu/conv.py's copies)."""
    u = np.uint64
    n, c = q // C, q % C
    T = TH * TW
    L = (TH + 1) * TW + 1
    LE = 2 * L  # the rows' last columns
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    xb = q * H * W
    # padded column 2t holds X's column 2t − pw, 2t + 1 holds 2t + 1 − pw, where inside X
    lo_e, hi_e = (pw + 1) // 2, min(TW + 1, (W - 1 + pw) // 2 + 1)
    lo_o, hi_o = pw // 2, min(TW + 1, (W - 2 + pw) // 2 + 1)
    hi_e, hi_o = max(hi_e, lo_e), max(hi_o, lo_o)
    le0, le1 = min(lo_e, TW), min(hi_e, TW)  # [lo, hi) within the first TW columns
    lo0, lo1 = min(lo_o, TW), min(hi_o, TW)
    last_e, last_o = lo_e <= TW < hi_e, lo_o <= TW < hi_o
    c0 = max(le0, lo0)  # [c0, c1): the columns t of both parities inside X
    c1 = max(c0, min(le1, lo1))
    for r in range(2 * TH + 2):
        h = r - ph
        rho, sig = r & 1, r >> 1
        rb = u(rho * L + sig * TW)
        lb = u(LE + rho * (TH + 1) + sig)
        if 0 <= h < H:
            xr = xb + h * W - pw  # + 2t (even) or 2t + 1 (odd): >= 0 inside [lo, hi)
            for t in range(le0):
                pe[rb + u(t)] = zero
            for t in range(lo0):
                po[rb + u(t)] = zero
            for t in range(le0, min(c0, le1)):
                pe[rb + u(t)] = x[u(xr + 2 * t)]
            for t in range(lo0, min(c0, lo1)):
                po[rb + u(t)] = x[u(xr + 2 * t + 1)]
            # both columns of each pair from one contiguous stretch of X's row, a stride-2 group
            # that LLVM vectorizes with shuffles (the even and the odd columns in two loops each
            # read every other element: the whole transform 68 -> 60 µs a 4x32x16x16 chunk)
            for t in range(c0, c1):
                i = u(xr + 2 * t)
                pe[rb + u(t)] = x[i]
                po[rb + u(t)] = x[i + u(1)]
            for t in range(max(c1, le0), le1):
                pe[rb + u(t)] = x[u(xr + 2 * t)]
            for t in range(max(c1, lo0), lo1):
                po[rb + u(t)] = x[u(xr + 2 * t + 1)]
            for t in range(le1, TW):
                pe[rb + u(t)] = zero
            for t in range(lo1, TW):
                po[rb + u(t)] = zero
            pe[lb] = x[u(xr + 2 * TW)] if last_e else zero
            po[lb] = x[u(xr + 2 * TW + 1)] if last_o else zero
        else:
            for t in range(TW):
                pe[rb + u(t)] = zero
                po[rb + u(t)] = zero
            pe[lb] = zero
            po[lb] = zero
    pe[u(L - 1)] = zero  # read past the end by the long loops' last tile (then redone)
    po[u(L - 1)] = zero
    pe[u(2 * L - 1)] = zero
    po[u(2 * L - 1)] = zero
    base = c * P + n * T
    for xx in range(4):
        if xx == 0:
            ra, rb_, sg = 0, 2, -one
        elif xx == 1:
            ra, rb_, sg = 1, 2, one
        elif xx == 2:
            ra, rb_, sg = 2, 1, -one
        else:
            ra, rb_, sg = 1, 3, -one
        # patch row i of tile p at (i & 1)·L + (i >> 1)·TW + p
        A = u((ra & 1) * L + (ra >> 1) * TW)
        B = u((rb_ & 1) * L + (rb_ >> 1) * TW)
        k0 = u(4 * xx * ks + base)
        k1 = k0 + u(ks)
        k2 = k1 + u(ks)
        k3 = k2 + u(ks)
        for p in range(T):
            pp = u(p)
            e0 = pe[A + pp] + sg * pe[B + pp]
            o0 = po[A + pp] + sg * po[B + pp]
            e1 = pe[A + pp + u(1)] + sg * pe[B + pp + u(1)]
            o1 = po[A + pp + u(1)] + sg * po[B + pp + u(1)]
            v[k0 + pp] = e0 - e1
            v[k1 + pp] = o0 + e1
            v[k2 + pp] = e1 - o0
            v[k3 + pp] = o0 - o1
        for s in range(TH):  # each row's last tile: its right half from the last columns
            pp = u(s * TW + TW - 1)
            la = u(LE + (ra & 1) * (TH + 1) + s + (ra >> 1))
            lb = u(LE + (rb_ & 1) * (TH + 1) + s + (rb_ >> 1))
            e0 = pe[A + pp] + sg * pe[B + pp]
            o0 = po[A + pp] + sg * po[B + pp]
            e1 = pe[la] + sg * pe[lb]
            o1 = po[la] + sg * po[lb]
            v[k0 + pp] = e0 - e1
            v[k1 + pp] = o0 + e1
            v[k2 + pp] = e1 - o0
            v[k3 + pp] = o0 - o1


@njit(cache=True, error_model="numpy", nogil=True)
def _input_serial(X, V, ph, pw, TH, TW):
    v, P, ks = _rows(V)
    N, C, H, W = X.shape
    x = X.reshape(-1)
    pe = np.empty(2 * ((TH + 1) * TW + 1) + 2 * (TH + 1), X.dtype)
    po = np.empty_like(pe)
    for q in range(N * C):
        _input_plane(x, v, q, C, H, W, ph, pw, TH, TW, P, ks, pe, po)


@njit(cache=True, error_model="numpy", parallel=True)
def _input_parallel(X, V, ph, pw, TH, TW):
    v, P, ks = _rows(V)
    N, C, H, W = X.shape
    x = X.reshape(-1)
    for q in prange(N * C):
        pe = np.empty(2 * ((TH + 1) * TW + 1) + 2 * (TH + 1), X.dtype)
        po = np.empty_like(pe)
        _input_plane(x, v, q, C, H, W, ph, pw, TH, TW, P, ks, pe, po)


# ---- dX = Σ_tiles B dV Bᵀ, as a gather, plane by plane -----------------------------------------------
@njit(cache=True, error_model="numpy")
def _input_backward_plane(v, dx, q, C, H, W, ph, pw, TH, TW, P, ks, buf):
    """Plane q of the flat dX from the T = TH·TW tiles of the flat dV ``v`` (as ``_input_plane``'s).
    Across a tile row, B's columns spread tile m's four entries over padded columns 2m … 2m + 3,
    so the even column 2m takes v0(m) and (v1 + v2 − v0)(m − 1), the odd column 2m + 1 takes
    (v1 − v2 + v3)(m) and −v3(m − 1): for each row x of the tiles, the even and odd columns
    ``ee``/``eo`` of every tile row at once, one loop over all T tiles (long rows, vectorized), in
    ``buf``'s rows of TW with a zero row above and below (tile rows −1 and TH); the first column
    of each tile row is then redone (the long loop added the previous row's last tile to it), and
    column TW (the last tile's right half) lies apart, (TH + 2) entries a row x. Down the columns
    the same with tile rows s and s − 1: padded row 2s takes e0 and (e1 + e2 − e0) of the row
    above, row 2s + 1 (e1 − e2 + e3) and −e3 of the row above. Every padded pixel is formed once,
    in a fixed order, and written if inside dX."""
    u = np.uint64
    n, c = q // C, q % C
    T = TH * TW
    R = (TH + 2) * TW  # one of ee_x, eo_x: rows −1 … TH of TW
    LB = 8 * R  # then the last columns: (TH + 2) a row x, ee then eo
    R2 = TH + 2
    lo_e, hi_e = (pw + 1) // 2, min(TW + 1, (W - 1 + pw) // 2 + 1)
    lo_o, hi_o = pw // 2, min(TW + 1, (W - 2 + pw) // 2 + 1)
    hi_e, hi_o = max(hi_e, lo_e), max(hi_o, lo_o)
    le1, lo1 = min(hi_e, TW), min(hi_o, TW)
    last_e, last_o = lo_e <= TW < hi_e, lo_o <= TW < hi_o
    base = c * P + n * T
    xb = q * H * W
    for x in range(4):
        k0 = u(4 * x * ks + base)
        k1 = k0 + u(ks)
        k2 = k1 + u(ks)
        k3 = k2 + u(ks)
        E = u(2 * x * R + TW)  # tile row 0 of ee_x
        O = E + u(R)
        for p in range(1, T):
            pp, p1 = u(p), u(p - 1)
            buf[E + pp] = v[k0 + pp] + (v[k1 + p1] + v[k2 + p1] - v[k0 + p1])
            buf[O + pp] = (v[k1 + pp] - v[k2 + pp] + v[k3 + pp]) - v[k3 + p1]
        LE = u(LB + 2 * x * R2 + 1)
        LO = LE + u(R2)
        for s in range(TH):
            f = u(s * TW)
            buf[E + f] = v[k0 + f]
            buf[O + f] = v[k1 + f] - v[k2 + f] + v[k3 + f]
            last = f + u(TW - 1)
            buf[LE + u(s)] = v[k1 + last] + v[k2 + last] - v[k0 + last]
            buf[LO + u(s)] = -v[k3 + last]
    E0, E1, E2, E3 = u(0), u(2 * R), u(4 * R), u(6 * R)
    O0, O1, O2, O3 = u(R), u(3 * R), u(5 * R), u(7 * R)
    L0, L1, L2, L3 = u(LB), u(LB + 2 * R2), u(LB + 4 * R2), u(LB + 6 * R2)
    M0, M1, M2, M3 = L0 + u(R2), L1 + u(R2), L2 + u(R2), L3 + u(R2)
    for s in range(TH + 1):
        cur, prv = u((s + 1) * TW), u(s * TW)  # tile rows s and s − 1 (zeros outside)
        cl, pl = u(s + 1), u(s)
        h = 2 * s - ph
        if 0 <= h < H:
            d = xb + h * W - pw  # + 2m (even) or 2m + 1 (odd): >= 0 inside [lo, hi)
            for m in range(lo_e, le1):
                a, b = cur + u(m), prv + u(m)
                dx[u(d + 2 * m)] = buf[E0 + a] + (buf[E1 + b] + buf[E2 + b] - buf[E0 + b])
            if last_e:
                dx[u(d + 2 * TW)] = buf[L0 + cl] + (buf[L1 + pl] + buf[L2 + pl] - buf[L0 + pl])
            for m in range(lo_o, lo1):
                a, b = cur + u(m), prv + u(m)
                dx[u(d + 2 * m + 1)] = buf[O0 + a] + (buf[O1 + b] + buf[O2 + b] - buf[O0 + b])
            if last_o:
                dx[u(d + 2 * TW + 1)] = buf[M0 + cl] + (buf[M1 + pl] + buf[M2 + pl] - buf[M0 + pl])
        h += 1
        if 0 <= h < H:
            d = xb + h * W - pw
            for m in range(lo_e, le1):
                a, b = cur + u(m), prv + u(m)
                dx[u(d + 2 * m)] = (buf[E1 + a] - buf[E2 + a] + buf[E3 + a]) - buf[E3 + b]
            if last_e:
                dx[u(d + 2 * TW)] = (buf[L1 + cl] - buf[L2 + cl] + buf[L3 + cl]) - buf[L3 + pl]
            for m in range(lo_o, lo1):
                a, b = cur + u(m), prv + u(m)
                dx[u(d + 2 * m + 1)] = (buf[O1 + a] - buf[O2 + a] + buf[O3 + a]) - buf[O3 + b]
            if last_o:
                dx[u(d + 2 * TW + 1)] = (buf[M1 + cl] - buf[M2 + cl] + buf[M3 + cl]) - buf[M3 + pl]


@njit(cache=True, error_model="numpy", nogil=True)
def _input_backward_serial(dV, dX, ph, pw, TH, TW):
    v, P, ks = _rows(dV)
    N, C, H, W = dX.shape
    dx = dX.reshape(-1)
    buf = np.zeros(8 * (TH + 2) * (TW + 1), dX.dtype)  # rows −1 and TH stay zero
    for q in range(N * C):
        _input_backward_plane(v, dx, q, C, H, W, ph, pw, TH, TW, P, ks, buf)


@njit(cache=True, error_model="numpy", parallel=True)
def _input_backward_parallel(dV, dX, ph, pw, TH, TW):
    v, P, ks = _rows(dV)
    N, C, H, W = dX.shape
    dx = dX.reshape(-1)
    for q in prange(N * C):
        buf = np.zeros(8 * (TH + 2) * (TW + 1), dX.dtype)
        _input_backward_plane(v, dx, q, C, H, W, ph, pw, TH, TW, P, ks, buf)


# ---- Z = Aᵀ M A (+ b, ReLU) and its adjoint dM = A dZ Aᵀ (with Σ dZ), plane by plane ----------------------
@njit(cache=True, error_model="numpy", inline="always")
def _act(z, relu, zero):
    return zero if relu and z < zero else z


@njit(cache=True, error_model="numpy")
def _output_plane(m, z, q, Co, OH, OW, TH, TW, P, ks, b, e, relu):
    """Plane q = n·Co + o of the flat Z ``z`` from its T = TH·TW tiles in the flat M ``m`` (M[k, o, p]
    at k·ks + o·P + p, the plane's tiles contiguous in each row): · A across each tile's rows x,
    four rows of M at a time, in one loop over all T tiles (long rows: AVX-512 takes 16 at a time,
    and a loop over one tile row, 8 tiles on 16x16, ran without its vectors), into ``e`` (the row
    x's even and odd columns, 8 rows of T); then per tile row Aᵀ · down the columns into Z's two
    rows (the ragged last row and column cropped), plus b[o] where ``b`` has entries:
    (AᵀMA) + b, rounded as the separate bias pass rounds it (−0.0 without one: z + (−0.0) is z,
    −0.0 included), then ReLU where ``relu`` (0 if z < 0, else z: NaN kept, as the fused
    set's activation pass does)."""
    u = np.uint64
    n, o = q // Co, q % Co
    T = TH * TW
    bias = b[o] if b.shape[0] else z.dtype.type(-0.0)
    zero = z.dtype.type(0)
    base = o * P + n * T
    for x in range(4):
        k0 = u(4 * x * ks + base)
        k1 = k0 + u(ks)
        k2 = k1 + u(ks)
        k3 = k2 + u(ks)
        re = u(2 * x * T)
        ro = re + u(T)
        for p in range(T):
            pp = u(p)
            m0, m1, m2, m3 = m[k0 + pp], m[k1 + pp], m[k2 + pp], m[k3 + pp]
            e[re + pp] = m0 + m1 + m2
            e[ro + pp] = m1 - m2 - m3
    E0, O0, E1, O1 = u(0), u(T), u(2 * T), u(3 * T)
    E2, O2, E3, O3 = u(4 * T), u(5 * T), u(6 * T), u(7 * T)
    half = OW // 2  # tiles whose two columns lie inside Z
    zb = q * OH * OW
    for s in range(TH):
        h = 2 * s
        zr = u(zb + h * OW)
        r = u(s * TW)
        for t in range(half):
            i, w = r + u(t), zr + u(2 * t)
            z[w] = _act((e[E0 + i] + e[E1 + i] + e[E2 + i]) + bias, relu, zero)
            z[w + u(1)] = _act((e[O0 + i] + e[O1 + i] + e[O2 + i]) + bias, relu, zero)
        if half < TW:
            i = r + u(half)
            z[zr + u(OW - 1)] = _act((e[E0 + i] + e[E1 + i] + e[E2 + i]) + bias, relu, zero)
        if h + 1 < OH:
            zr += u(OW)
            for t in range(half):
                i, w = r + u(t), zr + u(2 * t)
                z[w] = _act((e[E1 + i] - e[E2 + i] - e[E3 + i]) + bias, relu, zero)
                z[w + u(1)] = _act((e[O1 + i] - e[O2 + i] - e[O3 + i]) + bias, relu, zero)
            if half < TW:
                i = r + u(half)
                z[zr + u(OW - 1)] = _act((e[E1 + i] - e[E2 + i] - e[E3 + i]) + bias, relu, zero)


@njit(cache=True, error_model="numpy", nogil=True)
def _output_serial(M, Z, TH, TW, b, relu):
    m, P, ks = _rows(M)
    N, Co, OH, OW = Z.shape
    z = Z.reshape(-1)
    e = np.empty(8 * TH * TW, Z.dtype)
    for q in range(N * Co):
        _output_plane(m, z, q, Co, OH, OW, TH, TW, P, ks, b, e, relu)


@njit(cache=True, error_model="numpy", parallel=True)
def _output_parallel(M, Z, TH, TW, b, relu):
    m, P, ks = _rows(M)
    N, Co, OH, OW = Z.shape
    z = Z.reshape(-1)
    for q in prange(N * Co):
        e = np.empty(8 * TH * TW, Z.dtype)
        _output_plane(m, z, q, Co, OH, OW, TH, TW, P, ks, b, e, relu)


@njit(cache=True, error_model="numpy", inline="always")
def _put4(dm, i, K, a, b):
    """A tile's row (a, b) · Aᵀ = (a, a + b, a − b, −b) into four rows of dM, K apart."""
    dm[i] = a
    dm[i + K] = a + b
    dm[i + K + K] = a - b
    dm[i + K + K + K] = -b


@njit(cache=True, error_model="numpy")
def _output_backward_plane(dz, dm, q, Co, OH, OW, TH, TW, P, ks, y, acc, sums):
    """The T = TH·TW tiles of plane q of the flat dM ``dm`` from the flat dZ ``dz`` (a ragged tile's
    missing outputs as zeros). First each tile row's two rows of dZ split into their even and odd
    columns (``y``: 4 rows of T, tile p = s·TW + t at p, zeros past the edge); then per row x of
    A · y down the columns (y0, y0 + y1, y0 − y1, −y1) the four entries (a, a + b, a − b, −b) of
    that row · Aᵀ, four rows of dM at a time, each in one loop over all T tiles (long rows, as in
    ``_output_plane``). Where ``sums`` has entries, sums[q] = Σ of the plane in float64: each tile's
    four values added into ``acc[t]`` (TW lanes, a vectorizable loop), the lanes then added in
    order: a fixed order, for BP4 of the bias."""
    u = np.uint64
    n, o = q // Co, q % Co
    zero = dz.dtype.type(0)
    want = sums.shape[0] > 0
    T = TH * TW
    Y1, Y2, Y3 = u(T), u(2 * T), u(3 * T)
    half = OW // 2  # tiles whose two columns lie inside dZ
    zb = q * OH * OW
    if want:
        for t in range(TW):
            acc[t] = 0.0
    for s in range(TH):
        h = 2 * s
        r0 = u(zb + h * OW)
        r = u(s * TW)
        for t in range(half):
            tt = u(t)
            y[r + tt] = dz[r0 + u(2) * tt]
            y[Y1 + r + tt] = dz[r0 + u(2) * tt + u(1)]
        if half < TW:  # OW odd: the last tile's second column is outside
            y[r + u(half)] = dz[r0 + u(OW - 1)]
            y[Y1 + r + u(half)] = zero
        if h + 1 < OH:
            r1 = r0 + u(OW)
            for t in range(half):
                tt = u(t)
                y[Y2 + r + tt] = dz[r1 + u(2) * tt]
                y[Y3 + r + tt] = dz[r1 + u(2) * tt + u(1)]
            if half < TW:
                y[Y2 + r + u(half)] = dz[r1 + u(OW - 1)]
                y[Y3 + r + u(half)] = zero
        else:
            for t in range(TW):
                y[Y2 + r + u(t)] = zero
                y[Y3 + r + u(t)] = zero
        if want:
            for t in range(TW):
                i = r + u(t)
                acc[t] += (np.float64(y[i]) + np.float64(y[Y1 + i])) + \
                    (np.float64(y[Y2 + i]) + np.float64(y[Y3 + i]))
    K = u(ks)
    k = u(o * P + n * T)  # rows 0-3 of dM: A·y's row y0
    for p in range(T):
        i = u(p)
        _put4(dm, k + i, K, y[i], y[Y1 + i])
    k += u(4) * K  # rows 4-7: y0 + y1
    for p in range(T):
        i = u(p)
        _put4(dm, k + i, K, y[i] + y[Y2 + i], y[Y1 + i] + y[Y3 + i])
    k += u(4) * K  # rows 8-11: y0 − y1
    for p in range(T):
        i = u(p)
        _put4(dm, k + i, K, y[i] - y[Y2 + i], y[Y1 + i] - y[Y3 + i])
    k += u(4) * K  # rows 12-15: −y1
    for p in range(T):
        i = u(p)
        _put4(dm, k + i, K, -y[Y2 + i], -y[Y3 + i])
    if want:
        total = 0.0
        for t in range(TW):
            total += acc[t]
        sums[q] = total


@njit(cache=True, error_model="numpy", inline="always")
def _add_sums(sums, db, N, Co, accumulate):
    """db[o] (+)= Σ_n sums[n·Co + o], the samples in order, in float64."""
    for o in range(Co):
        total = 0.0
        for n in range(N):
            total += sums[n * Co + o]
        db[o] = db[o] + total if accumulate else total


@njit(cache=True, error_model="numpy", nogil=True)
def _output_backward_serial(dZ, dM, TH, TW, db, accumulate):
    dm, P, ks = _rows(dM)
    N, Co, OH, OW = dZ.shape
    sums = np.empty(N * Co if db.shape[0] else 0, np.float64)
    dz = dZ.reshape(-1)
    y = np.empty(4 * TH * TW, dZ.dtype)
    acc = np.empty(TW, np.float64)
    for q in range(N * Co):
        _output_backward_plane(dz, dm, q, Co, OH, OW, TH, TW, P, ks, y, acc, sums)
    if sums.shape[0]:
        _add_sums(sums, db, N, Co, accumulate)


@njit(cache=True, error_model="numpy", parallel=True)
def _output_backward_parallel(dZ, dM, TH, TW, db, accumulate):
    dm, P, ks = _rows(dM)
    N, Co, OH, OW = dZ.shape
    sums = np.empty(N * Co if db.shape[0] else 0, np.float64)
    dz = dZ.reshape(-1)
    for q in prange(N * Co):
        y = np.empty(4 * TH * TW, dZ.dtype)
        acc = np.empty(TW, np.float64)
        _output_backward_plane(dz, dm, q, Co, OH, OW, TH, TW, P, ks, y, acc, sums)
    if sums.shape[0]:
        _add_sums(sums, db, N, Co, accumulate)


def _check_tiles(name, a, dtype):
    """TypeError/ValueError unless ``a`` is (16, C, P) of ``dtype`` with each of its 16 rows
    C-contiguous (the rows themselves may lie further apart)."""
    if not hasattr(a, "dtype") or a.dtype != dtype:
        got = f"dtype {a.dtype}" if hasattr(a, "dtype") else type(a).__name__
        raise TypeError(f"{name}: expected a {dtype} array (the dtype of the other), got {got}")
    isz = a.itemsize
    if a.ndim != 3 or a.shape[1] * a.shape[2] == 0:
        return  # the shape check names it, or nothing to index
    s0, s1, s2 = a.strides
    if s2 != isz or (a.shape[1] > 1 and s1 != a.shape[2] * isz) or s0 < a.shape[1] * a.shape[2] * isz:
        raise ValueError(f"{name}: expected 16 C-contiguous (C, P) rows, got strides {a.strides}")


_NO_SUMS = np.empty(0, np.float64)


def _bias_arg(b, C, dtype):
    """``b`` as the kernels take it: a C-contiguous (C,) array of ``dtype``, or an empty one."""
    if b is None:
        return np.empty(0, dtype)
    if not hasattr(b, "dtype") or b.dtype != dtype or not b.flags.c_contiguous:
        got = f"dtype {b.dtype}" if hasattr(b, "dtype") else type(b).__name__
        raise TypeError(f"b: expected a C-contiguous {dtype} array (Z's dtype), got {got}")
    expect_shape("b", b, (C,), " (the channels of Z)")
    return b


def _chunks_args(X, U, vflat, mflat, chunks, padding, dtype):
    """(ph, pw, TH, TW, bounds) of the chunked Winograd ops, the chunks as an (n, 2) int64 array,
    after checking that the flat scratch buffers hold the largest chunk's tiles as Conv2d lays
    them out (16 rows of C·P + TILE_PAD)."""
    N, Ci, H, W = X.shape
    ph, pw = padding_pair(padding)
    _, _, TH, TW = tiles(H, W, (ph, pw))
    bounds = np.asarray(chunks, np.int64).reshape(-1, 2)
    P = int((bounds[:, 1] - bounds[:, 0]).max(initial=0)) * TH * TW
    for name, a, C in (("vflat", vflat, Ci), ("mflat", mflat, U.shape[1])):
        if a.dtype != dtype or a.ndim != 1 or a.size < 16 * (C * P + TILE_PAD):
            raise ValueError(f"{name}: expected a flat {dtype} buffer of at least "
                             f"{16 * (C * P + TILE_PAD)} elements, got {a.dtype} {a.shape}")
    return int(ph), int(pw), TH, TW, bounds


def _check_db(db, C, dtype):
    if not hasattr(db, "dtype") or db.dtype not in (dtype, np.float64) or not db.flags.c_contiguous:
        got = f"dtype {db.dtype}" if hasattr(db, "dtype") else type(db).__name__
        raise TypeError(f"db: expected a C-contiguous {dtype} or float64 array, got {got}")
    expect_shape("db", db, (C,), " (the channels of dZ)")


# ---- Conv2d's halves in one call each: no GIL between a chunk's steps --------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _row_stride(C, P):
    """The elements between a chunk's 16 rows of tiles in its scratch buffer (uint64)."""
    return np.uint64(C) * np.uint64(P) + np.uint64(TILE_PAD)


@njit(cache=True, error_model="numpy", inline="always")
def _chunk_tiles(flat, C, P):
    """A chunk's (16, C, P) tiles in a scratch buffer as Conv2d lays them out (layers/conv.py
    ``_tiles_view``): 16 C-contiguous rows of C·P, ``_row_stride`` elements apart."""
    rows = flat[:16 * (C * P + TILE_PAD)].reshape(16, C * P + TILE_PAD)
    isz = flat.itemsize
    return np.lib.stride_tricks.as_strided(rows, shape=(16, C, P),
                                           strides=(rows.strides[0], P * isz, isz))


@njit(cache=True, error_model="numpy", nogil=True)
def _forward_half(X, U, vflat, mflat, Z, bounds, ph, pw, TH, TW, b, relu, own):
    """Conv2d's Winograd forward over the chunks [bounds[i, 0], bounds[i, 1]) of one half: V =
    BᵀdB, the 16 GEMMs M = U · V (NumPy's OpenBLAS, kernels/cpu/blas.py, or with ``own``
    kernels/cpu/tile_gemm.py's, on the flat buffers' rows), Z = AᵀMA (+ b, ReLU), as
    the layer's loop of ops calls; in one call, so that the two halves' threads do not take
    turns at the GIL between the steps (each turn a thread wake-up, ~0.1 ms on a VM)."""
    Ci, Co, T = X.shape[1], U.shape[1], TH * TW
    for i in range(bounds.shape[0]):
        s, e = bounds[i, 0], bounds[i, 1]
        V = _chunk_tiles(vflat, Ci, (e - s) * T)
        M = _chunk_tiles(mflat, Co, (e - s) * T)
        P = np.uint64((e - s) * T)  # the flat rows of V and M (_chunk_tiles), for tile_gemm
        vs, ms = _row_stride(Ci, P), _row_stride(Co, P)
        _input_serial(X[s:e], V, ph, pw, TH, TW)
        for k in range(16):
            if own:
                tile_gemm.nn(U[k], vflat, np.uint64(k) * vs, mflat, np.uint64(k) * ms, P)
            else:
                gemm(U[k], V[k], M[k])
        _output_serial(M, Z[s:e], TH, TW, b, relu)


@njit(cache=True, error_model="numpy", nogil=True)
def _backward_half(X, dZ, U, vflat, mflat, dU, dUc, dX, bounds, ph, pw, TH, TW, db, input_grad,
                   own):
    """Conv2d's Winograd backprop over one half's chunks, the last first (its V is still in
    ``vflat`` from the forward): dM = A dZ Aᵀ (with BP4's float64 sums added into db where it has
    C_out entries), BP3 dU = dM · Vᵀ (the first chunk's written, the others' through dUc and
    added), and with ``input_grad`` dV = Uᵀ · dM into V's buffer, then dX; the steps, order and
    bits of the layer's loop of ops calls, in one call (see _forward_half)."""
    Ci, Co, T = X.shape[1], U.shape[1], TH * TW
    last = bounds.shape[0] - 1
    for i in range(last, -1, -1):
        s, e = bounds[i, 0], bounds[i, 1]
        V = _chunk_tiles(vflat, Ci, (e - s) * T)
        dM = _chunk_tiles(mflat, Co, (e - s) * T)
        P = np.uint64((e - s) * T)
        vs, ms = _row_stride(Ci, P), _row_stride(Co, P)
        if i != last:
            _input_serial(X[s:e], V, ph, pw, TH, TW)
        _output_backward_serial(dZ[s:e], dM, TH, TW, db, True)
        out = dU if i == last else dUc
        for k in range(16):
            if own:
                tile_gemm.nt(mflat, np.uint64(k) * ms, vflat, np.uint64(k) * vs, P, out[k])
            else:
                gemm(dM[k], V[k].T, out[k])
        if i != last:
            dU += dUc
        if input_grad:
            for k in range(16):
                if own:
                    tile_gemm.nn(U[k].T, mflat, np.uint64(k) * ms, vflat, np.uint64(k) * vs, P)
                else:
                    gemm(U[k].T, dM[k], V[k])
            _input_backward_serial(V, dX[s:e], ph, pw, TH, TW)


class WinogradOps:
    """Fused Winograd F(2×2, 3×3) transforms (a mixin of ``CpuOps``: uses its parallel thresholds)."""

    winograd_conv = True  # Conv2d takes them for the layers where they were measured faster
    # Conv2d's Winograd chunks, always: V and M of a chunk within about half a core's L2 (2 MiB
    # here), so that the transforms and the 16 GEMMs pass over them in the cache. Measured on the
    # VGG-style 32->32 3x3 layer on 32x32, batch 64, forward + backward, one thread, loaded machine:
    # V + M of 0.5 MiB a chunk 38.7 ms, 1 MiB (one sample) 38.1, 2 MiB 57.7, 4 MiB 85.4 (im2col +
    # GEMM: 66.0); 32->32 on 16x16: 23.7, 20.3, 25.3, 33.4 (41.6). Re-measured on the 2-core AMD
    # EPYC (1 MiB of L2 a core) after the long-row transforms, min CPU ms of interleaved rounds,
    # budget 256 KiB / 512 KiB / 1 MiB / 2 MiB: 16->16 on 32x32 12.9 / 13.1 / 11.6 / 12.1, 32->32
    # on 16x16 11.0 / 9.5 / 9.0 / 9.0, 32->32 on 32x32 36.8 / 36.6 / 36.7 / 38.5, 32->64 on 16x16
    # 17.6 / 17.5 / 16.4 / 16.6: 1 MiB stays. Keeping every chunk's V from the forward pass instead
    # of recomputing it in backprop (8-32 MiB a layer, read back from memory) does not pay either:
    # 15.2 -> 16.1, 11.8 -> 12.3, 39.8 -> 39.1, 19.6 -> 19.8 ms (the same four layers, before the
    # long rows): V recomputed from X runs in the cache about as fast as V read from memory.
    # On the 2-core AMD EPYC znver3 (512 KiB of L2 a core), once the worker's hand-off spins
    # (kernels/cpu/worker.py) and with the 16-channel products of tile_gemm, the resnet preset's
    # step (interleaved medians, same process): 512 KiB 85.3 ms against 1 MiB 87.5; 256 KiB 86.9
    # against 512 KiB 81.8 (a chunk is one sample at least: 512 KiB for the 16-channel layers).
    winograd_cache_bytes = 1 << 19
    # ... and each of a chunk's 16 GEMMs (C_out·P·C_in multiply-adds) no larger than OpenBLAS runs
    # on one thread (it threads a GEMM above 65536·4 of them, interface/gemm.c): Conv2d runs two
    # halves of the chunks on two threads at once, whose GEMMs would otherwise start BLAS's own
    # threads on the same two cores. (The benchmarked layers' chunks are within it already.)
    winograd_gemm_serial = 1 << 18

    # The chunks' 16 products by kernels/cpu/tile_gemm.py rather than OpenBLAS where C_in and C_out
    # are both at most this many. Measured (2-core AMD EPYC znver3, one thread, interleaved medians,
    # forward / backward of half a batch of 64 in chunks): 16->16 on 32x32, 2-sample chunks 4.65 /
    # 7.71 ms against OpenBLAS 4.79 / 8.32, 1-sample chunks 4.03 / 6.20 against 3.95 / 7.35; 32->32
    # on 16x16, 4-sample chunks 3.11 / 5.05 against 2.48 / 4.56 (OpenBLAS's kernels win from 32
    # channels). The resnet preset's step: 16 86.6 ms, 0 (OpenBLAS throughout) 88.7; 32 82.8
    # against 16 83.3 (with 512 KiB chunks: equal).
    winograd_own_products = 16

    def _own_products(self, U):
        return max(U.shape[1], U.shape[2]) <= self.winograd_own_products

    def _wino_parallel(self, size):
        return self.parallel and size >= self.par_cheap

    def winograd_forward_chunks(self, X, U, vflat, mflat, Z, chunks, padding, b=None,
                                activation="identity"):
        """Conv2d's Winograd forward over ``chunks`` [(start, stop)] of X in one call (one half of
        its chunks; the same steps and bits as winograd_input, the 16 GEMMs and winograd_output a
        chunk): each chunk's V and M in the flat scratch buffers ``vflat``, ``mflat`` as the layer
        lays them out (the last chunk's stay there)."""
        dt = checks.float_arrays(("X", "U", "Z"), X, U, Z)
        X = np.ascontiguousarray(X)
        ph, pw, TH, TW, bounds = _chunks_args(X, U, vflat, mflat, chunks, padding, dt)
        b = _bias_arg(b, U.shape[1], dt)
        relu = output_activation(activation) == "relu"
        _forward_half(X, U, vflat, mflat, Z, bounds, ph, pw, TH, TW, b, relu, self._own_products(U))
        return Z

    def winograd_backward_chunks(self, X, dZ, U, vflat, mflat, dU, dUc, dX, chunks, padding,
                                 db=None):
        """Conv2d's Winograd backprop over ``chunks`` of one half in one call (the steps and bits
        of winograd_input, winograd_output_backward, the BP3 and dV GEMMs and
        winograd_input_backward a chunk, the last chunk first, its V still in ``vflat``): dU (16,
        C_out, C_in) = Σ over the chunks of dM · Vᵀ (dUc: scratch), BP4's float64 sums added into
        ``db`` (C_out,) where given, dX of the chunks' samples unless dX is None."""
        dt = checks.float_arrays(("X", "dZ", "U", "dU", "dUc"), X, dZ, U, dU, dUc)
        X, dZ = np.ascontiguousarray(X), np.ascontiguousarray(dZ)
        ph, pw, TH, TW, bounds = _chunks_args(X, U, vflat, mflat, chunks, padding, dt)
        Co = U.shape[1]
        for name, a in (("dU", dU), ("dUc", dUc)):
            expect_shape(name, a, (16, Co, X.shape[1]))
        if db is None:
            db = _NO_SUMS
        else:
            _check_db(db, Co, dt)
        input_grad = dX is not None
        if input_grad:
            checks.float_arrays(("dX",), dX)
            expect_shape("dX", dX, X.shape)
        _backward_half(X, dZ, U, vflat, mflat, dU, dUc, dX if input_grad else X, bounds, ph, pw,
                       TH, TW, db, input_grad, self._own_products(U))
        return dU

    def winograd_filter(self, W, U):
        """U (16, Co, C) = G g Gᵀ for each 3×3 filter g = W[o, c]."""
        checks.float_arrays(NAMES_FILTER, W, U)
        check_filter(W, U)
        _filter(W, U)
        return U

    def winograd_filter_backward(self, dU, dW, accumulate=False):
        """dW (Co, C, 3, 3) (+)= Gᵀ dU G: BP3 through the filter transform."""
        checks.float_arrays(NAMES_FILTER_BACKWARD, dU, dW)
        check_filter(dW, dU)
        _filter_backward(dU, dW, bool(accumulate))
        return dW

    def winograd_input(self, X, V, padding):
        """V (16, C, N·TH·TW) = Bᵀ d B for every 4×4 input patch d (stride 2, zeros outside X)."""
        _check_tiles("V", V, checks.float_arrays(("X",), X))
        ph, pw, TH, TW = check_input(X, V, padding)
        if V.size:
            kernel = _input_parallel if self._wino_parallel(V.size) else _input_serial
            kernel(X, V, ph, pw, TH, TW)
        return V

    def winograd_input_backward(self, dV, dX, padding):
        """dX (N, C, H, W) = Σ over tiles of B dV_tile Bᵀ added into the patch the tile read."""
        _check_tiles("dV", dV, checks.float_arrays(("dX",), dX))
        ph, pw, TH, TW = check_input(dX, dV, padding)
        if dV.size:
            kernel = _input_backward_parallel if self._wino_parallel(dV.size) else \
                _input_backward_serial
            kernel(dV, dX, ph, pw, TH, TW)
        return dX

    def winograd_output(self, M, Z, b=None, activation="identity"):
        """Z (N, Co, OH, OW) = Aᵀ M_tile A for every tile, the ragged last row/column cropped;
        plus b[o] (C_out,) where given, then the activation ("identity" or "relu"), in the same
        pass (Conv2d's bias and activation where they fuse here)."""
        dt = checks.float_arrays(("Z",), Z)
        _check_tiles("M", M, dt)
        TH, TW = check_output(M, Z)
        b = _bias_arg(b, Z.shape[1], dt)
        relu = output_activation(activation) == "relu"
        if Z.size:
            kernel = _output_parallel if self._wino_parallel(M.size) else _output_serial
            kernel(M, Z, TH, TW, b, relu)
        return Z

    def winograd_output_backward(self, dZ, dM, db=None, accumulate=False):
        """dM (16, Co, N·TH·TW) = A dZ_tile Aᵀ (the adjoint of ``winograd_output``); and where
        ``db`` (C_out,) is given, BP4 in the same pass: db (+)= Σ over samples and positions of dZ,
        summed in float64 (each plane, then the samples in order: a fixed order), rounded once to
        db's dtype (dZ's, or float64: Conv2d adds its chunks' sums in a float64 db)."""
        dt = checks.float_arrays(("dZ",), dZ)
        _check_tiles("dM", dM, dt)
        TH, TW = check_output(dM, dZ)
        N, Co = dZ.shape[:2]
        if db is None:
            db = _NO_SUMS
        else:
            _check_db(db, Co, dt)
        if dZ.size:
            kernel = _output_backward_parallel if self._wino_parallel(dM.size) else \
                _output_backward_serial
            kernel(dZ, dM, TH, TW, db, bool(accumulate))
        elif db.size and not accumulate:
            db[...] = 0
        return dM
