"""CUDA optimizer ops: global norm, clipping, SGD, RMSprop and Adam, one pass over the flat buffers."""

import math

import numpy as np

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import REDUCE_BLOCKS, THREADS, as_1d, cuda, device_function, kernel_body
from gpubackprop.kernels.cuda.numerics import mul, tree_sum
from gpubackprop.kernels.reference import adam_coefficients
from gpubackprop.step_values import SLOT

LR, LR_C, SQRT_BC2, DECAY = SLOT["lr"], SLOT["lr_c"], SLOT["sqrt_bc2"], SLOT["decay"]


# ---- ‖g‖²: per-block tree reductions into float64 partials, then one thread adds them in order ---
@kernel_body("void({t}[::1], float64[::1])")
def _sq_partial(g, partial):
    """Deliberate float64: squares are summed in float64 (``s``, ``acc``), so the norm of a large
    float32 buffer does not depend on the summation order's rounding."""
    acc = cuda.shared.array(THREADS, np.float64)
    tid = cuda.threadIdx.x
    s = 0.0
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        x = np.float64(g[i])
        s += x * x
    acc[tid] = s
    tree_sum(acc, tid, cuda.blockDim.x)
    if tid == 0:
        partial[cuda.blockIdx.x] = acc[0]


@kernel_body("void(float64[::1], int64, {t}[::1])")
def _sq_finish(partial, nparts, out):
    """Deliberate float64: the block partials are added in float64, in block order."""
    if cuda.grid(1) == 0:
        total = 0.0
        for c in range(nparts):
            total += partial[c]
        out[0] = out.dtype.type(total)


@kernel_body("void(float64[::1], int64, float64, {t}[::1])")
def _clip_finish(partial, nparts, clip_norm, scale):
    """Deliberate float64: the block partials are added in float64, in block order; the factor
    itself is computed in the array dtype, as the reference does."""
    if cuda.grid(1) == 0:
        total = 0.0
        for c in range(nparts):
            total += partial[c]
        one = scale.dtype.type(1)
        norm = math.sqrt(scale.dtype.type(total))
        x = scale.dtype.type(clip_norm) / (norm + scale.dtype.type(1e-6))
        scale[0] = one if x > one else x  # min(1, x), keeping NaN as np.minimum does


# ---- optimizer updates: one grid-stride pass over the flat buffers -------------------------------
# Each update's loop is one inline device function, called by the kernel that takes the per-step
# scalars as arguments (eager) and by the ``*_values`` kernel that reads them from StepValues'
# float64 array (a captured graph): the same arithmetic on the same float64 numbers rounded once to
# the array dtype, so the two give the same bits.
@device_function
def _sgd_loop(p, g, buf, lr_, mu, wd, nesterov, use_wd, use_momentum, s):
    nz = p.dtype.type(-0.0)
    if s < p.dtype.type(0):  # the skip factor (an overflowed fp16 step, loss_scale_gate)
        return
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = mul(g[i], s, nz)
        if use_wd:
            d = d + mul(wd, p[i], nz)
        if use_momentum:
            bi = mul(buf[i], mu, nz) + d
            buf[i] = bi
            d = d + mul(mu, bi, nz) if nesterov else bi
        p[i] = p[i] - mul(lr_, d, nz)


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], float64, float64, boolean, float64, {t}[::1])")
def _sgd(p, g, buf, lr, momentum, nesterov, weight_decay, scale):
    t = p.dtype.type
    _sgd_loop(p, g, buf, t(lr), t(momentum), t(weight_decay), nesterov, weight_decay != 0.0,
              momentum != 0.0, scale[0])


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], float64[::1], float64, boolean, float64, "
             "{t}[::1])")
def _sgd_values(p, g, buf, values, momentum, nesterov, weight_decay, scale):
    t = p.dtype.type
    _sgd_loop(p, g, buf, t(values[LR]), t(momentum), t(weight_decay), nesterov,
              weight_decay != 0.0, momentum != 0.0, scale[0])


@device_function
def _rmsprop_loop(p, g, sq, buf, lr_, a, a1, ep, wd, mu, use_wd, use_momentum, s):
    nz = p.dtype.type(-0.0)
    if s < p.dtype.type(0):  # the skip factor
        return
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = mul(g[i], s, nz)
        if use_wd:
            d = d + mul(wd, p[i], nz)
        v = mul(sq[i], a, nz) + mul(a1 * d, d, nz)
        sq[i] = v
        step = d / (math.sqrt(v) + ep)
        if use_momentum:
            step = mul(buf[i], mu, nz) + step
            buf[i] = step
        p[i] = p[i] - mul(lr_, step, nz)


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, float64, float64, float64, "
             "float64, float64, {t}[::1])")
def _rmsprop(p, g, sq, buf, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, scale):
    # 1 − alpha arrives computed on the host, as the reference computes it: in the kernel it would
    # be float64 arithmetic in every thread of a float32 kernel.
    t = p.dtype.type
    _rmsprop_loop(p, g, sq, buf, t(lr), t(alpha), t(one_minus_alpha), t(eps), t(weight_decay),
                  t(momentum), weight_decay != 0.0, momentum != 0.0, scale[0])


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64[::1], float64, float64, "
             "float64, float64, float64, {t}[::1])")
def _rmsprop_values(p, g, sq, buf, values, alpha, one_minus_alpha, eps, weight_decay, momentum,
                    scale):
    t = p.dtype.type
    _rmsprop_loop(p, g, sq, buf, t(values[LR]), t(alpha), t(one_minus_alpha), t(eps),
                  t(weight_decay), t(momentum), weight_decay != 0.0, momentum != 0.0, scale[0])


@device_function
def _adam_loop(p, g, m, v, lr_, b1, b2, c1, c2, ep, r2, wd, f, use_l2, use_decay, s):
    nz = p.dtype.type(-0.0)
    if s < p.dtype.type(0):  # the skip factor
        return
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        d = mul(g[i], s, nz)
        pi = p[i]
        if use_decay:
            pi = pi * f  # AdamW: decoupled decay, before the step
        if use_l2:
            d = d + mul(wd, pi, nz)  # Adam: L2 decay added to the gradient
        mi = mul(m[i], b1, nz) + mul(c1, d, nz)
        vi = mul(v[i], b2, nz) + mul(c2 * d, d, nz)
        m[i] = mi
        v[i] = vi
        p[i] = pi - (lr_ * mi) / (math.sqrt(vi) / r2 + ep)


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64, float64, float64, float64, "
             "float64, float64, float64, float64, float64, {t}[::1])")
def _adam(p, g, m, v, lr_c, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, decay, sqrt_bc2,
          scale):
    # lr_c = lr / (1 - beta1**step), sqrt_bc2 = sqrt(1 - beta2**step), decay = 1 - lr*wd (AdamW),
    # 1 - beta1 and 1 - beta2: computed on the host as the reference does (in the kernel they would
    # be float64 arithmetic in every thread), rounded to the array dtype here.
    t = p.dtype.type
    _adam_loop(p, g, m, v, t(lr_c), t(beta1), t(beta2), t(one_minus_beta1), t(one_minus_beta2),
               t(eps), t(sqrt_bc2), t(l2), t(decay), l2 != 0.0, decay != 1.0, scale[0])


@kernel_body("void({t}[::1], {t}[::1], {t}[::1], {t}[::1], float64[::1], float64, float64, "
             "float64, float64, float64, float64, {t}[::1])")
def _adam_values(p, g, m, v, values, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2,
                 scale):
    # values: lr_c, sqrt_bc2 and decay of this step (StepValues' float64 slots, the host's
    # adam_coefficients); the constants as in _adam.
    t = p.dtype.type
    decay = values[DECAY]
    _adam_loop(p, g, m, v, t(values[LR_C]), t(beta1), t(beta2), t(one_minus_beta1),
               t(one_minus_beta2), t(eps), t(values[SQRT_BC2]), t(l2), t(decay), l2 != 0.0,
               decay != 1.0, scale[0])


@kernel_body("void(float64[:, ::1], int64[::1], float64[::1])")
def _step_advance(table, counter, values):
    """values[:k] = table[counter[0]]; counter += 1: one thread (k is a handful of slots). Past
    the table's end the last row repeats (no read outside it), as the reference's take(clip)."""
    if cuda.grid(1) == 0:
        r = counter[0]
        if r >= table.shape[0]:
            r = table.shape[0] - 1
        for j in range(table.shape[1]):
            values[j] = table[r, j]
        counter[0] = counter[0] + 1


class OptimizerOps:
    """Fused optimizer updates (a mixin of ``CudaOps``)."""

    def _sq_partials(self, g, dt):
        n = g.size
        blocks = min(REDUCE_BLOCKS, -(-n // THREADS))
        partial = self.scratch("sq_partials", (REDUCE_BLOCKS,), np.float64)
        if blocks == 0:
            partial[:1] = 0
            return partial, 1
        self.launch(_sq_partial, n, dt, g, partial, blocks=blocks)
        return partial, blocks

    def sq_norm(self, g):
        """‖g‖² as a new 1-element device array of g's dtype (deterministic; no host sync)."""
        dt = checks.float_arrays(("g",), g)
        if g.ndim != 1:
            checks.check_flat("g", g)
        out = self.xp.empty(1, dt)
        partial, nparts = self._sq_partials(g, dt)
        self.launch(_sq_finish, 1, dt, partial, nparts, out)
        return out

    def clip_scale(self, g, clip_norm, scale):
        """scale[0] = min(1, clip_norm / (‖g‖₂ + 1e-6)), computed on the device."""
        dt = checks.float_arrays(("g", "scale"), g, scale)
        if g.ndim != 1 or scale.size != 1:
            checks.check_flat("g", g)
            checks.check_scale(scale)
        partial, nparts = self._sq_partials(g, dt)
        self.launch(_clip_finish, 1, dt, partial, nparts, float(clip_norm), as_1d(scale))
        return scale

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening, scale and weight decay included, one kernel."""
        dt, buf, momentum = self._sgd_args(p, g, buf, momentum, scale)
        self.launch(_sgd, p.size, dt, as_1d(p), as_1d(g), as_1d(buf), float(lr), momentum,
                     bool(nesterov), float(weight_decay), as_1d(scale))
        return p

    def rmsprop(self, p, g, square_avg, buf, lr, alpha, eps, weight_decay, momentum, scale):
        """torch.optim.RMSprop (not centered), eps outside the square root, one kernel."""
        dt, buf, momentum = self._rmsprop_args(p, g, square_avg, buf, momentum, scale)
        self.launch(_rmsprop, p.size, dt, as_1d(p), as_1d(g), as_1d(square_avg),
                     as_1d(buf), float(lr), float(alpha), 1.0 - float(alpha), float(eps), float(weight_decay),
                     momentum, as_1d(scale))
        return p

    def adam(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step, scale):
        """torch.optim.Adam / AdamW (decoupled decay), bias-corrected, one kernel."""
        dt = self._adam_args(p, g, m, v, scale)
        beta1, beta2 = float(beta1), float(beta2)
        lr_c, sqrt_bc2, l2, decay = adam_coefficients(lr, beta1, beta2, float(weight_decay),
                                                      decoupled, step)
        self.launch(_adam, p.size, dt, as_1d(p), as_1d(g), as_1d(m), as_1d(v), float(lr_c),
                     beta1, beta2, 1.0 - beta1, 1.0 - beta2, float(eps), l2, float(decay), sqrt_bc2,
                    as_1d(scale))
        return p

    # ---- the same updates, the per-step values read in the kernel from StepValues' array ---------
    def step_advance(self, table, counter, values):
        """values[:k] = table[counter[0]]; counter += 1, one single-thread kernel (the first of a
        captured step: it moves the step's learning rate etc. in on the device)."""
        if table.dtype != np.float64 or values.dtype != np.float64 or counter.dtype != np.int64 \
                or table.ndim != 2 or values.shape[0] < table.shape[1] or counter.shape != (1,):
            raise TypeError(f"step_advance: expected a float64 table (rows, k), an int64 counter "
                            f"(1,) and float64 values (>= k,), got {table.dtype} {table.shape}, "
                            f"{counter.dtype} {counter.shape}, {values.dtype} {values.shape}")
        self.launch(_step_advance, 1, np.dtype(np.float64), table, counter, values)
        return values

    def sgd_values(self, p, g, buf, values, momentum, nesterov, weight_decay, scale):
        """``sgd`` with lr read in the kernel from ``values[SLOT["lr"]]``."""
        dt, buf, momentum = self._sgd_args(p, g, buf, momentum, scale)
        self.launch(_sgd_values, p.size, dt, as_1d(p), as_1d(g), as_1d(buf), _values(values),
                    momentum, bool(nesterov), float(weight_decay), as_1d(scale))
        return p

    def rmsprop_values(self, p, g, square_avg, buf, values, alpha, eps, weight_decay, momentum,
                       scale):
        """``rmsprop`` with lr read in the kernel from ``values[SLOT["lr"]]``."""
        dt, buf, momentum = self._rmsprop_args(p, g, square_avg, buf, momentum, scale)
        self.launch(_rmsprop_values, p.size, dt, as_1d(p), as_1d(g), as_1d(square_avg),
                    as_1d(buf), _values(values), float(alpha), 1.0 - float(alpha), float(eps),
                    float(weight_decay), momentum, as_1d(scale))
        return p

    def adam_values(self, p, g, m, v, values, beta1, beta2, eps, weight_decay, decoupled, scale):
        """``adam`` with lr/(1 − β1^t), √(1 − β2^t) and 1 − lr·wd read in the kernel from
        ``values``."""
        dt = self._adam_args(p, g, m, v, scale)
        beta1, beta2, weight_decay = float(beta1), float(beta2), float(weight_decay)
        l2 = 0.0 if decoupled else weight_decay  # as adam_coefficients
        self.launch(_adam_values, p.size, dt, as_1d(p), as_1d(g), as_1d(m), as_1d(v),
                    _values(values), beta1, beta2, 1.0 - beta1, 1.0 - beta2, float(eps), l2,
                    as_1d(scale))
        return p

    # The argument checks of an update and of its ``*_values`` form (the same arrays).
    def _sgd_args(self, p, g, buf, momentum, scale):
        """(dtype, buf, momentum) of checked SGD arguments; buf an empty scratch without
        momentum."""
        momentum = float(momentum)
        if buf is None and not momentum and hasattr(p, "dtype"):
            buf = self.scratch("no_buffer", (0,), p.dtype)
        dt = checks.float_arrays(checks.NAMES_SGD, p, g, buf, scale)
        if g.shape != p.shape or scale.size != 1 or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("buf", buf) if momentum else None)
        return dt, buf, momentum

    def _rmsprop_args(self, p, g, square_avg, buf, momentum, scale):
        """(dtype, buf, momentum) of checked RMSprop arguments."""
        momentum = float(momentum)
        if buf is None and not momentum and hasattr(p, "dtype"):
            buf = self.scratch("no_buffer", (0,), p.dtype)
        dt = checks.float_arrays(checks.NAMES_RMSPROP, p, g, square_avg, buf, scale)
        if g.shape != p.shape or square_avg.shape != p.shape or scale.size != 1 \
                or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("square_avg", square_avg),
                            ("buf", buf) if momentum else None)
        return dt, buf, momentum

    def _adam_args(self, p, g, m, v, scale):
        """The dtype of checked Adam arguments."""
        dt = checks.float_arrays(checks.NAMES_ADAM, p, g, m, v, scale)
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape or scale.size != 1:
            self._check_opt(p, g, scale, ("m", m), ("v", v))
        return dt

    @staticmethod
    def _check_opt(p, g, scale, *pairs):
        checks.check_same_shape("p", p, ("g", g), *(x for x in pairs if x is not None))
        checks.check_scale(scale)


def _values(values):
    from gpubackprop.step_values import SLOTS

    if getattr(values, "dtype", None) != np.float64 or values.shape != (len(SLOTS),):
        raise TypeError(f"values: expected StepValues.values, a float64 array of shape "
                        f"({len(SLOTS)},), got {type(values).__name__} "
                        f"{getattr(values, 'dtype', '')} {getattr(values, 'shape', '')}")
    return values
