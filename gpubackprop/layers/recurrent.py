"""Recurrent layers ``RNN``, ``LSTM``, ``GRU``, trained by backpropagation through time, and
``LastStep`` (a sequence to its last step).

Parameters, gate order and initialisation are PyTorch's (``nn.RNN``/``nn.LSTM``/``nn.GRU``), so
weights copy across 1:1: for each layer k, ``weight_ih_l{k}`` (G·H, I_k), ``weight_hh_l{k}``
(G·H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (G·H,), all drawn from U(−1/√H, 1/√H); G = 1 (RNN),
4 (LSTM: i, f, g, o), 3 (GRU: r, z, n, with b_hn inside the reset product).

``bidirectional=True`` adds per layer a reverse direction (``weight_ih_l{k}_reverse``, …, right
after layer k's own, PyTorch's order) that reads the sequence from its last step to its first; the
layer's output per step is [forward h_t, reverse h_t] (2·H), which layer k+1 reads (I_k = 2·H), and
states are (num_layers·2, N, H), layer-major (l0 forward, l0 reverse, l1 forward, …). The reverse
direction runs the same GEMMs and fused cell kernels, its time loop indexed backwards (no copy of
the sequence). ``dropout=p`` is applied, in training only, to every layer's output but the last,
as PyTorch; its mask is ``Dropout``'s counter-based hash (seed, layer key, step, index), recomputed
in backward, so the CPU and GPU kernel sets draw the same bits (PyTorch's own masks differ).

**Inside a Sequential** a recurrent layer maps each sample's sequence (T, F) to its output
sequence (T, H) (the last layer's h_t; (T, 2·H) if bidirectional), from a zero initial state; put
``LastStep()`` after it for a sequence-to-one model (``LSTM → LastStep → Dense``), or
``Flatten()`` to use every step. The model's ``input_shape`` is the per-sample (T, F):
``Sequential([...], input_shape=(T, F))``.

**With initial and final states**, ``run`` (the layer must belong to a built model, which owns its
parameters; a one-layer ``Sequential([lstm], input_shape=(T, F))`` will do)::

    out, h_n, backward = rnn.run(X, h0)                  # RNN and GRU: state h (L, N, H)
    out, (h_n, c_n), backward = lstm.run(X, (h0, c0))    # LSTM: state (h, c)
    dX, dh0 = backward(d_out, dh_n)                      # train=True only
    dX, (dh0, dc0) = backward(d_out, (dh_n, dc_n))

X is (N, T, F) with ``batch_first=True`` (the default), else (T, N, F); out likewise (…, D·H);
states are (num_layers·D, N, H) either way (D = 2 if bidirectional else 1), as in PyTorch. A
state of None is zeros (initial) or not used by the loss (gradient); ``backward`` adds the
parameter gradients to the model's, like every layer's backprop, and returns dX (None with
``input_grad=False``) and the initial state's gradient. ``forward`` (the layer protocol) is
``run`` with zero initial state and batch-major arrays; it needs ``batch_first=True``.

How it runs (time-major inside, so every per-step slice is contiguous), per layer k::

    gx = x W_ihᵀ + b_ih                       one GEMM over all T·N rows (rows_gemm)
    for t: gh = h_{t−1} W_hhᵀ                 one GEMM per step   } one time-loop op
           h_t (c_t) = cell(gx_t, gh, b_hh)   one cell per step   } (*_forward_steps)
  backward, t = T−1 … 0:
           dgx_t (dgh_t) = cell_backward(dout_t, dh_rec, …)   one cell per step  } one op
           dh_rec = dgh_t W_hh                                 one GEMM per step  } (*_backward_steps)
    ∂C/∂W_ih = Σ_t dgx_tᵀ x_t;  ∂C/∂W_hh = Σ_t dgh_tᵀ h_{t−1}   two GEMMs over all steps (BP3,
    ∂C/∂b_ih = Σ dgx;  ∂C/∂b_hh = Σ dgh                        weight_gemm) with the column sums
                                                                (BP4; one for RNN, LSTM, where
                                                                dgh = dgx: one weight_gemm for
                                                                both, one GEMM on [x, h_{t−1}] in
                                                                the fused CPU set)
    dx = Σ_d dgx_d W_ih_d                                       one GEMM per direction (rows_gemm):
                                                                the layer below's dout

The fused CPU set runs each of these ops in the same row chunks of the batch, one thread each
(see ``kernels/cpu/recurrent.py``); for an LSTM (``ops.lstm_input_in_steps``) it runs gx inside
the forward time loop instead, one GEMM a step on [x_t, h_{t−1}] with [W_ih; W_hh]ᵀ.
"""

import math
import warnings

import numpy as np

from gpubackprop.kernels.reference.recurrent import RNN_ACTIVATIONS
from gpubackprop.layers.base import Layer, fmt_shape, no_backprop
from gpubackprop.layers.registry import REQUIRED, SpecToken, register
from gpubackprop.validation import check_choice, drop_probability, positive_int

# Per mode: gates G, and the width (in H) of the per-step saved gates (0: none, h is enough).
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}
_SAVED = {"RNN": 0, "LSTM": 4, "GRU": 4}


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


class _Buffers:
    """Time-major buffers of one (N, T) run, per layer k and direction d: the input projections
    gx (T, N, G·H), the hidden states hs (T+1, N, H) and (LSTM) cs, (LSTM, GRU) the saved gates; per
    layer its input (``inputs``: x0, or the layer below's output after dropout); the backward
    buffers are made on first use.

    The forward direction keeps h_t at hs[t+1] (hs[0] = h0); the reverse one keeps h_t at hs[t]
    (hs[T] = h0), so both read their output steps as one contiguous slice in time order."""

    def __init__(self, layer, be, N, T, train):
        L, H, G, D = layer.num_layers, layer.hidden_size, layer._G, layer._D
        self.be, self.N, self.T = be, N, T
        self.x0 = be.empty((T, N, layer.input_size))
        self.gx = [[be.empty((T, N, G * H)) for _ in range(D)] for _ in range(L)]
        self.hs = [[be.empty((T + 1, N, H)) for _ in range(D)] for _ in range(L)]
        lstm = layer.mode == "LSTM"
        self.cs = [[be.empty((T + 1, N, H)) for _ in range(D)] for _ in range(L)] if lstm else None
        ts = T if train else 1  # inference keeps one step of saved gates
        S = _SAVED[layer.mode]
        self.saved = [[be.empty((ts, N, S * H)) for _ in range(D)] for _ in range(L)] if S else None
        # A bidirectional layer's output: both directions side by side (forward, then reverse).
        self.cat = [be.empty((T, N, D * H)) for _ in range(L)] if D == 2 else None
        drop = train and layer.dropout > 0
        self.dropped = [be.empty((T, N, D * H)) for _ in range(L - 1)] if drop else None
        self.inputs = [None] * L
        self.gh = be.empty((N, G * H))
        self.Y = be.empty((N, T, D * H))
        self.h_n = be.empty((L * D, N, H))
        self.c_n = be.empty((L * D, N, H)) if lstm else None
        self._more = {}

    def get(self, key, shape):
        """A backward buffer, made on first use."""
        buf = self._more.get(key)
        if buf is None:
            buf = self._more[key] = self.be.empty(shape)
        return buf


def _outputs(hs, d, T):
    """Direction d's h_0 … h_{T−1} in time order (a contiguous view)."""
    return hs[1:] if d == 0 else hs[:T]


def _previous(hs, d, T):
    """The state each step t read, in time order (h_{t−1} forward, h_{t+1} reverse)."""
    return hs[:T] if d == 0 else hs[1:]


class _Recurrent(Layer):
    """What RNN, LSTM and GRU share: parameters, shapes, the time loop and its backward pass."""

    mode = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=True,
                 dropout=0.0, bidirectional=False):
        self.input_size = positive_int(input_size, "input_size")
        self.hidden_size = positive_int(hidden_size, "hidden_size")
        self.num_layers = positive_int(num_layers, "num_layers")
        self.bias = _flag(bias, "bias")
        self.batch_first = _flag(batch_first, "batch_first")
        self.bidirectional = _flag(bidirectional, "bidirectional")
        self.dropout = drop_probability(dropout, "dropout")
        if self.dropout > 0 and self.num_layers == 1:
            # PyTorch's warning: dropout acts between layers, so one layer has none.
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={self.num_layers}", stacklevel=2)
        self._G = _GATES[self.mode]
        self._D = 2 if self.bidirectional else 1
        self._workspaces = {}

    def _extra_repr(self):
        return []

    def __repr__(self):
        args = [str(self.input_size), str(self.hidden_size)]
        if self.num_layers != 1:
            args.append(f"num_layers={self.num_layers}")
        args += self._extra_repr()
        if not self.bias:
            args.append("bias=False")
        if not self.batch_first:
            args.append("batch_first=False")
        if self.dropout:
            args.append(f"dropout={self.dropout!r}")
        if self.bidirectional:
            args.append("bidirectional=True")
        return f"{type(self).__name__}({', '.join(args)})"

    # ---- declaring --------------------------------------------------------------------------------
    def infer_shape(self, input_shape):
        F = self.input_size
        if len(input_shape) != 2:
            raise ValueError(f"expected a sequence per sample, of shape (T, {F}) (time steps x "
                             f"{F} input features), got shape {fmt_shape(input_shape)}")
        if input_shape[1] != F:
            raise ValueError(f"expected {F} input features per time step, got {input_shape[1]} "
                             f"(input shape {fmt_shape(input_shape)})")
        return (input_shape[0], self._D * self.hidden_size)

    def _layer_sizes(self):
        return [self.input_size] + [self._D * self.hidden_size] * (self.num_layers - 1)

    def _names(self):
        """Per (layer, direction), layer-major as PyTorch: the parameter-name suffix."""
        return [f"l{k}{'_reverse' if d else ''}" for k in range(self.num_layers)
                for d in range(self._D)]

    def param_specs(self):
        GH, H = self._G * self.hidden_size, self.hidden_size
        specs = []
        for k, n_in in enumerate(self._layer_sizes()):
            for d in range(self._D):
                s = f"l{k}{'_reverse' if d else ''}"
                specs += [(f"weight_ih_{s}", (GH, n_in)), (f"weight_hh_{s}", (GH, H))]
                if self.bias:
                    specs += [(f"bias_ih_{s}", (GH,)), (f"bias_hh_{s}", (GH,))]
        return specs

    def initial_params(self, rng):
        """PyTorch's reset_parameters: every weight and bias from U(−1/√H, 1/√H), in spec order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        return {name: rng.uniform(-bound, bound, shape) for name, shape in self.param_specs()}

    def config(self):
        cfg = {"input_size": self.input_size, "hidden_size": self.hidden_size,
               "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first}
        if self.dropout:  # only when set: configs (checkpoints) of plain layers stay as they were
            cfg["dropout"] = self.dropout
        if self.bidirectional:
            cfg["bidirectional"] = True
        return cfg

    # ---- binding ----------------------------------------------------------------------------------
    def attach(self, backend, params, grads, state, context, index):
        super().attach(backend, params, grads, state, context, index)
        names = self._names()  # index j = k·D + d
        self._W_ih = [params[f"weight_ih_{s}"] for s in names]
        self._W_hh = [params[f"weight_hh_{s}"] for s in names]
        self._dW_ih = [grads[f"weight_ih_{s}"] for s in names]
        self._dW_hh = [grads[f"weight_hh_{s}"] for s in names]
        if self.bias:
            self._b_ih = [params[f"bias_ih_{s}"] for s in names]
            self._b_hh = [params[f"bias_hh_{s}"] for s in names]
            self._db_ih = [grads[f"bias_ih_{s}"] for s in names]
            self._db_hh = [grads[f"bias_hh_{s}"] for s in names]
        else:
            zeros = backend.zeros((self._G * self.hidden_size,))
            self._b_ih = None
            self._b_hh = [zeros] * len(names)

    def dropout_layer_key(self, k):
        """The ``layer`` argument of the dropout hash for the mask after layer k: above every plain
        layer index (< 2^32), so no Dropout layer of the model draws the same bits."""
        return ((k + 1) << 32) | int(self.index or 0)

    # ---- the protocol: sequences in, sequences out, zero initial state ---------------------------
    def forward(self, X, train=False, input_grad=True):
        if not self.batch_first:
            raise ValueError(f"{self!r}: inside a model the batch comes first, (N, T, F); use "
                             f"batch_first=True there (batch_first=False is for run())")
        out, _, backward = self._run(X, None, train, input_grad, state_grad=False)
        if not train:
            return out, no_backprop

        def backprop(dY):
            dX, _ = backward(dY, None)
            return dX

        return out, backprop

    # ---- run: with initial and final states ------------------------------------------------------
    def run(self, X, state=None, train=False, input_grad=True):
        """(out, final state, backward) for the sequence batch X from ``state`` (None: zeros).

        X: (N, T, F) if batch_first else (T, N, F); state: h0 (num_layers·D, N, H), D = 2 if
        bidirectional else 1, for an LSTM (h0, c0). ``backward(d_out, d_state) -> (dX, d_state0)``
        when ``train``.
        """
        return self._run(X, state, train, input_grad, state_grad=True)

    def _run(self, X, state, train, input_grad, state_grad):
        be = self.backend
        if be is None:
            raise RuntimeError(f"{self!r}: not part of a built model; put it in one, e.g. "
                               f"Sequential([{type(self).__name__}(...)], input_shape=(T, F)), "
                               f"and use that model's backend (model.backend builds it)")
        N, T = self._check_x(X)
        h0, c0 = self._check_state(state, N, "state")
        if train:
            bufs = self.workspace((N, T), lambda: _Buffers(self, be, N, T, True))
        else:
            bufs = _Buffers(self, be, N, T, False)
        if self.batch_first:
            bufs.x0[...] = X.transpose(1, 0, 2)  # time-major inside: each step's rows contiguous
        else:
            bufs.x0[...] = X
        # The dropout masks of this pass: fixed now, so backward recomputes the same ones.
        drop = (self.context.seed, self.context.step) if train and self.dropout > 0 else None
        top = self._forward_layers(bufs, h0, c0, train, drop)
        if self.batch_first:
            out = bufs.Y
            out[...] = top.transpose(1, 0, 2)
        else:
            out = top  # contiguous; in inference a new buffer
        state_n = (bufs.h_n, bufs.c_n) if self.mode == "LSTM" else bufs.h_n
        if not train:
            return out, state_n, no_backprop

        def backward(d_out, d_state=None):
            return self._backward(bufs, d_out, d_state, input_grad, state_grad, drop)

        return out, state_n, backward

    def _check_x(self, X):
        want = "(N, T, " if self.batch_first else "(T, N, "
        want += f"{self.input_size})"
        if getattr(X, "ndim", None) != 3:
            got = f"shape {tuple(X.shape)}" if hasattr(X, "shape") else type(X).__name__
            raise ValueError(f"{self!r} input: expected a batch of sequences of shape {want}, got "
                             f"{got}")
        if X.shape[2] != self.input_size:
            raise ValueError(f"{self!r} input: expected shape {want} ({self.input_size} input "
                             f"features per step), got shape {tuple(X.shape)}")
        if X.dtype != self.backend.dtype:
            raise TypeError(f"{type(self).__name__} input: expected dtype {self.backend.dtype}, "
                            f"got {X.dtype}")
        N, T = (X.shape[0], X.shape[1]) if self.batch_first else (X.shape[1], X.shape[0])
        if N == 0 or T == 0:
            raise ValueError(f"{self!r} input: expected at least one sample and one time step, "
                             f"got shape {tuple(X.shape)}")
        return N, T

    def _check_state(self, state, N, name):
        """(h, c) device arrays or None, checked against (num_layers·D, N, H)."""
        if state is None:
            return None, None
        shape = (self.num_layers * self._D, N, self.hidden_size)
        axes = "(num_layers * 2, batch, hidden_size)" if self._D == 2 else \
            "(num_layers, batch, hidden_size)"
        if self.mode == "LSTM":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError(f"{name}: expected a pair (h, c) of arrays of shape {shape} "
                                 f"{axes} for an LSTM, got {type(state).__name__}")
            parts = ((f"{name}[0] (h)", state[0]), (f"{name}[1] (c)", state[1]))
        else:
            if isinstance(state, (tuple, list)):
                raise ValueError(f"{name}: expected one array h of shape {shape} for "
                                 f"{type(self).__name__} (a pair (h, c) is an LSTM's state), got "
                                 f"a {type(state).__name__}")
            parts = ((name, state),)
        out = []
        for what, a in parts:
            if a is None:
                out.append(None)
                continue
            if not hasattr(a, "shape") or tuple(a.shape) != shape:
                got = f"shape {tuple(a.shape)}" if hasattr(a, "shape") else type(a).__name__
                raise ValueError(f"{what}: expected shape {shape} {axes}, got {got}")
            if a.dtype != self.backend.dtype:
                raise TypeError(f"{what}: expected dtype {self.backend.dtype}, got {a.dtype}")
            out.append(a)
        return (out[0], out[1]) if len(out) == 2 else (out[0], None)

    # ---- the time loop -----------------------------------------------------------------------------
    def _forward_layers(self, bufs, h0, c0, train, drop):
        """Runs every layer and direction; returns the top layer's output (T, N, D·H)."""
        be = self.backend
        ops = be.ops
        N, T, H, D = bufs.N, bufs.T, self.hidden_size, self._D
        GH = self._G * H
        mode = self.mode
        x = bufs.x0
        for k in range(self.num_layers):
            bufs.inputs[k] = x
            for d in range(D):
                j = k * D + d
                gx, hs, gh = bufs.gx[k][d], bufs.hs[k][d], bufs.gh
                gx2 = gx.reshape(T * N, GH)
                # A kernel set may run an LSTM's input projection in its time loop (kernels/cpu).
                in_steps = mode == "LSTM" and getattr(ops, "lstm_input_in_steps", False)
                if not in_steps:
                    ops.rows_gemm(x.reshape(T * N, x.shape[2]), self._W_ih[j].T, gx2,
                                  self._b_ih[j] if self.bias else None, matmul=be.matmul)  # all steps
                first, last = (0, T) if d == 0 else (T, 0)
                if h0 is None:
                    hs[first] = 0
                else:
                    hs[first] = h0[j]
                W_hh, b_hh, reverse = self._W_hh[j], self._b_hh[j], d == 1
                if mode == "LSTM":
                    cs = bufs.cs[k][d]
                    if c0 is None:
                        cs[first] = 0
                    else:
                        cs[first] = c0[j]
                saved = bufs.saved[k][d] if bufs.saved else None  # inference: the last step's
                # The time loop, one op: per step gh = h_prev W_hhᵀ, then the cell.
                if mode == "RNN":
                    ops.rnn_forward_steps(gx, W_hh, b_hh, hs, gh, self.nonlinearity, reverse,
                                          matmul=be.matmul)
                elif mode == "LSTM" and in_steps:
                    ops.lstm_forward_steps(gx, W_hh, b_hh, hs, cs, saved, gh, reverse,
                                           matmul=be.matmul, x=x, W_ih=self._W_ih[j],
                                           b_ih=self._b_ih[j] if self.bias else None)
                elif mode == "LSTM":
                    ops.lstm_forward_steps(gx, W_hh, b_hh, hs, cs, saved, gh, reverse,
                                           matmul=be.matmul)
                else:
                    ops.gru_forward_steps(gx, W_hh, b_hh, hs, saved, gh, reverse, matmul=be.matmul)
                bufs.h_n[j] = hs[last]
                if mode == "LSTM":
                    bufs.c_n[j] = cs[last]
            if D == 1:
                x = bufs.hs[k][0][1:]
            else:
                x = bufs.cat[k]
                for d in range(D):
                    x[:, :, d * H:(d + 1) * H] = _outputs(bufs.hs[k][d], d, T)
            if drop is not None and k < self.num_layers - 1:
                ops.dropout(x, bufs.dropped[k], self.dropout, drop[0], self.dropout_layer_key(k),
                            drop[1])
                x = bufs.dropped[k]
        return x

    def _backward(self, bufs, d_out, d_state, input_grad, state_grad, drop):
        be = self.backend
        ops = be.ops
        N, T, H, L, D = bufs.N, bufs.T, self.hidden_size, self.num_layers, self._D
        GH, mode, DH = self._G * H, self.mode, self._D * self.hidden_size
        out_shape = (N, T, DH) if self.batch_first else (T, N, DH)
        dh_n, dc_n = self._check_state(d_state, N, "d_state")
        # The gradient reaching the top layer's outputs, time-major.
        dY = bufs.get("dout", (T, N, DH))
        if d_out is None:
            dY[...] = 0
        else:
            if tuple(d_out.shape) != out_shape or d_out.dtype != be.dtype:
                raise ValueError(f"d_out: expected shape {out_shape} and dtype {be.dtype} (the "
                                 f"output's), got shape {tuple(d_out.shape)}, dtype {d_out.dtype}")
            dY[...] = d_out.transpose(1, 0, 2) if self.batch_first else d_out
        dh0 = bufs.get("dh0", (L * D, N, H))
        dc0 = bufs.get("dc0", (L * D, N, H)) if mode == "LSTM" else None
        dh_rec = bufs.get("dh_rec", (N, H))
        carry = bufs.get("carry", (N, H)) if mode != "RNN" else None  # LSTM: dc; GRU: z ⊙ dh
        dgh = bufs.get("dgh", (T, N, GH)) if mode == "GRU" else None
        accumulate = self.take_accumulate()
        dX = None
        for k in reversed(range(L)):
            # Each direction's share of dY, contiguous per step for the cell kernels.
            if D == 1:
                douts = [dY]
            else:
                douts = [bufs.get(("dsplit", d), (T, N, H)) for d in range(D)]
                for d in range(D):
                    douts[d][...] = dY[:, :, d * H:(d + 1) * H]
            x = bufs.inputs[k]
            n_in = x.shape[2]
            x2 = x.reshape(T * N, n_in)
            below = k > 0 or input_grad
            dx = bufs.get(("dx", k == 0), (T, N, n_in)) if below else None
            for d in range(D):
                j = k * D + d
                hs, dout = bufs.hs[k][d], douts[d]
                dgx = bufs.gx[k][d]  # the forward pass is done with gx: its gradient overwrites it
                dg_h = dgh if mode == "GRU" else dgx  # RNN, LSTM: the same pre-activations
                saved = bufs.saved[k][d] if bufs.saved else None
                if dh_n is None:
                    dh_rec[...] = 0
                else:
                    dh_rec[...] = dh_n[j]
                if mode == "LSTM":
                    cs = bufs.cs[k][d]
                    if dc_n is None:
                        carry[...] = 0
                    else:
                        carry[...] = dc_n[j]
                elif mode == "GRU":
                    carry[...] = 0
                W_hh, reverse = self._W_hh[j], d == 1
                # The time loop backward, one op: per step (last first) the cell's backward, then
                # dh_rec = dG_t W_hh (the part of ∂C/∂h_prev through W_hh); dh_rec (and carry) end
                # as the initial state's gradient.
                if mode == "RNN":
                    ops.rnn_backward_steps(dout, W_hh, hs, dgx, dh_rec, self.nonlinearity, reverse,
                                           state_grad, matmul=be.matmul)
                elif mode == "LSTM":
                    ops.lstm_backward_steps(dout, W_hh, cs, saved, dgx, dh_rec, carry, reverse,
                                            state_grad, matmul=be.matmul)
                else:
                    ops.gru_backward_steps(dout, W_hh, hs, saved, dgx, dgh, dh_rec, carry, reverse,
                                           state_grad, matmul=be.matmul)
                if state_grad:
                    dh0[j] = dh_rec
                    if mode == "LSTM":
                        dc0[j] = carry
                # BP3/BP4 over all steps at once.
                dgx2, dgh2 = dgx.reshape(T * N, GH), dg_h.reshape(T * N, GH)
                hprev2 = _previous(hs, d, T).reshape(T * N, H)
                # BP4 with them: for an RNN and an LSTM dgh is dgx, so one column sum serves both,
                # and both weight gradients are one weight_gemm (dGᵀ x and dGᵀ h_prev, which the
                # fused CPU set runs as one GEMM on [x, h_prev]).
                gru, bias = mode == "GRU", self.bias
                if gru:
                    self._weight_grad(bufs, ("dW_ih", j), dgx2, x2, self._dW_ih[j], accumulate,
                                      self._db_ih[j] if bias else None)
                    self._weight_grad(bufs, ("dW_hh", j), dgh2, hprev2, self._dW_hh[j],
                                      accumulate, self._db_hh[j] if bias else None)
                else:
                    self._weight_grad(bufs, ("dW_ih", j), dgx2, x2, self._dW_ih[j], accumulate,
                                      self._db_ih[j] if bias else None,
                                      second=(("dW_hh", j), hprev2, self._dW_hh[j]))
                if bias and not gru:
                    if accumulate:
                        self._db_hh[j] += bufs.get(("dW_ih", j, "db"), self._db_ih[j].shape)
                    else:
                        self._db_hh[j][...] = self._db_ih[j]
                if below:  # dx = Σ_d dgx_d W_ih_d: the layer below's dout (or dX)
                    if d == 0:
                        ops.rows_gemm(dgx2, self._W_ih[j], dx.reshape(T * N, n_in),
                                      matmul=be.matmul)
                    else:
                        tmp = bufs.get(("dxtmp", k == 0), (T, N, n_in))
                        ops.rows_gemm(dgx2, self._W_ih[j], tmp.reshape(T * N, n_in),
                                      matmul=be.matmul)
                        dx += tmp
            if k > 0:
                if drop is not None:  # through the dropout on the layer below's output
                    ops.dropout_backward(dx, dx, self.dropout, drop[0],
                                         self.dropout_layer_key(k - 1), drop[1])
                dY = dx
            elif input_grad:
                if self.batch_first:
                    dX = bufs.get("dX", (N, T, self.input_size))
                    dX[...] = dx.transpose(1, 0, 2)
                else:
                    dX = dx
        if not state_grad:
            return dX, None
        return dX, ((dh0, dc0) if mode == "LSTM" else dh0)

    def _weight_grad(self, bufs, key, dG, A, dW, accumulate, db=None, second=None):
        """dW (+)= dGᵀ A, one GEMM over all T·N rows (BP3), and with db, db (+)= Σ_rows dG (BP4);
        with ``second`` = (key2, A2, dW2) also dW2 (+)= dGᵀ A2 in the same op; accumulating, the
        fresh sums stay in the buffers (key), (key, "db") and (key2)."""
        ops, matmul = self.backend.ops, self.backend.matmul
        key2, A2, dW2 = second if second is not None else (None, None, None)
        if not accumulate:
            ops.weight_gemm(dG, A, dW, db, matmul=matmul, A2=A2, dW2=dW2)
            return
        tmp = bufs.get(key, dW.shape)
        tmp_db = None if db is None else bufs.get((*key, "db"), db.shape)
        tmp2 = None if second is None else bufs.get(key2, dW2.shape)
        ops.weight_gemm(dG, A, tmp, tmp_db, matmul=matmul, A2=A2, dW2=tmp2)
        dW += tmp
        if db is not None:
            db += tmp_db
        if second is not None:
            dW2 += tmp2


class RNN(_Recurrent):
    """Elman RNN, h_t = act(x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh), act tanh or relu (PyTorch's
    nn.RNN). Inside a model: (N, T, input_size) -> (N, T, hidden_size); see ``run`` for states."""

    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=True, dropout=0.0, bidirectional=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional)
        self.nonlinearity = check_choice(nonlinearity, RNN_ACTIVATIONS, "nonlinearity")

    def _extra_repr(self):
        return [] if self.nonlinearity == "tanh" else [f"nonlinearity={self.nonlinearity!r}"]

    def config(self):
        return {**super().config(), "nonlinearity": self.nonlinearity}


class LSTM(_Recurrent):
    """Long short-term memory (PyTorch's nn.LSTM, gates i, f, g, o); state (h, c).
    Inside a model: (N, T, input_size) -> (N, T, hidden_size); see ``run`` for states."""

    mode = "LSTM"


class GRU(_Recurrent):
    """Gated recurrent unit (PyTorch's nn.GRU, gates r, z, n; n = tanh(W_in x + b_in +
    r ⊙ (W_hn h + b_hn))). Inside a model: (N, T, input_size) -> (N, T, hidden_size)."""

    mode = "GRU"


class LastStep(Layer):
    """(N, T, H) -> (N, H): the last time step of a sequence (sequence-to-one models).

    After a bidirectional layer this is ``out[:, -1]`` as in PyTorch: the forward direction's last
    step beside the reverse direction's first (the reverse half has then seen only x_{T−1})."""

    def __repr__(self):
        return "LastStep()"

    def infer_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"expected a sequence per sample, of shape (T, features), got shape "
                             f"{fmt_shape(input_shape)}")
        return (input_shape[1],)

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        N, T, H = X.shape
        if not train:
            return be.xp.ascontiguousarray(X[:, -1]), no_backprop
        Y, dX = self.workspace((N, T), lambda: (be.empty((N, H)), be.zeros((N, T, H))))
        Y[...] = X[:, -1]

        def backprop(dY):
            if not input_grad:
                return None
            dX[:, -1] = dY  # the other steps get no gradient: they stay 0 from the workspace's start
            return dX

        return Y, backprop


# ---- registry declarations ------------------------------------------------------------------
def _make_recurrent(kind):
    def make(ctx):
        shape, made = ctx.shape, []
        if len(shape) == 3 and shape[0] == 1:  # a one-channel image, row by row
            shape = shape[1:]
            made.append(("Reshape", {"shape": shape}))
        if len(shape) != 2:
            raise ctx.error(f"needs sequences (time steps, features), got {ctx.fmt(shape)}")
        kw = {"input_size": shape[1], "hidden_size": ctx.size("h"), "num_layers": ctx.params["layers"]}
        if ctx.params["bidir"]:
            kw["bidirectional"] = True
        if ctx.params["dropout"]:
            kw["dropout"] = ctx.params["dropout"]
        if kind == "RNN":
            kw["nonlinearity"] = "relu" if ctx.params["relu"] else "tanh"
        return made + [(kind, kw)]
    return make


_RECURRENT_ARGS = {"h": ("int", REQUIRED), "layers": ("int", 1), "bidir": ("bool", False),
                   "dropout": ("prob", 0.0)}
register(RNN, SpecToken("rnn", _make_recurrent("RNN"), {**_RECURRENT_ARGS, "relu": ("bool", False)},
                        positional=("h",), example="rnn(64)",
                        help="rnn(h,layers=1,bidir=false,dropout=0,relu=false)   Elman RNN (tanh, "
                             "or relu=true)"))
register(LSTM, SpecToken("lstm", _make_recurrent("LSTM"), _RECURRENT_ARGS, positional=("h",),
                         example="lstm(64)",
                         help="lstm(h,layers=1,bidir=false,dropout=0)   LSTM over sequences (time "
                              "steps, features) -> (time steps, h),\n                (time steps, "
                              "2h) with bidir=true; dropout between layers (in training);\n"
                              "                a one-channel image is read as its "
                              "rows, e.g. digits as 8 steps of 8 pixels"))
register(GRU, SpecToken("gru", _make_recurrent("GRU"), _RECURRENT_ARGS, positional=("h",),
                        example="gru(64)",
                        help="gru(h,layers=1,bidir=false,dropout=0)   GRU, as lstm"))
register(LastStep, SpecToken("last", lambda ctx: [("LastStep", {})], needs="sequence",
                             help="last          the last time step of a sequence: (time steps, h) -> h "
                                  "features, e.g. lstm(64)-last"))
