"""The MLP benchmarks: training-step throughput against PyTorch and scikit-learn with the GEMM limit,
and scaling with batch size and width."""

import functools

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM, torch_step_contender
from gpubackprop.benchmark.timing import Contender, median, ratio_median, sync_for, xp_for

# name: (layer sizes, batch); relu hidden layers, identity output, softmax cross-entropy, SGD 0.9.
SHAPES = {
    "L": ((784, 1024, 1024, 10), 256),
    "S": ((784, 256, 256, 10), 128),
    "T": ((64, 64, 10), 32),
}
# --quick: the same structure on tiny sizes (for tests: seconds, not numbers).
QUICK_SHAPES = {"L": ((24, 32, 32, 4), 16), "S": ((16, 8, 8, 3), 8), "T": ((8, 8, 2), 4)}
SCALING_BATCHES = (1, 4, 16, 64, 256, 1024)
SCALING_WIDTHS = (64, 256, 1024, 4096)
SCALING_BASE = "S"  # batch sweep on S's sizes; width sweep: 784-w-w-10 at S's batch


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
    from gpubackprop.training import step_on_device

    model = Sequential(mlp_layers(sizes), device=device, dtype=dtype, seed=0, kernels=kernels)
    loss = SoftmaxCrossEntropy()
    opt = SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _batch(sizes, batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(step_on_device, model, loss, opt, Xd, Td)
    return Contender(f"gpubackprop {kernels}", step, be.synchronize, batch, "gpubackprop",
                     be.device, kernels)


def torch_contender(sizes, batch, device="cpu"):
    """The same MLP, loss and optimizer in PyTorch (nn.Linear, CrossEntropyLoss, optim.SGD)."""
    torch = contenders.torch_module()
    torch.manual_seed(0)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*mods)
    return torch_step_contender(torch, [net], net, *_batch(sizes, batch), batch, device)


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
        torch = contenders.torch_module()
        dev = "cuda" if device == "cuda" else "cpu"
        mm = torch.mm

        def empty(*shape):
            return torch.randn(*shape, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else None
    else:
        xp = xp_for(device)
        mm = xp.matmul
        rng = np.random.default_rng(0)

        def empty(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(np.float32))
        sync = sync_for(device)
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


def throughput_section(timer, devices, shapes, with_torch=True, with_sklearn=True, log=print):
    """Samples/s of a training step for each shape and contender, ratios to PyTorch, GEMM limit."""
    rows = []
    torch = contenders.torch_module() if with_torch else None
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


def scaling_section(timer, devices, batches=SCALING_BATCHES, widths=SCALING_WIDTHS,
                    with_torch=True, base=SHAPES[SCALING_BASE], log=print):
    """Samples/s against batch size (S's sizes) and against width (784-w-w-10 at S's batch)."""
    sizes, base_batch = base
    torch = contenders.torch_module() if with_torch else None
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

