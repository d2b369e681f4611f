"""Reference mixed-precision ops: rounding float32 to 16 bits, the 16-bit bias+activation forward
and σ' Hadamard backward (load/store 16 bits, compute in float32), and the loss scaler's fused
unscale + inf check and its update (PyTorch GradScaler's rules).

16-bit storage arrays are float16 (fp16) or uint16 holding bfloat16 bit patterns (bf16): NumPy and
CuPy have no bfloat16 arithmetic, and the GPU kernels only move the bits. The rounding is to
nearest even, as ``cvt.rn`` and ml_dtypes; ``gpubackprop.precision`` defines it (float16 casts,
ml_dtypes on NumPy, integer ops on CuPy).
"""

import numpy as np

from gpubackprop import precision as policy
from gpubackprop.kernels.reference.dense import DenseOps

SCALE, TRACKER, FOUND_INF = policy.SCALE, policy.TRACKER, policy.FOUND_INF
F32 = np.dtype(np.float32)


def check_precision_name(precision):
    if precision not in policy.LOW_PRECISIONS:
        raise ValueError(f"precision: expected one of {policy.LOW_PRECISIONS}, got {precision!r}")


def check_storage(name, H, precision, shape=None):
    """H must be a C-contiguous 16-bit storage array of ``precision`` (and ``shape``)."""
    check_precision_name(precision)
    want = policy.storage_dtype(precision)
    if getattr(H, "dtype", None) != want or not H.flags.c_contiguous:
        got = f"dtype {H.dtype}" if hasattr(H, "dtype") else type(H).__name__
        raise TypeError(f"{name}: expected a C-contiguous {want} array ({precision} storage), got "
                        f"{got}")
    if shape is not None and H.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(H.shape)}")


def check_f32(name, X, shape=None):
    if getattr(X, "dtype", None) != F32 or not X.flags.c_contiguous:
        got = f"dtype {X.dtype}" if hasattr(X, "dtype") else type(X).__name__
        raise TypeError(f"{name}: expected a C-contiguous float32 array, got {got}")
    if shape is not None and X.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(X.shape)}")


def check_scaler_state(state):
    check_f32("state", state)
    if state.shape != (3,):
        raise ValueError(f"state: expected the loss scaler's 3 values (scale, growth tracker, "
                         f"found-inf), got shape {tuple(state.shape)}")


class PrecisionOps:
    """Plain-xp mixed-precision ops (a mixin of ``ReferenceOps``: uses ``self.xp`` and the
    float32 dense ops)."""

    # ---- rounding and conversion ------------------------------------------------------------------
    def round16(self, X, precision, out=None):
        """out = X rounded to the nearest ``precision`` value, as float32 (out may be X)."""
        check_f32("X", X)
        check_precision_name(precision)
        out = X if out is None else out
        check_f32("out", out, X.shape)
        out[...] = policy.rounded(self.xp, X, precision)
        return out

    def cast16(self, X, H, precision):
        """H (16-bit storage) = X (float32) rounded to nearest even."""
        check_f32("X", X)
        check_storage("H", H, precision, X.shape)
        H[...] = policy.to_storage(self.xp, X, precision)
        return H

    def widen16(self, H, X, precision):
        """X (float32) = the values of H (16-bit storage), exactly."""
        check_storage("H", H, precision)
        check_f32("X", X, H.shape)
        X[...] = policy.from_storage(self.xp, H, precision)
        return X

    # ---- 16-bit forward and backward of an activation ---------------------------------------------
    def bias_act16(self, Z, b, activation, A, precision):
        """Z += b (float32, in place), then A (16-bit storage) = σ(Z) computed in float32; b is
        float32 or 16-bit storage (the model's 16-bit weight copy), added as its float32 value."""
        check_f32("Z", Z)
        check_storage("A", A, precision, Z.shape)
        if getattr(b, "dtype", None) == A.dtype:
            check_storage("b", b, precision, Z.shape[1:])
            b = policy.from_storage(self.xp, b, precision)
        check_f32("b", b, Z.shape[1:])
        A32 = self.xp.empty(Z.shape, F32)
        DenseOps.bias_act(self, Z, b, activation, A32)  # the reference's float32 op
        return self.cast16(A32, A, precision)

    def act_backward16(self, dA, saved, activation, dZ, precision):
        """dZ (16-bit) = dA ⊙ σ'(saved), dA and saved 16-bit (saved: A, or Z for the gelus), the
        product in float32, rounded once."""
        for name, H in (("dA", dA), ("saved", saved), ("dZ", dZ)):
            check_storage(name, H, precision, dA.shape)
        xp = self.xp
        a = policy.from_storage(xp, dA, precision)
        s = policy.from_storage(xp, saved, precision)
        d = xp.empty(dA.shape, F32)
        DenseOps.act_backward(self, a, s, activation, d)
        return self.cast16(d, dZ, precision)

    def bias_grad16(self, dZ, db, precision, accumulate=False):
        """BP4 on a 16-bit Δ: db (float32) (+)= Σ_rows dZ, dZ (rows, n) 16-bit storage, the
        values widened exactly and summed in float32."""
        check_storage("dZ", dZ, precision)
        if dZ.ndim != 2:
            raise ValueError(f"dZ: expected a 2-D (rows, n) array, got shape {tuple(dZ.shape)}")
        check_f32("db", db, dZ.shape[1:])
        return DenseOps.bias_grad(self, policy.from_storage(self.xp, dZ, precision), db,
                                  accumulate)

    # ---- dynamic loss scaling ---------------------------------------------------------------------
    def unscale_check(self, g, state):
        """g *= 1/state[SCALE]; state[FOUND_INF] = 1 where any entry of g (as it came in) is inf or
        NaN (left as it was otherwise): GradScaler's unscale_ with its check, on the device."""
        check_f32("g", g)
        check_scaler_state(state)
        xp = self.xp
        bad = ~xp.isfinite(g).all()
        inv = (xp.float32(1) / state[SCALE:SCALE + 1]).astype(F32)
        g *= inv
        state[FOUND_INF:FOUND_INF + 1] = xp.where(bad, xp.float32(1), state[FOUND_INF:FOUND_INF + 1])
        return g

    def loss_scale_gate(self, factor, state, clipping):
        """factor[0] (the optimizer's gradient factor) = SKIP (-1) where state's found-inf flag is
        set, else the clip factor it holds (``clipping``) or 1: the update kernels skip on SKIP."""
        if getattr(factor, "shape", None) != (1,) or factor.dtype.kind != "f":
            raise ValueError(f"factor: expected a 1-element float array, got {factor!r}")
        check_scaler_state(state)
        xp = self.xp
        keep = factor if clipping else xp.ones(1, factor.dtype)
        factor[...] = xp.where(state[FOUND_INF:FOUND_INF + 1] != 0, factor.dtype.type(policy.SKIP),
                               keep)
        return factor

    def loss_scale_update(self, state, growth_factor, backoff_factor, growth_interval):
        """GradScaler.update (torch's _amp_update_scale_) on the device, then the flag cleared:
        on inf/NaN scale *= backoff and tracker = 0; else tracker += 1 and, at growth_interval,
        scale *= growth (unless that overflows float32) and tracker = 0."""
        check_scaler_state(state)
        xp = self.xp
        scale, tracker = state[SCALE:SCALE + 1], state[TRACKER:TRACKER + 1]
        found = state[FOUND_INF:FOUND_INF + 1] != 0
        successful = tracker + xp.float32(1)
        grow = successful == xp.float32(growth_interval)
        with np.errstate(over="ignore"):  # a scale grown past float32: kept as it was (below)
            grown = scale * xp.float32(growth_factor)
        new_scale = xp.where(found, scale * xp.float32(backoff_factor),
                             xp.where(grow & xp.isfinite(grown), grown, scale))
        new_tracker = xp.where(found | grow, xp.float32(0), successful)
        state[SCALE:SCALE + 1] = new_scale
        state[TRACKER:TRACKER + 1] = new_tracker
        state[FOUND_INF:FOUND_INF + 1] = 0
        return state

