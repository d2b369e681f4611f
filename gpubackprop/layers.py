"""Layers: ``Dense``, ``Sequential`` and ``Residual``.

Protocol: ``forward(X, train, input_grad=True) -> (Y, backprop)`` and ``backprop(dY) -> dX``.
``backprop`` adds this call's parameter gradients to the model's gradient buffer (the first call
after ``zero_grads`` writes them) and never modifies ``dY``. With ``input_grad=False`` the layer
skips the input gradient (the first layer of a model needs none) and ``backprop`` returns None.

In training mode the arrays a layer returns live in buffers it reuses on the next forward pass
of the same batch size, so a step allocates nothing; in inference mode every output is new.
"""

import math
import numbers

import numpy as np

from gpubackprop.backend import KERNEL_SETS, Backend, check_dtype, resolve_device
from gpubackprop.kernels.reference import ACTIVATIONS, saves_input
from gpubackprop.validation import check_choice, check_finite, describe, features, host_array, positive_int

INITS = ("he", "xavier", "lecun", "normal")


def init_weights(scheme, n_in, n_out, rng):
    """Host float64 weights (n_out, n_in) drawn from ``rng`` by the named scheme."""
    if scheme == "he":  # Kaiming normal: keeps the variance of ReLU activations
        return rng.normal(0.0, math.sqrt(2.0 / n_in), (n_out, n_in))
    if scheme == "xavier":  # Glorot uniform: keeps variance forward and backward for tanh
        limit = math.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-limit, limit, (n_out, n_in))
    if scheme == "lecun":
        return rng.normal(0.0, math.sqrt(1.0 / n_in), (n_out, n_in))
    return rng.normal(0.0, 0.05, (n_out, n_in))  # "normal", Keras' RandomNormal default


class _Workspace:
    """Buffers a Dense layer reuses for one batch size."""

    __slots__ = ("Z", "A", "dZ", "dX", "_dW", "_be", "_wshape")

    def __init__(self, be, B, n_in, n_out, activation):
        self.Z = be.empty((B, n_out))
        # A overwrites Z unless the derivative needs Z (gelu).
        self.A = be.empty((B, n_out)) if saves_input(activation) else self.Z
        self.dZ = be.empty((B, n_out))
        self.dX = be.empty((B, n_in))
        self._dW = None  # made on first need: only a layer used twice in one step accumulates
        self._be, self._wshape = be, (n_out, n_in)

    def dW_tmp(self):
        if self._dW is None:
            self._dW = self._be.empty(self._wshape)
        return self._dW


class Dense:
    """Fully connected layer: Z = X Wᵀ + b, A = σ(Z); W is (n_out, n_in) as in torch's Linear."""

    def __init__(self, n_in, n_out, activation="identity", init=None):
        self.n_in = positive_int(n_in, "n_in")
        self.n_out = positive_int(n_out, "n_out")
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        if init is None:
            init = "he" if activation in ("relu", "leaky_relu", "gelu") else "xavier"
        self.init = check_choice(init, INITS, "init")
        self.backend = None
        self.W = self.b = self.dW = self.db = None  # views into the model's flat buffers
        self._workspaces = {}
        self._accumulate = False  # False: the next backprop writes the gradients

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r}, init={self.init!r})"

    @property
    def n_params(self):
        return self.n_out * self.n_in + self.n_out

    def param_keys(self, prefix):
        return [(prefix, self)]

    def attach(self, backend, params, grads):
        """Bind to a backend; ``params``/``grads`` are this layer's slices of the flat buffers."""
        self.backend = backend
        nw = self.n_out * self.n_in
        self.W = params[:nw].reshape(self.n_out, self.n_in)
        self.b = params[nw:]
        self.dW = grads[:nw].reshape(self.n_out, self.n_in)
        self.db = grads[nw:]
        self._workspaces = {}
        # Hot-path constants: the transposed view the forward GEMM reads (no copy: numpy passes
        # it to sgemm as a transposed operand), the dtype, and the kernel entry points.
        self._WT = self.W.T
        self._dtype = backend.dtype
        self._matmul = backend.xp.matmul
        self._multiply = backend.xp.multiply
        self._saves_input = saves_input(self.activation)

    def initial_params(self, rng):
        """Host float64 (W, b) for a fresh model; biases start at zero."""
        return init_weights(self.init, self.n_in, self.n_out, rng), np.zeros(self.n_out)

    def zero_grads(self):
        self._accumulate = False

    def _workspace(self, B):
        ws = self._workspaces.get(B)
        if ws is None:
            if len(self._workspaces) > 4:  # many batch sizes (e.g. predict): keep memory bounded
                self._workspaces.clear()
            ws = self._workspaces[B] = _Workspace(self.backend, B, self.n_in, self.n_out,
                                                  self.activation)
        return ws

    def forward(self, X, train=False, input_grad=True):
        if X.ndim != 2 or X.shape[1] != self.n_in:
            raise ValueError(f"Dense({self.n_in}, {self.n_out}) input: expected shape (batch, "
                             f"{self.n_in}), got {tuple(X.shape)}")
        if X.dtype != self._dtype:
            raise TypeError(f"Dense input: expected dtype {self._dtype}, got {X.dtype}")
        if not train:
            return self._infer(X), _no_backprop
        # Training: everything lives in this batch size's workspace, so a step allocates nothing.
        ws = self._workspaces.get(X.shape[0]) or self._workspace(X.shape[0])
        Z, A = ws.Z, ws.A
        self._matmul(X, self._WT, out=Z)  # forward GEMM: Z = X Wᵀ
        ops = self.backend.ops
        act = self.activation
        ops.bias_act(Z, self.b, act, A)  # Z += b; A = σ(Z), one pass
        saved = Z if self._saves_input else A
        matmul, dW, db, W, dZbuf, dX = self._matmul, self.dW, self.db, self.W, ws.dZ, ws.dX
        identity = act == "identity"
        # With one sample BP3 is an outer product, for which NumPy's matmul leaves BLAS for a
        # plain loop (4x slower than a broadcast multiply here); Δᵀ (n_out, 1) · X (1, n_in).
        weight_grad = self._multiply if X.shape[0] == 1 else matmul

        def backprop(dA):
            # BP1/BP2, the Hadamard part: Δ = dA ⊙ σ'(Z), one fused pass (identity: Δ = dA).
            dZ = dA if identity else ops.act_backward(dA, saved, act, dZbuf)
            if self._accumulate:
                # BP3 (accumulating): ∂C/∂W += Δᵀ A_prev, through the workspace (no temporary).
                tmp = ws.dW_tmp()
                weight_grad(dZ.T, X, out=tmp)
                self.dW += tmp
                ops.bias_grad(dZ, db, accumulate=True)  # BP4
            else:
                # BP3: ∂C/∂W = Δᵀ A_prev, a GEMM straight into the flat gradient buffer; Δᵀ is a
                # transposed view, so sgemm reads it in place.
                weight_grad(dZ.T, X, out=dW)
                ops.bias_grad(dZ, db, accumulate=False)  # BP4: ∂C/∂b = Σ_rows Δ
                self._accumulate = True
            if not input_grad:
                return None
            # BP2, the GEMM part: the error sent to the layer below is Δ W (its σ' is applied there).
            return matmul(dZ, W, out=dX)

        return A, backprop

    def _infer(self, X):
        be = self.backend
        Z = be.empty((X.shape[0], self.n_out))
        A = be.empty(Z.shape) if self._saves_input else Z
        self._matmul(X, self._WT, out=Z)
        be.ops.bias_act(Z, self.b, self.activation, A)
        return A


class Residual:
    """Y = X + block(X); the block must map n features to n."""

    def __init__(self, block):
        if not hasattr(block, "forward"):
            raise TypeError(f"block: expected a layer (Dense, Sequential, Residual), got "
                            f"{type(block).__name__}")
        if block.n_in != block.n_out:
            raise ValueError(f"Residual block: expected it to map n features to n, got "
                             f"{block.n_in} -> {block.n_out}")
        self.block = block
        self.backend = None
        self._out = {}

    def __repr__(self):
        return f"Residual({self.block!r})"

    n_in = property(lambda self: self.block.n_in)
    n_out = property(lambda self: self.block.n_out)

    def param_keys(self, prefix):
        return self.block.param_keys(prefix)  # transparent: its block's names

    def attach_backend(self, backend):
        self.backend = backend
        self._out = {}

    def forward(self, X, train=False, input_grad=True):
        xp = self.backend.xp
        H, block_backprop = self.block.forward(X, train, input_grad)
        if train:
            Y = self._out.get(X.shape)
            if Y is None:
                if len(self._out) > 4:
                    self._out.clear()
                Y = self._out[X.shape] = xp.empty_like(H)
        else:
            Y = xp.empty_like(H)
        xp.add(X, H, out=Y)

        def backprop(dY):
            dX = block_backprop(dY)
            if dX is None:
                return None
            # The skip path passes dY straight through; dX is the block's own scratch buffer.
            dX += dY
            return dX

        return Y, backprop


class Sequential:
    """A chain of layers; the outermost Sequential is the model and owns the flat buffers.

    device: "auto" | "cpu" | "cuda"; dtype: "float32" | "float64"; kernels: "fused" | "reference".
    Parameters are initialised from ``seed`` when the model is first used.
    """

    def __init__(self, layers, device="auto", dtype="float32", seed=0, kernels="fused"):
        layers = list(layers) if isinstance(layers, (list, tuple)) else layers
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers: expected a non-empty list of layers, got {layers!r}")
        for i, layer in enumerate(layers):
            if not hasattr(layer, "forward") or not hasattr(layer, "param_keys"):
                raise TypeError(f"layers[{i}]: expected a layer (Dense, Sequential, Residual), "
                                f"got {type(layer).__name__}")
        for i in range(1, len(layers)):
            if layers[i - 1].n_out != layers[i].n_in:
                raise ValueError(f"layers[{i}]: expected {layers[i - 1].n_out} input features "
                                 f"(layers[{i - 1}] gives {layers[i - 1].n_out}), got "
                                 f"{layers[i].n_in}")
        self.layers = layers
        # Bad configuration fails here, at construction, not at first use: each is checked (and
        # "cuda" without a usable GPU refused) as the backend will take it.
        resolve_device(device)
        check_dtype(dtype)
        check_choice(kernels, KERNEL_SETS, "kernels")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.config = {"device": device, "dtype": dtype, "seed": seed, "kernels": kernels}
        self._backend = None
        self._nested = False  # set when another Sequential owns this one

    def __repr__(self):
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"Sequential([\n  {inner}],\n  {cfg})"

    n_in = property(lambda self: self.layers[0].n_in)
    n_out = property(lambda self: self.layers[-1].n_out)

    def param_keys(self, prefix=""):
        keys = []
        for i, layer in enumerate(self.layers):
            keys += layer.param_keys(f"{prefix}{i}.")
        return keys

    # ---- building: one flat parameter buffer and one flat gradient buffer ------------------------
    @property
    def backend(self):
        if self._backend is None:
            self._build()
        return self._backend

    def _build(self):
        if self._nested:
            raise RuntimeError("this Sequential is part of another model: use the outer model")
        be = Backend(**self.config)
        dense = [layer for _, layer in self.param_keys()]
        if len(set(map(id, dense))) != len(dense):
            raise ValueError("layers: the same Dense object appears twice; create one per position")
        host = []
        for layer in dense:
            W, b = layer.initial_params(be.rng)
            host += [W.ravel(), b]
        self.flat_params = be.to_device(np.concatenate(host))
        self.flat_grads = be.zeros(self.flat_params.shape)
        offset = 0
        for layer in dense:
            n = layer.n_params
            layer.attach(be, self.flat_params[offset:offset + n], self.flat_grads[offset:offset + n])
            offset += n
        self._attach_backend(be)
        self._dense = None  # zero_grads lists the Dense layers again
        self._backend = be

    def _attach_backend(self, be):
        for layer in self.layers:
            _attach_tree(layer, be)

    @property
    def dtype(self):
        return self.backend.dtype

    @property
    def device(self):
        return self.backend.device

    @property
    def n_params(self):
        self.backend  # noqa: B018 (build first)
        return int(self.flat_params.size)

    def dense_layers(self):
        self.backend  # noqa: B018 (build first)
        return [layer for _, layer in self.param_keys()]

    def zero_grads(self):
        """Start a new gradient: the next backprop writes the gradients instead of adding to them."""
        dense = self.__dict__.get("_dense")  # the Dense layers, listed once per build
        if dense is None:
            dense = self._dense = self.dense_layers()
        for layer in dense:
            layer.zero_grads()

    # ---- the layer protocol ----------------------------------------------------------------------
    def forward(self, X, train=False, input_grad=True):
        if self._backend is None:
            self._build()
        if not train:
            for layer in self.layers:
                X, _ = layer.forward(X, False)
            return X, _no_backprop
        callbacks = []
        for i, layer in enumerate(self.layers):
            X, bp = layer.forward(X, True, input_grad or i > 0)
            callbacks.append(bp)
        callbacks.reverse()

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
        Xh = features(X, self.n_in)
        out = np.empty((Xh.shape[0], self.n_out), dtype=be.dtype)
        for s in range(0, Xh.shape[0], batch_size):
            Y = self(be.to_device(Xh[s:s + batch_size]))
            out[s:s + batch_size] = be.to_host(Y if loss is None else loss.link(be, Y))
        return out

    def get_params(self):
        """{"{i}.W": (n_out, n_in), "{i}.b": (n_out,)} as host NumPy copies."""
        be = self.backend
        params = {}
        for key, layer in self.param_keys():
            params[key + "W"] = np.array(be.to_host(layer.W))
            params[key + "b"] = np.array(be.to_host(layer.b))
        return params

    def set_params(self, params):
        """Copy host arrays in; keys and shapes must match ``get_params()`` exactly."""
        be = self.backend
        if not isinstance(params, dict):
            raise TypeError(f"params: expected a dict like get_params() returns, got "
                            f"{type(params).__name__}")
        expected = {}
        for key, layer in self.param_keys():
            expected[key + "W"], expected[key + "b"] = layer.W, layer.b
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ValueError(f"params: expected keys {sorted(expected)}, missing {missing}, "
                             f"unexpected {extra}")
        staged = {}
        for key, dest in expected.items():
            h = host_array(params[key], f"params[{key!r}]")
            if h.shape != tuple(dest.shape):
                raise ValueError(f"params[{key!r}]: expected shape {tuple(dest.shape)}, got "
                                 f"{describe(h)}")
            staged[key] = check_finite(h, f"params[{key!r}]")
        for key, dest in expected.items():  # all checked before anything is written
            dest[...] = be.to_device(staged[key])


def _attach_tree(layer, be):
    """Give every combinator under a model the model's backend (Dense layers get theirs in _build)."""
    if isinstance(layer, Sequential):
        layer._nested = True
        layer._backend = be
        layer._attach_backend(be)
    elif isinstance(layer, Residual):
        layer.attach_backend(be)
        _attach_tree(layer.block, be)


def _no_backprop(dY):
    raise RuntimeError("backprop after forward(train=False): call forward(X, train=True)")
