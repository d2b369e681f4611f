"""Mixed precision: which values are 16-bit and where (the policy), the rounding helpers, and the
dynamic loss scaler of fp16 (PyTorch ``GradScaler``'s rules, on the device).

``precision="fp32" | "bf16" | "fp16"`` on a model (float32 models only). The policy, as on a GPU
with autocast:

============================================  ==========================================
16 bits                                       float32
============================================  ==========================================
activations between layers (forward), their   parameters (master weights), gradients of the
gradients (backward), the model input         parameters, optimizer state, the update
GEMM inputs: X, the weight copy, Δ = dA⊙σ'    GEMM accumulation (tensor cores: 32-bit compute)
(Dense; Conv2d: X and the weight copy, its    softmax-CE and the other losses, BatchNorm and
Δ float32)                                    LayerNorm statistics, reductions (BP4's Σ),
                                              everything inside the float32 layers below
============================================  ==========================================

The forward reads a 16-bit copy of the parameters of the 16-bit layers (``PATHS``), made from the
master weights at every top-level forward pass, as torch's autocast casts the weights of every
forward: whatever wrote the master weights (an optimizer step, ``set_params``, a checkpoint load,
early stopping's restore), the copy follows. On the CPU the copy (and every 16-bit activation) is
a float32 array holding 16-bit values, rounded by ``round16`` (round to nearest even, as
``cvt.rn`` on the GPU): BLAS's sgemm needs float32 operands anyway, and a product of two 16-bit
values is exact in float32, so the float32 GEMM on rounded inputs is the tensor cores' 16x16->32
GEMM up to the order of the sums; a real 16-bit array would only add a widening pass before
every GEMM. This is an emulation of the GPU's numerics for tests, not a speed feature: every
16-bit mode is slower than fp32 on the CPU (one extra rounding pass per stored tensor).

On device="cuda" (a GPU, or the CUDA set in Numba's simulator) the Dense layers keep real 16-bit
device arrays instead (``native16_layers``, gpubackprop/layers/dense16.py): the copy is one flat
16-bit storage array (``storage_dtype``) cast once a step by one kernel, and the activations and
Δ between adjacent Dense layers of a chain (``link16``) are 16-bit storage; where a Dense meets
the loss or another layer its values are float32 arrays holding the same 16-bit numbers. The
values are the emulation's: every stored value is the float32 result rounded once.

Every layer must have a declared path (``PATHS``): "16-bit" (GEMMs on 16-bit inputs: Dense,
Conv2d), "elementwise" (loads and stores 16 bits, computes in float32: activations, pooling,
dropout, reshapes, Add/Concatenate), or "float32" (computes in float32 from the master weights,
its input and output 16-bit at the boundary: the normalisations, recurrent layers, attention,
embeddings). A layer without one is refused, naming it, rather than silently mis-rounded.

fp16 (5 exponent bits) underflows small gradients, so it trains with a dynamic loss scale: the
loss gradient is multiplied by S before the backward pass; the gradients are unscaled by one
fused pass that also flags any inf/NaN (``ops.unscale_check``); a flagged step leaves the
parameters and optimizer state as they were (``ops.loss_scale_gate`` sets the optimizer's
gradient factor to SKIP, on which every update kernel returns at once) and halves S; 2000 finite
steps in a row double it (``ops.loss_scale_update``). The scale, the growth tracker and the flag live in
one float32 device array (``LossScaler.state``): no host synchronisation anywhere in the step.
bf16 has float32's exponent range and needs no scaling.
"""

import numbers

import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_PRECISIONS = ("bf16", "fp16")

# Every layer type's path under a 16-bit precision (see the module docstring); by type name, so
# that a layer module needs no import of this one.
PATHS = {
    "Dense": "16-bit", "Conv2d": "16-bit",
    "Activation": "elementwise", "Flatten": "elementwise", "Reshape": "elementwise",
    "Dropout": "elementwise", "MaxPool2d": "elementwise", "AvgPool2d": "elementwise",
    "GlobalAvgPool2d": "elementwise", "Add": "elementwise", "Concatenate": "elementwise",
    "LastStep": "elementwise",
    "BatchNorm1d": "float32", "BatchNorm2d": "float32", "LayerNorm": "float32",
    "RNN": "float32", "LSTM": "float32", "GRU": "float32", "Embedding": "float32",
    "PositionalEmbedding": "float32", "MultiheadAttention": "float32",
    "TransformerEncoderLayer": "float32",
}

# The loss scaler's device state: one float32 array [scale, growth tracker, found-inf flag].
SCALE, TRACKER, FOUND_INF = 0, 1, 2
# The optimizer's gradient factor on an overflowed step: the update kernels skip on a negative one
# (a clip factor is in [0, 1], or NaN, which must still poison the parameters, not skip).
SKIP = -1.0


def check_precision(precision, dtype="float32"):
    """The precision name, checked: one of PRECISIONS, and a 16-bit one only on a float32 model."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and np.dtype(dtype) != np.float32:
        raise ValueError(f"precision: {precision!r} keeps float32 master weights, so it needs "
                         f"dtype='float32', got dtype={np.dtype(dtype).name!r}")
    return precision


def check_layers(leaves, precision):
    """Raise ValueError naming the first leaf layer that has no path under ``precision``."""
    if precision == "fp32":
        return
    for key, layer in leaves:
        if type(layer).__name__ not in PATHS:
            where = f"layers[{key.rstrip('.')}]" if key else "a layer"
            raise ValueError(f"precision: {where} {type(layer).__name__} has no declared "
                             f"{precision} path (16-bit, elementwise or float32 in "
                             f"gpubackprop.precision.PATHS); use precision='fp32'")


def weight_layers(leaves):
    """The leaves whose parameters the forward reads from the 16-bit copy (the GEMM layers)."""
    return [layer for _, layer in leaves if PATHS.get(type(layer).__name__) == "16-bit"]


def native16_layers(leaves):
    """The leaves that keep real 16-bit device arrays on device="cuda" (layers/dense16.py)."""
    return [layer for _, layer in leaves if type(layer).__name__ == "Dense"]


def link16(layers):
    """Mark the adjacent pairs of 16-bit Dense layers (``_native16``) in every chain among
    ``layers``: the upper hands the lower's output on in 16 bits (``_out16``), the lower its
    input gradient back in 16 bits (``_in16``); elsewhere they exchange float32 arrays."""
    for chain in layers:
        seq = getattr(chain, "layers", None)
        if type(chain).__name__ != "Sequential" or not isinstance(seq, list):
            continue
        for lower, upper in zip(seq, seq[1:], strict=False):
            if getattr(lower, "_native16", False) and getattr(upper, "_native16", False):
                lower._out16 = upper._in16 = True


def store16(be, A):
    """A (a float32 array, or a list of them; None passes) rounded in place to the model's 16-bit
    precision: a value the GPU stores in 16 bits (an activation, an activation's gradient). A
    16-bit storage array (Dense's on the CUDA set) is 16-bit already and passes as it is."""
    if be.precision == "fp32" or A is None:
        return A
    if not isinstance(A, list) and A.dtype.itemsize == 2:
        return A
    if isinstance(A, list):
        return [store16(be, a) for a in A]
    return be.ops.round16(A, be.precision, A)


# ---- rounding: the reference (NumPy and ml_dtypes, or CuPy's integer ops) ----------------------
def bfloat16_type():
    """ml_dtypes' bfloat16 (the NumPy dtype the reference rounds bf16 through)."""
    try:
        import ml_dtypes
    except ImportError as e:  # a dependency of the package; the message says what to install
        raise ImportError("precision='bf16' on NumPy needs ml_dtypes (pip install ml_dtypes)") from e
    return ml_dtypes.bfloat16


def bf16_bits(xp, X):
    """The bfloat16 bit patterns (uint16) of a float32 array, rounded to nearest even; NaN stays
    a quiet NaN. Integer xp code, so that it runs on NumPy and CuPy alike."""
    u = xp.ascontiguousarray(X, dtype=xp.float32).view(xp.uint32)
    rounded = (u + (xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1)))) >> 16
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    return xp.where(nan, (u >> 16) | xp.uint32(0x0040), rounded).astype(xp.uint16)


def bf16_values(xp, H):
    """float32 values of bfloat16 bit patterns (uint16): the bits shifted into the high half."""
    return (H.astype(xp.uint32) << 16).view(xp.float32)


def to_storage(xp, X, precision):
    """A float32 array as the GPU stores it: float16, or bfloat16 bits in uint16 (overflow to
    inf and NaN as cvt.rn gives them, without NumPy's warnings)."""
    if precision == "fp16":
        with np.errstate(over="ignore", invalid="ignore"):
            return X.astype(xp.float16)
    if precision == "bf16":
        if xp is np:
            with np.errstate(over="ignore", invalid="ignore"):
                return np.asarray(X, np.float32).astype(bfloat16_type()).view(np.uint16)
        return bf16_bits(xp, X)
    raise ValueError(f"precision: expected one of {LOW_PRECISIONS}, got {precision!r}")


def from_storage(xp, H, precision):
    """float32 values of a 16-bit storage array (float16, or bfloat16 bits in uint16)."""
    if precision == "fp16":
        return H.astype(xp.float32)
    if precision == "bf16":
        return bf16_values(xp, H)
    raise ValueError(f"precision: expected one of {LOW_PRECISIONS}, got {precision!r}")


def rounded(xp, X, precision):
    """X (float32) rounded to the nearest 16-bit value, as a new float32 array."""
    return from_storage(xp, to_storage(xp, X, precision), precision)


def storage_dtype(precision):
    """The NumPy dtype a 16-bit array of ``precision`` is stored in on the device."""
    return np.dtype(np.float16 if precision == "fp16" else np.uint16)


# ---- dynamic loss scaling (fp16) -----------------------------------------------------------------
class LossScaler:
    """PyTorch GradScaler's rules on the device: scale S (init 2^16), ×growth_factor after
    ``growth_interval`` finite steps in a row, ×backoff_factor and the step skipped on inf/NaN."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.init_scale = _positive(init_scale, "init_scale")
        self.growth_factor = _positive(growth_factor, "growth_factor")
        if self.growth_factor <= 1:
            raise ValueError(f"growth_factor: expected a number > 1, got {growth_factor!r}")
        self.backoff_factor = _positive(backoff_factor, "backoff_factor")
        if self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor: expected a number in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, numbers.Integral) \
                or not 1 <= growth_interval <= 1 << 24:
            # The tracker is a float32 on the device: exact up to 2^24.
            raise ValueError(f"growth_interval: expected an integer in [1, 2^24], got "
                             f"{growth_interval!r}")
        self.growth_interval = int(growth_interval)
        self.state = None  # the device array [scale, growth tracker, found-inf], made by attach

    def __repr__(self):
        return (f"LossScaler(init_scale={self.init_scale!r}, growth_factor={self.growth_factor!r}, "
                f"backoff_factor={self.backoff_factor!r}, growth_interval={self.growth_interval})")

    def config(self):
        return {"init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    def attach(self, be):
        """Make the device state on ``be``: scale = init_scale, tracker 0, no inf found."""
        self._be = be
        self.state = be.to_device(np.array([self.init_scale, 0.0, 0.0]), np.float32)

    # ---- one step: scale the loss gradient, unscale and check, gate the update, update S --------
    def scale_grad(self, dY):
        """dY *= S in place (the gradient of the scaled loss S·L), on the device."""
        dY *= self.state[SCALE:SCALE + 1]
        return dY

    def unscale(self, g):
        """g *= 1/S and the found-inf flag set if any entry of g is inf or NaN: one fused pass."""
        self._be.ops.unscale_check(g, self.state)

    def gate(self, factor, clipping):
        """The optimizer's gradient factor (its 1-element device array): SKIP where this step's
        gradients overflowed, else the clip factor it holds (``clipping``) or 1."""
        self._be.ops.loss_scale_gate(factor, self.state, clipping)

    def update(self):
        """GradScaler.update: back off and reset the tracker on inf/NaN, else count the step and
        grow after growth_interval; clears the flag for the next step."""
        self._be.ops.loss_scale_update(self.state, self.growth_factor, self.backoff_factor,
                                       self.growth_interval)

    # ---- host views (checkpoints, tests) -----------------------------------------------------------
    @property
    def scale(self):
        """The current scale as a host float (a device read)."""
        return float(self._be.to_host(self.state)[SCALE])

    def get_state(self):
        """{"loss_scale", "loss_scale_growth_tracker"} as host float32 0-d arrays."""
        h = np.array(self._be.to_host(self.state))
        return {"loss_scale": np.array(h[SCALE], np.float32),
                "loss_scale_growth_tracker": np.array(h[TRACKER], np.float32)}

    def check_state(self, scale, tracker):
        """(scale, tracker) as floats, checked: scale finite > 0, tracker an integer in range."""
        scale, tracker = np.asarray(scale, np.float64), np.asarray(tracker, np.float64)
        if scale.shape != () or not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"state['loss_scale']: expected a finite number > 0, got {scale!r}")
        if tracker.shape != () or not (tracker == np.floor(tracker)
                                       and 0 <= tracker < self.growth_interval):
            raise ValueError(f"state['loss_scale_growth_tracker']: expected an integer in [0, "
                             f"{self.growth_interval}), got {tracker!r}")
        return float(scale), float(tracker)

    def set_state(self, scale, tracker):
        """Restore get_state()'s values (the found-inf flag starts clear)."""
        scale, tracker = self.check_state(scale, tracker)
        self.state[...] = self._be.to_device(np.array([scale, tracker, 0.0]), np.float32)


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def make_scaler(loss_scaler, precision):
    """The model's LossScaler: ``loss_scaler`` (a LossScaler, a dict of its options, or None for
    GradScaler's defaults) under fp16; None otherwise (given one with bf16/fp32: an error)."""
    if precision != "fp16":
        if loss_scaler is not None:
            raise ValueError(f"loss_scaler: loss scaling is for precision='fp16', got "
                             f"precision={precision!r}")
        return None
    if loss_scaler is None:
        return LossScaler()
    if isinstance(loss_scaler, LossScaler):
        return LossScaler(**loss_scaler.config())  # a model's own (its state is the model's)
    if isinstance(loss_scaler, dict):
        return LossScaler(**loss_scaler)
    raise TypeError(f"loss_scaler: expected a gb.LossScaler, a dict of its options or None, got "
                    f"{type(loss_scaler).__name__}")
