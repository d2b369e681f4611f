"""Run by tests/test_distributed.py under ``mpiexec -n 2``: data-parallel fit through the Python API.

usage: mpi_worker.py OUT_DIR MODE [KILL_AT_STEP]
MODE: "mlp" | "cnn" | "graph" (train and save each rank's parameters; graph: a functional model),
"resume" (continue from OUT_DIR's checkpoint), "bad-data" (rank 1 gets a NaN in X and must end
the job), "collectives" (the communicator's broadcast and all-reduce on device arrays, checked
against their definition).
Environment: GB_COMM (default "mpi"), GB_DEVICE (default "cpu"; "cuda" puts the model on the GPU).
"""

import os
import sys

import numpy as np

import gpubackprop as gb
from gpubackprop.backend import cupy_module
from gpubackprop.checkpoint import Checkpointer, load_checkpoint
from gpubackprop.distributed import communicator

EPOCHS, BATCH = 3, 16


def data(mode):
    rng = np.random.default_rng(5)
    shape = (1, 6, 6) if mode == "cnn" else (7,)
    X = rng.normal(size=(60, *shape))
    y = rng.integers(0, 3, 60)
    return X, y


def model_for(mode, device="cpu"):
    if mode == "cnn":
        layers = [gb.Conv2d(1, 4, 3, padding=1, activation="relu"), gb.MaxPool2d(2), gb.Flatten(),
                  gb.Dense(36, 3)]
        return gb.Sequential(layers, device=device, dtype="float64", seed=3, input_shape=(1, 6, 6))
    if mode == "graph":  # a skip connection and a concatenation
        x = gb.Input((7,))
        h = gb.Dense(7, 7, activation="tanh")(x)
        y = gb.Dense(14, 3)(gb.Concatenate()([gb.Add()([h, x]), x]))
        return gb.Model(inputs=x, outputs=y, device=device, dtype="float64", seed=3)
    return gb.Sequential([gb.Dense(7, 9, activation="tanh"), gb.Dense(9, 3)], device=device,
                         dtype="float64", seed=3)


def check_collectives(comm, out):
    """Broadcast and all-reduce of device arrays (float32 and float64, a ragged length) against
    their definition; each rank writes what it saw."""
    xp = cupy_module()
    for dtype in (np.float32, np.float64):
        a = xp.arange(1001, dtype=dtype) * (comm.rank + 1)
        comm.allreduce_sum(a)
        expected = np.arange(1001, dtype=dtype) * sum(range(1, comm.size + 1))
        np.testing.assert_array_equal(xp.asnumpy(a), expected)
        b = xp.full(1001, comm.rank + 7, dtype=dtype)
        comm.broadcast(b)
        np.testing.assert_array_equal(xp.asnumpy(b), np.full(1001, 7, dtype=dtype))
    with open(os.path.join(out, f"collectives-rank{comm.rank}.ok"), "w") as f:
        f.write(f"{comm!r}\n")


def main(out, mode, kill_at=None):
    comm = communicator(os.environ.get("GB_COMM", "mpi"))
    if mode == "collectives":
        return check_collectives(comm, out)
    kind = mode if mode in ("cnn", "graph") else "mlp"
    X, y = data(kind)
    if mode == "bad-data" and comm.rank == 1:
        X[3, 2] = np.nan
    model = model_for(kind, os.environ.get("GB_DEVICE", "cpu"))
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
