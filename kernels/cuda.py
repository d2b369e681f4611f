"""Fused CUDA kernel set: each op of ``ReferenceOps`` as Numba CUDA kernels on CuPy arrays.

Kernel bodies are grid-stride loops (``cuda.grid(1)``, ``cuda.gridsize(1)``), so any launch size
is correct; launchers check dtype, shape and contiguity first (the simulator checks nothing), then
launch on CuPy's current stream with Numba's per-launch CUDA-array-interface sync switched off, so
nothing synchronises the host.

Each kernel is compiled with an explicit signature for the dtype it is first used with (float32 or
float64), on first use, so that importing this module costs no compilation and needs no GPU.
Constants are made in the array dtype (``X.dtype.type(c)``), since a Python float literal would
promote float32 math to float64. NVVM contracts ``a * b + c`` into one fused multiply-add; where
the reference rounds the product first and the formula can cancel (the optimizers, gelu, tanh'),
``_mul`` keeps the product rounded on its own (an fma with a -0.0 addend), so the GPU rounds as
the reference does.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run in Numba's simulator on NumPy arrays, with
a grid of 2 blocks of 32 threads so that multiple blocks, the grid-stride loop and ragged tails are
all exercised while the simulator (one Python thread per CUDA thread) stays fast enough.
"""

import math

import numpy as np

from gpubackprop.backend import cupy_module, is_cudasim, numba_cuda
from gpubackprop.kernels import checks
from gpubackprop.kernels.reference import (
    ACTIVATIONS,
    GELU_C,
    GELU_K,
    LEAKY_SLOPE,
    ReferenceOps,
    adam_coefficients,
)

cuda = numba_cuda()
if cuda is None:
    raise ImportError("the fused CUDA kernels need numba-cuda (pip install 'gpubackprop[gpu]')")

IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU, GELU = range(6)
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
GELU_3K = 3 * GELU_K  # the reference evaluates 3 * GELU_K in Python first

SIMULATOR = is_cudasim()
THREADS = 32 if SIMULATOR else 256  # a power of two: the block reduction halves it
SIM_BLOCKS = 2
REDUCE_BLOCKS = SIM_BLOCKS if SIMULATOR else 256  # fixed: the summation order depends on it


# ---- device helpers -----------------------------------------------------------------------------
@cuda.jit(device=True)
def _mul(x, y, nz):
    """x * y rounded on its own: NVVM cannot contract it into a following add (nz is -0.0)."""
    return cuda.fma(x, y, nz)


# ---- forward: Z += b; A = σ(Z) -----------------------------------------------------------------
def _bias_act(Z, b, A, act):
    B, n = Z.shape
    zero, one, nz = Z.dtype.type(0), Z.dtype.type(1), Z.dtype.type(-0.0)
    slope = Z.dtype.type(LEAKY_SLOPE)
    half, c, k = Z.dtype.type(0.5), Z.dtype.type(GELU_C), Z.dtype.type(GELU_K)
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        z = Z[i, j] + b[j]
        Z[i, j] = z
        if act == IDENTITY:
            a = z
        elif act == SIGMOID:
            # Split at 0 so exp never overflows: e = exp(-|z|) <= 1 on both sides.
            e = math.exp(-abs(z))
            a = one / (one + e) if z >= zero else e / (one + e)
        elif act == TANH:
            a = math.tanh(z)
        elif act == RELU:
            a = zero if z < zero else z  # keeps NaN, as np.maximum does
        elif act == LEAKY_RELU:
            a = z if z > zero else z * slope
        else:  # GELU, tanh approximation
            t = math.tanh(c * (z + _mul(k, z * z * z, nz)))
            a = half * z * (one + t)
        A[i, j] = a


# ---- backward: dZ = dA ⊙ σ'(saved) (the Hadamard product of BP1/BP2) ------------------------------
def _act_backward(dA, S, dZ, act):
    B, n = dA.shape
    zero, one, nz = dA.dtype.type(0), dA.dtype.type(1), dA.dtype.type(-0.0)
    slope = dA.dtype.type(LEAKY_SLOPE)
    half, c, k, k3 = (dA.dtype.type(0.5), dA.dtype.type(GELU_C), dA.dtype.type(GELU_K),
                      dA.dtype.type(GELU_3K))
    for idx in range(cuda.grid(1), B * n, cuda.gridsize(1)):
        i = idx // n
        j = idx - i * n
        d = dA[i, j]
        s = S[i, j]
        if act == IDENTITY:
            r = d
        elif act == SIGMOID:
            r = d * s * (one - s)
        elif act == TANH:
            r = d * (one - _mul(s, s, nz))
        elif act == RELU:
            r = d if s > zero else zero
        elif act == LEAKY_RELU:
            r = d if s > zero else d * slope
        else:  # GELU: S is Z
            t = math.tanh(c * (s + _mul(k, s * s * s, nz)))
            left = _mul(half, one + t, nz)
            right = _mul(half * s * (one - _mul(t, t, nz)) * c, one + _mul(k3 * s, s, nz), nz)
            r = d * (left + right)
        dZ[i, j] = r


# ---- BP1 for softmax + cross-entropy: one thread per row ----------------------------------------
def _softmax_ce(logits, labels, dlogits, loss_rows):
    B, C = logits.shape
    one = logits.dtype.type(1)
    fB = logits.dtype.type(B)
    for i in range(cuda.grid(1), B, cuda.gridsize(1)):
        y = labels[i]
        valid = y >= 0 and y < C  # labels are checked on the host; this only keeps memory safe
        zy = logits[i, y] if valid else logits.dtype.type(math.nan)  # before dlogits may alias
        # Subtract the row max before exp (log-sum-exp) so exp never overflows; NaN propagates.
        m = logits[i, 0]
        for j in range(1, C):
            v = logits[i, j]
            if v > m or v != v:
                m = v
        s = 0.0  # float64 accumulator, fixed order
        for j in range(C):
            e = math.exp(logits[i, j] - m)
            dlogits[i, j] = e
            s += e
        sf = logits.dtype.type(s)
        loss_rows[i] = math.log(sf) + m - zy
        for j in range(C):
            d = dlogits[i, j] / sf
            if j == y:
                d = d - one
            dlogits[i, j] = d / fB


# ---- BP4: bias gradient, one thread per column, rows added in order (no atomics) ----------------
def _bias_grad(dZ, db, accumulate):
    B, n = dZ.shape
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        s = dZ.dtype.type(0)
        for i in range(B):
            s += dZ[i, j]
        db[j] = db[j] + s if accumulate else s


# ---- ‖g‖²: per-block tree reductions into float64 partials, then one thread adds them in order ---
def _sq_partial(g, partial):
    acc = cuda.shared.array(THREADS, np.float64)
    tid = cuda.threadIdx.x
    s = 0.0
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        x = np.float64(g[i])
        s += x * x
    acc[tid] = s
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            acc[tid] += acc[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        partial[cuda.blockIdx.x] = acc[0]


def _sq_finish(partial, nparts, out):
    if cuda.grid(1) == 0:
        total = 0.0
        for c in range(nparts):
            total += partial[c]
        out[0] = out.dtype.type(total)


def _clip_finish(partial, nparts, clip_norm, scale):
    if cuda.grid(1) == 0:
        total = 0.0
        for c in range(nparts):
            total += partial[c]
        one = scale.dtype.type(1)
        norm = math.sqrt(scale.dtype.type(total))
        x = scale.dtype.type(clip_norm) / (norm + scale.dtype.type(1e-6))
        scale[0] = one if x > one else x  # min(1, x), keeping NaN as np.minimum does


# ---- optimizer updates: one grid-stride pass over the flat buffers -------------------------------
def _sgd(p, g, buf, lr, momentum, nesterov, weight_decay, scale):
    t = p.dtype.type
    lr_, mu, wd, nz, s = t(lr), t(momentum), t(weight_decay), t(-0.0), scale[0]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = _mul(g[i], s, nz)
        if weight_decay != 0.0:
            d = d + _mul(wd, p[i], nz)
        if momentum != 0.0:
            bi = _mul(buf[i], mu, nz) + d
            buf[i] = bi
            d = d + _mul(mu, bi, nz) if nesterov else bi
        p[i] = p[i] - _mul(lr_, d, nz)


def _rmsprop(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, scale):
    t = p.dtype.type
    lr_, a, a1, ep = t(lr), t(alpha), t(1.0 - alpha), t(eps)
    wd, mu, nz, s = t(weight_decay), t(momentum), t(-0.0), scale[0]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = _mul(g[i], s, nz)
        if weight_decay != 0.0:
            d = d + _mul(wd, p[i], nz)
        v = _mul(sq[i], a, nz) + _mul(a1 * d, d, nz)
        sq[i] = v
        step = d / (math.sqrt(v) + ep)
        if momentum != 0.0:
            step = _mul(buf[i], mu, nz) + step
            buf[i] = step
        p[i] = p[i] - _mul(lr_, step, nz)


def _adam(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, scale):
    # lr_c = lr / (1 - beta1**step), sqrt_bc2 = sqrt(1 - beta2**step), decay = 1 - lr*wd (AdamW),
    # computed on the host as the reference does and rounded to the array dtype here.
    t = p.dtype.type
    b1, b2, c1, c2 = t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2)
    lr_, ep, r2, wd, f = t(lr_c), t(eps), t(sqrt_bc2), t(l2), t(decay)
    nz, s = t(-0.0), scale[0]
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = _mul(g[i], s, nz)
        pi = p[i]
        if decay != 1.0:
            pi = pi * f  # AdamW: decoupled decay, before the step
        if l2 != 0.0:
            d = d + _mul(wd, pi, nz)  # Adam: L2 decay added to the gradient
        mi = _mul(m[i], b1, nz) + _mul(c1, d, nz)
        vi = _mul(v[i], b2, nz) + _mul(c2 * d, d, nz)
        m[i] = mi
        v[i] = vi
        p[i] = pi - (lr_ * mi) / (math.sqrt(vi) / r2 + ep)


# Explicit signatures, by kernel: {t} is the float type, {l} the label type.
_SIGNATURES = {
    _bias_act: "void({t}[:, ::1], {t}[::1], {t}[:, ::1], int64)",
    _act_backward: "void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], int64)",
    _softmax_ce: "void({t}[:, ::1], {l}[::1], {t}[:, ::1], {t}[::1])",
    _bias_grad: "void({t}[:, ::1], {t}[::1], boolean)",
    _sq_partial: "void({t}[::1], float64[::1])",
    _sq_finish: "void(float64[::1], int64, {t}[::1])",
    _clip_finish: "void(float64[::1], int64, float64, {t}[::1])",
    _sgd: "void({t}[::1], {t}[::1], {t}[::1], float64, float64, boolean, float64, {t}[::1])",
    _rmsprop: "void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, float64, float64, float64, "
              "float64, {t}[::1])",
    _adam: "void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, float64, float64, float64, "
           "float64, float64, float64, {t}[::1])",
}
_KERNELS = {}


def kernel(body, dtype, label_dtype=None):
    """``body`` compiled for ``dtype`` (and the label dtype), once per process."""
    key = (body, dtype, label_dtype)
    k = _KERNELS.get(key)
    if k is None:
        sig = _SIGNATURES[body].format(t=dtype.name, l=label_dtype.name if label_dtype else "")
        # On a GPU the compiled kernel is cached on disk (the simulator compiles nothing).
        options = {} if SIMULATOR else {"cache": True}
        k = _KERNELS[key] = cuda.jit(sig, **options)(body)
    return k


def _cai_sync_off():
    """Switch off Numba's per-launch stream sync for CUDA-array-interface arguments.

    CuPy exports its stream in the interface; by default Numba would synchronise on it at every
    launch. Launching on CuPy's own current stream keeps the order without that host sync.
    """
    import importlib

    for name in ("numba.cuda.core.config", "numba.core.config"):
        try:
            config = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(config, "CUDA_ARRAY_INTERFACE_SYNC"):
            config.CUDA_ARRAY_INTERFACE_SYNC = 0


def _as_2d(a):
    return a if a.ndim == 2 else a.reshape(1, -1)


def _as_1d(a):
    return a if a.ndim == 1 else a.reshape(-1)


class CudaOps(ReferenceOps):
    """The reference ops as fused Numba CUDA kernels (float32 and float64), on CuPy's stream."""

    name = "fused-cuda"

    def __init__(self, xp):
        super().__init__(xp)
        self.simulator = SIMULATOR
        self._streams = {}
        self._partials = None
        self._empty = {}
        if self.simulator:
            self.max_blocks = SIM_BLOCKS
        else:
            if cupy_module() is None or xp is not cupy_module():
                raise TypeError(f"xp: expected cupy for the fused CUDA kernels on a GPU, got "
                                f"{getattr(xp, '__name__', xp)!r}")
            _cai_sync_off()
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
            self.max_blocks = 32 * sms

    def __repr__(self):
        where = ", simulator" if self.simulator else ""
        return f"{type(self).__name__}(xp={self.xp.__name__}{where})"

    # ---- launching ------------------------------------------------------------------------------
    def _launch(self, body, work, dtype, *args, label_dtype=None, blocks=None):
        """Launch ``body`` over ``work`` items (grid-stride) on CuPy's current stream."""
        if work <= 0:
            return
        k = kernel(body, dtype, label_dtype)
        if blocks is None:
            blocks = min(self.max_blocks, -(-work // THREADS))
        if self.simulator:
            k[blocks, THREADS](*args)
        else:
            k[blocks, THREADS, self._stream()](*args)

    def _stream(self):
        ptr = cupy_module().cuda.get_current_stream().ptr
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = cuda.external_stream(ptr) if ptr else cuda.default_stream()
        return s

    def _no_buffer(self, dt):
        e = self._empty.get(dt)
        if e is None:
            e = self._empty[dt] = self.xp.empty(0, dt)
        return e

    def _reduce_blocks(self, n):
        return min(REDUCE_BLOCKS, -(-n // THREADS))

    def _partial_buffer(self):
        if self._partials is None:
            self._partials = self.xp.empty(REDUCE_BLOCKS, np.float64)
        return self._partials

    # ---- ops ------------------------------------------------------------------------------------
    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z), one kernel. A may be Z unless the activation is gelu."""
        dt = checks.float_arrays(checks.NAMES_BIAS_ACT, Z, b, A)
        if Z.ndim != 2 or b.shape != Z.shape[1:] or A.shape != Z.shape:
            checks.check_bias_act(Z, b, A)
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self._launch(_bias_act, Z.size, dt, Z, b, A, act)
        return A

    def act_backward(self, dA, saved, activation, dZ):
        """dZ = dA ⊙ σ'(saved), one kernel (saved is A, or Z for gelu). dZ may be dA."""
        dt = checks.float_arrays(checks.NAMES_ACT_BACKWARD, dA, saved, dZ)
        if saved.shape != dA.shape or dZ.shape != dA.shape:
            checks.check_same_shape("dA", dA, ("saved", saved), ("dZ", dZ))
        act = ACT_CODE.get(activation)
        if act is None:
            raise checks.unknown_activation(activation)
        self._launch(_act_backward, dA.size, dt, _as_2d(dA), _as_2d(saved), _as_2d(dZ), act)
        return dZ

    def softmax_ce(self, logits, labels, dlogits, loss_rows):
        """Per-row loss logsumexp(z) − z[y]; dlogits = (softmax(z) − onehot(y))/B; a thread a row.

        A label outside [0, C) (the host checks them first) gives a NaN loss row, never a stray
        write. dlogits may be logits itself.
        """
        dt = checks.float_arrays(checks.NAMES_SOFTMAX_CE, logits, dlogits, loss_rows)
        checks.check_softmax_ce(logits, labels, dlogits, loss_rows)
        if logits.shape[1] == 0:
            raise checks.shape_error("logits", "at least one class (column)", logits)
        self._launch(_softmax_ce, logits.shape[0], dt, logits, labels, dlogits, loss_rows,
                     label_dtype=labels.dtype)
        return dlogits, loss_rows

    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ: a thread a column, rows in order (deterministic, no atomics)."""
        dt = checks.float_arrays(checks.NAMES_BIAS_GRAD, dZ, db)
        if dZ.ndim != 2 or db.shape != dZ.shape[1:]:
            checks.check_bias_grad(dZ, db)
        self._launch(_bias_grad, dZ.shape[1], dt, dZ, db, bool(accumulate))
        return db

    def _sq_partials(self, g, dt):
        n = g.size
        blocks = self._reduce_blocks(n)
        partial = self._partial_buffer()
        if blocks == 0:
            partial[:1] = 0
            return partial, 1
        self._launch(_sq_partial, n, dt, g, partial, blocks=blocks)
        return partial, blocks

    def sq_norm(self, g):
        """‖g‖² as a new 1-element device array of g's dtype (deterministic; no host sync)."""
        dt = checks.float_arrays(("g",), g)
        if g.ndim != 1:
            checks.check_flat("g", g)
        out = self.xp.empty(1, dt)
        partial, nparts = self._sq_partials(g, dt)
        self._launch(_sq_finish, 1, dt, partial, nparts, out)
        return out

    def clip_scale(self, g, clip_norm, scale):
        """scale[0] = min(1, clip_norm / (‖g‖₂ + 1e-6)), computed on the device."""
        dt = checks.float_arrays(("g", "scale"), g, scale)
        if g.ndim != 1 or scale.size != 1:
            checks.check_flat("g", g)
            checks.check_scale(scale)
        partial, nparts = self._sq_partials(g, dt)
        self._launch(_clip_finish, 1, dt, partial, nparts, float(clip_norm), _as_1d(scale))
        return scale

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening, scale and weight decay included, one kernel."""
        momentum = float(momentum)
        if buf is None and not momentum and hasattr(p, "dtype"):
            buf = self._no_buffer(p.dtype)
        dt = checks.float_arrays(checks.NAMES_SGD, p, g, buf, scale)
        if g.shape != p.shape or scale.size != 1 or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("buf", buf) if momentum else None)
        self._launch(_sgd, p.size, dt, _as_1d(p), _as_1d(g), _as_1d(buf), float(lr), momentum,
                     bool(nesterov), float(weight_decay), _as_1d(scale))
        return p

    def rmsprop(self, p, g, square_avg, buf, lr, alpha, eps, weight_decay, momentum, scale):
        """torch.optim.RMSprop (not centered), eps outside the square root, one kernel."""
        momentum = float(momentum)
        if buf is None and not momentum and hasattr(p, "dtype"):
            buf = self._no_buffer(p.dtype)
        dt = checks.float_arrays(checks.NAMES_RMSPROP, p, g, square_avg, buf, scale)
        if g.shape != p.shape or square_avg.shape != p.shape or scale.size != 1 \
                or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("square_avg", square_avg),
                            ("buf", buf) if momentum else None)
        self._launch(_rmsprop, p.size, dt, _as_1d(p), _as_1d(g), _as_1d(square_avg),
                     _as_1d(buf), float(lr), float(alpha), float(eps), float(weight_decay),
                     momentum, _as_1d(scale))
        return p

    def adam(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step, scale):
        """torch.optim.Adam / AdamW (decoupled decay), bias-corrected, one kernel."""
        dt = checks.float_arrays(checks.NAMES_ADAM, p, g, m, v, scale)
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape or scale.size != 1:
            self._check_opt(p, g, scale, ("m", m), ("v", v))
        beta1, beta2 = float(beta1), float(beta2)
        lr_c, sqrt_bc2, l2, decay = adam_coefficients(lr, beta1, beta2, float(weight_decay),
                                                      decoupled, step)
        self._launch(_adam, p.size, dt, _as_1d(p), _as_1d(g), _as_1d(m), _as_1d(v), float(lr_c),
                     beta1, beta2, float(eps), l2, float(decay), sqrt_bc2, _as_1d(scale))
        return p

    @staticmethod
    def _check_opt(p, g, scale, *pairs):
        checks.check_same_shape("p", p, ("g", g), *(x for x in pairs if x is not None))
        checks.check_scale(scale)
