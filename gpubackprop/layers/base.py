"""The layer protocol, shared by every layer, and the base class ``Layer`` that implements its
bookkeeping.

A layer is a subclass of ``Layer`` written against this protocol, nothing more (the base class
gives a default for every method below but ``forward``); the model (``gpubackprop.layers.model``:
the outermost ``Sequential``, or a functional ``Model``) does the rest: it infers shapes, owns the
flat buffers, seeds the initial values and counts steps. Combinators (``Sequential``,
``Residual``) are layers too; ``leaves(prefix)`` lists the leaf layers under one with their key
prefixes, ``children()`` the layers directly under it, and only leaves get ``attach``.

**Declaring (pure Python, before any backend exists).**

``build(input_shape) -> output_shape``
    Shapes are per sample, without the batch axis: ``(n,)`` for feature vectors, ``(C, H, W)`` for
    images (NCHW batches). ``build`` checks the shape it is given, records ``self.input_shape``
    and ``self.output_shape`` and returns the output shape; the base class's ``build`` does that
    around ``infer_shape(input_shape) -> output_shape``, which a layer usually overrides (pure: no
    state changes). A bad shape raises ``ValueError`` whose message says what was expected and
    what was given, without naming the layer: the model adds "layers[i] <repr>: " in front (e.g.
    "layers[2] Conv2d(16, 32, 3): expected 16 input channels, got 8 (input shape (8, 12, 12))").
    ``build`` may be called again with another shape (it is called at model construction when the
    input shape is known, and again when the model builds).
``input_shape_hint`` (property)
    The per-sample input shape the layer's configuration fixes (``Dense(n_in, .)``: ``(n_in,)``),
    else None. The model takes its input shape from its first layer's hint unless
    ``Sequential(..., input_shape=...)`` gives it.
``param_specs() -> [(name, shape), ...]``
    The trained parameters, in their order in the flat parameter buffer; called after ``build``.
    Names and layouts follow PyTorch (``"weight"`` (C_out, C_in/groups, kH, kW), ``"bias"``) so
    weights copy across 1:1; ``Dense`` keeps its public ``"W"``/``"b"``. Public keys are
    ``f"{prefix}{name}"`` with the layer's position as prefix (``"0.weight"``, ``"3.1.bias"``).
``state_specs() -> [(name, shape, dtype), ...]``
    Non-trained state (running statistics); ``dtype`` None means the model's dtype, else a NumPy
    dtype name such as ``"int64"``. Kept in the model's state buffers, read and written by
    ``model.get_state()``/``set_state()`` as ``"{prefix}{name}"`` (with the model's step counter
    as ``"step"``) and saved in checkpoints.
``initial_params(rng) -> {name: host float64 array}`` and ``initial_state() -> {name: array}``
    Fresh values; ``rng`` is the model's seeded NumPy Generator (draw in a fixed order). The
    default ``initial_state`` is zeros.
``config() -> dict``
    JSON-able constructor keyword arguments: ``type(layer)(**config())`` is an equal layer, also
    after a JSON round trip (tuples come back as lists, so constructors take both); a combinator
    describes its children inside it (``registry.describe``) and overrides ``from_config``.
    Checkpoints store ``{"type": type name, **config()}``; the class must be registered
    (``gpubackprop.layers.registry.register``, which also declares its model-spec tokens).

**Binding (once per model build).** ``attach(backend, params, grads, state, context, index)``:
``params``/``grads``/``state`` are {name: device array} views into the model's flat buffers,
shaped as the specs say. The base class stores them as ``self.backend``, ``self.params``,
``self.grads``, ``self.state``, ``self.context`` and ``self.index`` (the layer's number among the
model's leaf layers, 0, 1, ... in forward order) and drops cached workspaces; a subclass that
overrides ``attach`` calls ``super().attach(...)`` first. ``context`` is the model's
``ModelContext``: ``context.seed`` (the model seed) and ``context.step`` (the number of training
forward passes the model has completed; it is model state, saved by checkpoints). A layer that
needs a per-step value (Dropout's mask) reads ``self.context.step`` in ``forward`` and keeps it in
its closure, with ``self.index`` to tell layers apart: a resumed run then draws the same masks.

**Running.** ``forward(X, train=False, input_grad=True) -> (Y, backprop)``, ``backprop(dY) -> dX``.
- ``X`` is a C-contiguous device array (N, *input_shape) of the model dtype; ``Y`` is
  (N, *output_shape). ``train`` selects training mode (batch statistics, dropout) or inference
  mode (running statistics, identity).
- ``backprop`` adds this call's parameter gradients to ``self.grads``: the first backprop after
  ``zero_grads()`` writes them, later ones add (``self.take_accumulate()`` returns which to do and
  records that the gradients now hold a value). It is called at most once per forward pass, before
  the layer's next forward pass, and never modifies ``dY``. It returns dX, or None when
  ``input_grad`` is False (the model's first layer needs no input gradient). dX may be a view
  of dY only for a layer that moves data without arithmetic (``Flatten``); combinators that modify
  dX in place check for that.
- In training mode the arrays a layer returns (Y, dX) live in buffers it reuses on its next forward
  pass with the same batch size (so a step allocates nothing; ``self.workspace(key, make)`` keeps
  a few); in inference mode every output is new (or a view of ``X``), and ``backprop`` raises.
- Layers call ops through ``self.backend.ops`` (never a kernel module) and arrays through
  ``self.backend.xp``; they must not synchronise the host. ``self.check_input(X)`` gives the
  standard shape/dtype error; buffers come from ``self.backend.empty(shape[, dtype])``.
- Training-mode state updates (running statistics) are written in ``forward(train=True)`` into
  the ``self.state`` views, in place; ``gradcheck`` saves and restores them around its passes.

``zero_grads()`` marks the gradients stale (the base class resets the flag that
``take_accumulate`` reads). ``__repr__`` shows the configuration like the constructor call.
"""

import math
import numbers

import numpy as np


class ModelContext:
    """What a model shares with its layers while it runs: the seed and the training step counter;
    ``step_values`` a ``StepValues`` while a CUDA graph's step runs (Dropout and the optimizer then
    read the step and the learning rate from its device array), else None."""

    __slots__ = ("seed", "step", "step_values")

    def __init__(self, seed=0, step=0):
        self.seed = int(seed)
        self.step = int(step)
        self.step_values = None

    def __repr__(self):
        return f"ModelContext(seed={self.seed}, step={self.step})"


class Layer:
    """Base class of the layers: the protocol's bookkeeping (see the module docstring)."""

    input_shape = None
    output_shape = None

    # ---- declaring ------------------------------------------------------------------------------
    @property
    def input_shape_hint(self):
        return None

    def build(self, input_shape):
        """Check ``input_shape`` (per sample), record it, return the output shape."""
        self.input_shape = tuple(input_shape)
        self.output_shape = self.infer_shape(self.input_shape)
        return self.output_shape

    def infer_shape(self, input_shape):
        """The output shape for ``input_shape``; raise ValueError (expected vs given) if it is bad."""
        return input_shape

    def param_specs(self):
        return []

    def state_specs(self):
        return []

    def initial_params(self, rng):
        return {}

    def initial_state(self):
        return {name: np.zeros(shape, dtype=dtype or np.float64)
                for name, shape, dtype in self.state_specs()}

    def config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def leaves(self, prefix=""):
        """[(key prefix, layer)] of the leaf layers under this one, in forward order."""
        return [(prefix, self)]

    def children(self):
        """The layers directly under this one (a combinator's); [] for a leaf."""
        return []

    def __call__(self, inputs):
        """``layer(x)`` on symbolic tensors (``gb.Input``, layer outputs): a node of a functional
        graph (``gpubackprop.layers.graph``); device arrays go through a model."""
        from gpubackprop.layers.graph import apply

        return apply(self, inputs)

    # ---- binding --------------------------------------------------------------------------------
    backend = None
    context = None
    index = None
    _accumulate = False

    def attach(self, backend, params, grads, state, context, index):
        self.backend = backend
        self.params, self.grads, self.state = params, grads, state
        self.context, self.index = context, index
        self._accumulate = False
        self._workspaces = {}

    def zero_grads(self):
        self._accumulate = False

    def take_accumulate(self):
        """True when backprop must add to the gradients (False: write them); then sets it True."""
        acc = self._accumulate
        self._accumulate = True
        return acc

    def workspace(self, key, make):
        """The buffers ``make()`` returns, kept per ``key`` (a batch size); at most a few kept."""
        spaces = self.__dict__.setdefault("_workspaces", {})
        ws = spaces.get(key)
        if ws is None:
            if len(spaces) > 4:  # many batch sizes (e.g. predict): keep memory bounded
                spaces.clear()
            ws = spaces[key] = make()
        return ws

    def check_input(self, X):
        """Raise unless X is (N, *input_shape) of the model dtype (cheap: a tuple compare)."""
        if X.shape[1:] != self.input_shape or X.ndim < 1:
            raise ValueError(f"{self!r} input: expected shape (batch, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(X.shape)}")
        if X.dtype != self.backend.dtype:
            raise TypeError(f"{type(self).__name__} input: expected dtype {self.backend.dtype}, "
                            f"got {X.dtype}")


def no_backprop(dY):
    raise RuntimeError("backprop after forward(train=False): call forward(X, train=True)")


# ---- argument checks shared by the layers ----------------------------------------------------------
def int_pair(value, name, minimum=1):
    """(h, w) from an int or a pair of ints, each >= minimum."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             or v < minimum for v in pair):
        raise ValueError(f"{name}: expected an integer >= {minimum} or a pair of them, got "
                         f"{value!r}")
    return int(pair[0]), int(pair[1])


def shape_tuple(value, name):
    """A per-sample shape: a tuple of positive ints (an int is a 1-tuple)."""
    shape = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not shape or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                        for v in shape):
        raise ValueError(f"{name}: expected a shape (a tuple of positive integers), got {value!r}")
    return tuple(int(v) for v in shape)


def pair_repr(pair):
    """3 for (3, 3), (3, 5) otherwise: as a user would write it."""
    return str(pair[0]) if pair[0] == pair[1] else str(tuple(pair))


def fmt_shape(shape):
    return str(tuple(shape))


def size_of(shape):
    return math.prod(shape)
