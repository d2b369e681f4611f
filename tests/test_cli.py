"""The command line, run as a user would: ``python -m gpubackprop ...`` in a subprocess.

Small data sets written by the tests (MNIST-like IDX files, npz, csv), so a fresh clone needs no
downloads. Covers every command, exact resume after SIGKILL, a kill during a checkpoint write,
and a table of bad inputs (one line on stderr, exit status 2, no traceback, files unchanged).
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from gpubackprop.datasets import MNIST_FILES, write_idx
from gpubackprop.distributed import LAUNCHER_PREFIXES, LAUNCHER_VARIABLES

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
ENV.pop("GPUBACKPROP_TEST_FAULT", None)
ENV.pop("GPUBACKPROP_DEBUG", None)
for _name in list(ENV):  # run as from a plain shell, also when pytest itself runs under mpiexec
    if _name in LAUNCHER_VARIABLES or _name.startswith(LAUNCHER_PREFIXES):
        ENV.pop(_name)
FAST = ["--kernels", "reference", "--device", "cpu"]


def run(*args, env=None, cwd=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "gpubackprop", *map(str, args)],
                          capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=cwd,
                          timeout=timeout)


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def blobs(n, seed, d=8, k=3):
    """Separable Gaussian blobs: class c is centred at 3·e_c."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d))
    X[np.arange(n), y] += 3.0
    return X, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    X, y = blobs(240, 0)
    Xt, yt = blobs(60, 1)
    np.savez(root / "blobs.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    return root


def write_mnist(folder, gz, n_train=300, n_test=100):
    """A learnable MNIST in miniature: 6×6 images, class k lights up row k//2 (half 0, half 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 6, 6)).astype(np.uint8)
        for i, k in enumerate(labels):
            r, half = divmod(int(k), 2)
            images[i, r, half * 3:half * 3 + 3] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, stem in MNIST_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return folder


def train_args(files, *extra):
    return ["train", "--dataset", f"npz:{files / 'blobs.npz'}", "--layers", "16", "--epochs", "3",
            "--batch-size", "32", "--lr", "0.01", *FAST, *extra]


# ---- help and the small commands -------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["info"],
                                     ["gradcheck"]])
def test_help(command):
    r = ok(run(*command, "--help"))
    assert "usage: gpubackprop" in r.stdout
    if not command:
        for name in ("train", "evaluate", "predict", "bench", "info", "gradcheck", "mnist:DIR"):
            assert name in r.stdout
    if command == ["train"]:
        for flag in ("--dataset", "--layers", "--resume", "--metrics-json", "--plot",
                     "--checkpoint-every", "--nan-check-every", "--val-split", "--schedule"):
            assert flag in r.stdout


def test_train_help_documents_every_spec_token_and_preset():
    """The grammar in 'train --help' names every token the spec parser takes, init= and the presets."""
    from gpubackprop.kernels.reference import ACTIVATIONS
    from gpubackprop.layers import INITS
    from gpubackprop.modelspec import LAYER_TOKENS, PRESETS

    text = ok(run("train", "--help")).stdout
    grammar = text.split("--model: ")[1].split("With --checkpoint")[0]
    for name in (*LAYER_TOKENS, "res", *ACTIVATIONS):
        assert re.search(rf"(^|[\s|]){name}(\(|\s|\|)", grammar, re.M), name
    for part in ("lstm(h,layers=1,bidir=false,dropout=0)", "gru(h,layers=1,bidir=false,dropout=0)",
                 "rnn(h,layers=1,bidir=false,dropout=0,relu=false)", "last ",
                 "dense(n,init=)", "bias=true,init=)", "init=         ", " | ".join(INITS)):
        assert part in grammar, part
    assert f"presets: {', '.join(PRESETS)}" in grammar and "lstm (lstm(128)-last-" in grammar


def test_choices_are_the_librarys_names():
    """Each command offers the library's own lists (imported, so a name added there is offered)."""
    from gpubackprop.backend import DEVICES, DTYPES, KERNEL_SETS
    from gpubackprop.cli import build_parser
    from gpubackprop.cuda_graph import CUDA_GRAPH_MODES
    from gpubackprop.datasets import HEADERS, SCALINGS
    from gpubackprop.distributed import COMMUNICATORS
    from gpubackprop.kernels.reference import ACTIVATIONS
    from gpubackprop.layers import INITS
    from gpubackprop.losses import LOSSES
    from gpubackprop.optimizers import OPTIMIZER_NAMES
    from gpubackprop.precision import PRECISIONS
    from gpubackprop.schedules import SCHEDULE_NAMES

    commands = build_parser()._subparsers._group_actions[0].choices
    choices = {name: {a.dest: tuple(a.choices) for a in p._actions if a.choices}
               for name, p in commands.items()}
    assert choices["train"] == {
        "header": HEADERS, "scale": SCALINGS, "activation": ACTIVATIONS, "init": INITS, "dtype": DTYPES,
        "loss": tuple(LOSSES), "optimizer": OPTIMIZER_NAMES, "schedule": SCHEDULE_NAMES,
        "monitor": ("val_loss", "val_accuracy"), "comm": COMMUNICATORS, "device": DEVICES,
        "kernels": KERNEL_SETS, "precision": PRECISIONS, "cuda_graph": CUDA_GRAPH_MODES}
    assert choices["gradcheck"]["activation"] == ACTIVATIONS
    assert choices["gradcheck"]["loss"] == tuple(LOSSES) == ("ce", "mse", "bce")
    for name in ("evaluate", "predict", "info", "gradcheck"):
        assert (choices[name]["device"], choices[name]["kernels"]) == (DEVICES, KERNEL_SETS)
    assert choices["evaluate"]["header"] == choices["predict"]["header"] == HEADERS


def test_no_command_is_a_usage_error():
    r = run()
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("gpubackprop: error: expected a command")


def test_info():
    r = ok(run("info"))
    for word in ("python", "numpy", "numba", "numba-cuda", "cupy", "GPU:", "kernel set: fused",
                 "first training step", "the MLP kernels (float32", "set: fused-"):
        assert word in r.stdout
    assert "Numba CPU" in r.stdout or "Numba CUDA" in r.stdout
    for word in ("scipy", "threadpoolctl", "ml_dtypes", "nvmath-python"):
        assert re.search(rf"^{word} +\S", r.stdout, re.MULTILINE), word


def test_a_closed_stdout_ends_quietly():
    # `gpubackprop info | head`: the reader is gone before the output is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "gpubackprop", "info", "--no-compile"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, env=ENV,
                           timeout=180)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "error" not in r.stderr and "Traceback" not in r.stderr and "Broken pipe" not in r.stderr


def test_gradcheck():
    r = ok(run("gradcheck", "--layers", "5", "--activation", "sigmoid", *FAST))
    assert "max relative error" in r.stdout and "ok" in r.stdout
    err = float(r.stdout.split("max relative error ")[1].split()[0])
    assert err < 1e-6


def test_bench_runs_the_benchmark():
    r = ok(run("bench", "--quick", "--no-torch", "--no-sklearn", "--no-plot",
               "--sections", "throughput"))
    assert "## Training step throughput" in r.stdout
    assert "gpubackprop fused" in r.stdout and "pytorch" in r.stdout  # its row says "not installed"


# ---- train, evaluate, predict ---------------------------------------------------------------------
def test_train_metrics_plot_evaluate_predict(files, tmp_path):
    ck, metrics, plot = tmp_path / "ck.npz", tmp_path / "m.json", tmp_path / "curves.png"
    r = ok(run(*train_args(files, "--val-split", "0.2", "--checkpoint", ck, "--metrics-json",
                           metrics, "--plot", plot)))
    assert "epoch 3/3" in r.stdout and "test accuracy" in r.stdout
    m = json.loads(metrics.read_text())
    assert set(m) == {"test_accuracy", "test_loss", "epochs", "seconds"}
    assert isinstance(m["test_accuracy"], float) and m["test_accuracy"] > 0.75
    assert isinstance(m["test_loss"], float) and m["seconds"] > 0
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
    for e in m["epochs"]:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(e)
        assert isinstance(e["train_loss"], float)
    # The plot is a real PNG of the size drawn, with coloured curves on it.
    raw = plot.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(plot)
    assert img.shape[:2] == (400, 1000)
    rgb = img[..., :3]
    assert (rgb.max(axis=2) - rgb.min(axis=2) > 0.3).sum() > 500  # coloured pixels: the curves

    r = ok(run("evaluate", "--checkpoint", ck, "--dataset", f"npz:{files / 'blobs.npz'}",
               "--json", *FAST))
    ev = json.loads(r.stdout)
    assert ev["samples"] == 60
    assert ev["accuracy"] == pytest.approx(m["test_accuracy"])
    assert ev["loss"] == pytest.approx(m["test_loss"], rel=1e-5)

    out = tmp_path / "pred.npy"
    ok(run("predict", "--checkpoint", ck, "--dataset", f"npz:{files / 'blobs.npz'}", "--output",
           out, *FAST))
    pred = np.load(out)
    _, yt = blobs(60, 1)
    assert pred.shape == (60,) and (pred == yt).mean() == pytest.approx(m["test_accuracy"])
    # Raw features from a CSV file: scaled with the training statistics inside the checkpoint.
    Xt, _ = blobs(60, 1)
    csv_in = tmp_path / "new.csv"
    csv_in.write_text("\n".join(",".join(f"{v:.17g}" for v in row) for row in Xt) + "\n")
    out_csv = tmp_path / "pred.csv"
    ok(run("predict", "--checkpoint", ck, "--input", csv_in, "--output", out_csv,
           "--probabilities", *FAST))
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "p0,p1,p2" and len(lines) == 61
    probs = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(axis=1), pred)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_train_on_mnist_idx_files(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz)
    metrics = tmp_path / "m.json"
    r = ok(run("train", "--dataset", f"mnist:{folder}", "--layers", "32", "--epochs", "8",
               "--batch-size", "32", "--lr", "0.01", "--metrics-json", metrics, *FAST))
    assert "300 train / 0 validation / 100 test samples, 36 features, 10 classes" in r.stdout
    assert json.loads(metrics.read_text())["test_accuracy"] > 0.8


def test_csv_dataset_with_named_label_column(tmp_path):
    X, y = blobs(120, 3, d=3)
    path = tmp_path / "d.csv"
    lines = ["kind,a,b,c"] + [f"{k},{a:.6f},{b:.6f},{c:.6f}" for k, (a, b, c) in zip(y, X,
                                                                                      strict=True)]
    path.write_text("\n".join(lines) + "\n")
    r = ok(run("train", "--dataset", f"csv:{path}", "--label-column", "kind", "--layers", "8",
               "--epochs", "5", "--lr", "0.02", "--batch-size", "16", *FAST))
    assert "96 train / 0 validation / 24 test samples, 3 features, 3 classes" in r.stdout


def test_digits_with_schedule_and_early_stopping(tmp_path):
    metrics = tmp_path / "m.json"
    r = ok(run("train", "--dataset", "digits", "--layers", "32", "--epochs", "4", "--batch-size",
               "64", "--lr", "0.005", "--val-split", "0.1", "--schedule", "cosine",
               "--warmup-steps", "5", "--early-stopping", "3", "--metrics-json", metrics,
               "--device", "cpu"))
    assert "lr " in r.stdout
    m = json.loads(metrics.read_text())
    assert m["test_accuracy"] > 0.7 and len(m["epochs"]) == 4


# ---- convolutional models: --model specs and presets -----------------------------------------------
CNN = "conv(4,3,pad=1)-relu-maxpool(2)-flatten-dense(16)-relu-dense(10)"


def test_cnn_spec_on_digits_train_evaluate_predict(tmp_path):
    ck, metrics = tmp_path / "cnn.npz", tmp_path / "m.json"
    r = ok(run("train", "--dataset", "digits", "--model", CNN, "--epochs", "1", "--batch-size",
               "64", "--lr", "0.01", "--checkpoint", ck, "--metrics-json", metrics, *FAST))
    assert "64 features, 10 classes (images of 1x8x8)" in r.stdout
    assert "Conv2d(1,4,3,padding=1,relu) 4x8x8 -> MaxPool2d(2) 4x4x4 -> Flatten() 64 " \
           "features -> Dense(64,16,relu)" in r.stdout
    m = json.loads(metrics.read_text())
    assert m["test_accuracy"] > 0.2  # one epoch of a tiny CNN: well above chance (0.1)
    with np.load(ck, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert "param/0.weight" in z.files and z["param/0.weight"].shape == (4, 1, 3, 3)
    assert meta["config"]["model"] == CNN
    r = ok(run("evaluate", "--checkpoint", ck, "--json", *FAST))  # the training data set
    ev = json.loads(r.stdout)
    assert ev["samples"] == 359 and ev["accuracy"] == pytest.approx(m["test_accuracy"])
    # Flat rows of 64 pixels (e.g. a CSV) are images of 1x8x8 to this model.
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    np.save(tmp_path / "x.npy", X[:7])
    out = tmp_path / "p.npy"
    ok(run("predict", "--checkpoint", ck, "--input", tmp_path / "x.npy", "--output", out, *FAST))
    assert np.load(out).shape == (7,)
    np.save(tmp_path / "bad.npy", X[:7, :60])
    r = run("predict", "--checkpoint", ck, "--input", tmp_path / "bad.npy", *FAST)
    assert r.returncode == 2 and "the model in" in r.stderr and "expects 1x8x8" in r.stderr


@pytest.mark.parametrize("preset", ["lenet5", "mlp", "resnet"])
def test_presets_train_on_image_data(tmp_path, preset):
    folder = write_mnist(tmp_path / "mnist", gz=False, n_train=64, n_test=32)
    ck = tmp_path / "ck.npz"
    r = ok(run("train", "--dataset", f"mnist:{folder}", "--model", preset, "--epochs", "1",
               "--batch-size", "32", "--checkpoint", ck, *FAST))
    assert f"model {preset}: 1x6x6 -> " in r.stdout
    assert r.stderr == ""
    with np.load(ck, allow_pickle=False) as z:
        config = json.loads(str(z["meta"]))["config"]
    assert config["model"] == preset and config["model_spec"].endswith("dense(classes)")
    if preset == "resnet":
        assert "Residual[" in r.stdout and "GlobalAvgPool2d() 32 features" in r.stdout
    if preset == "mlp":
        assert "1x6x6 -> Flatten() 36 features -> Dense(36,128,relu)" in r.stdout
    elif preset == "lenet5":
        assert "Conv2d(1,6,5,padding=2,relu)" in r.stdout


def test_resume_of_a_cnn_run_equals_the_uninterrupted_run(tmp_path):
    args = ["train", "--dataset", "digits", "--model", "conv(4,3)-tanh-avgpool(2)-dense(10)",
            "--epochs", "2", "--batch-size", "128", "--optimizer", "momentum", "--lr", "0.05",
            "--device", "cpu"]
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    ok(run(*args, "--checkpoint", full))
    # 12 steps an epoch: killed at step 17, after the step-15 checkpoint; --model comes back from
    # the checkpoint.
    r = run(*args, "--checkpoint", part, "--checkpoint-every", "5",
            env={"GPUBACKPROP_TEST_FAULT": "kill-after-step:17"})
    assert r.returncode == -signal.SIGKILL
    r = ok(run("train", "--resume", "--checkpoint", part))
    assert "resuming" in r.stdout and "Conv2d(1,4,3,tanh)" in r.stdout
    assert_same(params_of(full), params_of(part))
    r = run("train", "--resume", "--checkpoint", part, "--model", "lenet5", *FAST)
    assert r.returncode == 2
    assert "made with --model conv(4,3)-tanh-avgpool(2)-dense(10), not lenet5" in r.stderr


# ---- checkpoints: kill, resume, bit for bit --------------------------------------------------------
def params_of(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("param/", "opt/"))}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_sigkill_then_resume_equals_uninterrupted_run(files, tmp_path, kernels):
    args = ["train", "--dataset", f"npz:{files / 'blobs.npz'}", "--layers", "16,8", "--epochs",
            "4", "--batch-size", "32", "--optimizer", "momentum", "--lr", "0.02", "--schedule",
            "step", "--step-size", "2", "--val-split", "0.1", "--device", "cpu", "--kernels",
            kernels]
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    m_full, m_part = tmp_path / "full.json", tmp_path / "part.json"
    ok(run(*args, "--checkpoint", full, "--metrics-json", m_full))
    # 7 steps an epoch: killed at step 19, in epoch 3, after the step-15 checkpoint.
    r = run(*args, "--checkpoint", part, "--checkpoint-every", "5",
            env={"GPUBACKPROP_TEST_FAULT": "kill-after-step:19"})
    assert r.returncode == -signal.SIGKILL
    with np.load(part, allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["training"]["step"] == 15
    r = ok(run("train", "--resume", "--checkpoint", part, "--metrics-json", m_part, "--kernels",
               kernels))
    assert "resuming" in r.stdout
    assert_same(params_of(full), params_of(part))
    a, b = json.loads(m_full.read_text()), json.loads(m_part.read_text())
    assert a["epochs"] == b["epochs"] and a["test_loss"] == b["test_loss"]


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(files, tmp_path):
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    ok(run(*train_args(files, "--checkpoint", full)))
    r = run(*train_args(files, "--checkpoint", part),
            env={"GPUBACKPROP_TEST_FAULT": "kill-in-checkpoint-write:2"})
    assert r.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".part.npz.")]
    assert len(leftovers) == 1  # the temporary file of the interrupted write
    with np.load(part, allow_pickle=False) as z:  # the epoch-1 checkpoint, whole
        assert json.loads(str(z["meta"]))["training"]["epoch"] == 1
    ok(run("train", "--resume", "--checkpoint", part))
    assert_same(params_of(full), params_of(part))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".part.npz.")]


def test_resume_of_a_finished_run_can_extend_it(files, tmp_path):
    ck = tmp_path / "ck.npz"
    ok(run(*train_args(files, "--checkpoint", ck, "--epochs", "2")))
    # Resumed as it is, the run has nothing left to do: it says so and writes nothing.
    before, entries = (ck.read_bytes(), ck.stat().st_mtime_ns), sorted(os.listdir(tmp_path))
    r = ok(run("train", "--resume", "--checkpoint", ck, "--metrics-json", tmp_path / "m.json",
               "--plot", tmp_path / "p.png"))
    assert r.stdout.splitlines() == [f"checkpoint {ck}: the run already completed its 2 epochs; "
                                     f"nothing to resume: to train more, resume with a larger "
                                     f"--epochs, e.g. --epochs 12"]
    assert (ck.read_bytes(), ck.stat().st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == entries
    r = ok(run("train", "--resume", "--checkpoint", ck, "--epochs", "3"))
    assert "epoch 3/3" in r.stdout and "epoch 2/3" not in r.stdout
    full = tmp_path / "full.npz"
    ok(run(*train_args(files, "--checkpoint", full, "--epochs", "3")))
    assert_same(params_of(full), params_of(ck))


def test_early_stopping_says_where_it_stopped_and_which_weights_it_restored(files, tmp_path):
    ck, metrics, plot = tmp_path / "ck.npz", tmp_path / "m.json", tmp_path / "curves.jpg"
    r = ok(run(*train_args(files, "--epochs", "30", "--val-split", "0.2", "--early-stopping", "1",
                           "--lr", "0.05", "--checkpoint", ck, "--metrics-json", metrics,
                           "--plot", plot)))
    epochs = json.loads(metrics.read_text())["epochs"]
    done, val = len(epochs), [e["val_loss"] for e in epochs]
    best = int(np.argmin(val)) + 1
    assert done < 30
    assert f"early stopping: stopped after epoch {done} of 30: val_loss did not improve for 1 " \
           f"epoch (patience 1); restored the weights of epoch {best}, the best (val_loss " \
           f"{val[best - 1]:.4f})" in r.stdout
    ev = json.loads(ok(run("evaluate", "--checkpoint", ck, "--split", "val", "--json",
                           *FAST)).stdout)
    assert ev["loss"] == pytest.approx(val[best - 1], rel=1e-5)  # those weights, indeed
    # Each epoch line gives its own time and the total so far.
    assert re.search(r"^epoch 1/30: .*  \(\d+\.\d s, \d+\.\d s in all\)$", r.stdout, re.M)
    assert plot.read_bytes()[:3] == b"\xff\xd8\xff"  # .jpg: a JPEG, as the extension says
    # Resumed, the stopped run has nothing left to do.
    before = (ck.read_bytes(), ck.stat().st_mtime_ns)
    r = ok(run("train", "--resume", "--checkpoint", ck))
    assert r.stdout.splitlines() == [
        f"checkpoint {ck}: the run already stopped early after epoch {done} (early stopping on "
        f"val_loss, patience 1); it holds the weights of epoch {best}; nothing to resume: to "
        f"train more start a new run (--overwrite or another --checkpoint)"]
    assert (ck.read_bytes(), ck.stat().st_mtime_ns) == before


def test_bce_trains_on_labels_and_evaluate_scores_it_with_bce(files, tmp_path):
    ck, metrics, probs = tmp_path / "ck.npz", tmp_path / "m.json", tmp_path / "p.npy"
    ok(run(*train_args(files, "--loss", "bce", "--checkpoint", ck, "--metrics-json", metrics)))
    m = json.loads(metrics.read_text())
    ev = json.loads(ok(run("evaluate", "--checkpoint", ck, "--json", *FAST)).stdout)
    assert ev["loss"] == pytest.approx(m["test_loss"], rel=1e-6)
    assert ev["accuracy"] == pytest.approx(m["test_accuracy"])
    # The loss is the binary cross-entropy of one sigmoid a class against one-hot 0/1 targets
    # (not a softmax cross-entropy), and predict's probabilities are those sigmoids.
    ok(run("predict", "--checkpoint", ck, "--dataset", f"npz:{files / 'blobs.npz'}", "--output",
           probs, "--probabilities", *FAST))
    p = np.load(probs).astype(np.float64)
    _, yt = blobs(60, 1)
    t = np.eye(3)[yt]
    assert not np.allclose(p.sum(axis=1), 1)
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log1p(-p))
    assert ev["loss"] == pytest.approx(bce, rel=1e-4)


def test_the_first_eta_leaves_out_the_first_steps_compilation(monkeypatch):
    """The bar train draws: a slow first step (kernel compilation) is not in its rate or ETA."""
    import time

    import gpubackprop as gb
    from gpubackprop import training

    bars, slow = [], []
    make_bar, step = training._progress_bar, training.step_on_device

    def spy(total, progress):
        bars.append(make_bar(total, progress))
        return bars[-1]

    def compiling_first(*args, **kwargs):
        if not slow:
            slow.append(time.sleep(1.0))
        return step(*args, **kwargs)

    monkeypatch.setattr(training, "_progress_bar", spy)
    monkeypatch.setattr(training, "step_on_device", compiling_first)
    X, y = blobs(64, 0)
    model = gb.Sequential([gb.Dense(8, 3)], device="cpu", kernels="reference")
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1), X, y, epochs=2, batch_size=16,
           progress=True)
    (bar,) = bars
    assert bar.n == 8 and bar.format_dict["elapsed"] < 0.5


# ---- bad inputs: one line, exit 2, no traceback, nothing touched -----------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("bad")
    ok(run(*train_args(files, "--checkpoint", root / "ck.npz", "--epochs", "1")))
    (root / "metrics.json").write_text('{"keep": "me"}\n')
    good = write_mnist(root / "mnist_good", gz=False, n_train=20, n_test=10)
    magic = write_mnist(root / "mnist_magic", gz=True, n_train=20, n_test=10)
    raw = bytearray((magic / (MNIST_FILES["train_images"] + ".gz")).read_bytes())
    import gzip

    data = bytearray(gzip.decompress(bytes(raw)))
    data[2] = 0x42  # an unknown type code
    (magic / (MNIST_FILES["train_images"] + ".gz")).write_bytes(gzip.compress(bytes(data)))
    counts = write_mnist(root / "mnist_counts", gz=False, n_train=20, n_test=10)
    write_idx(counts / MNIST_FILES["test_labels"], np.zeros(9, np.uint8))
    (root / "text.csv").write_text("a,b,label\n1,2,0\n3,abc,1\n5,6,0\n")
    (root / "neg.csv").write_text("1,2,0\n3,4,-2\n5,6,1\n")
    X, _ = blobs(20, 4)
    np.savez(root / "labels5.npz", X_train=X, y_train=np.arange(20) % 6, X_test=X[:5],
             y_test=np.arange(5))
    trunc = (root / "ck.npz").read_bytes()
    (root / "truncated.npz").write_bytes(trunc[:len(trunc) // 2])
    (root / "a_folder").mkdir()
    # No header: row 1 has a cell that is not a number (once taken as a header, losing the row).
    (root / "row1.csv").write_text("1.0,2.0,abc,4.0,1\n" + "".join(f"{i}.5,2,3,4,{i % 2}\n"
                                                                    for i in range(12)))
    assert good.exists()
    return root


BLOBS = "npz:{files}/blobs.npz"
CASES = {
    "missing npz": ["train", "--dataset", "npz:{root}/nope.npz"],
    "missing mnist dir": ["train", "--dataset", "mnist:{root}/no_such_dir"],
    "missing mnist file": ["train", "--dataset", "mnist:{root}"],
    "wrong IDX magic": ["train", "--dataset", "mnist:{root}/mnist_magic"],
    "mismatched counts": ["train", "--dataset", "mnist:{root}/mnist_counts"],
    "text in a CSV feature": ["train", "--dataset", "csv:{root}/text.csv"],
    "negative CSV label": ["train", "--dataset", "csv:{root}/neg.csv"],
    "labels out of range": ["evaluate", "--checkpoint", "{root}/ck.npz", "--dataset",
                            "npz:{root}/labels5.npz"],
    "other architecture": ["train", "--dataset", BLOBS, "--checkpoint", "{root}/ck.npz",
                           "--resume", "--layers", "7"],
    "truncated checkpoint": ["evaluate", "--checkpoint", "{root}/truncated.npz", "--dataset",
                             BLOBS],
    "not a checkpoint": ["train", "--checkpoint", "{root}/metrics.json", "--resume"],
    "negative epochs": ["train", "--dataset", BLOBS, "--epochs", "-1"],
    "unknown optimizer": ["train", "--dataset", BLOBS, "--optimizer", "adagrad"],
    "NaN-producing lr": ["train", "--dataset", BLOBS, "--optimizer", "sgd", "--lr", "1e30",
                         "--checkpoint", "{root}/ck.npz", "--overwrite", "--nan-check-every", "1",
                         "--batch-size", "8"],
    "unknown dataset kind": ["train", "--dataset", "parquet:{root}/x"],
    "existing checkpoint": ["train", "--dataset", BLOBS, "--checkpoint", "{root}/ck.npz"],
    "bad layers": ["train", "--dataset", BLOBS, "--layers", "16,x"],
    "zero batch size": ["train", "--dataset", BLOBS, "--batch-size", "0"],
    "no such output folder": ["train", "--dataset", BLOBS, "--plot", "{root}/no/dir/p.png"],
    "unknown command": ["fly"],
    "early stopping without validation": ["train", "--dataset", BLOBS, "--early-stopping", "2"],
    "cuda without a GPU": ["info", "--device", "cuda", "--no-compile"],
    "model spec that does not parse": ["train", "--dataset", BLOBS, "--model", "dense(8)-relux"],
    "model spec that does not fit": ["train", "--dataset", BLOBS, "--model", "conv(4,3)-dense(3)"],
    "layers with a non-mlp model": ["train", "--dataset", BLOBS, "--model", "dense(3)",
                                    "--layers", "8"],
    "checkpoint is a folder": ["train", "--dataset", BLOBS, "--checkpoint", "{root}/a_folder"],
    "resume from a folder": ["train", "--checkpoint", "{root}/a_folder", "--resume"],
    "evaluate a folder": ["evaluate", "--checkpoint", "{root}/a_folder", "--dataset", BLOBS],
    "plot to a non-image extension": ["train", "--dataset", BLOBS, "--plot", "{root}/plot.txt"],
    "mpi without mpiexec": ["train", "--dataset", BLOBS, "--comm", "mpi"],
    "nccl without mpiexec": ["train", "--dataset", BLOBS, "--comm", "nccl"],
    "divergence without per-step checks": ["train", "--dataset", "digits", "--optimizer", "sgd",
                                           "--lr", "1e6", "--nan-check-every", "0"],
    "header for a dataset that has none": ["train", "--dataset", BLOBS, "--header", "yes"],
    "malformed first row of a headerless CSV": ["train", "--dataset", "csv:{root}/row1.csv"],
    "resume with another header": ["train", "--checkpoint", "{root}/ck.npz", "--resume",
                                   "--header", "no"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2_files_unchanged(bad, files, case):
    if case == "cuda without a GPU":
        from gpubackprop.backend import cuda_available

        if cuda_available():
            pytest.skip("this machine has CUDA")
    args = [a.format(root=bad, files=files) for a in CASES[case]]
    if args[0] == "train":
        args += ["--metrics-json", str(bad / "metrics.json"), *FAST]
        if "--epochs" not in args:
            args += ["--epochs", "2"]
    watched = [bad / "ck.npz", bad / "metrics.json", bad / "truncated.npz"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    entries = sorted(os.listdir(bad))
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gpubackprop: error: ")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before
    assert sorted(os.listdir(bad)) == entries  # no new (temporary) files either


def test_error_messages_name_the_problem(bad, files):
    def err(*args):
        r = run(*[a.format(root=bad, files=files) for a in args], *FAST)
        return r.stderr

    assert "row 3, column 2 ('b'): expected a number, got 'abc'" in err(
        "train", "--dataset", "csv:{root}/text.csv")
    assert "10 images but 9 labels" in err("train", "--dataset", "mnist:{root}/mnist_counts")
    assert "magic number 0x00004203" in err("train", "--dataset", "mnist:{root}/mnist_magic")
    assert "label 3 is out of range" in err("evaluate", "--checkpoint", "{root}/ck.npz",
                                            "--dataset", "npz:{root}/labels5.npz")
    assert "made with --layers 16, not 7" in err("train", "--checkpoint", "{root}/ck.npz",
                                                 "--resume", "--layers", "7")
    assert "model: token 2 'relux' at character 10: unknown layer 'relux'" in err(
        "train", "--dataset", BLOBS, "--model", "dense(8)-relux")
    assert "model: token 1 'conv(4,3)' at character 1: needs image input (channels, height, " \
           "width), got 8 features" in err("train", "--dataset", BLOBS, "--model",
                                           "conv(4,3)-dense(3)")
    assert "layers: --layers shapes the layers of --model mlp only" in err(
        "train", "--dataset", BLOBS, "--model", "lenet5", "--layers", "8")
    assert "init: --init shapes the layers of --model mlp only" in err(
        "train", "--dataset", BLOBS, "--model", "dense(3)", "--init", "he")
    assert f"checkpoint: {bad}/a_folder is a directory, not a checkpoint file; name a file, e.g. " \
           f"--checkpoint {bad}/a_folder/run.npz" in err("train", "--dataset", BLOBS,
                                                        "--checkpoint", "{root}/a_folder")
    for command in (["train", "--resume"], ["evaluate"], ["predict", "--input", "x.csv"]):
        assert f"checkpoint: {bad}/a_folder is a directory, not a checkpoint file" in err(
            *command, "--checkpoint", "{root}/a_folder"), command
    e = err("train", "--dataset", BLOBS, "--plot", "{root}/plot.txt")
    assert f"plot: {bad}/plot.txt ends in .txt, not a plot format; expected a path ending in one " \
           f"of " in e and all(f".{ext}," in e for ext in ("png", "pdf", "svg", "jpg"))
    try:
        import mpi4py  # noqa: F401
    except ImportError:  # then the error says that mpi4py is missing
        pass
    else:
        for kind in ("mpi", "nccl"):
            e = err("train", "--dataset", BLOBS, "--comm", kind)
            assert f"comm: '{kind}' trains data-parallel across processes started by an MPI " \
                   f"launcher, but this process was not started by one" in e
            assert "start it with 'mpiexec -n N gpubackprop train ...'" in e
    e = err("train", "--dataset", BLOBS, "--optimizer", "sgd", "--lr", "1e30",
            "--nan-check-every", "1", "--batch-size", "8")
    assert "training diverged" in e and "step" in e and "layer" in e
    # Without per-step checks the end of the first epoch finds it (it once ended "test loss nan").
    e = err("train", "--dataset", "digits", "--optimizer", "sgd", "--lr", "1e6",
            "--nan-check-every", "0", "--epochs", "2")
    assert "training diverged" in e and "(epoch 1, " in e
    assert f"csv:{bad}/row1.csv: row 1, column 3: expected a number, got 'abc'" in err(
        "train", "--dataset", "csv:{root}/row1.csv")
    assert "made with --header auto, not no" in err("train", "--checkpoint", "{root}/ck.npz",
                                                    "--resume", "--header", "no")


def test_lstm_on_an_npz_of_sequences_and_the_lstm_preset_on_digits(tmp_path):
    # A task that needs memory: the class is the sign pattern of the first step, seen at the end.
    rng = np.random.default_rng(0)

    def split(n):
        X = rng.normal(size=(n, 6, 2)) * 0.1
        y = rng.integers(0, 2, n)
        X[:, 0, 0] += 2 * y - 1
        return X, y

    (Xa, ya), (Xb, yb) = split(200), split(60)
    np.savez(tmp_path / "seq.npz", X_train=Xa, y_train=ya, X_test=Xb, y_test=yb)
    ck = tmp_path / "lstm.npz"
    r = ok(run("train", "--dataset", f"npz:{tmp_path / 'seq.npz'}", "--model",
               "lstm(8)-last-dense(classes)", "--epochs", "15", "--optimizer", "adam", "--lr",
               "0.02", "--batch-size", "20", "--checkpoint", ck, *FAST))
    assert "Reshape(shape=(6,2)) 6x2 -> LSTM(input_size=2,hidden_size=8,num_layers=1) 6x8" in r.stdout
    assert float(r.stdout.split("test accuracy ")[1].split()[0]) >= 0.9
    ok(run("evaluate", "--checkpoint", ck, "--dataset", f"npz:{tmp_path / 'seq.npz'}", *FAST))
    r = ok(run("train", "--dataset", "digits", "--model", "lstm", "--epochs", "1", *FAST))
    assert "LSTM(input_size=8,hidden_size=128,num_layers=1) 8x128 -> LastStep()" in r.stdout


# ---- CSV headers, warnings, outputs checked and locked, JSON -----------------------------------
def one_error_line(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("gpubackprop: error: ")
    return line


def test_header_is_explicit_in_train_evaluate_predict_and_kept_for_resume(tmp_path):
    X, y = blobs(60, 5, d=3)
    path = tmp_path / "d.csv"
    # A header row of numbers: auto would take it as a sample (and 9 as a label), --header yes not.
    path.write_text("1,2,3,9\n" + "".join(f"{a:.6f},{b:.6f},{c:.6f},{k}\n"
                                          for (a, b, c), k in zip(X, y, strict=True)))
    ck = tmp_path / "ck.npz"
    r = ok(run("train", "--dataset", f"csv:{path}", "--header", "yes", "--layers", "8",
               "--epochs", "2", "--checkpoint", ck, *FAST))
    assert "48 train / 0 validation / 12 test samples, 3 features, 3 classes" in r.stdout
    with np.load(ck, allow_pickle=False) as z:
        assert json.loads(str(z["meta"]))["config"]["header"] == "yes"
    ev = json.loads(ok(run("evaluate", "--checkpoint", ck, "--json", *FAST)).stdout)
    assert ev["samples"] == 12  # the checkpoint's --header yes, not auto's 13 rows
    line = one_error_line(run("train", "--checkpoint", ck, "--resume", "--header", "no",
                              "--epochs", "3"))
    assert "made with --header yes, not no" in line
    # predict --input: 2 rows, the first with a cell that is not a number.
    features = tmp_path / "new.csv"
    features.write_text("1,x,3\n1,2,3\n")
    before = sorted(os.listdir(tmp_path))
    for header in ([], ["--header", "auto"], ["--header", "no"]):
        line = one_error_line(run("predict", "--checkpoint", ck, "--input", features, "--output",
                                  tmp_path / "p.csv", *header, *FAST))
        assert f"{features}" in line and "row 1, column 2" in line and "'x'" in line, header
    assert sorted(os.listdir(tmp_path)) == before
    ok(run("predict", "--checkpoint", ck, "--input", features, "--header", "yes", "--output",
           tmp_path / "p.csv", *FAST))
    assert (tmp_path / "p.csv").read_text().splitlines()[1:] != []
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 2  # "class" and one prediction


def test_a_library_warning_is_one_line(tmp_path):
    X, _ = blobs(31, 6, d=3)
    y = [0, 1, 2] * 10 + [50]  # 51 classes for 4 labels: the data set warns
    path = tmp_path / "gaps.csv"
    path.write_text("".join(f"{a:.6f},{b:.6f},{c:.6f},{k}\n" for (a, b, c), k in zip(X, y,
                                                                                    strict=True)))
    r = ok(run("train", "--dataset", f"csv:{path}", "--layers", "8", "--epochs", "1", "-q", *FAST,
               env={"PYTHONWARNINGS": ""}))  # the tests' ENV ignores warnings; a shell does not
    assert r.stderr.splitlines() == [
        f"gpubackprop: warning: dataset 'csv:{path}': the largest label is 50, so the model gets "
        f"51 classes, but only 4 distinct labels occur (47 classes never do); renumber the labels "
        f"0..3 for a smaller model"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
@pytest.mark.parametrize("flag", ["--metrics-json", "--plot", "--checkpoint"])
def test_an_unwritable_output_fails_before_training(files, flag):
    # sysfs refuses new files even to root: found at the start, not after the last epoch.
    path = "/sys/out.png" if flag == "--plot" else "/sys/out.json"
    r = run(*train_args(files, flag, path))
    assert one_error_line(r).startswith(f"gpubackprop: error: {flag[2:]}: cannot write {path}: ")
    assert r.stdout == ""


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
def test_an_unwritable_prediction_output_fails_before_the_model_is_loaded(tmp_path):
    # The checkpoint does not exist: the output is checked first.
    line = one_error_line(run("predict", "--checkpoint", tmp_path / "none.npz", "--dataset",
                              "digits", "--output", "/sys/p.csv", *FAST))
    assert line.startswith("gpubackprop: error: output: cannot write /sys/p.csv: ")


HOLD_LOCK = """
import sys
from gpubackprop.outputs import lock_output
lock = lock_output(sys.argv[1], "checkpoint")
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_second_run_on_a_locked_checkpoint_fails_at_start(files, tmp_path):
    ck = tmp_path / "ck.npz"
    ok(run(*train_args(files, "--checkpoint", ck, "--epochs", "1")))
    assert os.listdir(tmp_path) == ["ck.npz"]  # the run's lock went with it
    before = (ck.read_bytes(), ck.stat().st_mtime_ns)
    # Another process writing the checkpoint (a run in progress) holds its lock.
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ck)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert other.stdout.readline() == "locked\n", other.stderr.read()
        for extra in (["--resume"], ["--overwrite"]):
            r = run(*train_args(files, "--checkpoint", ck, "--epochs", "2", *extra))
            assert one_error_line(r) == (
                f"gpubackprop: error: checkpoint {ck}: another process (pid {other.pid}) is "
                f"writing it (it holds {ck}.lock); wait for it to finish or write to another path")
            assert r.stdout == "", extra  # stopped at the start: nothing read or trained
            assert (ck.read_bytes(), ck.stat().st_mtime_ns) == before
    finally:
        other.kill()
        other.wait()


def test_evaluate_json_of_a_nan_loss_is_valid_json(files, tmp_path):
    import gpubackprop as gb
    from gpubackprop.checkpoint import load_checkpoint, save_checkpoint

    ck = tmp_path / "ck.npz"
    ok(run(*train_args(files, "--checkpoint", ck, "--epochs", "1")))
    # Weights at the edge of float32 (finite, so they load): the logits overflow to +-inf and the
    # cross-entropy is NaN, which Python's json would print as NaN.
    ckpt = load_checkpoint(ck)
    model = ckpt.build_model(device="cpu", kernels="reference")
    model.set_params({k: np.where(np.arange(v.size).reshape(v.shape) % 2, 3e38, -3e38)
                      for k, v in model.get_params().items()})
    save_checkpoint(ck, model, loss=gb.SoftmaxCrossEntropy(), config=ckpt.config,
                    scaling=ckpt.scaling)

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    r = ok(run("evaluate", "--checkpoint", ck, "--json", *FAST))
    ev = json.loads(r.stdout, parse_constant=reject)
    assert ev["loss"] is None and ev["samples"] == 60
