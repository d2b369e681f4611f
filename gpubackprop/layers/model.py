"""``Model``: what makes a network of layers runnable, the same for a chain and for a graph.

A model owns the backend (device, dtype, kernel set), the flat parameter, gradient and state
buffers (views of which its leaf layers get at ``attach``), the seed and the step counter (a
``ModelContext``), and the host-facing API: ``get_params``/``set_params``/``get_grads``,
``get_state``/``set_state``, ``state_dict``/``load_state_dict``/safetensors, ``predict`` and
``forward``. What the network is comes from the subclass, through four methods of the layer
protocol: ``build(input_shape)``, ``leaves(prefix)``, ``children()`` and ``run(X, train,
input_grad)`` (``Sequential``: a chain; ``gpubackprop.layers.graph``: a functional graph).

A model is also a layer: put inside another model (``Sequential([..., Sequential([...])])``) it
is a block of that model, which then owns every buffer; the inner model's own model-level
methods refuse to run (they would see none of the outer model's buffers).
"""

import numbers

import numpy as np

from gpubackprop import precision as mixed
from gpubackprop import state_dict as torch_io
from gpubackprop.backend import KERNEL_SETS, Backend, check_dtype, resolve_device
from gpubackprop.layers.base import Layer, ModelContext, no_backprop, size_of
from gpubackprop.memory import check_model
from gpubackprop.validation import check_choice, check_finite, describe, host_array, positive_int


class LayerShapeError(ValueError):
    """A shape that does not fit a layer, with where the layer is: "layers[2] Conv2d(...): ..."."""

    def __init__(self, path, what, detail):
        self.path, self.what, self.detail = path, what, detail
        super().__init__(f"layers{path} {what}: {detail}")


def one_line(layer):
    return " ".join(repr(layer).split())


def layer_path(prefix):
    """"layers[3][1]" for the key prefix "3.1.", as shape errors name a layer."""
    return "layers" + "".join(f"[{i}]" for i in prefix.rstrip(".").split("."))


def walk(layer):
    """``layer`` and every layer under it (combinators' children first-to-last), depth first."""
    yield layer
    for child in layer.children():
        yield from walk(child)


class Model(Layer):
    """A runnable network: the buffers, the backend, the seed and the step counter.

    device: "auto" | "cpu" | "cuda"; dtype: "float32" | "float64"; kernels: "fused" | "reference".
    Parameters are initialised from ``seed`` when the model is first used. ``Model(inputs=...,
    outputs=...)`` makes a functional graph (``gpubackprop.layers.graph``); ``Sequential`` a chain.
    """

    def __new__(cls, *args, **kwargs):
        if cls is Model:  # the functional form: its class holds the graph's run and shapes
            from gpubackprop.layers.graph import GraphModel

            return super().__new__(GraphModel)
        return super().__new__(cls)

    def _init_model(self, device, dtype, seed, kernels, precision="fp32", loss_scaler=None):
        # Bad configuration fails here, at construction, not at first use: each is checked (and
        # "cuda" without a usable GPU refused) as the backend will take it.
        resolve_device(device, announce=False)
        check_dtype(dtype)
        check_choice(kernels, KERNEL_SETS, "kernels")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.options = {"device": device, "dtype": dtype, "seed": seed, "kernels": kernels}
        mixed.check_precision(precision, dtype)
        # The loss scaler's options (fp16 only; GradScaler's defaults without loss_scaler).
        self.loss_scaler = mixed.make_scaler(loss_scaler, precision)
        if precision != "fp32":  # a fp32 model's options (its repr, configs) stay as they were
            self.options["precision"] = precision
        self._backend = None
        self._outer = None  # the model this one is a block of, set when that one builds
        self._context = None

    @classmethod
    def from_config(cls, config, **model_options):
        """The model that ``config()`` describes, with these model options (device, dtype, ...);
        ``Model.from_config`` makes a functional graph (as ``Model(inputs=..., outputs=...)``)."""
        from gpubackprop.layers.graph import GraphModel

        return GraphModel.from_config(config, **model_options)

    @property
    def seed(self):
        return self.options["seed"]

    def input_consumers(self):
        """Per input, the leaf layers it feeds directly (a chain: its first leaf)."""
        first = self.layers[0]
        return [first.input_consumers()[0]] if isinstance(first, Model) else [[first]]

    @property
    def input_dtypes(self):
        """Per input: None for the model's dtype, else the integer dtype of a chain whose first
        layer takes indices (``Embedding``: int64); a functional graph declares its own."""
        first = self.layers[0]
        if isinstance(first, Model):
            return first.input_dtypes[:1]
        dtype = getattr(first, "input_dtype", None)
        return [None if dtype is None else np.dtype(dtype)]

    # ---- the network (subclasses) ------------------------------------------------------------
    def run(self, X, train, input_grad):
        """(Y, backprop) of the network alone: no build, no step counting."""
        raise NotImplementedError

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

    def param_keys(self, prefix=""):
        """[(key prefix, layer)] of the layers with parameters, in flat-buffer order."""
        return [(k, layer) for k, layer in self.leaves(prefix) if layer.param_specs()]

    # ---- building: the flat parameter, gradient and state buffers ---------------------------------
    @property
    def backend(self):
        if self._outer is not None:
            return self._outer.backend
        if self._backend is None:
            self._build()
        return self._backend

    def _top(self):
        """Build if needed; refuse when this model is a block of another one."""
        if self._outer is not None:
            raise RuntimeError(f"this {type(self).__name__} is part of another model: use the outer "
                               f"model")
        if self._backend is None:
            self._build()
        return self._backend

    def _build(self):
        if self._outer is not None:
            raise RuntimeError(f"this {type(self).__name__} is part of another model: use the outer "
                               f"model")
        self.build(self._model_input_shape())
        leaves = self.leaves()
        self._check_leaves(leaves)
        mixed.check_layers(leaves, self.precision)
        be = Backend(**self.options)
        # Before anything big is allocated (the initial values included): a size that cannot fit
        # is an error naming the layer, not an out-of-memory traceback half way through.
        check_model([(f"{layer_path(key)} {one_line(layer)}", layer) for key, layer in leaves], be)
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
        # 16-bit precisions: the GEMM layers' forward reads a rounded copy of the master weights
        # (refreshed by every top-level forward: gpubackprop.precision), the rest the masters.
        lowp_layers = {id(layer) for layer in mixed.weight_layers(leaves)} \
            if self.precision != "fp32" else set()
        # On device="cuda" the Dense layers read a real 16-bit copy (flat_params16_storage: one
        # cast a step, views per layer; layers/dense16.py), the others the float32 rounded one.
        native = {id(layer) for layer in mixed.native16_layers(leaves)} \
            if lowp_layers and be.device == "cuda" else set()
        self.flat_params16 = be.empty(self.flat_params.shape) if lowp_layers - native else None
        self.flat_params16_storage = be.empty(self.flat_params.shape,
                                              mixed.storage_dtype(self.precision)) \
            if native else None
        if self.loss_scaler is not None:
            self.loss_scaler.attach(be)
        self.state_buffers = {dt: be.zeros((n,), dt) for dt, n in state_offsets.items()}
        views = {id(layer): ({}, {}, {}) for _, layer in leaves}
        for _, layer, name, o, shape in params:
            p, g, _ = views[id(layer)]
            src = self.flat_params16_storage if id(layer) in native else \
                self.flat_params16 if id(layer) in lowp_layers else self.flat_params
            p[name] = src[o:o + size_of(shape)].reshape(shape)
            g[name] = self.flat_grads[o:o + size_of(shape)].reshape(shape)
        for _, layer, name, dt, o, shape, h in states:
            view = self.state_buffers[dt][o:o + size_of(shape)].reshape(shape)
            view[...] = be.to_device(h.reshape(shape), dt)
            views[id(layer)][2][name] = view
        self._params, self._states = params, states
        self._context = ModelContext(self.seed)
        for index, (_, layer) in enumerate(leaves):
            layer.attach(be, *views[id(layer)], self._context, index)
        if native:
            mixed.link16(walk(self))  # 16-bit activations between adjacent 16-bit Dense layers
        # A chain whose first layer is such a Dense takes its input cast to 16-bit storage (one
        # kernel, not a rounding and then the Dense's cast).
        # Likewise the loss gradient of a chain ending in one goes to it as it is (its cast to
        # 16 bits rounds it: the training step's rounding pass is left out).
        chain = getattr(self, "layers", None) if type(self).__name__ == "Sequential" else None
        self._input16 = bool(chain) and id(chain[0]) in native
        self._output_grad16 = bool(chain) and id(chain[-1]) in native
        # The combinators under this model (Residual, inner models) run on its backend.
        for layer in walk(self):
            if layer is self or not layer.children():
                continue
            if isinstance(layer, Model):
                layer._outer, layer._backend = self, None
            else:
                layer.backend = be
            layer._workspaces = {}
        self._grad_layers = [layer for _, layer in leaves if layer.param_specs()]
        self._workspaces = {}
        self._backend = be

    def _check_leaves(self, leaves):
        """A layer object may appear once (a chain); graphs override this to allow sharing."""
        seen = set()
        for _, layer in leaves:
            if id(layer) in seen:
                raise ValueError(f"layers: the same {type(layer).__name__} object appears "
                                 f"twice; create one per position")
            seen.add(id(layer))

    @property
    def dtype(self):
        return self.backend.dtype

    @property
    def precision(self):
        """"fp32", "bf16" or "fp16" (gpubackprop.precision)."""
        return self.options.get("precision", "fp32")

    @property
    def device(self):
        return self.backend.device

    @property
    def context(self):
        """The model's ModelContext (seed, step), made when the model builds."""
        self._top()
        return self._context

    @property
    def step(self):
        """Training forward passes done so far (read by Dropout; saved by checkpoints)."""
        return self.context.step

    @property
    def flat_state(self):
        """The model-dtype state buffer (running statistics); empty without such state."""
        be = self._top()
        buf = self.state_buffers.get(be.dtype)
        return be.zeros((0,)) if buf is None else buf

    @property
    def n_params(self):
        self._top()
        return int(self.flat_params.size)

    def dense_layers(self):
        from gpubackprop.layers.dense import Dense

        self._top()
        return [layer for _, layer in self.leaves() if isinstance(layer, Dense)]

    def zero_grads(self):
        """Start a new gradient: the next backprop writes the gradients instead of adding to them."""
        if self._outer is not None:  # a block of another model: its leaves are that model's
            for _, layer in self.leaves():
                layer.zero_grads()
            return
        self._top()
        for layer in self._grad_layers:
            layer.zero_grads()

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, X, train=False, input_grad=True):
        if self._outer is not None:  # a block of another model: that model counts the steps
            return self.run(X, train, input_grad)
        self._top()
        if self.precision != "fp32":
            X = self._lowp_input(X, train)
        if not train:
            Y, _ = self.run(X, False, input_grad)
            return Y, no_backprop
        out = self.run(X, True, input_grad)
        self._context.step += 1  # one more training pass (Dropout's masks follow it)
        return out

    def _lowp_input(self, X, train):
        """The 16-bit weight copy from the master weights, and X rounded to 16 bits into a buffer
        of the model's (the caller's X is left alone); integer inputs as they are."""
        be, p = self._backend, self.precision
        if self.flat_params16 is not None:
            be.ops.round16(self.flat_params, p, self.flat_params16)
        if self.flat_params16_storage is not None:  # the Dense layers' 16-bit copy: one kernel
            be.ops.cast16(self.flat_params, self.flat_params16_storage, p)
        several = isinstance(X, (list, tuple))
        out = []
        for i, (x, dt) in enumerate(zip(X if several else [X], self.input_dtypes, strict=True)):
            if dt is not None:
                out.append(x)
                continue
            key = ("input16", i, tuple(x.shape))
            buf = self._workspaces.get(key) if train else None
            if buf is None:
                buf = be.empty(x.shape, mixed.storage_dtype(p) if self._input16 else None)
                if train:
                    if len(self._workspaces) > 8:
                        self._workspaces.clear()
                    self._workspaces[key] = buf
            x = be.xp.ascontiguousarray(x)
            out.append(be.ops.cast16(x, buf, p) if self._input16 else be.ops.round16(x, p, buf))
        return out if several else out[0]

    def __call__(self, X):
        """Inference on device arrays: the model's outputs (logits for a classifier). On symbolic
        tensors (``gb.Input``, layer outputs): this model as a node of a functional graph."""
        from gpubackprop.layers.graph import apply, is_symbolic

        if is_symbolic(X):
            return apply(self, X)
        Y, _ = self.forward(X, train=False)
        return Y

    # ---- host-facing helpers -----------------------------------------------------------------------
    def predict(self, X, loss=None, batch_size=4096):
        """Outputs for X as a host NumPy array: logits, or probabilities through ``loss.link``."""
        be = self._top()
        batch_size = positive_int(batch_size, "batch_size")
        from gpubackprop.training import check_inputs, upload_inputs

        Xh = check_inputs(self, X)  # integer indices stay integers (an Embedding first)
        out = np.empty((Xh.shape[0], *self.output_shape), dtype=be.dtype)
        for s in range(0, Xh.shape[0], batch_size):
            Y = self(upload_inputs(be, self, Xh[s:s + batch_size]))
            out[s:s + batch_size] = be.to_host(Y if loss is None else loss.link(be, Y))
        return out

    def param_slices(self):
        """[(offset, size)] of every parameter array in the flat buffers, in get_params() order."""
        self._top()
        return [(o, size_of(s)) for _, _, _, o, s in self._params]

    def get_params(self):
        """{"{i}.W": (n_out, n_in), "{i}.b": (n_out,), "{i}.weight": ..., ...} as host copies."""
        self._top()
        return {key: self._host(self.flat_params, o, s) for key, _, _, o, s in self._params}

    def get_grads(self):
        """The flat gradient buffer's views as host copies, with get_params()'s keys and shapes (what
        the last backprop wrote: zero_grads() only marks them stale)."""
        self._top()
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
        self._top()
        expected = {key: (self.flat_params, o, s, None) for key, _, _, o, s in self._params}
        self._copy_in(params, expected, "params", "get_params()")

    def get_state(self):
        """Non-trained state as host copies: {"{i}.running_mean": ..., ..., "step": int64 0-d}."""
        self._top()
        state = {key: self._host(self.state_buffers[dt], o, s)
                 for key, _, _, dt, o, s, _ in self._states}
        state["step"] = np.array(self._context.step, dtype=np.int64)
        if self.loss_scaler is not None:  # fp16: the dynamic loss scale and its growth tracker
            state.update(self.loss_scaler.get_state())
        return state

    def set_state(self, state):
        """Copy host state in; keys and shapes must match ``get_state()`` ("step" may be left out)."""
        self._top()
        if isinstance(state, dict) and "step" in state:
            step = host_array(state["step"], "state['step']")
            if step.shape != () or not np.issubdtype(step.dtype, np.integer) or step < 0:
                raise ValueError(f"state['step']: expected an integer >= 0, got {describe(step)}")
            state = {k: v for k, v in state.items() if k != "step"}
        else:
            step = None
        scaler_state = None
        if self.loss_scaler is not None and isinstance(state, dict):
            names = ("loss_scale", "loss_scale_growth_tracker")
            if not all(k in state for k in names):
                raise ValueError(f"state: expected keys {list(names)} of the fp16 loss scaler, got "
                                 f"{sorted(state)}")
            scaler_state = [host_array(state[k], f"state[{k!r}]") for k in names]
            self.loss_scaler.check_state(*scaler_state)  # checked before anything is written
            state = {k: v for k, v in state.items() if k not in names}
        expected = {key: (self.state_buffers[dt], o, s, dt)
                    for key, _, _, dt, o, s, _ in self._states}
        self._copy_in(state, expected, "state", "get_state()")
        if step is not None:
            self._context.step = int(step)
        if scaler_state is not None:
            self.loss_scaler.set_state(*scaler_state)

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
