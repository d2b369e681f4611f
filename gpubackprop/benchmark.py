"""Benchmarks: training-step throughput against PyTorch and scikit-learn, the GEMM limit, fused vs
reference elementwise ops, scaling with batch size and width, and memory.

``gpubackprop bench`` and ``python -m bench`` (from the repository root) both run ``main``.

How it measures (the same on every device):

- Every contender of one table is built first, warmed up, then timed *interleaved*: round after
  round, each contender runs one block of calls (about ``block_s`` seconds) in a rotating order,
  with the device synchronised before each clock read. Throughputs are medians over rounds, and
  a ratio "A over B" is the median of the per-round ratios, so slow drifts of a shared machine
  cancel out.
- On the CPU, the thread pools of different libraries (OpenBLAS and Numba's OpenMP for
  gpubackprop, MKL/OpenMP for PyTorch) busy-wait for a while after each call. A block that starts
  while another library's threads still spin loses a core to them, which no single-library user
  ever sees, so the runner sleeps ``quiesce_s`` (outside the timed region) before every block.
- PyTorch runs with ``torch.set_num_threads`` equal to NumPy's BLAS thread count; on CUDA with
  TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``), as CuPy's default float32 GEMM.
- FLOPs of a training step of an MLP with layer sizes n_0 … n_L and batch B:
  6·B·Σ n_(l−1)·n_l (forward GEMM, weight-gradient GEMM, input-gradient GEMM, 2 FLOPs a
  multiply-add each). The GEMM limit is the time the step's own GEMMs take alone, back to back.
- Bytes of an elementwise op: the minimal bytes read plus written (``op_bytes``).
- LeNet-5 (section ``lenet5``): the ``lenet5`` model preset on 1x28x28 inputs, batch 128, against
  the same network in torch.nn. Its FLOPs are those of the GEMMs the step performs
  (``cnn_step_gemms``: per convolution the forward GEMM W·cols, the weight-gradient GEMM and, except
  for the first layer, the input-gradient GEMM Wᵀ·Δ; three per dense layer, 2 FLOPs a
  multiply-add). "Of GEMM limit" is again t(those GEMMs alone, same layouts) / t(step); "of peak"
  is FLOPs / (the peak sgemm rate, a large square GEMM) / t(step). The conv layers' time split
  comes from a separate, instrumented run that clocks every im2col, conv GEMM, col2im,
  bias+activation (forward, derivative and bias gradient) and pooling call inside real steps.
"""

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

from gpubackprop import backend as backend_mod

# name: (layer sizes, batch); relu hidden layers, identity output, softmax cross-entropy, SGD 0.9.
SHAPES = {
    "L": ((784, 1024, 1024, 10), 256),
    "S": ((784, 256, 256, 10), 128),
    "T": ((64, 64, 10), 32),
}
# --quick: the same structure on tiny sizes (for tests: seconds, not numbers).
QUICK_SHAPES = {"L": ((24, 32, 32, 4), 16), "S": ((16, 8, 8, 3), 8), "T": ((8, 8, 2), 4)}
LR = 0.01
MOMENTUM = 0.9
OP_NAMES = ("act_backward", "bias_act", "softmax_ce", "sgd", "bias_grad")
OP_SHAPES = ((64, 256), (256, 1024), (1024, 4096))
SCALING_BATCHES = (1, 4, 16, 64, 256, 1024)
SCALING_WIDTHS = (64, 256, 1024, 4096)
SCALING_BASE = "S"  # batch sweep on S's sizes; width sweep: 784-w-w-10 at S's batch
# LeNet-5: (per-sample input shape, batch, classes); the model is the "lenet5" preset.
LENET = ((1, 28, 28), 128, 10)
QUICK_LENET = ((1, 12, 12), 8, 10)
# LSTM: (time steps, features, hidden, batch, classes); LSTM -> last step -> Dense.
LSTM_SHAPE = (28, 28, 128, 128, 10)
QUICK_LSTM_SHAPE = (5, 4, 8, 8, 3)
PEAK_GEMM = 1024  # the square sgemm whose rate is "the peak"
QUICK_PEAK_GEMM = 64
SPLIT_CATEGORIES = ("im2col", "GEMM", "col2im", "bias+activation", "pooling")


# ---- counts ---------------------------------------------------------------------------------------
def step_flops(sizes, batch):
    """FLOPs of one training step of an MLP: 6·B·Σ n_in·n_out (three GEMMs a layer)."""
    return 6 * int(batch) * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def step_gemms(sizes, batch):
    """The step's GEMMs as (m, k, n) = (rows, inner, columns), three a layer, in step order."""
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        out.append((batch, n_in, n_out))   # forward:          Z = X Wᵀ       (B×n_in)(n_in×n_out)
        out.append((n_out, batch, n_in))   # weight gradient:  dW = Δᵀ X      (n_out×B)(B×n_in)
        out.append((batch, n_out, n_in))   # input gradient:   dX = Δ W       (B×n_out)(n_out×n_in)
    return out


def gemm_flops(m, k, n):
    return 2 * m * k * n


def op_bytes(op, shape, itemsize=4, label_itemsize=8):
    """Minimal bytes read + written by one elementwise op on a (rows, cols) problem.

    act_backward: read dA, A; write dZ                  3·R·C
    bias_act:     read Z, b; write Z (A is Z, as Dense)  2·R·C + C
    softmax_ce:   read logits, labels; write dlogits, per-row loss   2·R·C + R, + R labels
    sgd:          read p, g, buf; write p, buf           5·R·C (R·C parameters, momentum)
    bias_grad:    read dZ; write db                      R·C + C
    copy:         read src; write dst                    2·R·C
    """
    rows, cols = shape
    n = rows * cols
    elems = {
        "act_backward": 3 * n,
        "bias_act": 2 * n + cols,
        "softmax_ce": 2 * n + rows,
        "sgd": 5 * n,
        "bias_grad": n + cols,
        "copy": 2 * n,
    }
    if op not in elems:
        raise ValueError(f"op: expected one of {tuple(elems)}, got {op!r}")
    extra = rows * label_itemsize if op == "softmax_ce" else 0
    return elems[op] * itemsize + extra


# ---- timing ---------------------------------------------------------------------------------------
class Contender:
    """One thing to time: ``step()`` does ``samples`` samples of work; ``sync()`` waits for it."""

    def __init__(self, name, step, sync=None, samples=1, library="gpubackprop", device="cpu",
                 kernels=None, note=""):
        self.name = name
        self.step = step
        self.sync = sync or _no_sync
        self.samples = samples
        self.library = library
        self.device = device
        self.kernels = kernels
        self.note = note

    def __repr__(self):
        return f"Contender({self.name!r}, device={self.device!r})"


def _no_sync():
    pass


class Timer:
    """Interleaved timing of several contenders: medians of per-round results.

    rounds: timed rounds; block_s: seconds of calls in one block; warmup_s: untimed calls first;
    quiesce_s: sleep before every block (lets other thread pools stop spinning; CPU only).
    """

    def __init__(self, rounds=9, block_s=0.1, warmup_s=0.3, quiesce_s=0.15, max_calls=100000,
                 max_busy=0.15, max_wait_s=3.0):
        self.rounds = rounds
        self.block_s = block_s
        self.warmup_s = warmup_s
        self.quiesce_s = quiesce_s
        self.max_calls = max_calls
        self.max_busy = max_busy
        self.max_wait_s = max_wait_s
        self.busy = []  # the machine's busy fraction seen in each pause (other processes)

    def run(self, contenders):
        """{name: [seconds per call, one per round]} for every contender, timed interleaved."""
        calls = {}
        for c in contenders:
            calls[c.name] = self._warm_up(c)
        times = {c.name: [] for c in contenders}
        for r in range(self.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for c in order:
                n = calls[c.name]
                if self.quiesce_s and c.device == "cpu":
                    self.busy.append(self._quiesce())
                c.sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    c.step()
                c.sync()
                times[c.name].append((time.perf_counter() - t0) / n)
        return times

    def _quiesce(self):
        """Sleep quiesce_s, longer (up to max_wait_s) while other processes keep the CPUs busy.

        On a shared machine another process's burst would take a core from a multi-threaded
        block; waiting for a quiet moment keeps such rounds out. Returns the last busy fraction.
        """
        waited = 0.0
        while True:
            before = _cpu_times()
            time.sleep(self.quiesce_s)
            waited += self.quiesce_s
            busy = _busy_fraction(before, _cpu_times())
            if busy is None or busy <= self.max_busy or waited >= self.max_wait_s:
                return busy

    def _warm_up(self, c):
        """Run ``c`` for warmup_s (at least 3 calls); return the calls in one block."""
        c.step()  # compiles, allocates workspaces
        c.sync()
        n = 0
        t0 = time.perf_counter()
        while True:
            c.step()
            n += 1
            if n >= 2:
                c.sync()
                el = time.perf_counter() - t0
                if (el >= self.warmup_s and n >= 3) or n >= self.max_calls:
                    break
        per_call = el / n
        return int(min(self.max_calls, max(1, round(self.block_s / max(per_call, 1e-9)))))


def _cpu_times():
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _busy_fraction(before, after):
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def ratio_median(num, den):
    """Median over rounds of num[r]/den[r] (both lists of seconds: den/num in throughput terms)."""
    return median([d / n for n, d in zip(num, den, strict=False)])


# ---- contenders -----------------------------------------------------------------------------------
def _batch(sizes, batch, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch)
    return X, y


def mlp_layers(sizes):
    from gpubackprop.layers import Dense

    last = len(sizes) - 2
    return [Dense(a, b, activation="identity" if i == last else "relu")
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False))]


def gpubackprop_contender(sizes, batch, device="cpu", kernels="fused", dtype="float32"):
    """A training step of gpubackprop on a batch already on the device (as a fit() step)."""
    from gpubackprop.layers import Sequential
    from gpubackprop.losses import SoftmaxCrossEntropy
    from gpubackprop.optimizers import SGD
    from gpubackprop.training import _step

    model = Sequential(mlp_layers(sizes), device=device, dtype=dtype, seed=0, kernels=kernels)
    loss = SoftmaxCrossEntropy()
    opt = SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _batch(sizes, batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(_step, model, loss, opt, Xd, Td)
    return Contender(f"gpubackprop {kernels}", step, be.synchronize, batch, "gpubackprop",
                     be.device, kernels)


def torch_module():
    """The torch module, or None when it is not installed."""
    try:
        import torch
    except Exception:
        return None
    return torch


def torch_contender(sizes, batch, device="cpu"):
    """The same MLP, loss and optimizer in PyTorch (nn.Linear, CrossEntropyLoss, optim.SGD)."""
    torch = torch_module()
    torch.manual_seed(0)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*mods)
    return _torch_step_contender(torch, [net], net, *_batch(sizes, batch), batch, device)


def _torch_step_contender(torch, modules, forward, X, y, batch, device):
    """PyTorch's training step of ``forward`` on one fixed batch: cross-entropy, SGD with momentum
    over the ``modules``' parameters, on ``device``."""
    dev = "cuda" if device == "cuda" else "cpu"
    for m in modules:
        m.to(dev)
    opt = torch.optim.SGD([q for m in modules for q in m.parameters()], lr=LR, momentum=MOMENTUM)
    lossf = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)

    def step():
        opt.zero_grad()
        lossf(forward(Xt), yt).backward()
        opt.step()

    sync = torch.cuda.synchronize if dev == "cuda" else None
    return Contender("pytorch", step, sync, batch, "pytorch", device)


def sklearn_contender(sizes, batch):
    """scikit-learn's MLPClassifier, one partial_fit (one SGD step) per batch; CPU only."""
    import warnings

    from sklearn.neural_network import MLPClassifier

    X, y = _batch(sizes, batch)
    classes = np.arange(sizes[-1])
    clf = MLPClassifier(hidden_layer_sizes=tuple(sizes[1:-1]), activation="relu", solver="sgd",
                        alpha=0.0, batch_size=batch, learning_rate_init=LR, momentum=MOMENTUM,
                        nesterovs_momentum=False, shuffle=False, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(X, y, classes=classes)
    step = functools.partial(clf.partial_fit, X, y)
    dtype = clf.coefs_[0].dtype.name
    return Contender("scikit-learn", step, None, batch, "scikit-learn", "cpu",
                     note=f"MLPClassifier.partial_fit, {dtype}")


def gemm_contender(sizes, batch, device="cpu", library="gpubackprop"):
    """The step's GEMMs alone, back to back, in the layouts a step uses: the GEMM limit."""
    if library == "pytorch":
        torch = torch_module()
        dev = "cuda" if device == "cuda" else "cpu"
        mm = torch.mm

        def empty(*shape):
            return torch.randn(*shape, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else None
    else:
        xp = _xp(device)
        mm = xp.matmul
        rng = np.random.default_rng(0)

        def empty(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(np.float32))
        sync = _sync_for(device)
    bufs = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        bufs.append((empty(batch, n_in), empty(n_out, n_in), empty(batch, n_out),
                     empty(batch, n_out), empty(n_out, n_in), empty(batch, n_in)))

    def step():
        for X, W, Z, dZ, dW, dX in bufs:
            mm(X, W.T, out=Z)
            mm(dZ.T, X, out=dW)
            mm(dZ, W, out=dX)

    name = "GEMMs only (torch)" if library == "pytorch" else "GEMMs only"
    return Contender(name, step, sync, batch, library, device, note="the step's GEMMs alone")


def _xp(device):
    if device == "cuda":
        return backend_mod.cupy_module()
    return np


def _sync_for(device):
    if device != "cuda":
        return None
    cp = backend_mod.cupy_module()
    return cp.cuda.get_current_stream().synchronize


# ---- convolutional networks (LeNet-5) --------------------------------------------------------------
def lenet_plan(input_shape=LENET[0], classes=LENET[2], spec="lenet5"):
    """The shape-checked plan (gpubackprop.modelspec) of the benchmarked CNN."""
    from gpubackprop.modelspec import plan

    return plan(spec, input_shape, classes)


def cnn_step_gemms(p, batch):
    """The GEMMs of one training step of a CNN plan, as (what, count, m, k, n): ``count`` products
    of (m×k)·(k×n), in the layouts Conv2d and Dense use. The model's first layer computes no
    input gradient."""
    out = []
    for i, (kind, kw, _ins, outs, _) in enumerate(p.entries):
        if kind == "Conv2d":
            G = kw["groups"]
            cog = kw["out_channels"] // G
            kh, kwid = _pair(kw["kernel_size"])
            K = kw["in_channels"] // G * kh * kwid
            L = outs[1] * outs[2]
            out.append(("conv forward", batch * G, cog, K, L))          # Z = W · cols
            out.append(("conv weight gradient", G, cog, batch * L, K))  # dW = Δ · colsᵀ
            if i > 0:
                out.append(("conv input gradient", batch * G, K, cog, L))  # dcols = Wᵀ · Δ
        elif kind == "Dense":
            n_in, n_out = kw["n_in"], kw["n_out"]
            out.append(("dense forward", 1, batch, n_in, n_out))
            out.append(("dense weight gradient", 1, n_out, batch, n_in))
            if i > 0:
                out.append(("dense input gradient", 1, batch, n_out, n_in))
        elif kind == "Residual":
            raise ValueError("cnn_step_gemms: residual blocks are not counted")
    return out


def cnn_step_flops(p, batch):
    return sum(count * gemm_flops(m, k, n) for _, count, m, k, n in cnn_step_gemms(p, batch))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _image_batch(input_shape, classes, batch, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    return X, rng.integers(0, classes, batch)


def cnn_contender(p, batch, device="cpu", kernels="fused", dtype="float32"):
    """A training step of gpubackprop on the plan's model, batch already on the device."""
    from gpubackprop.layers import Sequential
    from gpubackprop.losses import SoftmaxCrossEntropy
    from gpubackprop.optimizers import SGD
    from gpubackprop.training import _step

    model = Sequential(p.layers(), device=device, dtype=dtype, seed=0, kernels=kernels,
                       input_shape=p.input_shape)
    loss, opt = SoftmaxCrossEntropy(), SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _image_batch(p.input_shape, p.output_shape[0], batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    c = Contender(f"gpubackprop {kernels}", functools.partial(_step, model, loss, opt, Xd, Td),
                  be.synchronize, batch, "gpubackprop", be.device, kernels)
    c.model = model
    return c


def torch_cnn(p):
    """The plan as a torch.nn.Sequential (Conv2d, pools, Flatten, Linear, activations)."""
    torch = torch_module()
    nn = torch.nn
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "leaky_relu": nn.LeakyReLU}
    mods = []
    for kind, kw, _, _, _ in p.entries:
        if kind == "Conv2d":
            mods.append(nn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"],
                                  stride=kw["stride"], padding=kw["padding"],
                                  dilation=kw["dilation"], groups=kw["groups"], bias=kw["bias"]))
        elif kind == "Dense":
            mods.append(nn.Linear(kw["n_in"], kw["n_out"]))
        elif kind == "MaxPool2d":
            mods.append(nn.MaxPool2d(kw["kernel_size"], kw["stride"], kw["padding"],
                                     kw["dilation"]))
        elif kind == "AvgPool2d":
            mods.append(nn.AvgPool2d(kw["kernel_size"], kw["stride"], kw["padding"],
                                     count_include_pad=kw["count_include_pad"]))
        elif kind == "GlobalAvgPool2d":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif kind == "Flatten":
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"torch_cnn: no torch counterpart for {kind} here")
        if kw.get("activation", "identity") != "identity":
            mods.append(acts[kw["activation"]]())
    return nn.Sequential(*mods)


def torch_cnn_contender(p, batch, device="cpu"):
    """The same CNN, loss and optimizer in PyTorch."""
    torch = torch_module()
    torch.manual_seed(0)
    net = torch_cnn(p)
    X, y = _image_batch(p.input_shape, p.output_shape[0], batch)
    return _torch_step_contender(torch, [net], net, X, y, batch, device)


def cnn_gemm_contender(p, batch, device="cpu", library="gpubackprop"):
    """The CNN step's GEMMs alone, back to back, in the layouts the layers use (batched W·cols
    over samples; the weight gradient with inner size batch·L from a transposed view)."""
    if library == "pytorch":
        torch = torch_module()
        dev = "cuda" if device == "cuda" else "cpu"

        def arr(*shape):
            return torch.randn(*shape, device=dev)
        mm = torch.matmul
        sync = torch.cuda.synchronize if dev == "cuda" else None
    else:
        xp = _xp(device)
        rng = np.random.default_rng(0)

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(np.float32))
        mm = xp.matmul
        sync = _sync_for(device)
    calls = []
    for what, count, m, k, n in cnn_step_gemms(p, batch):
        if what == "conv forward" or what == "conv input gradient":
            A, B, C = arr(m, k), arr(count, k, n), arr(count, m, n)
            if what == "conv input gradient":
                A = arr(k, m).T  # Wᵀ, a transposed view as in the layer
        elif what == "conv weight gradient":
            A, B, C = arr(count, m, k), arr(count, n, k).transpose(1, 2) if library == "pytorch" \
                else arr(count, n, k).transpose(0, 2, 1), arr(count, m, n)
        elif what == "dense forward":
            A, B, C = arr(m, k), arr(n, k).T, arr(m, n)  # X · Wᵀ
        elif what == "dense weight gradient":
            A, B, C = arr(k, m).T, arr(k, n), arr(m, n)  # Δᵀ · X
        else:
            A, B, C = arr(m, k), arr(k, n), arr(m, n)  # Δ · W
        calls.append((A, B, C))

    def step():
        for A, B, C in calls:
            mm(A, B, out=C)

    name = "GEMMs only (torch)" if library == "pytorch" else "GEMMs only"
    return Contender(name, step, sync, batch, library, device, note="the step's GEMMs alone")


def peak_gemm_gflops(timer, device, n=PEAK_GEMM):
    """GFLOP/s of one large square sgemm (xp.matmul with out=): the peak a step is held against."""
    xp = _xp(device)
    rng = np.random.default_rng(0)
    A, B = (xp.asarray(rng.standard_normal((n, n)).astype(np.float32)) for _ in range(2))
    C = xp.empty((n, n), dtype=np.float32)
    c = Contender("peak", functools.partial(xp.matmul, A, B, out=C), _sync_for(device), 1,
                  "numpy", device)
    t = Timer(rounds=max(3, timer.rounds // 2), block_s=timer.block_s, warmup_s=timer.warmup_s,
              quiesce_s=timer.quiesce_s).run([c])["peak"]
    return gemm_flops(n, n, n) / median(t) / 1e9


class _TimedOps:
    """Stands in for a backend's kernel set and array module: clocks the conv and pooling calls.

    Categories: im2col, col2im, GEMM (the conv layers' batched xp.matmul: 3-D or 4-D operands;
    Dense keeps its own bound matmul and is not counted), bias+activation (channel_bias_act,
    channel_bias_grad, and act_backward on 4-D arrays), pooling (max/avg pool and their backward).
    """

    CATEGORY = {"im2col": "im2col", "col2im": "col2im", "channel_bias_act": "bias+activation",
                "channel_bias_grad": "bias+activation", "act_backward": "bias+activation",
                "max_pool2d": "pooling", "max_pool2d_backward": "pooling",
                "avg_pool2d": "pooling", "avg_pool2d_backward": "pooling", "matmul": "GEMM"}

    def __init__(self, inner, sync, totals):
        self._inner, self._sync, self._totals = inner, sync, totals

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        category = self.CATEGORY.get(name)
        if category is None or not callable(attr):
            return attr
        totals, sync = self._totals, self._sync

        def timed(*args, **kwargs):
            if name in ("act_backward", "matmul") and getattr(args[0], "ndim", 2) < 3 \
                    and getattr(args[1], "ndim", 2) < 3:
                return attr(*args, **kwargs)
            sync()
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            sync()
            totals[category] = totals.get(category, 0.0) + time.perf_counter() - t0
            return out
        return timed


def conv_time_split(contender, steps=20):
    """{category: seconds per step} of a CNN contender's conv and pooling work, clocked inside
    ``steps`` real steps (the ops and array module swapped for timed stand-ins, then restored)."""
    be = contender.model.backend
    contender.step()
    contender.sync()
    totals = {}
    ops, xp = be.ops, be.xp
    sync = _sync_for(be.device) or _no_sync  # not be.synchronize: it looks at be.xp
    be.ops = _TimedOps(ops, sync, totals)
    be.xp = _TimedOps(xp, sync, totals)
    try:
        for _ in range(steps):
            contender.step()
        sync()
    finally:
        be.ops, be.xp = ops, xp
    return {c: totals.get(c, 0.0) / steps for c in SPLIT_CATEGORIES}


def lenet_section(timer, devices, lenet=LENET, with_torch=True, peak_n=PEAK_GEMM, split_steps=20,
                  log=print):
    """LeNet-5 training steps: samples/s of gpubackprop (fused, reference) and PyTorch, the ratio,
    the fraction of the GEMM limit and of the peak sgemm rate, and the conv layers' time split."""
    input_shape, batch, classes = lenet
    p = lenet_plan(input_shape, classes)
    torch = torch_module() if with_torch else None
    flops = cnn_step_flops(p, batch)
    out = {"spec": p.spec, "summary": p.summary(), "input_shape": list(input_shape),
           "batch": batch, "step_flops": flops, "gemms": [list(g) for g in cnn_step_gemms(p, batch)],
           "rows": [], "split": [], "peak": []}
    for dev in devices:
        peak = peak_gemm_gflops(timer, dev, peak_n)
        out["peak"].append({"device": dev, "n": peak_n, "gflops": peak})
        cs = [cnn_contender(p, batch, dev, "reference"), cnn_contender(p, batch, dev, "fused"),
              cnn_gemm_contender(p, batch, dev)]
        if torch is not None:
            cs += [torch_cnn_contender(p, batch, dev),
                   cnn_gemm_contender(p, batch, dev, "pytorch")]
        times = timer.run(cs)
        gemm_t, torch_t = times["GEMMs only"], times.get("pytorch")
        for c in cs:
            t = times[c.name]
            own_gemm = times.get("GEMMs only (torch)") if c.library == "pytorch" else gemm_t
            out["rows"].append({
                "device": dev, "contender": c.name, "library": c.library, "kernels": c.kernels,
                "note": c.note, "samples_per_s": batch / median(t), "step_ms": 1e3 * median(t),
                "gflops": flops / median(t) / 1e9, "rounds_s": t,
                "ratio_to_pytorch": ratio_median(t, torch_t) if torch_t else None,
                "gemm_fraction": ratio_median(t, own_gemm) if own_gemm else None,
                "peak_fraction": flops / (peak * 1e9) / median(t)})
        if torch is None:
            out["rows"].append({"device": dev, "contender": "pytorch", "library": "pytorch",
                                "kernels": None, "note": "not installed", "samples_per_s": None})
        log(f"  {dev} LeNet-5: " + ", ".join(
            f"{r['contender']} {r['samples_per_s']:.0f}/s" for r in out["rows"]
            if r["device"] == dev and r["samples_per_s"] is not None)
            + f"; peak sgemm {peak:.0f} GFLOP/s")
        for c in cs[:2]:
            step_s = median(times[c.name])
            split = conv_time_split(c, split_steps)
            out["split"].append({"device": dev, "contender": c.name, "step_ms": 1e3 * step_s,
                                 "ms": {k: 1e3 * v for k, v in split.items()},
                                 "fraction": {k: v / step_s for k, v in split.items()}})
            log(f"  {dev} {c.name} split (ms/step): " + ", ".join(
                f"{k} {1e3 * v:.2f}" for k, v in split.items()))
    return out


# ---- LSTM -------------------------------------------------------------------------------------------
def lstm_step_flops(T, F, H, batch, classes):
    """GEMM FLOPs of a training step: input projection, recurrent GEMMs, their backward and
    weight-gradient GEMMs (3 GEMMs of each shape), and the Dense head's."""
    proj = 2 * batch * T * F * 4 * H  # X W_ihᵀ over all steps
    rec = 2 * batch * (T - 1) * H * 4 * H  # h W_hhᵀ per step (none at t = 0 from a zero state)
    head = 2 * batch * H * classes
    return 3 * (proj + rec + head) - 2 * batch * T * F * 4 * H  # no input gradient for X


def _sequence_batch(T, F, classes, batch, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, T, F)).astype(np.float32),
            rng.integers(0, classes, batch))


def lstm_contender(shape, device="cpu", kernels="fused", dtype="float32"):
    """A training step of gpubackprop's LSTM -> LastStep -> Dense, batch already on the device."""
    from gpubackprop.layers import LSTM, Dense, LastStep, Sequential
    from gpubackprop.losses import SoftmaxCrossEntropy
    from gpubackprop.optimizers import SGD
    from gpubackprop.training import _step

    T, F, H, batch, classes = shape
    model = Sequential([LSTM(F, H), LastStep(), Dense(H, classes)], device=device, dtype=dtype,
                       seed=0, kernels=kernels, input_shape=(T, F))
    loss, opt = SoftmaxCrossEntropy(), SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _sequence_batch(T, F, classes, batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    return Contender(f"gpubackprop {kernels}", functools.partial(_step, model, loss, opt, Xd, Td),
                     be.synchronize, batch, "gpubackprop", be.device, kernels)


def torch_lstm_contender(shape, device="cpu"):
    """The same model in PyTorch: nn.LSTM(batch_first) -> last step -> nn.Linear."""
    torch = torch_module()
    torch.manual_seed(0)
    T, F, H, batch, classes = shape
    lstm, head = torch.nn.LSTM(F, H, batch_first=True), torch.nn.Linear(H, classes)
    X, y = _sequence_batch(T, F, classes, batch)
    return _torch_step_contender(torch, [lstm, head], lambda Xt: head(lstm(Xt)[0][:, -1]), X, y,
                                 batch, device)


def lstm_section(timer, devices, shape=LSTM_SHAPE, with_torch=True, log=print):
    """LSTM training steps: samples/s of gpubackprop (fused, reference) and PyTorch, and the ratio."""
    T, F, H, batch, classes = shape
    torch = torch_module() if with_torch else None
    flops = lstm_step_flops(*shape)
    out = {"T": T, "input_size": F, "hidden_size": H, "batch": batch, "classes": classes,
           "step_flops": flops, "rows": []}
    for dev in devices:
        cs = [lstm_contender(shape, dev, "reference"), lstm_contender(shape, dev, "fused")]
        if torch is not None:
            cs.append(torch_lstm_contender(shape, dev))
        times = timer.run(cs)
        torch_t = times.get("pytorch")
        for c in cs:
            t = times[c.name]
            out["rows"].append({
                "device": dev, "contender": c.name, "samples_per_s": batch / median(t),
                "step_ms": 1e3 * median(t), "gflops": flops / median(t) / 1e9, "rounds_s": t,
                "ratio_to_pytorch": ratio_median(t, torch_t) if torch_t else None})
        if torch is None:
            out["rows"].append({"device": dev, "contender": "pytorch", "note": "not installed",
                                "samples_per_s": None})
        log(f"  {dev} LSTM: " + ", ".join(
            f"{r['contender']} {r['samples_per_s']:.0f}/s" for r in out["rows"]
            if r["device"] == dev and r["samples_per_s"] is not None))
    return out


# ---- sections -------------------------------------------------------------------------------------
def devices_available(requested="all"):
    if requested == "all":
        return ["cpu"] + (["cuda"] if backend_mod.has_cupy_gpu() else [])
    if requested == "cuda" and not backend_mod.has_cupy_gpu():
        raise ValueError("device: 'cuda' was requested but no CUDA GPU is usable (CuPy + Numba)")
    return [requested]


def throughput_section(timer, devices, shapes, with_torch=True, with_sklearn=True, log=print):
    """Samples/s of a training step for each shape and contender, ratios to PyTorch, GEMM limit."""
    rows = []
    torch = torch_module() if with_torch else None
    for dev in devices:
        for key, (sizes, batch) in shapes.items():
            cs = [gpubackprop_contender(sizes, batch, dev, "reference"),
                  gpubackprop_contender(sizes, batch, dev, "fused"),
                  gemm_contender(sizes, batch, dev)]
            if torch is not None:
                cs += [torch_contender(sizes, batch, dev), gemm_contender(sizes, batch, dev,
                                                                          "pytorch")]
            if with_sklearn and dev == "cpu":
                cs.append(sklearn_contender(sizes, batch))
            times = timer.run(cs)
            flops = step_flops(sizes, batch)
            gemm_t = times["GEMMs only"]
            torch_t = times.get("pytorch")
            for c in cs:
                t = times[c.name]
                own_gemm = times.get("GEMMs only (torch)") if c.library == "pytorch" else gemm_t
                row = {
                    "device": dev, "shape": key, "sizes": list(sizes), "batch": batch,
                    "contender": c.name, "library": c.library, "kernels": c.kernels,
                    "note": c.note, "samples_per_s": batch / median(t),
                    "step_ms": 1e3 * median(t), "gflops": flops / median(t) / 1e9,
                    "step_flops": flops, "rounds_s": t,
                    "ratio_to_pytorch": ratio_median(t, torch_t) if torch_t else None,
                    # step FLOPs over the backend's own GEMM rate: t(GEMMs alone) / t(step)
                    "gemm_fraction": ratio_median(t, own_gemm) if own_gemm else None,
                }
                rows.append(row)
            log(f"  {dev} {key}: " + ", ".join(
                f"{r['contender']} {r['samples_per_s']:.0f}/s" for r in rows[-len(cs):]))
            if torch is None:
                rows.append({"device": dev, "shape": key, "sizes": list(sizes), "batch": batch,
                             "contender": "pytorch", "library": "pytorch", "kernels": None,
                             "note": "not installed", "samples_per_s": None})
    return rows


def gemm_section(timer, devices, shapes, log=print):
    """GFLOP/s of each of the step's GEMM shapes alone (the backend's xp.matmul with out=)."""
    rows = []
    for dev in devices:
        xp = _xp(dev)
        shapes_seen = []
        for _key, (sizes, batch) in shapes.items():
            for (m, k, n) in step_gemms(sizes, batch):
                if (m, k, n) not in shapes_seen:
                    shapes_seen.append((m, k, n))
        rng = np.random.default_rng(0)
        cs = []
        for (m, k, n) in shapes_seen:
            A = xp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            B = xp.asarray(rng.standard_normal((k, n)).astype(np.float32))
            C = xp.empty((m, n), dtype=np.float32)
            cs.append(Contender(f"{m}x{k}x{n}", functools.partial(xp.matmul, A, B, out=C),
                                _sync_for(dev), 1, "gpubackprop", dev))
        times = Timer(rounds=max(3, timer.rounds // 2), block_s=timer.block_s / 2,
                      warmup_s=timer.warmup_s / 3, quiesce_s=0).run(cs)
        for (m, k, n), c in zip(shapes_seen, cs, strict=False):
            t = median(times[c.name])
            rows.append({"device": dev, "m": m, "k": k, "n": n,
                         "gflops": gemm_flops(m, k, n) / t / 1e9, "us": t * 1e6})
        log(f"  {dev} GEMM shapes: " + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops']:.0f}"
                                                  for r in rows if r["device"] == dev))
    return rows


def op_contenders(ops, op, shape, xp):
    """A contender calling ``ops.<op>`` on fresh float32 arrays of ``shape`` (rows, cols)."""
    rows, cols = shape
    rng = np.random.default_rng(0)

    def arr(*s):
        return xp.asarray(rng.standard_normal(s).astype(np.float32))
    if op == "act_backward":
        dA, A, dZ = arr(rows, cols), xp.maximum(arr(rows, cols), 0), arr(rows, cols)
        return functools.partial(ops.act_backward, dA, A, "relu", dZ)
    if op == "bias_act":
        Z, b = arr(rows, cols), arr(cols) * np.float32(1e-3)
        return functools.partial(ops.bias_act, Z, b, "relu", Z)
    if op == "softmax_ce":
        logits, dl = arr(rows, cols), arr(rows, cols)
        labels = xp.asarray(rng.integers(0, cols, rows))
        loss_rows = arr(rows)
        return functools.partial(ops.softmax_ce, logits, labels, dl, loss_rows)
    if op == "sgd":
        n = rows * cols
        p, g, buf = arr(n), arr(n) * np.float32(1e-3), xp.zeros(n, dtype=np.float32)
        scale = xp.ones(1, dtype=np.float32)
        return functools.partial(ops.sgd, p, g, buf, LR, MOMENTUM, False, 0.0, scale)
    if op == "bias_grad":
        dZ, db = arr(rows, cols), arr(cols)
        return functools.partial(ops.bias_grad, dZ, db, False)
    if op == "copy":
        src, dst = arr(rows, cols), arr(rows, cols)
        return functools.partial(xp.copyto, dst, src)
    raise ValueError(f"op: expected one of {OP_NAMES + ('copy',)}, got {op!r}")


def ops_section(timer, devices, op_shapes=OP_SHAPES, op_names=OP_NAMES, log=print):
    """GB/s of the fused and reference elementwise ops, and of a plain copy, at several sizes."""
    from gpubackprop.kernels.reference import ReferenceOps

    rows = []
    for dev in devices:
        xp = _xp(dev)
        fused = backend_mod.load_ops(dev, "fused", xp)
        ref = ReferenceOps(xp)
        sync = _sync_for(dev)
        for shape in op_shapes:
            cs = [Contender("copy", op_contenders(ref, "copy", shape, xp), sync, 1, "numpy", dev)]
            for op in op_names:
                for kernels, ops in (("reference", ref), ("fused", fused)):
                    cs.append(Contender(f"{op} {kernels}", op_contenders(ops, op, shape, xp), sync,
                                        1, "gpubackprop", dev, kernels))
            times = Timer(rounds=timer.rounds, block_s=timer.block_s / 4,
                          warmup_s=timer.warmup_s / 3, quiesce_s=0).run(cs)
            copy_t = times["copy"]
            copy_gbs = op_bytes("copy", shape) / median(copy_t) / 1e9
            rows.append({"device": dev, "op": "copy", "kernels": None, "shape": list(shape),
                         "bytes": op_bytes("copy", shape), "us": 1e6 * median(copy_t),
                         "gbs": copy_gbs, "fraction_of_copy": 1.0, "fused_over_reference": None})
            for op in op_names:
                nbytes = op_bytes(op, shape)
                tr, tf = times[f"{op} reference"], times[f"{op} fused"]
                for kernels, t in (("reference", tr), ("fused", tf)):
                    gbs = nbytes / median(t) / 1e9
                    rows.append({"device": dev, "op": op, "kernels": kernels, "shape": list(shape),
                                 "bytes": nbytes, "us": 1e6 * median(t), "gbs": gbs,
                                 "fraction_of_copy": gbs / copy_gbs,
                                 "fused_over_reference": ratio_median(tf, tr)
                                 if kernels == "fused" else None})
            log(f"  {dev} ops {shape[0]}x{shape[1]}: copy {copy_gbs:.1f} GB/s, " + ", ".join(
                f"{r['op']} x{r['fused_over_reference']:.2f}" for r in rows[-2 * len(op_names):]
                if r["kernels"] == "fused"))
    return rows


def scaling_section(timer, devices, batches=SCALING_BATCHES, widths=SCALING_WIDTHS,
                    with_torch=True, base=SHAPES[SCALING_BASE], log=print):
    """Samples/s against batch size (S's sizes) and against width (784-w-w-10 at S's batch)."""
    sizes, base_batch = base
    torch = torch_module() if with_torch else None
    points = [("batch", b, sizes, b) for b in batches]
    points += [("width", w, (sizes[0], w, w, sizes[-1]), base_batch) for w in widths]
    rows = []
    for dev in devices:
        for axis, value, sz, batch in points:
            cs = [gpubackprop_contender(sz, batch, dev, "reference"),
                  gpubackprop_contender(sz, batch, dev, "fused")]
            if torch is not None:
                cs.append(torch_contender(sz, batch, dev))
            times = timer.run(cs)
            for c in cs:
                t = times[c.name]
                rows.append({"device": dev, "axis": axis, "value": value, "sizes": list(sz),
                             "batch": batch, "contender": c.name,
                             "samples_per_s": batch / median(t),
                             "gflops": step_flops(sz, batch) / median(t) / 1e9,
                             "ratio_to_pytorch": ratio_median(t, times["pytorch"])
                             if "pytorch" in times else None})
            log(f"  {dev} {axis}={value}: " + ", ".join(
                f"{r['contender']} {r['samples_per_s']:.0f}/s" for r in rows[-len(cs):]))
    return rows


def memory_section(devices, shapes, growth_steps=1000, growth_shapes=("S", "T"), log=print):
    """Peak memory a step allocates (tracemalloc on the CPU, the CuPy pool on a GPU), and the
    growth of allocated memory over ``growth_steps`` steps."""
    rows = []
    for dev in devices:
        for key, (sizes, batch) in shapes.items():
            for kernels in ("reference", "fused"):
                c = gpubackprop_contender(sizes, batch, dev, kernels)
                for _ in range(3):  # workspaces, optimizer state, compiled kernels
                    c.step()
                c.sync()
                n = growth_steps if key in growth_shapes else 0
                peak, growth = _memory_of(c, dev, n)
                rows.append({"device": dev, "shape": key, "contender": c.name,
                             "step_peak_bytes": peak, "growth_steps": n,
                             "growth_bytes": growth if n else None,
                             "tool": "cupy memory pool" if dev == "cuda" else "tracemalloc"})
                log(f"  {dev} {key} {c.name}: peak {peak} B a step"
                    + (f", growth over {n} steps {growth} B" if n else ""))
    return rows


def _memory_of(c, device, n):
    if device == "cuda":
        return _cupy_memory_of(c, n)
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        c.step()
        c.sync()
        cur, peak = tracemalloc.get_traced_memory()
        peak -= base
        growth = 0
        if n:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(n):
                c.step()
            c.sync()
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return int(peak), int(growth)


def _cupy_memory_of(c, n):
    cp = backend_mod.cupy_module()
    pool = cp.get_default_memory_pool()

    class PeakHook(cp.cuda.MemoryHook):
        name = "PeakHook"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.used += mem_size
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.used -= mem_size

    hook = PeakHook()
    c.sync()
    with hook:
        c.step()
        c.sync()
    peak = hook.peak
    growth = 0
    if n:
        before = pool.used_bytes()
        for _ in range(n):
            c.step()
        c.sync()
        growth = pool.used_bytes() - before
    return int(peak), int(growth)


# ---- environment ----------------------------------------------------------------------------------
def blas_threads():
    """Threads of NumPy's BLAS (threadpoolctl when installed, else the CPU count)."""
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return int(info["num_threads"])
    except Exception:
        pass
    return os.cpu_count() or 1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name():
    if not backend_mod.has_cupy_gpu():
        return None
    cp = backend_mod.cupy_module()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def machine_type(gpu=None):
    """A file-name-safe name for this kind of machine, e.g. 'cpu-amd-epyc-2c' or 'gpu-nvidia-h100'."""
    def slug(s):
        keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in s)
        words = [w for w in keep.split("-") if w and w not in ("r", "tm", "cpu", "processor", "with")]
        return "-".join(words[:5])
    if gpu:
        return "gpu-" + slug(gpu)
    return f"cpu-{slug(cpu_model())}-{os.cpu_count()}c"


def environment(devices):
    import numba

    env = {
        "machine_type": machine_type(gpu_name() if "cuda" in devices else None),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "numba": numba.__version__, "blas_threads": blas_threads(),
        "numba_threads": numba.get_num_threads(), "devices": devices,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        env["blas"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:
        env["blas"] = "unknown"
    torch = torch_module()
    env["torch"] = torch.__version__ if torch is not None else "not installed"
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        env["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    try:
        import sklearn
        env["sklearn"] = sklearn.__version__
    except Exception:
        env["sklearn"] = "not installed"
    if "cuda" in devices:
        cp = backend_mod.cupy_module()
        env["gpu"] = gpu_name()
        env["cupy"] = cp.__version__
        env["cupy_tf32"] = os.environ.get("CUPY_TF32", "0")
    return env


def configure_torch(threads):
    """Same threads as NumPy's BLAS; TF32 off on CUDA (CuPy's default float32 GEMM is full fp32)."""
    torch = torch_module()
    if torch is None:
        return
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ---- entry point ----------------------------------------------------------------------------------
SECTIONS = ("throughput", "lenet5", "lstm", "gemm", "ops", "scaling", "memory")


def build_parser():
    p = argparse.ArgumentParser(
        prog="gpubackprop bench",
        description="Training-step throughput against PyTorch and scikit-learn, GEMM limit, fused "
                    "vs reference ops, scaling and memory; interleaved, medians over rounds.")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few rounds (seconds; for tests, not for numbers)")
    p.add_argument("--device", default="all", choices=("all", "cpu", "cuda"),
                   help="devices to measure (default: every available one)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--shapes", default="L,S,T", help="comma-separated subset of L,S,T")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 11; quick 2)")
    p.add_argument("--out", default=None,
                   help="folder for <machine-type>.json/.md/.png (default: print only)")
    p.add_argument("--name", default=None, help="file name stem (default: the machine type)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--no-sklearn", action="store_true", help="leave scikit-learn out")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    return p


def run(args, log=print):
    """Run the selected sections; returns the results dict (what the JSON file holds)."""
    from gpubackprop import bench_report

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"sections: expected a subset of {SECTIONS}, got {bad}")
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    bad = [k for k in keys if k not in SHAPES]
    if bad:
        raise ValueError(f"shapes: expected a subset of {tuple(SHAPES)}, got {bad}")
    devices = devices_available(args.device)
    if args.quick:
        shapes = {k: QUICK_SHAPES[k] for k in keys}
        timer = Timer(rounds=args.rounds or 2, block_s=0.005, warmup_s=0.01, quiesce_s=0.0)
        op_shapes, batches, widths, growth = ((8, 16), (16, 32)), (1, 8), (8, 16), 20
        lenet, peak_n, split_steps = QUICK_LENET, QUICK_PEAK_GEMM, 2
        lstm_shape = QUICK_LSTM_SHAPE
    else:
        shapes = {k: SHAPES[k] for k in keys}
        timer = Timer(rounds=args.rounds or 11)
        op_shapes, batches, widths, growth = OP_SHAPES, SCALING_BATCHES, SCALING_WIDTHS, 1000
        lenet, peak_n, split_steps = LENET, PEAK_GEMM, 20
        lstm_shape = LSTM_SHAPE
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"rounds: expected a positive integer, got {args.rounds}")
    with_torch = not args.no_torch
    if with_torch:
        configure_torch(blas_threads())
    results = {"environment": environment(devices), "quick": bool(args.quick),
               "method": {"rounds": timer.rounds, "block_s": timer.block_s,
                          "warmup_s": timer.warmup_s, "quiesce_s": timer.quiesce_s,
                          "lr": LR, "momentum": MOMENTUM, "dtype": "float32"},
               "shapes": {k: {"sizes": list(s), "batch": b} for k, (s, b) in shapes.items()}}
    if with_torch and torch_module() is None:
        log("PyTorch is not installed: its rows say so (pip install torch==2.13.0 for the CPU build)")
    t_start = time.perf_counter()
    if "throughput" in sections:
        log("throughput (samples/s), interleaved:")
        results["throughput"] = throughput_section(timer, devices, shapes, with_torch,
                                                   not args.no_sklearn, log)
    if "lenet5" in sections:
        log("LeNet-5 (samples/s), interleaved:")
        results["lenet5"] = lenet_section(timer, devices, lenet, with_torch, peak_n, split_steps,
                                          log)
    if "lstm" in sections:
        log("LSTM (samples/s), interleaved:")
        results["lstm"] = lstm_section(timer, devices, lstm_shape, with_torch, log)
    if "gemm" in sections:
        log("GEMM shapes (GFLOP/s):")
        results["gemm"] = gemm_section(timer, devices, shapes, log)
    if "ops" in sections:
        log("elementwise ops (GB/s), fused over reference:")
        results["ops"] = ops_section(timer, devices, op_shapes, log=log)
    if "scaling" in sections:
        log("scaling (samples/s):")
        scale_timer = Timer(rounds=max(2, timer.rounds // 2), block_s=timer.block_s,
                            warmup_s=timer.warmup_s, quiesce_s=timer.quiesce_s)
        base = (QUICK_SHAPES if args.quick else SHAPES)[SCALING_BASE]
        results["scaling"] = scaling_section(scale_timer, devices, batches, widths, with_torch,
                                             base, log)
    if "memory" in sections:
        log("memory:")
        results["memory"] = memory_section(devices, shapes, growth, tuple(shapes), log)
    busy = [b for t in (timer, locals().get("scale_timer")) if t is not None for b in t.busy
            if b is not None]
    results["method"]["busy_before_blocks"] = {
        "median": median(busy) if busy else None, "max": max(busy) if busy else None,
        "over_threshold": sum(b > timer.max_busy for b in busy), "blocks": len(busy),
        "threshold": timer.max_busy}
    results["seconds"] = time.perf_counter() - t_start
    results["markdown"] = bench_report.markdown(results)
    return results



def main(argv=None):
    """Command-line entry point (``gpubackprop bench``); returns the exit status."""
    from gpubackprop import bench_report

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = run(args)
    except ValueError as e:
        print(f"gpubackprop bench: {e}", file=sys.stderr)
        return 2
    print()
    print(results["markdown"])
    if args.out:
        paths = bench_report.write(results, args.out, args.name, plot_png=not args.no_plot)
        print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
