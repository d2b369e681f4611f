"""Where a training step's time goes, for any network: every layer's forward and backward pass
clocked (its own time, its sublayers' taken out), and inside convolutions and recurrent layers
their im2col, col2im, GEMM and time-loop calls, from an instrumented run of real steps.

Categories (``SPLIT_CATEGORIES``, in report order): the conv layers' im2col, GEMMs (forward,
weight and input gradient) and col2im, and "conv other" (bias+activation, its derivative, the bias
gradient, the weight gradient's sum over a chunk, copies); batch norm; activation (Activation
layers after a norm or a sum); pooling (max, average, global average); residual add; the recurrent
layers' GEMMs, time loops (each step's GEMM and cell, forward and backward, in one op) and
"recurrent other" (input bias, bias gradients, copies); the attention's GEMMs (projections,
scores, values, out_proj, their gradients), its masked softmax forward and backward and
"attention other" (bias adds, bias gradients, the scaled query weights, masks); inside a
transformer encoder layer each part is clocked as its own kind and the layer's own time (its
residual sums) counts as "residual add"; dense layers (their GEMMs, bias and activation); and
"rest": loss, optimizer, reshapes and Python between the layers.
"""

import time

from gpubackprop.benchmark.timing import no_sync, sync_for

SPLIT_CATEGORIES = ("im2col", "conv GEMM", "col2im", "conv other", "batch norm", "layer norm",
                    "activation", "pooling", "residual add", "recurrent GEMM",
                    "recurrent time loop", "recurrent other", "attention GEMM", "softmax",
                    "attention other", "dense", "dropout", "rest")
# The time-loop ops run each step's GEMM and cell inside one call (kernels/*/recurrent.py); the
# GEMMs over all steps are the rows_gemm and weight_gemm ops.
_RECURRENT_OPS = {"matmul": "recurrent GEMM", "rows_gemm": "recurrent GEMM",
                  "weight_gemm": "recurrent GEMM",
                  **{f"{m}_{d}_steps": "recurrent time loop" for m in ("rnn", "lstm", "gru")
                     for d in ("forward", "backward")}}
# layer kind: (category of its own time, {op name: category of that op's calls inside it})
LAYER_CATEGORIES = {
    "Conv2d": ("conv other", {"im2col": "im2col", "col2im": "col2im", "matmul": "conv GEMM"}),
    "BatchNorm1d": ("batch norm", {}), "BatchNorm2d": ("batch norm", {}),
    "LayerNorm": ("layer norm", {}), "Activation": ("activation", {}),
    "MaxPool2d": ("pooling", {}), "AvgPool2d": ("pooling", {}), "GlobalAvgPool2d": ("pooling", {}),
    "Residual": ("residual add", {}), "Dense": ("dense", {}), "Dropout": ("dropout", {}),
    "RNN": ("recurrent other", _RECURRENT_OPS), "LSTM": ("recurrent other", _RECURRENT_OPS),
    "GRU": ("recurrent other", _RECURRENT_OPS),
    "MultiheadAttention": ("attention other", {"matmul": "attention GEMM",
                                               "masked_softmax": "softmax",
                                               "masked_softmax_backward": "softmax"}),
    # an encoder layer's own time: its residual sums and the glue between its parts (each clocked)
    "TransformerEncoderLayer": ("residual add", {}),
}
_CLOCKED_OPS = {name for _, ops in LAYER_CATEGORIES.values() for name in ops}


class _Clock:
    """Exclusive times by category: a region's time less the time of the regions inside it."""

    def __init__(self, sync):
        self.sync, self.totals, self.stack = sync, {}, []  # stack: [kind, time of inner regions]

    def run(self, kind, category, fn, *args, **kwargs):
        self.sync()
        self.stack.append([kind, 0.0])
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            self.sync()
        finally:
            elapsed = time.perf_counter() - t0
            _, inner = self.stack.pop()
            self.totals[category] = self.totals.get(category, 0.0) + elapsed - inner
            if self.stack:
                self.stack[-1][1] += elapsed
        return out

    def op_category(self, name):
        """The category of op ``name`` called inside the current layer, or None (not clocked)."""
        if not self.stack:
            return None
        kind = self.stack[-1][0]
        return LAYER_CATEGORIES.get(kind, (None, {}))[1].get(name)


class _TimedOps:
    """Stands in for a backend's kernel set or array module: clocks the calls ``_Clock`` names."""

    def __init__(self, inner, clock):
        self._inner, self._clock = inner, clock

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in _CLOCKED_OPS:
            return attr
        return _timed_call(attr, name, self._clock)


def _timed_call(fn, name, clock):
    """``fn`` clocked as op ``name`` in the category the current layer gives it (if any)."""
    def timed(*args, **kwargs):
        category = clock.op_category(name)
        if category is None:
            return fn(*args, **kwargs)
        return clock.run(None, category, fn, *args, **kwargs)
    return timed


def _layers(layer):
    """Every layer in the tree under ``layer`` except the Sequential containers themselves."""
    from gpubackprop.layers import Residual, Sequential

    if isinstance(layer, Sequential):
        for sub in layer.layers:
            yield from _layers(sub)
    elif isinstance(layer, Residual):
        yield layer
        yield from _layers(layer.block)
    elif hasattr(layer, "parts"):  # a leaf that owns layers (TransformerEncoderLayer)
        yield layer
        yield from layer.parts()
    else:
        yield layer


def _timed_forward(layer, clock):
    kind = type(layer).__name__
    category = LAYER_CATEGORIES.get(kind, ("rest", {}))[0]
    forward = layer.forward

    def timed_forward(*args, **kwargs):
        Y, backprop = clock.run(kind, category, forward, *args, **kwargs)

        def timed_backprop(*a, **k):
            return clock.run(kind, category, backprop, *a, **k)
        return Y, timed_backprop
    return timed_forward


def categories_of(model):
    """The split's categories for this model (its layer kinds'), in report order, "rest" last."""
    present = {LAYER_CATEGORIES.get(type(layer).__name__, ("rest", {}))[0] for layer in _layers(model)}
    for layer in _layers(model):
        present.update(LAYER_CATEGORIES.get(type(layer).__name__, (None, {}))[1].values())
    return [c for c in SPLIT_CATEGORIES if c in present or c == "rest"]


def step_time_split(contender, steps=20):
    """{category: seconds per step} of a network contender (one with ``.model``), from ``steps``
    real steps with every layer's passes and the listed kernel calls clocked; "rest" is the
    instrumented step's time less the rest. The model is restored afterwards."""
    model = contender.model
    be = model.backend
    contender.step()
    contender.sync()
    sync = sync_for(be.device) or no_sync  # not be.synchronize: it looks at be.xp
    clock = _Clock(sync)
    layers = list(_layers(model))
    ops, xp, matmul = be.ops, be.xp, be.matmul
    for layer in layers:
        layer.forward = _timed_forward(layer, clock)  # an instance attribute over the method
    # the layers' GEMMs go through be.matmul (xp.matmul, or cuBLAS in a CUDA graph run)
    be.ops, be.xp = _TimedOps(ops, clock), _TimedOps(xp, clock)
    be.matmul = _timed_call(matmul, "matmul", clock)
    try:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            contender.step()
        sync()
        total = time.perf_counter() - t0
    finally:
        be.ops, be.xp, be.matmul = ops, xp, matmul
        for layer in layers:
            del layer.forward
    out = {c: clock.totals.get(c, 0.0) / steps for c in categories_of(model)}
    out["rest"] = max(0.0, total / steps - sum(v for c, v in out.items() if c != "rest"))
    return out
