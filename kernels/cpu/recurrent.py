"""CPU recurrent-cell ops: one RNN, LSTM or GRU time step, forward and backward, each one pass.

Each kernel runs over the (n, j) hidden units of one step: it reads the n-th rows of the gate
pre-activations at the G gates of unit j, and writes unit j's state and saved gates (see
``kernels/reference/recurrent.py`` for the equations). The arithmetic is the reference's, in its
order, in the arrays' dtype. The per-step arrays are small (batch x hidden), so the kernels are
serial: a parallel region per time step would cost more than it saves.
"""

from numba import njit

from gpubackprop.kernels import checks
from gpubackprop.kernels.cpu.dense import _sigmoid
from gpubackprop.kernels.cpu.numerics import _tanh
from gpubackprop.kernels.reference.recurrent import CELL_NAMES, check_act, check_cell

RNN_TANH, RNN_RELU = 0, 1


# ---- RNN -------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _rnn_cell(gx, gh, b, h, act):
    N, H = h.shape
    zero = h.dtype.type(0)
    for n in range(N):
        if act == RNN_TANH:
            for j in range(H):
                h[n, j] = _tanh(gx[n, j] + gh[n, j] + b[j])
        else:
            for j in range(H):
                z = gx[n, j] + gh[n, j] + b[j]
                h[n, j] = zero if z < zero else z  # keeps NaN, as np.maximum does


@njit(cache=True, error_model="numpy")
def _rnn_cell_backward(dh_out, dh_rec, h, dpre, act):
    N, H = h.shape
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(N):
        if act == RNN_TANH:
            for j in range(H):
                s = h[n, j]
                dpre[n, j] = (dh_out[n, j] + dh_rec[n, j]) * (one - s * s)
        else:
            for j in range(H):
                dpre[n, j] = dh_out[n, j] + dh_rec[n, j] if h[n, j] > zero else zero


# ---- LSTM (gates i, f, g, o) -------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _lstm_cell(gx, gh, b, c_prev, h, c, gates):
    # Row by row, one loop per kind of gate and one for the state: each loop runs one activation
    # over contiguous memory, so that LLVM vectorizes it (one loop over all four gates does not).
    # Loops run from 0 with the offset added inside: an index known to be >= 0 needs no
    # wraparound check, which would keep the loop scalar (range(2 * H, 3 * H) ran 3x slower).
    N, H = h.shape
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(N):
        for j in range(2 * H):  # i, f
            gates[n, j] = _sigmoid(gx[n, j] + gh[n, j] + b[j], zero, one)
        for j in range(H):  # g
            q = 2 * H + j
            gates[n, q] = _tanh(gx[n, q] + gh[n, q] + b[q])
        for j in range(H):  # o
            q = 3 * H + j
            gates[n, q] = _sigmoid(gx[n, q] + gh[n, q] + b[q], zero, one)
        i, f, g, o = gates[n, :H], gates[n, H:2 * H], gates[n, 2 * H:3 * H], gates[n, 3 * H:]
        for j in range(H):
            ct = f[j] * c_prev[n, j] + i[j] * g[j]
            c[n, j] = ct
            h[n, j] = o[j] * _tanh(ct)


@njit(cache=True, error_model="numpy")
def _lstm_cell_backward(dh_out, dh_rec, dc, c_prev, c, gates, dgates):
    # Two loops a row, each over few arrays: with every array in one loop, LLVM gives up on the
    # runtime alias checks that vectorizing needs. The first leaves ∂C/∂c_t (dct) in dc.
    N, H = c.shape
    one = c.dtype.type(1)
    for n in range(N):
        for j in range(H):
            o = gates[n, 3 * H + j]
            dh = dh_out[n, j] + dh_rec[n, j]
            tc = _tanh(c[n, j])
            dc[n, j] = dc[n, j] + dh * o * (one - tc * tc)
            dgates[n, 3 * H + j] = dh * tc * o * (one - o)
        for j in range(H):
            i, f, g = gates[n, j], gates[n, H + j], gates[n, 2 * H + j]
            dct = dc[n, j]
            dgates[n, j] = dct * g * i * (one - i)
            dgates[n, H + j] = dct * c_prev[n, j] * f * (one - f)
            dgates[n, 2 * H + j] = dct * i * (one - g * g)
            dc[n, j] = dct * f


# ---- GRU (gates r, z, n; saved r, z, n, hn) -------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _gru_cell(gx, gh, b, h_prev, h, saved):
    # One loop per kind of gate, as in _lstm_cell, so that each vectorizes.
    N, H = h.shape
    zero, one = h.dtype.type(0), h.dtype.type(1)
    for n in range(N):
        for j in range(2 * H):  # r, z
            saved[n, j] = _sigmoid(gx[n, j] + (gh[n, j] + b[j]), zero, one)
        r, nn, hn = saved[n, :H], saved[n, 2 * H:3 * H], saved[n, 3 * H:]
        for j in range(H):
            q = 2 * H + j
            hnj = gh[n, q] + b[q]
            hn[j] = hnj
            nn[j] = _tanh(gx[n, q] + r[j] * hnj)
        z = saved[n, H:2 * H]
        for j in range(H):
            h[n, j] = (one - z[j]) * nn[j] + z[j] * h_prev[n, j]


@njit(cache=True, error_model="numpy")
def _gru_cell_backward(dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
    N, H = dh.shape
    one = dh.dtype.type(1)
    for n in range(N):
        for j in range(H):
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
    """Fused recurrent cell ops (a mixin of ``CpuOps``): one Numba pass per time step."""

    def rnn_cell(self, gx, gh, b_hh, h, activation):
        """h = act(gx + gh + b_hh), act "tanh" or "relu"; one pass."""
        args = (gx, gh, b_hh, h)
        checks.float_arrays(CELL_NAMES["rnn_cell"], *args)
        check_cell("rnn_cell", args)
        _rnn_cell(*args, RNN_RELU if check_act(activation) == "relu" else RNN_TANH)
        return h

    def rnn_cell_backward(self, dh_out, dh_rec, h, dpre, activation):
        """dpre = (dh_out + dh_rec) ⊙ act'(·), act' from h; one pass."""
        args = (dh_out, dh_rec, h, dpre)
        checks.float_arrays(CELL_NAMES["rnn_cell_backward"], *args)
        check_cell("rnn_cell_backward", args)
        _rnn_cell_backward(*args, RNN_RELU if check_act(activation) == "relu" else RNN_TANH)
        return dpre

    def lstm_cell(self, gx, gh, b_hh, c_prev, h, c, gates):
        """One LSTM step (gates i, f, g, o activated and saved), one pass."""
        args = (gx, gh, b_hh, c_prev, h, c, gates)
        checks.float_arrays(CELL_NAMES["lstm_cell"], *args)
        check_cell("lstm_cell", args)
        _lstm_cell(*args)
        return h, c

    def lstm_cell_backward(self, dh_out, dh_rec, dc, c_prev, c, gates, dgates):
        """The gate pre-activation gradients; dc from ∂C/∂c_t to ∂C/∂c_{t−1} in place; one pass."""
        args = (dh_out, dh_rec, dc, c_prev, c, gates, dgates)
        checks.float_arrays(CELL_NAMES["lstm_cell_backward"], *args)
        check_cell("lstm_cell_backward", args)
        _lstm_cell_backward(*args)
        return dgates, dc

    def gru_cell(self, gx, gh, b_hh, h_prev, h, saved):
        """One GRU step (r, z, n and hn saved), one pass."""
        args = (gx, gh, b_hh, h_prev, h, saved)
        checks.float_arrays(CELL_NAMES["gru_cell"], *args)
        check_cell("gru_cell", args)
        _gru_cell(*args)
        return h

    def gru_cell_backward(self, dh_out, dh_rec, dh, h_prev, saved, dgx, dgh):
        """dgx, dgh (input- and hidden-side pre-activation gradients); dh carried in place."""
        args = (dh_out, dh_rec, dh, h_prev, saved, dgx, dgh)
        checks.float_arrays(CELL_NAMES["gru_cell_backward"], *args)
        check_cell("gru_cell_backward", args)
        _gru_cell_backward(*args)
        return dgx, dgh, dh
