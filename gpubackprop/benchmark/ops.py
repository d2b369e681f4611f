"""Fused against reference elementwise ops, in GB/s against a plain copy."""

import functools

import numpy as np

from gpubackprop import backend as backend_mod
from gpubackprop.benchmark.contenders import LR, MOMENTUM
from gpubackprop.benchmark.timing import Contender, Timer, median, ratio_median, sync_for, xp_for

OP_NAMES = ("act_backward", "bias_act", "softmax_ce", "sgd", "bias_grad")
OP_SHAPES = ((64, 256), (256, 1024), (1024, 4096))


def op_bytes(op, shape, itemsize=4, label_itemsize=8):
    """Minimal bytes read + written by one elementwise op on a (rows, cols) problem.

    act_backward: read dA, A; write dZ                  3·R·C
    bias_act:     read Z, b; write Z (A is Z, as Dense)  2·R·C + C
    softmax_ce:   read logits, labels; write dlogits, per-row loss   2·R·C + R, + R labels
    sgd:          read p, g, buf; write p, buf           5·R·C (R·C parameters, momentum)
    bias_grad:    read dZ; write db                      R·C + C
    copy:         read src; write dst                    2·R·C
    """
    rows, cols = shape
    n = rows * cols
    elems = {
        "act_backward": 3 * n,
        "bias_act": 2 * n + cols,
        "softmax_ce": 2 * n + rows,
        "sgd": 5 * n,
        "bias_grad": n + cols,
        "copy": 2 * n,
    }
    if op not in elems:
        raise ValueError(f"op: expected one of {tuple(elems)}, got {op!r}")
    extra = rows * label_itemsize if op == "softmax_ce" else 0
    return elems[op] * itemsize + extra


def op_contenders(ops, op, shape, xp):
    """A contender calling ``ops.<op>`` on fresh float32 arrays of ``shape`` (rows, cols)."""
    rows, cols = shape
    rng = np.random.default_rng(0)

    def arr(*s):
        return xp.asarray(rng.standard_normal(s).astype(np.float32))
    if op == "act_backward":
        dA, A, dZ = arr(rows, cols), xp.maximum(arr(rows, cols), 0), arr(rows, cols)
        return functools.partial(ops.act_backward, dA, A, "relu", dZ)
    if op == "bias_act":
        Z, b = arr(rows, cols), arr(cols) * np.float32(1e-3)
        return functools.partial(ops.bias_act, Z, b, "relu", Z)
    if op == "softmax_ce":
        logits, dl = arr(rows, cols), arr(rows, cols)
        labels = xp.asarray(rng.integers(0, cols, rows))
        loss_rows = arr(rows)
        return functools.partial(ops.softmax_ce, logits, labels, dl, loss_rows)
    if op == "sgd":
        n = rows * cols
        p, g, buf = arr(n), arr(n) * np.float32(1e-3), xp.zeros(n, dtype=np.float32)
        scale = xp.ones(1, dtype=np.float32)
        return functools.partial(ops.sgd, p, g, buf, LR, MOMENTUM, False, 0.0, scale)
    if op == "bias_grad":
        dZ, db = arr(rows, cols), arr(cols)
        return functools.partial(ops.bias_grad, dZ, db, False)
    if op == "copy":
        src, dst = arr(rows, cols), arr(rows, cols)
        return functools.partial(xp.copyto, dst, src)
    raise ValueError(f"op: expected one of {OP_NAMES + ('copy',)}, got {op!r}")


def ops_section(timer, devices, op_shapes=OP_SHAPES, op_names=OP_NAMES, log=print):
    """GB/s of the fused and reference elementwise ops, and of a plain copy, at several sizes."""
    from gpubackprop.kernels.reference import ReferenceOps

    rows = []
    for dev in devices:
        xp = xp_for(dev)
        fused = backend_mod.load_ops(dev, "fused", xp)
        ref = ReferenceOps(xp)
        sync = sync_for(dev)
        for shape in op_shapes:
            cs = [Contender("copy", op_contenders(ref, "copy", shape, xp), sync, 1, "numpy", dev)]
            for op in op_names:
                for kernels, ops in (("reference", ref), ("fused", fused)):
                    cs.append(Contender(f"{op} {kernels}", op_contenders(ops, op, shape, xp), sync,
                                        1, "gpubackprop", dev, kernels))
            times = Timer(rounds=timer.rounds, block_s=timer.block_s / 4,
                          warmup_s=timer.warmup_s / 3, quiesce_s=0).run(cs)
            copy_t = times["copy"]
            copy_gbs = op_bytes("copy", shape) / median(copy_t) / 1e9
            rows.append({"device": dev, "op": "copy", "kernels": None, "shape": list(shape),
                         "bytes": op_bytes("copy", shape), "us": 1e6 * median(copy_t),
                         "gbs": copy_gbs, "fraction_of_copy": 1.0, "fused_over_reference": None})
            for op in op_names:
                nbytes = op_bytes(op, shape)
                tr, tf = times[f"{op} reference"], times[f"{op} fused"]
                for kernels, t in (("reference", tr), ("fused", tf)):
                    gbs = nbytes / median(t) / 1e9
                    rows.append({"device": dev, "op": op, "kernels": kernels, "shape": list(shape),
                                 "bytes": nbytes, "us": 1e6 * median(t), "gbs": gbs,
                                 "fraction_of_copy": gbs / copy_gbs,
                                 "fused_over_reference": ratio_median(tf, tr)
                                 if kernels == "fused" else None})
            log(f"  {dev} ops {shape[0]}x{shape[1]}: copy {copy_gbs:.1f} GB/s, " + ", ".join(
                f"{r['op']} x{r['fused_over_reference']:.2f}" for r in rows[-2 * len(op_names):]
                if r["kernels"] == "fused"))
    return rows

