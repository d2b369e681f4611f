"""Reference recurrent-cell ops: one time step of an RNN, LSTM or GRU layer, forward and backward.

A recurrent layer computes the input projection of every time step in one GEMM,
gx = X W_ihᵀ + b_ih, then per step t one GEMM gh = h_{t-1} W_hhᵀ and one cell op, which adds
b_hh, applies the gate activations and updates the state in one pass. The backward cell op takes
the gradient reaching h_t from above (``dh_out``, the output sequence's) and from step t+1
(``dh_rec`` = dgh_{t+1} W_hh) and gives the gradients of the pre-activations, from which the
layer forms dh_{t-1} (one GEMM) and, after the loop, the weight gradients (a few large GEMMs).

Shapes (N samples, H hidden units, G gates; all C-contiguous, one float dtype):

- RNN (G = 1): h = act(gx + gh + b_hh), act tanh or relu.
- LSTM (G = 4, PyTorch's gate order i, f, g, o): i, f, o = σ(·), g = tanh(·);
  c = f ⊙ c_prev + i ⊙ g; h = o ⊙ tanh(c). ``gates`` (N, 4H) keeps the activated i, f, g, o.
- GRU (G = 3, order r, z, n; b_hn inside the reset product, as PyTorch):
  r, z = σ(gx_rz + gh_rz + b_hrz); hn = gh_n + b_hn; n = tanh(gx_n + r ⊙ hn);
  h = (1 − z) ⊙ n + z ⊙ h_prev. ``saved`` (N, 4H) keeps r, z, n and hn.

gx, gh (N, G·H) and b_hh (G·H,) as above; every other array is (N, H) unless said.
"""

RNN_ACTIVATIONS = ("tanh", "relu")

# Each op's arguments in order, with their widths in units of H: k for an (N, k·H) array, -G for
# the bias (G·H,). The reference array that fixes N and H is the op's first (N, H) one.
CELL_ARGS = {
    "rnn_cell": (("gx", 1), ("gh", 1), ("b_hh", -1), ("h", 1)),
    "rnn_cell_backward": (("dh_out", 1), ("dh_rec", 1), ("h", 1), ("dpre", 1)),
    "lstm_cell": (("gx", 4), ("gh", 4), ("b_hh", -4), ("c_prev", 1), ("h", 1), ("c", 1),
                  ("gates", 4)),
    "lstm_cell_backward": (("dh_out", 1), ("dh_rec", 1), ("dc", 1), ("c_prev", 1), ("c", 1),
                           ("gates", 4), ("dgates", 4)),
    "gru_cell": (("gx", 3), ("gh", 3), ("b_hh", -3), ("h_prev", 1), ("h", 1), ("saved", 4)),
    "gru_cell_backward": (("dh_out", 1), ("dh_rec", 1), ("dh", 1), ("h_prev", 1), ("saved", 4),
                          ("dgx", 3), ("dgh", 3)),
}
CELL_NAMES = {op: tuple(name for name, _ in args) for op, args in CELL_ARGS.items()}


def check_cell(op, arrays):
    """(N, H) of a cell op's arrays, or a ValueError naming the first array of a wrong shape."""
    args = CELL_ARGS[op]
    ref_name, ref = next((name, a) for (name, k), a in zip(args, arrays, strict=True) if k == 1)
    if getattr(ref, "ndim", None) != 2:
        got = f"shape {tuple(ref.shape)}" if hasattr(ref, "shape") else type(ref).__name__
        raise ValueError(f"{ref_name}: expected a 2-D array (batch, hidden size), got {got}")
    N, H = ref.shape
    for (name, k), a in zip(args, arrays, strict=True):
        if k < 0:
            expect = (-k * H,)
            what = f" ({-k} gate(s) x hidden size {H}, the hidden size of {ref_name})"
        else:
            expect = (N, k * H)
            what = (f" (batch {N}, {'' if k == 1 else f'{k} x '}hidden size {H}, as {ref_name})")
        if tuple(a.shape) != expect:
            raise ValueError(f"{name}: expected shape {expect}{what}, got shape {tuple(a.shape)}")
    return N, H


def check_act(activation):
    """The RNN nonlinearity, checked."""
    if activation not in RNN_ACTIVATIONS:
        raise ValueError(f"nonlinearity: expected one of {RNN_ACTIVATIONS}, got {activation!r}")
    return activation


class RecurrentOps:
    """Plain-xp recurrent cell ops (a mixin of ``ReferenceOps``: uses ``self.xp`` and ``sigmoid``)."""

    # ---- RNN ---------------------------------------------------------------------------------
    def rnn_cell(self, gx, gh, b_hh, h, activation):
        """h = act(gx + gh + b_hh), act "tanh" or "relu"."""
        check_act(activation)
        check_cell("rnn_cell", (gx, gh, b_hh, h))
        pre = gx + gh + b_hh
        if activation == "tanh":
            self.xp.tanh(pre, out=h)
        else:
            self.xp.maximum(pre, 0, out=h)
        return h

    def rnn_cell_backward(self, dh_out, dh_rec, h, dpre, activation):
        """dpre = (dh_out + dh_rec) ⊙ act'(·), act' from h: 1 − h² (tanh), [h > 0] (relu)."""
        check_act(activation)
        check_cell("rnn_cell_backward", (dh_out, dh_rec, h, dpre))
        dh = dh_out + dh_rec
        if activation == "tanh":
            dpre[...] = dh * (1 - h * h)
        else:
            dpre[...] = self.xp.where(h > 0, dh, 0)
        return dpre

    # ---- LSTM --------------------------------------------------------------------------------
    def lstm_cell(self, gx, gh, b_hh, c_prev, h, c, gates):
        """One LSTM step: gates (N, 4H) = activated i, f, g, o; c and h written."""
        check_cell("lstm_cell", (gx, gh, b_hh, c_prev, h, c, gates))
        xp = self.xp
        H = h.shape[1]
        pre = gx + gh + b_hh
        gates[:, :2 * H] = self.sigmoid(pre[:, :2 * H])
        xp.tanh(pre[:, 2 * H:3 * H], out=gates[:, 2 * H:3 * H])
        gates[:, 3 * H:] = self.sigmoid(pre[:, 3 * H:])
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        c[...] = f * c_prev + i * g
        h[...] = o * xp.tanh(c)
        return h, c

    def lstm_cell_backward(self, dh_out, dh_rec, dc, c_prev, c, gates, dgates):
        """dgates (N, 4H) = the gradients of the gate pre-activations; dc (N, H) goes in as
        ∂C/∂c_t (from step t+1) and comes out as ∂C/∂c_{t−1}."""
        check_cell("lstm_cell_backward", (dh_out, dh_rec, dc, c_prev, c, gates, dgates))
        xp = self.xp
        H = c.shape[1]
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        dh = dh_out + dh_rec
        tc = xp.tanh(c)
        dct = dc + dh * o * (1 - tc * tc)
        dgates[:, :H] = dct * g * i * (1 - i)
        dgates[:, H:2 * H] = dct * c_prev * f * (1 - f)
        dgates[:, 2 * H:3 * H] = dct * i * (1 - g * g)
        dgates[:, 3 * H:] = dh * tc * o * (1 - o)
        dc[...] = dct * f
        return dgates, dc

    # ---- GRU ---------------------------------------------------------------------------------
    def gru_cell(self, gx, gh, b_hh, h_prev, h, saved):
        """One GRU step: h written; saved (N, 4H) = r, z, n, hn (hn = gh_n + b_hn)."""
        check_cell("gru_cell", (gx, gh, b_hh, h_prev, h, saved))
        xp = self.xp
        H = h.shape[1]
        ghb = gh + b_hh
        saved[:, :2 * H] = self.sigmoid(gx[:, :2 * H] + ghb[:, :2 * H])
        saved[:, 3 * H:] = ghb[:, 2 * H:]
        r, z, hn = saved[:, :H], saved[:, H:2 * H], saved[:, 3 * H:]
        xp.tanh(gx[:, 2 * H:] + r * hn, out=saved[:, 2 * H:3 * H])
        n = saved[:, 2 * H:3 * H]
        h[...] = (1 - z) * n + z * h_prev
        return h

    def gru_cell_backward(self, dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
        """dgx, dgh (N, 3H): the gradients of the input-side and hidden-side pre-activations (they
        differ in the n block: dgh_n = r ⊙ dgx_n). dh (N, H) goes in as the part of ∂C/∂h_t that
        step t+1 passed straight through (z ⊙ ·) and comes out as that part for h_{t−1};
        ∂C/∂h_t = dh_out + dh_rec + dh."""
        _, H = check_cell("gru_cell_backward", (dh_out, dh_rec, dh, h_prev, saved, dgx, dgh))
        r, z, n, hn = saved[:, :H], saved[:, H:2 * H], saved[:, 2 * H:3 * H], saved[:, 3 * H:]
        d = dh_out + dh_rec + dh
        dn = d * (1 - z) * (1 - n * n)
        dgx[:, :H] = dn * hn * r * (1 - r)
        dgx[:, H:2 * H] = d * (h_prev - n) * z * (1 - z)
        dgx[:, 2 * H:] = dn
        dgh[:, :2 * H] = dgx[:, :2 * H]
        dgh[:, 2 * H:] = dn * r
        dh[...] = d * z
        return dgx, dgh, dh
