"""Reference dense-layer ops: bias + activation forward, the σ' Hadamard product, the bias gradient."""

import math

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu")
LEAKY_SLOPE = 0.01  # PyTorch's default negative_slope
GELU_C = math.sqrt(2.0 / math.pi)  # GELU, tanh approximation (PyTorch approximate="tanh")
GELU_K = 0.044715


def saves_input(activation):
    """True when the activation's derivative needs Z (so A cannot overwrite Z in the forward)."""
    return activation == "gelu"


class DenseOps:
    """Plain-xp dense-layer ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

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

    # ---- BP4: bias gradient ----------------------------------------------------------------------
    def bias_grad(self, dZ, db, accumulate=False):
        """db (+)= Σ_rows dZ, a deterministic column sum."""
        if accumulate:
            db += dZ.sum(axis=0)
        else:
            dZ.sum(axis=0, out=db)
        return db
