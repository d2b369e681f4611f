"""Writes checkpoint_v1_sequential.npz and checkpoint_v1_expected.npz beside this file: a checkpoint
written by gpubackprop before the Model/Sequential split (commit 42a6f54) after epoch 1 of 2, and
what the uninterrupted run gave (epoch 1's outputs, epoch 2's parameters). tests/test_checkpoint.py
loads and resumes it with the current code. Run with that version of gpubackprop importable:
``python tests/data/make_checkpoint_v1.py``."""

import os
import shutil

import numpy as np

import gpubackprop as gb
from gpubackprop.checkpoint import Checkpointer

HERE = os.path.dirname(os.path.abspath(__file__))


def make():
    model = gb.Sequential([
        gb.Conv2d(1, 4, 3, padding=1, activation="relu"), gb.BatchNorm2d(4),
        gb.Residual(gb.Sequential([gb.Conv2d(4, 4, 3, padding=1, activation="tanh"),
                                   gb.Conv2d(4, 4, 1)], device="cpu")),
        gb.MaxPool2d(2), gb.Dropout(0.25), gb.Flatten(), gb.Dense(16, 8, activation="gelu"),
        gb.LayerNorm(8), gb.Dense(8, 3)], device="cpu", dtype="float64", seed=4,
        kernels="reference", input_shape=(1, 4, 4))
    return model, gb.SoftmaxCrossEntropy(), gb.Adam(0.01)


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 1, 4, 4)), rng.integers(0, 3, 24)


def main():
    X, y = data()
    model, loss, opt = make()
    tmp = os.path.join(HERE, "tmp-checkpoint.npz")
    saver = Checkpointer(tmp, model, opt, loss)
    seen = {}

    def on_checkpoint(state):
        saver(state)
        if state.epoch == 1 and state.batch == 0 and "epoch1" not in seen:
            shutil.copy(tmp, os.path.join(HERE, "checkpoint_v1_sequential.npz"))
            seen["epoch1"] = model.predict(X)

    gb.fit(model, loss, opt, X, y, epochs=2, batch_size=8, progress=False,
           on_checkpoint=on_checkpoint)
    saver.close()
    os.remove(tmp)
    np.savez(os.path.join(HERE, "checkpoint_v1_expected.npz"), predict_epoch1=seen["epoch1"],
             **{f"param/{k}": v for k, v in model.get_params().items()})


if __name__ == "__main__":
    main()
