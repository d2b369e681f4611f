"""The LSTM benchmark: step throughput of LSTM -> last step -> Dense against PyTorch."""

import functools

import numpy as np

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.contenders import LR, MOMENTUM, torch_step_contender
from gpubackprop.benchmark.timing import Contender, median, ratio_median

# LSTM: (time steps, features, hidden, batch, classes); LSTM -> last step -> Dense.
LSTM_SHAPE = (28, 28, 128, 128, 10)
QUICK_LSTM_SHAPE = (5, 4, 8, 8, 3)


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
    from gpubackprop.training import step_on_device

    T, F, H, batch, classes = shape
    model = Sequential([LSTM(F, H), LastStep(), Dense(H, classes)], device=device, dtype=dtype,
                       seed=0, kernels=kernels, input_shape=(T, F))
    loss, opt = SoftmaxCrossEntropy(), SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    X, y = _sequence_batch(T, F, classes, batch)
    Xd, Td = be.to_device(X), be.to_device(y, np.int64)
    step = functools.partial(step_on_device, model, loss, opt, Xd, Td)
    return Contender(f"gpubackprop {kernels}", step, be.synchronize, batch, "gpubackprop", be.device,
                     kernels)


def torch_lstm_contender(shape, device="cpu"):
    """The same model in PyTorch: nn.LSTM(batch_first) -> last step -> nn.Linear."""
    torch = contenders.torch_module()
    torch.manual_seed(0)
    T, F, H, batch, classes = shape
    lstm, head = torch.nn.LSTM(F, H, batch_first=True), torch.nn.Linear(H, classes)
    X, y = _sequence_batch(T, F, classes, batch)
    return torch_step_contender(torch, [lstm, head], lambda Xt: head(lstm(Xt)[0][:, -1]), X, y,
                                 batch, device)


def lstm_section(timer, devices, shape=LSTM_SHAPE, with_torch=True, log=print):
    """LSTM training steps: samples/s of gpubackprop (fused, reference) and PyTorch, and the ratio."""
    T, F, H, batch, classes = shape
    torch = contenders.torch_module() if with_torch else None
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

