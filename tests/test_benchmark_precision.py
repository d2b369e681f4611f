"""The mixed-precision benchmark section (gpubackprop.benchmark.precision) on quick sizes: every
workload gets a row per precision with its ratio to our fp32 step, and the L MLP's targets."""

from gpubackprop.benchmark.precision import TARGETS, precision_section, workloads
from gpubackprop.benchmark.timing import Timer


def test_precision_rows_on_quick_sizes():
    timer = Timer(rounds=2, block_s=0.005, warmup_s=0.01, quiesce_s=0)
    rows, checks = precision_section(timer, "cpu", quick=True, with_torch=False, log=lambda s: None)
    names = [w[0] for w in workloads(quick=True)]
    assert len(names) == 4 and any(n.startswith("LeNet") for n in names)
    assert {(r["workload"], r["contender"]) for r in rows} == {
        (n, f"gpubackprop {p}") for n in names for p in ("fp32", "bf16", "fp16")}
    for r in rows:
        assert r["samples_per_s"] > 0
        if r["contender"] == "gpubackprop fp32":
            assert r["x_our_fp32"] == 1.0
    assert [c["target"] for c in checks] == [f"{k} >= {v}" for k, v in TARGETS["L"].items()]
    assert checks[0]["value"] > 0 and checks[1]["value"] is None  # no torch: not measured
