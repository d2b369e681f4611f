"""CUDA recurrent-cell ops: one RNN, LSTM or GRU time step, forward and backward, one kernel each.

One thread per (n, j) hidden unit, in a grid-stride loop over the N·H units of the step: the thread
reads the G gate pre-activations of its unit, and writes its unit's state and saved gates (the
equations are in ``kernels/reference/recurrent.py``). Consecutive threads take consecutive j, so
every access of a gate block is coalesced. All arithmetic is in the arrays' dtype.
"""

import math

from gpubackprop.kernels import checks
from gpubackprop.kernels.cuda.launch import cuda, device_function, kernel_body
from gpubackprop.kernels.reference.recurrent import CELL_NAMES, check_act, check_cell

RNN_TANH, RNN_RELU = 0, 1


@device_function
def _sigmoid(z, like):
    """σ(z) in the dtype of ``like``, split at 0 so that exp never overflows."""
    zero, one = like.dtype.type(0), like.dtype.type(1)
    e = math.exp(-abs(z))
    return one / (one + e) if z >= zero else e / (one + e)


# ---- RNN -------------------------------------------------------------------------------------------
@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, ::1], int64)")
def _rnn_cell(gx, gh, b, h, act):
    N, H = h.shape
    zero = h.dtype.type(0)
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        z = gx[n, j] + gh[n, j] + b[j]
        if act == RNN_TANH:
            h[n, j] = math.tanh(z)
        else:
            h[n, j] = zero if z < zero else z  # keeps NaN, as np.maximum does


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], int64)")
def _rnn_cell_backward(dh_out, dh_rec, h, dpre, act):
    N, H = h.shape
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        d = dh_out[n, j] + dh_rec[n, j]
        s = h[n, j]
        if act == RNN_TANH:
            dpre[n, j] = d * (one - s * s)
        else:
            dpre[n, j] = d if s > zero else zero


# ---- LSTM (gates i, f, g, o) -------------------------------------------------------------------------
@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], "
             "{t}[:, ::1])")
def _lstm_cell(gx, gh, b, c_prev, h, c, gates):
    N, H = h.shape
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        i = _sigmoid(gx[n, j] + gh[n, j] + b[j], h)
        f = _sigmoid(gx[n, H + j] + gh[n, H + j] + b[H + j], h)
        g = math.tanh(gx[n, 2 * H + j] + gh[n, 2 * H + j] + b[2 * H + j])
        o = _sigmoid(gx[n, 3 * H + j] + gh[n, 3 * H + j] + b[3 * H + j], h)
        ct = f * c_prev[n, j] + i * g
        c[n, j] = ct
        h[n, j] = o * math.tanh(ct)
        gates[n, j] = i
        gates[n, H + j] = f
        gates[n, 2 * H + j] = g
        gates[n, 3 * H + j] = o


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], "
             "{t}[:, ::1])")
def _lstm_cell_backward(dh_out, dh_rec, dc, c_prev, c, gates, dgates):
    N, H = c.shape
    one = c.dtype.type(1)
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        i, f = gates[n, j], gates[n, H + j]
        g, o = gates[n, 2 * H + j], gates[n, 3 * H + j]
        dh = dh_out[n, j] + dh_rec[n, j]
        tc = math.tanh(c[n, j])
        dct = dc[n, j] + dh * o * (one - tc * tc)
        dgates[n, j] = dct * g * i * (one - i)
        dgates[n, H + j] = dct * c_prev[n, j] * f * (one - f)
        dgates[n, 2 * H + j] = dct * i * (one - g * g)
        dgates[n, 3 * H + j] = dh * tc * o * (one - o)
        dc[n, j] = dct * f


# ---- GRU (gates r, z, n; saved r, z, n, hn) -------------------------------------------------------
@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1])")
def _gru_cell(gx, gh, b, h_prev, h, saved):
    N, H = h.shape
    one = h.dtype.type(1)
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        r = _sigmoid(gx[n, j] + (gh[n, j] + b[j]), h)
        z = _sigmoid(gx[n, H + j] + (gh[n, H + j] + b[H + j]), h)
        hn = gh[n, 2 * H + j] + b[2 * H + j]
        nn = math.tanh(gx[n, 2 * H + j] + r * hn)
        h[n, j] = (one - z) * nn + z * h_prev[n, j]
        saved[n, j] = r
        saved[n, H + j] = z
        saved[n, 2 * H + j] = nn
        saved[n, 3 * H + j] = hn


@kernel_body("void({t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], "
             "{t}[:, ::1])")
def _gru_cell_backward(dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
    N, H = dh.shape
    one = dh.dtype.type(1)
    for idx in range(cuda.grid(1), N * H, cuda.gridsize(1)):
        n = idx // H
        j = idx - n * H
        r, z = saved[n, j], saved[n, H + j]
        nn, hn = saved[n, 2 * H + j], saved[n, 3 * H + j]
        d = dh_out[n, j] + dh_rec[n, j] + dh[n, j]
        dn = d * (one - z) * (one - nn * nn)
        dr = dn * hn * r * (one - r)
        dz = d * (h_prev[n, j] - nn) * z * (one - z)
        dgx[n, j] = dr
        dgx[n, H + j] = dz
        dgx[n, 2 * H + j] = dn
        dgh[n, j] = dr
        dgh[n, H + j] = dz
        dgh[n, 2 * H + j] = dn * r
        dh[n, j] = d * z


class RecurrentOps:
    """Fused recurrent cell ops (a mixin of ``CudaOps``): one kernel per time step, a thread a unit."""

    def rnn_cell(self, gx, gh, b_hh, h, activation):
        """h = act(gx + gh + b_hh), act "tanh" or "relu"; one kernel."""
        args = (gx, gh, b_hh, h)
        dt = checks.float_arrays(CELL_NAMES["rnn_cell"], *args)
        check_cell("rnn_cell", args)
        act = RNN_RELU if check_act(activation) == "relu" else RNN_TANH
        self.launch(_rnn_cell, h.size, dt, *args, act)
        return h

    def rnn_cell_backward(self, dh_out, dh_rec, h, dpre, activation):
        """dpre = (dh_out + dh_rec) ⊙ act'(·), act' from h; one kernel."""
        args = (dh_out, dh_rec, h, dpre)
        dt = checks.float_arrays(CELL_NAMES["rnn_cell_backward"], *args)
        check_cell("rnn_cell_backward", args)
        act = RNN_RELU if check_act(activation) == "relu" else RNN_TANH
        self.launch(_rnn_cell_backward, h.size, dt, *args, act)
        return dpre

    def lstm_cell(self, gx, gh, b_hh, c_prev, h, c, gates):
        """One LSTM step (gates i, f, g, o activated and saved), one kernel."""
        args = (gx, gh, b_hh, c_prev, h, c, gates)
        dt = checks.float_arrays(CELL_NAMES["lstm_cell"], *args)
        check_cell("lstm_cell", args)
        self.launch(_lstm_cell, h.size, dt, *args)
        return h, c

    def lstm_cell_backward(self, dh_out, dh_rec, dc, c_prev, c, gates, dgates):
        """The gate pre-activation gradients; dc from ∂C/∂c_t to ∂C/∂c_{t−1} in place; one kernel."""
        args = (dh_out, dh_rec, dc, c_prev, c, gates, dgates)
        dt = checks.float_arrays(CELL_NAMES["lstm_cell_backward"], *args)
        check_cell("lstm_cell_backward", args)
        self.launch(_lstm_cell_backward, c.size, dt, *args)
        return dgates, dc

    def gru_cell(self, gx, gh, b_hh, h_prev, h, saved):
        """One GRU step (r, z, n and hn saved), one kernel."""
        args = (gx, gh, b_hh, h_prev, h, saved)
        dt = checks.float_arrays(CELL_NAMES["gru_cell"], *args)
        check_cell("gru_cell", args)
        self.launch(_gru_cell, h.size, dt, *args)
        return h

    def gru_cell_backward(self, dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
        """dgx, dgh (input- and hidden-side pre-activation gradients); dh carried in place."""
        args = (dh_out, dh_rec, dh, h_prev, saved, dgx, dgh)
        dt = checks.float_arrays(CELL_NAMES["gru_cell_backward"], *args)
        check_cell("gru_cell_backward", args)
        self.launch(_gru_cell_backward, dh.size, dt, *args)
        return dgx, dgh, dh
