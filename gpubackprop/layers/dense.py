"""``Dense`` (fully connected) and ``Flatten``."""

import math

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS, saves_input
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop, size_of
from gpubackprop.layers.dense16 import forward16, infer16
from gpubackprop.layers.registry import REQUIRED, SpecToken, register
from gpubackprop.validation import check_choice, positive_int

INITS = ("he", "xavier", "lecun", "normal")


def init_weights(scheme, n_in, n_out, rng, shape=None, fan_out=None):
    """Host float64 weights of ``shape`` (default (n_out, n_in)) drawn from ``rng`` by the named
    scheme; ``n_in`` is the fan-in, ``fan_out`` (default ``n_out``) the fan-out."""
    shape = (n_out, n_in) if shape is None else shape
    fan_out = n_out if fan_out is None else fan_out
    if scheme == "he":  # Kaiming normal: keeps the variance of ReLU activations
        return rng.normal(0.0, math.sqrt(2.0 / n_in), shape)
    if scheme == "xavier":  # Glorot uniform: keeps variance forward and backward for tanh
        limit = math.sqrt(6.0 / (n_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if scheme == "lecun":
        return rng.normal(0.0, math.sqrt(1.0 / n_in), shape)
    return rng.normal(0.0, 0.05, shape)  # "normal", Keras' RandomNormal default


class _Workspace:
    """Buffers a Dense layer reuses for one batch size."""

    __slots__ = ("Z", "A", "dZ", "dX", "_dW", "_be", "_wshape")

    def __init__(self, be, B, n_in, n_out, activation):
        self.Z = be.empty((B, n_out))
        # A overwrites Z unless the derivative needs Z (the gelus).
        self.A = be.empty((B, n_out)) if saves_input(activation) else self.Z
        self.dZ = be.empty((B, n_out))
        self.dX = be.empty((B, n_in))
        self._dW = None  # made on first need: only a layer used twice in one step accumulates
        self._be, self._wshape = be, (n_out, n_in)

    def dW_tmp(self):
        if self._dW is None:
            self._dW = self._be.empty(self._wshape)
        return self._dW


class Dense(Layer):
    """Fully connected layer: Z = X Wᵀ + b, A = σ(Z); W is (n_out, n_in) as in torch's Linear.

    As torch's ``nn.Linear`` it applies to the last axis: a per-sample input (..., n_in) gives
    (..., n_out) (a sequence (T, n_in): every position by the same W). The GEMMs run on the
    (rows, n_in) view of the batch, rows = N·prod(...), a view without a copy for a contiguous
    input; BP3 and BP4 sum over all those rows.
    """

    def __init__(self, n_in, n_out, activation="identity", init=None):
        self.n_in = positive_int(n_in, "n_in")
        self.n_out = positive_int(n_out, "n_out")
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        if init is None:
            init = "he" if activation in ("relu", "leaky_relu", "gelu", "gelu_tanh") else "xavier"
        self.init = check_choice(init, INITS, "init")
        self.W = self.b = self.dW = self.db = None  # views into the model's flat buffers
        self._workspaces = {}
        self.input_shape, self.output_shape = (self.n_in,), (self.n_out,)

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r}, init={self.init!r})"

    # ---- declaring --------------------------------------------------------------------------------
    @property
    def input_shape_hint(self):
        return (self.n_in,)

    def infer_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape or input_shape[-1] != self.n_in:
            if len(input_shape) == 1:
                raise ValueError(f"expected {self.n_in} input features, got {input_shape[0]} "
                                 f"(input shape {fmt_shape(input_shape)})")
            if input_shape and size_of(input_shape) == self.n_in:  # an image meant to be flattened
                raise ValueError(f"expected input shape ({self.n_in},), got "
                                 f"{fmt_shape(input_shape)}; put a Flatten() before it")
            raise ValueError(f"expected input shape (..., {self.n_in}) ({self.n_in} features on the "
                             f"last axis), got {fmt_shape(input_shape)}")
        return (*input_shape[:-1], self.n_out)  # the last axis mapped, the others kept (torch)

    @property
    def n_params(self):
        return self.n_out * self.n_in + self.n_out

    def param_specs(self):
        return [("W", (self.n_out, self.n_in)), ("b", (self.n_out,))]

    def initial_params(self, rng):
        """Host float64 {W, b} for a fresh model; biases start at zero."""
        return {"W": init_weights(self.init, self.n_in, self.n_out, rng),
                "b": np.zeros(self.n_out)}

    def config(self):
        return {"n_in": self.n_in, "n_out": self.n_out, "activation": self.activation,
                "init": self.init}

    # ---- binding ----------------------------------------------------------------------------------
    def attach(self, backend, params, grads, state, context, index):
        super().attach(backend, params, grads, state, context, index)
        self.W, self.b = params["W"], params["b"]
        self.dW, self.db = grads["W"], grads["b"]
        # Hot-path constants: the transposed view the forward GEMM reads (no copy: numpy passes
        # it to sgemm as a transposed operand), the dtype, and the kernel entry points.
        self._WT = self.W.T
        self._dtype = backend.dtype
        self._multiply = backend.xp.multiply
        self._saves_input = saves_input(self.activation)
        self._precision = backend.precision  # bf16/fp16: W, b are views of the 16-bit copy
        # bf16/fp16 on device="cuda": that copy is 16-bit storage, and so are the activations
        # (layers/dense16.py); _out16/_in16 (16-bit A out, 16-bit dX back) are set by the model.
        self._native16 = self._precision != "fp32" and self.W.dtype.itemsize == 2
        self._out16 = self._in16 = False

    def _workspace(self, B):
        return self.workspace(B, lambda: _Workspace(self.backend, B, self.n_in, self.n_out,
                                                    self.activation))

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, X, train=False, input_grad=True):
        if X.ndim < 2 or X.shape[-1] != self.n_in:
            raise ValueError(f"Dense({self.n_in}, {self.n_out}) input: expected shape (batch, "
                             f"{'..., ' if X.ndim > 2 else ''}{self.n_in}), got {tuple(X.shape)}")
        if X.dtype != self._dtype and not (self._native16 and X.dtype == self.W.dtype):
            raise TypeError(f"Dense input: expected dtype {self._dtype}, got {X.dtype}")
        if X.ndim > 2:  # (N, ..., n_in): the GEMMs on the (rows, n_in) view, the output reshaped
            Y, backprop = self.forward(X.reshape(-1, self.n_in), train, input_grad)
            lead = X.shape[:-1]
            if not train:
                return Y.reshape(*lead, self.n_out), no_backprop

            def backprop_rows(dA):
                dX = backprop(dA.reshape(-1, self.n_out))
                return None if dX is None else dX.reshape(X.shape)

            return Y.reshape(*lead, self.n_out), backprop_rows
        if not train:
            return self._infer(X), no_backprop
        if self._native16:
            return forward16(self, X, input_grad)
        # Training: everything lives in this batch size's workspace, so a step allocates nothing.
        ws = self._workspaces.get(X.shape[0]) or self._workspace(X.shape[0])
        Z, A = ws.Z, ws.A
        matmul = self.backend.matmul  # xp.matmul, or cuBLAS by nvmath-python in a CUDA graph run
        ops = self.backend.ops
        # BLAS's threads, or one for small GEMMs in the fused CPU set (kernels/cpu/dense.py: why)
        gemm_threads = ops.dense_gemm_threads(X.shape[0] * self.n_in * self.n_out)
        with gemm_threads:
            matmul(X, self._WT, out=Z)  # forward GEMM: Z = X Wᵀ
        act = self.activation
        ops.bias_act(Z, self.b, act, A)  # Z += b; A = σ(Z), one pass
        saved = Z if self._saves_input else A
        lowp = self._precision != "fp32"
        if lowp and self._saves_input:  # the gelus' saved Z is a 16-bit tensor too (A: the model)
            ops.round16(Z, self._precision, Z)
        dW, db, W, dZbuf, dX = self.dW, self.db, self.W, ws.dZ, ws.dX
        identity = act == "identity"
        # With one sample BP3 is an outer product, for which NumPy's matmul leaves BLAS for a
        # plain loop (4x slower than a broadcast multiply here); Δᵀ (n_out, 1) · X (1, n_in).
        weight_grad = self._multiply if X.shape[0] == 1 else matmul

        def backprop(dA):
            with gemm_threads:
                return backward(dA)

        def backward(dA):
            # BP1/BP2, the Hadamard part: Δ = dA ⊙ σ'(Z), one fused pass (identity: Δ = dA).
            dZ = dA if identity else ops.act_backward(dA, saved, act, dZbuf)
            if lowp and not identity:  # 16-bit Δ: the input of both backward GEMMs
                ops.round16(dZ, self._precision, dZ)
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
        if self._native16:
            return infer16(self, X)
        be = self.backend
        Z = be.empty((X.shape[0], self.n_out))
        A = be.empty(Z.shape) if self._saves_input else Z
        with be.ops.dense_gemm_threads(X.shape[0] * self.n_in * self.n_out):
            be.matmul(X, self._WT, out=Z)
        be.ops.bias_act(Z, self.b, self.activation, A)
        return A


class Reshape(Layer):
    """(N, *input_shape) -> (N, *shape) with the same number of values, as torch's x.view(N, *shape):
    e.g. one-channel images (1, H, W) read as sequences of H rows of W features."""

    def __init__(self, shape):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        self.shape = tuple(positive_int(s, "shape") for s in shape)
        super().__init__()

    def __repr__(self):
        return f"Reshape({self.shape})"

    def config(self):
        return {"shape": list(self.shape)}

    def infer_shape(self, input_shape):
        if size_of(input_shape) != size_of(self.shape):
            raise ValueError(f"expected an input of {size_of(self.shape)} values per sample to "
                             f"reshape to {fmt_shape(self.shape)}, got input shape "
                             f"{fmt_shape(input_shape)}")
        return self.shape

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        Y = X.reshape(X.shape[0], *self.output_shape)
        if not train:
            return Y, no_backprop
        shape = (X.shape[0], *self.input_shape)

        def backprop(dY):
            if not input_grad:
                return None
            return dY.reshape(shape)  # a view of dY: data moved, nothing computed

        return Y, backprop


class Flatten(Reshape):
    """(N, *shape) -> (N, prod(shape)), as torch's nn.Flatten(): a reshape, no copy."""

    def __init__(self):  # no shape: it is the input's, flattened
        pass

    def __repr__(self):
        return "Flatten()"

    def config(self):
        return {}

    def infer_shape(self, input_shape):
        return (size_of(input_shape),)


class Activation(Layer):
    """Y = σ(X) element by element, any shape: an activation on its own (after a norm or a residual
    sum), through the same fused math as Dense's (the activation forward, σ' Hadamard backward)."""

    def __init__(self, activation="relu"):
        self.activation = check_choice(activation, ACTIVATIONS, "activation")

    def __repr__(self):
        return f"Activation({self.activation!r})"

    def config(self):
        return {"activation": self.activation}

    def infer_shape(self, input_shape):
        return tuple(input_shape)

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be, ops, act = self.backend, self.backend.ops, self.activation
        if X.dtype != be.dtype:  # read as it is (no cast through a copy any more)
            raise TypeError(f"Activation input: expected dtype {be.dtype}, got {X.dtype}")
        shape = (X.shape[0], size_of(self.input_shape))
        if not train:
            return ops.activation(X.reshape(shape), act, be.empty(shape)).reshape(X.shape), no_backprop
        A, dXbuf = self.workspace(shape[0], lambda: (be.empty(shape), be.empty(shape)))
        # One pass that reads X and leaves it as it is, A = σ(X). (It was: X copied into a Z
        # buffer, then Z += -0.0 and A = σ(Z) by bias_act: the same bits, one pass more. Measured,
        # fused CPU set, 2-core EPYC, old and new interleaved: relu on 64x32x32x32 float32, forward
        # 0.53 -> 0.26 ms, forward+backward 1.56 -> 1.26 ms; the Activation layers' own time in
        # a step, VGG's 3: 7.5 -> 5.7 ms, the resnet preset's 6: 7.1 -> 5.4 ms.)
        X2 = X.reshape(shape)  # a view; a copy of its own for a non-contiguous X
        ops.activation(X2, act, A)
        Y = A.reshape(X.shape)
        # σ' from A, or for the gelus from X itself: no layer writes into its input, and the
        # caller's X (the layer below's output buffer) is rewritten only by the next forward.
        saved = X2 if saves_input(act) else A

        def backprop(dY):
            if not input_grad:
                return None
            return ops.act_backward(dY.reshape(dXbuf.shape), saved, act, dXbuf).reshape(X.shape)

        return Y, backprop


# ---- registry declarations ------------------------------------------------------------------
def _make_dense(ctx):
    shape, made = ctx.shape, []
    if len(shape) > 1:  # the spec's dense flattens images and sequences (gb.Dense itself would
        # map the last axis); a CLI model ends in one vector of class scores per sample
        made.append(("Flatten", {}))
    return made + [("Dense", {"n_in": size_of(shape), "n_out": ctx.size("n"),
                              "activation": ctx.activation, "init": ctx.params["init"]})]


def _activation_token(name):
    return SpecToken(name, lambda ctx: [("Activation", {"activation": name})], activation=name)


register(Dense, SpecToken("dense", _make_dense, {"n": ("int", REQUIRED), "init": ("init", None)},
                          positional=("n",), fuses_activation=True, example="dense(128)",
                          help="dense(n,init=)   fully connected; flattens images and sequences"
                               " first"))
register(Reshape)
register(Flatten, SpecToken("flatten", lambda ctx: [("Flatten", {})],
                           help="flatten       (C, H, W) -> (C·H·W,)"))
register(Activation, *(_activation_token(name) for name in ACTIVATIONS))
