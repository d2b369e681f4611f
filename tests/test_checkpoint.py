"""Checkpoints: round trip, exact resume, atomic writes, corrupt files; fit's NaN guard."""

import json
import os

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import (
    Checkpointer,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from gpubackprop.schedules import EarlyStopping, make_schedule
from gpubackprop.training import TrainingDiverged


def data(n=150, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, k, n)


def make(spec, hidden=12, opt="adam", activation="tanh"):
    device, kernels = spec
    model = gb.Sequential([gb.Dense(6, hidden, activation=activation), gb.Dense(hidden, 3)],
                          device=device, kernels=kernels, seed=3)
    optimizer = {"adam": lambda: gb.Adam(0.01),
                 "momentum": lambda: gb.SGD(0.05, momentum=0.9, nesterov=True),
                 "rmsprop": lambda: gb.RMSprop(0.01, momentum=0.5)}[opt]()
    return model, gb.SoftmaxCrossEntropy(), optimizer


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("opt", ["adam", "momentum", "rmsprop"])
@pytest.mark.parametrize("stop_at", [5, 10, 17])  # mid-epoch, an epoch end, mid-epoch later
def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, backend_spec, opt, stop_at):
    X, y = data()
    val = data(40, seed=1)
    kw = dict(epochs=4, batch_size=32, validation=val, progress=False)
    sched = make_schedule("cosine", 0.01, steps_per_epoch=5, epochs=4, warmup_steps=3)
    model, loss, o = make(backend_spec, opt=opt)
    ref_hist = gb.fit(model, loss, o, X, y, schedule=sched, **kw)
    ref = model.get_params()

    path = tmp_path / "ck.npz"
    model, loss, o = make(backend_spec, opt=opt)

    def stop(step):
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        gb.fit(model, loss, o, X, y, schedule=sched, on_checkpoint=Checkpointer(path, model, o, loss),
               checkpoint_every=2, on_step=stop, **kw)
    ck = load_checkpoint(path)
    model, loss, o = make(backend_spec, opt=opt)
    state = ck.restore(model, o, loss)
    assert stop_at - 2 <= state.step < stop_at
    hist = gb.fit(model, loss, o, X, y, schedule=sched, state=state, **kw)
    for k, v in model.get_params().items():
        assert np.array_equal(v, ref[k]), k
    assert hist == ref_hist


def test_round_trip_contents(tmp_path):
    model, loss, opt = make(("cpu", "reference"))
    X, y = data()
    gb.fit(model, loss, opt, X, y, epochs=1, batch_size=50, progress=False)
    scaling = {"kind": "standard", "shift": np.arange(6.0), "scale": np.ones(6)}
    save_checkpoint(tmp_path / "c.npz", model, opt, loss, config={"layers": [12]}, scaling=scaling)
    ck = load_checkpoint(tmp_path / "c.npz")
    assert ck.config == {"layers": [12]}
    np.testing.assert_array_equal(ck.scaling["shift"], np.arange(6.0))
    assert ck.meta["optimizer"]["steps"] == 3
    assert ck.meta["rng"] == model.backend.rng.bit_generator.state
    assert ck.training_state() is None
    again = ck.build_model(device="cpu", kernels="reference")
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(again.get_params()[k], v)
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    # Plain NumPy reads it without pickle: weights by name, metadata as JSON.
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert z["param/0.W"].shape == (12, 6)
        assert json.loads(str(z["meta"]))["format"] == "gpubackprop-checkpoint"


def test_other_architecture_is_a_clear_error(tmp_path):
    model, loss, opt = make(("cpu", "reference"))
    save_checkpoint(tmp_path / "c.npz", model, opt, loss)
    other, _, opt2 = make(("cpu", "reference"), hidden=7)
    with pytest.raises(CheckpointError, match=r"made for the architecture \[Dense\(6, 12, tanh\)"):
        load_checkpoint(tmp_path / "c.npz").restore(other, opt2)
    wrong_opt = gb.SGD(0.1)
    with pytest.raises(CheckpointError, match="optimizer state: expected type SGD, got 'Adam'"):
        load_checkpoint(tmp_path / "c.npz").restore(make(("cpu", "reference"))[0], wrong_opt)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_or_truncated_checkpoint(tmp_path, damage):
    model, loss, opt = make(("cpu", "reference"))
    path = tmp_path / "c.npz"
    save_checkpoint(path, model, opt, loss)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 3] ^= 0xFF  # inside an array's data
    elif damage == "garbage":
        raw = bytearray(b"hello, not a checkpoint" * 10)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt|not a readable|not a gpubackprop"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "none.npz")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    model, loss, opt = make(("cpu", "reference"))
    save_checkpoint(path, model, opt, loss)
    before = path.read_bytes()
    model.flat_params[...] += 1

    def crash(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        save_checkpoint(path, model, opt, loss)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]  # the temporary file is gone too
    load_checkpoint(path)


def test_stale_temporary_file_is_ignored_and_cleaned(tmp_path):
    path = tmp_path / "c.npz"
    model, loss, opt = make(("cpu", "reference"))
    save_checkpoint(path, model, opt, loss)
    stale = tmp_path / ".c.npz.abc123.tmp"  # what a kill between write and rename leaves
    stale.write_bytes(path.read_bytes()[:100])
    load_checkpoint(path)
    save_checkpoint(path, model, opt, loss)
    assert not stale.exists()


def test_atomic_write_of_text(tmp_path):
    path = tmp_path / "m.json"
    atomic_write(path, lambda f: f.write(b'{"a": 1}'))
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "no" / "m.json", lambda f: None)


def test_refuses_to_save_non_finite_parameters(tmp_path):
    model, loss, opt = make(("cpu", "reference"))
    path = tmp_path / "c.npz"
    save_checkpoint(path, model, opt, loss)
    before = path.read_bytes()
    model.flat_params[0] = np.nan
    with pytest.raises((CheckpointError, ValueError)):
        save_checkpoint(path, model, opt, loss)
    assert path.read_bytes() == before


# ---- the NaN guard -------------------------------------------------------------------------------
def test_nan_guard_names_step_and_layer_and_keeps_last_checkpoint(tmp_path, backend_spec):
    X, y = data()
    model, loss, _ = make(backend_spec, activation="relu")
    opt = gb.SGD(lr=1e30)
    path = tmp_path / "c.npz"
    saved = []

    def on_checkpoint(state):
        saved.append(state.step)
        save_checkpoint(path, model, opt, loss, state)

    with np.errstate(all="ignore"), \
            pytest.raises(TrainingDiverged, match=r"step (\d+) .*first non-finite values in .*layer"):
        gb.fit(model, loss, opt, X, y, epochs=3, batch_size=10, progress=False,
               nan_check_every=1, on_checkpoint=on_checkpoint, checkpoint_every=1)
    assert saved  # checkpoints before the divergence ...
    ck = load_checkpoint(path)  # ... and the last one is whole and finite
    assert all(np.isfinite(v).all() for v in ck.params.values())


def test_nan_guard_checks_only_every_n_steps(backend_spec):
    X, y = data()
    model, loss, _ = make(backend_spec, activation="relu")
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=r"at step (5|10|15) "):
        gb.fit(model, loss, gb.SGD(lr=1e30), X, y, epochs=3, batch_size=10, progress=False,
               nan_check_every=5)


@pytest.mark.parametrize("every", [None, 0])
def test_without_the_per_step_guard_a_diverged_run_still_fails_at_the_epoch_end(backend_spec, every):
    X, y = data()
    model, loss, _ = make(backend_spec, activation="relu")
    epochs = []
    # It returned a history ending in NaN; now the epoch's loss total (read anyway) stops it.
    with np.errstate(all="ignore"), \
            pytest.raises(TrainingDiverged, match=r"training diverged: non-finite values found at "
                                                  r"step 15 \(epoch 1, batch 15/15\): the loss is "
                                                  r"(nan|inf)"):
        gb.fit(model, loss, gb.SGD(lr=1e30), X, y, epochs=3, batch_size=10, progress=False,
               nan_check_every=every, callback=lambda epoch, logs: epochs.append(epoch))
    assert epochs == []  # no epoch was reported as done


def test_parameters_broken_by_the_last_step_of_an_epoch_are_caught(backend_spec):
    X, y = data()
    model, loss, opt = make(backend_spec)

    def break_after_last_step(step):  # every loss of the epoch is finite, the parameters are not
        if step == 5:
            model.flat_params[3] = np.nan

    with pytest.raises(TrainingDiverged, match=r"at step 5 \(epoch 1, batch 5/5\): the loss is "
                                               r"finite; first non-finite values in the parameters "
                                               r"of layer 0 "):
        gb.fit(model, loss, opt, X, y, epochs=1, batch_size=32, progress=False,
               on_step=break_after_last_step)


def test_early_stopping_state_survives_resume(tmp_path):
    X, y = data()
    val = data(40, seed=5)
    kw = dict(epochs=12, batch_size=50, validation=val, progress=False)
    model, loss, opt = make(("cpu", "reference"))
    h_ref = gb.fit(model, loss, opt, X, y, early_stopping=EarlyStopping(patience=2), **kw)
    ref = model.get_params()

    path = tmp_path / "c.npz"
    model, loss, opt = make(("cpu", "reference"))

    def stop(step):
        if step == 13:
            raise Interrupt

    with pytest.raises(Interrupt):
        gb.fit(model, loss, opt, X, y, early_stopping=EarlyStopping(patience=2),
               on_checkpoint=Checkpointer(path, model, opt, loss), on_step=stop, **kw)
    model, loss, opt = make(("cpu", "reference"))
    state = load_checkpoint(path).restore(model, opt, loss)
    h = gb.fit(model, loss, opt, X, y, early_stopping=EarlyStopping(patience=2), state=state, **kw)
    assert h == h_ref
    for k, v in model.get_params().items():
        assert np.array_equal(v, ref[k])


# ---- checkpoints written by earlier versions ---------------------------------------------------
def test_a_checkpoint_written_before_the_model_split_loads_and_resumes():
    """tests/data/checkpoint_v1_sequential.npz was written by the code before Model was split out
    of Sequential (tests/data/make_checkpoint_v1.py, at epoch 1 of 2); it rebuilds, predicts as
    then and resumes to the parameters the uninterrupted run ended with. Its Dense(16, 8, "gelu")
    was the tanh form, so it rebuilds as "gelu_tanh" (format version 1 -> 2)."""
    import importlib.util

    here = os.path.join(os.path.dirname(__file__), "data")
    spec = importlib.util.spec_from_file_location("make_v1", os.path.join(here, "make_checkpoint_v1.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    expected = np.load(os.path.join(here, "checkpoint_v1_expected.npz"))
    ck = load_checkpoint(os.path.join(here, "checkpoint_v1_sequential.npz"))
    assert ck.architecture["type"] == "Sequential"
    X, y = maker.data()
    rebuilt = ck.build_model(device="cpu", kernels="reference")
    assert isinstance(rebuilt, gb.Sequential) and isinstance(rebuilt.layers[2], gb.Residual)
    assert rebuilt.layers[6].activation == "gelu_tanh"
    np.testing.assert_allclose(rebuilt.predict(X), expected["predict_epoch1"], rtol=1e-12, atol=1e-13)
    model, loss, opt = maker.make()  # the maker's "gelu" is now the exact one: not that model
    with pytest.raises(CheckpointError, match=r"Dense\(16, 8, gelu_tanh\).*Dense\(16, 8, gelu\)"):
        ck.restore(model, opt, loss)
    model = ck.build_model(device="cpu", kernels="reference")
    state = ck.restore(model, opt, loss)
    assert state.epoch == 1 and model.step == 3  # Dropout's step counter came back too
    gb.fit(model, loss, opt, X, y, epochs=2, batch_size=8, progress=False, state=state)
    for key, value in model.get_params().items():
        np.testing.assert_allclose(value, expected[f"param/{key}"], rtol=1e-10, atol=1e-12)


def test_a_checkpoint_records_its_format_version_and_keeps_the_exact_gelu(tmp_path):
    """Written now: version 2, and "gelu" (exact) reloads as "gelu", not as the tanh form."""
    from gpubackprop.checkpoint import VERSION, save_checkpoint

    model = gb.Sequential([gb.Dense(3, 4, activation="gelu"), gb.Dense(4, 2, activation="gelu_tanh")],
                          device="cpu", dtype="float64", seed=0)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, model)
    with np.load(path) as z:
        assert VERSION == 2 and json.loads(str(z["meta"]))["version"] == 2
    rebuilt = load_checkpoint(path).build_model(device="cpu")
    assert [layer.activation for layer in rebuilt.layers] == ["gelu", "gelu_tanh"]
    X = np.random.default_rng(0).normal(size=(5, 3)) * 3
    np.testing.assert_array_equal(rebuilt.predict(X), model.predict(X))


def test_a_version_1_training_configuration_says_gelu_tanh_for_its_gelu():
    """The run's --activation and --model spec of a version-1 checkpoint name the tanh form, so that
    `train --resume` rebuilds the model it was trained with."""
    from gpubackprop.checkpoint import upgrade_meta

    meta = {"version": 1, "model": {"architecture": {"type": "Sequential", "layers": [
        {"type": "Dense", "n_in": 2, "n_out": 2, "activation": "gelu", "init": "he"},
        {"type": "Residual", "block": {"type": "Activation", "activation": "gelu"}}]}},
        "config": {"activation": "gelu", "model": "conv(8)-gelu-dense(16)-gelu-dense(classes)"}}
    new = upgrade_meta(meta)
    assert new["version"] == 2 and meta["version"] == 1  # a copy: the loaded dict is not changed
    layers = new["model"]["architecture"]["layers"]
    assert layers[0]["activation"] == "gelu_tanh" and layers[1]["block"]["activation"] == "gelu_tanh"
    assert new["config"] == {"activation": "gelu_tanh",
                             "model": "conv(8)-gelu_tanh-dense(16)-gelu_tanh-dense(classes)"}


def test_checkpoint_of_bn_then_activation_loads_and_runs(tmp_path, backend_spec):
    """A checkpoint saved before BatchNorm took activation= (its architecture: BatchNorm2d, then
    Activation, the BatchNorm's description without an "activation" key) still builds, runs and
    trains; it computes what the fused BatchNorm2d(activation="relu") computes."""
    device, kernels = backend_spec
    old_layers = [gb.Conv2d(2, 4, 3, padding=1), gb.BatchNorm2d(4), gb.Activation("relu"),
                  gb.Flatten(), gb.Dense(4 * 5 * 5, 3)]
    model = gb.Sequential(old_layers, input_shape=(2, 5, 5), device=device, kernels=kernels,
                          dtype="float64", seed=3)
    X = np.random.default_rng(0).normal(size=(6, 2, 5, 5))
    y = np.arange(6) % 3
    opt, loss = gb.Adam(0.01), gb.SoftmaxCrossEntropy()
    gb.fit(model, loss, opt, X, y, epochs=1, batch_size=3, progress=False)
    path = tmp_path / "old.npz"
    save_checkpoint(path, model, opt, loss)
    ck = load_checkpoint(path)
    assert ck.architecture["layers"][1] == {"type": "BatchNorm2d", "num_features": 4,
                                            "eps": 1e-5, "momentum": 0.1}
    assert ck.architecture["layers"][2] == {"type": "Activation", "activation": "relu"}
    again = ck.build_model(device=device, kernels=kernels)
    fused = gb.Sequential([gb.Conv2d(2, 4, 3, padding=1), gb.BatchNorm2d(4, activation="relu"),
                           gb.Flatten(), gb.Dense(4 * 5 * 5, 3)], input_shape=(2, 5, 5),
                          device=device, kernels=kernels, dtype="float64", seed=3)
    fused.set_params({k.replace("4.", "3."): v for k, v in model.get_params().items()})
    fused.set_state({k: v for k, v in model.get_state().items() if k != "step"})
    for train in (False, True):  # eval first: a training forward updates the running statistics
        Y0, Y1, Yf = (np.asarray(m.backend.to_host(m.forward(m.backend.to_device(X), train)[0]))
                      for m in (model, again, fused))
        np.testing.assert_array_equal(Y1, Y0)
        np.testing.assert_allclose(Yf, Y0, rtol=1e-12, atol=1e-12)
    state = ck.restore(again, gb.Adam(0.01), gb.SoftmaxCrossEntropy())
    gb.fit(again, gb.SoftmaxCrossEntropy(), gb.Adam(0.01), X, y, epochs=2, batch_size=3,
           progress=False, state=state)


def test_resume_of_a_run_whose_bn_relu_was_two_layers(tmp_path, monkeypatch):
    """``train --resume`` of a checkpoint made before the bn token fused the activation after it
    (BatchNorm2d, Activation) continues that architecture, as an uninterrupted run of it would."""
    from gpubackprop.checkpoint import unfused_batch_norm
    from gpubackprop.cli import main
    from gpubackprop.layers import SPEC_TOKENS

    args = ["train", "--dataset", "digits", "--model", "conv(4,3)-bn-relu-gap-dense(classes)",
            "--batch-size", "256", "--device", "cpu", "--quiet"]
    old, part, new = tmp_path / "old.npz", tmp_path / "part.npz", tmp_path / "new.npz"
    with monkeypatch.context() as m:  # the parser as it was: bn-relu as two layers
        m.setattr(SPEC_TOKENS["bn"], "fuses_activation", False)
        assert main(args + ["--epochs", "2", "--checkpoint", str(old)]) == 0
        assert main(args + ["--epochs", "1", "--checkpoint", str(part)]) == 0
    arch = load_checkpoint(part).architecture
    assert [d["type"] for d in arch["layers"]][:3] == ["Conv2d", "BatchNorm2d", "Activation"]
    assert main(["train", "--resume", "--epochs", "2", "--checkpoint", str(part), "--quiet"]) == 0
    a, b = load_checkpoint(old), load_checkpoint(part)
    assert b.architecture == arch and b.training_state().epoch == 2
    for k, v in a.params.items():
        np.testing.assert_array_equal(b.params[k], v, k)
    assert main(args + ["--epochs", "1", "--checkpoint", str(new)]) == 0  # a new run: fused
    fused = load_checkpoint(new).architecture
    assert fused["layers"][1]["activation"] == "relu" and unfused_batch_norm(fused) == arch
