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

The time-loop ops (``rnn_forward_steps``, ``lstm_backward_steps``, …) run all T steps of one
direction of a layer: each step's GEMM and cell op, in the order the direction runs (t = 0 … T−1,
or T−1 … 0 with ``reverse``). Sequences are time-major (T, N, ·) and C-contiguous; the states hs
(and cs) are (T+1, N, H): a forward direction reads h_{t−1} from hs[t] and writes h_t to hs[t+1]
(hs[0] holds the initial state), a reverse one reads hs[t+1] and writes hs[t] (hs[T] the initial
state), so that either direction's outputs are one contiguous slice in time order. W_hh is the
(G·H, H) parameter; ``matmul`` the GEMM a step calls, as ``matmul(a, b, out=)`` (None:
``xp.matmul``; the layers pass their backend's, which a CUDA graph capture replaces; the fused CPU
set calls BLAS itself). Here they are the plain loop over the cell ops; a fused set runs the loop
in one call.
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

# The time-loop ops' arrays in order, as (name, leading axis, width in units of H): leading axis
# "T" (T, N, k·H), "T+1" (T+1, N, k·H), "T|1" either T or 1 (inference keeps one step of saved
# gates), "N" a 2-D (N, k·H) per-step array, "W" the weight (G·H, H), "b" the bias (G·H,). The array
# that fixes T, N and H is the op's first "T+1" one.
STEPS_ARGS = {
    "rnn_forward_steps": (("gx", "T", 1), ("W_hh", "W", 1), ("b_hh", "b", 1), ("hs", "T+1", 1),
                          ("gh", "N", 1)),
    "rnn_backward_steps": (("dout", "T", 1), ("W_hh", "W", 1), ("hs", "T+1", 1), ("dpre", "T", 1),
                           ("dh", "N", 1)),
    "lstm_forward_steps": (("gx", "T", 4), ("W_hh", "W", 4), ("b_hh", "b", 4), ("hs", "T+1", 1),
                           ("cs", "T+1", 1), ("gates", "T|1", 4), ("gh", "N", 4)),
    "lstm_backward_steps": (("dout", "T", 1), ("W_hh", "W", 4), ("cs", "T+1", 1),
                            ("gates", "T", 4), ("dgates", "T", 4), ("dh", "N", 1), ("dc", "N", 1)),
    "gru_forward_steps": (("gx", "T", 3), ("W_hh", "W", 3), ("b_hh", "b", 3), ("hs", "T+1", 1),
                          ("saved", "T|1", 4), ("gh", "N", 3)),
    "gru_backward_steps": (("dout", "T", 1), ("W_hh", "W", 3), ("hs", "T+1", 1),
                           ("saved", "T", 4), ("dgx", "T", 3), ("dgh", "T", 3), ("dh", "N", 1),
                           ("carry", "N", 1)),
}
STEPS_NAMES = {op: tuple(name for name, _, _ in args) for op, args in STEPS_ARGS.items()}


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


def check_steps(op, arrays):
    """(T, N, H) of a time-loop op's arrays, or a ValueError naming the first of a wrong shape."""
    args = STEPS_ARGS[op]
    ref_name, ref = next((name, a) for (name, lead, _), a in zip(args, arrays, strict=True)
                         if lead == "T+1")
    if getattr(ref, "ndim", None) != 3 or ref.shape[0] < 2 or 0 in ref.shape:
        got = f"shape {tuple(ref.shape)}" if hasattr(ref, "shape") else type(ref).__name__
        raise ValueError(f"{ref_name}: expected a 3-D array (time steps + 1 >= 2, batch >= 1, "
                         f"hidden size >= 1), got {got}")
    T, N, H = ref.shape[0] - 1, ref.shape[1], ref.shape[2]
    for (name, lead, k), a in zip(args, arrays, strict=True):
        if not hasattr(a, "shape"):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
        shape = tuple(a.shape)
        if lead == "W":
            expect = ((k * H, H),)
            what = f" ({k} gate(s) x hidden size {H}, hidden size; {ref_name} has hidden size {H})"
        elif lead == "b":
            expect = ((k * H,),)
            what = f" ({k} gate(s) x hidden size {H}, as {ref_name})"
        else:
            width = k * H
            per = f"batch {N}, {'' if k == 1 else f'{k} x '}hidden size {H}, as {ref_name}"
            if lead == "N":
                expect, what = ((N, width),), f" ({per})"
            elif lead == "T+1":
                expect, what = ((T + 1, N, width),), f" (time steps + 1 = {T + 1}, {per})"
            elif lead == "T":
                expect, what = ((T, N, width),), f" (time steps {T}, {per})"
            else:  # "T|1"
                expect = ((T, N, width), (1, N, width))
                what = f" (time steps {T}, or 1 to keep the last step only; {per})"
        if shape not in expect:
            raise ValueError(f"{name}: expected shape {' or '.join(map(str, expect))}{what}, got "
                             f"shape {shape}")
    return T, N, H


def check_gemm(op, A, B, out, vec=None):
    """A ValueError unless the operands of ``rows_gemm`` (out = A B + bias) or ``weight_gemm``
    (out = Aᵀ B, db = Σ_rows A) are 2-D, their inner sizes agree, out has the product's shape and
    the vector (bias or db, when given) as many entries as out has columns (rows)."""
    names = {"rows_gemm": ("A", "B", "out"), "weight_gemm": ("dG", "A", "dW")}[op]
    for name, a in zip(names, (A, B, out), strict=True):
        if getattr(a, "ndim", None) != 2:
            got = f"shape {tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
            raise ValueError(f"{name}: expected a 2-D array, got {got}")
    if op == "rows_gemm":
        inner, shape, what = (A.shape[1], B.shape[0]), (A.shape[0], B.shape[1]), "matching inner sizes"
    else:
        inner, shape, what = (A.shape[0], B.shape[0]), (A.shape[1], B.shape[1]), "as many rows"
    if inner[0] != inner[1]:
        raise ValueError(f"{names[0]}, {names[1]}: expected {what}, got shapes {tuple(A.shape)} "
                         f"and {tuple(B.shape)}")
    if tuple(out.shape) != shape:
        raise ValueError(f"{names[2]}: expected shape {shape}, got shape {tuple(out.shape)}")
    if vec is not None:
        want = (shape[1],) if op == "rows_gemm" else (shape[0],)
        if tuple(getattr(vec, "shape", ())) != want:
            name = "bias" if op == "rows_gemm" else "db"
            got = f"shape {tuple(vec.shape)}" if hasattr(vec, "shape") else type(vec).__name__
            raise ValueError(f"{name}: expected shape {want}, got {got}")


def check_second_operand(dG, A2, dW2):
    """Whether ``weight_gemm`` has a second product dW2 = dGᵀ A2 (both given, their shapes
    checked), or a ValueError naming the one given alone."""
    if A2 is None and dW2 is None:
        return False
    if A2 is None or dW2 is None:
        raise ValueError(f"{'A2' if A2 is None else 'dW2'}: expected an array with "
                         f"{'dW2' if A2 is None else 'A2'} (the second product dW2 = dGᵀ A2), "
                         f"got None")
    names = ("dG", "A2", "dW2")
    for name, a in zip(names, (dG, A2, dW2), strict=True):
        if getattr(a, "ndim", None) != 2:
            got = f"shape {tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
            raise ValueError(f"{name}: expected a 2-D array, got {got}")
    if A2.shape[0] != dG.shape[0]:
        raise ValueError(f"dG, A2: expected as many rows, got shapes {tuple(dG.shape)} and "
                         f"{tuple(A2.shape)}")
    if tuple(dW2.shape) != (dG.shape[1], A2.shape[1]):
        raise ValueError(f"dW2: expected shape {(dG.shape[1], A2.shape[1])}, got shape "
                         f"{tuple(dW2.shape)}")
    return True


def step_order(T, reverse):
    """(t, prev, cur) in the order a direction runs: h_t is computed from hs[prev] into hs[cur]."""
    if not reverse:
        return [(t, t, t + 1) for t in range(T)]
    return [(t, t + 1, t) for t in reversed(range(T))]


def check_act(activation):
    """The RNN nonlinearity, checked."""
    if activation not in RNN_ACTIVATIONS:
        raise ValueError(f"nonlinearity: expected one of {RNN_ACTIVATIONS}, got {activation!r}")
    return activation


class RecurrentOps:
    """Plain-xp recurrent cell ops (a mixin of ``ReferenceOps``: uses ``self.xp`` and ``sigmoid``)."""

    # ---- the layers' GEMMs over all T·N rows --------------------------------------------------
    def row_chunks(self, op, rows):
        """0: every GEMM of op ``op`` ("steps", "rows_gemm", "weight_gemm") is one call of the
        matmul given, on the calling thread (a fused set may split the rows: kernels/cpu)."""
        return 0

    def rows_gemm(self, A, B, out, bias=None, matmul=None):
        """out = A B (+ bias) (A (M, K) C-contiguous, B (K, N) or a transposed view, bias (N,)):
        the input projections x W_ihᵀ + b_ih and the input gradients dG W_ih of all steps at once."""
        check_gemm("rows_gemm", A, B, out, bias)
        (self.xp.matmul if matmul is None else matmul)(A, B, out=out)
        if bias is not None:
            self.bias_act(out, bias, "identity", out)
        return out

    def weight_gemm(self, dG, A, dW, db=None, matmul=None, A2=None, dW2=None):
        """dW = dGᵀ A over all rows (BP3: dG (M, G·H), A (M, K), both C-contiguous; dW (G·H, K));
        with db (G·H,) also db = Σ_rows dG (BP4). With A2 (M, K2) and dW2 (G·H, K2) also
        dW2 = dGᵀ A2, the same dG's second product (an RNN's or LSTM's dW_ih and dW_hh), which a
        fused set may run as one GEMM on [A, A2]."""
        check_gemm("weight_gemm", dG, A, dW, db)
        pair = check_second_operand(dG, A2, dW2)
        (self.xp.matmul if matmul is None else matmul)(dG.T, A, out=dW)
        if db is not None:
            self.bias_grad(dG, db)
        if pair:
            (self.xp.matmul if matmul is None else matmul)(dG.T, A2, out=dW2)
        return dW

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

    def rnn_forward_steps(self, gx, W_hh, b_hh, hs, gh, activation, reverse=False, matmul=None):
        """All T steps of one RNN direction: gh = h_prev W_hhᵀ (gh a workspace), then
        ``rnn_cell``; hs[1:] (reverse: hs[:T]) written from the initial state in hs[0] (hs[T])."""
        check_act(activation)
        T, _, _ = check_steps("rnn_forward_steps", (gx, W_hh, b_hh, hs, gh))
        mm = self.xp.matmul if matmul is None else matmul
        W_hhT = W_hh.T
        for t, p, c in step_order(T, reverse):
            mm(hs[p], W_hhT, out=gh)
            self.rnn_cell(gx[t], gh, b_hh, hs[c], activation)
        return hs

    def rnn_backward_steps(self, dout, W_hh, hs, dpre, dh, activation, reverse=False,
                           state_grad=True, matmul=None):
        """Backward through all T steps of one RNN direction, last step first: dpre (T, N, H) the
        pre-activation gradients; dh (N, H) goes in as ∂C/∂(final state) and comes out as
        ∂C/∂(initial state) (with ``state_grad``; else the step-0 GEMM is skipped, dh undefined)."""
        check_act(activation)
        T, _, _ = check_steps("rnn_backward_steps", (dout, W_hh, hs, dpre, dh))
        mm = self.xp.matmul if matmul is None else matmul
        for i, (t, _, c) in enumerate(step_order(T, reverse)[::-1]):
            self.rnn_cell_backward(dout[t], dh, hs[c], dpre[t], activation)
            if i < T - 1 or state_grad:
                mm(dpre[t], W_hh, out=dh)  # the part of ∂C/∂h_prev through W_hh
        return dpre, dh

    # ---- LSTM --------------------------------------------------------------------------------
    def lstm_forward_steps(self, gx, W_hh, b_hh, hs, cs, gates, gh, reverse=False, matmul=None):
        """All T steps of one LSTM direction: gh = h_prev W_hhᵀ (gh a workspace), then
        ``lstm_cell``; hs, cs from the initial state as ``rnn_forward_steps``; gates (T, N, 4H)
        saved per step, or (1, N, 4H): the last step's only (inference)."""
        T, _, _ = check_steps("lstm_forward_steps", (gx, W_hh, b_hh, hs, cs, gates, gh))
        mm = self.xp.matmul if matmul is None else matmul
        W_hhT, keep = W_hh.T, gates.shape[0] == T
        for t, p, c in step_order(T, reverse):
            mm(hs[p], W_hhT, out=gh)
            self.lstm_cell(gx[t], gh, b_hh, cs[p], hs[c], cs[c], gates[t if keep else 0])
        return hs, cs

    def lstm_backward_steps(self, dout, W_hh, cs, gates, dgates, dh, dc, reverse=False,
                            state_grad=True, matmul=None):
        """Backward through all T steps of one LSTM direction, last step first: dgates (T, N, 4H);
        dh, dc (N, H) go in as the final state's gradients and come out as the initial state's
        (with ``state_grad``; else the step-0 GEMM is skipped and dh is undefined)."""
        T, _, _ = check_steps("lstm_backward_steps", (dout, W_hh, cs, gates, dgates, dh, dc))
        mm = self.xp.matmul if matmul is None else matmul
        for i, (t, p, c) in enumerate(step_order(T, reverse)[::-1]):
            self.lstm_cell_backward(dout[t], dh, dc, cs[p], cs[c], gates[t], dgates[t])
            if i < T - 1 or state_grad:
                mm(dgates[t], W_hh, out=dh)
        return dgates, dh, dc

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
    def gru_forward_steps(self, gx, W_hh, b_hh, hs, saved, gh, reverse=False, matmul=None):
        """All T steps of one GRU direction: gh = h_prev W_hhᵀ (gh a workspace), then
        ``gru_cell``; hs from the initial state as ``rnn_forward_steps``; saved (T, N, 4H) per
        step, or (1, N, 4H): the last step's only (inference)."""
        T, _, _ = check_steps("gru_forward_steps", (gx, W_hh, b_hh, hs, saved, gh))
        mm = self.xp.matmul if matmul is None else matmul
        W_hhT, keep = W_hh.T, saved.shape[0] == T
        for t, p, c in step_order(T, reverse):
            mm(hs[p], W_hhT, out=gh)
            self.gru_cell(gx[t], gh, b_hh, hs[p], hs[c], saved[t if keep else 0])
        return hs

    def gru_backward_steps(self, dout, W_hh, hs, saved, dgx, dgh, dh, carry, reverse=False,
                           state_grad=True, matmul=None):
        """Backward through all T steps of one GRU direction, last step first: dgx, dgh (T, N, 3H);
        dh (N, H) goes in as the final state's gradient and comes out as the initial state's (with
        ``state_grad``: the part through W_hh plus ``carry``'s; else dh is undefined); carry (N, H)
        the part passed straight through z ⊙ · (zeros going in)."""
        T, _, _ = check_steps("gru_backward_steps", (dout, W_hh, hs, saved, dgx, dgh, dh, carry))
        mm = self.xp.matmul if matmul is None else matmul
        for i, (t, p, _) in enumerate(step_order(T, reverse)[::-1]):
            self.gru_cell_backward(dout[t], dh, carry, hs[p], saved[t], dgx[t], dgh[t])
            if i < T - 1 or state_grad:
                mm(dgh[t], W_hh, out=dh)
        if state_grad:
            dh += carry
        return dgx, dgh, dh

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
