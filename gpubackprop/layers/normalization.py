"""Normalization layers: ``BatchNorm1d``, ``BatchNorm2d`` and ``LayerNorm``, PyTorch's semantics.

Batch norm, per channel c over the batch (and the length or the image plane):
    training   Y = (X − μ_B)/√(σ²_B + eps)·γ + β with the batch mean μ_B and biased variance σ²_B;
               running_mean ← (1 − m)·running_mean + m·μ_B,
               running_var  ← (1 − m)·running_var + m·σ²_B·M/(M − 1)   (unbiased, M values)
    inference  Y = (X − running_mean)/√(running_var + eps)·γ + β
Layer norm normalises each sample over its last ``len(normalized_shape)`` dimensions, in both
modes, with γ and β of ``normalized_shape``.

The arithmetic is in the backend's ops (``batch_norm_train``/``_eval``/``_backward``,
``layer_norm``/``_backward``: a reduction kernel and an elementwise one each); the forward keeps
the per-group mean and 1/√(σ² + eps) for the backward.

``BatchNorm1d/2d(activation=...)``: A = σ(Y) after the normalization, as BatchNorm then
``Activation`` (the spec's ``bn-relu`` makes one such layer, as ``conv-relu`` does for Conv2d).
A kernel set whose batch norm ops apply σ themselves lists it in ``batch_norm_activations`` (the
fused CPU set: relu, in BN's normalize pass forward and as the mask inside its backward passes);
otherwise the layer composes batch_norm_train then ``ops.activation``, and ``act_backward`` then
batch_norm_backward (the reference set, CUDA), the same values.
"""

import math
import numbers

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS, saves_input
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop, shape_tuple, size_of
from gpubackprop.layers.registry import SpecToken, register
from gpubackprop.validation import check_choice, positive_int


def _eps(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {value!r}")
    return float(value)


def _contiguous(xp, a):
    return a if a.flags.c_contiguous else xp.ascontiguousarray(a)


class _NormWorkspace:
    """Buffers a normalization layer reuses for one batch size: Y, dX and the saved statistics."""

    __slots__ = ("Y", "A", "dX", "mean", "invstd", "var")

    def __init__(self, be, shape, groups, separate_A=False):
        self.Y = be.empty(shape)
        # A = σ(Y), the layer's output: Y itself unless σ' is computed from Y (the gelus)
        self.A = be.empty(shape) if separate_A else self.Y
        self.dX = be.empty(shape)
        self.mean = be.empty((groups,))
        self.invstd = be.empty((groups,))
        self.var = be.empty((groups,))


class _BatchNorm(Layer):
    """What BatchNorm1d and BatchNorm2d share: all but the accepted input shapes."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, activation="identity"):
        self.num_features = positive_int(num_features, "num_features")
        self.eps = _eps(eps)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
                or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1] (PyTorch's convention: "
                             f"running = (1 − momentum)·running + momentum·batch), got "
                             f"{momentum!r}")
        self.momentum = float(momentum)
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        self._workspaces = {}

    def __repr__(self):
        args = [str(self.num_features)]
        if self.eps != 1e-5:
            args.append(f"eps={self.eps!r}")
        if self.momentum != 0.1:
            args.append(f"momentum={self.momentum!r}")
        if self.activation != "identity":
            args.append(f"activation={self.activation!r}")
        return f"{type(self).__name__}({', '.join(args)})"

    # ---- declaring --------------------------------------------------------------------------------
    def _check_channels(self, input_shape):
        if input_shape[0] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (features), got "
                             f"{input_shape[0]} (input shape {fmt_shape(input_shape)})")

    def param_specs(self):
        return [("weight", (self.num_features,)), ("bias", (self.num_features,))]

    def state_specs(self):
        C = self.num_features
        return [("running_mean", (C,), None), ("running_var", (C,), None),
                ("num_batches_tracked", (), "int64")]

    def initial_params(self, rng):
        return {"weight": np.ones(self.num_features), "bias": np.zeros(self.num_features)}

    def initial_state(self):
        C = self.num_features
        return {"running_mean": np.zeros(C), "running_var": np.ones(C),
                "num_batches_tracked": np.zeros((), np.int64)}

    def config(self):
        # No "activation" key for identity: such a layer's checkpoint is what it was before.
        extra = {} if self.activation == "identity" else {"activation": self.activation}
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                **extra}

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        ops, p, st = be.ops, self.params, self.state
        weight, bias = p["weight"], p["bias"]
        act = self.activation
        # σ inside the batch norm ops (act_kw), or composed here with ops.activation/act_backward.
        fused = act == "identity" or act in getattr(ops, "batch_norm_activations", ())
        act_kw = {"activation": act} if act != "identity" and fused else {}
        if not train:
            Y = be.empty(X.shape)
            ops.batch_norm_eval(X, weight, bias, st["running_mean"], st["running_var"], self.eps, Y,
                                **act_kw)
            if not fused:
                ops.activation(Y, act, Y)
            return Y, no_backprop
        M = X.size // self.num_features  # values per channel: N·L
        if M < 2:
            raise ValueError(f"{self!r} input: expected more than 1 value per channel when "
                             f"training (as PyTorch), got input shape {tuple(X.shape)}")
        ws = self.workspace(X.shape[0], lambda: _NormWorkspace(be, X.shape, self.num_features,
                                                               saves_input(act)))
        ops.batch_norm_train(X, weight, bias, self.eps, ws.Y, ws.mean, ws.invstd, **act_kw)
        if not fused:  # A = σ(Y): in place, or (σ' from Y: the gelus) into a buffer of its own
            ops.activation(ws.Y, act, ws.A)
        self._update_running(ws, M)
        grads = self.grads
        bwd_kw = {**act_kw, "beta": bias} if act_kw else {}  # the ReLU's mask: from X, γ, β

        def backprop(dA):
            accumulate = self.take_accumulate()
            dA = _contiguous(be.xp, dA)
            if not fused:  # dZ into dX's buffer, then the batch norm backward in place
                dA = ops.act_backward(dA, ws.Y if saves_input(act) else ws.A, act, ws.dX)
            ops.batch_norm_backward(dA, X, weight, ws.mean, ws.invstd, ws.dX, grads["weight"],
                                    grads["bias"], accumulate=accumulate, **bwd_kw)
            return ws.dX if input_grad else None

        return ws.A, backprop

    def _update_running(self, ws, M):
        """running ← (1 − m)·running + m·batch, the variance unbiased (× M/(M − 1)); on the device.

        The batch variance is recovered from the saved 1/√(σ² + eps) as 1/invstd² − eps (clamped at
        0 against rounding), so the forward needs no second statistics pass.
        """
        xp, st, m = self.backend.xp, self.state, self.momentum
        var = ws.var
        xp.multiply(ws.invstd, ws.invstd, out=var)
        xp.reciprocal(var, out=var)
        var -= self.eps
        xp.maximum(var, 0, out=var)
        var *= m * M / (M - 1)
        rv, rm = st["running_var"], st["running_mean"]
        rv *= 1 - m
        rv += var
        rm *= 1 - m
        xp.multiply(ws.mean, m, out=var)
        rm += var
        st["num_batches_tracked"] += 1


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) inputs, as torch.nn.BatchNorm1d.

    Params "weight" (γ, ones) and "bias" (β, zeros), (C,); states "running_mean" (zeros),
    "running_var" (ones) and "num_batches_tracked". ``momentum`` follows PyTorch's convention.
    """

    def infer_shape(self, input_shape):
        if len(input_shape) not in (1, 2):
            raise ValueError(f"expected a per-sample input of shape (C,) or (C, L) with C = "
                             f"{self.num_features}, got shape {fmt_shape(input_shape)}")
        self._check_channels(input_shape)
        return input_shape


class BatchNorm2d(_BatchNorm):
    """Batch normalization of NCHW images per channel over (N, H, W), as torch.nn.BatchNorm2d.

    Params "weight" and "bias" (C,); states "running_mean", "running_var", "num_batches_tracked".
    """

    def infer_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"expected a per-sample input of shape (C, H, W) with C = "
                             f"{self.num_features}, got shape {fmt_shape(input_shape)}")
        self._check_channels(input_shape)
        return input_shape


class LayerNorm(Layer):
    """Normalizes each sample over its last dimensions (``normalized_shape``), as torch.nn.LayerNorm
    with elementwise_affine=True: params "weight" (ones) and "bias" (zeros) of ``normalized_shape``."""

    def __init__(self, normalized_shape, eps=1e-5):
        self.normalized_shape = shape_tuple(normalized_shape, "normalized_shape")
        self.eps = _eps(eps)
        self._D = size_of(self.normalized_shape)
        self._workspaces = {}

    def __repr__(self):
        shape = self.normalized_shape
        args = [str(shape[0]) if len(shape) == 1 else str(shape)]
        if self.eps != 1e-5:
            args.append(f"eps={self.eps!r}")
        return f"LayerNorm({', '.join(args)})"

    @property
    def input_shape_hint(self):
        return self.normalized_shape

    def infer_shape(self, input_shape):
        k = len(self.normalized_shape)
        if len(input_shape) < k or tuple(input_shape[len(input_shape) - k:]) \
                != self.normalized_shape:
            raise ValueError(f"expected a per-sample input whose last dimensions are "
                             f"{fmt_shape(self.normalized_shape)}, got shape "
                             f"{fmt_shape(input_shape)}")
        return input_shape

    def param_specs(self):
        return [("weight", self.normalized_shape), ("bias", self.normalized_shape)]

    def initial_params(self, rng):
        return {"weight": np.ones(self.normalized_shape), "bias": np.zeros(self.normalized_shape)}

    def config(self):
        return {"normalized_shape": list(self.normalized_shape), "eps": self.eps}

    def attach(self, backend, params, grads, state, context, index):
        super().attach(backend, params, grads, state, context, index)
        D = self._D
        # (D,) views of the flat buffers: the ops see one row of D features.
        self._weight, self._bias = params["weight"].reshape(D), params["bias"].reshape(D)
        self._dweight, self._dbias = grads["weight"].reshape(D), grads["bias"].reshape(D)

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        ops, D = be.ops, self._D
        rows = X.size // D
        X2 = X.reshape(rows, D)
        if not train:
            Y = be.empty(X.shape)
            ops.layer_norm(X2, self._weight, self._bias, self.eps, Y.reshape(rows, D),
                           be.empty((rows,)), be.empty((rows,)))
            return Y, no_backprop
        ws = self.workspace(X.shape[0], lambda: _NormWorkspace(be, X.shape, rows))
        ops.layer_norm(X2, self._weight, self._bias, self.eps, ws.Y.reshape(rows, D), ws.mean,
                       ws.invstd)

        def backprop(dY):
            accumulate = self.take_accumulate()
            ops.layer_norm_backward(_contiguous(be.xp, dY).reshape(rows, D), X2, self._weight,
                                    ws.mean, ws.invstd, ws.dX.reshape(rows, D), self._dweight,
                                    self._dbias, accumulate=accumulate)
            return ws.dX if input_grad else None

        return ws.Y, backprop


# ---- registry declarations ------------------------------------------------------------------
def _make_bn(ctx):  # BatchNorm2d on images, BatchNorm1d on vectors and sequences
    kind = "BatchNorm2d" if len(ctx.shape) == 3 else "BatchNorm1d"
    return [(kind, {"num_features": ctx.shape[0], "eps": ctx.params["eps"],
                    "momentum": ctx.params["momentum"], "activation": ctx.activation})]


def _make_ln(ctx):  # over the whole sample
    shape = ctx.shape
    return [("LayerNorm", {"normalized_shape": shape[0] if len(shape) == 1 else tuple(shape),
                           "eps": ctx.params["eps"]})]


register(BatchNorm1d, SpecToken("bn", _make_bn, {"eps": ("eps", 1e-5), "momentum": ("unit", 0.1)},
                                fuses_activation=True,
                                help="bn(eps=1e-5,momentum=0.1)   batch norm (2d on images)"))
register(BatchNorm2d)
register(LayerNorm, SpecToken("ln", _make_ln, {"eps": ("eps", 1e-5)},
                              help="ln(eps=1e-5)  layer norm over the whole sample"))
