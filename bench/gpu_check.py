"""``make gpu-check``: everything that needs a real NVIDIA GPU, in one command, with one results file.

1. the whole test suite on the GPU: the ``gpu``-marked tests, the cuda backends of every
   parametrized test, and the CUDA-simulator test files' assertions on the real device (they run
   against CuPy arrays when a GPU is present and the simulator is off);
2. the digits demo trained on ``cuda`` (must reach >= 0.97 test accuracy);
3. host synchronisation inside a training step (an MLP, a CNN with BatchNorm and Dropout, an
   LSTM), counted: each step is queued behind a GPU kernel that spins for SPIN_SECONDS; a step
   that synchronised the host (``.item()``, ``float()``, ``asnumpy``, a ``bool()`` of a device
   array, a blocking copy) cannot return before the spin ends;
4. the benchmarks (``python -m bench --device cuda``, what ``make bench`` runs) on the GPU, against PyTorch
   CUDA when it is installed (``make bench`` itself would install the CPU build of PyTorch).

Writes bench/results/gpu-check-<gpu>.json and .md. Exit status 1 if any check fails.
5. mixed precision (issue 17): bf16/fp16 rows of the MLPs, LeNet-5 and the LSTM against our fp32
   and PyTorch autocast (bench/results/precision-<gpu>.json), the L MLP's targets, and the digits
   MLP's accuracy in each precision.

``python -m bench.gpu_check tests demo`` runs only the checks named (tests, demo, host_sync, bench,
precision).
"""

import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
SPIN_SECONDS = 0.5
STEPS = 8


def gpu_name():
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else name


def run_tests():
    """pytest over tests/ with the simulator off: on a GPU the cuda and cudasim-marked tests use it."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["GPUBACKPROP_REQUIRE_PTXAS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    try:  # pytest-xdist, where installed: the suite's CPU half is most of its time
        import xdist  # noqa: F401

        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(os.path.join(RESULTS, "gpu-check-tests.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    return {"ok": done.returncode == 0, "summary": tail, "counts": counts,
            "seconds": round(time.perf_counter() - t0, 1),
            "failures": [line for line in done.stdout.splitlines() if line.startswith("FAILED")][:50]}


def run_demo():
    from gpubackprop.demo import main

    t0 = time.perf_counter()
    metrics = main(device="cuda")
    return {"ok": metrics["accuracy"] >= 0.97, "accuracy": metrics["accuracy"],
            "loss": metrics["loss"], "seconds": round(time.perf_counter() - t0, 1)}


def spin_kernel():
    """A CuPy kernel that spins for ``cycles`` GPU clock cycles (a step queued behind it must
    wait; also bench/gpu_graphs.py's host-time check)."""
    import cupy as cp

    return cp.RawKernel(r'''
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}''', "spin")


def _sync_check_models():
    """(name, model, X, y): an MLP, a CNN with BatchNorm and Dropout, an LSTM classifier, and
    the MLP in fp16 and the CNN in bf16."""
    import numpy as np

    import gpubackprop as gb

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 128)
    mlp = gb.Sequential([gb.Dense(784, 256, activation="relu"), gb.Dense(256, 10)],
                        device="cuda", seed=0)
    cnn = gb.Sequential([gb.Conv2d(1, 16, 3, padding=1, activation="relu"), gb.BatchNorm2d(16),
                         gb.MaxPool2d(2), gb.Flatten(), gb.Dropout(0.3), gb.Dense(16 * 14 * 14, 10)],
                        device="cuda", seed=0, input_shape=(1, 28, 28))
    lstm = gb.Sequential([gb.LSTM(28, 128), gb.LastStep(), gb.Dense(128, 10)], device="cuda", seed=0,
                         input_shape=(28, 28))
    # Mixed precision (issue 17): the fp16 step's loss scaling, unscale + inf check, skip gate
    # and scale update, and the bf16 CNN's rounding, all on the device.
    mlp16 = gb.Sequential([gb.Dense(784, 256, activation="relu"), gb.Dense(256, 10)],
                          device="cuda", seed=0, precision="fp16")
    cnn_bf16 = gb.Sequential([gb.Conv2d(1, 16, 3, padding=1, activation="relu"),
                              gb.BatchNorm2d(16), gb.MaxPool2d(2), gb.Flatten(), gb.Dropout(0.3),
                              gb.Dense(16 * 14 * 14, 10)],
                             device="cuda", seed=0, input_shape=(1, 28, 28), precision="bf16")
    return [("mlp", mlp, rng.normal(size=(128, 784)), y),
            ("cnn", cnn, rng.normal(size=(128, 1, 28, 28)), y),
            ("lstm", lstm, rng.normal(size=(128, 28, 28)), y),
            ("mlp_fp16", mlp16, rng.normal(size=(128, 784)), y),
            ("cnn_bf16", cnn_bf16, rng.normal(size=(128, 1, 28, 28)), y)]


def count_host_syncs():
    """Training steps queued behind a spinning kernel: how many had to wait for the device.

    Each step gets a spin of its own: the GPU's launch queue holds about a thousand kernels, and an
    LSTM step launches hundreds, so steps queued back to back behind one spin would fill it and
    wait for the device without any synchronisation in the step (seen: the last 3 of 8)."""
    import cupy as cp
    import numpy as np

    import gpubackprop as gb
    from gpubackprop.training import step_on_device

    spin = spin_kernel()
    clock_hz = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["clockRate"] * 1e3
    out = {"ok": True, "steps": STEPS, "spin_seconds": SPIN_SECONDS}
    for name, model, Xh, yh in _sync_check_models():
        loss, opt = gb.SoftmaxCrossEntropy(), gb.Adam(lr=1e-3, clip_norm=1.0)
        be = model.backend
        X, y = be.to_device(Xh), be.to_device(yh, np.int64)
        step_on_device(model, loss, opt, X, y)  # compile and allocate first
        stream = cp.cuda.get_current_stream()
        host = []
        for _ in range(STEPS):
            be.synchronize()
            spin((1,), (1,), (np.int64(SPIN_SECONDS * clock_hz),), stream=stream)
            t0 = time.perf_counter()
            step_on_device(model, loss, opt, X, y)
            host.append(time.perf_counter() - t0)
        be.synchronize()
        # A step that took half the spin to return waited for the device: a host sync in the step.
        waited = sum(1 for t in host if t > 0.5 * SPIN_SECONDS)
        out[name] = {"steps_that_waited_for_the_device": waited,
                     "host_seconds_per_step_max": round(max(host), 4),
                     "host_seconds_per_step_median": round(float(np.median(host)), 4)}
        out["ok"] = out["ok"] and waited == 0
    return out


def kernel_registers():
    """Registers per thread of the kernels as the driver loaded them for this GPU."""
    import numpy as np

    from gpubackprop.kernels.cuda.launch import _KERNELS

    out = {}
    for (body, dtype, label_dtype), k in _KERNELS.items():
        try:
            regs = k.get_regs_per_thread()
        except Exception:
            continue
        key = f"{body.__name__}[{np.dtype(dtype).name}{'/' + label_dtype.name if label_dtype else ''}]"
        out[key] = regs if isinstance(regs, int) else dict(regs)
    return out


def run_bench():
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True)
    return {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
            "tail": done.stdout[-2000:] + done.stderr[-1000:]}


def run_precision():
    """Mixed precision on the GPU (issue 17): the bf16/fp16 benchmark rows against our fp32 and
    PyTorch autocast (gpubackprop.benchmark.precision, its targets for the L MLP), and the digits
    MLP trained in each precision (bf16 and fp16 within 0.5 points of fp32)."""
    import gpubackprop as gb
    from gpubackprop.demo import load_digits_split

    t0 = time.perf_counter()
    out = os.path.join(RESULTS, f"precision-{re.sub(r'[^a-z0-9]+', '-', gpu_name().lower())}.json")
    done = subprocess.run([sys.executable, "-m", "gpubackprop.benchmark.precision", "--device",
                           "cuda", "--out", out], cwd=ROOT, capture_output=True, text=True)
    targets = []
    if done.returncode == 0 and os.path.exists(out):
        with open(out) as f:
            targets = json.load(f)["targets"]
    Xtr, Xte, ytr, yte = load_digits_split(0)
    accuracy = {}
    for precision in ("fp32", "bf16", "fp16"):
        model = gb.Sequential([gb.Dense(64, 128, activation="relu"),
                               gb.Dense(128, 64, activation="relu"), gb.Dense(64, 10)],
                              device="cuda", seed=0, precision=precision)
        gb.fit(model, gb.SoftmaxCrossEntropy(), gb.Adam(lr=0.002), Xtr, ytr, epochs=30,
               batch_size=32, progress=False)
        accuracy[precision] = round(gb.evaluate(model, gb.SoftmaxCrossEntropy(), Xte,
                                                yte)["accuracy"], 4)
    close = all(abs(accuracy[p] - accuracy["fp32"]) <= 0.005 for p in ("bf16", "fp16"))
    return {"ok": done.returncode == 0 and close and all(t["met"] for t in targets),
            "seconds": round(time.perf_counter() - t0, 1), "targets": targets,
            "digits_accuracy": accuracy, "rows_file": os.path.relpath(out, ROOT),
            "tail": done.stdout[-2000:] + done.stderr[-1000:]}


def write(results, name):
    os.makedirs(RESULTS, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    base = os.path.join(RESULTS, f"gpu-check-{slug}")
    if os.path.exists(base + ".json"):  # checks run one at a time add to the same file
        with open(base + ".json") as f:
            results = {**json.load(f), **results}
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# gpu-check on {name}", "", f"date: {results['date']}", "",
             "| check | ok | detail |", "| --- | --- | --- |"]
    for key in ("tests", "demo", "host_sync", "bench", "precision"):
        if key not in results:
            continue
        r = results[key]
        detail = {k: v for k, v in r.items() if k not in ("ok", "tail", "failures")}
        lines.append(f"| {key} | {'yes' if r.get('ok') else 'NO'} | {json.dumps(detail)} |")
    if "graphs" in results:  # CUDA graphs (issue 16): a row here, its own tables below
        from bench.gpu_graphs import format_graphs

        lines.append(f"| graphs | {'yes' if results['graphs'].get('ok') else 'NO'} | the CUDA "
                     f"graphs section below |")
        lines += ["", format_graphs(results["graphs"])]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return base


CHECKS = {"tests": run_tests, "demo": run_demo, "host_sync": count_host_syncs, "bench": run_bench,
          "precision": run_precision}



def run_graphs():
    """CUDA graphs (issue 16, bench/gpu_graphs.py): replay == eager bit for bit for an MLP, a CNN
    with BatchNorm and Dropout and an LSTM (and a run resumed mid-epoch), host time per step, and
    samples/s with graphs on and off against PyTorch eager and a captured PyTorch step."""
    from bench.gpu_graphs import run_graphs as run

    return run()


CHECKS["graphs"] = run_graphs


def main(argv=None):
    from gpubackprop.backend import has_cupy_gpu, is_cudasim

    names = list(argv if argv is not None else sys.argv[1:]) or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu-check: checks: expected some of {list(CHECKS)}, got {unknown}", file=sys.stderr)
        return 2

    if is_cudasim() or not has_cupy_gpu():
        print("gpu-check: no CUDA GPU seen by CuPy and Numba (or the simulator is on); nothing to "
              "check here. Run it on a machine with an NVIDIA GPU and a CUDA 12 driver.",
              file=sys.stderr)
        return 2
    name = gpu_name()
    results = {"gpu": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "python": platform.python_version()}
    print(f"gpu-check on {name}: {', '.join(names)}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    for check in names:
        results[check] = CHECKS[check]()
        shown = {k: v for k, v in results[check].items() if k != "tail"}
        print(f"{check}: {json.dumps(shown)}", flush=True)
    results["registers"] = kernel_registers()
    base = write(results, name)
    ok = all(results[k]["ok"] for k in names)
    print(f"gpu-check: {'all checks passed' if ok else 'FAILED'}; results in {base}.json / .md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
