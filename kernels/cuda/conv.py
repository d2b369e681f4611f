"""CUDA convolution ops: im2col, col2im (a gather), the per-channel bias + activation, BP4 per channel.

One thread per output element, consecutive threads on consecutive output positions (coalesced
writes). col2im is a gather, a thread a pixel adding the column entries that read it in row-major
kernel-offset order (the reference's order). The channel bias gradient is a block per chunk of a
channel's entries with a fixed-order tree reduction, then the chunks added in order (one chunk, and
one kernel, where a channel has few entries). No atomics: every result is the same from run to run.
"""

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.dense import ACT_CODE, activate
from gpubackprop.kernels.cuda.launch import THREADS, cuda, kernel_body
from gpubackprop.kernels.cuda.numerics import imin, tree_sum, unravel_nchw
from gpubackprop.kernels.reference.conv import (
    check_channel_bias_act,
    check_channel_bias_grad,
    cols_shape,
    expect_shape,
    window,
)

WINDOW = "int64, int64, int64, int64, int64, int64, int64, int64, int64"  # kh kw sh sw ph pw dh dw OW
# BP4 per channel: a block sums a chunk of at least this many entries a thread, at most this many
# chunks a channel (the chunk count depends on N·L only: a fixed summation order).
CHANNEL_CHUNK_PER_THREAD = 32
CHANNEL_MAX_CHUNKS = 64


# ---- im2col: cols[n, (c·kh + i)·kw + j, oh·OW + ow] = X[n, c, oh·sh − ph + i·dh, ow·sw − pw + j·dw] ----
@kernel_body("void({t}[:, :, :, ::1], {t}[:, :, ::1], " + WINDOW + ")")
def _im2col(X, cols, kh, kw, sh, sw, ph, pw, dh, dw, OW):
    N, C, H, W = X.shape
    R, L = cols.shape[1], cols.shape[2]
    zero = X.dtype.type(0)
    for idx in range(cuda.grid(1), N * R * L, cuda.gridsize(1)):
        q = idx // L
        pos = idx - q * L
        n = q // R
        r = q - n * R
        c = r // (kh * kw)
        ij = r - c * (kh * kw)
        i = ij // kw
        j = ij - i * kw
        oh = pos // OW
        ow = pos - oh * OW
        h = oh * sh - ph + i * dh
        w = ow * sw - pw + j * dw
        cols[n, r, pos] = X[n, c, h, w] if h >= 0 and h < H and w >= 0 and w < W else zero


# ---- col2im: dX[n, c, h, w] = Σ over the (i, j) whose window position is integral and in range ------
@kernel_body("void({t}[:, :, ::1], {t}[:, :, :, ::1], " + WINDOW + ")")
def _col2im(dcols, dX, kh, kw, sh, sw, ph, pw, dh, dw, OW):
    N, C, H, W = dX.shape
    OH = dcols.shape[2] // OW
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        n, c, h, w = unravel_nchw(idx, C, H, W)
        s = dX.dtype.type(0)
        for i in range(kh):
            hh = h + ph - i * dh  # = oh·sh for the output row that reads (h, w) at offset i
            if hh < 0:
                break  # hh falls as i grows
            oh = hh // sh
            if oh * sh != hh or oh >= OH:
                continue
            for j in range(kw):
                ww = w + pw - j * dw
                if ww < 0:
                    break
                ow = ww // sw
                if ow * sw == ww and ow < OW:
                    s += dcols[n, (c * kh + i) * kw + j, oh * OW + ow]
        dX[n, c, h, w] = s


# ---- Z[n, c, l] += b[c]; A = σ(Z) (the dense kernel's activation code) -----------------------------
@kernel_body("void({t}[:, :, ::1], {t}[::1], {t}[:, :, ::1], int64)")
def _channel_bias_act(Z, b, A, act):
    N, C, L = Z.shape
    for idx in range(cuda.grid(1), N * C * L, cuda.gridsize(1)):
        q = idx // L
        m = idx - q * L
        n = q // C
        c = q - n * C
        z = Z[n, c, m] + b[c]
        Z[n, c, m] = z
        A[n, c, m] = activate(z, act, Z)


# ---- BP4 per channel: db[c] (+)= Σ_n Σ_l dZ[n, c, l] ------------------------------------------------
@kernel_body("void({t}[:, :, ::1], {t}[:, ::1])")
def _channel_partial(dZ, partial):
    """partial[c, s] = Σ of chunk s of channel c's N·L entries: a block a (channel, chunk), each thread
    summing a fixed stride of the chunk, then a tree reduction in shared memory. The order depends on
    the shapes and the block size only."""
    acc = cuda.shared.array(THREADS, dZ.dtype)
    N, C, L = dZ.shape
    S = partial.shape[1]
    M = N * L
    R = (M + S - 1) // S
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for blk in range(cuda.blockIdx.x, C * S, cuda.gridDim.x):  # the same for every thread of a block
        c = blk // S
        chunk = blk - c * S
        s = dZ.dtype.type(0)
        for k in range(chunk * R + tid, imin(M, (chunk + 1) * R), nt):
            n = k // L
            s += dZ[n, c, k - n * L]
        acc[tid] = s
        tree_sum(acc, tid, nt)
        if tid == 0:
            partial[c, chunk] = acc[0]
        cuda.syncthreads()  # acc[0] is read before the next block's sums overwrite it


@kernel_body("void({t}[:, ::1], {t}[::1], boolean)")
def _channel_finish(partial, db, accumulate):
    """db[c] (+)= Σ_s partial[c, s], the chunks in order: a thread a channel."""
    C, S = partial.shape
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        s = partial[c, 0]
        for k in range(1, S):
            s += partial[c, k]
        db[c] = db[c] + s if accumulate else s


def channel_chunks(M):
    """Chunks a channel's M = N·L entries are summed in, one block each: a fixed number (it depends
    on M only), so that a few channels of many entries still fill the GPU."""
    return max(1, min(CHANNEL_MAX_CHUNKS, M // (CHANNEL_CHUNK_PER_THREAD * THREADS)))


def window_args(win):
    """The window as the kernels' int arguments: kh, kw, sh, sw, ph, pw, dh, dw, OW."""
    return win.kernel + win.stride + win.padding + win.dilation + (win.out[1],)


class ConvOps:
    """Fused convolution ops (a mixin of ``CudaOps``: uses its launcher)."""

    def im2col(self, X, cols, kernel, stride, padding, dilation):
        """cols (N, C·kh·kw, OH·OW) = every window of X (N, C, H, W), zeros in the padding; one kernel."""
        dt = checks.float_arrays(checks.NAMES_IM2COL, X, cols)
        win = window(X, kernel, stride, padding, dilation)
        expect_shape("cols", cols, cols_shape(X.shape, win))
        self.launch(_im2col, cols.size, dt, X, cols, *window_args(win))
        return cols

    def col2im(self, dcols, dX, kernel, stride, padding, dilation):
        """dX (N, C, H, W) = Σ of the dcols entries that read each pixel: a gather, a thread a pixel."""
        dt = checks.float_arrays(checks.NAMES_COL2IM, dcols, dX)
        win = window(dX, kernel, stride, padding, dilation, name="dX")
        expect_shape("dcols", dcols, cols_shape(dX.shape, win))
        self.launch(_col2im, dX.size, dt, dcols, dX, *window_args(win))
        return dX

    def channel_bias_act(self, Z, b, activation, A):
        """Z (N, C, L) += b[c] in place, then A = σ(Z), one kernel. A may be Z unless a gelu."""
        dt = checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        check_channel_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self.launch(_channel_bias_act, Z.size, dt, Z, b, A, act)
        return A

    def channel_bias_grad(self, dZ, db, accumulate=False):
        """db (C,) (+)= Σ over n and l of dZ (N, C, L): blocks per channel chunk, then the chunks in
        order; deterministic."""
        dt = checks.float_arrays(checks.NAMES_BIAS_GRAD, dZ, db)
        check_channel_bias_grad(dZ, db)
        N, C, L = dZ.shape
        S = channel_chunks(N * L)
        accumulate = bool(accumulate)
        if S == 1 and not accumulate:
            partial = db.reshape(C, 1)  # one chunk a channel: its sum is the result
        else:
            partial = self.scratch("channel_bias_grad", (C, S), dt)
        self.launch(_channel_partial, C * S * THREADS, dt, dZ, partial,
                    blocks=min(C * S, self.max_blocks), threads=THREADS)
        if S != 1 or accumulate:
            self.launch(_channel_finish, C, dt, partial, db, accumulate)
        return db
