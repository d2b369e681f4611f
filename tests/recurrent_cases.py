"""Shared cases of the recurrent-cell kernel tests: each fused cell op against the reference op,
and the reference op against a plain per-unit loop written from the equations (PyTorch's docs)."""

import math

import numpy as np

from gpubackprop.kernels.reference.recurrent import CELL_ARGS as ARGS  # each op's arguments

DTYPES = ["float32", "float64"]
RTOL = {"float32": 1e-5, "float64": 1e-12}
OPS = tuple(ARGS)
# Which arguments each op writes (the rest are inputs); "in/out" ones are read first.
OUTPUTS = {
    "rnn_cell": ("h",),
    "rnn_cell_backward": ("dpre",),
    "lstm_cell": ("h", "c", "gates"),
    "lstm_cell_backward": ("dc", "dgates"),
    "gru_cell": ("h", "saved"),
    "gru_cell_backward": ("dh", "dgx", "dgh"),
}


def random_args(rng, op, N, H, dtype):
    """Host arrays for ``op``: inputs in a range that reaches the tails of σ and tanh; the saved
    gates of a backward op are in (0, 1) (tanh's in (−1, 1)), as a forward pass leaves them."""
    out = {}
    for name, k in ARGS[op]:
        shape = (-k * H,) if k < 0 else (N, k * H)
        a = rng.uniform(-3, 3, shape)
        if name == "h" and op == "rnn_cell_backward":
            a = np.tanh(a)
            a[0, 0] = 0.0  # relu's derivative at its kink: 0, as the reference says
        if name == "gates":
            a = 1 / (1 + np.exp(-a))
            a[:, 2 * H:3 * H] = 2 * a[:, 2 * H:3 * H] - 1
        if name == "saved":
            a[:, :2 * H] = 1 / (1 + np.exp(-a[:, :2 * H]))
            a[:, 2 * H:3 * H] = np.tanh(a[:, 2 * H:3 * H])
        out[name] = a.astype(dtype)
    return out


def call(ops, op, arrays, activation="tanh"):
    args = [arrays[name] for name, _ in ARGS[op]]
    if op.startswith("rnn"):
        args.append(activation)
    getattr(ops, op)(*args)


def check_against_reference(ops, ref, dev, rng, op, N, H, dtype, activation="tanh"):
    """``ops``'s op on device arrays equals the reference's on host copies (rtol by dtype)."""
    host = random_args(rng, op, N, H, dtype)
    expected = {k: v.copy() for k, v in host.items()}
    call(ref, op, expected, activation)
    device = {k: dev(v.copy()) for k, v in host.items()}
    call(ops, op, device, activation)
    for name in OUTPUTS[op]:
        got = np.asarray(device[name] if isinstance(device[name], np.ndarray)
                         else device[name].get())
        want = expected[name]
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                                   err_msg=f"{op} {name} ({N}x{H}, {dtype}, {activation})")
    for name, _ in ARGS[op]:  # the inputs are left alone
        if name not in OUTPUTS[op]:
            got = device[name] if isinstance(device[name], np.ndarray) else device[name].get()
            np.testing.assert_array_equal(got, host[name], err_msg=f"{op} wrote input {name}")


# ---- plain per-unit loops, written from the equations ---------------------------------------------
def _sig(x):
    return 1 / (1 + math.exp(-x))


def naive(op, a, activation="tanh"):
    """The outputs of ``op`` on float64 host arrays ``a``, unit by unit."""
    a = {k: v.astype(np.float64).copy() for k, v in a.items()}
    N = next(v for k, v in a.items() if k not in ("b_hh",)).shape[0]
    H = a["dh_out" if "dh_out" in a else "h"].shape[1]
    for n in range(N):
        for j in range(H):
            if op == "rnn_cell":
                z = a["gx"][n, j] + a["gh"][n, j] + a["b_hh"][j]
                a["h"][n, j] = math.tanh(z) if activation == "tanh" else max(z, 0.0)
            elif op == "rnn_cell_backward":
                d, h = a["dh_out"][n, j] + a["dh_rec"][n, j], a["h"][n, j]
                a["dpre"][n, j] = d * (1 - h * h) if activation == "tanh" else d * (h > 0)
            elif op == "lstm_cell":
                pre = [a["gx"][n, q * H + j] + a["gh"][n, q * H + j] + a["b_hh"][q * H + j]
                       for q in range(4)]
                i, f, g, o = _sig(pre[0]), _sig(pre[1]), math.tanh(pre[2]), _sig(pre[3])
                c = f * a["c_prev"][n, j] + i * g
                a["c"][n, j], a["h"][n, j] = c, o * math.tanh(c)
                for q, v in enumerate((i, f, g, o)):
                    a["gates"][n, q * H + j] = v
            elif op == "lstm_cell_backward":
                i, f, g, o = (a["gates"][n, q * H + j] for q in range(4))
                dh = a["dh_out"][n, j] + a["dh_rec"][n, j]
                tc = math.tanh(a["c"][n, j])
                dc = a["dc"][n, j] + dh * o * (1 - tc ** 2)
                for q, v in enumerate((dc * g * i * (1 - i), dc * a["c_prev"][n, j] * f * (1 - f),
                                       dc * i * (1 - g ** 2), dh * tc * o * (1 - o))):
                    a["dgates"][n, q * H + j] = v
                a["dc"][n, j] = dc * f
            elif op == "gru_cell":
                gx, gh, b = a["gx"][n], a["gh"][n], a["b_hh"]
                r = _sig(gx[j] + gh[j] + b[j])
                z = _sig(gx[H + j] + gh[H + j] + b[H + j])
                hn = gh[2 * H + j] + b[2 * H + j]
                nn = math.tanh(gx[2 * H + j] + r * hn)
                a["h"][n, j] = (1 - z) * nn + z * a["h_prev"][n, j]
                for q, v in enumerate((r, z, nn, hn)):
                    a["saved"][n, q * H + j] = v
            else:  # gru_cell_backward
                r, z, nn, hn = (a["saved"][n, q * H + j] for q in range(4))
                d = a["dh_out"][n, j] + a["dh_rec"][n, j] + a["dh"][n, j]
                dn = d * (1 - z) * (1 - nn ** 2)
                dr = dn * hn * r * (1 - r)
                dz = d * (a["h_prev"][n, j] - nn) * z * (1 - z)
                for q, v in enumerate((dr, dz, dn)):
                    a["dgx"][n, q * H + j] = v
                for q, v in enumerate((dr, dz, dn * r)):
                    a["dgh"][n, q * H + j] = v
                a["dh"][n, j] = d * z
    return {name: a[name] for name in OUTPUTS[op]}


# ---- the time-loop ops -----------------------------------------------------------------------------
from gpubackprop.kernels.reference.recurrent import STEPS_ARGS  # noqa: E402

STEPS_OPS = tuple(STEPS_ARGS)
STEPS_OUTPUTS = {
    "rnn_forward_steps": ("hs",),
    "rnn_backward_steps": ("dpre", "dh"),
    "lstm_forward_steps": ("hs", "cs", "gates"),
    "lstm_backward_steps": ("dgates", "dh", "dc"),
    "gru_forward_steps": ("hs", "saved"),
    "gru_backward_steps": ("dgx", "dgh", "dh", "carry"),
}
STEPS_WORKSPACES = ("gh",)  # written, but no result


def random_steps_args(rng, op, T, N, H, dtype, keep=None):
    """Host arrays for a time-loop op: states hs, cs random everywhere (only the initial one counts
    going in), the saved gates of a backward op as a forward pass leaves them, W_hh scaled by
    1/√H as PyTorch's initialisation; ``keep`` the leading axis of a forward op's saved gates (T,
    or 1 for inference; default T). GRU's carry goes in as zeros, as the layer passes it."""
    out = {}
    for name, lead, k in STEPS_ARGS[op]:
        width = k * H
        shape = {"T": (T, N, width), "T+1": (T + 1, N, width), "T|1": (keep or T, N, width),
                 "N": (N, width), "W": (width, H), "b": (width,)}[lead]
        a = rng.uniform(-2, 2, shape)
        if lead == "W":
            a /= math.sqrt(H)
        if name == "hs" and op == "rnn_backward_steps":
            a = np.tanh(a)
        if name == "gates" and op == "lstm_backward_steps":
            a = 1 / (1 + np.exp(-a))
            a[..., 2 * H:3 * H] = 2 * a[..., 2 * H:3 * H] - 1
        if name == "saved" and op == "gru_backward_steps":
            a[..., :2 * H] = 1 / (1 + np.exp(-a[..., :2 * H]))
            a[..., 2 * H:3 * H] = np.tanh(a[..., 2 * H:3 * H])
        if name == "carry":
            a = np.zeros(shape)
        out[name] = a.astype(dtype)
    return out


def call_steps(ops, op, arrays, activation="tanh", **kw):
    args = [arrays[name] for name, _, _ in STEPS_ARGS[op]]
    if op.startswith("rnn"):
        args.append(activation)
    getattr(ops, op)(*args, **kw)


def steps_outputs(op, state_grad=True):
    """The arrays ``op`` writes that carry a result (dh and dc only with state_grad)."""
    return tuple(n for n in STEPS_OUTPUTS[op]
                 if state_grad or n not in ("dh", "dc", "carry"))


def check_steps_against_reference(ops, ref, dev, rng, op, T, N, H, dtype, activation="tanh",
                                  reverse=False, state_grad=True, keep=None):
    """``ops``'s time-loop op on device arrays equals the reference's on host copies."""
    host = random_steps_args(rng, op, T, N, H, dtype, keep)
    kw = {"reverse": reverse}
    if "backward" in op:
        kw["state_grad"] = state_grad
    expected = {k: v.copy() for k, v in host.items()}
    call_steps(ref, op, expected, activation, **kw)
    device = {k: dev(v.copy()) for k, v in host.items()}
    call_steps(ops, op, device, activation, **kw)
    what = f"{op} T={T} N={N} H={H} {dtype} {activation} reverse={reverse} state_grad={state_grad}"
    # T steps of rounding compound through the recurrence: float32 gets a looser tolerance.
    rtol = {"float32": 2e-5, "float64": 1e-12}[dtype]
    for name in steps_outputs(op, state_grad):
        got = np.asarray(device[name] if isinstance(device[name], np.ndarray)
                         else device[name].get())
        want = expected[name]
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale,
                                   err_msg=f"{what}: {name}")
    for name, _, _ in STEPS_ARGS[op]:
        if name in STEPS_OUTPUTS[op] or name in STEPS_WORKSPACES:
            continue
        got = device[name] if isinstance(device[name], np.ndarray) else device[name].get()
        np.testing.assert_array_equal(got, host[name], err_msg=f"{what}: wrote input {name}")
