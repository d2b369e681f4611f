"""Run by tests/test_distributed.py under ``mpiexec -n 2``: data-parallel fit through the Python API.

usage: mpi_worker.py OUT_DIR MODE [KILL_AT_STEP]
MODE: "mlp" | "cnn" (train and save each rank's parameters), "resume" (continue from OUT_DIR's
checkpoint), "bad-data" (rank 1 gets a NaN in X and must end the job).
"""

import os
import sys

import numpy as np

import gpubackprop as gb
from gpubackprop.checkpoint import Checkpointer, load_checkpoint
from gpubackprop.distributed import communicator

EPOCHS, BATCH = 3, 16


def data(mode):
    rng = np.random.default_rng(5)
    shape = (1, 6, 6) if mode == "cnn" else (7,)
    X = rng.normal(size=(60, *shape))
    y = rng.integers(0, 3, 60)
    return X, y


def model_for(mode):
    if mode == "cnn":
        layers = [gb.Conv2d(1, 4, 3, padding=1, activation="relu"), gb.MaxPool2d(2), gb.Flatten(),
                  gb.Dense(36, 3)]
        return gb.Sequential(layers, device="cpu", dtype="float64", seed=3, input_shape=(1, 6, 6))
    return gb.Sequential([gb.Dense(7, 9, activation="tanh"), gb.Dense(9, 3)], device="cpu",
                         dtype="float64", seed=3)


def main(out, mode, kill_at=None):
    comm = communicator(os.environ.get("GB_COMM", "mpi"))
    X, y = data("cnn" if mode == "cnn" else "mlp")
    if mode == "bad-data" and comm.rank == 1:
        X[3, 2] = np.nan
    model = model_for("cnn" if mode == "cnn" else "mlp")
    loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1, momentum=0.9)
    ckpt_path = os.path.join(out, "run.npz")
    state = None
    if mode == "resume":
        ckpt = load_checkpoint(ckpt_path)
        ckpt.restore(model, opt, loss)
        state = ckpt.training_state()
    on_step = None
    if kill_at is not None:
        def on_step(step):
            if step == kill_at:
                os._exit(9)  # a crash: no cleanup, no collective; mpiexec ends the job
    hist = gb.fit(model, loss, opt, X, y, epochs=EPOCHS, batch_size=BATCH, progress=False,
                  comm=comm, state=state, on_checkpoint=Checkpointer(ckpt_path, model, opt, loss),
                  checkpoint_every=2, on_step=on_step)
    np.savez(os.path.join(out, f"{mode}-rank{comm.rank}.npz"), loss=np.array(hist["loss"]),
             **model.get_params())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
