"""The CNN benchmark (LeNet-5): step throughput against PyTorch, the GEMM limit and the peak, and
the conv layers' time split."""

import functools
import time

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM, torch_step_contender
from gpubackprop.benchmark.gemm import PEAK_GEMM, gemm_flops, peak_gemm_gflops
from gpubackprop.benchmark.timing import Contender, median, no_sync, ratio_median, sync_for, xp_for

# LeNet-5: (per-sample input shape, batch, classes); the model is the "lenet5" preset.
LENET = ((1, 28, 28), 128, 10)
QUICK_LENET = ((1, 12, 12), 8, 10)
SPLIT_CATEGORIES = ("im2col", "GEMM", "col2im", "bias+activation", "pooling")


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
    from gpubackprop.training import step_on_device

    model = Sequential(p.layers(), device=device, dtype=dtype, seed=0, kernels=kernels,
                       input_shape=p.input_shape)
    loss, opt = SoftmaxCrossEntropy(), SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _image_batch(p.input_shape, p.output_shape[0], batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(step_on_device, model, loss, opt, Xd, Td)
    c = Contender(f"gpubackprop {kernels}", step, be.synchronize, batch, "gpubackprop", be.device,
                  kernels)
    c.model = model
    return c


def torch_cnn(p):
    """The plan as a torch.nn.Sequential (Conv2d, pools, Flatten, Linear, activations)."""
    torch = contenders.torch_module()
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
    torch = contenders.torch_module()
    torch.manual_seed(0)
    net = torch_cnn(p)
    X, y = _image_batch(p.input_shape, p.output_shape[0], batch)
    return torch_step_contender(torch, [net], net, X, y, batch, device)


def cnn_gemm_contender(p, batch, device="cpu", library="gpubackprop"):
    """The CNN step's GEMMs alone, back to back, in the layouts the layers use (batched W·cols
    over samples; the weight gradient with inner size batch·L from a transposed view)."""
    if library == "pytorch":
        torch = contenders.torch_module()
        dev = "cuda" if device == "cuda" else "cpu"

        def arr(*shape):
            return torch.randn(*shape, device=dev)
        mm = torch.matmul
        sync = torch.cuda.synchronize if dev == "cuda" else None
    else:
        xp = xp_for(device)
        rng = np.random.default_rng(0)

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(np.float32))
        mm = xp.matmul
        sync = sync_for(device)
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
    sync = sync_for(be.device) or no_sync  # not be.synchronize: it looks at be.xp
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
    torch = contenders.torch_module() if with_torch else None
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

