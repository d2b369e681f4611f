"""The network benchmarks of issue 15 (LeNet-5, a VGG-style BatchNorm net, the ``resnet`` preset, an
LSTM and a 2-layer GRU) and issue 19 (a 2-layer TransformerEncoder): a training step of each
against the same network in torch.nn, the fraction of the step's GEMM limit and of the peak sgemm
rate, and the per-op time split.

Every network is a model spec (gpubackprop.modelspec) on a per-sample input shape; the plan it
parses into gives gpubackprop's model, its torch twin (``twins``), its GEMMs (``gemm_limit``) and
its split (``split``), so one path serves them all.
"""

import collections
import functools

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM, torch_step_contender
from gpubackprop.benchmark.gemm import PEAK_GEMM, peak_gemm_gflops
from gpubackprop.benchmark.gemm_limit import (
    gemm_limit_contender,
    plan_step_flops,
    plan_step_gemms,
    plan_step_schedule,
)
from gpubackprop.benchmark.split import step_time_split
from gpubackprop.benchmark.timing import Contender, median, ratio_median
from gpubackprop.benchmark.twins import load_weights, torch_twin

Network = collections.namedtuple("Network", ["title", "spec", "input_shape", "batch", "classes"])


def vgg_spec(c1=32, c2=64):
    """conv-bn-relu ×2 (c1 channels, 3x3, pad 1), maxpool, conv-bn-relu (c2), maxpool, global
    average pool, dense: the VGG-style BatchNorm net of issue 15."""
    cbr = "conv({},3,pad=1)-bn-relu"
    return "-".join([cbr.format(c1), cbr.format(c1), "maxpool(2)", cbr.format(c2), "maxpool(2)",
                     "gap", "dense(classes)"])


NETWORKS = {
    "lenet5": Network("LeNet-5", "lenet5", (1, 28, 28), 128, 10),
    "vgg": Network("VGG-style BatchNorm net", vgg_spec(), (3, 32, 32), 64, 10),
    "resnet": Network("resnet preset", "resnet", (3, 32, 32), 64, 10),
    "lstm": Network("LSTM", "lstm(128)-last-dense(classes)", (28, 28), 128, 10),
    "gru": Network("2-layer GRU", "gru(128,layers=2)-last-dense(classes)", (28, 28), 128, 10),
    # issue 19: d_model 128, 4 heads, dim_feedforward 512 (4·d_model; torch's default is 2048),
    # sequences of 64, batch 32, dropout 0.1 (both libraries' default: on the attention weights,
    # after the attention, inside and after the feed-forward); the head reads the last position.
    "transformer": Network("2-layer TransformerEncoder",
                           "transformer(4,ff=512,layers=2,dropout=0.1)-last-dense(classes)",
                           (64, 128), 32, 10),
}
QUICK_NETWORKS = {
    "lenet5": Network("LeNet-5", "lenet5", (1, 12, 12), 8, 10),
    "vgg": Network("VGG-style BatchNorm net", vgg_spec(4, 8), (3, 8, 8), 4, 10),
    "resnet": Network("resnet preset", "resnet", (3, 8, 8), 4, 10),
    "lstm": Network("LSTM", "lstm(8)-last-dense(classes)", (5, 4), 8, 3),
    "gru": Network("2-layer GRU", "gru(8,layers=2)-last-dense(classes)", (5, 4), 8, 3),
    "transformer": Network("2-layer TransformerEncoder",
                           "transformer(2,ff=16,layers=2,dropout=0.1)-last-dense(classes)", (5, 8), 4,
                           3),
}


def network_plan(net):
    """The shape-checked plan (gpubackprop.modelspec) of a benchmarked network."""
    from gpubackprop.modelspec import plan

    return plan(net.spec, net.input_shape, net.classes)


def _batch(input_shape, classes, batch, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    return X, rng.integers(0, classes, batch)


def network_contender(p, batch, device="cpu", kernels="fused", dtype="float32"):
    """A training step of gpubackprop on the plan's model, batch already on the device; the model
    is the contender's ``.model``."""
    from gpubackprop.layers import Sequential
    from gpubackprop.losses import SoftmaxCrossEntropy
    from gpubackprop.optimizers import SGD
    from gpubackprop.training import step_on_device

    model = Sequential(p.layers(), device=device, dtype=dtype, seed=0, kernels=kernels,
                       input_shape=p.input_shape)
    loss, opt = SoftmaxCrossEntropy(), SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _batch(p.input_shape, p.output_shape[0], batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(step_on_device, model, loss, opt, Xd, Td)
    c = Contender(f"gpubackprop {kernels}", step, be.synchronize, batch, "gpubackprop", be.device,
                  kernels)
    c.model = model
    return c


def torch_network_contender(p, batch, device="cpu", model=None):
    """The same network, loss and optimizer in PyTorch (``torch_twin``), with ``model``'s weights
    when given (else torch's initialisation), on the same batch."""
    torch = contenders.torch_module()
    torch.manual_seed(0)
    net = torch_twin(p)
    if model is not None:
        load_weights(net, model)
    X, y = _batch(p.input_shape, p.output_shape[0], batch)
    c = torch_step_contender(torch, [net], net, X, y, batch, device)
    c.net = net
    return c


def network_section(timer, devices, net, with_torch=True, peak_n=PEAK_GEMM, split_steps=20,
                    split_s=1.0, peaks=None, kernel_sets=("reference", "fused"), log=print):
    """Training steps of one network: samples/s of gpubackprop (each kernel set) and PyTorch, the
    ratio, the fraction of the GEMM limit (each contender against the GEMMs its own step runs,
    alone: the fused set's "GEMMs only", the reference set's "GEMMs only (reference)" where they
    differ, PyTorch's the nominal GEMMs by torch.matmul) and of the peak sgemm rate (the nominal
    FLOPs: the direct convolution's, as PyTorch's), and the per-op time split of gpubackprop's step
    (``split_steps`` steps at most, about ``split_s`` seconds). ``peaks``: {device: GFLOP/s}
    already measured (filled in)."""
    p = network_plan(net)
    batch = net.batch
    torch = contenders.torch_module() if with_torch else None
    gemms = plan_step_gemms(p, batch)
    flops = plan_step_flops(p, batch)
    peaks = {} if peaks is None else peaks
    out = {"title": net.title, "model": net.spec, "spec": p.spec, "summary": p.summary(),
           "input_shape": list(net.input_shape), "batch": batch, "classes": net.classes,
           "step_flops": flops, "gemms": [list(g) for g in gemms], "gemms_run": {},
           "gemm_flops_run": {}, "rows": [], "split": [], "peak": []}
    for dev in devices:
        if dev not in peaks:
            peaks[dev] = peak_gemm_gflops(timer, dev, peak_n)
        peak = peaks[dev]
        out["peak"].append({"device": dev, "n": peak_n, "gflops": peak})
        ours = [network_contender(p, batch, dev, k) for k in kernel_sets]
        # Each kernel set's GEMMs as its step runs them (Winograd, direct convolutions, the row
        # chunks): "GEMMs only" the last set's (fused), a "GEMMs only (<set>)" for another set's
        # where they differ.
        schedules = {c.name: plan_step_schedule(p, batch, c.model) for c in ours}
        limits, own = {}, {}
        for c in reversed(ours):
            sched = schedules[c.name]
            same = next((name for name, s in limits.items() if s == sched), None)
            if same is None:
                same = "GEMMs only" if not limits else f"GEMMs only ({c.kernels})"
                limits[same] = sched
            own[c.name] = same
            out["gemms_run"][c.kernels] = [list(g) for g in plan_step_gemms(p, batch, c.model)]
            out["gemm_flops_run"][c.kernels] = plan_step_flops(p, batch, c.model)
        gemm_cs = []
        for name, sched in limits.items():
            gc = gemm_limit_contender(sched, batch, dev)
            gc.name = name
            gemm_cs.append(gc)
        cs = ours + gemm_cs
        if torch is not None:
            cs += [torch_network_contender(p, batch, dev, ours[0].model),
                   gemm_limit_contender(gemms, batch, dev, "pytorch")]
        times = timer.run(cs)
        torch_t = times.get("pytorch")
        for c in cs:
            t = times[c.name]
            own_gemm = times.get("GEMMs only (torch)") if c.library == "pytorch" else \
                times.get(own.get(c.name))
            out["rows"].append({
                "device": dev, "contender": c.name, "library": c.library, "kernels": c.kernels,
                "note": c.note, "samples_per_s": batch / median(t), "step_ms": 1e3 * median(t),
                "gflops": flops / median(t) / 1e9, "rounds_s": t,
                "ratio_to_pytorch": ratio_median(t, torch_t) if torch_t else None,
                "gemm_limit": own.get(c.name, "GEMMs only (torch)" if c.library == "pytorch"
                                      else None),
                "gemm_fraction": ratio_median(t, own_gemm) if own_gemm else None,
                "peak_fraction": flops / (peak * 1e9) / median(t)})
        if torch is None:
            out["rows"].append({"device": dev, "contender": "pytorch", "library": "pytorch",
                                "kernels": None, "note": "not installed", "samples_per_s": None})
        log(f"  {dev} {net.title}: " + ", ".join(
            f"{r['contender']} {r['samples_per_s']:.0f}/s" for r in out["rows"]
            if r["device"] == dev and r["samples_per_s"] is not None)
            + f"; peak sgemm {peak:.0f} GFLOP/s")
        for c in ours:
            step_s = median(times[c.name])
            split = step_time_split(c, max(2, min(split_steps, int(split_s / step_s))))
            total = sum(split.values())
            out["split"].append({"device": dev, "contender": c.name, "step_ms": 1e3 * step_s,
                                 "instrumented_ms": 1e3 * total,
                                 "ms": {k: 1e3 * v for k, v in split.items()},
                                 "fraction": {k: v / total for k, v in split.items()}})
            log(f"  {dev} {c.name} split (ms/step): " + ", ".join(
                f"{k} {1e3 * v:.2f}" for k, v in split.items()))
    return out
