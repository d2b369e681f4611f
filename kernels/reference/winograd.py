"""Reference Winograd F(2×2, 3×3) ops for 3×3 convolutions of stride 1 (Lavin & Gray, 2016).

A stride-1 3×3 convolution with padding (ph, pw) of X (N, C, H, W) gives Z (N, Co, OH, OW),
OH = H + 2·ph − 2. Its output is cut into 2×2 tiles (TH = ⌈OH/2⌉ by TW = ⌈OW/2⌉ of them a sample,
the last ones ragged where OH or OW is odd); tile (th, tw) reads the 4×4 patch d of the padded
input at rows 2·th − ph …, columns 2·tw − pw … (zeros outside the input), and

    Z_tile = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A

with the matrices below. Laid out for BLAS, with P = N·TH·TW tiles (sample-major, then tiles in
row-major order) and the 16 entries k = 4ξ + ν of a transformed 4×4 tile as the leading axis:

    U (16, Co, C)  = G g Gᵀ              ``winograd_filter``
    V (16, C, P)   = Bᵀ d B              ``winograd_input``
    M (16, Co, P)  = U · V               16 GEMMs (C_out × C)·(C × P): 2.25x fewer multiplications
    Z              = Aᵀ M A, cropped     ``winograd_output``

The backward pass is the adjoint of the same linear maps (exact in exact arithmetic, so the
direct convolution's gradients): dM = A dZ_tile Aᵀ (``winograd_output_backward``, a ragged tile's
missing outputs as zeros), BP3 dU = dM · Vᵀ and dg = Gᵀ dU G (``winograd_filter_backward``), the
input gradient dV = Uᵀ · dM and dX = Σ_tiles B dV_tile Bᵀ added back into the patch each tile read
(``winograd_input_backward``, neighbouring patches overlap by 2). These are the plain definitions;
the fused CPU set (kernels/cpu/winograd.py) does each transform as one pass.
"""

import numpy as np

from gpubackprop.kernels.reference.conv import expect_shape

# Bᵀ, G, Aᵀ of F(2×2, 3×3) with the interpolation points 0, 1, −1 (entries 0, ±1, ±½: every
# transform is a few exact additions and halvings; the error is that of the 9·C-term sums they
# stand for within a small factor, see tests/test_kernels_winograd.py).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# Conv2d lays V and M out with their 16 rows (each C-contiguous) TILE_PAD elements further apart than
# C·P, so that they are not a multiple of 4 KiB apart (see kernels/cpu/winograd.py); every set's
# ops take such arrays.
TILE_PAD = 16


def tiles(H, W, padding):
    """(OH, OW, TH, TW) of a stride-1 3×3 convolution with ``padding`` (ph, pw) on H×W."""
    ph, pw = padding
    OH, OW = H + 2 * ph - 2, W + 2 * pw - 2
    if OH < 1 or OW < 1:
        raise ValueError(f"X: a 3x3 kernel with padding {tuple(padding)} needs an input of at least "
                         f"{3 - 2 * ph}x{3 - 2 * pw}, got {H}x{W}")
    return OH, OW, -(-OH // 2), -(-OW // 2)


def padding_pair(padding):
    """``padding`` as a pair of non-negative Python ints, or a TypeError/ValueError naming it."""
    p = (padding, padding) if isinstance(padding, (int, np.integer)) else padding
    try:
        ph, pw = p
    except (TypeError, ValueError):
        raise TypeError(f"padding: expected an int or a pair of ints (h, w), got {padding!r}") from None
    for v in (ph, pw):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"padding: expected non-negative ints, got {padding!r}")
    return int(ph), int(pw)


def _four_d(name, a):
    if a.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D array (N, C, H, W), got shape {tuple(a.shape)}")


def check_filter(W, U):
    if W.ndim != 4 or W.shape[2:] != (3, 3):
        raise ValueError(f"W: expected a (C_out, C_in, 3, 3) array, got shape {tuple(W.shape)}")
    expect_shape("U", U, (16, W.shape[0], W.shape[1]), " (16, C_out, C_in of W)")


def check_input(X, V, padding):
    """(ph, pw, TH, TW) for X (N, C, H, W) and V (16, C, N·TH·TW), or ValueError."""
    _four_d("X", X)
    ph, pw = padding_pair(padding)
    N, C, H, W = X.shape
    _, _, TH, TW = tiles(H, W, (ph, pw))
    if V.shape != (16, C, N * TH * TW):  # (the message only then: Conv2d calls this per chunk)
        expect_shape("V", V, (16, C, N * TH * TW), f" (16, C, N·TH·TW for X {tuple(X.shape)}, "
                     f"padding {(ph, pw)})")
    return ph, pw, TH, TW


# The activations the output transform applies itself (Conv2d fuses them there).
OUTPUT_ACTIVATIONS = ("identity", "relu")


def output_activation(activation):
    """``activation`` if the output transform applies it, else a ValueError naming it."""
    if not isinstance(activation, str) or activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"activation: the Winograd output transform applies 'identity' or 'relu', "
                         f"got {activation!r}")
    return activation


def check_output(M, Z):
    """(TH, TW) for M (16, Co, N·TH·TW) and Z (N, Co, OH, OW), or ValueError."""
    _four_d("Z", Z)
    N, Co, OH, OW = Z.shape
    TH, TW = -(-OH // 2), -(-OW // 2)
    if M.shape != (16, Co, N * TH * TW):
        expect_shape("M", M, (16, Co, N * TH * TW), f" (16, C_out, N·TH·TW for Z {tuple(Z.shape)})")
    return TH, TW


class WinogradOps:
    """Plain-xp Winograd F(2×2, 3×3) transforms (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    # Whether Conv2d takes the Winograd path by default for the layers where it was measured faster
    # (layers/conv.py); the reference set keeps the direct convolution (im2col + GEMM), the plain
    # definition, but offers the ops (its tests define the fused ones; Conv2d.winograd = True forces
    # them on any set).
    winograd_conv = False
    winograd_cache_bytes = None  # Conv2d's Winograd chunks: as large as its budget allows
    winograd_gemm_serial = None  # and whatever their GEMMs' size

    def _m(self, mat, dtype):
        return self.xp.asarray(mat, dtype=dtype)

    def winograd_filter(self, W, U):
        """U (16, Co, C) = G g Gᵀ for each 3×3 filter g = W[o, c]."""
        check_filter(W, U)
        g = self._m(G, W.dtype)
        Co, C = W.shape[:2]
        U[...] = self.xp.einsum("xi,ocij,yj->xyoc", g, W, g).reshape(16, Co, C)
        return U

    def winograd_filter_backward(self, dU, dW, accumulate=False):
        """dW (Co, C, 3, 3) (+)= Gᵀ dU G: BP3 through the filter transform."""
        check_filter(dW, dU)
        g = self._m(G, dW.dtype)
        Co, C = dW.shape[:2]
        d = self.xp.einsum("xi,xyoc,yj->ocij", g, dU.reshape(4, 4, Co, C), g)
        if accumulate:
            dW += d
        else:
            dW[...] = d
        return dW

    def winograd_input(self, X, V, padding):
        """V (16, C, N·TH·TW) = Bᵀ d B for every 4×4 input patch d (stride 2, zeros outside X)."""
        ph, pw, TH, TW = check_input(X, V, padding)
        xp = self.xp
        N, C, H, W = X.shape
        # The padded input, also past the bottom/right edge so that a ragged last tile reads zeros.
        Xp = xp.zeros((N, C, 2 * TH + 2, 2 * TW + 2), X.dtype)
        h, w = min(H, 2 * TH + 2 - ph), min(W, 2 * TW + 2 - pw)
        Xp[:, :, ph:ph + h, pw:pw + w] = X[:, :, :h, :w]
        D = xp.stack([xp.stack([Xp[:, :, i:i + 2 * TH:2, j:j + 2 * TW:2] for j in range(4)])
                      for i in range(4)])  # (4, 4, N, C, TH, TW): d[i, j] of every tile
        b = self._m(BT, X.dtype)
        V[...] = xp.einsum("xi,ijncst,yj->xycnst", b, D, b).reshape(16, C, -1)
        return V

    def winograd_input_backward(self, dV, dX, padding):
        """dX (N, C, H, W) = Σ over tiles of B dV_tile Bᵀ added into the patch the tile read."""
        ph, pw, TH, TW = check_input(dX, dV, padding)
        xp = self.xp
        N, C, H, W = dX.shape
        b = self._m(BT, dX.dtype)
        dVt = dV.reshape(4, 4, C, N, TH, TW)
        dD = xp.einsum("xi,xycnst,yj->ijncst", b, dVt, b)
        dXp = xp.zeros((N, C, 2 * TH + 2, 2 * TW + 2), dX.dtype)
        for i in range(4):
            for j in range(4):
                dXp[:, :, i:i + 2 * TH:2, j:j + 2 * TW:2] += dD[i, j]
        h, w = min(H, 2 * TH + 2 - ph), min(W, 2 * TW + 2 - pw)
        dX[...] = 0
        dX[:, :, :h, :w] = dXp[:, :, ph:ph + h, pw:pw + w]
        return dX

    def winograd_output(self, M, Z, b=None, activation="identity"):
        """Z (N, Co, OH, OW) = Aᵀ M_tile A for every tile, the ragged last row/column cropped;
        then Z += b[o] where ``b`` (C_out,) is given and Z = σ(Z) in place for ``activation``
        "identity" or "relu" (Conv2d's bias and activation, as ``channel_bias_act`` applies them)."""
        TH, TW = check_output(M, Z)
        activation = output_activation(activation)
        xp = self.xp
        N, Co, OH, OW = Z.shape
        if b is not None:
            expect_shape("b", b, (Co,), " (the channels of Z)")
        a = self._m(AT, Z.dtype)
        Mt = M.reshape(4, 4, Co, N, TH, TW)
        Y = xp.einsum("ax,xyonst,by->nosatb", a, Mt, a).reshape(N, Co, 2 * TH, 2 * TW)
        Z[...] = Y[:, :, :OH, :OW]
        if b is not None:
            Z += b.reshape(1, Co, 1, 1)
        if activation == "relu":
            xp.maximum(Z, 0, out=Z)
        return Z

    def winograd_output_backward(self, dZ, dM, db=None, accumulate=False):
        """dM (16, Co, N·TH·TW) = A dZ_tile Aᵀ (the adjoint of ``winograd_output``); where ``db``
        (C_out,) is given, also db (+)= Σ over samples and positions of dZ (BP4 of the bias, as
        ``channel_bias_grad``; db may be float64 for any dZ: the sum is then taken in float64)."""
        TH, TW = check_output(dM, dZ)
        xp = self.xp
        N, Co, OH, OW = dZ.shape
        dY = xp.zeros((N, Co, 2 * TH, 2 * TW), dZ.dtype)
        dY[:, :, :OH, :OW] = dZ
        a = self._m(AT, dZ.dtype)
        d = xp.einsum("ax,nosatb,by->xyonst", a, dY.reshape(N, Co, TH, 2, TW, 2), a)
        dM[...] = d.reshape(16, Co, -1)
        if db is not None:
            expect_shape("db", db, (Co,), " (the channels of dZ)")
            total = dZ.sum(axis=(0, 2, 3), dtype=db.dtype)
            if accumulate:
                db += total
            else:
                db[...] = total
        return dM
