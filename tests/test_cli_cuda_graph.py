"""train --cuda-graph and info's CUDA graphs line, run as a user would (a subprocess)."""

import json
import subprocess
import sys

import pytest

BASE = ["train", "--dataset", "digits", "--layers", "16", "--epochs", "1", "--batch-size", "64",
        "--device", "cpu", "--quiet"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "gpubackprop", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_auto_and_off_give_the_same_run(tmp_path):
    results = []
    for mode in ("auto", "off"):
        out = tmp_path / f"{mode}.json"
        r = run(*BASE, "--cuda-graph", mode, "--metrics-json", out)
        assert r.returncode == 0, r.stderr
        m = json.loads(out.read_text())
        results.append((m["test_accuracy"], m["test_loss"], m["epochs"]))
    assert results[0] == results[1]


def test_on_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    ck = tmp_path / "ck.npz"
    r = run(*BASE, "--cuda-graph", "on", "--checkpoint", ck)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "cuda_graph: 'on' cannot capture this training step: no CUDA GPU" in lines[0]
    assert not ck.exists()


@pytest.mark.parametrize("bad", ["yes", "ON"])
def test_bad_choice(bad):
    r = run(*BASE, "--cuda-graph", bad)
    assert r.returncode == 2 and "--cuda-graph: invalid choice" in r.stderr


def test_info_says_whether_graphs_are_available():
    r = run("info")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("CUDA graphs: "))
    assert "not available: no CUDA GPU" in line or line == (
        "CUDA graphs: available (fit(cuda_graph='auto') captures each step shape after its "
        "warm-up)")
    assert "nvmath-python" in r.stdout
