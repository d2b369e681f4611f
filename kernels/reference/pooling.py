"""Reference pooling ops: max and average pooling over (kh, kw) windows, forward and backward.

PyTorch's semantics (floor output size, padding at most half the kernel): max pooling ignores
padding, takes the first maximum of a window in row-major order, lets a NaN win (the last NaN of
the window, as PyTorch's kernels compare ``v > best or isnan(v)``), and returns ``argmax``, the
index h·W + w of the chosen pixel in its input plane (PyTorch's indices). Average pooling divides
by kh·kw (``count_include_pad=True``) or by the number of input pixels in the window.

Every op is a loop over the kh·kw kernel offsets of vectorised slices of the padded input, so that
each backward sum is added in row-major offset order, the order of the fused gathers.
"""

import numpy as np

from gpubackprop.kernels.reference.conv import expect_int64, expect_shape, offset_slices, window


def _positions(win, i, j):
    """For kernel offset (i, j): the input rows (OH,) and columns (OW,) every output reads (host)."""
    (sh, sw), (ph, pw), (dh, dw), (OH, OW) = win.stride, win.padding, win.dilation, win.out
    return np.arange(OH) * sh - ph + i * dh, np.arange(OW) * sw - pw + j * dw


def _valid(hs, ws, H, W):
    """The (OH, OW) mask of output positions whose pixel lies inside the input, not in padding."""
    return ((hs >= 0) & (hs < H))[:, None] & ((ws >= 0) & (ws < W))[None, :]


def _count(win, H, W, count_include_pad, dtype):
    """Average pooling's divisor: kh·kw, or per output the number of its window's input pixels."""
    kh, kw = win.kernel
    if count_include_pad:
        return np.dtype(dtype).type(kh * kw)
    rows = sum(((h >= 0) & (h < H)).astype(np.int64) for h in
               (_positions(win, i, 0)[0] for i in range(kh)))
    cols = sum(((w >= 0) & (w < W)).astype(np.int64) for w in
               (_positions(win, 0, j)[1] for j in range(kw)))
    return (rows[:, None] * cols[None, :]).astype(dtype)


class PoolingOps:
    """Plain-xp pooling ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    def max_pool2d(self, X, Y, argmax, kernel, stride, padding, dilation):
        """Y (N, C, OH, OW) = the max of each window of X; argmax (int64) = its index h·W + w."""
        win = window(X, kernel, stride, padding, dilation, pool=True)
        N, C, H, W = X.shape
        out = (N, C) + win.out
        expect_shape("Y", Y, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        xp = self.xp
        (kh, kw), (ph, pw) = win.kernel, win.padding
        Xp = xp.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else X
        best = xp.full(out, -np.inf, X.dtype)
        idx = xp.full(out, -1, np.int64)
        for i in range(kh):
            for j in range(kw):
                hs, ws = _positions(win, i, j)
                valid = xp.asarray(_valid(hs, ws, H, W))
                index = xp.asarray(hs[:, None] * W + ws[None, :])
                v = Xp[(slice(None), slice(None)) + offset_slices(win, i, j)]
                # The first pixel of the window, then any strictly larger one or a NaN.
                take = valid & ((idx < 0) | (v > best) | xp.isnan(v))
                best = xp.where(take, v, best)
                idx = xp.where(take, index, idx)
        Y[...] = best
        argmax[...] = idx
        return Y, argmax

    def max_pool2d_backward(self, dY, argmax, dX, kernel, stride, padding, dilation):
        """dX (N, C, H, W) = Σ of dY over the outputs whose argmax is the pixel (written)."""
        win = window(dX, kernel, stride, padding, dilation, pool=True, name="dX")
        N, C, H, W = dX.shape
        out = (N, C) + win.out
        expect_shape("dY", dY, out)
        expect_shape("argmax", argmax, out)
        expect_int64("argmax", argmax)
        xp = self.xp
        (kh, kw), (ph, pw) = win.kernel, win.padding
        dXp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dX.dtype)
        for i in range(kh):
            for j in range(kw):
                hs, ws = _positions(win, i, j)
                valid = xp.asarray(_valid(hs, ws, H, W))
                index = xp.asarray(hs[:, None] * W + ws[None, :])
                # valid: a padding position's h·W + w can equal a real pixel's index.
                hit = valid & (argmax == index)
                dXp[(slice(None), slice(None)) + offset_slices(win, i, j)] += xp.where(hit, dY, 0)
        dX[...] = dXp[:, :, ph:ph + H, pw:pw + W]
        return dX

    def avg_pool2d(self, X, Y, kernel, stride, padding, count_include_pad=True):
        """Y (N, C, OH, OW) = the mean of each window of X (padding counts as 0)."""
        win = window(X, kernel, stride, padding, pool=True)
        N, C, H, W = X.shape
        expect_shape("Y", Y, (N, C) + win.out)
        xp = self.xp
        (kh, kw), (ph, pw) = win.kernel, win.padding
        Xp = xp.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else X
        s = xp.zeros(Y.shape, X.dtype)
        for i in range(kh):
            for j in range(kw):
                s += Xp[(slice(None), slice(None)) + offset_slices(win, i, j)]
        count = _count(win, H, W, count_include_pad, X.dtype)
        Y[...] = s / (count if np.ndim(count) == 0 else xp.asarray(count))
        return Y

    def avg_pool2d_backward(self, dY, dX, kernel, stride, padding, count_include_pad=True):
        """dX (N, C, H, W) = Σ of dY / count over the windows that hold each pixel (written)."""
        win = window(dX, kernel, stride, padding, pool=True, name="dX")
        N, C, H, W = dX.shape
        expect_shape("dY", dY, (N, C) + win.out)
        xp = self.xp
        (kh, kw), (ph, pw) = win.kernel, win.padding
        count = _count(win, H, W, count_include_pad, dX.dtype)
        g = dY / (count if np.ndim(count) == 0 else xp.asarray(count))
        dXp = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dX.dtype)
        for i in range(kh):
            for j in range(kw):
                dXp[(slice(None), slice(None)) + offset_slices(win, i, j)] += g
        dX[...] = dXp[:, :, ph:ph + H, pw:pw + W]
        return dX
