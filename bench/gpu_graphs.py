"""``make gpu-check``'s "graphs" check (issue 16): the training step as a CUDA graph, on a GPU.

1. replay == eager, bit for bit: fit with graphs (``cuda_graph="on"``: two eager warm-up steps per
   batch shape, then replays) against the same run without capture (``GraphSettings(warmup=huge)``:
   the same kernels, StepValues and cuBLAS-by-nvmath GEMMs, every step eager), for an MLP, a CNN
   with BatchNorm and Dropout, and an LSTM, 3 epochs with a ragged last batch, AdamW with clipping
   and a cosine schedule; and a run checkpointed mid-epoch and resumed with graphs, against the
   uninterrupted one. Also reported (not required equal): the largest difference from
   ``cuda_graph="off"`` (CuPy's matmul and the host-scalar kernels).
2. host time per step with and without graphs: each step queued behind a spinning kernel, so the
   host time is the time to queue it (Python, launches), not the GPU's.
3. samples/s with graphs on and off, and PyTorch CUDA eager and a captured PyTorch step
   (``torch.cuda.graph``, whole-network capture as in PyTorch's CUDA-graph docs), interleaved,
   medians; TF32 off in both.

Everything here runs on a GPU only; ``format_graphs`` (the markdown of the results) runs anywhere.
"""

import time

import numpy as np

EPOCHS, N, BATCH = 3, 1000, 128  # 8 batches an epoch, the last of 104 rows
SPIN_SECONDS = 0.05
HOST_STEPS = 20
ROUNDS, STEPS_PER_ROUND = 7, 30


# ---- the models --------------------------------------------------------------------------------
def _models():
    import gpubackprop as gb

    def mlp(precision="fp32"):
        return gb.Sequential([gb.Dense(784, 256, activation="relu"), gb.Dropout(0.2),
                              gb.Dense(256, 256, activation="relu"), gb.Dense(256, 10)],
                             device="cuda", seed=0, precision=precision)

    def cnn():
        return gb.Sequential([gb.Conv2d(1, 16, 3, padding=1), gb.BatchNorm2d(16),
                              gb.Activation("relu"), gb.MaxPool2d(2), gb.Flatten(),
                              gb.Dropout(0.3), gb.Dense(16 * 14 * 14, 10)],
                             device="cuda", seed=0, input_shape=(1, 28, 28))

    def lstm():
        return gb.Sequential([gb.LSTM(28, 128), gb.LastStep(), gb.Dense(128, 10)], device="cuda",
                             seed=0, input_shape=(28, 28))

    # bf16/fp16 (issue 17): 16-bit Dense arrays, GemmEx, the weight copy; fp16's loss scaler
    return {"mlp": (mlp, (784,)), "cnn": (cnn, (1, 28, 28)), "lstm": (lstm, (28, 28)),
            "mlp bf16": (lambda: mlp("bf16"), (784,)), "mlp fp16": (lambda: mlp("fp16"), (784,))}


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, *shape)).astype(np.float32), rng.integers(0, 10, N)


def _fit(make, shape, cuda_graph, **kw):
    import gpubackprop as gb
    from gpubackprop.schedules import make_schedule

    X, y = _data(shape)
    model, loss = make(), gb.SoftmaxCrossEntropy()
    opt = gb.AdamW(1e-3, weight_decay=0.01, clip_norm=1.0)
    sched = make_schedule("cosine", 1e-3, steps_per_epoch=-(-N // BATCH), epochs=EPOCHS,
                          warmup_steps=3)
    hist = gb.fit(model, loss, opt, X, y, epochs=EPOCHS, batch_size=BATCH, progress=False,
                  schedule=sched, cuda_graph=cuda_graph, **kw)
    return model, opt, loss, hist


def _params(model):
    return np.concatenate([v.ravel() for v in model.get_params().values()])


def _resumed(make, shape, tmp):
    """A graph run interrupted mid-epoch 2 after a checkpoint, resumed with graphs."""
    import gpubackprop as gb
    from gpubackprop.checkpoint import Checkpointer, load_checkpoint

    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 12:
            raise Interrupt

    path = f"{tmp}/graphs-resume.npz"
    model = make()
    opt = gb.AdamW(1e-3, weight_decay=0.01, clip_norm=1.0)
    loss = gb.SoftmaxCrossEntropy()
    try:
        _fit_with(model, opt, loss, shape, on_checkpoint=Checkpointer(path, model, opt, loss),
                  checkpoint_every=5, on_step=stop)
    except Interrupt:
        pass
    model, opt = make(), gb.AdamW(1e-3, weight_decay=0.01, clip_norm=1.0)
    state = load_checkpoint(path).restore(model, opt, loss)
    hist = _fit_with(model, opt, loss, shape, state=state)
    return model, hist, state.batch


def _fit_with(model, opt, loss, shape, **kw):
    import gpubackprop as gb
    from gpubackprop.schedules import make_schedule

    X, y = _data(shape)
    sched = make_schedule("cosine", 1e-3, steps_per_epoch=-(-N // BATCH), epochs=EPOCHS,
                          warmup_steps=3)
    return gb.fit(model, loss, opt, X, y, epochs=EPOCHS, batch_size=BATCH, progress=False,
                  schedule=sched, cuda_graph="on", **kw)


def replay_equals_eager():
    """Per model: bitwise equality of replay and eager (and of a resumed run), or the error."""
    import tempfile

    from gpubackprop.cuda_graph import GraphSettings

    out = {}
    for name, (make, shape) in _models().items():
        try:
            graph_model, _, _, graph_hist = _fit(make, shape, "on")
            eager_model, _, _, eager_hist = _fit(make, shape, GraphSettings(warmup=10**9))
            off_model, _, _, _ = _fit(make, shape, "off")
            with tempfile.TemporaryDirectory() as tmp:
                resumed_model, resumed_hist, at_batch = _resumed(make, shape, tmp)
            g, e, o, r = (_params(m) for m in (graph_model, eager_model, off_model,
                                               resumed_model))
            out[name] = {
                "replay_equals_eager": bool(np.array_equal(g, e)) and graph_hist == eager_hist,
                "resumed_equals_uninterrupted": bool(np.array_equal(r, g))
                and resumed_hist == graph_hist,
                "resumed_at_batch": int(at_batch),
                "max_abs_diff_vs_cuda_graph_off": float(np.max(np.abs(g - o))),
                "equal_to_cuda_graph_off": bool(np.array_equal(g, o)),
            }
        except Exception as e:  # a model that cannot be captured yet: reported, the check fails
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    ok = all(v.get("replay_equals_eager") and v.get("resumed_equals_uninterrupted")
             for v in out.values())
    return ok, out


# ---- host time per step ---------------------------------------------------------------------------
def host_time_per_step():
    """Median host seconds to queue one step, eager and replayed, each behind its own spin."""
    import cupy as cp

    import gpubackprop as gb
    from bench.gpu_check import spin_kernel
    from gpubackprop.cuda_graph import GraphSettings, StepGraphs, resolve
    from gpubackprop.training import step_on_device, take

    spin = spin_kernel()
    hz = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["clockRate"] * 1e3
    out = {}
    for name, (make, shape) in _models().items():
        row = {}
        for mode in ("eager", "graphs"):
            model, loss = make(), gb.SoftmaxCrossEntropy()
            opt = gb.AdamW(1e-3, weight_decay=0.01, clip_norm=1.0)
            be = model.backend
            X, y = _data(shape)
            Xd, Td = be.to_device(X[:BATCH]), be.to_device(y[:BATCH], np.int64)
            idx = be.xp.arange(BATCH)
            graphs = None
            try:
                if mode == "graphs":
                    resolve("on", model)
                    graphs = StepGraphs(model, loss, opt, GraphSettings(), HOST_STEPS + 10)
                    graphs.begin_epoch(None, 0, HOST_STEPS + 10, 0, 0, 0)

                    def step(graphs=graphs, Xd=Xd, Td=Td, idx=idx):
                        graphs.step(Xd, Td, idx)
                else:
                    def step(model=model, loss=loss, opt=opt, Xd=Xd, Td=Td, idx=idx):
                        step_on_device(model, loss, opt, take(Xd, idx), take(Td, idx))
                for _ in range(4):  # warm-up (and capture)
                    step()
                host = []
                for _ in range(HOST_STEPS):
                    be.synchronize()
                    spin((1,), (1,), (np.int64(SPIN_SECONDS * hz),),
                         stream=cp.cuda.get_current_stream())
                    t0 = time.perf_counter()
                    step()
                    host.append(time.perf_counter() - t0)
                be.synchronize()
                row[mode] = float(np.median(host))
            except Exception as e:
                row[mode] = f"{type(e).__name__}: {e}"
            finally:
                if graphs is not None:
                    graphs.close()
        out[name] = row
    return out


# ---- throughput: gpubackprop eager / graphs, PyTorch eager / CUDA graph ---------------------------
def _gb_contender(model, Xh, yh, graphs):
    """A step function of gpubackprop on one fixed batch, eager or as a replayed graph."""
    import gpubackprop as gb
    from gpubackprop.benchmark.contenders import LR, MOMENTUM
    from gpubackprop.cuda_graph import GraphSettings, StepGraphs, resolve
    from gpubackprop.training import step_on_device, take

    loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(lr=LR, momentum=MOMENTUM)
    be = model.backend
    Xd, Td = be.to_device(Xh), be.to_device(yh, np.int64)
    idx = be.xp.arange(Xh.shape[0])
    if not graphs:
        return (lambda: step_on_device(model, loss, opt, take(Xd, idx), take(Td, idx))), None
    rows = 100_000  # past its end the table's last row repeats (the learning rate is constant)
    resolve("on", model)  # a model that cannot be captured: its ValueError names why
    g = StepGraphs(model, loss, opt, GraphSettings(), rows)
    g.begin_epoch(None, 0, rows, 0, 0, 0)
    return (lambda: g.step(Xd, Td, idx)), g


def _torch_contenders(torch, net, Xh, yh):
    """PyTorch's eager step and its captured step (warm-up on a side stream, then
    torch.cuda.graph around zero_grad-free forward, backward and SGD step; replay)."""
    from gpubackprop.benchmark.contenders import LR, MOMENTUM

    net.to("cuda")
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    lossf = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(Xh).cuda(), torch.from_numpy(yh).cuda()

    def eager():
        opt.zero_grad(set_to_none=True)
        lossf(net(X), y).backward()
        opt.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        lossf(net(X), y).backward()
        opt.step()
    return eager, graph.replay


def throughput():
    """samples/s (median over interleaved rounds) of each network under each contender."""
    import cupy as cp

    from gpubackprop.benchmark import mlp as bmlp
    from gpubackprop.benchmark import networks as bnet
    from gpubackprop.benchmark.contenders import configure_torch, torch_module
    from gpubackprop.layers import Sequential

    torch = torch_module()
    if torch is not None:
        configure_torch(torch.get_num_threads())  # TF32 off, as CuPy's float32 GEMMs
    nets = {}
    for sizes, batch in bmlp.SHAPES.values():
        nets[f"MLP {'-'.join(map(str, sizes))}"] = (
            lambda sizes=sizes: Sequential(bmlp.mlp_layers(sizes), device="cuda", seed=0),
            bmlp._batch(sizes, batch), None, (sizes, batch))
    # The L MLP in bf16 (issue 17: bf16 >= 1.8x our fp32 step), eager and captured; its PyTorch
    # counterpart (autocast) is in the precision check, so no PyTorch contenders on this row.
    sizes, batch = bmlp.SHAPES["L"]
    nets[f"MLP {'-'.join(map(str, sizes))} bf16"] = (
        lambda: Sequential(bmlp.mlp_layers(sizes), device="cuda", seed=0, precision="bf16"),
        bmlp._batch(sizes, batch), None, None)
    for key in ("lenet5", "lstm"):
        p = bnet.network_plan(bnet.NETWORKS[key])
        batch = bnet.NETWORKS[key].batch
        nets[bnet.NETWORKS[key].title] = (
            lambda p=p: Sequential(p.layers(), device="cuda", seed=0, input_shape=p.input_shape),
            bnet._batch(p.input_shape, p.output_shape[0], batch), p, None)
    out = {}
    for title, (make, (Xh, yh), plan, mlp_shape) in nets.items():
        steps, keep, row = {}, [], {}
        for mode in ("eager", "graphs"):
            try:
                steps[f"gpubackprop {mode}"], g = _gb_contender(make(), Xh, yh, mode == "graphs")
                keep.append(g)
            except Exception as e:
                row[f"gpubackprop {mode}"] = f"{type(e).__name__}: {e}"
        if torch is not None and (plan is not None or mlp_shape is not None):
            try:
                net = bnet.torch_twin(plan) if plan is not None else _torch_mlp(torch, *mlp_shape)
                steps["pytorch eager"], steps["pytorch cuda graph"] = _torch_contenders(
                    torch, net, Xh, yh)
            except Exception as e:
                row["pytorch"] = f"{type(e).__name__}: {e}"
        times = {k: [] for k in steps}
        for _ in range(ROUNDS):
            for k, step in steps.items():
                try:
                    for _ in range(3):
                        step()
                    cp.cuda.runtime.deviceSynchronize()
                    t0 = time.perf_counter()
                    for _ in range(STEPS_PER_ROUND):
                        step()
                    cp.cuda.runtime.deviceSynchronize()
                    times[k].append((time.perf_counter() - t0) / STEPS_PER_ROUND)
                except Exception as e:
                    row[k] = f"{type(e).__name__}: {e}"
        for k, ts in times.items():
            if k not in row and ts:
                row[k] = round(Xh.shape[0] / float(np.median(ts)), 1)
        for g in keep:
            if g is not None:
                g.close()
        out[title] = row
    return out


def _torch_mlp(torch, sizes, batch):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def run_graphs():
    """The "graphs" check of make gpu-check: ok when every replay equals its eager run."""
    t0 = time.perf_counter()
    ok, equal = replay_equals_eager()
    return {"ok": ok, "replay_vs_eager": equal, "host_seconds_per_step": host_time_per_step(),
            "samples_per_second": throughput(), "seconds": round(time.perf_counter() - t0, 1)}


# ---- the results as markdown (runs anywhere) -------------------------------------------------------
def format_graphs(result):
    """Markdown tables of a ``run_graphs`` result: replay == eager per model, host time per step,
    samples/s with each contender and the ratios to PyTorch CUDA eager."""
    lines = ["## CUDA graphs (issue 16)", "",
             "| model | replay == eager | resumed == uninterrupted | max diff vs cuda_graph=off |",
             "| --- | --- | --- | --- |"]
    for name, r in result.get("replay_vs_eager", {}).items():
        if "error" in r:
            lines.append(f"| {name} | not captured: {r['error']} | | |")
            continue
        lines.append(f"| {name} | {'yes' if r['replay_equals_eager'] else 'NO'} | "
                     f"{'yes' if r['resumed_equals_uninterrupted'] else 'NO'} (batch "
                     f"{r['resumed_at_batch']}) | {r['max_abs_diff_vs_cuda_graph_off']:.3g} |")
    lines += ["", "| model | host ms/step eager | host ms/step graphs |", "| --- | --- | --- |"]
    for name, r in result.get("host_seconds_per_step", {}).items():
        cells = [f"{v * 1e3:.3f}" if isinstance(v, float) else str(v)
                 for v in (r.get("eager"), r.get("graphs"))]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    cols = ["gpubackprop eager", "gpubackprop graphs", "pytorch eager", "pytorch cuda graph"]
    lines += ["", "| network | " + " | ".join(f"{c} (samples/s)" for c in cols)
              + " | graphs × pytorch eager | graphs × pytorch cuda graph |",
              "| --- |" + " --- |" * (len(cols) + 2)]
    for name, r in result.get("samples_per_second", {}).items():
        cells = [f"{r[c]:.0f}" if isinstance(r.get(c), (int, float)) else str(r.get(c, "-"))
                 for c in cols]
        ratios = []
        for base in ("pytorch eager", "pytorch cuda graph"):
            g, b = r.get("gpubackprop graphs"), r.get(base)
            ok = isinstance(g, (int, float)) and isinstance(b, (int, float)) and b > 0
            ratios.append(f"{g / b:.2f}×" if ok else "-")
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"
