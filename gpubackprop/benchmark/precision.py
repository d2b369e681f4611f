"""Mixed-precision benchmark rows (issue 17): training steps in fp32, bf16 and fp16 of the MLPs,
LeNet-5 and the LSTM, ours and PyTorch's (fp32, ``torch.autocast`` bf16, autocast fp16 with
``GradScaler``), timed interleaved on one device; with the issue's targets for the L MLP
(784-1024-1024-10, batch 256): bf16 >= 1.8x our fp32 step and >= 1.2x PyTorch autocast bf16.

    python -m gpubackprop.benchmark.precision --device cuda --out bench/results/precision.json

``make gpu-check`` runs it (bench/gpu_check.py, check "precision"). On the CPU the 16-bit modes
are an emulation of the GPU's numerics (slower than fp32); the rows there only show that the
contenders run (``--quick`` for tests).
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM
from gpubackprop.benchmark.mlp import QUICK_SHAPES, SHAPES, mlp_layers
from gpubackprop.benchmark.networks import NETWORKS, QUICK_NETWORKS, network_plan
from gpubackprop.benchmark.timing import Contender, Timer, median, ratio_median
from gpubackprop.precision import PRECISIONS

TARGETS = {"L": {"bf16 / our fp32": 1.8, "bf16 / torch autocast bf16": 1.2}}


def _batch(input_shape, classes, batch, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    return X, rng.integers(0, classes, batch)


def workloads(quick=False):
    """[(name, layers factory, per-sample input shape, classes, batch, torch module factory)]."""
    out = []
    for name, (sizes, batch) in (QUICK_SHAPES if quick else SHAPES).items():
        if name == "T":
            continue
        out.append((f"MLP {name} {'-'.join(map(str, sizes))}", functools.partial(mlp_layers, sizes),
                    (sizes[0],), sizes[-1], batch, functools.partial(_torch_mlp, sizes)))
    nets = QUICK_NETWORKS if quick else NETWORKS
    for key in ("lenet5", "lstm"):
        net = nets[key]
        p = network_plan(net)
        out.append((net.title, p.layers, tuple(p.input_shape), p.output_shape[0], net.batch,
                    functools.partial(_torch_twin, p)))
    return out


def _torch_mlp(sizes):
    torch = contenders.torch_module()
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def _torch_twin(p):
    from gpubackprop.benchmark.twins import torch_twin

    return torch_twin(p)


def ours(layers, input_shape, classes, batch, device, precision):
    """Our training step (SGD with momentum on softmax-CE) at ``precision``, batch on the device."""
    from gpubackprop.layers import Sequential
    from gpubackprop.losses import SoftmaxCrossEntropy
    from gpubackprop.optimizers import SGD
    from gpubackprop.training import step_on_device

    model = Sequential(layers(), device=device, seed=0, precision=precision,
                       input_shape=input_shape)
    be = model.backend
    X, y = _batch(input_shape, classes, batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(step_on_device, model, SoftmaxCrossEntropy(),
                             SGD(lr=LR, momentum=MOMENTUM), Xd, Td)
    return Contender(f"gpubackprop {precision}", step, be.synchronize, batch, "gpubackprop",
                     be.device)


def torch_amp(make_net, input_shape, classes, batch, device, precision):
    """PyTorch's step: fp32, or autocast bf16, or autocast fp16 with GradScaler (torch's AMP
    recipe), the same SGD with momentum."""
    torch = contenders.torch_module()
    torch.manual_seed(0)
    dev = "cuda" if device == "cuda" else "cpu"
    net = make_net().to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    lossf = torch.nn.CrossEntropyLoss()
    X, y = _batch(input_shape, classes, batch)
    Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev) if precision == "fp16" else None

    def step():
        opt.zero_grad()
        if dtype is None:
            lossf(net(Xt), yt).backward()
            opt.step()
            return
        with torch.autocast(dev, dtype=dtype):
            value = lossf(net(Xt), yt)
        if scaler is None:
            value.backward()
            opt.step()
        else:
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()

    sync = torch.cuda.synchronize if dev == "cuda" else None
    name = "pytorch fp32" if dtype is None else f"pytorch autocast {precision}"
    return Contender(name, step, sync, batch, "pytorch", device)


def precision_section(timer, device="cuda", quick=False, with_torch=True, log=print):
    """Rows {"workload", "contender", "samples_per_s", "x_our_fp32" (its speed over our fp32 step),
    "x_torch_same" (ours over PyTorch's at the same precision)} per workload and contender, and
    the targets checked where they apply."""
    rows, checks = [], []
    torch_ok = with_torch and contenders.torch_module() is not None
    for name, layers, shape, classes, batch, make_net in workloads(quick):
        cs = [ours(layers, shape, classes, batch, device, p) for p in PRECISIONS]
        if torch_ok:
            for p in PRECISIONS:
                c = torch_amp(make_net, shape, classes, batch, device, p)
                try:  # e.g. oneDNN has no fp16 LSTM on the CPU: that row is left out, said so
                    c.step()
                except RuntimeError as e:
                    log(f"{name}: {c.name} does not run here ({str(e).splitlines()[0][:100]})")
                    continue
                cs.append(c)
        times = timer.run(cs)
        fp32 = times["gpubackprop fp32"]
        for c in cs:
            t = times[c.name]
            p = c.name.split()[-1]
            same = times.get("pytorch fp32" if p == "fp32" else f"pytorch autocast {p}")
            row = {"workload": name, "contender": c.name, "batch": batch,
                   "samples_per_s": round(batch / median(t), 1),
                   "x_our_fp32": round(ratio_median(t, fp32), 3)}
            if c.library == "gpubackprop" and same is not None:
                row["x_torch_same"] = round(ratio_median(t, same), 3)
            rows.append(row)
            log(f"{name:<28} {c.name:<26} {row['samples_per_s']:>12,.0f} samples/s  "
                f"x our fp32 {row['x_our_fp32']:.2f}"
                + (f"  x torch {row['x_torch_same']:.2f}" if "x_torch_same" in row else ""))
        key = name.split()[1] if name.startswith("MLP") else None
        for what, want in TARGETS.get(key, {}).items():
            got = ratio_median(times["gpubackprop bf16"], fp32) if what.endswith("our fp32") else (
                ratio_median(times["gpubackprop bf16"], times["pytorch autocast bf16"])
                if "pytorch autocast bf16" in times else None)
            checks.append({"workload": name, "target": f"{what} >= {want}",
                           "value": None if got is None else round(got, 3),
                           "met": None if got is None else bool(got >= want)})
    return rows, checks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (tests)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None, help="JSON file for the rows and target checks")
    a = ap.parse_args(argv)
    timer = Timer(rounds=3, block_s=0.02, warmup_s=0.05, quiesce_s=0) if a.quick else \
        Timer(rounds=9, block_s=0.2, warmup_s=0.5, quiesce_s=0.15 if a.device == "cpu" else 0)
    contenders.configure_torch(os.cpu_count() or 1)
    t0 = time.perf_counter()
    rows, checks = precision_section(timer, a.device, a.quick, not a.no_torch)
    result = {"device": a.device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "targets": checks}
    if a.device == "cpu":
        result["note"] = "CPU: the 16-bit modes emulate the GPU's numerics; not a speed feature"
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({"targets": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
