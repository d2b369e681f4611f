"""gpubackprop.cuda_graph without a GPU: fit's cuda_graph argument, and the graph run's bookkeeping
(static buffers, StepValues, device totals, warm-up, one graph per batch shape, the ragged last
batch, counters, checkpoints and resume) through a host capture backend whose "graph" is the
step's Python, replayed with its kernel-set calls checked against the captured ones."""

import numpy as np
import pytest
from graph_capture import HostCapture, ReplayMismatch

import gpubackprop as gb
from gpubackprop import cuda_graph as cg
from gpubackprop.checkpoint import Checkpointer, load_checkpoint
from gpubackprop.schedules import make_schedule


def data(n=70, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, k, n)


def mlp(kernels="fused", dtype="float32", device="cpu"):
    return gb.Sequential([gb.Dense(6, 24, activation="relu"), gb.BatchNorm1d(24),
                          gb.Dropout(0.25), gb.Dense(24, 3)], device=device, dtype=dtype, seed=5,
                         kernels=kernels)


OPTS = {"adamw-clip": lambda: gb.AdamW(0.01, weight_decay=0.05, clip_norm=1.0),
        "nesterov": lambda: gb.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "rmsprop": lambda: gb.RMSprop(0.01, momentum=0.5)}
KW = dict(epochs=3, batch_size=16, progress=False)  # 5 batches an epoch, the last of 6 rows


def run(cuda_graph, opt="adamw-clip", make=mlp, X=None, y=None, warmup=1, **kw):
    X, y = data() if X is None else (X, y)
    model, loss, o = make(), gb.SoftmaxCrossEntropy(), OPTS[opt]()
    sched = make_schedule("cosine", 0.02, steps_per_epoch=5, epochs=3, warmup_steps=2)
    fake = None
    if cuda_graph == "host":
        fake = HostCapture(model, o)
        cuda_graph = cg.GraphSettings(warmup=warmup, capture=fake)
    hist = gb.fit(model, loss, o, X, y, schedule=sched, cuda_graph=cuda_graph, **{**KW, **kw})
    return model, o, hist, fake


def assert_same_run(a, b):
    (ma, oa, ha, _), (mb, ob, hb, _) = a, b
    assert ha == hb
    for k, v in ma.get_params().items():
        np.testing.assert_array_equal(mb.get_params()[k], v, k)
    for k, v in ma.get_state().items():
        np.testing.assert_array_equal(mb.get_state()[k], v, k)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["steps"] == sb["steps"]
    for k, v in sa["buffers"].items():
        np.testing.assert_array_equal(sb["buffers"][k], v, k)


# ---- the argument -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["yes", None, True, "ON"])
def test_bad_cuda_graph_is_an_error_before_training(bad):
    model, loss, opt = mlp(), gb.SoftmaxCrossEntropy(), gb.SGD(0.1)
    X, y = data()
    before = model.get_params()
    with pytest.raises(ValueError, match=r"cuda_graph: expected one of \('auto', 'on', 'off'\) "
                                         r"or a GraphSettings, got"):
        gb.fit(model, loss, opt, X, y, epochs=1, progress=False, cuda_graph=bad)
    for k, v in before.items():
        np.testing.assert_array_equal(model.get_params()[k], v)


def test_auto_and_off_train_the_same_on_the_cpu():
    assert cg.resolve("auto", mlp()) is None  # the CPU runs the step eagerly
    assert_same_run(run("off"), run("auto"))


def test_on_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cuda_graph: 'on' cannot capture this training step: "
                                         r"no CUDA GPU .*the model runs on 'cpu'.*use "
                                         r"cuda_graph='auto' or 'off'"):
        run("on")


def test_graph_settings_checks():
    with pytest.raises(ValueError, match=r"warmup: expected"):
        cg.GraphSettings(warmup=0)
    with pytest.raises(TypeError, match=r"capture: expected a capture backend with a begin_run"):
        cg.GraphSettings(capture=object())
    assert "warmup=2" in repr(cg.GraphSettings())


def test_why_graphs_are_unavailable_here():
    assert "no CUDA GPU" in cg.graphs_unavailable()
    assert cg.graphs_info().startswith("not available: no CUDA GPU")


def test_what_keeps_a_model_out_of_a_graph():
    from gpubackprop.distributed import communicator

    assert cg.model_problems(mlp(), device=False) == []
    assert "kernels='reference'" in cg.model_problems(mlp("reference"), device=False)[0]
    lstm = gb.Sequential([gb.LSTM(4, 5, num_layers=2, dropout=0.2), gb.LastStep(),
                          gb.Dense(5, 2)], input_shape=(3, 4), device="cpu")
    assert any("dropout between layers" in p for p in cg.model_problems(lstm, device=False))
    emb = gb.Sequential([gb.Embedding(10, 4), gb.Flatten(), gb.Dense(12, 2)], input_shape=(3,),
                        device="cpu")
    assert any("(Embedding) is not capturable" in p for p in cg.model_problems(emb, device=False))
    comm = communicator("single")
    assert cg.model_problems(mlp(), comm, device=False) == []


def test_cache_key():
    X, T = np.zeros((4, 6), np.float32), np.zeros(4, np.int64)
    k = cg.StepGraphs.key(X, T)
    assert k == cg.StepGraphs.key(X.copy(), T.copy())
    assert k != cg.StepGraphs.key(X[:3], T[:3])  # a ragged batch: another graph
    assert k != cg.StepGraphs.key(X.astype(np.float64), T)
    assert k != cg.StepGraphs.key(X, T, train=False)
    assert k != cg.StepGraphs.key([X, X], T)


# ---- the run, through the host capture backend -------------------------------------------------
@pytest.mark.parametrize("opt", list(OPTS))
def test_graph_run_equals_the_eager_run(opt):
    eager = run("off", opt)
    graphs = run("host", opt)
    assert_same_run(eager, graphs)
    events = graphs[3].events
    assert events[0] == "begin" and events[-1] == "end"
    # warm-up 1: the full batch shape is eager at step 1, captured at step 2 then replayed; the
    # ragged last batch (6 rows) eager in epoch 1, captured in epoch 2, replayed in epoch 3.
    captures = [e for e in events if isinstance(e, tuple)]
    assert len(captures) == 2
    assert events.count("replay") == 15 - 2


@pytest.mark.parametrize("warmup", [1, 3])
def test_warmup_steps_before_each_capture(warmup):
    _, _, _, fake = run("host", warmup=warmup)
    events = [e if isinstance(e, str) else "capture" for e in fake.events]
    steps = 15
    n_captures = events.count("capture")
    # The full shape (4 a epoch) is captured after `warmup` eager steps; the ragged one (1 an
    # epoch) after `warmup` epochs, so not at all with 3 epochs and warmup 3.
    assert n_captures == (2 if warmup < 3 else 1)
    assert events.count("replay") == steps - warmup - min(warmup, 3)


def test_graph_run_float64_mse_without_schedule_effects():
    X = np.random.default_rng(1).normal(size=(40, 6))
    Y = np.random.default_rng(2).normal(size=(40, 3))

    def make():
        return gb.Sequential([gb.Dense(6, 10, activation="tanh"), gb.Dropout(0.5),
                              gb.Dense(10, 3)], device="cpu", dtype="float64", seed=2)

    def go(cuda_graph):
        model, o = make(), OPTS["nesterov"]()
        fake = HostCapture(model, o) if cuda_graph == "host" else None
        mode = cg.GraphSettings(warmup=2, capture=fake) if fake else cuda_graph
        hist = gb.fit(model, gb.MSE(), o, X, Y, epochs=2, batch_size=12, progress=False,
                      cuda_graph=mode)
        return model, o, hist, fake
    assert_same_run(go("off"), go("host"))


def test_graph_run_of_a_cnn_with_batchnorm_and_dropout():
    X = np.random.default_rng(3).normal(size=(36, 1, 8, 8))
    y = np.random.default_rng(4).integers(0, 3, 36)

    def cnn():
        conv = gb.Conv2d(1, 4, 3, padding=1)
        conv.winograd = False  # the im2col GEMMs (Winograd's halves run on a worker thread)
        return gb.Sequential([conv, gb.BatchNorm2d(4), gb.Activation("relu"), gb.MaxPool2d(2),
                              gb.Flatten(), gb.Dropout(0.3), gb.Dense(64, 3)],
                             input_shape=(1, 8, 8), device="cpu", seed=2)
    graphs = run("host", "adamw-clip", cnn, X, y)
    assert_same_run(run("off", "adamw-clip", cnn, X, y), graphs)
    assert graphs[3].events.count("replay") == 9 - 2  # 3 batches an epoch (the last of 4 rows)


def test_graph_run_of_an_lstm():
    X = np.random.default_rng(1).normal(size=(40, 3, 4))
    y = np.random.default_rng(2).integers(0, 2, 40)

    def lstm():
        return gb.Sequential([gb.LSTM(4, 6), gb.LastStep(), gb.Dense(6, 2)], input_shape=(3, 4),
                             device="cpu", dtype="float64", seed=1)
    graphs = run("host", "nesterov", lstm, X, y)
    assert_same_run(run("off", "nesterov", lstm, X, y), graphs)
    assert graphs[3].events.count("replay") == 9 - 2  # 3 batches an epoch (the last of 8 rows)


def mlp16(precision, device="cpu"):
    """A bf16/fp16 MLP: two adjacent Dense layers (16-bit activations between them on the CUDA
    set), then Dropout (a float32 boundary); fp16 with a scale that overflows at first (skipped
    steps, back-offs) and grows every 3 finite steps, inside the graph run."""
    scaler = {"init_scale": 2.0**24, "growth_interval": 3} if precision == "fp16" else None
    return gb.Sequential([gb.Dense(6, 24, activation="relu"), gb.Dense(24, 16, activation="gelu"),
                          gb.Dropout(0.25), gb.Dense(16, 3)], device=device, seed=5,
                         precision=precision, loss_scaler=scaler)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graph_run_of_a_16_bit_mlp_equals_the_eager_run(precision):
    assert cg.model_problems(mlp16(precision), device=False) == []  # the scaler on the device
    runs = {}
    for mode in ("off", "host"):
        made, scales = [], []

        def make(made=made):
            made.append(mlp16(precision))
            return made[-1]

        def on_step(step, made=made, scales=scales):  # the scale after every step (a host read)
            if made[-1].loss_scaler is not None:
                scales.append(made[-1].loss_scaler.scale)
        runs[mode] = run(mode, "adamw-clip", make, on_step=on_step), scales
    (eager, eager_scales), (graphs, scales) = runs["off"], runs["host"]
    assert_same_run(eager, graphs)  # get_state: the fp16 scaler's scale and growth tracker too
    assert graphs[3].events.count("replay") == 15 - 2
    assert scales == eager_scales and len(scales) == (15 if precision == "fp16" else 0)
    if precision == "fp16":
        moves = np.diff(np.log2([2.0**24] + scales))
        assert (moves == -1).any() and (moves == 1).any()  # skipped steps and growth, replayed


def test_a_per_step_host_scalar_in_the_step_is_caught(monkeypatch):
    """A layer that hands the step counter to a kernel as an argument: frozen in a real graph.
    Not on the capturable list, it is refused up front; listed anyway, the replay check fails
    (the test of the check itself)."""
    class HostStepDropout(gb.Dropout):
        def forward(self, X, train=False, input_grad=True):
            if not train:
                return X, lambda dY: dY
            Y = self.backend.ops.dropout(X, self.backend.empty(X.shape), self.p, 0, self.index,
                                         self.context.step)
            return Y, lambda dY: dY

    def make():
        return gb.Sequential([gb.Dense(6, 8), HostStepDropout(0.5), gb.Dense(8, 3)],
                             device="cpu", seed=0)
    with pytest.raises(ValueError, match=r"'graphs' cannot capture this training step: layer 1 "
                                         r"\(HostStepDropout\) is not capturable yet"):
        run("host", make=make)
    monkeypatch.setattr(cg, "CAPTURABLE_LAYERS", cg.CAPTURABLE_LAYERS | {"HostStepDropout"})
    with pytest.raises(ReplayMismatch, match=r"replayed call \d+ differs from the captured one: "
                                             r"\('dropout'"):
        run("host", make=make)


class _FailingCapture(HostCapture):
    def capture(self, fn, touched):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_raises_or_runs_that_shape_eagerly():
    X, y = data()
    eager = run("off")
    for strict in (True, False):
        model, o = mlp(), OPTS["adamw-clip"]()
        sched = make_schedule("cosine", 0.02, steps_per_epoch=5, epochs=3, warmup_steps=2)
        fake = _FailingCapture(model, o)
        settings = cg.GraphSettings(warmup=1, capture=fake, strict=strict)
        if strict:
            with pytest.raises(RuntimeError, match="operation not permitted"):
                gb.fit(model, gb.SoftmaxCrossEntropy(), o, X, y, schedule=sched,
                       cuda_graph=settings, **KW)
            assert fake.events == ["begin", "end"]  # the run ended (the stream given back)
            continue
        with pytest.warns(RuntimeWarning, match=r"capturing the step of the batch shape .* "
                                                r"failed \(RuntimeError: operation not permitted"):
            hist = gb.fit(model, gb.SoftmaxCrossEntropy(), o, X, y, schedule=sched,
                          cuda_graph=settings, **KW)
        assert_same_run(eager, (model, o, hist, fake))


def test_resume_mid_epoch_with_graphs_equals_the_uninterrupted_eager_run(tmp_path):
    X, y = data()
    ref = run("off")
    model, loss, o = mlp(), gb.SoftmaxCrossEntropy(), OPTS["adamw-clip"]()
    sched = make_schedule("cosine", 0.02, steps_per_epoch=5, epochs=3, warmup_steps=2)
    path = tmp_path / "ck.npz"

    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 8:  # mid-epoch 2, after the last checkpoint at step 7... or 6
            raise Interrupt
    with pytest.raises(Interrupt):
        gb.fit(model, loss, o, X, y, schedule=sched, on_checkpoint=Checkpointer(path, model, o, loss),
               checkpoint_every=3, on_step=stop,
               cuda_graph=cg.GraphSettings(warmup=1, capture=HostCapture(model, o)), **KW)
    ck = load_checkpoint(path)
    model, loss, o = mlp(), gb.SoftmaxCrossEntropy(), OPTS["adamw-clip"]()
    state = ck.restore(model, o, loss)
    assert state.batch > 0  # resumed mid-epoch
    fake = HostCapture(model, o)
    hist = gb.fit(model, loss, o, X, y, schedule=sched, state=state,
                  cuda_graph=cg.GraphSettings(warmup=1, capture=fake), **KW)
    assert_same_run(ref, (model, o, hist, fake))
    assert "replay" in fake.events
