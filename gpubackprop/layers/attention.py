"""``MultiheadAttention``: scaled dot-product attention over ``num_heads`` heads, as
torch.nn.MultiheadAttention (batch_first=True, need_weights=False).

    x = gb.Input((T, E))
    pad = gb.Input((T,), dtype="bool")            # True = a padding key
    y = gb.MultiheadAttention(E, 4)(x, x, x, key_padding_mask=pad, is_causal=True)

Called on symbolic tensors ``mha(query, key, value, key_padding_mask=None, attn_mask=None,
is_causal=False)``: query (N, T_q, E), key and value (N, T_k, E) (self-attention: one tensor for
all three; cross-attention: key/value from another). The call returns the attention output
(N, T_q, E) only: PyTorch's need_weights=False (the averaged weights are not returned).

Masks, as PyTorch: ``attn_mask`` a host array (T_q, T_k), float (added to the scores, -inf
allowed) or bool (True = masked); ``is_causal=True`` (without attn_mask) masks the upper triangle
(key j > query i); ``key_padding_mask`` a symbolic bool input (N, T_k), True = a padding key. A
query row whose keys are all masked gets zero attention weights, so its output is the out_proj
bias, where PyTorch gives NaN. attn_mask and is_causal belong to the layer (they are saved with
it): a layer called at several places runs every call with the same ones (a later call repeats
them or gives none).

Parameters, PyTorch's names and layouts: ``in_proj_weight`` (3E, E) (the q, k, v projections
stacked), ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,) (no biases
with bias=False). Scores are Q Kᵀ/√(E/num_heads) per head; the softmax is one fused masked op
forward and backward (``ops.masked_softmax``); in training, dropout on the attention weights uses
Dropout's hashed masks (seed, layer, step), so it is reproducible but is not torch's draw.

How it runs: self-attention (one array for query, key and value) projects them in one GEMM
(N·T, E)·(E, 3E) and its backprop returns the summed input gradient in the query's place (None
for key and value; a graph sums a tensor's gradients anyway); other calls project each with its
own GEMM. The scores' 1/√D is folded into the query projection's weights and bias (a scaled
copy of in_proj, E·E + E values a step, rather than a pass over Q and another over its
gradient). The heads are strided views of the projections, which the batched GEMMs over N·H
read and write in place (no transposed copies); training buffers live in the use's workspace.
"""

import math

import numpy as np

from gpubackprop.layers.base import Layer, fmt_shape, no_backprop
from gpubackprop.layers.registry import register
from gpubackprop.validation import drop_probability, positive_int


def _mask_array(attn_mask):
    """attn_mask as a host float64 (added) array, or None; bools become 0 / -inf."""
    if attn_mask is None:
        return None
    a = np.asarray(attn_mask)
    if a.ndim != 2:
        raise ValueError(f"attn_mask: expected None or a 2-D (T_q, T_k) array, got shape {a.shape}")
    if a.dtype == np.bool_:
        return np.where(a, -np.inf, 0.0)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"attn_mask: expected a float (added) or bool (True = masked) array, got "
                        f"dtype {a.dtype}")
    a = a.astype(np.float64)
    if np.isnan(a).any() or (a == np.inf).any():
        raise ValueError("attn_mask: expected finite values or -inf, got NaN or +inf")
    return a


class MultiheadAttention(Layer):
    """Multi-head attention as torch.nn.MultiheadAttention(batch_first=True) (module docstring).

    ``attn_mask``/``is_causal`` may be given here or at the call; they are kept with the layer."""

    multi_input = True

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=True,
                 attn_mask=None, is_causal=False):
        self.embed_dim = positive_int(embed_dim, "embed_dim")
        self.num_heads = positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={self.embed_dim}, got "
                             f"{num_heads}")
        self.dropout = drop_probability(dropout, "dropout")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected True or False, got {bias!r}")
        self.bias = bias
        if batch_first is not True:
            raise ValueError(f"batch_first: expected True (graph tensors are (N, T, E), batch "
                             f"first), got {batch_first!r}")
        self.batch_first = True
        self._set_masks(attn_mask, is_causal)
        self._workspaces = {}

    def _set_masks(self, attn_mask, is_causal):
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal: expected True or False, got {is_causal!r}")
        mask = _mask_array(attn_mask)
        if is_causal and mask is not None:
            raise ValueError("is_causal: expected False when attn_mask is given (the causal mask is "
                             "made from the shapes); give one of them")
        self.attn_mask, self.is_causal = mask, is_causal

    def __repr__(self):
        extra = "" if self.dropout == 0 else f", dropout={self.dropout!r}"
        extra += "" if self.bias else ", bias=False"
        extra += ", is_causal=True" if self.is_causal else ""
        extra += ", attn_mask=..." if self.attn_mask is not None else ""
        return f"MultiheadAttention({self.embed_dim}, {self.num_heads}{extra})"

    def config(self):
        mask = None if self.attn_mask is None else self.attn_mask.tolist()  # JSON keeps -Infinity
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "dropout": self.dropout,
                "bias": self.bias, "batch_first": True, "attn_mask": mask,
                "is_causal": self.is_causal}

    def __call__(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None,
                 is_causal=False):
        """The node ``attention(query, key, value)`` of a graph (key, value default to query)."""
        from gpubackprop.layers.graph import apply, is_symbolic

        if isinstance(query, (list, tuple)) and key is None:  # [query, key, value(, mask)], as Add
            return apply(self, query)
        key = query if key is None else key
        value = key if value is None else value
        if attn_mask is not None or is_causal:
            self._call_masks(attn_mask, is_causal)
        inputs = [query, key, value] + ([] if key_padding_mask is None else [key_padding_mask])
        for name, t in zip(("query", "key", "value", "key_padding_mask"), inputs, strict=False):
            if not is_symbolic(t) or isinstance(t, (list, tuple)):
                raise TypeError(f"{name}: expected a symbolic tensor (gb.Input or a layer's "
                                f"output), got {type(t).__name__}")
        if key_padding_mask is not None and getattr(key_padding_mask, "dtype", None) != np.bool_:
            raise TypeError(f"key_padding_mask: expected a bool input (gb.Input((T_k,), "
                            f"dtype='bool')), got dtype {key_padding_mask.dtype}")
        out = apply(self, inputs)
        self._called = True
        return out

    def _call_masks(self, attn_mask, is_causal):
        """A call's masks become the layer's (its config): the first call of a layer without masks
        sets them; any other call gives the layer's own again (or none: a call without masks uses
        the layer's), since every use of a shared layer runs with the same ones."""
        before = self.attn_mask, self.is_causal
        self._set_masks(attn_mask, is_causal)
        if before[0] is None and not before[1] and not self.__dict__.get("_called"):
            return
        same = before[1] == self.is_causal and (
            before[0] is None if self.attn_mask is None
            else before[0] is not None and np.array_equal(before[0], self.attn_mask))
        if not same:
            self.attn_mask, self.is_causal = before
            raise ValueError(f"{self!r}: attn_mask/is_causal differ from this layer's (a layer "
                             f"takes one mask at every call)")

    # ---- declaring --------------------------------------------------------------------------------
    def build(self, input_shapes):
        shapes = [tuple(s) for s in input_shapes]
        if len(shapes) not in (3, 4):
            raise ValueError(f"expected query, key, value (and a key padding mask), got "
                             f"{len(shapes)} inputs")
        E = self.embed_dim
        (Tq, *_), (Tk, *_) = shapes[0], shapes[1]
        for name, s, T in zip(("query", "key", "value"), shapes, (Tq, Tk, Tk), strict=False):
            if s != (T, E):
                raise ValueError(f"{name}: expected shape (T, {E}) (and key, value of one length), "
                                 f"got {fmt_shape(s)}")
        if len(shapes) == 4 and shapes[3] != (Tk,):
            raise ValueError(f"key_padding_mask: expected shape ({Tk},) (T_k), got "
                             f"{fmt_shape(shapes[3])}")
        if self.attn_mask is not None and self.attn_mask.shape != (Tq, Tk):
            raise ValueError(f"attn_mask: expected shape ({Tq}, {Tk}) (T_q, T_k), got "
                             f"{self.attn_mask.shape}")
        self.input_shape, self.output_shape = shapes, (Tq, E)
        return self.output_shape

    def param_specs(self):
        E = self.embed_dim
        specs = [("in_proj_weight", (3 * E, E))] + ([("in_proj_bias", (3 * E,))] if self.bias else [])
        specs.append(("out_proj.weight", (E, E)))
        return specs + ([("out_proj.bias", (E,))] if self.bias else [])

    def initial_params(self, rng):
        """As torch: in_proj Xavier uniform, out_proj U(±1/√E) (Linear's default), biases zero."""
        E = self.embed_dim
        lim_in, lim_out = math.sqrt(6.0 / (E + 3 * E)), 1.0 / math.sqrt(E)
        out = {"in_proj_weight": rng.uniform(-lim_in, lim_in, (3 * E, E)),
               "out_proj.weight": rng.uniform(-lim_out, lim_out, (E, E))}
        if self.bias:
            out["in_proj_bias"], out["out_proj.bias"] = np.zeros(3 * E), np.zeros(E)
        return out

    # ---- running ----------------------------------------------------------------------------------
    def _base_mask(self, Tq, Tk):
        """The device (T_q, T_k) mask to add (None: none), made once per backend."""
        cached = self.__dict__.get("_mask_dev")
        if cached is not None and cached[0] is self.backend:
            return cached[1]
        mask = self.attn_mask
        if self.is_causal:
            mask = np.where(np.triu(np.ones((Tq, Tk), bool), k=1), -np.inf, 0.0)
        dev = None if mask is None else self.backend.xp.asarray(mask.astype(self.backend.dtype))
        self._mask_dev = (self.backend, dev)
        return dev

    def _check(self, Xs):
        if len(Xs) != len(self.input_shape):
            raise ValueError(f"{self!r}: expected {len(self.input_shape)} inputs, got {len(Xs)}")
        dt = self.backend.dtype
        for name, X, s in zip(("query", "key", "value"), Xs, self.input_shape, strict=False):
            if X.shape[1:] != s:
                raise ValueError(f"{self!r} {name}: expected shape (batch, {s[0]}, {s[1]}), got "
                                 f"{tuple(X.shape)}")
            if X.dtype != dt:
                raise TypeError(f"{self!r} {name}: expected dtype {dt}, got {X.dtype}")
        if len(Xs) == 4 and (Xs[3].dtype != np.bool_ or Xs[3].shape != (Xs[0].shape[0], s[0])):
            raise ValueError(f"{self!r} key_padding_mask: expected a bool array of shape "
                             f"({Xs[0].shape[0]}, {s[0]}), got {Xs[3].dtype} {tuple(Xs[3].shape)}")

    def _mask(self, ws, Xs, N, Tq, Tk):
        """The (N·H·T_q, T_k) mask the softmax adds (None: none): the layer's (T_q, T_k) mask and
        the key padding (-inf for a padding key), broadcast into the workspace's buffer."""
        base = self._base_mask(Tq, Tk)
        if len(Xs) < 4 and base is None:
            return None
        be = self.backend
        m4 = ws.get("mask", (N, self.num_heads, Tq, Tk))
        if len(Xs) == 4:
            pad = be.xp.where(Xs[3], be.dtype.type(-np.inf), be.dtype.type(0))[:, None, None, :]
            if base is None:
                m4[...] = pad
            else:
                be.xp.add(base[None, None], pad, out=m4)
        elif not ws.filled:  # the layer's own mask alone: the same every step
            m4[...] = base[None, None]
            ws.filled = True
        return m4.reshape(N * self.num_heads * Tq, Tk)

    def forward(self, Xs, train=False, input_grad=True):
        self._check(Xs)
        be = self.backend
        xp, ops = be.xp, be.ops
        mm = be.matmul  # xp.matmul, or cuBLAS by nvmath-python in a CUDA graph run
        # Self-attention (one array for query, key and value, as TransformerEncoderLayer runs it)
        # projects q, k and v in one GEMM (N·T, E)·(E, 3E) and sends the summed input gradient
        # back in the query's place; otherwise one GEMM each.
        fused = Xs[0] is Xs[1] and Xs[1] is Xs[2]
        q, k, v = (xp.ascontiguousarray(X) for X in Xs[:3])
        N, Tq, E = q.shape
        Tk, H = k.shape[1], self.num_heads
        D = E // H
        W, P = self.params["in_proj_weight"], self.params
        b = P.get("in_proj_bias")
        Wo, bo = P["out_proj.weight"], P.get("out_proj.bias")
        scale = be.dtype.type(1.0 / math.sqrt(D))
        ws = self.workspace((N, fused), lambda: _Workspace(be))
        # The scores' 1/√D goes into the query projection's weights and bias (E·E + E values a
        # step, where scaling Q itself would be a pass over N·T·E): Q/√D = X (W_q/√D)ᵀ + b_q/√D.
        Ws = ws.get("w", W.shape)
        xp.multiply(W[:E], scale, out=Ws[:E])
        Ws[E:] = W[E:]
        if b is not None:
            bs = ws.get("b", b.shape)
            xp.multiply(b[:E], scale, out=bs[:E])
            bs[E:] = b[E:]
        else:
            bs = None

        def heads(buf, T, slots, i):  # rows (N·T, slots·E) -> slot i's heads (N, H, T, D), a view
            return buf.reshape(N, T, slots, H, D)[:, :, i].transpose(0, 2, 1, 3)

        if fused:
            Pr = ws.get("qkv", (N * Tq, 3 * E))
            mm(q.reshape(N * Tq, E), Ws.T, out=Pr)  # [Q/√D K V] = X W_inᵀ, one GEMM
            if bs is not None:
                ops.bias_act(Pr, bs, "identity", Pr)
            bufs = [(Pr, 3, i) for i in range(3)]
        else:
            bufs = []
            for i, (x, T) in enumerate(((q, Tq), (k, Tk), (v, Tk))):
                Pi = ws.get(f"p{i}", (N * T, E))
                mm(x.reshape(N * T, E), Ws[i * E:(i + 1) * E].T, out=Pi)
                if bs is not None:
                    ops.bias_act(Pi, bs[i * E:(i + 1) * E], "identity", Pi)
                bufs.append((Pi, 1, 0))
        Qh, Kh, Vh = (heads(buf, T, slots, i) for (buf, slots, i), T in zip(bufs, (Tq, Tk, Tk),
                                                                                strict=True))
        # Scores per (sample, head), one batched GEMM over N·H; the heads are strided views of
        # the projections, which BLAS reads in place.
        S = ws.get("S", (N, H, Tq, Tk))
        mm(Qh, Kh.transpose(0, 1, 3, 2), out=S)
        S2 = S.reshape(N * H * Tq, Tk)
        A = ops.masked_softmax(S2, self._mask(ws, Xs, N, Tq, Tk), S2).reshape(N, H, Tq, Tk)
        p = self.dropout if train else 0.0
        if p > 0:
            seed, layer, step = self.context.seed, self.index, self.context.step
            Ad = ops.dropout(A, ws.get("Ad", A.shape), p, seed, layer, step)
        else:
            Ad = A
        Out = ws.get("O", (N * Tq, E))  # the heads side by side: (N, T_q, H, D) rows
        mm(Ad, Vh, out=heads(Out, Tq, 1, 0))
        Y = ws.get("Y", (N * Tq, E)) if train else be.empty((N * Tq, E))
        mm(Out, Wo.T, out=Y)
        if bo is not None:
            ops.bias_act(Y, bo, "identity", Y)
        Y = Y.reshape(N, Tq, E)
        if not train:
            return Y, no_backprop

        def backprop(dY):
            G = self.grads
            dY2 = xp.ascontiguousarray(dY).reshape(N * Tq, E)
            acc = self.take_accumulate()

            def in_proj_grads(d2, x2, rows):
                """in_proj's rows ``rows`` (+)= from d2 = ∂/∂(X W_sᵀ + b_s), the q rows times 1/√D
                (∂/∂W_q = ∂/∂W_s,q / √D)."""
                n_q = max(0, min(rows.stop, E) - rows.start)  # q rows among them (first)
                gW, gb = G["in_proj_weight"][rows], G["in_proj_bias"][rows] if b is not None \
                    else None
                tW = mm(d2.T, x2, out=None if acc else gW)
                tb = None if gb is None else ops.bias_grad(d2, be.empty(gb.shape) if acc else gb)
                for t in (tW, tb):
                    if t is not None and n_q:
                        t[:n_q] *= scale
                if acc:
                    gW += tW
                    if gb is not None:
                        gb += tb

            if acc:
                G["out_proj.weight"] += mm(dY2.T, Out)
            else:
                mm(dY2.T, Out, out=G["out_proj.weight"])
            if bo is not None:
                ops.bias_grad(dY2, G["out_proj.bias"], accumulate=acc)
            dO = mm(dY2, Wo, out=ws.get("dO", (N * Tq, E)))
            dOh = heads(dO, Tq, 1, 0)
            if fused:
                dP = ws.get("dqkv", (N * Tq, 3 * E))
                dbufs = [(dP, 3, i) for i in range(3)]
            else:
                dbufs = [(ws.get(f"dp{i}", (N * T, E)), 1, 0) for i, T in enumerate((Tq, Tk, Tk))]
            dQh, dKh, dVh = (heads(buf, T, slots, i) for (buf, slots, i), T in
                             zip(dbufs, (Tq, Tk, Tk), strict=True))
            mm(Ad.transpose(0, 1, 3, 2), dOh, out=dVh)
            dA = mm(dOh, Vh.transpose(0, 1, 3, 2), out=ws.get("dA", A.shape))
            if p > 0:
                ops.dropout_backward(dA, dA, p, seed, layer, step)
            dS2 = ops.masked_softmax_backward(dA.reshape(S2.shape), A.reshape(S2.shape),
                                              dA.reshape(S2.shape))
            dS = dS2.reshape(N, H, Tq, Tk)
            mm(dS, Kh, out=dQh)  # ∂/∂(Q/√D); Kh, Qh as the forward used them
            mm(dS.transpose(0, 1, 3, 2), Qh, out=dKh)
            if fused:
                in_proj_grads(dP, q.reshape(N * Tq, E), slice(0, 3 * E))
                dX = mm(dP, Ws, out=ws.get("dX", (N * Tq, E))) if input_grad else None
                dxs = [None if dX is None else dX.reshape(N, Tq, E), None, None]
            else:
                dxs = []
                for i, ((d2, _, _), x, T) in enumerate(zip(dbufs, (q, k, v), (Tq, Tk, Tk),
                                                           strict=True)):
                    rows = slice(i * E, (i + 1) * E)
                    in_proj_grads(d2, x.reshape(N * T, E), rows)
                    dxs.append(mm(d2, Ws[rows], out=ws.get(f"dx{i}", (N * T, E)))
                               .reshape(N, T, E) if input_grad else None)
            return dxs + ([None] if len(Xs) == 4 else [])

        return Y, backprop


class _Workspace:
    """Buffers one use of a MultiheadAttention reuses for one batch size, made on first need."""

    def __init__(self, be):
        self.be, self.bufs, self.filled = be, {}, False

    def get(self, name, shape):
        buf = self.bufs.get(name)
        if buf is None:
            buf = self.bufs[name] = self.be.empty(shape)
        return buf


register(MultiheadAttention)
