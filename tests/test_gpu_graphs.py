"""bench/gpu_graphs.py (make gpu-check's "graphs" check) without a GPU: it imports, is registered,
and its results format as the tables the README and bench/results take."""

import json

import pytest

gpu_graphs = pytest.importorskip("bench.gpu_graphs")

RESULT = {
    "ok": False,
    "replay_vs_eager": {
        "mlp": {"replay_equals_eager": True, "resumed_equals_uninterrupted": True,
                "resumed_at_batch": 2, "max_abs_diff_vs_cuda_graph_off": 0.0,
                "equal_to_cuda_graph_off": True},
        "lstm": {"replay_equals_eager": False, "resumed_equals_uninterrupted": True,
                 "resumed_at_batch": 2, "max_abs_diff_vs_cuda_graph_off": 1.5e-7,
                 "equal_to_cuda_graph_off": False},
        "cnn": {"error": "ValueError: cuda_graph: 'on' cannot capture this training step: layer 0 "
                         "(Conv2d) is not capturable yet"},
    },
    "host_seconds_per_step": {"mlp": {"eager": 0.0009, "graphs": 0.00004},
                              "cnn": {"eager": 0.002, "graphs": "ValueError: no"}},
    "samples_per_second": {
        "MLP 64-64-10": {"gpubackprop eager": 1000.0, "gpubackprop graphs": 3000.0,
                         "pytorch eager": 1000.0, "pytorch cuda graph": 4000.0},
        "LeNet-5": {"gpubackprop eager": 500.0, "gpubackprop graphs": "ValueError: conv",
                    "pytorch eager": 800.0, "pytorch cuda graph": 900.0},
    },
}


def test_format_graphs_tables():
    md = gpu_graphs.format_graphs(RESULT)
    lines = md.splitlines()
    assert lines[0] == "## CUDA graphs (issue 16)"
    assert "| mlp | yes | yes (batch 2) | 0 |" in lines
    assert "| lstm | NO | yes (batch 2) | 1.5e-07 |" in lines
    assert any(x.startswith("| cnn | not captured: ValueError: cuda_graph: 'on' cannot capture")
               for x in lines)
    assert "| mlp | 0.900 | 0.040 |" in lines
    assert "| cnn | 2.000 | ValueError: no |" in lines
    # graphs / pytorch eager = 3.00×, / pytorch cuda graph = 0.75×
    assert "| MLP 64-64-10 | 1000 | 3000 | 1000 | 4000 | 3.00× | 0.75× |" in lines
    assert "| LeNet-5 | 500 | ValueError: conv | 800 | 900 | - | - |" in lines
    # every table row has its header's number of cells
    for table in md.split("\n\n"):
        rows = [x for x in table.splitlines() if x.startswith("|")]
        assert len({x.count("|") for x in rows}) <= 1, table


def test_registered_in_gpu_check_and_written(tmp_path, monkeypatch):
    gpu_check = pytest.importorskip("bench.gpu_check")
    assert gpu_check.CHECKS["graphs"] is gpu_check.run_graphs
    monkeypatch.setattr(gpu_check, "RESULTS", str(tmp_path))
    base = gpu_check.write({"date": "d", "graphs": RESULT}, "Some GPU")
    md = open(base + ".md").read()
    assert "| graphs | NO | the CUDA graphs section below |" in md
    assert "## CUDA graphs (issue 16)" in md
    assert json.load(open(base + ".json"))["graphs"]["replay_vs_eager"]["mlp"]["resumed_at_batch"] == 2


def test_the_gpu_parts_say_they_need_a_gpu():
    from gpubackprop.backend import has_cupy_gpu

    if has_cupy_gpu():
        pytest.skip("a GPU is here: make gpu-check runs the check itself")
    with pytest.raises(RuntimeError, match=r"device: 'cuda' was requested but no CUDA GPU"):
        gpu_graphs._fit(gpu_graphs._models()["mlp"][0], (784,), "on")
