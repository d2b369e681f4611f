"""``Sequential`` (a chain of layers; the outermost one is the model) and ``Residual``."""

import numbers

import numpy as np

from gpubackprop import state_dict as torch_io
from gpubackprop.backend import KERNEL_SETS, Backend, check_dtype, resolve_device
from gpubackprop.layers.base import Layer, ModelContext, fmt_shape, no_backprop, shape_tuple, size_of
from gpubackprop.memory import check_model
from gpubackprop.validation import check_choice, check_finite, describe, host_array, positive_int, samples


class LayerShapeError(ValueError):
    """A shape that does not fit a layer, with where the layer is: "layers[2] Conv2d(...): ..."."""

    def __init__(self, path, what, detail):
        self.path, self.what, self.detail = path, what, detail
        super().__init__(f"layers{path} {what}: {detail}")


def one_line(layer):
    return " ".join(repr(layer).split())


def _layer_path(prefix):
    """"layers[3][1]" for the key prefix "3.1.", as shape errors name a layer."""
    return "layers" + "".join(f"[{i}]" for i in prefix.rstrip(".").split("."))


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

    def bind_tree(self, backend):
        self.backend = backend
        self._workspaces = {}
        if hasattr(self.block, "bind_tree"):
            self.block.bind_tree(backend)

    def forward(self, X, train=False, input_grad=True):
        xp = self.backend.xp
        H, block_backprop = self.block.forward(X, train, input_grad)
        if train:
            Y = self.workspace(X.shape, lambda: xp.empty_like(H))
        else:
            Y = xp.empty_like(H)
        xp.add(X, H, out=Y)

        def backprop(dY):
            dX = block_backprop(dY)
            if dX is None:
                return None
            if xp.may_share_memory(dX, dY):  # a block that passes dY through (Flatten-like)
                return dX + dY
            # The skip path passes dY straight through; dX is the block's own scratch buffer.
            dX += dY
            return dX

        return Y, backprop


def _mismatch(shape_in, shape_out):
    if len(shape_in) == 1 and len(shape_out) == 1:
        return f"expected it to map n features to n, got {shape_in[0]} -> {shape_out[0]}"
    return (f"expected its block to keep the input shape {fmt_shape(shape_in)}, got "
            f"{fmt_shape(shape_out)}")


class Sequential(Layer):
    """A chain of layers; the outermost Sequential is the model and owns the flat buffers.

    device: "auto" | "cpu" | "cuda"; dtype: "float32" | "float64"; kernels: "fused" | "reference".
    ``input_shape``: the per-sample input shape, e.g. (1, 28, 28) (NCHW); by default the first
    layer's (``Dense(n_in, .)``: (n_in,)). Parameters are initialised from ``seed`` when the
    model is first used.
    """

    def __init__(self, layers, device="auto", dtype="float32", seed=0, kernels="fused",
                 input_shape=None):
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
        # Bad configuration fails here, at construction, not at first use: each is checked (and
        # "cuda" without a usable GPU refused) as the backend will take it.
        resolve_device(device, announce=False)
        check_dtype(dtype)
        check_choice(kernels, KERNEL_SETS, "kernels")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.config = {"device": device, "dtype": dtype, "seed": seed, "kernels": kernels}
        self._backend = None
        self._nested = False  # set when another Sequential owns this one
        self._context = None  # the model's ModelContext: only the outermost one counts steps
        # Shapes are checked now when the input shape is known (else when the model builds).
        shape = self.input_shape_hint
        if shape is not None:
            self.build(shape)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        if self.explicit_input_shape is not None:
            cfg += f", input_shape={self.explicit_input_shape!r}"
        return f"Sequential([\n  {inner}],\n  {cfg})"

    # ---- shapes -----------------------------------------------------------------------------------
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

    def _model_input_shape(self):
        shape = self.input_shape_hint
        if shape is None:
            raise ValueError(f"input_shape: the first layer, {one_line(self.layers[0])}, takes "
                             f"inputs of several shapes; give the per-sample input shape, e.g. "
                             f"Sequential(..., input_shape=(C, H, W))")
        return shape

    @property
    def n_in(self):
        """Input features per sample (the size of the per-sample input shape)."""
        return size_of(self.input_shape or self._model_input_shape())

    @property
    def n_out(self):
        """Outputs per sample (the size of the per-sample output shape)."""
        if self.output_shape is None:
            self.build(self._model_input_shape())
        return size_of(self.output_shape)

    def leaves(self, prefix=""):
        out = []
        for i, layer in enumerate(self.layers):
            out += layer.leaves(f"{prefix}{i}.")
        return out

    def param_keys(self, prefix=""):
        """[(key prefix, layer)] of the layers with parameters, in flat-buffer order."""
        return [(k, layer) for k, layer in self.leaves(prefix) if layer.param_specs()]

    # ---- building: the flat parameter, gradient and state buffers ---------------------------------
    @property
    def backend(self):
        if self._backend is None:
            self._build()
        return self._backend

    def _build(self):
        if self._nested:
            raise RuntimeError("this Sequential is part of another model: use the outer model")
        self.build(self._model_input_shape())
        leaves = self.leaves()
        if len({id(layer) for _, layer in leaves}) != len(leaves):
            seen = set()
            for _, layer in leaves:
                if id(layer) in seen:
                    raise ValueError(f"layers: the same {type(layer).__name__} object appears "
                                     f"twice; create one per position")
                seen.add(id(layer))
        be = Backend(**self.config)
        # Before anything big is allocated (the initial values included): a size that cannot fit
        # is an error naming the layer, not an out-of-memory traceback half way through.
        check_model([(f"{_layer_path(key)} {one_line(layer)}", layer) for key, layer in leaves], be)
        # Layout: every leaf's parameters in order, each array contiguous (Dense: W then b); the
        # non-trained state likewise, in one flat buffer per dtype (the model dtype's first).
        params, states, host = [], [], []
        offset, state_offsets = 0, {}
        for key, layer in leaves:
            specs = [(name, tuple(shape)) for name, shape in layer.param_specs()]
            init = layer.initial_params(be.rng) if specs else {}
            for name, shape in specs:
                h = np.asarray(init[name], dtype=np.float64)
                if h.shape != shape:
                    raise ValueError(f"{one_line(layer)}.initial_params: {name!r} has shape "
                                     f"{h.shape}, its spec says {shape}")
                params.append((key + name, layer, name, offset, shape))
                host.append(h.ravel())
                offset += size_of(shape)
            sspecs = layer.state_specs()
            sinit = layer.initial_state() if sspecs else {}
            for name, shape, dtype in sspecs:
                dt = be.dtype if dtype is None else np.dtype(dtype)
                start = state_offsets.get(dt, 0)
                states.append((key + name, layer, name, dt, start, tuple(shape),
                               np.asarray(sinit[name])))
                state_offsets[dt] = start + size_of(shape)
        self.flat_params = be.to_device(np.concatenate(host) if host else np.zeros(0))
        self.flat_grads = be.zeros(self.flat_params.shape)
        self.state_buffers = {dt: be.zeros((n,), dt) for dt, n in state_offsets.items()}
        views = {id(layer): ({}, {}, {}) for _, layer in leaves}
        for _, layer, name, o, shape in params:
            p, g, _ = views[id(layer)]
            p[name] = self.flat_params[o:o + size_of(shape)].reshape(shape)
            g[name] = self.flat_grads[o:o + size_of(shape)].reshape(shape)
        for _, layer, name, dt, o, shape, h in states:
            view = self.state_buffers[dt][o:o + size_of(shape)].reshape(shape)
            view[...] = be.to_device(h.reshape(shape), dt)
            views[id(layer)][2][name] = view
        self._params, self._states = params, states
        self._context = ModelContext(self.config["seed"])
        for index, (_, layer) in enumerate(leaves):
            layer.attach(be, *views[id(layer)], self._context, index)
        for layer in self.layers:
            if hasattr(layer, "bind_tree"):
                layer.bind_tree(be)
        self._grad_layers = [layer for _, layer in leaves if layer.param_specs()]
        self._backend = be

    def bind_tree(self, backend):
        """Make this Sequential part of a model that runs on ``backend`` (the outer one owns it)."""
        self._nested = True
        self._backend = backend
        for layer in self.layers:
            if hasattr(layer, "bind_tree"):
                layer.bind_tree(backend)

    @property
    def dtype(self):
        return self.backend.dtype

    @property
    def device(self):
        return self.backend.device

    @property
    def context(self):
        """The model's ModelContext (seed, step), made when the model builds."""
        self.backend  # noqa: B018 (build first)
        return self._context

    @property
    def step(self):
        """Training forward passes done so far (read by Dropout; saved by checkpoints)."""
        return self.context.step

    @property
    def flat_state(self):
        """The model-dtype state buffer (running statistics); empty without such state."""
        be = self.backend
        buf = self.state_buffers.get(be.dtype)
        return be.zeros((0,)) if buf is None else buf

    @property
    def n_params(self):
        self.backend  # noqa: B018 (build first)
        return int(self.flat_params.size)

    def dense_layers(self):
        from gpubackprop.layers.dense import Dense

        self.backend  # noqa: B018 (build first)
        return [layer for _, layer in self.leaves() if isinstance(layer, Dense)]

    def zero_grads(self):
        """Start a new gradient: the next backprop writes the gradients instead of adding to them."""
        if self._backend is None:
            self._build()
        for layer in self._grad_layers:
            layer.zero_grads()

    # ---- the layer protocol ----------------------------------------------------------------------
    def forward(self, X, train=False, input_grad=True):
        if self._backend is None:
            self._build()
        if not train:
            for layer in self.layers:
                X, _ = layer.forward(X, False)
            return X, no_backprop
        callbacks = []
        for i, layer in enumerate(self.layers):
            X, bp = layer.forward(X, True, input_grad or i > 0)
            callbacks.append(bp)
        callbacks.reverse()
        if self._context is not None and not self._nested:
            self._context.step += 1  # one more training pass (Dropout's masks follow it)

        def backprop(dY):
            for bp in callbacks:
                dY = bp(dY)
            return dY

        return X, backprop

    def __call__(self, X):
        """Inference on device arrays: the model's outputs (logits for a classifier)."""
        Y, _ = self.forward(X, train=False)
        return Y

    # ---- host-facing helpers -----------------------------------------------------------------------
    def predict(self, X, loss=None, batch_size=4096):
        """Outputs for X as a host NumPy array: logits, or probabilities through ``loss.link``."""
        be = self.backend
        batch_size = positive_int(batch_size, "batch_size")
        Xh = samples(X, self.input_shape)
        out = np.empty((Xh.shape[0], *self.output_shape), dtype=be.dtype)
        for s in range(0, Xh.shape[0], batch_size):
            Y = self(be.to_device(Xh[s:s + batch_size]))
            out[s:s + batch_size] = be.to_host(Y if loss is None else loss.link(be, Y))
        return out

    def param_slices(self):
        """[(offset, size)] of every parameter array in the flat buffers, in get_params() order."""
        self.backend  # noqa: B018 (build first)
        return [(o, size_of(s)) for _, _, _, o, s in self._params]

    def get_params(self):
        """{"{i}.W": (n_out, n_in), "{i}.b": (n_out,), "{i}.weight": ..., ...} as host copies."""
        self.backend  # noqa: B018 (build first)
        return {key: self._host(self.flat_params, o, s) for key, _, _, o, s in self._params}

    def get_grads(self):
        """The flat gradient buffer's views as host copies, with get_params()'s keys and shapes (what
        the last backprop wrote: zero_grads() only marks them stale)."""
        self.backend  # noqa: B018 (build first)
        return {key: self._host(self.flat_grads, o, s) for key, _, _, o, s in self._params}

    def _host(self, buf, offset, shape):
        return np.array(self._backend.to_host(buf[offset:offset + size_of(shape)])).reshape(shape)

    # ---- PyTorch weights (gpubackprop.state_dict) -------------------------------------------------
    def state_dict(self):
        """OrderedDict {key: host array} with torch's keys and layouts ("0.weight", "1.running_mean",
        "2.weight_ih_l0", ...); positions are this model's (see gpubackprop.state_dict)."""
        return torch_io.state_dict(self)

    def load_state_dict(self, state_dict, strict=True):
        """Copy a state dict in (NumPy arrays or torch tensors), every key, shape and dtype checked
        first; returns (missing_keys, unexpected_keys), as torch."""
        return torch_io.load_state_dict(self, state_dict, strict)

    def save_safetensors(self, path):
        """Write state_dict() to ``path`` as a safetensors file, atomically."""
        torch_io.save_safetensors(self, path)

    def load_safetensors(self, path, strict=True):
        """load_state_dict() from a safetensors file."""
        return torch_io.load_safetensors(self, path, strict)

    def set_params(self, params):
        """Copy host arrays in; keys and shapes must match ``get_params()`` exactly."""
        self.backend  # noqa: B018 (build first)
        expected = {key: (self.flat_params, o, s, None) for key, _, _, o, s in self._params}
        self._copy_in(params, expected, "params", "get_params()")

    def get_state(self):
        """Non-trained state as host copies: {"{i}.running_mean": ..., ..., "step": int64 0-d}."""
        self.backend  # noqa: B018 (build first)
        state = {key: self._host(self.state_buffers[dt], o, s)
                 for key, _, _, dt, o, s, _ in self._states}
        state["step"] = np.array(self._context.step, dtype=np.int64)
        return state

    def set_state(self, state):
        """Copy host state in; keys and shapes must match ``get_state()`` ("step" may be left out)."""
        self.backend  # noqa: B018 (build first)
        if isinstance(state, dict) and "step" in state:
            step = host_array(state["step"], "state['step']")
            if step.shape != () or not np.issubdtype(step.dtype, np.integer) or step < 0:
                raise ValueError(f"state['step']: expected an integer >= 0, got {describe(step)}")
            state = {k: v for k, v in state.items() if k != "step"}
        else:
            step = None
        expected = {key: (self.state_buffers[dt], o, s, dt)
                    for key, _, _, dt, o, s, _ in self._states}
        self._copy_in(state, expected, "state", "get_state()")
        if step is not None:
            self._context.step = int(step)

    def _copy_in(self, arrays, expected, what, source):
        be = self._backend
        if not isinstance(arrays, dict):
            raise TypeError(f"{what}: expected a dict like {source} returns, got "
                            f"{type(arrays).__name__}")
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise ValueError(f"{what}: expected keys {sorted(expected)}, missing {missing}, "
                             f"unexpected {extra}")
        staged = {}
        for key, (_, _, shape, _) in expected.items():
            h = host_array(arrays[key], f"{what}[{key!r}]")
            if h.shape != shape:
                raise ValueError(f"{what}[{key!r}]: expected shape {shape}, got {describe(h)}")
            staged[key] = check_finite(h, f"{what}[{key!r}]")
        for key, (buf, o, shape, dt) in expected.items():  # all checked before anything is written
            buf[o:o + size_of(shape)] = be.to_device(staged[key].ravel(), dt)
