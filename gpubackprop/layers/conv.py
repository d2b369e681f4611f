"""``Conv2d``: 2-D convolution as im2col + GEMM, over the batch in chunks of bounded memory.

For a chunk of n samples, im2col unfolds X (n, C_in, H, W) into columns (n, C_in·kh·kw, L),
L = OH·OW, row c·kh·kw + i·kw + j (the flattening of PyTorch's weight), and the layer is a
matrix product per group: with W viewed (G, C_out/G, K), K = C_in/G·kh·kw, and the columns viewed
(n, G, K, L), Z (n, G, C_out/G, L) = W · cols. The equations of DESIGN.md then read:

    forward   Z = W · cols + b;  A = σ(Z)                 GEMM, then ops.channel_bias_act
    BP1/BP2   Δ = dA ⊙ σ'(Z)                               ops.act_backward
    BP3       ∂C/∂W[g] = Σ_n Δ[n, g] · cols[n, g]ᵀ          GEMMs over each chunk (see below)
    BP4       ∂C/∂b = Σ_{n, l} Δ                            ops.channel_bias_grad
    dX        dcols = Wᵀ · Δ;  dX = col2im(dcols)           GEMM, then ops.col2im (a gather)

The columns of a chunk are at most ``max_cols_bytes`` (32 MiB; one sample at least; chunks of
balanced sizes), so memory does not grow with the batch. Backprop recomputes each chunk's columns
rather than keeping all of them, except the last chunk's, still in the buffer from the forward
pass: backprop runs over the chunks last first (with the whole batch in one chunk, no recompute).
When the batch's columns exceed the budget, a kernel set may ask for smaller chunks that stay in its
cache (``ops.cols_cache_bytes``; the CPU set's 2 MiB, see kernels/cpu/conv.py). The fused CPU set
(``ops.conv_halves``) runs the first and the second half of the chunks on two threads at once
where it has two or more (``_in_halves``, as Winograd's: each half its own columns buffer, BP3
into one dW a half, the halves added in a fixed order; one after the other on one thread: the
same chunks and bits), its chunks cache-sized always so that both cores work; other sets run
the chunks in one pass. Measured (2-core AMD EPYC, float32, batch 64, forward + backward with
ReLU, interleaved medians, one run): 16->32 3x3 stride 2 on 32x32 (the resnet preset's) 17.2 ms
in one chunk on one thread -> 12.2 in two halves (PyTorch 13.2), 3->32 3x3 on 32x32 (the VGG-style
net's first) 16.0 -> 12.2 (PyTorch 20.9); the resnet step 93.3 -> 85.5 ms.
BP3 takes one GEMM a sample and a sum over the chunk when C_out/G <= L (the products are then no
larger than the columns), else one GEMM over the transposed chunk. A kernel set that offers
batch-inner columns (``ops.batch_inner_gemm``: the fused CPU set) gets them for chunks of several
samples of layers with 32+ output channels and 64+ column rows a group: cols (C_in·kh·kw, n, L),
one GEMM a group for the forward (into (C_out, n, L), then transposed to Z's layout), for BP3 (inner
size n·L, Δ transposed once) and for dcols (see ``_batch_inner`` for the measurements).
A 1x1 convolution with stride 1 and no padding needs no columns at all: cols is X reshaped.

A layer of few channels (stride 1, dilation 1, one group, not 1x1) can run as a direct
convolution instead (kernels/cpu/direct_conv.py: each sample's zero-padded input once, every weight
one shifted, vectorised row over the output; BP3 and dX in one more pass): its im2col GEMMs are
too skinny for BLAS (LeNet-5's K = 25 or 150, 6 or 16 rows).
``Conv2d.direct`` is "auto" (where the kernel set offers ``ops.direct_conv`` and ``_direct_pays``:
the fused CPU set, fp32, at most 16 channels out and 3 in, or 8 in for 5-wide kernels: both of
LeNet-5's layers), True (wherever the
kernel set offers it and the shape allows: for tests) or False. Winograd, where chosen, comes first.

A 3x3 convolution of stride 1, dilation 1 and one group can run as Winograd F(2x2, 3x3) instead
(kernels/reference/winograd.py has the math): per chunk V = BᵀdB of the input's 4x4 tiles, 16
GEMMs M = U · V with U = GgGᵀ, Z = AᵀMA; backprop by the adjoints, dM = A dZ Aᵀ, BP3 dU = dM · Vᵀ
(dW = Gᵀ dU G once per backprop), dV = Uᵀ · dM and dX the overlapping sum of B dV Bᵀ: 2.25x fewer
multiplications in every GEMM of the layer. The bias is added (and the activation applied) in the
output transform where the activation is the identity or ReLU (else ops.channel_bias_act as for
im2col), and BP4 is summed in its adjoint (float64 sums, a fixed order: no ops.channel_bias_grad
pass). ``Conv2d.winograd`` (a class attribute, settable per layer) is "auto" (where the kernel
set's ``ops.winograd_conv`` says so and ``_winograd_pays`` measured it faster: the fused CPU set,
fp32 models), True (wherever the shape allows, on any kernel set: for tests) or False (im2col +
GEMM). The fused CPU set runs each of the two halves of a layer's Winograd chunks in one call
(``ops.winograd_forward_chunks`` / ``winograd_backward_chunks``: the same steps in Numba, its
GEMMs through NumPy's OpenBLAS), so that the two threads do not take turns at the GIL between a
chunk's transforms and GEMMs (each turn a thread wake-up; measured on the resnet preset's
16->16 layer, forward + backward: the worker's half 6.85 -> 4.93 ms, the layer 7.67 -> 5.68 ms
wall, the step 91.3 -> 84.5 ms with the forward alone). The rounding differs from the direct
sum's by a few units in the last place (float64:
~1e-15 relative, so float64 still equals PyTorch to 1e-10, and float64 takes it too).
"""

import math

import numpy as np

from gpubackprop.kernels.reference import ACTIVATIONS, saves_input
from gpubackprop.kernels.reference.winograd import OUTPUT_ACTIVATIONS, TILE_PAD
from gpubackprop.layers.base import Layer, fmt_shape, int_pair, no_backprop, pair_repr
from gpubackprop.layers.dense import INITS, init_weights
from gpubackprop.layers.registry import REQUIRED, SpecToken, plain, register
from gpubackprop.validation import check_choice, positive_int

MAX_COLS_BYTES = 32 << 20
# Conv2d.direct "auto": the direct convolution for layers with at most this many input and output
# channels, and up to DIRECT_MAX_IN_5 channels in for 5-wide kernels (register-blocked there);
# ``_direct_pays`` has the measurements.
DIRECT_MAX_IN, DIRECT_MAX_OUT, DIRECT_MAX_IN_5 = 3, 16, 8


def _geometry(layer, input_shape):
    """(OH, OW) of a window layer (kernel/stride/padding/dilation) on (C, H, W), or ValueError."""
    H, W = input_shape[1], input_shape[2]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (layer.kernel_size, layer.stride, layer.padding,
                                              layer.dilation)
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # the extent of a dilated window
    Hp, Wp = H + 2 * ph, W + 2 * pw
    if ekh > Hp or ekw > Wp:
        kernel = f"kernel {kh}x{kw}"
        if (dh, dw) != (1, 1):
            kernel += f" with dilation {pair_repr((dh, dw))} (extent {ekh}x{ekw})"
        raise ValueError(f"{kernel} larger than the padded input {Hp}x{Wp} (input shape "
                         f"{fmt_shape(input_shape)}, padding {pair_repr((ph, pw))})")
    return (Hp - ekh) // sh + 1, (Wp - ekw) // sw + 1


def _inner_view(buf, n):
    """The first n samples' worth of a columns buffer (nc, K_tot, L) as batch-inner (K_tot, n, L)."""
    K, L = buf.shape[1], buf.shape[2]
    return buf.reshape(-1)[:K * n * L].reshape(K, n, L)


class _Workspace:
    """Buffers a Conv2d layer reuses for one batch size."""

    __slots__ = ("Z", "A", "dZ", "dX", "cols", "chunks", "_scratch")

    def __init__(self, layer, be, N, chunks, winograd=False, direct=False):
        Co, (OH, OW) = layer.out_channels, layer.output_shape[1:]
        self.chunks = chunks
        nc = chunks[0][1]  # the largest chunk: the first
        self.Z = be.empty((N, Co, OH, OW))
        self.A = be.empty(self.Z.shape) if saves_input(layer.activation) else self.Z
        self.dZ = be.empty(self.Z.shape) if layer.activation != "identity" else None
        self.dX = be.empty((N, *layer.input_shape))
        # (Winograd keeps its tiles in scratch buffers "V" and "M" instead; direct needs none.)
        self.cols = None if layer._pointwise or winograd or direct else be.empty((nc, layer._Ktot, OH * OW))
        self._scratch = {}

    def cols_of(self, be, h):
        """The columns buffer of ``Conv2d._in_halves``' half h (the second half's made on need)."""
        if h == 0 or self.cols is None:
            return self.cols
        return self.scratch(be, "cols1", self.cols.shape)

    def scratch(self, be, name, shape):
        return _scratch(self._scratch, be, name, shape)


def _tiles_view(scratch, name, C, P):
    """A (16, C, P) Winograd tile buffer from ``scratch``: 16 C-contiguous rows, C·P + TILE_PAD
    elements apart (kernels/cpu/winograd.py: rows a multiple of 4 KiB apart share cache sets)."""
    return scratch(name, (16, C * P + TILE_PAD))[:, :C * P].reshape(16, C, P)


def _scratch(store, be, name, shape):
    """A contiguous (shape) view of a flat buffer kept in ``store`` per name, grown to the largest
    chunk."""
    size = math.prod(shape)
    buf = store.get(name)
    if buf is None or buf.size < size:
        buf = store[name] = be.empty((size,))
    return buf[:size].reshape(shape)


class Conv2d(Layer):
    """2-D convolution over NCHW images; ``weight`` is (C_out, C_in/groups, kH, kW), as in torch.

    ``init``: None for PyTorch's default (U(±1/√fan_in) for weight and bias, fan_in =
    C_in/groups·kH·kW), or one of Dense's schemes "he", "xavier", "lecun", "normal" (bias 0).
    ``activation`` is fused into the bias pass, as in Dense.
    """

    max_cols_bytes = MAX_COLS_BYTES
    winograd = "auto"  # "auto" | True | False: see the module docstring
    direct = "auto"  # "auto" | True | False: direct convolution, see the module docstring

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, activation="identity", init=None):
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride, "stride")
        self.padding = int_pair(padding, "padding", minimum=0)
        self.dilation = int_pair(dilation, "dilation")
        self.groups = positive_int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups: expected a divisor of in_channels ({self.in_channels}) and "
                             f"out_channels ({self.out_channels}), got {self.groups}")
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected True or False, got {bias!r}")
        self.bias = bool(bias)
        self.activation = check_choice(activation, ACTIVATIONS, "activation")
        self.init = None if init is None else check_choice(init, INITS, "init")
        kh, kw = self.kernel_size
        self._K = self.in_channels // self.groups * kh * kw  # one group's rows of the columns
        self._Ktot = self.in_channels * kh * kw
        self._pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1)
                           and self.padding == (0, 0))
        self._winograd_shape = (self.kernel_size == (3, 3) and self.stride == (1, 1)
                                and self.dilation == (1, 1) and self.groups == 1)
        self._direct_shape = (self.stride == (1, 1) and self.dilation == (1, 1)
                              and self.groups == 1 and not self._pointwise)
        self._workspaces = {}

    def __repr__(self):
        args = [str(self.in_channels), str(self.out_channels), pair_repr(self.kernel_size)]
        for name, default in (("stride", (1, 1)), ("padding", (0, 0)), ("dilation", (1, 1))):
            if getattr(self, name) != default:
                args.append(f"{name}={pair_repr(getattr(self, name))}")
        if self.groups != 1:
            args.append(f"groups={self.groups}")
        if not self.bias:
            args.append("bias=False")
        if self.activation != "identity":
            args.append(f"activation={self.activation!r}")
        if self.init is not None:
            args.append(f"init={self.init!r}")
        return f"Conv2d({', '.join(args)})"

    # ---- declaring --------------------------------------------------------------------------------
    def infer_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"expected a per-sample input of shape (C, H, W) with C = "
                             f"{self.in_channels}, got shape {fmt_shape(input_shape)}")
        if input_shape[0] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {input_shape[0]} "
                             f"(input shape {fmt_shape(input_shape)})")
        return (self.out_channels, *_geometry(self, input_shape))

    def param_specs(self):
        kh, kw = self.kernel_size
        specs = [("weight", (self.out_channels, self.in_channels // self.groups, kh, kw))]
        if self.bias:
            specs.append(("bias", (self.out_channels,)))
        return specs

    def initial_params(self, rng):
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
        fan_in = self._K
        if self.init is None:
            # PyTorch's reset_parameters: kaiming_uniform_(a=√5) gives U(±1/√fan_in), and the bias
            # U(±1/√fan_in) too.
            bound = 1.0 / math.sqrt(fan_in)
            params = {"weight": rng.uniform(-bound, bound, shape)}
            if self.bias:
                params["bias"] = rng.uniform(-bound, bound, self.out_channels)
            return params
        params = {"weight": init_weights(self.init, fan_in, self.out_channels, rng, shape=shape,
                                         fan_out=self.out_channels * kh * kw)}
        if self.bias:
            params["bias"] = np.zeros(self.out_channels)
        return params

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias, "activation": self.activation,
                "init": self.init}

    # ---- binding ----------------------------------------------------------------------------------
    def attach(self, backend, params, grads, state, context, index):
        super().attach(backend, params, grads, state, context, index)
        G, Cog = self.groups, self.out_channels // self.groups
        self.weight = params["weight"]
        self._Wg = self.weight.reshape(G, Cog, self._K)  # views of the flat buffers
        self._WgT = self._Wg.transpose(0, 2, 1)
        self._dWg = grads["weight"].reshape(G, Cog, self._K)
        self._dW = grads["weight"]
        self._b = params["bias"] if self.bias else backend.zeros((self.out_channels,))
        self._db = grads["bias"] if self.bias else None

    def _chunks(self, N, winograd=False):
        """[(start, stop)] of N samples in chunks of balanced size whose columns (or Winograd
        tiles: V and M) fit the budget; the kernel set's cache-sized ones where the batch exceeds
        it, for Winograd, and where the set runs the chunks in two halves (``_im2col_halves``:
        then an even count of them too)."""
        L = self.output_shape[1] * self.output_shape[2]
        per_sample = self._Ktot * L * self.backend.dtype.itemsize
        cache = self.backend.ops.cols_cache_bytes
        if winograd:
            # V and M, both live in each chunk; chunks in the cache always (see WinogradOps).
            per_sample = (16 * (self.in_channels + self.out_channels) * self._tiles()[2]
                          * self.backend.dtype.itemsize)
            cache = self.backend.ops.winograd_cache_bytes
        most = max(1, min(N, self.max_cols_bytes // per_sample))
        if (most < N or winograd or self._im2col_halves()) and cache:
            # Backprop recomputes the columns of every chunk but the last anyway, so chunks whose
            # columns stay in the cache cost no more im2col, and every pass over them (im2col, the
            # GEMMs, col2im) then runs from the cache instead of memory (the kernel set's choice:
            # the CPU set's; a GPU's launches want the largest chunks).
            most = max(1, min(most, cache // per_sample))
        serial = self.backend.ops.winograd_gemm_serial if winograd else None
        if serial:  # each of a chunk's GEMMs within BLAS's one-thread size (see WinogradOps)
            most = max(1, min(most, serial // (self.in_channels * self.out_channels
                                                * self._tiles()[2])))
        count = -(-N // most)
        if count > 1 and count % 2 and self._im2col_halves():
            # An even count, for two threads to take half each: 5 chunks of the resnet preset's
            # stride-2 layer ran 3 against 2 (5.0 and 2.8 ms a half, forward + backward).
            count += 1
        size = -(-N // count)
        return [(s, min(N, s + size)) for s in range(0, N, size)]

    def _winograd(self):
        """Whether this layer runs as Winograd F(2x2, 3x3): see the module docstring."""
        choice = self.winograd
        if isinstance(choice, (bool, np.bool_)):
            return bool(choice) and self._winograd_shape
        if not (isinstance(choice, str) and choice == "auto"):
            raise ValueError(f"winograd: expected 'auto', True or False, got {choice!r}")
        # Not under bf16/fp16: there the conv GEMMs' inputs are the 16-bit values themselves (the
        # CPU emulating the GPU's numerics, gpubackprop/precision.py), which V and U are not.
        return (self._winograd_shape and bool(self.backend.ops.winograd_conv)
                and getattr(self.backend, "precision", "fp32") == "fp32" and self._winograd_pays())

    def _direct(self):
        """Whether this layer runs as a direct convolution (ops.direct_conv_*): see the module
        docstring. "auto": where the kernel set offers it and ``_direct_pays``; True: wherever
        the kernel set offers it and the shape allows (for tests); False: never."""
        choice = self.direct
        offered = bool(getattr(self.backend.ops, "direct_conv", False)) and self._direct_shape
        if isinstance(choice, (bool, np.bool_)):
            return bool(choice) and offered
        if not (isinstance(choice, str) and choice == "auto"):
            raise ValueError(f"direct: expected 'auto', True or False, got {choice!r}")
        # Not under bf16/fp16, as Winograd (the GEMMs there emulate the GPU's on 16-bit values).
        return (offered and getattr(self.backend, "precision", "fp32") == "fp32"
                and self._direct_pays())

    def _direct_pays(self):
        """The rule measured on a 2-core Xeon (float32, batch 128, interleaved medians, shared
        machine): at most 3 channels in and 16 out. The direct kernels ran on the calling thread then
        (now in two halves of the samples, as the im2col path's chunks), so one thread's CPU time
        decided; im2col +
        GEMM / direct, layer forward + backward with ReLU: 1->6 5x5 pad 2 on 28x28 (LeNet-5's
        conv1) 1.22, 3->16 5x5 on 32x32 1.18; 6->16 5x5 on 14x14 (conv2) 0.82, 8->16 0.85, 6->32
        0.66, 3->32 3x3 on 32x32 0.68 (the direct cost grows with C_out·C_in·k², a GEMM's rate
        with C_out). The LeNet-5 step (2 threads): both GEMM 10.4/10.1 ms, conv1 direct 9.7/9.4,
        both direct 11.1/11.0. Since the 5-wide kernels are register-blocked (2-core AMD EPYC znver4,
        AVX-512, one thread, CPU time, the same layers): conv1 1.68, conv2 1.23, 8->16 5x5 on 14x14
        1.40, 6->32 0.99, 3->32 3x3 (not blocked) 0.79; the LeNet-5 step (one thread, CPU time):
        both direct 7.6 ms, conv1 only 9.8, neither 11.5: 5-wide kernels up to 8 channels in. With
        the bias and ReLU fused into the direct kernels (bench/direct_conv_cpu.py --cpu, one thread):
        conv1 2.36, conv2 1.46, 3->16 5x5 on 32x32 2.40, 8->16 1.65, 6->32 1.18, 3->32 3x3 0.78; the
        step both direct 7.4 ms, unfused 8.2, neither 13.4 (a loaded machine: CPU times inflated)."""
        if self.out_channels > DIRECT_MAX_OUT:
            return False
        limit = DIRECT_MAX_IN_5 if self.kernel_size[1] == 5 else DIRECT_MAX_IN
        return self.in_channels <= limit

    def _winograd_pays(self):
        """The rule measured on a 2-core Xeon (float32, OpenBLAS, one thread, CPU time; forward +
        backward of the layer, transforms included, against im2col + GEMM, batch 64): 16+ channels
        in and out, and min(C_in, C_out) · min(OH, OW) >= 512. Winograd's GEMMs gain ~2.25x, its
        transforms cost ~(C_in + C_out)·OH·OW per sample, and they are slower on narrow images
        (short rows of tiles). gemm/winograd: 32->32 on 32x32 1.35, 32->64 on 16x16 1.26, 16->16 on
        32x32 1.30, 32->32 on 16x16 1.39, 64->64 on 8x8 1.25; below the rule, even: 16->16 on 16x16
        1.01, 16->32 on 8x8 1.07, 8->16 on 32x32 1.00; earlier, before the transforms' rows were
        padded apart, 16->16 on 8x8 0.82, 32->32 on 4x4 0.87, 3->32 on 32x32 0.43.

        Re-measured on a 2-core AMD EPYC (znver4, AVX-512; the same bench/winograd_cpu.py, loaded
        machine), after the transforms' passes ran over whole planes of tiles and took the bias:
        the rule is now 16+ channels in and out on 4x4 outputs or larger, or 8+ on 32x32 or larger.
        gemm/winograd: 16->16 on 32x32 1.99, 32->32 on 16x16 2.24, 32->32 on 32x32 1.86, 32->64 on
        16x16 1.90, 16->16 on 16x16 1.56-1.76, 16->32 on 8x8 1.24, 16->16 on 8x8 1.19-1.21, 32->32
        on 8x8 1.41-1.54, 64->64 on 8x8 1.65, 64->32 on 14x14 1.78, 32->16 on 14x14 1.94, 16->16 on
        6x6 1.33, 32->32 on 4x4 1.12-1.36, 64->64 on 4x4 0.92-1.22, 16->16 on 4x4 0.96-1.15; 8->16
        on 32x32 1.62-1.72, 8->8 1.28; but 8->8 on 16x16 0.85-0.92, 8->16 on 16x16 0.79, 4->8 on
        32x32 0.82, 3->16 on 32x32 1.01, 3->32 on 32x32 0.79."""
        C_out, OH, OW = self.output_shape
        c, side = min(self.in_channels, C_out), min(OH, OW)
        return (c >= 16 and side >= 4) or (c >= 8 and side >= 32)

    def _tiles(self):
        """(TH, TW, T): the 2x2 output tiles of a sample, down, across and in all."""
        TH, TW = -(-self.output_shape[1] // 2), -(-self.output_shape[2] // 2)
        return TH, TW, TH * TW

    def _batch_inner(self, chunks):
        """Whether chunks of these sizes run one GEMM a chunk on batch-inner columns (K_tot, n, L)
        rather than one a sample on (n, K_tot, L): where the kernel set offers them, for chunks of
        several samples and layers with 32+ output channels and 64+ column rows a group. Measured
        (float32, 2-core Xeon, OpenBLAS, forward + backward of the layer, transposes included):
        32->32 3x3 on 14x14, batch 128: 23.0 -> 20.2 ms; 32->64 on 16x16, batch 64: 16.7 -> 14.2;
        64->64 on 8x8: 11.6 -> 8.3. With 16 channels out the backward still gains and the forward
        loses (16->16 on 28x28: 33.7 -> 32.1; LeNet-5's 6->16 5x5: 4.8 -> 5.0): after the serial
        im2col OpenBLAS's threads take the one large GEMM slower than the small ones a sample."""
        return (self.backend.ops.batch_inner_gemm and not self._pointwise and chunks[0][1] > 1
                and self.out_channels // self.groups >= 32 and self._K >= 64)

    def _im2col(self, X, cols, batch_inner=False):
        args = (X, cols, self.kernel_size, self.stride, self.padding, self.dilation)
        # The keyword only where used: the CUDA set's im2col has none.
        return self.backend.ops.im2col(*args, batch_inner=True) if batch_inner else \
            self.backend.ops.im2col(*args)

    # ---- running ----------------------------------------------------------------------------------
    def _forward_into(self, X, Z, cols_of, chunks, scratch):
        """Z (N, Co, OH, OW) = W · cols, chunk by chunk (no bias yet), in the two halves of
        ``_in_halves`` where the kernel set says so (``_im2col_halves``; else in one pass): half h's columns in
        ``cols_of(h)``, its last chunk's still there for backprop; ``scratch(name, shape)`` gives
        a buffer."""
        G, Cog, K = self.groups, self.out_channels // self.groups, self._K
        L = Z.shape[2] * Z.shape[3]
        inner = self._batch_inner(chunks)

        def run(h, part):
            cols_buf = cols_of(h)
            for s, e in part:
                n = e - s
                if inner:
                    # One GEMM a group over the chunk: Zt (G, Co/G, n·L) = W · cols (G, K, n·L),
                    # then Zt's (Co, n, L) brought to Z's (n, Co, L).
                    cols = self._im2col(X[s:e], _inner_view(cols_buf, n), True)
                    Zt = scratch(f"Zt{h}", (G, Cog, n * L))
                    self.backend.matmul(self._Wg, cols.reshape(G, K, n * L), out=Zt)
                    Z[s:e].reshape(n, G * Cog, L)[...] = Zt.reshape(G * Cog, n, L).transpose(1, 0, 2)
                    continue
                if self._pointwise:
                    cols = X[s:e].reshape(n, G, K, L)
                else:
                    cols = self._im2col(X[s:e], cols_buf[:n]).reshape(n, G, K, L)
                self.backend.matmul(self._Wg, cols, out=Z[s:e].reshape(n, G, Cog, L))  # Z = W · cols

        if self._im2col_halves():
            self._in_halves(run, chunks)
        else:  # one pass, one columns buffer (a GPU's chunks are large: no second one)
            run(0, chunks)

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        ops, act = be.ops, self.activation
        N, Co = X.shape[0], self.out_channels
        L = self.output_shape[1] * self.output_shape[2]
        winograd = self._winograd()
        if self._direct() and not winograd:
            return self._direct_forward(X, train, input_grad)
        # Winograd adds the bias and applies the activation in its output transform where it
        # offers that activation (identity, ReLU): no separate pass over Z (BP4: in its adjoint).
        fused = act in OUTPUT_ACTIVATIONS
        if not train:
            chunks = self._chunks(N, winograd)
            nc = chunks[0][1]
            Z = be.empty((N, *self.output_shape))
            if winograd:
                store = self.workspace(("inference", "winograd"), dict)
                self._winograd_forward(X, Z, chunks, lambda name, shape: _scratch(store, be, name, shape),
                                       fused)
            else:
                def cols_of(h):
                    return None if self._pointwise else self.workspace(
                        ("inference", nc, h), lambda: be.empty((nc, self._Ktot, L)))

                with ops.conv_gemm_threads():
                    self._forward_into(X, Z, cols_of, chunks, lambda name, shape: be.empty(shape))
            A = be.empty(Z.shape) if saves_input(act) else Z
            if (self.bias or act != "identity") and not (winograd and fused):
                ops.channel_bias_act(Z.reshape(N, Co, L), self._b, act, A.reshape(N, Co, L))
            return A, no_backprop
        ws = self.workspace(("winograd", N) if winograd else N,
                            lambda: _Workspace(self, be, N, self._chunks(N, winograd), winograd))
        Z, A = ws.Z, ws.A
        with ops.conv_gemm_threads():  # (kernels/cpu/conv.py: why one BLAS thread there)
            if winograd:
                self._winograd_forward(X, Z, ws.chunks,
                                       lambda name, shape: ws.scratch(be, name, shape), fused)
            else:
                self._forward_into(X, Z, lambda h: ws.cols_of(be, h), ws.chunks,
                                   lambda name, shape: ws.scratch(be, name, shape))
        if (self.bias or act != "identity") and not (winograd and fused):
            ops.channel_bias_act(Z.reshape(N, Co, L), self._b, act, A.reshape(N, Co, L))
        saved = Z if saves_input(act) else A

        def backprop(dA):
            # BP1/BP2, the Hadamard part: Δ = dA ⊙ σ'(Z) (identity: Δ = dA).
            dZ = dA if act == "identity" else ops.act_backward(dA, saved, act, ws.dZ)
            accumulate = self.take_accumulate()
            if self.bias and not winograd:  # BP4: ∂C/∂b = Σ over samples and positions of Δ
                ops.channel_bias_grad(dZ.reshape(N, Co, L), self._db, accumulate=accumulate)
            with ops.conv_gemm_threads():
                if winograd:  # (BP4 there in the output transform's adjoint)
                    self._winograd_backward(X, dZ, ws, accumulate, input_grad)
                else:
                    self._backward_chunks(X, dZ, ws, accumulate, input_grad)
            return ws.dX if input_grad else None

        return A, backprop

    def _direct_forward(self, X, train, input_grad):
        """forward() on the direct convolution: Z = W ⋆ X in one call (no columns), then the bias
        and activation; backprop's BP3 and dX in one more."""
        be = self.backend
        ops, act = be.ops, self.activation
        N, Co = X.shape[0], self.out_channels
        L = self.output_shape[1] * self.output_shape[2]
        X = be.xp.ascontiguousarray(X)
        if train:
            ws = self.workspace(("direct", N), lambda: _Workspace(self, be, N, [(0, N)], direct=True))
            Z, A = ws.Z, ws.A
        else:
            Z = be.empty((N, *self.output_shape))
            A = be.empty(Z.shape) if saves_input(act) else Z
        # The bias and ReLU (or none) in the kernels' own write of Z and read of Δ (BP4 there too),
        # any other activation as separate passes. LeNet-5 step, one thread, CPU time, side by side:
        # see _direct_pays' docstring for the figures.
        fused = act in getattr(ops, "direct_activations", ())
        if fused:
            ops.direct_conv_forward(X, self.weight, A, self.padding, b=self._b, activation=act)
        else:
            ops.direct_conv_forward(X, self.weight, Z, self.padding)
            if self.bias or act != "identity":
                ops.channel_bias_act(Z.reshape(N, Co, L), self._b, act, A.reshape(N, Co, L))
        if not train:
            return A, no_backprop
        saved = Z if saves_input(act) else A

        def backprop(dA):
            accumulate = self.take_accumulate()
            dX = ws.dX if input_grad else None
            if fused:  # BP1/BP2's Hadamard part, BP4, BP3 and dX in one pass over the samples
                ops.direct_conv_backward(X, be.xp.ascontiguousarray(dA), self.weight, self._dW, dX,
                                         self.padding, accumulate=accumulate, activation=act,
                                         A=saved, db=self._db if self.bias else None)
                return dX
            # BP1/BP2, the Hadamard part: Δ = dA ⊙ σ'(Z) (identity: Δ = dA).
            dZ = dA if act == "identity" else ops.act_backward(dA, saved, act, ws.dZ)
            dZ = be.xp.ascontiguousarray(dZ)
            if self.bias:  # BP4
                ops.channel_bias_grad(dZ.reshape(N, Co, L), self._db, accumulate=accumulate)
            # BP3 and dX in one pass over the samples
            ops.direct_conv_backward(X, dZ, self.weight, self._dW, dX, self.padding,
                                     accumulate=accumulate)
            return dX

        return A, backprop

    def _winograd_forward(self, X, Z, chunks, scratch, fused=False):
        """Z (N, Co, OH, OW) = Aᵀ [U · V] A chunk by chunk, V = Bᵀ d B of the chunk's tiles (then
        the bias and the activation where ``fused``, in the output transform: Z holds A then), in
        the two halves of ``_in_halves``; each half's last V stays in its scratch "V0"/"V1" for
        backprop."""
        be = self.backend
        ops = be.ops
        Ci, Co, T = self.in_channels, self.out_channels, self._tiles()[2]
        U = ops.winograd_filter(self.weight, scratch("U", (16, Co, Ci)))

        chunked = getattr(ops, "winograd_forward_chunks", None)
        if chunked is not None:  # the fused CPU set: a half in one call (no GIL between its steps)
            b = self._b if fused and self.bias else None
            act = self.activation if fused else "identity"
            P = chunks[0][1] * T  # the first chunk is the largest

            def run(h, part):
                V = scratch(f"V{h}", (16, Ci * P + TILE_PAD)).reshape(-1)
                M = scratch(f"M{h}", (16, Co * P + TILE_PAD)).reshape(-1)
                chunked(X, U, V, M, Z, part, self.padding, b=b, activation=act)

            self._in_halves(run, chunks)
            return

        def run(h, part):
            for s, e in part:
                n = e - s
                V = ops.winograd_input(X[s:e], _tiles_view(scratch, f"V{h}", Ci, n * T), self.padding)
                M = _tiles_view(scratch, f"M{h}", Co, n * T)
                self.backend.matmul(U, V, out=M)  # 16 GEMMs (Co × Ci)·(Ci × n·T)
                if fused:
                    ops.winograd_output(M, Z[s:e], b=self._b if self.bias else None,
                                        activation=self.activation)
                else:
                    ops.winograd_output(M, Z[s:e])

        self._in_halves(run, chunks)

    def _winograd_backward(self, X, dZ, ws, accumulate, input_grad):
        """BP3, BP4 and the input gradient through the adjoint transforms, each half's chunks last
        first (its last V is still there); dU summed over a half's chunks in order, then over the
        halves, then dW = Gᵀ dU G once. BP4 in the output transform's adjoint: each chunk's Σ of Δ
        in float64 into its half's float64 sums, the halves added, then rounded into ∂C/∂b once
        (a fixed order by shape, as the halves are)."""
        be = self.backend
        xp, ops = be.xp, be.ops
        Ci, Co, T = self.in_channels, self.out_channels, self._tiles()[2]
        dZ = xp.ascontiguousarray(dZ)
        # U again from the weights (a few µs): backprop uses the weights as they are, as the GEMM
        # path's Wᵀ · Δ does.
        U = ops.winograd_filter(self.weight, ws.scratch(be, "U", (16, Co, Ci)))

        def scratch(name, shape):
            return ws.scratch(be, name, shape)

        db = [xp.zeros(Co, np.float64) for _ in range(2)] if self.bias else None
        chunked = getattr(ops, "winograd_backward_chunks", None)
        P = ws.chunks[0][1] * T  # the first chunk is the largest

        def run_chunked(h, part):  # the fused CPU set: a half in one call (no GIL between steps)
            chunked(X, dZ, U, scratch(f"V{h}", (16, Ci * P + TILE_PAD)).reshape(-1),
                    scratch(f"M{h}", (16, Co * P + TILE_PAD)).reshape(-1),
                    scratch(f"dU{h}", (16, Co, Ci)), scratch(f"dU_chunk{h}", (16, Co, Ci)),
                    ws.dX if input_grad else None, part, self.padding,
                    db=None if db is None else db[h])

        def run(h, part):
            dU = scratch(f"dU{h}", (16, Co, Ci))
            for i, (s, e) in enumerate(reversed(part)):
                n = e - s
                V = _tiles_view(scratch, f"V{h}", Ci, n * T)
                if i > 0:
                    ops.winograd_input(X[s:e], V, self.padding)
                dM = _tiles_view(scratch, f"M{h}", Co, n * T)
                if db is None:
                    ops.winograd_output_backward(dZ[s:e], dM)
                else:
                    ops.winograd_output_backward(dZ[s:e], dM, db=db[h], accumulate=True)
                if i == 0:
                    self.backend.matmul(dM, V.transpose(0, 2, 1), out=dU)  # BP3: dU = dM · Vᵀ over the chunk
                else:
                    dUc = ws.scratch(be, f"dU_chunk{h}", (16, Co, Ci))
                    self.backend.matmul(dM, V.transpose(0, 2, 1), out=dUc)
                    dU += dUc
                if input_grad:  # dV = Uᵀ · dM into V's buffer (BP3 is done with it), then dX
                    self.backend.matmul(U.transpose(0, 2, 1), dM, out=V)
                    ops.winograd_input_backward(V, ws.dX[s:e], self.padding)

        halves = self._in_halves(run if chunked is None else run_chunked, ws.chunks)
        dU = ws.scratch(be, "dU0", (16, Co, Ci))
        if halves == 2:
            dU += ws.scratch(be, "dU1", (16, Co, Ci))
        ops.winograd_filter_backward(dU, self._dW, accumulate=accumulate)
        if db is not None:  # db[1] is zeros with one half
            total = db[0] + db[1]
            self._db[...] = self._db + total if accumulate else total  # (one rounding)

    def _im2col_halves(self):
        """Whether the im2col path runs in ``_in_halves``' two halves of cache-sized chunks (an
        even count): where the kernel set says so (``ops.conv_halves``: the fused CPU set, on one
        thread as on two, so that the chunks and the bits do not depend on the thread count)."""
        return bool(getattr(self.backend.ops, "conv_halves", False))

    def _two_halves(self):
        """Whether ``_in_halves`` runs its halves on two threads (the fused CPU set on 2+ cores)."""
        return getattr(self.backend.ops, "nchunks", 1) >= 2 and self.backend.device == "cpu"

    def _in_halves(self, run, chunks):
        """``run(h, part)`` on the first and the second half of the chunks (h = 0, 1), the second
        on a worker thread where the kernel set runs two or more (the fused CPU set: its kernels
        release the GIL, and NumPy's GEMMs do; a chunk's GEMMs are too small for BLAS's own
        threads), else one after the other: the same halves, so the same bits, either way. Returns
        the number of halves."""
        if len(chunks) < 2:
            run(0, chunks)
            return 1
        k = (len(chunks) + 1) // 2
        if self._two_halves():
            from gpubackprop.kernels.cpu.worker import in_two

            in_two(lambda: run(0, chunks[:k]), lambda: run(1, chunks[k:]))
        else:
            run(0, chunks[:k])
            run(1, chunks[k:])
        return 2

    def _backward_chunks(self, X, dZ, ws, accumulate, input_grad):
        """BP3 and the input gradient chunk by chunk, in the forward pass's two halves, each half's
        last chunk first (its columns are still in the half's buffer). BP3 into one dW a half (the
        chunks' added in order), then the halves added into ∂C/∂W: a fixed order by shape, on one
        thread or two."""
        be = self.backend
        shape = self._dWg.shape

        def run(h, part):
            # The first half writes ∂C/∂W itself unless accumulating into it.
            dW = self._dWg if h == 0 and not accumulate else ws.scratch(be, f"dW{h}", shape)
            for i, (s, e) in enumerate(reversed(part)):
                self._backward_chunk(X, dZ, ws, h, i, s, e, dW, input_grad)

        if self._im2col_halves():
            halves = self._in_halves(run, ws.chunks)
        else:  # as the forward: one pass
            run(0, ws.chunks)
            halves = 1
        if accumulate:
            self._dWg += ws.scratch(be, "dW0", shape)
        if halves == 2:
            self._dWg += ws.scratch(be, "dW1", shape)

    def _backward_chunk(self, X, dZ, ws, h, i, s, e, dW, input_grad):
        """BP3 of chunk [s, e), the i-th from the last of half h, into ``dW`` (written for the
        first, added for the others), and its input gradient."""
        be = self.backend
        G, Cog, K = self.groups, self.out_channels // self.groups, self._K
        n, L = e - s, dZ.shape[2] * dZ.shape[3]
        if self._batch_inner(ws.chunks):
            self._backward_chunk_inner(X, dZ, ws, h, i, s, e, dW, input_grad)
            return
        cols_buf = ws.cols_of(be, h)
        if self._pointwise:
            cols = X[s:e].reshape(n, G, K, L)
        elif i == 0:  # still there from the forward pass
            cols = cols_buf[:n].reshape(n, G, K, L)
        else:
            cols = self._im2col(X[s:e], cols_buf[:n]).reshape(n, G, K, L)
        dZc = dZ[s:e].reshape(n, G, Cog, L)
        if i == 0:
            self._weight_grad(dZc, cols, ws, h, dW)
        else:
            dWc = ws.scratch(be, f"dW_chunk{h}", dW.shape)
            self._weight_grad(dZc, cols, ws, h, dWc)
            dW += dWc
        if not input_grad:
            return
        # The input gradient: dcols = Wᵀ Δ, then col2im adds each column entry back into the
        # pixel it was read from (σ' of the layer below is applied there).
        if self._pointwise:
            self.backend.matmul(self._WgT, dZc, out=ws.dX[s:e].reshape(n, G, K, L))
        else:
            dcols = cols_buf[:n]  # BP3 is done with this chunk's columns
            self.backend.matmul(self._WgT, dZc, out=dcols.reshape(n, G, K, L))
            be.ops.col2im(dcols, ws.dX[s:e], self.kernel_size, self.stride, self.padding,
                          self.dilation)

    def _backward_chunk_inner(self, X, dZ, ws, h, i, s, e, dW, input_grad):
        """``_backward_chunk`` on batch-inner columns: one GEMM a group each, with inner size n·L
        for BP3."""
        be = self.backend
        G, Cog, K = self.groups, self.out_channels // self.groups, self._K
        n, L = e - s, dZ.shape[2] * dZ.shape[3]
        cols = _inner_view(ws.cols_of(be, h), n)
        if i > 0:  # the half's last chunk's columns are still there from the forward pass
            self._im2col(X[s:e], cols, True)
        dZt = ws.scratch(be, f"Zt{h}", (G, Cog, n * L))  # Δ as (G, Co/G, n·L)
        dZt.reshape(G * Cog, n, L)[...] = dZ[s:e].reshape(n, G * Cog, L).transpose(1, 0, 2)
        colsg = cols.reshape(G, K, n * L)
        dWc = dW if i == 0 else ws.scratch(be, f"dW_chunk{h}", dW.shape)
        self.backend.matmul(dZt, colsg.transpose(0, 2, 1), out=dWc)  # BP3: Δ · colsᵀ over the chunk
        if dWc is not dW:
            dW += dWc
        if input_grad:  # dcols = Wᵀ Δ into the columns' buffer, then col2im
            self.backend.matmul(self._WgT, dZt, out=colsg)
            be.ops.col2im(cols, ws.dX[s:e], self.kernel_size, self.stride, self.padding,
                          self.dilation, batch_inner=True)

    def _weight_grad(self, dZc, cols, ws, h, dW):
        """BP3 of one chunk of half h: dW[g] (Co/G, K) = Σ_n Δ[n, g] · cols[n, g]ᵀ, written into
        ``dW``."""
        be = self.backend
        n, G, Cog, L = dZc.shape
        K = self._K
        if n == 1:
            self.backend.matmul(dZc[0], cols[0].transpose(0, 2, 1), out=dW)
        elif Cog <= L:
            # One GEMM a sample, then the sum over the chunk; the products (n, G, Co/G, K) are no
            # larger than the columns since Co/G <= L.
            prod = ws.scratch(be, f"prod{h}", (n, G, Cog, K))
            self.backend.matmul(dZc, cols.transpose(0, 1, 3, 2), out=prod)
            prod.sum(axis=0, out=dW)
        else:
            # Few positions, many channels: one GEMM over the chunk with inner size n·L, the chunk
            # brought to (G, ·, n·L) first (two copies, each no larger than the columns).
            dZg = ws.scratch(be, f"dZT{h}", (G, Cog, n * L))
            colsg = ws.scratch(be, f"colsT{h}", (G, K, n * L))
            dZg.reshape(G, Cog, n, L)[...] = dZc.transpose(1, 2, 0, 3)
            colsg.reshape(G, K, n, L)[...] = cols.transpose(1, 2, 0, 3)
            self.backend.matmul(dZg, colsg.transpose(0, 2, 1), out=dW)


# ---- registry declarations ------------------------------------------------------------------
def _make_conv(ctx):
    p = ctx.params
    return [("Conv2d", {"in_channels": ctx.shape[0], "out_channels": ctx.size("out"),
                        "kernel_size": plain(p["k"]), "stride": plain(p["stride"]),
                        "padding": plain(p["pad"]), "dilation": plain(p["dil"]),
                        "groups": p["groups"], "bias": p["bias"], "activation": ctx.activation,
                        "init": p["init"]})]


register(Conv2d, SpecToken(
    "conv", _make_conv, {"out": ("int", REQUIRED), "k": ("pair", REQUIRED), "stride": ("pair", 1),
                         "pad": ("pair0", 0), "dil": ("pair", 1), "groups": ("int", 1),
                         "bias": ("bool", True), "init": ("init", None)},
    positional=("out", "k"), needs="image", fuses_activation=True, example="conv(32,3,pad=1)",
    help="conv(out,k,stride=1,pad=0,dil=1,groups=1,bias=true,init=)   2-D convolution (k etc.: N or HxW)"))
