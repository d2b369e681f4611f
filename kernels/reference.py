"""Reference kernel set: every fused op written as the plain, unfused xp (NumPy/CuPy) expression.

This is the math in one place. The fused sets (``cpu.py``, ``cuda.py``) override these ops with
one-pass kernels and are tested against them. Every op works for float32 and float64 arrays and
writes into the ``out`` buffers it is given (the callers own and reuse them).

Conventions shared by all kernel sets:
- ``activation`` is one of ``ACTIVATIONS``; ``saved`` is what the forward pass kept for the
  backward pass: the output A for every activation except gelu, whose derivative needs Z.
- ``scale`` is a 1-element device array holding the gradient-clipping factor, so clipping needs
  no host synchronisation.
- ``labels`` is a 1-D integer device array already checked on the host to lie in [0, C).
"""

import math

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu")
LEAKY_SLOPE = 0.01  # PyTorch's default negative_slope
GELU_C = math.sqrt(2.0 / math.pi)  # GELU, tanh approximation (PyTorch approximate="tanh")
GELU_K = 0.044715


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


def saves_input(activation):
    """True when the activation's derivative needs Z (so A cannot overwrite Z in the forward)."""
    return activation == "gelu"


class ReferenceOps:
    """The unfused xp expressions; the baseline the fused sets are checked and benchmarked against."""

    name = "reference"

    def __init__(self, xp):
        self.xp = xp

    def __repr__(self):
        return f"{type(self).__name__}(xp={self.xp.__name__})"

    # ---- forward: Z = X Wᵀ + b; A = σ(Z) -------------------------------------------------------
    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z). A may be Z itself unless ``saves_input(activation)``."""
        xp = self.xp
        Z += b
        if activation == "identity":
            if A is not Z:
                A[...] = Z
        elif activation == "sigmoid":
            A[...] = self.sigmoid(Z)
        elif activation == "tanh":
            xp.tanh(Z, out=A)
        elif activation == "relu":
            xp.maximum(Z, 0, out=A)
        elif activation == "leaky_relu":
            A[...] = xp.where(Z > 0, Z, Z * Z.dtype.type(LEAKY_SLOPE))
        elif activation == "gelu":
            t = xp.tanh(GELU_C * (Z + GELU_K * Z**3))
            A[...] = 0.5 * Z * (1 + t)
        else:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        return A

    def sigmoid(self, Z):
        # Split at 0 so exp never overflows: for z >= 0 use 1/(1+e^-z), for z < 0 use e^z/(1+e^z).
        xp = self.xp
        e = xp.exp(-xp.abs(Z))
        return xp.where(Z >= 0, 1 / (1 + e), e / (1 + e)).astype(Z.dtype, copy=False)

    # ---- backward: dZ = dA ⊙ σ'(·) (the Hadamard product of BP1/BP2) ---------------------------
    def act_backward(self, dA, saved, activation, dZ):
        """dZ = dA ⊙ σ'(Z), with σ' computed from ``saved`` (A, or Z for gelu). dZ may be dA."""
        xp = self.xp
        if activation == "identity":
            g = dA
        elif activation == "sigmoid":
            g = dA * saved * (1 - saved)
        elif activation == "tanh":
            g = dA * (1 - saved * saved)
        elif activation == "relu":
            g = xp.where(saved > 0, dA, 0)
        elif activation == "leaky_relu":
            # A > 0 exactly when Z > 0 (the slope is positive), so A carries the sign we need.
            g = xp.where(saved > 0, dA, dA * dA.dtype.type(LEAKY_SLOPE))
        elif activation == "gelu":
            z = saved
            t = xp.tanh(GELU_C * (z + GELU_K * z**3))
            g = dA * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * GELU_C * (1 + 3 * GELU_K * z * z))
        else:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if g is not dZ:
            dZ[...] = g
        return dZ

    # ---- BP1 for softmax + cross-entropy --------------------------------------------------------
    def softmax_ce(self, logits, labels, dlogits, loss_rows):
        """Per-row loss logsumexp(z) − z[y] into ``loss_rows``; dlogits = (softmax(z) − onehot(y))/B."""
        xp = self.xp
        B = logits.shape[0]
        # Subtract the row max before exp (log-sum-exp) so exp never overflows.
        m = logits.max(axis=1, keepdims=True)
        e = xp.exp(logits - m)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(B)
        loss_rows[...] = (xp.log(s) + m)[:, 0] - logits[rows, labels]
        dlogits[...] = e / s
        dlogits[rows, labels] -= 1
        dlogits /= B
        return dlogits, loss_rows

    # ---- BP4: bias gradient ----------------------------------------------------------------------
    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ, a deterministic column sum."""
        if accumulate:
            db += dZ.sum(axis=0)
        else:
            dZ.sum(axis=0, out=db)
        return db

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

    def sgd(self, p, g, buf, lr, momentum, nesterov, weight_decay, scale):
        """torch.optim.SGD without dampening; ``buf`` is the momentum buffer (unused if momentum=0)."""
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
        xp = self.xp
        d = g * scale
        if weight_decay and decoupled:
            p *= 1 - lr * weight_decay
        elif weight_decay:
            d = d + weight_decay * p
        m *= beta1
        m += (1 - beta1) * d
        v *= beta2
        v += (1 - beta2) * d * d
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        p -= (lr / bc1) * m / (xp.sqrt(v) / math.sqrt(bc2) + eps)
        return p
