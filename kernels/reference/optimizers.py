"""Reference optimizer ops over the flat parameter buffer: global norm, clipping, SGD, RMSprop, Adam."""

import math

from gpubackprop.step_values import SLOT

LR, LR_C, SQRT_BC2, DECAY = SLOT["lr"], SLOT["lr_c"], SLOT["sqrt_bc2"], SLOT["decay"]

def adam_coefficients(lr, beta1, beta2, weight_decay, decoupled, step):
    """The per-step scalars a fused Adam kernel takes, computed in float64 as the reference does.

    Returns (lr / (1 − β1^t), √(1 − β2^t), the L2 decay added to g, the factor 1 − lr·wd that
    AdamW's decoupled decay multiplies p by).
    """
    lr_c = lr / (1 - beta1**step)
    sqrt_bc2 = math.sqrt(1 - beta2**step)
    if weight_decay and decoupled:
        return lr_c, sqrt_bc2, 0.0, 1 - lr * weight_decay
    return lr_c, sqrt_bc2, weight_decay, 1.0


class OptimizerOps:
    """Plain-xp optimizer updates (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    # ---- optimizer updates over the flat parameter buffer ---------------------------------------
    def sq_norm(self, g):
        """‖g‖² as a 1-element device array (stays on the device; no host read)."""
        return self.xp.dot(g, g).reshape(1)

    def clip_scale(self, g, clip_norm, scale):
        """scale[0] = min(1, clip_norm / (‖g‖₂ + 1e-6)), on the device."""
        xp = self.xp
        norm = xp.sqrt(self.sq_norm(g))
        scale[...] = xp.minimum(1, clip_norm / (norm + 1e-6))
        return scale

    def skips(self, scale):
        """True when ``scale[0]`` is the skip factor (< 0: an fp16 step whose gradients overflowed,
        ``loss_scale_gate``): the update leaves parameters and buffers as they are. A host read
        here, as the reference's ``*_values`` ops read theirs; the fused sets check without one."""
        return bool(scale.reshape(-1)[0] < 0)

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening; ``buf`` is the momentum buffer (unused if momentum=0)."""
        if self.skips(scale):
            return p
        d = g * scale
        if weight_decay:
            d = d + weight_decay * p
        if momentum:
            buf *= momentum
            buf += d
            d = d + momentum * buf if nesterov else buf
        p -= lr * d
        return p

    def rmsprop(self, p, g, square_avg, buf, lr, alpha, eps, weight_decay, momentum, scale):
        """torch.optim.RMSprop (not centered): eps outside the square root."""
        if self.skips(scale):
            return p
        xp = self.xp
        d = g * scale
        if weight_decay:
            d = d + weight_decay * p
        square_avg *= alpha
        square_avg += (1 - alpha) * d * d
        step = d / (xp.sqrt(square_avg) + eps)
        if momentum:
            buf *= momentum
            buf += step
            step = buf
        p -= lr * step
        return p

    def adam(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step, scale):
        """torch.optim.Adam (L2 decay added to g) or AdamW (decoupled decay), bias-corrected."""
        lr_c, sqrt_bc2, _, decay = adam_coefficients(lr, beta1, beta2, weight_decay, decoupled, step)
        return self.adam_update(p, g, m, v, lr_c, sqrt_bc2, decay, beta1, beta2, eps, weight_decay,
                          decoupled, scale)

    def adam_update(self, p, g, m, v, lr_c, sqrt_bc2, decay, beta1, beta2, eps, weight_decay,
                    decoupled, scale):
        """The Adam/AdamW update from the step's coefficients (``adam_coefficients``): what
        ``adam`` and ``adam_values`` run (each kernel set its own)."""
        if self.skips(scale):
            return p
        xp = self.xp
        d = g * scale
        if weight_decay and decoupled:
            p *= decay
        elif weight_decay:
            d = d + weight_decay * p
        m *= beta1
        m += (1 - beta1) * d
        v *= beta2
        v += (1 - beta2) * d * d
        p -= lr_c * m / (xp.sqrt(v) / sqrt_bc2 + eps)
        return p

    # ---- the same updates with the per-step values read from a device array ----------------------
    # ``values`` is ``StepValues.values`` (float64, slots ``gpubackprop.step_values.SLOT``), what a
    # captured CUDA graph's kernels read instead of host scalars. Here (and in the fused CPU set,
    # which inherits these) the values are read on the host and the host-scalar op runs: the same
    # float64 numbers, so the same bits; the CUDA set reads them in the kernel.
    def step_advance(self, table, counter, values):
        """values[:k] = table[counter[0]] (k = table columns); counter += 1, on the device. Past
        the table's end the last row repeats."""
        xp = self.xp
        values[:table.shape[1]] = xp.take(table, counter, axis=0, mode="clip")[0]
        counter += 1
        return values

    def sgd_values(self, p, g, buf, values, momentum, nesterov, weight_decay, scale):
        """``sgd`` with lr from ``values[SLOT["lr"]]``."""
        return self.sgd(p, g, buf, float(values[LR]), momentum, nesterov, weight_decay, scale)

    def rmsprop_values(self, p, g, square_avg, buf, values, alpha, eps, weight_decay, momentum,
                       scale):
        """``rmsprop`` with lr from ``values[SLOT["lr"]]``."""
        return self.rmsprop(p, g, square_avg, buf, float(values[LR]), alpha, eps, weight_decay,
                            momentum, scale)

    def adam_values(self, p, g, m, v, values, beta1, beta2, eps, weight_decay, decoupled, scale):
        """``adam`` with lr/(1 − β1^t), √(1 − β2^t) and 1 − lr·wd from ``values`` (the step's
        ``adam_coefficients``); the plain-xp expressions, fed the same float64 numbers."""
        lr_c, sqrt_bc2, decay = (float(values[i]) for i in (LR_C, SQRT_BC2, DECAY))
        return self.adam_update(p, g, m, v, lr_c, sqrt_bc2, decay, beta1, beta2, eps, weight_decay,
                          decoupled, scale)
