"""Reference convolution ops: im2col / col2im and the per-channel bias + activation and bias gradient.

A 2-D convolution is one GEMM per sample on the unfolded input: im2col copies every (kh, kw) window
of X (N, C, H, W) into a column of ``cols`` (N, C·kh·kw, OH·OW), row ``c·kh·kw + i·kw + j`` (the
flattening of PyTorch's weight (Co, C, kh, kw)), so that Z = W_flat · cols. Its adjoint col2im sums
the gradient of every column entry back into the pixel it was read from: dX for the backward pass.

This module also holds the window geometry shared by the conv and pooling families of every kernel
set: ``window`` normalises kernel/stride/padding/dilation to (h, w) int pairs and gives the output
size, with PyTorch's floor rule OH = (H + 2·ph − dh·(kh − 1) − 1) // sh + 1.
"""

import contextlib
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from gpubackprop.kernels.reference.dense import DenseOps


# ---- window geometry and argument checks (shared by every kernel set) ----------------------------
class Window(NamedTuple):
    """A sliding window over (H, W): each field an (h, w) pair of ints; ``out`` is (OH, OW)."""

    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    out: tuple


def pair(name, value, minimum):
    """``value`` (an int or a pair of ints) as an (h, w) pair of Python ints, each >= ``minimum``."""
    v = (value, value) if isinstance(value, (int, np.integer)) else value
    try:
        h, w = v
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {value!r}") from None
    for x in (h, w):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {value!r}")
    if h < minimum or w < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return int(h), int(w)


@lru_cache(maxsize=512)
def _window(H, W, kernel, stride, padding, dilation, pool):
    k = pair("kernel", kernel, 1)
    s = pair("stride", stride, 1)
    p = pair("padding", padding, 0)
    d = pair("dilation", dilation, 1)
    if pool and (p[0] > k[0] // 2 or p[1] > k[1] // 2):
        # PyTorch's rule: it keeps every window overlapping the input.
        raise ValueError(f"padding: expected at most half the kernel size {k} in each dimension "
                         f"(as PyTorch's pooling), got {p}")
    oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel: a {k} window with dilation {d}, padding {p} and stride {s} gives an "
                         f"output of size ({oh}, {ow}) on an input of size ({H}, {W}); expected an "
                         f"output of at least 1x1")
    return Window(k, s, p, d, (oh, ow))


def _hashable(v):
    return tuple(v) if isinstance(v, (list, np.ndarray)) else v


def window(X, kernel, stride, padding, dilation=1, pool=False, name="X"):
    """The ``Window`` of kernel/stride/padding/dilation over the array ``X`` (N, C, H, W).

    ``pool``: also require padding <= kernel // 2, as PyTorch's pooling does. Raises a
    ValueError/TypeError naming the bad argument.
    """
    if getattr(X, "ndim", None) != 4:
        got = f"shape {tuple(X.shape)}" if hasattr(X, "shape") else type(X).__name__
        raise ValueError(f"{name}: expected a 4-D array (N, C, H, W), got {got}")
    return _window(int(X.shape[2]), int(X.shape[3]), _hashable(kernel), _hashable(stride),
                   _hashable(padding), _hashable(dilation), bool(pool))


def expect_shape(name, a, shape, what=""):
    """ValueError naming ``name`` unless array ``a`` has ``shape``; ``what`` says where it comes from."""
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}{what}, got shape {tuple(a.shape)}")


def expect_int64(name, a):
    """TypeError/ValueError unless ``a`` is a C-contiguous int64 array (max pooling's argmax)."""
    if not hasattr(a, "dtype") or a.dtype != np.int64:
        got = f"dtype {a.dtype}" if hasattr(a, "dtype") else type(a).__name__
        raise TypeError(f"{name}: expected an int64 array, got {got}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {tuple(a.strides)}")


def cols_shape(X_shape, win, batch_inner=False):
    """The shape of im2col's ``cols`` for an input of shape (N, C, H, W): (N, C·kh·kw, OH·OW), or
    with ``batch_inner`` (C·kh·kw, N, OH·OW)."""
    N, C = X_shape[0], X_shape[1]
    K, L = C * win.kernel[0] * win.kernel[1], win.out[0] * win.out[1]
    return (K, N, L) if batch_inner else (N, K, L)


def offset_slices(win, i, j):
    """The slices of the padded input that kernel offset (i, j) reads for every output position."""
    (sh, sw), (dh, dw), (OH, OW) = win.stride, win.dilation, win.out
    return (slice(i * dh, i * dh + sh * (OH - 1) + 1, sh), slice(j * dw, j * dw + sw * (OW - 1) + 1, sw))


def check_channel_bias_act(Z, b, A):
    if Z.ndim != 3:
        raise ValueError(f"Z: expected a 3-D array (N, C, L), got shape {tuple(Z.shape)}")
    expect_shape("b", b, (Z.shape[1],), " (the channels of Z)")
    expect_shape("A", A, tuple(Z.shape), " (the shape of Z)")


def check_channel_bias_grad(dZ, db):
    if dZ.ndim != 3:
        raise ValueError(f"dZ: expected a 3-D array (N, C, L), got shape {tuple(dZ.shape)}")
    expect_shape("db", db, (dZ.shape[1],), " (the channels of dZ)")


class ConvOps:
    """Plain-xp convolution ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    # The columns' size up to which Conv2d's chunks shrink once a batch's columns exceed its budget
    # (layers/conv.py); None: chunks as large as the budget allows.
    cols_cache_bytes = None
    # Whether Conv2d may ask im2col/col2im for batch-inner columns (one GEMM a chunk; the layer
    # decides per layer, layers/conv.py). The reference set gives them (its tests define the
    # fused ones) but keeps the layer on one GEMM a sample, the plain definition.
    batch_inner_gemm = False

    def conv_gemm_threads(self):
        """The context Conv2d runs its im2col GEMMs in: here BLAS's threads as they are."""
        return contextlib.nullcontext()

    def im2col(self, X, cols, kernel, stride, padding, dilation, batch_inner=False):
        """cols (N, C·kh·kw, OH·OW) = every window of X (N, C, H, W); zeros where it lies in padding.

        ``batch_inner``: cols is (C·kh·kw, N, OH·OW) instead, the samples inside each row, so that
        the columns of N samples are one (C·kh·kw, N·OH·OW) matrix: one GEMM for the whole chunk.
        """
        win = window(X, kernel, stride, padding, dilation)
        expect_shape("cols", cols, cols_shape(X.shape, win, batch_inner))
        if not cols.flags.c_contiguous:  # the reshape below must be a view, not a copy
            raise ValueError(f"cols: expected a C-contiguous array, got strides {tuple(cols.strides)}")
        xp = self.xp
        N, C = X.shape[:2]
        (kh, kw), (ph, pw), (OH, OW) = win.kernel, win.padding, win.out
        Xp = xp.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else X
        if batch_inner:  # a view of cols (C, kh, kw, N, OH, OW) as (N, C, kh, kw, OH, OW)
            c6 = cols.reshape(C, kh, kw, N, OH, OW).transpose(3, 0, 1, 2, 4, 5)
        else:
            c6 = cols.reshape(N, C, kh, kw, OH, OW)  # a view: cols is C-contiguous
        for i in range(kh):
            for j in range(kw):
                hs, ws = offset_slices(win, i, j)
                c6[:, :, i, j] = Xp[:, :, hs, ws]
        return cols

    def col2im(self, dcols, dX, kernel, stride, padding, dilation, batch_inner=False):
        """dX (N, C, H, W) = Σ of the dcols entries that read each pixel (the adjoint of im2col).

        Kernel offsets are added in row-major (i, j) order, the order of the fused gathers.
        ``batch_inner``: dcols is (C·kh·kw, N, OH·OW), as im2col's.
        """
        win = window(dX, kernel, stride, padding, dilation, name="dX")
        expect_shape("dcols", dcols, cols_shape(dX.shape, win, batch_inner))
        xp = self.xp
        N, C, H, W = dX.shape
        (kh, kw), (ph, pw), (OH, OW) = win.kernel, win.padding, win.out
        dXp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dX.dtype)
        if batch_inner:
            c6 = dcols.reshape(C, kh, kw, N, OH, OW).transpose(3, 0, 1, 2, 4, 5)
        else:
            c6 = dcols.reshape(N, C, kh, kw, OH, OW)
        for i in range(kh):
            for j in range(kw):
                hs, ws = offset_slices(win, i, j)
                dXp[:, :, hs, ws] += c6[:, :, i, j]
        dX[...] = dXp[:, :, ph:ph + H, pw:pw + W]
        return dX

    def channel_bias_act(self, Z, b, activation, A):
        """Z (N, C, L) += b[c] (in place), then A = σ(Z). A may be Z unless the activation is a gelu."""
        check_channel_bias_act(Z, b, A)
        # The dense reference's activation code, with b as a (C, 1) column that broadcasts over L.
        return DenseOps.bias_act(self, Z, b.reshape(-1, 1), activation, A)

    def channel_bias_grad(self, dZ, db, accumulate=False):
        """db (C,) (+)= Σ over n and l of dZ (N, C, L): BP4 of a convolution."""
        check_channel_bias_grad(dZ, db)
        if accumulate:
            db += dZ.sum(axis=(0, 2))
        else:
            dZ.sum(axis=(0, 2), out=db)
        return db
