"""The recurrent cell ops: the reference against plain per-unit loops, the fused CPU set against
the reference (float32 and float64, ragged sizes), and their argument checks."""

import numpy as np
import pytest
import recurrent_cases as rc

from gpubackprop.kernels.cpu import CpuOps
from gpubackprop.kernels.reference import ReferenceOps

SIZES = [(1, 1), (3, 5), (7, 13), (2, 33)]


@pytest.fixture(scope="module")
def ref():
    return ReferenceOps(np)


@pytest.fixture(scope="module")
def cpu():
    return CpuOps(np)


def _cases():
    for op in rc.OPS:
        for act in (("tanh", "relu") if op.startswith("rnn") else ("tanh",)):
            yield pytest.param(op, act, id=f"{op}-{act}" if op.startswith("rnn") else op)


@pytest.mark.parametrize("op,activation", list(_cases()))
def test_reference_matches_the_equations(ref, rng, op, activation):
    for N, H in SIZES[:3]:
        a = rc.random_args(rng, op, N, H, "float64")
        expected = rc.naive(op, a, activation)
        rc.call(ref, op, a, activation)
        for name, want in expected.items():
            np.testing.assert_allclose(a[name], want, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{op} {name} ({N}x{H})")


@pytest.mark.parametrize("dtype", rc.DTYPES)
@pytest.mark.parametrize("op,activation", list(_cases()))
def test_fused_cpu_matches_reference(cpu, ref, rng, op, activation, dtype):
    for N, H in SIZES:
        rc.check_against_reference(cpu, ref, np.ascontiguousarray, rng, op, N, H, dtype,
                                   activation)


@pytest.mark.parametrize("ops_name", ["reference", "cpu"])
def test_cell_argument_errors(ref, cpu, rng, ops_name):
    ops = ref if ops_name == "reference" else cpu
    a = rc.random_args(rng, "lstm_cell", 3, 4, "float64")
    bad = dict(a, c=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"c: expected shape \(3, 4\) .*got shape \(3, 5\)"):
        rc.call(ops, "lstm_cell", bad)
    bad = dict(a, gates=np.zeros((3, 12)))
    with pytest.raises(ValueError, match=r"gates: expected shape \(3, 16\) \(batch 3, 4 x hidden"):
        rc.call(ops, "lstm_cell", bad)
    bad = dict(a, b_hh=np.zeros(4))
    with pytest.raises(ValueError, match=r"b_hh: expected shape \(16,\)"):
        rc.call(ops, "lstm_cell", bad)
    g = rc.random_args(rng, "rnn_cell", 2, 3, "float64")
    with pytest.raises(ValueError, match="nonlinearity: expected one of"):
        rc.call(ops, "rnn_cell", g, "sigmoid")


def test_fused_cpu_checks_dtype_and_contiguity(cpu, rng):
    a = rc.random_args(rng, "gru_cell", 3, 4, "float64")
    with pytest.raises(TypeError, match="h: expected dtype float64"):
        rc.call(cpu, "gru_cell", dict(a, h=a["h"].astype(np.float32)))
    with pytest.raises(ValueError, match="gx: expected a C-contiguous array"):
        rc.call(cpu, "gru_cell", dict(a, gx=np.asfortranarray(a["gx"])))


# ---- the time-loop ops -----------------------------------------------------------------------------
def _steps_cases():
    for op in rc.STEPS_OPS:
        for act in (("tanh", "relu") if op.startswith("rnn") else ("tanh",)):
            yield pytest.param(op, act, id=f"{op}-{act}" if op.startswith("rnn") else op)


def _cell_loop(op, a, activation, reverse, state_grad):
    """The time-loop op written out: np.matmul per step and the cell from ``rc.naive``'s per-unit
    equations, in float64."""
    a = {k: v.astype(np.float64).copy() for k, v in a.items()}
    T = a["hs" if "hs" in a else "cs"].shape[0] - 1
    order = [(t, t, t + 1) for t in range(T)]
    if reverse:
        order = [(t, t + 1, t) for t in reversed(range(T))]
    mode = op.split("_")[0]
    if "forward" in op:
        keep = (a.get("gates", a.get("saved")).shape[0] == T) if mode != "rnn" else True
        for t, p, c in order:
            gh = a["hs"][p] @ a["W_hh"].T
            cell = {"gx": a["gx"][t], "gh": gh, "b_hh": a["b_hh"]}
            if mode == "rnn":
                a["hs"][c] = rc.naive("rnn_cell", dict(cell, h=a["hs"][c]), activation)["h"]
            elif mode == "lstm":
                out = rc.naive("lstm_cell", dict(cell, c_prev=a["cs"][p], h=a["hs"][c],
                                                 c=a["cs"][c], gates=a["gates"][0]))
                a["hs"][c], a["cs"][c] = out["h"], out["c"]
                a["gates"][t if keep else 0] = out["gates"]
            else:
                out = rc.naive("gru_cell", dict(cell, h_prev=a["hs"][p], h=a["hs"][c],
                                                saved=a["saved"][0]))
                a["hs"][c] = out["h"]
                a["saved"][t if keep else 0] = out["saved"]
        return a
    for i, (t, p, c) in enumerate(order[::-1]):
        if mode == "rnn":
            out = rc.naive("rnn_cell_backward", {"dh_out": a["dout"][t], "dh_rec": a["dh"],
                                                 "h": a["hs"][c], "dpre": a["dpre"][t]}, activation)
            a["dpre"][t] = out["dpre"]
            dG = a["dpre"][t]
        elif mode == "lstm":
            out = rc.naive("lstm_cell_backward", {
                "dh_out": a["dout"][t], "dh_rec": a["dh"], "dc": a["dc"], "c_prev": a["cs"][p],
                "c": a["cs"][c], "gates": a["gates"][t], "dgates": a["dgates"][t]})
            a["dc"], a["dgates"][t] = out["dc"], out["dgates"]
            dG = a["dgates"][t]
        else:
            out = rc.naive("gru_cell_backward", {
                "dh_out": a["dout"][t], "dh_rec": a["dh"], "dh": a["carry"], "h_prev": a["hs"][p],
                "saved": a["saved"][t], "dgx": a["dgx"][t], "dgh": a["dgh"][t]})
            a["carry"], a["dgx"][t], a["dgh"][t] = out["dh"], out["dgx"], out["dgh"]
            dG = a["dgh"][t]
        if i < T - 1 or state_grad:
            a["dh"] = dG @ a["W_hh"]
    if mode == "gru" and state_grad:
        a["dh"] = a["dh"] + a["carry"]
    return a


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("op,activation", list(_steps_cases()))
def test_reference_steps_match_the_cell_equations(ref, rng, op, activation, reverse):
    backward = "backward" in op
    for T, N, H in [(1, 2, 3), (4, 3, 5)]:
        for state_grad, keep in ([(True, None), (False, None)] if backward
                                 else [(True, None), (True, 1)]):
            if keep == 1 and op.startswith("rnn"):
                continue
            a = rc.random_steps_args(rng, op, T, N, H, "float64", keep)
            want = _cell_loop(op, a, activation, reverse, state_grad)
            kw = {"reverse": reverse, **({"state_grad": state_grad} if backward else {})}
            rc.call_steps(ref, op, a, activation, **kw)
            for name in rc.steps_outputs(op, state_grad):
                np.testing.assert_allclose(a[name], want[name], rtol=1e-12, atol=1e-12,
                                           err_msg=f"{op} {name} T={T} keep={keep}")


# (T, N, H, threads): serial; a batch split into 2 and into 3 ragged chunks (16 rows a chunk at
# least), and more threads than chunks.
STEPS_SIZES = [(1, 1, 1, 1), (3, 5, 7, 2), (4, 37, 9, 2), (2, 50, 3, 3), (3, 33, 17, 8)]


@pytest.mark.parametrize("dtype", rc.DTYPES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("op,activation", list(_steps_cases()))
def test_fused_cpu_steps_match_reference(ref, rng, op, activation, reverse, dtype):
    for T, N, H, threads in STEPS_SIZES:
        ops = CpuOps(np, num_threads=threads)
        if "backward" in op:
            for state_grad in (True, False):
                rc.check_steps_against_reference(ops, ref, np.ascontiguousarray, rng, op, T, N, H,
                                                 dtype, activation, reverse, state_grad)
        else:
            for keep in ((None,) if op.startswith("rnn") else (None, 1)):
                rc.check_steps_against_reference(ops, ref, np.ascontiguousarray, rng, op, T, N, H,
                                                 dtype, activation, reverse, keep=keep)


def test_fused_cpu_steps_split_the_batch(cpu, rng):
    """A batch of 40 on 2 threads runs as 2 chunks of 20 rows; below 32 rows it is one chunk."""
    assert CpuOps(np, num_threads=2)._steps_chunks(40) == 2
    assert CpuOps(np, num_threads=2)._steps_chunks(31) == 1
    assert CpuOps(np, num_threads=4)._steps_chunks(50) == 3
    assert CpuOps(np, num_threads=1)._steps_chunks(1000) == 1
    assert CpuOps(np, num_threads=2, parallel_min=0)._steps_chunks(2) == 2  # as warm_up runs it


@pytest.mark.parametrize("dtype", rc.DTYPES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fused_cpu_lstm_steps_with_the_input_projection(ref, rng, reverse, dtype):
    """lstm_forward_steps(..., x=, W_ih=, b_ih=) (the projection in the loop, one GEMM a step on
    [x_t, h_prev]) equals the reference's rows_gemm for gx and then its lstm_forward_steps: ragged
    sizes, serial and split batches, gates kept or the last step's only, with and without b_ih;
    gx is not read, and the inputs are not written."""
    rtol = {"float32": 2e-5, "float64": 1e-12}[dtype]
    assert CpuOps.lstm_input_in_steps and not hasattr(ref, "lstm_input_in_steps")
    op = "lstm_forward_steps"
    for (T, N, H, threads), F in zip(STEPS_SIZES, (1, 3, 11, 2, 29), strict=True):
        ops = CpuOps(np, num_threads=threads)
        for keep, with_b in ((None, True), (1, True), (None, False)):
            a = rc.random_steps_args(rng, op, T, N, H, dtype, keep)
            x = rng.uniform(-2, 2, (T, N, F)).astype(dtype)
            W_ih = (rng.uniform(-2, 2, (4 * H, F)) / np.sqrt(H)).astype(dtype)
            b_ih = rng.uniform(-2, 2, 4 * H).astype(dtype) if with_b else None
            want = {k: v.copy() for k, v in a.items()}
            ref.rows_gemm(x.reshape(T * N, F), W_ih.T, want["gx"].reshape(T * N, 4 * H), b_ih)
            rc.call_steps(ref, op, want, reverse=reverse)
            got = {k: v.copy() for k, v in a.items()}
            got["gx"][...] = np.nan  # not read
            inputs = [v.copy() for v in (x, W_ih, b_ih, got["W_hh"], got["b_hh"]) if v is not None]
            rc.call_steps(ops, op, got, reverse=reverse, x=x, W_ih=W_ih, b_ih=b_ih)
            what = f"T={T} N={N} H={H} F={F} {dtype} keep={keep} b_ih={with_b} threads={threads}"
            for name in rc.STEPS_OUTPUTS[op]:
                scale = max(1.0, float(np.abs(want[name]).max()))
                np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * scale,
                                           err_msg=f"{what}: {name}")
            after = [v for v in (x, W_ih, b_ih, got["W_hh"], got["b_hh"]) if v is not None]
            for before, now in zip(inputs, after, strict=True):
                np.testing.assert_array_equal(now, before, err_msg=f"{what}: wrote an input")


def test_fused_cpu_lstm_input_projection_argument_errors(cpu, rng):
    op = "lstm_forward_steps"
    a = rc.random_steps_args(rng, op, 3, 2, 4, "float64")
    x, W_ih, b_ih = np.zeros((3, 2, 5)), np.zeros((16, 5)), np.zeros(16)
    with pytest.raises(ValueError, match=r"x: expected shape \(3, 2, F\)"):
        rc.call_steps(cpu, op, a, x=np.zeros((3, 3, 5)), W_ih=W_ih, b_ih=b_ih)
    with pytest.raises(ValueError, match=r"W_ih: expected shape \(16, 5\)"):
        rc.call_steps(cpu, op, a, x=x, W_ih=np.zeros((16, 4)), b_ih=b_ih)
    with pytest.raises(ValueError, match=r"b_ih: expected shape \(16,\) and dtype float64"):
        rc.call_steps(cpu, op, a, x=x, W_ih=W_ih, b_ih=np.zeros(12))
    with pytest.raises(TypeError, match="x: expected dtype float64"):
        rc.call_steps(cpu, op, a, x=x.astype(np.float32), W_ih=W_ih.astype(np.float32))
    with pytest.raises(ValueError, match="W_ih and b_ih go with x"):
        rc.call_steps(cpu, op, a, W_ih=W_ih)


def test_fused_cpu_ops_run_their_own_gemms_whatever_matmul_says(ref, rng):
    """Given a wrapper of NumPy's GEMM (a timer, a capture recorder), the fused CPU loops and GEMM
    ops still call BLAS themselves: the same bits as without it; the reference calls the wrapper."""
    calls = []

    def matmul(a, b, out):
        calls.append(a.shape)
        return np.matmul(a, b, out=out)

    T, N, H = 3, 40, 5
    ops = CpuOps(np, num_threads=2)
    for op in ("lstm_forward_steps", "gru_backward_steps"):
        a = rc.random_steps_args(rng, op, T, N, H, "float64")
        plain, wrapped, by_ref = ({k: v.copy() for k, v in a.items()} for _ in range(3))
        rc.call_steps(ops, op, plain)
        calls.clear()
        rc.call_steps(ops, op, wrapped, matmul=matmul)
        assert calls == []
        rc.call_steps(ref, op, by_ref, matmul=matmul)
        assert len(calls) == T
        for name in rc.steps_outputs(op):
            np.testing.assert_array_equal(wrapped[name], plain[name])
            np.testing.assert_allclose(by_ref[name], plain[name], rtol=1e-12, atol=1e-12)
    A, W = rng.normal(size=(120, 4)), rng.normal(size=(6, 4))
    out, out_w = np.empty((120, 6)), np.empty((120, 6))
    ops.rows_gemm(A, W.T, out)
    calls.clear()
    ops.rows_gemm(A, W.T, out_w, matmul=matmul)
    dW, dW_w = np.empty((6, 4)), np.empty((6, 4))
    ops.weight_gemm(out, A, dW)
    ops.weight_gemm(out, A, dW_w, matmul=matmul)
    assert calls == []
    np.testing.assert_array_equal(out_w, out)
    np.testing.assert_array_equal(dW_w, dW)


def test_fused_cpu_steps_leave_the_blas_threads_as_they_were(cpu, rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    a = rc.random_steps_args(rng, "lstm_forward_steps", 2, 40, 4, "float32")
    rc.call_steps(CpuOps(np, num_threads=2), "lstm_forward_steps", a)
    after = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]
    assert [x for x in after if x[0] in dict(before)] == before


@pytest.mark.parametrize("ops_name", ["reference", "cpu"])
def test_steps_argument_errors(ref, cpu, rng, ops_name):
    ops = ref if ops_name == "reference" else cpu
    op = "lstm_forward_steps"
    a = rc.random_steps_args(rng, op, 3, 2, 4, "float64")
    with pytest.raises(ValueError, match=r"gx: expected shape \(3, 2, 16\) \(time steps 3, batch 2, "
                                         r"4 x hidden size 4, as hs\), got shape \(3, 2, 12\)"):
        rc.call_steps(ops, op, dict(a, gx=np.zeros((3, 2, 12))))
    with pytest.raises(ValueError, match=r"gates: expected shape \(3, 2, 16\) or \(1, 2, 16\)"):
        rc.call_steps(ops, op, dict(a, gates=np.zeros((4, 2, 16))))
    with pytest.raises(ValueError, match=r"W_hh: expected shape \(16, 4\)"):
        rc.call_steps(ops, op, dict(a, W_hh=np.zeros((4, 16))))
    with pytest.raises(ValueError, match=r"b_hh: expected shape \(16,\)"):
        rc.call_steps(ops, op, dict(a, b_hh=np.zeros(12)))
    with pytest.raises(ValueError, match=r"cs: expected shape \(4, 2, 4\)"):
        rc.call_steps(ops, op, dict(a, cs=np.zeros((3, 2, 4))))
    with pytest.raises(ValueError, match=r"hs: expected a 3-D array \(time steps \+ 1 >= 2"):
        rc.call_steps(ops, op, dict(a, hs=np.zeros((2, 4))))
    with pytest.raises(ValueError, match=r"hs: expected a 3-D array .*got shape \(1, 2, 4\)"):
        rc.call_steps(ops, op, dict(a, hs=np.zeros((1, 2, 4))))
    b = rc.random_steps_args(rng, "gru_backward_steps", 2, 3, 2, "float64")
    with pytest.raises(ValueError, match=r"carry: expected shape \(3, 2\) \(batch 3, hidden size 2"):
        rc.call_steps(ops, "gru_backward_steps", dict(b, carry=np.zeros((2, 3))))
    r = rc.random_steps_args(rng, "rnn_forward_steps", 2, 3, 2, "float64")
    with pytest.raises(ValueError, match="nonlinearity: expected one of"):
        rc.call_steps(ops, "rnn_forward_steps", r, "sigmoid")


def test_fused_cpu_steps_check_dtype_and_contiguity(cpu, rng):
    op = "gru_forward_steps"
    a = rc.random_steps_args(rng, op, 2, 3, 4, "float64")
    with pytest.raises(TypeError, match="saved: expected dtype float64"):
        rc.call_steps(cpu, op, dict(a, saved=a["saved"].astype(np.float32)))
    with pytest.raises(ValueError, match="W_hh: expected a C-contiguous array"):
        rc.call_steps(cpu, op, dict(a, W_hh=np.asfortranarray(a["W_hh"])))
    with pytest.raises(TypeError, match="gx: expected a float32 or float64 array"):
        rc.call_steps(cpu, op, dict(a, gx=a["gx"].astype(np.int64)))


# ---- the layers' GEMMs over all rows ----------------------------------------------------------
@pytest.mark.parametrize("dtype", rc.DTYPES)
def test_fused_cpu_row_gemms_match_reference(ref, rng, dtype):
    """rows_gemm (B plain and a transposed view) and weight_gemm, serial and split into 2 and 3
    ragged chunks of rows, equal NumPy's products."""
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for M, threads in [(7, 2), (40, 2), (50, 3)]:
        ops = CpuOps(np, num_threads=threads)
        A = rng.uniform(-1, 1, (M, 9)).astype(dtype)
        W = rng.uniform(-1, 1, (12, 9)).astype(dtype)
        G = rng.uniform(-1, 1, (M, 12)).astype(dtype)
        for B, want in ((W.T, A @ W.T), (W[:, :9].copy().T.copy(), A @ W.T)):
            out = np.full((M, 12), np.nan, dtype)
            ops.rows_gemm(A, B, out)
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
        out = np.full((M, 9), np.nan, dtype)
        ops.rows_gemm(G, W, out)
        np.testing.assert_allclose(out, G @ W, rtol=tol, atol=tol)
        dW = np.full((12, 9), np.nan, dtype)
        ops.weight_gemm(G, A, dW)
        np.testing.assert_allclose(dW, G.T @ A, rtol=tol, atol=tol * M)
        dW_ref = np.empty_like(dW)
        ref.weight_gemm(G, A, dW_ref)
        np.testing.assert_allclose(dW, dW_ref, rtol=tol, atol=tol * M)
        # with the bias: added to every row; with db: the column sums (BP4)
        b = rng.uniform(-1, 1, 12).astype(dtype)
        out = np.full((M, 12), np.nan, dtype)
        ops.rows_gemm(A, W.T, out, b)
        np.testing.assert_allclose(out, A @ W.T + b, rtol=tol, atol=tol)
        db = np.full(12, np.nan, dtype)
        ops.weight_gemm(G, A, dW, db)
        np.testing.assert_allclose(dW, G.T @ A, rtol=tol, atol=tol * M)
        np.testing.assert_allclose(db, G.astype(np.float64).sum(0), rtol=tol, atol=tol * M)


@pytest.mark.parametrize("ops_name", ["reference", "cpu"])
def test_row_gemm_errors(ref, rng, ops_name):
    ops = ref if ops_name == "reference" else CpuOps(np, num_threads=2, parallel_min=0)
    A, W = np.zeros((40, 3)), np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"out: expected shape \(40, 5\), got shape \(40, 4\)"):
        ops.rows_gemm(A, W.T, np.zeros((40, 4)))
    with pytest.raises(ValueError, match=r"A, B: expected matching inner sizes, got shapes "
                                         r"\(40, 3\) and \(5, 3\)"):
        ops.rows_gemm(A, W, np.zeros((40, 3)))
    with pytest.raises(ValueError, match=r"dG, A: expected as many rows, got shapes \(40, 5\) "
                                         r"and \(39, 3\)"):
        ops.weight_gemm(np.zeros((40, 5)), np.zeros((39, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"dW: expected shape \(5, 3\)"):
        ops.weight_gemm(np.zeros((40, 5)), A, np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"A: expected a 2-D array, got shape \(40,\)"):
        ops.rows_gemm(np.zeros(40), W.T, np.zeros((40, 5)))
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\), got shape \(3,\)"):
        ops.rows_gemm(A, W.T, np.zeros((40, 5)), np.zeros(3))
    with pytest.raises(ValueError, match=r"db: expected shape \(5,\), got shape \(3,\)"):
        ops.weight_gemm(np.zeros((40, 5)), A, np.zeros((5, 3)), np.zeros(3))


@pytest.mark.parametrize("dtype", rc.DTYPES)
def test_weight_gemm_with_a_second_operand(ref, rng, dtype):
    """weight_gemm(dG, A, dW, db, A2=, dW2=): dW = dGᵀ A, dW2 = dGᵀ A2, db = Σ_rows dG; the fused
    set one GEMM a chunk on its copy of [A, A2] (ragged chunks of 2 and 3, and serial), the
    reference two, equal to NumPy's products; without db; accumulating layers' use of it is
    tested in test_layers_recurrent."""
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for M, K1, K2, threads in [(7, 3, 5, 2), (40, 1, 9, 2), (50, 7, 4, 3), (33, 28, 17, 1)]:
        G = rng.uniform(-1, 1, (M, 12)).astype(dtype)
        A = rng.uniform(-1, 1, (M, K1)).astype(dtype)
        A2 = rng.uniform(-1, 1, (M, K2)).astype(dtype)
        for ops in (ref, CpuOps(np, num_threads=threads)):
            for with_db in (True, False):
                dW, dW2 = np.full((12, K1), np.nan, dtype), np.full((12, K2), np.nan, dtype)
                db = np.full(12, np.nan, dtype) if with_db else None
                ops.weight_gemm(G, A, dW, db, A2=A2, dW2=dW2)
                np.testing.assert_allclose(dW, G.T @ A, rtol=tol, atol=tol * M)
                np.testing.assert_allclose(dW2, G.T @ A2, rtol=tol, atol=tol * M)
                if with_db:
                    np.testing.assert_allclose(db, G.astype(np.float64).sum(0), rtol=tol,
                                               atol=tol * M)


@pytest.mark.parametrize("ops_name", ["reference", "cpu"])
def test_weight_gemm_second_operand_errors(ref, ops_name):
    ops = ref if ops_name == "reference" else CpuOps(np, num_threads=2, parallel_min=0)
    G, A, dW = np.zeros((40, 5)), np.zeros((40, 3)), np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"dW2: expected an array with A2"):
        ops.weight_gemm(G, A, dW, A2=np.zeros((40, 2)))
    with pytest.raises(ValueError, match=r"A2: expected an array with dW2"):
        ops.weight_gemm(G, A, dW, dW2=np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"dG, A2: expected as many rows, got shapes \(40, 5\) "
                                         r"and \(39, 2\)"):
        ops.weight_gemm(G, A, dW, A2=np.zeros((39, 2)), dW2=np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"dW2: expected shape \(5, 2\), got shape \(2, 5\)"):
        ops.weight_gemm(G, A, dW, A2=np.zeros((40, 2)), dW2=np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"A2: expected a 2-D array, got shape \(40,\)"):
        ops.weight_gemm(G, A, dW, A2=np.zeros(40), dW2=np.zeros((5, 2)))


# ---- the recurrent kernels' GEMM (kernels/cpu/blas.py) --------------------------------------------
def _layouts(rng, m, k, n, dtype):
    """A (m, k) and B (k, n), each C-contiguous and as a transposed view (F-contiguous)."""
    for ta in (False, True):
        for tb in (False, True):
            A = rng.uniform(-1, 1, (k, m) if ta else (m, k)).astype(dtype)
            B = rng.uniform(-1, 1, (n, k) if tb else (k, n)).astype(dtype)
            yield (A.T if ta else A), (B.T if tb else B)


GEMM_SIZES = [(1, 1, 1), (5, 7, 3), (1, 9, 4), (6, 1, 2), (37, 17, 65)]


@pytest.mark.parametrize("dtype", rc.DTYPES)
def test_blas_gemm_equals_numpy(rng, dtype):
    """The compiled kernels' GEMM (NumPy's OpenBLAS, or the np.dot fallback) equals np.dot for
    ragged sizes and every layout pair, and so does the np.dot fallback called through its C
    signature (the path a NumPy without its ILP64 OpenBLAS takes)."""
    import ctypes

    from numba import njit

    from gpubackprop.kernels.cpu import blas

    @njit
    def gemm(A, B, out):
        blas.gemm(A, B, out)

    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    c_f = ctypes.c_float if dtype == "float32" else ctypes.c_double
    i32, i64, p = ctypes.c_int32, ctypes.c_int64, ctypes.c_size_t
    fallback = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, c_f, p, i64, p, i64, c_f, p,
                                i64)(blas._fallback(np.dtype(dtype).type).address)
    for m, k, n in GEMM_SIZES:
        for A, B in _layouts(rng, m, k, n, dtype):
            want = np.dot(A, B)
            out = np.full((m, n), np.nan, dtype)
            gemm(A, B, out)
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol * k)
            out = np.full((m, n), np.nan, dtype)
            ta = blas.NO_TRANS if A.flags.c_contiguous else blas.TRANS
            tb = blas.NO_TRANS if B.flags.c_contiguous else blas.TRANS
            lda = k if ta == blas.NO_TRANS else m
            ldb = n if tb == blas.NO_TRANS else k
            fallback(blas.ROW_MAJOR, ta, tb, m, n, k, 1.0, A.ctypes.data, lda, B.ctypes.data, ldb,
                     0.0, out.ctypes.data, n)
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol * k)
