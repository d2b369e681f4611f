"""Learning-rate schedules against their hand-written formulas; early stopping's bookkeeping."""

import math

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.schedules import (
    ConstantLR,
    CosineLR,
    EarlyStopping,
    ExponentialLR,
    StepLR,
    Warmup,
    make_schedule,
    schedule_from_config,
)


def test_step():
    s = StepLR(0.1, step_size=3, gamma=0.5)
    assert [s(t) for t in range(7)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]


def test_exponential():
    s = ExponentialLR(0.2, gamma=0.9)
    for t in (0, 1, 5, 17):
        assert s(t) == pytest.approx(0.2 * 0.9 ** t)
    per_epoch = ExponentialLR(0.2, gamma=0.9, every=4)
    assert [per_epoch(t) for t in (0, 3, 4, 8)] == pytest.approx([0.2, 0.2, 0.18, 0.162])


def test_cosine():
    s = CosineLR(1.0, total_steps=10, min_lr=0.1)
    assert s(0) == pytest.approx(1.0)
    assert s(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(3) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.3)) / 2)
    assert s(10) == pytest.approx(0.1)
    assert s(25) == pytest.approx(0.1)  # stays at the floor after the last step


def test_warmup_then_cosine():
    s = Warmup(CosineLR(0.4, total_steps=8), warmup_steps=4)
    assert [s(t) for t in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert s(4) == pytest.approx(0.4)  # the inner schedule starts at its step 0
    assert s(8) == pytest.approx(0.2)
    assert s(12) == pytest.approx(0.0)


def test_make_schedule_counts_epochs_in_steps():
    s = make_schedule("step", 1.0, steps_per_epoch=5, epochs=10, step_size=2, gamma=0.1)
    assert s(9) == 1.0 and s(10) == pytest.approx(0.1)
    e = make_schedule("exponential", 1.0, steps_per_epoch=5, epochs=10, gamma=0.5)
    assert e(4) == 1.0 and e(5) == 0.5
    c = make_schedule("cosine", 1.0, steps_per_epoch=5, epochs=4, warmup_steps=5)
    assert isinstance(c, Warmup) and c.schedule.total_steps == 15
    assert c(19) == pytest.approx(CosineLR(1.0, 15)(14))
    assert make_schedule("constant", 0.3, 5, 1)(100) == 0.3
    with pytest.raises(ValueError, match="schedule: expected one of"):
        make_schedule("linear", 1.0, 5, 1)


@pytest.mark.parametrize("s", [ConstantLR(0.1), StepLR(0.1, 3, 0.5), ExponentialLR(0.1, 0.9, 2),
                               CosineLR(0.1, 50, 0.01), Warmup(StepLR(0.1, 3), 7)])
def test_config_round_trip(s):
    again = schedule_from_config(s.config())
    assert again == s
    assert [again(t) for t in range(20)] == [s(t) for t in range(20)]


@pytest.mark.parametrize("make,match", [
    (lambda: StepLR(0.1, 0), "step_size"), (lambda: ExponentialLR(0.1, 0.0), "gamma"),
    (lambda: CosineLR(-1, 10), "lr"), (lambda: Warmup(0.1, 3), "schedule"),
    (lambda: Warmup(ConstantLR(0.1), 0), "warmup_steps"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_fit_applies_schedule_before_every_step():
    model = gb.Sequential([gb.Dense(3, 2)], device="cpu", kernels="reference")
    opt = gb.SGD(lr=1.0)
    seen = []
    s = StepLR(0.5, step_size=2, gamma=0.1)

    def schedule(t):
        seen.append(t)
        return s(t)

    X, y = np.ones((8, 3)), np.arange(8) % 2
    gb.fit(model, gb.SoftmaxCrossEntropy(), opt, X, y, epochs=2, batch_size=4, progress=False,
           schedule=schedule)
    assert seen == [0, 1, 2, 3]
    assert opt.lr == pytest.approx(0.05)


def test_early_stopping_bookkeeping():
    es = EarlyStopping("val_loss", patience=2)
    assert es.update(1, {"val_loss": 1.0}) == (True, False)
    assert es.update(2, {"val_loss": 0.5}) == (True, False)
    assert es.update(3, {"val_loss": 0.7}) == (False, False)
    assert es.update(4, {"val_loss": 0.6}) == (False, True)
    assert es.state() == {"best": 0.5, "best_epoch": 2, "wait": 2}
    acc = EarlyStopping("val_accuracy", patience=1)
    assert acc.mode == "max"
    assert acc.update(1, {"val_accuracy": 0.5}) == (True, False)
    assert acc.update(2, {"val_accuracy": 0.4}) == (False, True)
    with pytest.raises(ValueError, match="monitor 'val_loss' is not among"):
        EarlyStopping().update(1, {"loss": 1.0})


def test_fit_stops_early_and_restores_best():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)), rng.integers(0, 2, 64)
    Xv, yv = rng.normal(size=(32, 4)), rng.integers(0, 2, 32)  # noise: validation stops improving
    model = gb.Sequential([gb.Dense(4, 16, activation="relu"), gb.Dense(16, 2)], device="cpu",
                          kernels="reference")
    best = {}
    es = EarlyStopping("val_loss", patience=2, restore_best=True)

    def remember(epoch, logs):
        if es.best_epoch == epoch + 1:
            best["params"] = model.get_params()

    h = gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(0.05), X, y, epochs=60, batch_size=16,
               validation=(Xv, yv), progress=False, early_stopping=es, callback=remember)
    assert len(h["loss"]) < 60
    assert len(h["loss"]) == es.best_epoch + 2
    for k, v in model.get_params().items():
        np.testing.assert_array_equal(v, best["params"][k])
