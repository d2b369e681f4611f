"""Functional graphs of layers: ``Input``, layers called on symbolic tensors, ``Add``,
``Concatenate``, and the model of such a graph (``gb.Model(inputs=..., outputs=...)``).

    x = gb.Input((1, 28, 28))
    h = gb.Conv2d(1, 8, 3, padding=1, activation="relu")(x)
    y = gb.Dense(8 * 28 * 28, 10)(gb.Flatten()(gb.Add()([h, h])))
    model = gb.Model(inputs=x, outputs=y, device="auto", dtype="float32", seed=0)

Calling a layer on a ``SymbolicTensor`` builds it for that tensor's per-sample shape (a shape error
is raised there, naming the layer) and records a node; nothing runs. The model collects the nodes
that the outputs depend on, in topological order: ``forward`` runs them in that order and
``backprop`` in reverse, summing the gradients of a tensor that feeds several nodes. A layer
called at several places shares its weights (one set of parameters; its gradient is the sum over
its uses); each use gets its own workspaces, so the uses of one step never overwrite each other.
(A shared ``Dropout`` draws the same mask at each use within a step.)

Several inputs or outputs: ``inputs=[a, b]`` makes ``forward([A, B], ...)`` and ``predict([A, B])``
take lists in that order and ``backprop`` return the input gradients as a list in that order;
``outputs=[y1, y2]`` makes ``forward`` return a list and ``backprop`` take one (``None`` for an
output without a gradient: zeros). Losses for several outputs: ``gb.MultiLoss``.

Parameter keys are the layers' positions among the graph's distinct layers, in the order the
graph first uses them (``"0.weight"``, ``"2.W"``, ...), as for a ``Sequential`` of them.
"""

import numpy as np

from gpubackprop.layers import registry
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop, shape_tuple, size_of
from gpubackprop.layers.model import Model, one_line
from gpubackprop.precision import store16


class SymbolicTensor:
    """A placeholder for a batch of per-sample ``shape`` in a graph: an ``Input`` or a node's output.
    ``dtype`` is None for the model's floating-point dtype, else an integer or bool NumPy dtype."""

    __slots__ = ("shape", "node", "name", "dtype")

    def __init__(self, shape, node=None, name=None, dtype=None):
        self.shape, self.node, self.name, self.dtype = tuple(shape), node, name, dtype

    def __repr__(self):
        where = "Input" if self.node is None else f"output of {one_line(self.node.layer)}"
        dtype = "" if self.dtype is None else f", dtype={self.dtype.name!r}"
        return f"SymbolicTensor(shape={self.shape}{dtype}, {where})"


def Input(shape, dtype=None, name=None):  # noqa: N802 (a constructor, as in Keras)
    """A symbolic input of per-sample ``shape`` (no batch axis), e.g. ``Input((1, 28, 28))``.

    ``dtype``: None for the model's dtype, or an integer or bool dtype ("int32", "int64", "bool")
    for indices and masks, which reach the layers unconverted and get no gradient (None)."""
    if dtype is not None:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "iub":
            raise ValueError(f"dtype: expected None (the model's dtype) or an integer or bool "
                             f"dtype such as 'int64' or 'bool', got {dtype!r}")
        dtype = dt
    return SymbolicTensor(shape_tuple(shape, "shape"), None, name, dtype)


class _Node:
    """One call of a layer on symbolic tensors."""

    __slots__ = ("layer", "inputs", "output", "workspaces")

    def __init__(self, layer, inputs):
        self.layer, self.inputs = layer, list(inputs)
        self.output = None
        self.workspaces = {}  # this use's buffers (a shared layer has one set per use)


def is_symbolic(x):
    if isinstance(x, SymbolicTensor):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, SymbolicTensor) for t in x)


def apply(layer, inputs):
    """``layer(inputs)`` on symbolic tensors: build the layer for their shapes, record the node."""
    many = getattr(layer, "multi_input", False)
    if many:
        if not isinstance(inputs, (list, tuple)) or not inputs \
                or not all(isinstance(t, SymbolicTensor) for t in inputs):
            raise TypeError(f"{one_line(layer)}: expected a list of symbolic tensors (gb.Input or "
                            f"layer outputs), got {inputs!r}")
        tensors = list(inputs)
    else:
        if not isinstance(inputs, SymbolicTensor):
            raise TypeError(f"{one_line(layer)}: expected a symbolic tensor (gb.Input or a layer's "
                            f"output), got {type(inputs).__name__}; call layers on device arrays "
                            f"through a model")
        tensors = [inputs]
    shapes = [t.shape for t in tensors]
    try:
        out = layer.build(shapes if many else shapes[0])
    except ValueError as e:
        shown = ", ".join(fmt_shape(s) for s in shapes)
        raise ValueError(f"{one_line(layer)} called on input of shape {shown}: {e}") from None
    node = _Node(layer, tensors)
    node.output = SymbolicTensor(out, node)
    return node.output


class Add(Layer):
    """Y = X1 + X2 + ...: the sum of tensors of one shape (skip connections)."""

    multi_input = True

    def __repr__(self):
        return "Add()"

    def infer_shape(self, input_shapes):
        shapes = [tuple(s) for s in input_shapes]
        if len(shapes) < 2:
            raise ValueError(f"expected at least 2 inputs, got {len(shapes)}")
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"expected inputs of one shape, got "
                             f"{', '.join(fmt_shape(s) for s in shapes)}")
        return shapes[0]

    def build(self, input_shapes):
        self.input_shape = [tuple(s) for s in input_shapes]
        self.output_shape = self.infer_shape(input_shapes)
        return self.output_shape

    def forward(self, Xs, train=False, input_grad=True):
        xp = self.backend.xp
        Y = self.workspace(Xs[0].shape, lambda: xp.empty_like(Xs[0])) if train else \
            xp.empty_like(Xs[0])
        xp.add(Xs[0], Xs[1], out=Y)
        for X in Xs[2:]:
            Y += X
        if not train:
            return Y, no_backprop
        n = len(Xs)

        def backprop(dY):
            # Each summand gets dY itself: nothing is computed (the graph never writes into it).
            return [dY] * n if input_grad else [None] * n

        return Y, backprop


class Concatenate(Layer):
    """Join tensors along ``axis`` (a per-sample axis: the batch axis is not counted; negative
    axes count from the end, -1 the last); the other axes must agree."""

    multi_input = True

    def __init__(self, axis=-1):
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis: expected an integer, got {axis!r}")
        self.axis = int(axis)

    def __repr__(self):
        return f"Concatenate(axis={self.axis})"

    def config(self):
        return {"axis": self.axis}

    def _axis(self, ndim):
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis: expected an axis of the per-sample shape, in [{-ndim}, "
                             f"{ndim - 1}], got {self.axis}")
        return self.axis % ndim

    def build(self, input_shapes):
        shapes = [tuple(s) for s in input_shapes]
        if len(shapes) < 2:
            raise ValueError(f"expected at least 2 inputs, got {len(shapes)}")
        if any(len(s) != len(shapes[0]) for s in shapes):
            raise ValueError(f"expected inputs with the same number of axes, got "
                             f"{', '.join(fmt_shape(s) for s in shapes)}")
        a = self._axis(len(shapes[0]))
        rest = [s[:a] + s[a + 1:] for s in shapes]
        if any(r != rest[0] for r in rest):
            raise ValueError(f"expected inputs that agree on every axis but {self.axis}, got "
                             f"{', '.join(fmt_shape(s) for s in shapes)}")
        self.input_shape = shapes
        out = list(shapes[0])
        out[a] = sum(s[a] for s in shapes)
        self.output_shape = tuple(out)
        self._sizes = [s[a] for s in shapes]
        return self.output_shape

    def forward(self, Xs, train=False, input_grad=True):
        xp = self.backend.xp
        a = self._axis(len(self.output_shape)) + 1  # the batch axis in front
        N = Xs[0].shape[0]
        if not train:
            return xp.concatenate(Xs, axis=a), no_backprop
        Y = self.workspace(("Y", N), lambda: self.backend.empty((N, *self.output_shape)))
        xp.concatenate(Xs, axis=a, out=Y)
        bounds = np.cumsum([0, *self._sizes])

        def backprop(dY):
            if not input_grad:
                return [None] * len(Xs)
            dXs = self.workspace(("dX", N), lambda: [self.backend.empty(X.shape) for X in Xs])
            index = [slice(None)] * dY.ndim
            for dX, lo, hi in zip(dXs, bounds[:-1], bounds[1:], strict=True):
                index[a] = slice(int(lo), int(hi))
                dX[...] = dY[tuple(index)]  # contiguous copies: layers read C-ordered gradients
            return dXs

        return Y, backprop


class GraphModel(Model):
    """The model of a functional graph: ``gb.Model(inputs=..., outputs=..., device=..., dtype=...,
    seed=..., kernels=...)`` (see the module docstring)."""

    type_name = "Model"

    def __init__(self, inputs=None, outputs=None, device="auto", dtype="float32", seed=0,
                 kernels="fused", precision="fp32", loss_scaler=None):
        self._multi_in = isinstance(inputs, (list, tuple))
        self._multi_out = isinstance(outputs, (list, tuple))
        ins = list(inputs) if self._multi_in else [inputs]
        outs = list(outputs) if self._multi_out else [outputs]
        for name, group in (("inputs", ins), ("outputs", outs)):
            if not group:
                raise ValueError(f"{name}: expected at least one symbolic tensor, got []")
            for i, t in enumerate(group):
                if not isinstance(t, SymbolicTensor):
                    raise TypeError(f"{name}[{i}]: expected a symbolic tensor (gb.Input or a "
                                    f"layer's output), got {type(t).__name__}")
        for i, t in enumerate(ins):
            if t.node is not None:
                raise ValueError(f"inputs[{i}]: expected a gb.Input, got the output of "
                                 f"{one_line(t.node.layer)}")
        if len({id(t) for t in ins}) != len(ins):
            raise ValueError("inputs: the same gb.Input appears twice")
        self._inputs, self._outputs = ins, outs
        self._nodes = self._topological(ins, outs)
        self._layers = []
        for node in self._nodes:
            if all(node.layer is not layer for layer in self._layers):
                self._layers.append(node.layer)
        self._check_sharing()
        self._init_model(device, dtype, seed, kernels, precision, loss_scaler)
        self._sum_buffers = {}
        self._requires = {}

    @staticmethod
    def _topological(ins, outs):
        """The nodes the outputs depend on, each after the nodes of its inputs (depth first)."""
        order, state = [], {}
        known = {id(t) for t in ins}
        for out in outs:
            stack = [(out, False)]
            while stack:
                t, done = stack.pop()
                node = t.node
                if node is None:
                    if id(t) not in known:
                        raise ValueError(f"outputs: depend on an Input of shape {t.shape} that is "
                                         f"not in inputs=")
                    continue
                if done:
                    if state.get(id(node)) != "done":
                        state[id(node)] = "done"
                        order.append(node)
                    continue
                if state.get(id(node)) is not None:
                    continue
                state[id(node)] = "open"
                stack.append((t, True))
                for x in reversed(node.inputs):
                    stack.append((x, False))
        used = {id(x) for node in order for x in node.inputs} | {id(t) for t in outs}
        for i, t in enumerate(ins):
            if id(t) not in used:
                raise ValueError(f"inputs[{i}]: no output depends on it")
        return order

    def _check_sharing(self):
        uses = {}
        for node in self._nodes:
            uses.setdefault(id(node.layer), []).append(node)
        for nodes in uses.values():
            layer = nodes[0].layer
            if len(nodes) < 2:
                continue
            if layer.children():
                raise ValueError(f"{one_line(layer)}: a combinator or model called at several "
                                 f"places is not supported; call its layers instead")
            shapes = {tuple(x.shape for x in n.inputs) for n in nodes}
            if len(shapes) > 1:
                raise ValueError(f"{one_line(layer)}: called at several places with different "
                                 f"input shapes ({', '.join(map(str, sorted(shapes)))}); a shared "
                                 f"layer takes one")

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"Model(inputs={[t.shape for t in self._inputs]}, "
                f"outputs={[t.shape for t in self._outputs]}, layers={len(self._layers)}, {cfg})")

    # ---- the layer protocol: a graph --------------------------------------------------------------
    @property
    def layers(self):
        """The graph's distinct layers, in the order it first uses them (their key positions)."""
        return list(self._layers)

    @property
    def input_shape_hint(self):
        shapes = [t.shape for t in self._inputs]
        return shapes if self._multi_in else shapes[0]

    def build(self, input_shape=None):
        if input_shape is not None:
            given = [tuple(s) for s in input_shape] if self._multi_in else [tuple(input_shape)]
            want = [t.shape for t in self._inputs]
            if given != want:
                raise ValueError(f"expected inputs of shape {self.input_shape_hint}, got "
                                 f"{input_shape}")
        for node in self._nodes:  # the layers' recorded shapes, as the graph uses them
            shapes = [x.shape for x in node.inputs]
            node.layer.build(shapes if getattr(node.layer, "multi_input", False) else shapes[0])
        self.input_shape = self.input_shape_hint
        outs = [t.shape for t in self._outputs]
        self.output_shape = outs if self._multi_out else outs[0]
        return self.output_shape

    def leaves(self, prefix=""):
        out = []
        for i, layer in enumerate(self._layers):
            out += layer.leaves(f"{prefix}{i}.")
        return out

    def children(self):
        return list(self._layers)

    def input_consumers(self):
        """Per input (inputs= order), the leaf layers it feeds directly."""
        out = []
        for t in self._inputs:
            layers = []
            for node in self._nodes:
                for k, x in enumerate(node.inputs):
                    if x is t:
                        inner = node.layer
                        layers += inner.input_consumers()[k] if isinstance(inner, Model) else [inner]
            out.append(layers)
        return out

    @property
    def input_dtypes(self):
        """Per input: None (the model's dtype) or its integer/bool dtype, in inputs= order."""
        return [t.dtype for t in self._inputs]

    @property
    def n_in(self):
        sizes = [size_of(t.shape) for t in self._inputs]
        return sizes if self._multi_in else sizes[0]

    @property
    def n_out(self):
        sizes = [size_of(t.shape) for t in self._outputs]
        return sizes if self._multi_out else sizes[0]

    def config(self):
        """{"inputs": [shape, ...], "input_dtypes": [None or name, ...], "layers": [description,
        ...], "nodes": [[layer, [tensor, ...]], ...], "outputs": [tensor, ...]} (and whether inputs
        and outputs are lists): tensors numbered inputs first, then node outputs."""
        number = {id(t): i for i, t in enumerate(self._inputs)}
        for j, node in enumerate(self._nodes):
            number[id(node.output)] = len(self._inputs) + j
        position = {id(layer): i for i, layer in enumerate(self._layers)}
        return {"inputs": [list(t.shape) for t in self._inputs], "multi_input": self._multi_in,
                "input_dtypes": [None if t.dtype is None else t.dtype.name for t in self._inputs],
                "layers": [registry.describe(layer) for layer in self._layers],
                "nodes": [[position[id(n.layer)], [number[id(x)] for x in n.inputs]]
                          for n in self._nodes],
                "outputs": [number[id(t)] for t in self._outputs], "multi_output": self._multi_out}

    @classmethod
    def from_config(cls, config, **model_options):
        model_options.setdefault("device", "cpu")  # a block's options are unused (as Sequential's)
        layers = [registry.rebuild(d) for d in config["layers"]]
        dtypes = config.get("input_dtypes") or [None] * len(config["inputs"])
        tensors = [Input(s, dtype) for s, dtype in zip(config["inputs"], dtypes, strict=True)]
        n_inputs = len(tensors)
        for layer_index, refs in config["nodes"]:
            args = [tensors[r] for r in refs]
            layer = layers[layer_index]
            tensors.append(apply(layer, args if getattr(layer, "multi_input", False) else args[0]))
        ins, outs = tensors[:n_inputs], [tensors[r] for r in config["outputs"]]
        return cls(ins if config.get("multi_input") else ins[0],
                   outs if config.get("multi_output") else outs[0], **model_options)

    # ---- running ----------------------------------------------------------------------------------
    def _requires_grad(self, input_grad):
        """{tensor id: True} for the tensors whose gradient backprop needs (parameters upstream,
        or an input when input_grad)."""
        req = self._requires.get(input_grad)
        if req is None:  # integer and bool inputs (indices, masks) have no gradient
            req = {id(t): bool(input_grad) and t.dtype is None for t in self._inputs}
            for node in self._nodes:
                has_params = any(leaf.param_specs() for _, leaf in node.layer.leaves())
                req[id(node.output)] = has_params or any(req[id(x)] for x in node.inputs)
            self._requires[input_grad] = req
        return req

    def _split_inputs(self, X):
        if not self._multi_in:
            return [X]
        if not isinstance(X, (list, tuple)) or len(X) != len(self._inputs):
            raise TypeError(f"X: expected a list of {len(self._inputs)} input arrays (inputs= "
                            f"order), got {type(X).__name__}")
        return list(X)

    def run(self, X, train, input_grad):
        values = {id(t): x for t, x in zip(self._inputs, self._split_inputs(X), strict=True)}
        req = self._requires_grad(input_grad) if train else None
        calls = []
        for node in self._nodes:
            layer = node.layer
            args = [values[id(x)] for x in node.inputs]
            if not layer.children():
                layer._workspaces = node.workspaces  # this use's buffers
            many = getattr(layer, "multi_input", False)
            need = train and any(req[id(x)] for x in node.inputs)
            Y, bp = layer.forward(args if many else args[0], train, need)
            values[id(node.output)] = store16(self.backend, Y)  # 16-bit precisions: rounded
            calls.append(bp)
        outs = [values[id(t)] for t in self._outputs]
        result = outs if self._multi_out else outs[0]
        if not train:
            return result, no_backprop
        batch = next(iter(values.values())).shape[0]
        return result, lambda dY: self._backprop(dY, calls, values, req, batch)

    def _backprop(self, dY, calls, values, req, batch):
        xp = self.backend.xp
        dYs = list(dY) if self._multi_out else [dY]
        if len(dYs) != len(self._outputs):
            raise ValueError(f"dY: expected {len(self._outputs)} output gradients, got {len(dYs)}")
        grads = {}

        def add(t, d):
            grads.setdefault(id(t), []).append(d)

        def total(t):
            parts = grads.get(id(t))
            if not parts:
                return None
            if len(parts) == 1:
                return parts[0]
            key = (id(t), batch)
            buf = self._sum_buffers.get(key)
            if buf is None:
                if len(self._sum_buffers) > 64:  # many batch sizes: keep memory bounded
                    self._sum_buffers.clear()
                buf = self._sum_buffers[key] = xp.empty_like(parts[0])
            xp.add(parts[0], parts[1], out=buf)  # parts are other layers' buffers: left alone
            for d in parts[2:]:
                buf += d
            return store16(self.backend, buf)

        for t, d in zip(self._outputs, dYs, strict=True):
            add(t, xp.zeros_like(values[id(t)]) if d is None else d)
        for node, bp in zip(reversed(self._nodes), reversed(calls), strict=True):
            if not req[id(node.output)]:
                continue
            g = total(node.output)
            if g is None:  # an output of a node no path to an output differentiates
                g = xp.zeros_like(values[id(node.output)])
            dX = store16(self.backend, bp(g))
            parts = dX if getattr(node.layer, "multi_input", False) else [dX]
            for x, d in zip(node.inputs, parts, strict=True):
                if d is not None and req[id(x)]:
                    add(x, d)
        din = [total(t) if req[id(t)] else None for t in self._inputs]
        return din if self._multi_in else din[0]

    @property
    def multi_input(self):  # called on symbolic tensors inside another graph: a list for several
        return self._multi_in

    def _build(self):
        super()._build()
        for node in self._nodes:  # buffers of this backend only
            node.workspaces = {}
        self._sum_buffers = {}

    # ---- host-facing helpers -----------------------------------------------------------------------
    def predict(self, X, loss=None, batch_size=4096):
        """Outputs for X (a list in inputs= order for several inputs) as host arrays (a list for
        several outputs): the outputs, or through ``loss.link`` (a MultiLoss: each output's)."""
        from gpubackprop.training import check_inputs, upload_inputs
        from gpubackprop.validation import positive_int

        be = self._top()
        batch_size = positive_int(batch_size, "batch_size")
        Xh = check_inputs(self, X)
        Xs = Xh if self._multi_in else [Xh]
        n = Xs[0].shape[0]
        links = getattr(loss, "losses", None) or [loss] * len(self._outputs)
        outs = [np.empty((n, *t.shape), dtype=be.dtype) for t in self._outputs]
        for s in range(0, n, batch_size):
            batch = upload_inputs(be, self, [h[s:s + batch_size] for h in Xs])
            Y = self(batch if self._multi_in else batch[0])
            for out, y, link in zip(outs, Y if self._multi_out else [Y], links, strict=True):
                out[s:s + batch_size] = be.to_host(y if link is None else link.link(be, y))
        return outs if self._multi_out else outs[0]


registry.register(GraphModel)
registry.register(Add)
registry.register(Concatenate)
