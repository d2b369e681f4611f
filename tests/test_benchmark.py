"""The benchmark runs on tiny sizes and counts FLOPs and bytes right; no test asserts a time."""

import json

import numpy as np
import pytest

from gpubackprop import bench_report, benchmark
from gpubackprop.benchmark import SHAPES, op_bytes, step_flops, step_gemms


def test_step_flops_by_hand():
    # T = 64-64-10 at batch 32: 6·32·(64·64 + 64·10)
    assert step_flops((64, 64, 10), 32) == 6 * 32 * (4096 + 640) == 909312
    assert step_flops((784, 1024, 1024, 10), 256) == 6 * 256 * (784 * 1024 + 1024 * 1024 + 10240)
    assert step_flops((3, 2), 1) == 36


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_step_gemms_add_up_to_step_flops(key):
    sizes, batch = SHAPES[key]
    gemms = step_gemms(sizes, batch)
    assert len(gemms) == 3 * (len(sizes) - 1)
    assert sum(benchmark.gemm_flops(*g) for g in gemms) == step_flops(sizes, batch)


def test_step_gemms_are_the_shapes_numpy_sees():
    sizes, batch = (5, 4, 3), 2
    rng = np.random.default_rng(0)
    for (m, k, n), (a, b) in zip(step_gemms(sizes, batch),
                                 [((2, 5), (5, 4)), ((4, 2), (2, 5)), ((2, 4), (4, 5)),
                                  ((2, 4), (4, 3)), ((3, 2), (2, 4)), ((2, 3), (3, 4))],
                                 strict=True):
        assert (m, k) == a and (k, n) == b
        assert (rng.random(a) @ rng.random(b)).shape == (m, n)


def test_op_bytes_by_hand():
    R, C = 256, 1024
    n = R * C
    assert op_bytes("act_backward", (R, C)) == 3 * n * 4
    assert op_bytes("bias_act", (R, C)) == (2 * n + C) * 4
    assert op_bytes("softmax_ce", (R, C)) == (2 * n + R) * 4 + R * 8
    assert op_bytes("sgd", (R, C)) == 5 * n * 4
    assert op_bytes("bias_grad", (R, C)) == (n + C) * 4
    assert op_bytes("copy", (R, C)) == 2 * n * 4
    assert op_bytes("sgd", (2, 3), itemsize=8) == 5 * 6 * 8
    with pytest.raises(ValueError, match="op: expected one of"):
        op_bytes("gemm", (2, 2))


@pytest.mark.parametrize("op", benchmark.OP_NAMES + ("copy",))
def test_op_bytes_match_the_arrays_an_op_touches(op):
    """The byte count equals the sizes of the arrays the op reads and writes in the benchmark."""
    from gpubackprop.kernels.reference import ReferenceOps

    shape = (6, 10)
    ops = ReferenceOps(np)
    call = benchmark.op_contenders(ops, op, shape, np)
    args = [a for a in call.args if isinstance(a, np.ndarray)]
    distinct = {id(a): a for a in args}.values()
    if op == "bias_act":  # Z read and written in place, b read
        expected = 2 * args[0].nbytes + args[1].nbytes
    elif op == "sgd":  # p, buf read and written; g read; scale (1 element) not counted
        p, g, buf, _scale = args
        expected = 2 * p.nbytes + g.nbytes + 2 * buf.nbytes
    else:  # every other op reads or writes each of its arrays once
        expected = sum(a.nbytes for a in distinct)
    assert op_bytes(op, shape) == expected
    call()  # and it runs


def test_timer_runs_interleaved_and_counts_rounds():
    calls = []
    cs = [benchmark.Contender(name, lambda n=name: calls.append(n)) for name in "abc"]
    times = benchmark.Timer(rounds=3, block_s=0.0, warmup_s=0.0, quiesce_s=0.0).run(cs)
    assert set(times) == {"a", "b", "c"}
    assert all(len(t) == 3 and all(x >= 0 for x in t) for t in times.values())
    timed = calls[-9:]  # one call a block after warm-up, rotating order
    assert timed == list("abc") + list("bca") + list("cab")


def test_ratio_median():
    # num twice as fast as den in every round: ratio 2
    assert benchmark.ratio_median([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == 2.0


def test_quick_run_writes_json_markdown_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = benchmark.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "q"])
    assert code == 0
    data = json.loads((tmp_path / "q.json").read_text())
    md = (tmp_path / "q.md").read_text()
    assert (tmp_path / "q.png").stat().st_size > 0
    assert data["quick"] is True
    names = {r["contender"] for r in data["throughput"]}
    # PyTorch is optional: its rows are there either way, timed or saying "not installed".
    assert {"gpubackprop reference", "gpubackprop fused", "GEMMs only", "pytorch"} <= names
    for r in data["throughput"]:
        if r["samples_per_s"] is not None:
            sizes, batch = benchmark.QUICK_SHAPES[r["shape"]]
            assert r["step_flops"] == step_flops(sizes, batch)
            assert r["samples_per_s"] > 0
    assert {r["op"] for r in data["ops"]} == set(benchmark.OP_NAMES) | {"copy"}
    assert {r["axis"] for r in data["scaling"]} == {"batch", "width"}
    assert all(r["growth_bytes"] is not None for r in data["memory"])
    assert data["lenet5"]["rows"] and data["lenet5"]["split"]
    for heading in ("Training step throughput", "LeNet-5", "GEMM rates", "Elementwise ops",
                    "Scaling", "Memory", "Targets"):
        assert heading in md
    assert "Quick mode" in md


def test_without_torch_the_rows_say_not_installed(monkeypatch):
    monkeypatch.setattr(benchmark.contenders, "torch_module", lambda: None)
    args = benchmark.build_parser().parse_args(["--quick", "--device", "cpu", "--sections",
                                                "throughput", "--shapes", "T", "--no-sklearn"])
    results = benchmark.run(args, log=lambda *a: None)
    rows = [r for r in results["throughput"] if r["library"] == "pytorch"]
    assert rows and all(r["note"] == "not installed" and r["samples_per_s"] is None for r in rows)
    assert "not installed" in results["markdown"]


def test_memory_section_reports_no_growth_for_a_step():
    rows = benchmark.memory_section(["cpu"], {"T": benchmark.QUICK_SHAPES["T"]}, growth_steps=50,
                                    growth_shapes=("T",), log=lambda *a: None)
    assert {r["contender"] for r in rows} == {"gpubackprop reference", "gpubackprop fused"}
    for r in rows:
        assert r["growth_bytes"] == 0
        assert r["step_peak_bytes"] >= 0


def test_bad_arguments_exit_2(capsys):
    assert benchmark.main(["--quick", "--sections", "nope"]) == 2
    assert "sections: expected a subset" in capsys.readouterr().err
    assert benchmark.main(["--quick", "--shapes", "X"]) == 2


def test_target_checks_read_the_rows():
    results = {"throughput": [
        {"device": "cpu", "contender": "gpubackprop fused", "shape": "L", "ratio_to_pytorch": 1.3,
         "gemm_fraction": 0.8},
        {"device": "cpu", "contender": "gpubackprop fused", "shape": "T", "ratio_to_pytorch": 4.0,
         "gemm_fraction": 0.1}],
        "ops": [{"device": "cpu", "kernels": "fused", "shape": [256, 1024], "op": "sgd",
                 "fused_over_reference": 2.5}]}
    checks = {what: met for what, _, _, met in bench_report.target_checks(results)}
    assert checks == {"L: fused × PyTorch": True, "L: fraction of the GEMM limit": False,
                      "T: fused × PyTorch": False, "sgd 256×1024: fused × reference": True}


def test_machine_type_is_a_file_name():
    name = benchmark.machine_type()
    assert name.startswith("cpu-") and "/" not in name and " " not in name
    assert benchmark.machine_type("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"


# ---- LeNet-5 ----------------------------------------------------------------------------------
def test_lenet_step_flops_by_hand():
    p = benchmark.lenet_plan()
    B = 128
    gemms = benchmark.cnn_step_gemms(p, B)
    # conv1 6x(1·5·5) on 28x28: forward and weight gradient only (first layer: no input gradient)
    assert gemms[:2] == [("conv forward", B, 6, 25, 784), ("conv weight gradient", 1, 6, B * 784, 25)]
    # conv2 16x(6·5·5) on 10x10 outputs: all three
    assert gemms[2:5] == [("conv forward", B, 16, 150, 100),
                          ("conv weight gradient", 1, 16, B * 100, 150),
                          ("conv input gradient", B, 150, 16, 100)]
    assert [g[0] for g in gemms[5:]] == ["dense forward", "dense weight gradient",
                                         "dense input gradient"] * 3
    per_sample = 2 * (2 * 6 * 25 * 784) + 3 * (2 * 16 * 150 * 100) + 6 * (400 * 120 + 120 * 84 + 84 * 10)
    assert per_sample == 2_263_920
    assert benchmark.cnn_step_flops(p, B) == B * per_sample


def test_cnn_gemm_contender_runs_the_layers_shapes():
    p = benchmark.lenet_plan((1, 12, 12), 10)
    c = benchmark.cnn_gemm_contender(p, 3)
    c.step()  # shapes agree (matmul with out= checks them)


def test_torch_lenet_matches_the_plan():
    pytest.importorskip("torch")
    p = benchmark.lenet_plan()
    net = benchmark.torch_cnn(p)
    import torch

    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    n_torch = sum(t.numel() for t in net.parameters())
    c = benchmark.cnn_contender(p, 2, "cpu", "reference")
    assert c.model.n_params == n_torch == 61706  # LeNet-5's parameter count
    pc = benchmark.cnn_gemm_contender(p, 2, "cpu", "pytorch")
    pc.step()


def test_conv_time_split_clocks_conv_and_pooling_calls():
    p = benchmark.lenet_plan((1, 12, 12), 10)
    c = benchmark.cnn_contender(p, 4, "cpu", "fused")
    split = benchmark.conv_time_split(c, steps=2)
    assert tuple(split) == benchmark.SPLIT_CATEGORIES
    assert all(v > 0 for v in split.values())
    assert type(c.model.backend.ops).__name__ != "_TimedOps"  # restored
    c.step()


def test_quick_lenet_section_with_and_without_torch(monkeypatch):
    args = benchmark.build_parser().parse_args(["--quick", "--device", "cpu", "--sections",
                                                "lenet5"])
    results = benchmark.run(args, log=lambda *a: None)
    r = results["lenet5"]
    names = {row["contender"] for row in r["rows"]}
    assert {"gpubackprop reference", "gpubackprop fused", "GEMMs only", "pytorch"} <= names
    fused = next(row for row in r["rows"] if row["contender"] == "gpubackprop fused")
    assert fused["samples_per_s"] > 0 and fused["peak_fraction"] > 0
    assert fused["gemm_fraction"] > 0
    if benchmark.torch_module() is not None:
        assert fused["ratio_to_pytorch"] > 0
    assert [s["contender"] for s in r["split"]] == ["gpubackprop reference", "gpubackprop fused"]
    md = results["markdown"]
    assert "## LeNet-5" in md and "Conv layers' time split" in md and "im2col" in md
    monkeypatch.setattr(benchmark.contenders, "torch_module", lambda: None)
    results = benchmark.run(args, log=lambda *a: None)
    rows = [row for row in results["lenet5"]["rows"] if row["library"] == "pytorch"]
    assert rows and all(row["note"] == "not installed" and row["samples_per_s"] is None
                        for row in rows)


def test_lstm_step_flops_count_every_gemm():
    from gpubackprop.benchmark import lstm_step_flops

    T, F, H, B, C = 3, 2, 5, 4, 6
    proj, rec, head = 2 * B * T * F * 4 * H, 2 * B * (T - 1) * H * 4 * H, 2 * B * H * C
    # forward, weight gradients and input gradients, without the gradient of X itself
    assert lstm_step_flops(T, F, H, B, C) == 3 * proj + 3 * rec + 3 * head - proj


def test_lstm_section_quick_without_torch():
    from gpubackprop.benchmark import QUICK_LSTM_SHAPE, Timer, lstm_section

    r = lstm_section(Timer(rounds=2, block_s=0.005, warmup_s=0.01, quiesce_s=0.0), ["cpu"],
                     QUICK_LSTM_SHAPE, with_torch=False, log=lambda *a: None)
    names = [row["contender"] for row in r["rows"]]
    assert names == ["gpubackprop reference", "gpubackprop fused", "pytorch"]
    assert r["rows"][1]["samples_per_s"] > 0 and r["rows"][2]["note"] == "not installed"
