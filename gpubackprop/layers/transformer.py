"""``TransformerEncoderLayer``: self-attention and a feed-forward block with residuals and layer
norms, as torch.nn.TransformerEncoderLayer(batch_first=True).

    x = gb.Input((T, 64))
    y = gb.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1)(x)

Input and output (N, T, d_model). Post-norm (``norm_first=False``, torch's default)::

    x = norm1(x + dropout1(self_attn(x)));  x = norm2(x + dropout2(ff(x)))

pre-norm (``norm_first=True``)::

    x = x + dropout1(self_attn(norm1(x)));  x = x + dropout2(ff(norm2(x)))

with ``ff(x) = linear2(dropout(activation(linear1(x))))``, activation "relu" or "gelu" (the
exact erf GELU, torch's default form). One leaf layer of the model that owns its parts (a
``MultiheadAttention``, two ``Dense``, two ``LayerNorm``, three ``Dropout``) and chains their
forward/backprop closures, so its parameters are torch's, named and ordered as
``named_parameters()`` gives them: ``self_attn.in_proj_weight``, ``self_attn.in_proj_bias``,
``self_attn.out_proj.weight``, ``self_attn.out_proj.bias``, ``linear1.weight``, ``linear1.bias``,
``linear2.weight``, ``linear2.bias``, ``norm1.weight``, ``norm1.bias``, ``norm2.weight``,
``norm2.bias``; a ``torch.nn.TransformerEncoder``'s state dict loads through
``renumber_state_dict`` (its ``layers.{i}.`` prefixes become the model's positions).

Masks, as torch: ``src_mask`` (a host (T, T) float (added) or bool (True = masked) array) and
``is_causal`` belong to the layer (constructor arguments, or given at the first call), handed to
the attention (see ``MultiheadAttention``); ``src_key_padding_mask`` is a symbolic bool input
(T,), True = a padding position, given at the call and combined with them::

    x, pad = gb.Input((T, 64)), gb.Input((T,), dtype="bool")
    y = gb.TransformerEncoderLayer(64, 4)(x, src_key_padding_mask=pad)

Padding keys get no attention; padded positions are still computed as queries (their outputs are
what torch gives there too). A sample whose every position is padding attends to nothing: its
attention output is ``self_attn.out_proj.bias`` at every position and the layer goes on from
there (torch gives NaN for such a sample); no gradient flows through its attention weights.
In a ``Sequential`` the layer takes the sequence alone. Dropout masks are Dropout's hashed ones,
each part with its own stream (reproducible, not torch's draw).
"""

import math

import numpy as np

from gpubackprop.layers.attention import MultiheadAttention
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop
from gpubackprop.layers.dense import Dense
from gpubackprop.layers.dropout import Dropout
from gpubackprop.layers.normalization import LayerNorm
from gpubackprop.layers.registry import REQUIRED, SpecToken, register
from gpubackprop.validation import check_choice, drop_probability, positive_int

ACTIVATIONS = ("relu", "gelu")

# The parts' dropout streams: part k of the leaf at index i draws with layer = i + k·2^32, which
# no leaf index reaches, so no two dropouts of a model share a mask.
_STREAM = 1 << 32


class TransformerEncoderLayer(Layer):
    """A transformer encoder layer as torch.nn.TransformerEncoderLayer(batch_first=True) (module
    docstring); (N, T, d_model) in and out."""

    # In a graph the layer takes [src] or [src, src_key_padding_mask] (forward gets a list and
    # backprop returns one); in a Sequential the sequence alone (an array, and dX).
    multi_input = True

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 layer_norm_eps=1e-5, batch_first=True, norm_first=False, src_mask=None,
                 is_causal=False):
        self.d_model = positive_int(d_model, "d_model")
        self.nhead = positive_int(nhead, "nhead")
        self.dim_feedforward = positive_int(dim_feedforward, "dim_feedforward")
        self.dropout = drop_probability(dropout, "dropout")
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first: expected True or False, got {norm_first!r}")
        self.norm_first = norm_first
        if batch_first is not True:
            raise ValueError(f"batch_first: expected True (graph tensors are (N, T, E), batch "
                             f"first), got {batch_first!r}")
        E, F, p = self.d_model, self.dim_feedforward, self.dropout
        self.self_attn = MultiheadAttention(E, self.nhead, dropout=p, attn_mask=src_mask,
                                            is_causal=is_causal)
        self.linear1 = Dense(E, F, activation=self.activation)  # the activation fused into it
        self.linear2 = Dense(F, E)
        self.norm1 = LayerNorm(E, eps=layer_norm_eps)
        self.norm2 = LayerNorm(E, eps=layer_norm_eps)
        self.layer_norm_eps = self.norm1.eps
        self.dropout_ff, self.dropout1, self.dropout2 = Dropout(p), Dropout(p), Dropout(p)
        self._workspaces = {}

    def __repr__(self):
        extra = f", dim_feedforward={self.dim_feedforward}, dropout={self.dropout!r}"
        extra += f", activation={self.activation!r}" if self.activation != "relu" else ""
        extra += ", norm_first=True" if self.norm_first else ""
        extra += f", layer_norm_eps={self.layer_norm_eps!r}" if self.layer_norm_eps != 1e-5 else ""
        extra += ", is_causal=True" if self.self_attn.is_causal else ""
        extra += ", src_mask=..." if self.self_attn.attn_mask is not None else ""
        return f"TransformerEncoderLayer({self.d_model}, {self.nhead}{extra})"

    def config(self):
        attn = self.self_attn.config()
        return {"d_model": self.d_model, "nhead": self.nhead,
                "dim_feedforward": self.dim_feedforward, "dropout": self.dropout,
                "activation": self.activation, "layer_norm_eps": self.layer_norm_eps,
                "batch_first": True, "norm_first": self.norm_first, "src_mask": attn["attn_mask"],
                "is_causal": attn["is_causal"]}

    def __call__(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        """The node ``layer(src)`` of a graph, as torch's forward: ``src_key_padding_mask`` a
        symbolic bool input (T,) (True = pad); ``src_mask``/``is_causal`` as the constructor's
        (a layer keeps one: a later call repeats them or gives none)."""
        from gpubackprop.layers.graph import apply, is_symbolic

        if isinstance(src, (list, tuple)):  # [src(, mask)], as a graph rebuilt from its config
            return apply(self, list(src))
        inputs = [src] + ([] if src_key_padding_mask is None else [src_key_padding_mask])
        for name, t in zip(("src", "src_key_padding_mask"), inputs, strict=False):
            if not is_symbolic(t) or isinstance(t, (list, tuple)):
                raise TypeError(f"{name}: expected a symbolic tensor (gb.Input or a layer's "
                                f"output), got {type(t).__name__}")
        if src_key_padding_mask is not None and src_key_padding_mask.dtype != np.bool_:
            raise TypeError(f"src_key_padding_mask: expected a bool input (gb.Input((T,), "
                            f"dtype='bool')), got dtype {src_key_padding_mask.dtype}")
        if src_mask is not None or is_causal:
            self.self_attn._call_masks(src_mask, is_causal)
        out = apply(self, inputs)
        self.self_attn._called = True
        return out

    # ---- declaring --------------------------------------------------------------------------------
    def _parts(self):
        """(name prefix, part) of the parts with parameters, in torch's named_parameters order."""
        return [("self_attn.", self.self_attn), ("linear1.", self.linear1),
                ("linear2.", self.linear2), ("norm1.", self.norm1), ("norm2.", self.norm2)]

    @staticmethod
    def _torch_name(part, name):
        return {"W": "weight", "b": "bias"}[name] if isinstance(part, Dense) else name

    def infer_shape(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) != 2 or shape[1] != self.d_model:
            raise ValueError(f"expected a sequence of shape (T, {self.d_model}) (T, d_model), got "
                             f"{fmt_shape(shape)}")
        return shape

    def build(self, input_shape):
        shapes = _split_shapes(input_shape)
        if len(shapes) not in (1, 2):
            raise ValueError(f"expected src (and a key padding mask), got {len(shapes)} inputs")
        shape = self._src_shape = super().build(shapes[0])
        if len(shapes) == 2 and shapes[1] != shape[:1]:
            raise ValueError(f"src_key_padding_mask: expected shape ({shape[0]},) (T), got "
                             f"{fmt_shape(shapes[1])}")
        self.self_attn.build([shape] * 3 + shapes[1:])
        self.input_shape = shapes if _is_shape_list(input_shape) else shape
        for part in (self.norm1, self.norm2, self.dropout1, self.dropout2):
            part.build(shape)
        self.dropout_ff.build((self.dim_feedforward,))
        return shape

    def param_specs(self):
        return [(prefix + self._torch_name(part, name), shape) for prefix, part in self._parts()
                for name, shape in part.param_specs()]

    def initial_params(self, rng):
        """As torch: the attention's own, the Linears U(±1/√fan_in) (weights and biases), the
        norms ones and zeros."""
        out = {f"self_attn.{k}": v for k, v in self.self_attn.initial_params(rng).items()}
        for name, n_in, n_out in (("linear1", self.d_model, self.dim_feedforward),
                                  ("linear2", self.dim_feedforward, self.d_model)):
            lim = 1.0 / math.sqrt(n_in)
            out[f"{name}.weight"] = rng.uniform(-lim, lim, (n_out, n_in))
            out[f"{name}.bias"] = rng.uniform(-lim, lim, n_out)
        for name in ("norm1", "norm2"):
            out[f"{name}.weight"], out[f"{name}.bias"] = np.ones(self.d_model), np.zeros(self.d_model)
        return out

    # ---- binding ----------------------------------------------------------------------------------
    def attach(self, backend, params, grads, state, context, index):
        super().attach(backend, params, grads, state, context, index)
        for k, (prefix, part) in enumerate(self._parts()):
            names = {name: prefix + self._torch_name(part, name) for name, _ in part.param_specs()}
            part.attach(backend, {n: params[t] for n, t in names.items()},
                        {n: grads[t] for n, t in names.items()}, {}, context, index + k * _STREAM)
        for k, part in enumerate((self.dropout_ff, self.dropout1, self.dropout2)):
            part.attach(backend, {}, {}, {}, context, index + (len(self._parts()) + k) * _STREAM)

    def zero_grads(self):
        super().zero_grads()
        for _, part in self._parts():
            part.zero_grads()

    # ---- running ----------------------------------------------------------------------------------
    def _drop(self, part, X, train):
        """A dropout's (Y, backprop); the identity (no copy) when it drops nothing."""
        if not train or self.dropout == 0:
            return X, lambda dY: dY
        return part.forward(X, train=True)

    def _attention(self, X, pad, train, input_grad=True):
        """dropout1(self_attn(X)) and its backprop (dX: the sum over query, key and value; None
        without input_grad)."""
        A, back_a = self.self_attn.forward([X, X, X] + ([] if pad is None else [pad]), train=train,
                                           input_grad=input_grad)
        Y, back_d = self._drop(self.dropout1, A, train)

        def backprop(dY):
            dq, dk, dv = back_a(back_d(dY))[:3]
            # One array for query, key and value: the attention sums their gradients itself.
            return dq if dk is None else dq + dk + dv

        return Y, backprop

    def _feed_forward(self, X, train):
        """dropout2(linear2(dropout(act(linear1(X))))) on the (N·T, E) rows, and its backprop."""
        N, T, E = X.shape
        H, back1 = self.linear1.forward(X.reshape(N * T, E), train=train)
        Hd, back_h = self._drop(self.dropout_ff, H, train)
        Out, back2 = self.linear2.forward(Hd, train=train)
        Y, back_o = self._drop(self.dropout2, Out.reshape(N, T, E), train)

        def backprop(dY):
            dO = self.backend.xp.ascontiguousarray(back_o(dY)).reshape(N * T, E)
            return back1(back_h(back2(dO))).reshape(N, T, E)

        return Y, backprop

    def parts(self):
        """The layers this one runs: those with parameters, then the dropouts (when it drops)."""
        drops = [self.dropout_ff, self.dropout1, self.dropout2] if self.dropout > 0 else []
        return [part for _, part in self._parts()] + drops

    def forward(self, X, train=False, input_grad=True):
        listed = isinstance(X, (list, tuple))  # a graph's [src(, mask)]; a Sequential's src
        Xs = list(X) if listed else [X]
        X, pad = self._check(Xs)
        # The parts' buffers live in this layer's workspaces, which a graph gives each use of a
        # shared layer separately: two uses in one step then never overwrite each other's.
        for k, part in enumerate(self.parts()):
            part._workspaces = self._workspaces.setdefault(("part", k), {})
        # The residual sums go into this use's buffers in training (a step allocates nothing);
        # in inference every output is new.
        sums = self._workspaces.setdefault("sums", {})  # {name: buffer} of one batch size
        if train and sums and next(iter(sums.values())).shape[0] != X.shape[0]:
            sums.clear()

        def add(a, b, name):
            if not train:
                return a + b
            out = sums.get(name)
            if out is None:
                out = sums[name] = self.backend.empty(a.shape)
            return self.backend.xp.add(a, b, out=out)

        if self.norm_first:
            H, back_n1 = self.norm1.forward(X, train=train)
            S, back_s = self._attention(H, pad, train)
            X1 = add(X, S, "x1")
            G, back_n2 = self.norm2.forward(X1, train=train)
            F, back_f = self._feed_forward(G, train)
            Y = add(X1, F, "y")
        else:
            # post-norm: the attention's input gradient only goes to dX (none for a first layer)
            S, back_s = self._attention(X, pad, train, input_grad)
            X1, back_n1 = self.norm1.forward(add(X, S, "x1"), train=train)
            F, back_f = self._feed_forward(X1, train)
            Y, back_n2 = self.norm2.forward(add(X1, F, "y"), train=train)
        if not train:
            return Y, no_backprop

        def backprop(dY):
            # Each residual x + f(x) sends dY straight through and adds f's input gradient.
            if self.norm_first:
                dX1 = add(dY, back_n2(back_f(dY)), "dx1")
                dX = add(dX1, back_n1(back_s(dX1)), "dx")
            else:
                dZ2 = back_n2(dY)
                dX1 = add(dZ2, back_f(dZ2), "dx1")
                dZ1 = back_n1(dX1)
                dS = back_s(dZ1)  # the attention's parameter gradients, and its input's
                dX = add(dZ1, dS, "dx") if input_grad else None
            dX = dX if input_grad else None
            return [dX] + [None] * (len(Xs) - 1) if listed else dX

        return Y, backprop

    def _check(self, Xs):
        """(src, key padding mask or None) of a forward's inputs, checked."""
        if len(Xs) not in (1, 2):
            raise ValueError(f"{self!r}: expected src (and src_key_padding_mask), got {len(Xs)} "
                             f"inputs")
        X, shape = Xs[0], self._src_shape
        if X.shape[1:] != shape:
            raise ValueError(f"{self!r} src: expected shape (batch, {shape[0]}, {shape[1]}), got "
                             f"{tuple(X.shape)}")
        if X.dtype != self.backend.dtype:
            raise TypeError(f"{self!r} src: expected dtype {self.backend.dtype}, got {X.dtype}")
        if len(Xs) != len(self.self_attn.input_shape) - 2:
            raise ValueError(f"{self!r}: expected {len(self.self_attn.input_shape) - 2} inputs "
                             f"(src{', src_key_padding_mask' if len(Xs) == 1 else ''}), as built, "
                             f"got {len(Xs)}")
        if len(Xs) == 1:
            return X, None
        pad = Xs[1]
        if pad.dtype != np.bool_ or pad.shape != (X.shape[0], shape[0]):
            raise ValueError(f"{self!r} src_key_padding_mask: expected a bool array of shape "
                             f"({X.shape[0]}, {shape[0]}) (batch, T), got {pad.dtype} "
                             f"{tuple(pad.shape)}")
        return X, pad


def _is_shape_list(shapes):
    """True for a graph's list of per-input shapes, False for one shape (a tuple of ints)."""
    return isinstance(shapes, (list, tuple)) and bool(shapes) and \
        all(isinstance(s, (list, tuple)) for s in shapes)


def _split_shapes(input_shape):
    if _is_shape_list(input_shape):
        return [tuple(s) for s in input_shape]
    return [tuple(input_shape)]


def _make_transformer(ctx):
    """``layers`` encoder layers on sequences (T, d_model); a one-channel image is read as its rows."""
    shape, made = ctx.shape, []
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
        made.append(("Reshape", {"shape": shape}))
    if len(shape) != 2:
        raise ctx.error(f"needs sequences (time steps, features), got {ctx.fmt(shape)}")
    kw = {"d_model": shape[1], "nhead": ctx.size("heads"), "dim_feedforward": ctx.size("ff"),
          "dropout": ctx.params["dropout"]}
    if ctx.params["gelu"]:
        kw["activation"] = "gelu"
    if ctx.params["prenorm"]:
        kw["norm_first"] = True
    if ctx.params["causal"]:
        kw["is_causal"] = True
    return made + [("TransformerEncoderLayer", dict(kw)) for _ in range(ctx.size("layers"))]


register(TransformerEncoderLayer, SpecToken(
    "transformer", _make_transformer,
    {"heads": ("int", REQUIRED), "ff": ("int", 2048), "layers": ("int", 1), "dropout": ("prob", 0.1),
     "gelu": ("bool", False), "prenorm": ("bool", False), "causal": ("bool", False)},
    positional=("heads",), example="transformer(4)",
    help="transformer(heads,ff=2048,layers=1,dropout=0.1,gelu=false,prenorm=false,causal=false)\n"
         "                TransformerEncoderLayers over sequences (time steps, d_model) -> the same "
         "shape\n                (d_model: the features), as torch's; e.g. "
         "transformer(4,ff=512,layers=2)-last-dense(classes)"))
