"""``Dense`` under bf16/fp16 on device="cuda": real 16-bit device arrays between layers.

The CPU emulation (the rest of ``Dense``) keeps float32 arrays holding 16-bit values; on the CUDA
kernel set the same numbers live in 16-bit storage (float16, or uint16 holding bfloat16 bits:
gpubackprop.precision), so a step moves half the bytes and the GEMMs read 16-bit memory straight
away (cuBLAS GemmEx, kernels/cuda/gemm16.py), as torch's autocast does for ``nn.Linear``:

- forward: Z = X₁₆ W₁₆ᵀ (GEMM: 16-bit inputs, float32 accumulation and C), then one kernel
  Z += b₁₆ (float32) and A₁₆ = σ(Z) rounded once (``bias_act16``); W₁₆, b₁₆ are views of the
  model's flat 16-bit weight copy, cast once a step from the float32 master weights;
- backward: Δ₁₆ = dA₁₆ ⊙ σ'(A₁₆) (``act_backward16``; the gelus save Z₁₆); BP3 ∂C/∂W = Δ₁₆ᵀ X₁₆ by
  a GEMM with float32 C straight into the float32 flat gradient buffer (the master gradients);
  BP4 Σ_rows Δ₁₆ summed in float32 (``bias_grad16``); BP2 Δ₁₆ W₁₆ by a GEMM whose C is 16-bit when
  the layer below is such a Dense (cuBLAS rounds the float32 accumulator once), else float32.

A Dense takes 16-bit or float32 input (a float32 one is cast: its values are 16-bit already, the
model's input rounded or another layer's output), and hands a 16-bit A to the next layer only
where that layer is a 16-bit Dense of the same chain (``_out16``, set by the model; likewise
``_in16``: the layer below takes a 16-bit gradient); elsewhere (the loss, a norm, an activation
layer) the output is float32 holding the same 16-bit values, and a float32 gradient comes back.
So the numbers are the emulation's: each stored value is the float32 result rounded once to
nearest even, the GEMMs differ from NumPy's sgemm only in the order of their float32 sums.
"""

import numpy as np

from gpubackprop.kernels.reference import saves_input
from gpubackprop.precision import storage_dtype

F32 = np.dtype(np.float32)


class Workspace16:
    """Buffers a 16-bit Dense reuses for one batch size (those only some paths need on first use)."""

    __slots__ = ("be", "storage", "shapes", "bufs", "Z", "A16", "S16", "A", "dZ16", "dX")

    def __init__(self, be, B, n_in, n_out, activation, out16, in16):
        st = storage_dtype(be.precision)
        self.be, self.storage = be, st
        self.shapes = {"X16": ((B, n_in), st), "dA16": ((B, n_out), st), "dW": ((n_out, n_in), F32)}
        self.bufs = {}
        self.Z = be.empty((B, n_out))  # float32: the forward GEMM's C, then Z + b
        self.A16 = be.empty((B, n_out), st)
        self.S16 = be.empty((B, n_out), st) if saves_input(activation) else None  # the gelus' Z
        self.A = None if out16 else be.empty((B, n_out))  # float32 output for a float32 consumer
        self.dZ16 = be.empty((B, n_out), st)
        self.dX = be.empty((B, n_in), st if in16 else F32)

    def get(self, name):
        """The buffer ``name`` (X16: a float32 input cast; dA16: a float32 dA cast; dW: BP3 of a
        layer used twice in a step), made on first need."""
        buf = self.bufs.get(name)
        if buf is None:
            shape, dtype = self.shapes[name]
            buf = self.bufs[name] = self.be.empty(shape, dtype)
        return buf


def _as16(be, A, ws, name):
    """A as 16-bit storage: itself, or the float32 A (holding 16-bit values) cast, exactly."""
    if A.dtype == ws.storage:
        return A
    if not A.flags.c_contiguous:
        A = be.xp.ascontiguousarray(A)
    return be.ops.cast16(A, ws.get(name), be.precision)


def forward16(layer, X, input_grad):
    """The training forward of ``layer`` (a Dense on the 16-bit path) on a 2-D X: (A, backprop)."""
    be, p, act = layer.backend, layer._precision, layer.activation
    ops, matmul = be.ops, be.matmul16  # Matmul16 (GemmEx), or Widened16Matmul without it
    B = X.shape[0]
    ws = layer._workspaces.get(B) or layer.workspace(
        B, lambda: Workspace16(be, B, layer.n_in, layer.n_out, act, layer._out16, layer._in16))
    X16 = _as16(be, X, ws, "X16")
    Z = ws.Z
    matmul(X16, layer._WT, out=Z)  # forward GEMM: Z = X₁₆ W₁₆ᵀ, float32 accumulation and C
    A16 = ops.bias_act16(Z, layer.b, act, ws.A16, p)  # Z += b₁₆; A₁₆ = σ(Z) rounded once
    saved = ops.cast16(Z, ws.S16, p) if layer._saves_input else A16  # what σ' reads
    Y = A16 if layer._out16 else ops.widen16(A16, ws.A, p)
    identity = act == "identity"
    dW, db, W16, dX = layer.dW, layer.db, layer.W, ws.dX

    def backprop(dA):
        dA16 = _as16(be, dA, ws, "dA16")
        # BP1/BP2, the Hadamard part: Δ₁₆ = dA₁₆ ⊙ σ'(saved₁₆), float32 inside, one rounding.
        dZ = dA16 if identity else ops.act_backward16(dA16, saved, act, ws.dZ16, p)
        if layer.take_accumulate():
            # BP3 (accumulating): ∂C/∂W += Δᵀ A_prev, through the workspace (no temporary).
            tmp = ws.get("dW")
            matmul(dZ.T, X16, out=tmp)
            layer.dW += tmp
            ops.bias_grad16(dZ, db, p, accumulate=True)  # BP4
        else:
            # BP3: ∂C/∂W = Δ₁₆ᵀ X₁₆, float32 C straight into the flat (master) gradient buffer.
            matmul(dZ.T, X16, out=dW)
            ops.bias_grad16(dZ, db, p, accumulate=False)  # BP4: ∂C/∂b = Σ_rows Δ in float32
        if not input_grad:
            return None
        # BP2, the GEMM part: Δ₁₆ W₁₆ (16-bit C for a 16-bit Dense below, else float32).
        return matmul(dZ, W16, out=dX)

    return Y, backprop


def infer16(layer, X):
    """Inference of ``layer`` on a 2-D X: float32 output holding 16-bit values (new arrays)."""
    be, p = layer.backend, layer._precision
    Z = be.empty((X.shape[0], layer.n_out))
    be.matmul16(X, layer._WT, out=Z)  # X float32 (16-bit values) is cast by the GEMM, W₁₆ read
    A16 = be.ops.bias_act16(Z, layer.b, layer.activation, be.empty(Z.shape, storage_dtype(p)), p)
    return be.ops.widen16(A16, Z, p)
