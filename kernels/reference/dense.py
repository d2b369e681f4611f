"""Reference dense-layer ops: bias + activation forward (and the activation alone), the σ' Hadamard
product, the bias gradient."""

import contextlib
import math

# Appended only: the fused sets number the activations by their position here.
ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu", "gelu_tanh")
LEAKY_SLOPE = 0.01  # PyTorch's default negative_slope
# gelu is PyTorch's exact GELU, z·Φ(z) = 0.5·z·erfc(-z/√2); gelu_tanh its approximate="tanh".
GELU_C = math.sqrt(2.0 / math.pi)  # gelu_tanh: 0.5·z·(1 + tanh(GELU_C·(z + GELU_K·z³)))
GELU_K = 0.044715
SQRT1_2 = math.sqrt(0.5)  # gelu: Φ(z) = 0.5·erfc(-z·SQRT1_2)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # gelu': Φ(z) + z·φ(z), φ(z) = INV_SQRT_2PI·e^(-z²/2)
# erfc(x) for x >= 0 as t·exp(-x² + Chebyshev series in 4t - 2), t = 2/(2 + x) (Numerical
# Recipes, 3rd ed., 6.2.2: relative error under 1.2e-16 for every x >= 0). NumPy has no erf, and
# this is plain xp arithmetic, on NumPy and CuPy alike.
ERFC_CHEB = (-1.3026537197817094, 6.4196979235649026e-1, 1.9476473204185836e-2,
             -9.561514786808631e-3, -9.46595344482036e-4, 3.66839497852761e-4, 4.2523324806907e-5,
             -2.0278578112534e-5, -1.624290004647e-6, 1.303655835580e-6, 1.5626441722e-8,
             -8.5238095915e-8, 6.529054439e-9, 5.059343495e-9, -9.91364156e-10, -2.27365122e-10,
             9.6467911e-11, 2.394038e-12, -6.886027e-12, 8.94487e-13, 3.13092e-13, -1.12708e-13,
             3.81e-16, 7.106e-15, -1.523e-15, -9.4e-17, 1.21e-16, -2.8e-17)


def saves_input(activation):
    """True when the activation's derivative needs Z (so A cannot overwrite Z in the forward)."""
    return activation in ("gelu", "gelu_tanh")


def erfc(xp, x):
    """erfc(x) element by element, in float64 (x any float array)."""
    x = x.astype(xp.float64)
    z = xp.abs(x)
    t = 2.0 / (2.0 + z)
    ty = 4.0 * t - 2.0
    d = dd = 0.0
    for c in ERFC_CHEB[:0:-1]:  # Clenshaw's recurrence, the highest coefficient first
        d, dd = ty * d - dd + c, d
    r = t * xp.exp(-z * z + 0.5 * (ERFC_CHEB[0] + ty * d) - dd)
    return xp.where(x >= 0, r, 2.0 - r)


def normal_cdf(xp, Z):
    """Φ(Z) = 0.5·erfc(-Z/√2), in Z's dtype: erfc keeps Φ's relative accuracy in the left tail,
    where 1 + erf(z/√2) would cancel."""
    return (0.5 * erfc(xp, -Z * Z.dtype.type(SQRT1_2))).astype(Z.dtype, copy=False)


class DenseOps:
    """Plain-xp dense-layer ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    def dense_gemm_threads(self, macs):
        """The context Dense runs a GEMM of ``macs`` multiply-adds in: here BLAS's threads as they
        are."""
        return contextlib.nullcontext()

    # ---- forward: Z = X Wᵀ + b; A = σ(Z) -------------------------------------------------------
    def bias_act(self, Z, b, activation, A):
        """Z += b (in place), then A = σ(Z). A may be Z itself unless ``saves_input(activation)``."""
        Z += b
        return DenseOps.activation(self, Z, activation, A)  # the reference's, in a fused set too

    def activation(self, X, activation, A):
        """A = σ(X) element by element, any shape (X is not written). A may be X itself."""
        xp = self.xp
        if activation == "identity":
            if A is not X:
                A[...] = X
        elif activation == "sigmoid":
            A[...] = self.sigmoid(X)
        elif activation == "tanh":
            xp.tanh(X, out=A)
        elif activation == "relu":
            xp.maximum(X, 0, out=A)
        elif activation == "leaky_relu":
            A[...] = xp.where(X > 0, X, X * X.dtype.type(LEAKY_SLOPE))
        elif activation == "gelu":
            A[...] = X * normal_cdf(xp, X)
        elif activation == "gelu_tanh":
            t = xp.tanh(GELU_C * (X + GELU_K * X**3))
            A[...] = 0.5 * X * (1 + t)
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
        """dZ = dA ⊙ σ'(Z), with σ' computed from ``saved`` (A, or Z for both gelus). dZ may be dA."""
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
            pdf = z.dtype.type(INV_SQRT_2PI) * xp.exp(-0.5 * z * z)
            g = dA * (normal_cdf(xp, z) + z * pdf)
        elif activation == "gelu_tanh":
            z = saved
            t = xp.tanh(GELU_C * (z + GELU_K * z**3))
            g = dA * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * GELU_C * (1 + 3 * GELU_K * z * z))
        else:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if g is not dZ:
            dZ[...] = g
        return dZ

    # ---- BP4: bias gradient ----------------------------------------------------------------------
    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ, a deterministic column sum."""
        if accumulate:
            db += dZ.sum(axis=0)
        else:
            dZ.sum(axis=0, out=db)
        return db
