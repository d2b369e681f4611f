"""``Sequential`` (a chain of layers, and the model of that chain) and ``Residual``."""

from gpubackprop.layers import registry
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop, shape_tuple
from gpubackprop.layers.model import LayerShapeError, Model, one_line
from gpubackprop.layers.registry import SpecToken
from gpubackprop.precision import store16


def _is_layer(x):
    return all(hasattr(x, name) for name in ("forward", "build", "leaves"))


class Residual(Layer):
    """Y = X + block(X); the block must keep the shape of its input."""

    def __init__(self, block):
        if not _is_layer(block):
            raise TypeError(f"block: expected a layer (Dense, Conv2d, Sequential, ...), got "
                            f"{type(block).__name__}")
        self.block = block
        self.backend = None
        self._workspaces = {}
        hint = block.input_shape_hint
        if hint is not None:  # a block of fixed shape (Dense) is checked now
            out = tuple(block.build(hint))
            if out != tuple(hint):
                raise ValueError(f"Residual block: {_mismatch(hint, out)}")

    def __repr__(self):
        return f"Residual({self.block!r})"

    n_in = property(lambda self: self.block.n_in)
    n_out = property(lambda self: self.block.n_out)

    @property
    def input_shape_hint(self):
        return self.block.input_shape_hint

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        try:
            out = tuple(self.block.build(input_shape))
        except LayerShapeError:
            raise
        except ValueError as e:  # a leaf block: transparent, as in the parameter keys
            raise LayerShapeError("", one_line(self.block), str(e)) from None
        if out != input_shape:
            raise ValueError(_mismatch(input_shape, out))
        self.input_shape = self.output_shape = input_shape
        return out

    def leaves(self, prefix=""):
        return self.block.leaves(prefix)  # transparent: its block's names

    param_keys = leaves

    def children(self):
        return [self.block]

    def config(self):
        return {"block": registry.describe(self.block)}

    @classmethod
    def from_config(cls, config):
        return cls(registry.rebuild(config["block"]))

    def forward(self, X, train=False, input_grad=True):
        xp = self.backend.xp
        H, block_backprop = self.block.forward(X, train, input_grad)
        if train:
            Y = self.workspace(X.shape, lambda: xp.empty_like(H))
        else:
            Y = xp.empty_like(H)
        xp.add(X, H, out=Y)
        store16(self.backend, Y)

        def backprop(dY):
            dX = block_backprop(dY)
            if dX is None:
                return None
            if xp.may_share_memory(dX, dY):  # a block that passes dY through (Flatten-like)
                return store16(self.backend, dX + dY)
            # The skip path passes dY straight through; dX is the block's own scratch buffer.
            dX += dY
            return store16(self.backend, dX)

        return Y, backprop


def _mismatch(shape_in, shape_out):
    if len(shape_in) == 1 and len(shape_out) == 1:
        return f"expected it to map n features to n, got {shape_in[0]} -> {shape_out[0]}"
    return (f"expected its block to keep the input shape {fmt_shape(shape_in)}, got "
            f"{fmt_shape(shape_out)}")


class Sequential(Model):
    """A chain of layers; at the top level it is also the model and owns the flat buffers.

    device: "auto" | "cpu" | "cuda"; dtype: "float32" | "float64"; kernels: "fused" | "reference".
    precision: "fp32" | "bf16" | "fp16" (float32 master weights, 16-bit activations; fp16 with a
    dynamic loss scale, ``loss_scaler``: a gb.LossScaler or its options; see gpubackprop.precision).
    ``input_shape``: the per-sample input shape, e.g. (1, 28, 28) (NCHW); by default the first
    layer's (``Dense(n_in, .)``: (n_in,)). Parameters are initialised from ``seed`` when the
    model is first used. Inside another model it is a block of it (its model options unused).
    """

    def __init__(self, layers, device="auto", dtype="float32", seed=0, kernels="fused",
                 input_shape=None, precision="fp32", loss_scaler=None):
        layers = list(layers) if isinstance(layers, (list, tuple)) else layers
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers: expected a non-empty list of layers, got {layers!r}")
        for i, layer in enumerate(layers):
            if not _is_layer(layer):
                raise TypeError(f"layers[{i}]: expected a layer (Dense, Conv2d, Sequential, ...), "
                                f"got {type(layer).__name__}")
        self.layers = layers
        self.explicit_input_shape = (None if input_shape is None
                                     else shape_tuple(input_shape, "input_shape"))
        self._init_model(device, dtype, seed, kernels, precision, loss_scaler)
        # Shapes are checked now when the input shape is known (else when the model builds).
        shape = self.input_shape_hint
        if shape is not None:
            self.build(shape)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if self.explicit_input_shape is not None:
            cfg += f", input_shape={self.explicit_input_shape!r}"
        return f"Sequential([\n  {inner}],\n  {cfg})"

    # ---- the layer protocol: a chain ----------------------------------------------------------
    def config(self):
        """The chain (its layers' descriptions and the input shape): the model options are not
        part of the layer (a block's are unused; a checkpoint keeps the model's apart)."""
        config = {"layers": [registry.describe(layer) for layer in self.layers]}
        if self.explicit_input_shape is not None:
            config["input_shape"] = list(self.explicit_input_shape)
        return config

    @classmethod
    def from_config(cls, config, **model_options):
        # A block's model options are never used; "cpu" only keeps "auto" from being resolved.
        model_options.setdefault("device", "cpu")
        return cls([registry.rebuild(x) for x in config["layers"]],
                   input_shape=config.get("input_shape"), **model_options)

    @property
    def input_shape_hint(self):
        if self.explicit_input_shape is not None:
            return self.explicit_input_shape
        return self.layers[0].input_shape_hint

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.input_shape = shape
        for i, layer in enumerate(self.layers):
            try:
                shape = tuple(layer.build(shape))
            except LayerShapeError as e:
                raise LayerShapeError(f"[{i}]{e.path}", e.what, e.detail) from None
            except ValueError as e:
                raise LayerShapeError(f"[{i}]", one_line(layer), str(e)) from None
        self.output_shape = shape
        return shape

    def leaves(self, prefix=""):
        out = []
        for i, layer in enumerate(self.layers):
            out += layer.leaves(f"{prefix}{i}.")
        return out

    def children(self):
        return list(self.layers)

    def run(self, X, train, input_grad):
        # Under a 16-bit precision every layer's output and input gradient is stored rounded
        # (store16; a no-op in fp32): what the GPU keeps in 16 bits between layers.
        be = self.backend
        if not train:
            for layer in self.layers:
                X, _ = layer.forward(X, False)
                X = store16(be, X)
            return X, no_backprop
        callbacks = []
        for i, layer in enumerate(self.layers):
            X, bp = layer.forward(X, True, input_grad or i > 0)
            if not getattr(layer, "_native16", False):  # a 16-bit Dense's A is 16-bit already
                X = store16(be, X)
            callbacks.append(bp)
        callbacks.reverse()

        def backprop(dY):
            for bp in callbacks:
                dY = store16(be, bp(dY))
            return dY

        return X, backprop


def _make_res(ctx):
    inner = ctx.inner()
    if inner.output_shape != ctx.shape:
        raise ctx.error(f"the residual block maps {ctx.fmt(ctx.shape)} to "
                        f"{ctx.fmt(inner.output_shape)}; it must keep the shape (Y = X + block(X))")
    # The block's own model options are never used (the outer model's apply).
    return [("Residual", {"block": inner.entries},
             Residual(Sequential(inner.layers(), device="cpu")))]


registry.register(Residual, SpecToken(
    "res", _make_res, block=True,
    help="res(SPEC)     residual block Y = X + SPEC(X), e.g. "
         "res(conv(16,3,pad=1)-bn-relu-conv(16,3,pad=1)-bn)"))
registry.register(Sequential)
