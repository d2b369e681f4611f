"""Where a training step's time goes, for any network: every layer's forward and backward pass
clocked (its own time, its sublayers' taken out), and inside convolutions and recurrent layers
their im2col, col2im, GEMM and time-loop calls, from an instrumented run of real steps.

Categories (``SPLIT_CATEGORIES``, in report order): the conv layers' im2col, GEMMs (forward,
weight and input gradient) and col2im, and "conv other" (bias+activation, its derivative, the bias
gradient, the weight gradient's sum over a chunk, copies); for a conv layer on Winograd
F(2×2, 3×3) (the fused CPU set's choice, layers/conv.py) "winograd transforms" (the filter
transform U = GgGᵀ and its adjoint, the input tiles V = BᵀdB and dX, the output Z = AᵀMA and
dM) and "winograd GEMM" (its 16 GEMMs a chunk: M = U·V, dU = dM·Vᵀ, dV = Uᵀ·dM), or, where the
kernel set runs a half of the chunks in one call (the fused CPU set), "winograd chunks" (a half's
transforms and GEMMs together; the filter transforms stay apart), the rest of
such a layer's time (bias, activation, the dU sums, the wait for the worker thread's half) in
"conv other"; a direct convolution's calls in "conv direct"; batch norm; activation (Activation
layers after a norm or a sum); pooling (max, average, global average); residual add; the recurrent
layers' GEMMs, time loops (each step's GEMM and cell, forward and backward, in one op) and
"recurrent other" (input bias, bias gradients, copies); the attention's GEMMs (projections,
scores, values, out_proj, their gradients), its masked softmax forward and backward and
"attention other" (bias adds, bias gradients, the scaled query weights, masks); inside a
transformer encoder layer each part is clocked as its own kind and the layer's own time (its
residual sums) counts as "residual add"; dense layers (their GEMMs, bias and activation); and
"rest": loss, optimizer, reshapes and Python between the layers.

Only the thread that runs the step is clocked: Conv2d's Winograd layers run the second half of
their chunks on a worker thread at the same time, whose calls are not clocked (the layer's wall
time is the calling thread's: its own half, then the wait for the other, in "conv other").
"""

import threading
import time

from gpubackprop.benchmark.timing import no_sync, sync_for

SPLIT_CATEGORIES = ("im2col", "conv GEMM", "col2im", "winograd transforms", "winograd GEMM",
                    "winograd chunks", "conv direct", "conv other", "batch norm", "layer norm",
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
    "Conv2d": ("conv other", {"im2col": "im2col", "col2im": "col2im", "matmul": "conv GEMM",
                              **{f"direct_conv_{d}": "conv direct"
                                 for d in ("forward", "backward")}}),
    # a Conv2d whose step runs Winograd F(2x2, 3x3) (``_layer_kind``)
    "Conv2d winograd": ("conv other", {"matmul": "winograd GEMM",
                                       **{f"winograd_{op}": "winograd transforms"
                                          for op in ("filter", "filter_backward", "input",
                                                     "input_backward", "output",
                                                     "output_backward")},
                                       **{f"winograd_{d}_chunks": "winograd chunks"
                                          for d in ("forward", "backward")}}),
    # a BatchNorm's fused activation: in the batch norm passes (the fused CPU set's relu), or
    # the activation ops the layer composes with them (other sets, other activations)
    **{bn: ("batch norm", {"activation": "activation", "act_backward": "activation"})
       for bn in ("BatchNorm1d", "BatchNorm2d")},
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
        self.thread = threading.get_ident()  # the step's thread: the only one clocked

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
        if not self.stack or threading.get_ident() != self.thread:
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


def _layer_kind(layer, N=None):
    """The layer's kind in ``LAYER_CATEGORIES``: its class name, "Conv2d winograd" for a Conv2d
    whose step runs Winograd (the layer's own choice, as the GEMM plan reads it)."""
    kind = type(layer).__name__
    if kind == "Conv2d" and getattr(layer, "backend", None) is not None and N is not None:
        from gpubackprop.benchmark.gemm_limit import conv_path

        if conv_path(layer, N)[0] == "winograd":
            return "Conv2d winograd"
    return kind


def _timed_forward(layer, clock):
    forward = layer.forward

    def timed_forward(*args, **kwargs):
        X = args[0] if args else kwargs.get("X")
        kind = _layer_kind(layer, getattr(X, "shape", (None,))[0])
        category = LAYER_CATEGORIES.get(kind, ("rest", {}))[0]
        Y, backprop = clock.run(kind, category, forward, *args, **kwargs)

        def timed_backprop(*a, **k):
            return clock.run(kind, category, backprop, *a, **k)
        return Y, timed_backprop
    return timed_forward


def categories_of(model):
    """The split's categories for this model (its layer kinds'), in report order, "rest" last."""
    present = {LAYER_CATEGORIES.get(type(layer).__name__, ("rest", {}))[0] for layer in _layers(model)}
    for layer in _layers(model):
        kind = type(layer).__name__
        if kind == "Conv2d":  # what its path runs: Winograd's or im2col's categories
            present.update(_conv_categories(layer))
            continue
        if kind in ("BatchNorm1d", "BatchNorm2d"):  # "activation" only for a composed one
            act, be = layer.activation, getattr(layer, "backend", None)
            if act != "identity" and (be is None or act not in getattr(
                    be.ops, "batch_norm_activations", ())):
                present.add("activation")
            continue
        present.update(LAYER_CATEGORIES.get(kind, (None, {}))[1].values())
    return [c for c in SPLIT_CATEGORIES if c in present or c == "rest"]


def _conv_categories(layer):
    """The op categories a built Conv2d's step can fill: its Winograd path's, direct path's or
    im2col's (GEMMs, and im2col/col2im unless pointwise)."""
    from gpubackprop.benchmark.gemm_limit import conv_path

    path = conv_path(layer, 1)[0] if getattr(layer, "backend", None) is not None else "im2col"
    if path == "winograd":  # the halves in one call each where the kernel set has them
        chunked = getattr(layer.backend.ops, "winograd_forward_chunks", None) is not None
        return {"winograd transforms", "winograd chunks" if chunked else "winograd GEMM"}
    if path == "direct":
        return {"conv direct"}
    return {"conv GEMM"} | (set() if path == "pointwise" else {"im2col", "col2im"})


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
