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
(float32, one thread, a sample of the VGG-style 32->32 layer on 32x32; rows contiguous ->
padded): input 87 -> 73 µs, input gradient 74 -> 75, output 35 -> 32, output gradient 69 -> 39,
against 58 for the 16 GEMMs and 12 for filling V: the transforms are compute-bound on their short
rows (16 tiles), not at memory speed.
"""

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.reference.winograd import check_filter, check_input, check_output

NAMES_FILTER = ("W", "U")
NAMES_FILTER_BACKWARD = ("dU", "dW")


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
def _input_plane(X, V, q, ph, pw, TH, TW):
    """The tiles of plane q = n·C + c of X into V[:, c, n·T : (n + 1)·T]: per tile row, the four
    padded input rows (zeros outside X) combined down the columns (Bᵀ ·), then across each tile."""
    N, C, H, W = X.shape
    n, c = q // C, q % C
    Wq = 2 * TW + 2
    zero = X.dtype.type(0)
    rows = np.zeros((4, Wq), X.dtype)
    e = np.empty((4, Wq), X.dtype)
    lo = max(0, pw)  # padded columns [lo, hi) hold X's columns [lo − pw, hi − pw)
    hi = min(Wq, W + pw)
    base = n * TH * TW
    for s in range(TH):
        for i in range(4):
            h = 2 * s - ph + i
            if 0 <= h < H:
                for w in range(lo, hi):
                    rows[i, w] = X[n, c, h, w - pw]
            else:
                for w in range(lo, hi):
                    rows[i, w] = zero
        for w in range(Wq):
            d0, d1, d2, d3 = rows[0, w], rows[1, w], rows[2, w], rows[3, w]
            e[0, w] = d0 - d2
            e[1, w] = d1 + d2
            e[2, w] = d2 - d1
            e[3, w] = d1 - d3
        p0 = base + s * TW
        for x in range(4):
            k = 4 * x
            for t in range(TW):
                a0, a1, a2, a3 = e[x, 2 * t], e[x, 2 * t + 1], e[x, 2 * t + 2], e[x, 2 * t + 3]
                V[k, c, p0 + t] = a0 - a2
                V[k + 1, c, p0 + t] = a1 + a2
                V[k + 2, c, p0 + t] = a2 - a1
                V[k + 3, c, p0 + t] = a1 - a3


@njit(cache=True, error_model="numpy", nogil=True)
def _input_serial(X, V, ph, pw, TH, TW):
    for q in range(X.shape[0] * X.shape[1]):
        _input_plane(X, V, q, ph, pw, TH, TW)


@njit(cache=True, error_model="numpy", parallel=True)
def _input_parallel(X, V, ph, pw, TH, TW):
    for q in prange(X.shape[0] * X.shape[1]):
        _input_plane(X, V, q, ph, pw, TH, TW)


# ---- dX = Σ_tiles B dV Bᵀ, as a gather, plane by plane -----------------------------------------------
@njit(cache=True, error_model="numpy")
def _input_backward_plane(dV, dX, q, ph, pw, TH, TW):
    """Plane q of dX from the tiles of V's plane. Across a tile row, B's columns spread tile m's
    four entries over padded columns 2m … 2m + 3, so column 2m takes v0(m) and (v1 + v2 − v0)(m − 1),
    column 2m + 1 takes (v1 − v2 + v3)(m) and −v3(m − 1); down the columns the same with the tile
    rows s and s − 1 (``e`` and ``ep``). Every padded pixel is formed once, then cropped."""
    N, C, H, W = dX.shape
    n, c = q // C, q % C
    Wq = 2 * TW + 2
    e = np.zeros((4, Wq), dX.dtype)
    ep = np.zeros((4, Wq), dX.dtype)
    base = n * TH * TW
    for s in range(TH + 1):
        if s < TH:
            p0 = base + s * TW
            for x in range(4):
                k = 4 * x
                e[x, 0] = dV[k, c, p0]
                e[x, 1] = dV[k + 1, c, p0] - dV[k + 2, c, p0] + dV[k + 3, c, p0]
                for m in range(1, TW):
                    e[x, 2 * m] = dV[k, c, p0 + m] + (
                        dV[k + 1, c, p0 + m - 1] + dV[k + 2, c, p0 + m - 1] - dV[k, c, p0 + m - 1])
                    e[x, 2 * m + 1] = (dV[k + 1, c, p0 + m] - dV[k + 2, c, p0 + m]
                                       + dV[k + 3, c, p0 + m]) - dV[k + 3, c, p0 + m - 1]
                e[x, 2 * TW] = (dV[k + 1, c, p0 + TW - 1] + dV[k + 2, c, p0 + TW - 1]
                                - dV[k, c, p0 + TW - 1])
                e[x, 2 * TW + 1] = -dV[k + 3, c, p0 + TW - 1]
        else:
            e[...] = 0
        for r in range(2):
            h = 2 * s + r - ph
            if 0 <= h < H:
                w0 = pw
                if r == 0:
                    for w in range(W):
                        dX[n, c, h, w] = e[0, w + w0] + (ep[1, w + w0] + ep[2, w + w0] - ep[0, w + w0])
                else:
                    for w in range(W):
                        dX[n, c, h, w] = (e[1, w + w0] - e[2, w + w0] + e[3, w + w0]) - ep[3, w + w0]
        e, ep = ep, e


@njit(cache=True, error_model="numpy", nogil=True)
def _input_backward_serial(dV, dX, ph, pw, TH, TW):
    for q in range(dX.shape[0] * dX.shape[1]):
        _input_backward_plane(dV, dX, q, ph, pw, TH, TW)


@njit(cache=True, error_model="numpy", parallel=True)
def _input_backward_parallel(dV, dX, ph, pw, TH, TW):
    for q in prange(dX.shape[0] * dX.shape[1]):
        _input_backward_plane(dV, dX, q, ph, pw, TH, TW)


# ---- Z = Aᵀ M A and its adjoint dM = A dZ Aᵀ, plane by plane ----------------------------------------
@njit(cache=True, error_model="numpy")
def _output_plane(M, Z, q, TH, TW):
    """Plane q = n·Co + o of Z from its tiles in M: per tile row, · A across each tile's four rows
    (four of M's rows at a time: the 16 rows lie a multiple of 4 KiB apart, and reading all of them
    in one loop thrashed the L1 cache's sets), then Aᵀ · down the columns into Z's two rows (the
    ragged last row and column cropped)."""
    N, Co, OH, OW = Z.shape
    n, o = q // Co, q % Co
    e = np.empty((4, 2 * TW), Z.dtype)
    base = n * TH * TW
    for s in range(TH):
        p0 = base + s * TW
        for x in range(4):
            k = 4 * x
            for t in range(TW):
                m0, m1, m2, m3 = M[k, o, p0 + t], M[k + 1, o, p0 + t], M[k + 2, o, p0 + t], \
                    M[k + 3, o, p0 + t]
                e[x, 2 * t] = m0 + m1 + m2
                e[x, 2 * t + 1] = m1 - m2 - m3
        h = 2 * s
        for w in range(OW):
            Z[n, o, h, w] = e[0, w] + e[1, w] + e[2, w]
        if h + 1 < OH:
            for w in range(OW):
                Z[n, o, h + 1, w] = e[1, w] - e[2, w] - e[3, w]


@njit(cache=True, error_model="numpy", nogil=True)
def _output_serial(M, Z, TH, TW):
    for q in range(Z.shape[0] * Z.shape[1]):
        _output_plane(M, Z, q, TH, TW)


@njit(cache=True, error_model="numpy", parallel=True)
def _output_parallel(M, Z, TH, TW):
    for q in prange(Z.shape[0] * Z.shape[1]):
        _output_plane(M, Z, q, TH, TW)


@njit(cache=True, error_model="numpy")
def _output_backward_plane(dZ, dM, q, TH, TW):
    """The tiles of plane q of dM from dZ's plane (a ragged tile's missing outputs as zeros): the
    rows of A · y down the columns, y0, y0 + y1, y0 − y1, −y1, then each row (a, b) · Aᵀ across a
    tile, (a, a + b, a − b, −b), written four rows of dM at a time (as in ``_output_plane``)."""
    N, Co, OH, OW = dZ.shape
    n, o = q // Co, q % Co
    W2 = 2 * TW
    zero = dZ.dtype.type(0)
    e = np.zeros((4, W2), dZ.dtype)
    base = n * TH * TW
    for s in range(TH):
        h = 2 * s
        odd = h + 1 < OH
        for w in range(OW):
            y0 = dZ[n, o, h, w]
            y1 = dZ[n, o, h + 1, w] if odd else zero
            e[0, w] = y0
            e[1, w] = y0 + y1
            e[2, w] = y0 - y1
            e[3, w] = -y1
        p0 = base + s * TW
        for x in range(4):
            k = 4 * x
            for t in range(TW):
                a, b = e[x, 2 * t], e[x, 2 * t + 1]
                dM[k, o, p0 + t] = a
                dM[k + 1, o, p0 + t] = a + b
                dM[k + 2, o, p0 + t] = a - b
                dM[k + 3, o, p0 + t] = -b


@njit(cache=True, error_model="numpy", nogil=True)
def _output_backward_serial(dZ, dM, TH, TW):
    for q in range(dZ.shape[0] * dZ.shape[1]):
        _output_backward_plane(dZ, dM, q, TH, TW)


@njit(cache=True, error_model="numpy", parallel=True)
def _output_backward_parallel(dZ, dM, TH, TW):
    for q in prange(dZ.shape[0] * dZ.shape[1]):
        _output_backward_plane(dZ, dM, q, TH, TW)


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


class WinogradOps:
    """Fused Winograd F(2×2, 3×3) transforms (a mixin of ``CpuOps``: uses its parallel thresholds)."""

    winograd_conv = True  # Conv2d takes them for the layers where they were measured faster
    # Conv2d's Winograd chunks, always: V and M of a chunk within about half a core's L2 (2 MiB
    # here), so that the transforms and the 16 GEMMs pass over them in the cache. Measured on the
    # VGG-style 32->32 3x3 layer on 32x32, batch 64, forward + backward, one thread, loaded machine:
    # V + M of 0.5 MiB a chunk 38.7 ms, 1 MiB (one sample) 38.1, 2 MiB 57.7, 4 MiB 85.4 (im2col +
    # GEMM: 66.0); 32->32 on 16x16: 23.7, 20.3, 25.3, 33.4 (41.6).
    winograd_cache_bytes = 1 << 20
    # ... and each of a chunk's 16 GEMMs (C_out·P·C_in multiply-adds) no larger than OpenBLAS runs
    # on one thread (it threads a GEMM above 65536·4 of them, interface/gemm.c): Conv2d runs two
    # halves of the chunks on two threads at once, whose GEMMs would otherwise start BLAS's own
    # threads on the same two cores. (The benchmarked layers' chunks are within it already.)
    winograd_gemm_serial = 1 << 18

    def _wino_parallel(self, size):
        return self.parallel and size >= self.par_cheap

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
        kernel = _input_parallel if self._wino_parallel(V.size) else _input_serial
        kernel(X, V, ph, pw, TH, TW)
        return V

    def winograd_input_backward(self, dV, dX, padding):
        """dX (N, C, H, W) = Σ over tiles of B dV_tile Bᵀ added into the patch the tile read."""
        _check_tiles("dV", dV, checks.float_arrays(("dX",), dX))
        ph, pw, TH, TW = check_input(dX, dV, padding)
        kernel = _input_backward_parallel if self._wino_parallel(dV.size) else _input_backward_serial
        kernel(dV, dX, ph, pw, TH, TW)
        return dX

    def winograd_output(self, M, Z):
        """Z (N, Co, OH, OW) = Aᵀ M_tile A for every tile, the ragged last row/column cropped."""
        _check_tiles("M", M, checks.float_arrays(("Z",), Z))
        TH, TW = check_output(M, Z)
        kernel = _output_parallel if self._wino_parallel(M.size) else _output_serial
        kernel(M, Z, TH, TW)
        return Z

    def winograd_output_backward(self, dZ, dM):
        """dM (16, Co, N·TH·TW) = A dZ_tile Aᵀ (the adjoint of ``winograd_output``)."""
        _check_tiles("dM", dM, checks.float_arrays(("dZ",), dZ))
        TH, TW = check_output(dM, dZ)
        kernel = _output_backward_parallel if self._wino_parallel(dM.size) else \
            _output_backward_serial
        kernel(dZ, dM, TH, TW)
        return dM
