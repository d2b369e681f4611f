"""CPU optimizer ops: global norm, clipping, SGD, RMSprop and Adam, one pass over the flat buffers."""

import math

import numpy as np
from numba import njit, prange

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.numerics import _span
from gpubackprop.kernels.reference import adam_coefficients

SQ_CHUNK = 1 << 14  # reduction chunk: the summation order depends on this, not on threads


# ---- ‖g‖²: float64 partial sums over fixed chunks, added in chunk order ---------------------------
@njit(cache=True, error_model="numpy")
def _sq_chunk(g, i0, i1):
    # Four independent accumulators (a fixed order) so the loop is not one long dependency chain.
    a0 = a1 = a2 = a3 = 0.0
    i = i0
    while i + 4 <= i1:
        x0 = np.float64(g[i])
        x1 = np.float64(g[i + 1])
        x2 = np.float64(g[i + 2])
        x3 = np.float64(g[i + 3])
        a0 += x0 * x0
        a1 += x1 * x1
        a2 += x2 * x2
        a3 += x3 * x3
        i += 4
    while i < i1:
        x = np.float64(g[i])
        a0 += x * x
        i += 1
    return (a0 + a1) + (a2 + a3)


@njit(cache=True, error_model="numpy")
def _sq_norm_serial(g, chunk):
    n = g.size
    total = 0.0
    for c in range((n + chunk - 1) // chunk):
        total += _sq_chunk(g, c * chunk, min(n, (c + 1) * chunk))
    return total


@njit(cache=True, error_model="numpy", parallel=True)
def _sq_norm_parallel(g, chunk):
    n = g.size
    nchunks = (n + chunk - 1) // chunk
    partial = np.empty(nchunks)
    for c in prange(nchunks):
        partial[c] = _sq_chunk(g, c * chunk, min(n, (c + 1) * chunk))
    total = 0.0
    for c in range(nchunks):
        total += partial[c]
    return total


@njit(cache=True, error_model="numpy")
def _write_sq(total, out):
    out[0] = out.dtype.type(total)


@njit(cache=True, error_model="numpy")
def _write_clip(total, clip_norm, scale):
    one = scale.dtype.type(1)
    norm = math.sqrt(scale.dtype.type(total))
    x = scale.dtype.type(clip_norm) / (norm + scale.dtype.type(1e-6))
    scale[0] = one if x > one else x  # min(1, x), keeping NaN as np.minimum does


# ---- optimizer updates: one pass over the flat buffers ------------------------------------------
@njit(cache=True, error_model="numpy")
def _sgd_span(p, g, buf, lr, momentum, nesterov, weight_decay, s, i0, i1):
    t = p.dtype.type
    lr, mu, wd = t(lr), t(momentum), t(weight_decay)
    for i in range(i0, i1):
        d = g[i] * s
        if weight_decay != 0.0:
            d = d + wd * p[i]
        if momentum != 0.0:
            bi = buf[i] * mu + d
            buf[i] = bi
            d = d + mu * bi if nesterov else bi
        p[i] -= lr * d


@njit(cache=True, error_model="numpy")
def _sgd_serial(p, g, buf, lr, momentum, nesterov, weight_decay, scale):
    n = p.size
    _sgd_span(p.reshape(n), g.reshape(n), buf.reshape(buf.size), lr, momentum, nesterov,
              weight_decay, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _sgd_parallel(p, g, buf, lr, momentum, nesterov, weight_decay, scale, nchunks):
    n = p.size
    fp, fg, fb, s = p.reshape(n), g.reshape(n), buf.reshape(buf.size), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _sgd_span(fp, fg, fb, lr, momentum, nesterov, weight_decay, s, i0, i1)


@njit(cache=True, error_model="numpy")
def _rmsprop_span(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, s, i0, i1):
    t = p.dtype.type
    lr, a, a1, ep, wd, mu = t(lr), t(alpha), t(1.0 - alpha), t(eps), t(weight_decay), t(momentum)
    for i in range(i0, i1):
        d = g[i] * s
        if weight_decay != 0.0:
            d = d + wd * p[i]
        v = sq[i] * a + a1 * d * d
        sq[i] = v
        step = d / (math.sqrt(v) + ep)
        if momentum != 0.0:
            step = buf[i] * mu + step
            buf[i] = step
        p[i] -= lr * step


@njit(cache=True, error_model="numpy")
def _rmsprop_serial(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, scale):
    n = p.size
    _rmsprop_span(p.reshape(n), g.reshape(n), sq.reshape(n), buf.reshape(buf.size), lr, alpha,
                  eps, weight_decay, momentum, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _rmsprop_parallel(p, g, sq, buf, lr, alpha, eps, weight_decay, momentum, scale, nchunks):
    n = p.size
    fp, fg, fs, fb, s = p.reshape(n), g.reshape(n), sq.reshape(n), buf.reshape(buf.size), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _rmsprop_span(fp, fg, fs, fb, lr, alpha, eps, weight_decay, momentum, s, i0, i1)


@njit(cache=True, error_model="numpy")
def _adam_span(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, s, i0, i1):
    # lr_c = lr / (1 - beta1**step), sqrt_bc2 = sqrt(1 - beta2**step) and decay = 1 - lr*wd
    # (AdamW) are computed in Python as the reference does, then rounded to the array dtype once,
    # as NumPy rounds a Python scalar that meets a float32 array.
    t = p.dtype.type
    b1, b2, c1, c2 = t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2)
    lr, ep, r2, wd, f = t(lr_c), t(eps), t(sqrt_bc2), t(l2), t(decay)
    for i in range(i0, i1):
        d = g[i] * s
        pi = p[i]
        if decay != 1.0:
            pi = pi * f  # AdamW: decoupled decay, before the step
        if l2 != 0.0:
            d = d + wd * pi  # Adam: L2 decay added to the gradient
        mi = m[i] * b1 + c1 * d
        vi = v[i] * b2 + c2 * d * d
        m[i] = mi
        v[i] = vi
        p[i] = pi - lr * mi / (math.sqrt(vi) / r2 + ep)


@njit(cache=True, error_model="numpy")
def _adam_serial(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, scale):
    n = p.size
    _adam_span(p.reshape(n), g.reshape(n), m.reshape(n), v.reshape(n), lr_c, beta1, beta2, eps,
               l2, decay, sqrt_bc2, scale[0], 0, n)


@njit(cache=True, error_model="numpy", parallel=True)
def _adam_parallel(p, g, m, v, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, scale, nchunks):
    n = p.size
    fp, fg, fm, fv, s = p.reshape(n), g.reshape(n), m.reshape(n), v.reshape(n), scale[0]
    for c in prange(nchunks):
        i0, i1 = _span(c, nchunks, n)
        _adam_span(fp, fg, fm, fv, lr_c, beta1, beta2, eps, l2, decay, sqrt_bc2, s, i0, i1)


_EMPTY = {checks.F32: np.empty(0, checks.F32), checks.F64: np.empty(0, checks.F64)}


def _no_buffer(p):
    """An empty stand-in for a momentum buffer that is not used (momentum = 0)."""
    return _EMPTY.get(getattr(p, "dtype", None), p)


class OptimizerOps:
    """Fused optimizer updates (a mixin of ``CpuOps``)."""

    def _sq_total(self, g):
        if self.parallel and g.size >= self.par_cheap:
            return _sq_norm_parallel(g, SQ_CHUNK)
        return _sq_norm_serial(g, SQ_CHUNK)

    def sq_norm(self, g):
        """‖g‖² as a new 1-element array of g's dtype (float64 partial sums in a fixed order)."""
        dt = checks.float_arrays(("g",), g)
        if g.ndim != 1:
            checks.check_flat("g", g)
        out = np.empty(1, dt)
        _write_sq(self._sq_total(g), out)
        return out

    def clip_scale(self, g, clip_norm, scale):
        """scale[0] = min(1, clip_norm / (‖g‖₂ + 1e-6)), computed as the reference does."""
        checks.float_arrays(("g", "scale"), g, scale)
        if g.ndim != 1 or scale.size != 1:
            checks.check_flat("g", g)
            checks.check_scale(scale)
        _write_clip(self._sq_total(g), float(clip_norm), scale)
        return scale

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening, scale and weight decay included, in one pass."""
        momentum = float(momentum)
        if buf is None and not momentum:
            buf = _no_buffer(p)
        checks.float_arrays(checks.NAMES_SGD, p, g, buf, scale)
        if g.shape != p.shape or scale.size != 1 or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("buf", buf) if momentum else None)
        if scale[0] < 0:  # the skip factor (an overflowed fp16 step): a read of host memory
            return p
        args = (p, g, buf, float(lr), momentum, bool(nesterov), float(weight_decay), scale)
        if self.parallel and p.size >= self.par_cheap:
            _sgd_parallel(*args, self.nchunks)
        else:
            _sgd_serial(*args)
        return p

    def rmsprop(self, p, g, square_avg, buf, lr, alpha, eps, weight_decay, momentum, scale):
        """torch.optim.RMSprop (not centered), eps outside the square root, in one pass."""
        momentum = float(momentum)
        if buf is None and not momentum:
            buf = _no_buffer(p)
        checks.float_arrays(checks.NAMES_RMSPROP, p, g, square_avg, buf, scale)
        if g.shape != p.shape or square_avg.shape != p.shape or scale.size != 1 \
                or (momentum and buf.shape != p.shape):
            self._check_opt(p, g, scale, ("square_avg", square_avg),
                            ("buf", buf) if momentum else None)
        if scale[0] < 0:  # the skip factor (an overflowed fp16 step)
            return p
        args = (p, g, square_avg, buf, float(lr), float(alpha), float(eps), float(weight_decay),
                momentum, scale)
        if self.parallel and p.size >= self.par_cheap:
            _rmsprop_parallel(*args, self.nchunks)
        else:
            _rmsprop_serial(*args)
        return p

    def adam(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step, scale):
        """torch.optim.Adam / AdamW (decoupled decay), bias-corrected, in one pass."""
        lr_c, sqrt_bc2, _, decay = adam_coefficients(lr, float(beta1), float(beta2),
                                                     float(weight_decay), decoupled, step)
        return self.adam_update(p, g, m, v, lr_c, sqrt_bc2, decay, beta1, beta2, eps,
                                weight_decay, decoupled, scale)

    def adam_update(self, p, g, m, v, lr_c, sqrt_bc2, decay, beta1, beta2, eps, weight_decay,
                    decoupled, scale):
        """The update from the step's coefficients (``adam_coefficients``), in one pass: what
        ``adam`` and the inherited ``adam_values`` run."""
        checks.float_arrays(checks.NAMES_ADAM, p, g, m, v, scale)
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape or scale.size != 1:
            self._check_opt(p, g, scale, ("m", m), ("v", v))
        if scale[0] < 0:  # the skip factor (an overflowed fp16 step)
            return p
        l2 = 0.0 if decoupled else float(weight_decay)  # adam_coefficients' L2 term
        args = (p, g, m, v, float(lr_c), float(beta1), float(beta2), float(eps), l2, float(decay),
                float(sqrt_bc2), scale)
        if self.parallel and p.size >= self.par_cheap:
            _adam_parallel(*args, self.nchunks)
        else:
            _adam_serial(*args)
        return p

    @staticmethod
    def _check_opt(p, g, scale, *pairs):
        checks.check_same_shape("p", p, ("g", g), *(x for x in pairs if x is not None))
        checks.check_scale(scale)
