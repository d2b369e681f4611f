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


def test_timer_primes_each_cpu_block_after_its_pause():
    # After the pause before a CPU block, prime_calls untimed calls, then the timed ones: with one
    # timed call a block, each contender's block is two calls in a row.
    calls = []
    cs = [benchmark.Contender(name, lambda n=name: calls.append(n)) for name in "ab"]
    timer = benchmark.Timer(rounds=2, block_s=0.0, warmup_s=0.0, quiesce_s=0.001,
                            max_wait_s=0.001, prime_calls=1)
    timer.run(cs)
    assert calls[-8:] == list("aabb") + list("bbaa")
    assert len(timer.busy) == 4  # one pause a block


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
    from gpubackprop.benchmark.environment import cpu_arch

    arch = cpu_arch()  # the generation: 'AMD EPYC' names several
    assert arch == "unknown" or arch in name
    assert benchmark.machine_type("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"


# ---- networks (issue 15) -------------------------------------------------------------------------
def _plan(key, quick=False):
    return benchmark.network_plan((benchmark.QUICK_NETWORKS if quick else benchmark.NETWORKS)[key])


def _tiny_plan(spec, input_shape=(3, 6, 6), classes=4):
    from gpubackprop.modelspec import plan

    return plan(spec, input_shape, classes)


def test_lenet_step_gemms_by_hand():
    p = _plan("lenet5")
    B = 128
    gemms = benchmark.plan_step_gemms(p, B)
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
    assert benchmark.plan_step_flops(p, B) == B * per_sample


def test_vgg_and_resnet_step_gemms_by_hand():
    B = 64
    vgg = benchmark.plan_step_gemms(_plan("vgg"), B)
    # conv(3->32) at 32x32 (first: no input gradient), conv(32->32) at 32x32, conv(32->64) at 16x16
    # after the first pool; BatchNorm, pooling and gap have no GEMMs; dense(64 -> 10)
    assert vgg == [("conv forward", B, 32, 27, 1024), ("conv weight gradient", 1, 32, B * 1024, 27),
                   ("conv forward", B, 32, 288, 1024), ("conv weight gradient", 1, 32, B * 1024, 288),
                   ("conv input gradient", B, 288, 32, 1024),
                   ("conv forward", B, 64, 288, 256), ("conv weight gradient", 1, 64, B * 256, 288),
                   ("conv input gradient", B, 288, 64, 256),
                   ("dense forward", 1, B, 64, 10), ("dense weight gradient", 1, 10, B, 64),
                   ("dense input gradient", 1, B, 10, 64)]
    res = benchmark.plan_step_gemms(_plan("resnet"), B)
    convs = [g for g in res if g[0] == "conv forward"]
    # the stem, two convs in each residual block and the stride-2 conv (16 -> 32 at 16x16 outputs)
    assert [g[2:] for g in convs] == [(16, 27, 1024)] + [(16, 144, 1024)] * 2 + [(32, 144, 256)] \
        + [(32, 288, 256)] * 2
    assert sum(g[0] == "conv input gradient" for g in res) == 5  # all but the stem's
    assert len(res) == 6 * 2 + 5 + 3


def test_a_first_residual_block_computes_no_input_gradient_for_its_first_layer():
    gemms = benchmark.plan_step_gemms(_tiny_plan("res(conv(3,3,pad=1)-conv(3,3,pad=1))-gap-dense(4)"), 2)
    assert [g[0] for g in gemms if g[0].startswith("conv")] == [
        "conv forward", "conv weight gradient",
        "conv forward", "conv weight gradient", "conv input gradient"]


def test_recurrent_step_gemms_by_hand():
    from gpubackprop.modelspec import plan

    T, F, H, N, C = 3, 2, 5, 4, 6
    gemms = benchmark.plan_step_gemms(plan("gru(5,layers=2)-last-dense(classes)", (T, F), C), N)
    G = 3 * H
    layer0 = [("recurrent input projection", 1, T * N, F, G), ("recurrent hidden", T, N, H, G),
              ("recurrent hidden gradient", T - 1, N, G, H),
              ("recurrent weight gradient", 1, G, T * N, F), ("recurrent weight gradient", 1, G, T * N, H)]
    layer1 = [("recurrent input projection", 1, T * N, H, G), ("recurrent hidden", T, N, H, G),
              ("recurrent hidden gradient", T - 1, N, G, H),
              ("recurrent weight gradient", 1, G, T * N, H), ("recurrent weight gradient", 1, G, T * N, H),
              ("recurrent input gradient", 1, T * N, G, H)]  # into layer 0's outputs
    head = [("dense forward", 1, N, H, C), ("dense weight gradient", 1, C, N, H),
            ("dense input gradient", 1, N, C, H)]
    assert gemms == layer0 + layer1 + head
    lstm = benchmark.plan_step_gemms(plan("lstm(5)-last-dense(classes)", (T, F), C), N)
    assert lstm[1] == ("recurrent hidden", T, N, H, 4 * H)


def test_transformer_step_gemms_by_hand():
    from gpubackprop.modelspec import plan

    T, E, H, F, N, C = 3, 4, 2, 6, 5, 7
    D = E // H
    gemms = benchmark.plan_step_gemms(plan("transformer(2,ff=6,layers=2)-last-dense(classes)",
                                           (T, E), C), N)
    proj = "attention projection"

    def layer(first):
        qkv = [(proj, 1, N * T, E, 3 * E), (f"{proj} weight gradient", 1, 3 * E, N * T, E)]
        if not first:  # a first post-norm layer sends no gradient through its attention
            qkv.append((f"{proj} input gradient", 1, N * T, 3 * E, E))
        heads = [("attention scores", N * H, T, D, T), ("attention values", N * H, T, T, D),
                 ("attention value gradient", N * H, T, T, D),
                 ("attention weight gradient", N * H, T, D, T),
                 ("attention query gradient", N * H, T, T, D),
                 ("attention key gradient", N * H, T, T, D)]
        out_proj = [(proj, 1, N * T, E, E), (f"{proj} weight gradient", 1, E, N * T, E),
                    (f"{proj} input gradient", 1, N * T, E, E)]
        ff = [("dense forward", 1, N * T, E, F), ("dense weight gradient", 1, F, N * T, E),
              ("dense input gradient", 1, N * T, F, E), ("dense forward", 1, N * T, F, E),
              ("dense weight gradient", 1, E, N * T, F), ("dense input gradient", 1, N * T, E, F)]
        return qkv + heads + out_proj + ff

    head = [("dense forward", 1, N, E, C), ("dense weight gradient", 1, C, N, E),
            ("dense input gradient", 1, N, C, E)]
    assert gemms == layer(True) + layer(False) + head
    pre = benchmark.plan_step_gemms(plan("transformer(2,ff=6,prenorm=true)-last-dense(classes)",
                                         (T, E), C), N)
    assert pre[2] == (f"{proj} input gradient", 1, N * T, 3 * E, E)  # norm1's parameters need it


def test_torch_twin_of_an_encoder_is_one_transformer_encoder():
    """A run of equal encoder layers is one nn.TransformerEncoder (gelu, pre-norm, causal: the
    mask passed at each call), with the same forward pass in float64."""
    torch = pytest.importorskip("torch")
    p = _tiny_plan("transformer(2,ff=6,layers=2,dropout=0,gelu=true,prenorm=true,causal=true)-"
                   "last-dense(classes)", input_shape=(5, 4))
    net = benchmark.torch_twin(p).double()
    assert isinstance(net[0], torch.nn.TransformerEncoder) and net[0].num_layers == 2
    assert net[0].layers[0].norm_first and len(net) == 3
    model = benchmark.network_contender(p, 3, "cpu", "fused", dtype="float64").model
    benchmark.load_weights(net, model)
    X = np.random.default_rng(1).standard_normal((3, 5, 4))
    Y, _ = model.forward(model.backend.to_device(X), train=True)
    with torch.no_grad():
        Yt = net(torch.from_numpy(X))
    assert np.abs(np.asarray(Y) - Yt.numpy()).max() < 1e-10
    with pytest.raises(ValueError, match="src_mask has no twin"):
        benchmark.torch_twin(_masked_plan())


def _masked_plan():
    p = _tiny_plan("transformer(2,ff=6)-last-dense(classes)", input_shape=(5, 4))
    kind, kw, ins, outs, tok = p.entries[0]
    p.entries[0] = (kind, {**kw, "src_mask": np.zeros((5, 5))}, ins, outs, tok)
    return p


class _GemmRecorder:
    """Records every GEMM a step calls as single products (m, k, n): through the backend's matmul
    (conv, Winograd, dense, attention; from any thread), the kernel set's own xp.matmul, the
    fused CPU recurrent kernels' np.dot calls and the fused Winograd halves' gemm and tile_gemm
    calls (their Numba loops run as Python, the same code)."""

    _NUMBA = [f"_{m}_{d}_{how}" for m in ("rnn", "lstm", "gru") for d in ("forward", "backward")
              for how in ("rows", "parallel")] + ["_rows_gemm_parallel", "_weight_gemm_parallel",
                                                 "_lstm_forward_xh_rows", "_lstm_forward_xh_parallel"]

    def __init__(self, monkeypatch, be):
        from gpubackprop.kernels.cpu import recurrent

        self.calls = []
        rec = self

        class Xp:  # numpy, recording matmul and dot
            def __getattr__(self, name):
                return getattr(np, name)

            def matmul(self, a, b, out=None, **kw):
                rec._add(a, b)
                return np.matmul(a, b, out=out, **kw)

            def dot(self, a, b, out=None):
                rec._add(a, b)
                return np.dot(a, b, out)

        matmul = be.matmul

        def be_matmul(a, b, **kw):
            self._add(a, b)
            return matmul(a, b, **kw)
        monkeypatch.setattr(be, "matmul", be_matmul)
        monkeypatch.setattr(be.ops, "xp", Xp())
        monkeypatch.setattr(recurrent, "np", Xp())
        for name in self._NUMBA:
            monkeypatch.setattr(recurrent, name, getattr(recurrent, name).py_func)
        # the fused CPU set's Winograd halves: their Numba loops as Python, their GEMMs recorded
        from gpubackprop.kernels.cpu import winograd

        for name in ("_forward_half", "_backward_half"):
            monkeypatch.setattr(winograd, name, getattr(winograd, name).py_func)

        def gemm(a, b, out):
            rec._add(a, b)
            np.matmul(a, b, out=out)
        monkeypatch.setattr(winograd, "gemm", gemm)

        class TileGemm:  # kernels/cpu/tile_gemm.py's products (few channels), recorded
            @staticmethod
            def nn(A, B, bo, out, oo, P):
                rec.calls.append((A.shape[0], A.shape[1], int(P)))
                return tile_gemm.nn(A, B, bo, out, oo, P)

            @staticmethod
            def nt(A, ao, B, bo, P, out):
                rec.calls.append((out.shape[0], int(P), out.shape[1]))
                return tile_gemm.nt(A, ao, B, bo, P, out)
        from gpubackprop.kernels.cpu import tile_gemm

        monkeypatch.setattr(winograd, "tile_gemm", TileGemm)

    def _add(self, a, b):
        lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        self.calls += [(a.shape[-2], a.shape[-1], b.shape[-1])] * int(np.prod(lead, dtype=int))


def _single_products(gemms):
    """The plan's GEMMs as single products (m, k, n), sorted."""
    return sorted(g for _, count, m, k, n in gemms for g in [(m, k, n)] * count)


def _assert_plan_is_the_step(c, p, batch, monkeypatch):
    be = c.model.backend
    c.step()
    with monkeypatch.context() as mp:
        rec = _GemmRecorder(mp, be)
        c.step()
    gemms = benchmark.plan_step_gemms(p, batch, c.model)
    assert sorted(rec.calls) == _single_products(gemms)
    assert benchmark.plan_step_flops(p, batch, c.model) == sum(2 * m * k * n for m, k, n in rec.calls)
    return gemms


@pytest.mark.parametrize("kernels", ["reference", "fused"])
@pytest.mark.parametrize("key", sorted(benchmark.QUICK_NETWORKS))
def test_plan_gemms_are_the_gemms_a_step_performs(key, kernels, monkeypatch):
    """The GEMMs a real step calls (recorded, every one as its single products) are the plan's for
    that model, and the model-less plan has the same FLOPs where no layer takes Winograd or a
    direct convolution (im2col and the row chunks do the nominal multiplications)."""
    net = benchmark.QUICK_NETWORKS[key]
    p = benchmark.network_plan(net)
    c = benchmark.network_contender(p, net.batch, "cpu", kernels)
    _assert_plan_is_the_step(c, p, net.batch, monkeypatch)
    paths = {benchmark.conv_path(layer, net.batch)[0] for _, layer in c.model.leaves()
             if type(layer).__name__ == "Conv2d"}
    if not paths & {"winograd", "direct"}:
        assert benchmark.plan_step_flops(p, net.batch, c.model) == benchmark.plan_step_flops(p, net.batch)


@pytest.mark.parametrize("winograd", ["auto", True])
def test_plan_follows_winograd_layers_in_their_halves(winograd, monkeypatch):
    """16->16 3x3 on 32x32 (the fused set's "auto" takes Winograd there), batch 4: chunks of two
    samples, run in two halves; the plan's 16 GEMMs a chunk are those the step calls, fewer FLOPs
    than the nominal, and the halves are one region of two lanes where the set runs two threads."""
    from gpubackprop.modelspec import plan

    p = plan("conv(16,3,pad=1)-relu-conv(16,3,pad=1)-gap-dense(classes)", (3, 32, 32), 4)
    c = benchmark.network_contender(p, 4, "cpu", "fused")
    conv = c.model.layers[1]
    monkeypatch.setattr(conv, "winograd", winograd)
    path, chunks = benchmark.conv_path(conv, 4)
    assert path == "winograd" and len(chunks) >= 2
    gemms = _assert_plan_is_the_step(c, p, 4, monkeypatch)
    T = 16 * 16  # 2x2 tiles of a 32x32 output
    n = chunks[0][1]
    assert ("winograd forward", 16, 16, 16, n * T) in gemms
    assert ("winograd weight gradient", 16, 16, n * T, 16) in gemms
    assert ("winograd input gradient", 16, 16, 16, n * T) in gemms
    assert benchmark.plan_step_flops(p, 4, c.model) < benchmark.plan_step_flops(p, 4)
    regions = benchmark.plan_step_schedule(p, 4, c.model)
    halves = [r for r in regions if r.how == "halves"]
    assert len(halves) == (1 if c.model.backend.ops.nchunks >= 2 else 0)
    gc = benchmark.gemm_limit_contender(regions, 4)
    gc.step()
    split = benchmark.step_time_split(c, steps=2)
    assert split["winograd transforms"] > 0  # the filter transforms, on every set
    # the fused CPU set's halves in one call each (transforms and GEMMs), else the ops apart
    assert split["winograd chunks"] > 0 and "winograd GEMM" not in split


def test_plan_runs_im2col_layers_in_their_kernel_sets_gemm_threads(monkeypatch):
    """A stride-2 conv runs im2col + GEMM: its region carries the kernel set's conv_gemm_threads
    (one BLAS thread in the fused set), and the GEMMs-only contender runs it inside that context."""
    from gpubackprop.modelspec import plan

    p = plan("conv(8,3,stride=2,pad=1)-relu-gap-dense(classes)", (3, 16, 16), 4)
    c = benchmark.network_contender(p, 4, "cpu", "fused")
    ops = c.model.backend.ops
    assert benchmark.conv_path(c.model.layers[0], 4)[0] in ("im2col", "batch-inner")
    regions = benchmark.plan_step_schedule(p, 4, c.model)
    conv = [r for r in regions if r.threads is not None]
    assert len(conv) == 1 and conv[0].threads == ops.conv_gemm_threads
    entered = []
    real = type(ops).conv_gemm_threads

    def counted(self):
        entered.append(1)
        return real(self)
    monkeypatch.setattr(type(ops), "conv_gemm_threads", counted)
    regions = benchmark.plan_step_schedule(p, 4, c.model)
    benchmark.gemm_limit_contender(regions, 4).step()
    assert entered == [1]


@pytest.mark.parametrize("spec", ["lstm(8)-last-dense(classes)",
                                  "gru(8,layers=2,bidir=true)-last-dense(classes)"])
def test_plan_follows_the_recurrent_row_chunks(spec, monkeypatch):
    """With three row chunks (a batch of 48, 16+ rows a chunk), every recurrent GEMM of the step is
    a chunk's (recorded from the kernels' own loops), as the plan's lanes say."""
    from gpubackprop.modelspec import plan

    p = plan(spec, (5, 4), 3)
    c = benchmark.network_contender(p, 48, "cpu", "fused")
    monkeypatch.setattr(c.model.backend.ops, "nchunks", 3)
    assert c.model.backend.ops.row_chunks("steps", 48) == 3
    gemms = _assert_plan_is_the_step(c, p, 48, monkeypatch)
    # the fused set's LSTM step GEMM is on [x_t, h_prev] (4 + 8 columns), the GRU's on h_prev
    k = 12 if spec.startswith("lstm") else 8
    assert ("recurrent hidden", 5, 16, k, gemms[1][4]) in gemms
    regions = benchmark.plan_step_schedule(p, 48, c.model)
    chunked = [r for r in regions if r.how == "row chunks"]
    assert chunked and all(len(r.lanes) == 3 for r in chunked)
    assert benchmark.plan_step_flops(p, 48, c.model) == benchmark.plan_step_flops(p, 48)
    benchmark.gemm_limit_contender(regions, 48).step()


@pytest.mark.parametrize("library", ["gpubackprop", "pytorch"])
def test_gemm_limit_contender_runs_every_layout(library):
    if library == "pytorch":
        pytest.importorskip("torch")
    for key, net in benchmark.QUICK_NETWORKS.items():
        p = benchmark.network_plan(net)
        gemms = benchmark.plan_step_gemms(p, net.batch)
        c = benchmark.gemm_limit_contender(gemms, net.batch, "cpu", library)
        c.step()  # shapes agree (matmul with out= checks them)
        assert {g[0] for g in gemms} <= set(benchmark.LAYOUTS), key
        model = benchmark.network_contender(p, net.batch, "cpu", "fused").model
        regions = benchmark.plan_step_schedule(p, net.batch, model)
        benchmark.gemm_limit_contender(regions, net.batch, "cpu", library).step()
        assert {g[0] for r in regions for lane in r.lanes for g in lane} <= set(benchmark.LAYOUTS)


@pytest.mark.parametrize("key", sorted(benchmark.NETWORKS))
def test_torch_twin_is_the_same_network(key):
    """Same parameter count and, with the same weights, the same forward pass in float64: in
    training mode (batch statistics) and, after it, in eval mode (the running statistics)."""
    torch = pytest.importorskip("torch")
    p = _plan(key)
    if "dropout=" in p.spec:  # the same network, compared without its dropout's random masks
        from gpubackprop.modelspec import plan

        assert isinstance(benchmark.torch_twin(p)[0], torch.nn.TransformerEncoder)
        assert benchmark.torch_twin(p)[0].layers[0].dropout.p == 0.1
        p = plan(p.spec.replace("dropout=0.1", "dropout=0"), p.input_shape, p.output_shape[0])
    net = benchmark.torch_twin(p).double()
    model = benchmark.network_contender(p, 3, "cpu", "fused", dtype="float64").model
    assert model.n_params == sum(t.numel() for t in net.parameters())
    if key == "lenet5":
        assert model.n_params == 61706  # LeNet-5's parameter count
    benchmark.load_weights(net, model)
    X = np.random.default_rng(1).standard_normal((3, *p.input_shape))
    Y, _ = model.forward(model.backend.to_device(X), train=True)
    net.train()
    with torch.no_grad():
        Yt = net(torch.from_numpy(X))
    assert np.abs(np.asarray(Y) - Yt.numpy()).max() < 1e-10
    Y, _ = model.forward(model.backend.to_device(X), train=False)
    net.eval()
    with torch.no_grad():
        Yt = net(torch.from_numpy(X))
    assert np.abs(np.asarray(Y) - Yt.numpy()).max() < 1e-10


def test_torch_twin_builds_every_kind_it_names():
    torch = pytest.importorskip("torch")
    p = _tiny_plan("conv(4,3,pad=1,bias=false)-tanh-avgpool(2)-ln-dropout(0.1)-flatten-res(dense(36)-gelu)-"
                   "sigmoid-dense(classes)")
    net = benchmark.torch_twin(p)
    assert net(torch.zeros(2, 3, 6, 6)).shape == (2, 4)
    model = benchmark.network_contender(p, 2).model
    assert model.n_params == sum(t.numel() for t in net.parameters())
    benchmark.load_weights(net, model)


def test_torch_twin_gelu_is_exact_and_gelu_tanh_the_approximation():
    torch = pytest.importorskip("torch")
    p = _tiny_plan("dense(16)-gelu-dense(16)-gelu_tanh-dense(classes)", input_shape=(5,))
    net = benchmark.torch_twin(p).double()
    assert [m.approximate for m in net if isinstance(m, torch.nn.GELU)] == ["none", "tanh"]
    model = benchmark.network_contender(p, 3, "cpu", "fused", dtype="float64").model
    benchmark.load_weights(net, model)
    X = np.random.default_rng(1).standard_normal((3, 5)) * 4
    Y, _ = model.forward(model.backend.to_device(X), train=False)
    with torch.no_grad():
        Yt = net(torch.from_numpy(X))
    assert np.abs(np.asarray(Y) - Yt.numpy()).max() < 1e-10


@pytest.mark.parametrize("key", ["lenet5", "resnet", "gru", "transformer"])
def test_step_time_split_clocks_every_layer_kind(key):
    net = benchmark.QUICK_NETWORKS[key]
    c = benchmark.network_contender(benchmark.network_plan(net), net.batch, "cpu", "fused")
    be = c.model.backend
    ops = be.ops
    split = benchmark.step_time_split(c, steps=2)
    assert list(split) == benchmark.categories_of(c.model) and list(split)[-1] == "rest"
    assert set(split) <= set(benchmark.SPLIT_CATEGORIES)
    # the conv layers' categories follow the path each takes on this kernel set
    conv = {"conv other"}
    for _, layer in c.model.leaves():
        if type(layer).__name__ == "Conv2d":
            conv |= {"winograd": {"winograd transforms", "winograd chunks"}, "direct": {"conv direct"},
                     "pointwise": {"conv GEMM"}}.get(benchmark.conv_path(layer, net.batch)[0],
                                                     {"im2col", "conv GEMM", "col2im"})
    expected = {"lenet5": conv | {"pooling", "dense"},
                "resnet": conv | {"batch norm", "activation", "pooling", "residual add", "dense"},
                "gru": {"recurrent GEMM", "recurrent time loop", "recurrent other", "dense"},
                "transformer": {"layer norm", "residual add", "attention GEMM", "softmax",
                                "attention other", "dense", "dropout"}}[key]
    assert set(split) == expected | {"rest"}
    assert all(split[k] > 0 for k in expected) and split["rest"] >= 0
    # restored: the kernel set, the array module and every layer's own forward
    assert be.ops is ops and type(be.xp).__name__ != "_TimedOps"
    assert all("forward" not in vars(layer) for _, layer in c.model.leaves())
    c.step()


def test_quick_network_sections_with_and_without_torch(monkeypatch):
    args = benchmark.build_parser().parse_args(["--quick", "--device", "cpu", "--sections",
                                                "vgg,resnet,gru"])
    results = benchmark.run(args, log=lambda *a: None)
    assert results["sections"] == ["vgg", "resnet", "gru"]
    md = results["markdown"]
    for key in ("vgg", "resnet", "gru"):
        r = results[key]
        names = {row["contender"] for row in r["rows"]}
        assert {"gpubackprop reference", "gpubackprop fused", "GEMMs only", "pytorch"} <= names
        fused = next(row for row in r["rows"] if row["contender"] == "gpubackprop fused")
        assert fused["samples_per_s"] > 0 and fused["peak_fraction"] > 0 and fused["gemm_fraction"] > 0
        if benchmark.torch_module() is not None:
            assert fused["ratio_to_pytorch"] > 0
        assert [s["contender"] for s in r["split"]] == ["gpubackprop reference", "gpubackprop fused"]
        assert f"## {r['title']}" in md
    assert "(≥ 1.0)" in md and "(≥ 1.3)" in md and "(≥ 1.5)" in md and "(≥ 0.7)" in md
    assert "batch norm" in md and "residual add" in md and "recurrent time loop" in md
    assert "VGG-style BatchNorm net: fused × PyTorch" in md or benchmark.torch_module() is None
    monkeypatch.setattr(benchmark.contenders, "torch_module", lambda: None)
    args = benchmark.build_parser().parse_args(["--quick", "--device", "cpu", "--sections", "gru"])
    results = benchmark.run(args, log=lambda *a: None)
    rows = [row for row in results["gru"]["rows"] if row["library"] == "pytorch"]
    assert rows and all(row["note"] == "not installed" and row["samples_per_s"] is None
                        for row in rows)
    assert "not installed" in results["markdown"]


def test_a_partial_run_writes_files_named_by_its_sections(tmp_path):
    code = benchmark.main(["--quick", "--device", "cpu", "--sections", "lstm", "--no-torch",
                           "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    stem = f"{benchmark.machine_type()}-lstm"
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert "## LSTM" in (tmp_path / f"{stem}.md").read_text()


def test_network_target_checks_read_the_fused_cpu_rows():
    def section(title, ratio, frac):
        return {"title": title, "rows": [
            {"device": "cpu", "contender": "gpubackprop fused", "ratio_to_pytorch": ratio,
             "gemm_fraction": frac},
            {"device": "cpu", "contender": "gpubackprop reference", "ratio_to_pytorch": 9.0,
             "gemm_fraction": 9.0}]}
    results = {"lenet5": section("LeNet-5", 1.6, 0.5), "resnet": section("resnet", 1.2, 0.8),
               "gru": section("GRU", 1.5, 0.1)}
    checks = {what: (measured, target, met) for what, measured, target, met
              in bench_report.target_checks(results)}
    assert checks == {"LeNet-5: fused × PyTorch": (1.6, 1.5, True),
                      "LeNet-5: fraction of the GEMM limit": (0.5, 0.7, False),
                      "resnet: fused × PyTorch": (1.2, 1.3, False),
                      "resnet: fraction of the GEMM limit": (0.8, 0.7, True),
                      "GRU: fused × PyTorch": (1.5, 1.5, True)}  # no GEMM-limit target for the GRU


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_step_time_split_of_vgg_bn_relu(kernels):
    """VGG's bn-relu is one BatchNorm2d(activation="relu"): on the fused CPU set the ReLU is inside
    the batch norm passes (no "activation" category); on the reference set the layer composes the
    activation ops, clocked as "activation"."""
    net = benchmark.QUICK_NETWORKS["vgg"]
    c = benchmark.network_contender(benchmark.network_plan(net), net.batch, "cpu", kernels)
    kinds = [type(layer).__name__ for _, layer in c.model.leaves()]
    assert "Activation" not in kinds and kinds.count("BatchNorm2d") == 3
    split = benchmark.step_time_split(c, steps=2)
    assert ("activation" in split) == (kernels == "reference")
    assert split["batch norm"] > 0 and split.get("activation", 1) > 0
