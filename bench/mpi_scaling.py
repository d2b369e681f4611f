"""Data-parallel scaling: training samples/s with 1 and 2 MPI ranks (``make bench`` runs it).

Each configuration is one ``mpiexec -n R`` job training the same float32 MLP (784-256-256-10,
softmax CE, SGD momentum 0.9) with the same global batch; every rank uses T BLAS threads. Rank 0
times epochs after a warm-up epoch and reports samples/s (median over epochs). Results go to
bench/results/mpi-scaling-<machine-type>.json and .md.

usage: python -m bench.mpi_scaling [--quick]
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (ranks, BLAS threads per rank)
SAMPLES, BATCH = 8192, 256


def worker(epochs):
    import gpubackprop as gb
    from gpubackprop.distributed import communicator

    comm = communicator("mpi")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(SAMPLES, 784)).astype(np.float32)
    y = rng.integers(0, 10, SAMPLES)
    model = gb.Sequential([gb.Dense(784, 256, activation="relu"),
                           gb.Dense(256, 256, activation="relu"), gb.Dense(256, 10)],
                          device="cpu", seed=0)
    stamps = []
    gb.fit(model, gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.01, momentum=0.9), X, y,
           epochs=epochs + 1, batch_size=BATCH, progress=False, comm=comm,
           callback=lambda epoch, logs: stamps.append(time.perf_counter()) and False)
    if comm.is_root:
        rates = SAMPLES / np.diff(stamps)
        print(json.dumps({"samples_per_s": float(np.median(rates)), "epochs": epochs}))


def run(quick=False):
    from gpubackprop.benchmark import machine_type

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep +
                           os.environ.get("PATH", ""))
    if mpiexec is None:
        print("mpi scaling: mpiexec not found (pip install 'gpubackprop[mpi]'); skipped")
        return None
    epochs = 2 if quick else 5
    rows = []
    for ranks, threads in CONFIGS:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
        done = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "bench.mpi_scaling",
                               "--worker", str(epochs)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"mpi scaling: {ranks} ranks failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"ranks": ranks, "threads_per_rank": threads, **result})
        print(f"{ranks} rank(s) x {threads} thread(s): {result['samples_per_s']:,.0f} samples/s",
              flush=True)
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_1x1"] = r["samples_per_s"] / base
    out = os.path.join(ROOT, "bench", "results", f"mpi-scaling-{machine_type()}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"model": "784-256-256-10 float32", "global_batch": BATCH, "samples": SAMPLES,
                   "rows": rows}, f, indent=2)
    lines = ["# Data-parallel scaling (MPI, CPU)", "",
             f"MLP 784-256-256-10, float32, global batch {BATCH}, {SAMPLES} samples, SGD momentum; "
             "median samples/s over epochs after a warm-up epoch.", "",
             "| ranks | BLAS threads a rank | samples/s | × 1 rank, 1 thread |",
             "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['ranks']} | {r['threads_per_rank']} | {r['samples_per_s']:,.0f} | "
              f"{r['speedup_vs_1x1']:.2f} |" for r in rows]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        run(quick="--quick" in sys.argv)
