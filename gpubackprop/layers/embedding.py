"""``Embedding``: a lookup table of learned vectors indexed by integers, as torch.nn.Embedding.

The input is integer indices of any per-sample shape (``gb.Input((T,), dtype="int64")`` or
int32), the output their rows of ``weight`` (num_embeddings, embedding_dim), shape
(N, *index_shape, embedding_dim). The weight gradient is a deterministic scatter-add (each row's
dY terms summed in position order, the same bits on every run and every kernel set); the padding
row gets none. An integer input has no gradient: backprop returns None.
"""

import numbers

import numpy as np

from gpubackprop.layers.base import Layer, fmt_shape, no_backprop
from gpubackprop.layers.registry import register


def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


class Embedding(Layer):
    """Rows of ``weight`` (num_embeddings, embedding_dim), initialised N(0, 1), looked up by integer
    indices in [0, num_embeddings); ``padding_idx`` (negative counts from the end) names a row that
    starts at zero and gets no gradient."""

    # What a chain (Sequential) starting with this layer takes: fit/predict upload X as int64.
    input_dtype = "int64"

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None):
        self.num_embeddings = _count(num_embeddings, "num_embeddings")
        self.embedding_dim = _count(embedding_dim, "embedding_dim")
        if padding_idx is not None:
            V = self.num_embeddings
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral) \
                    or not -V <= padding_idx < V:
                raise ValueError(f"padding_idx: expected None or an integer in [{-V}, {V}) (within "
                                 f"num_embeddings), got {padding_idx!r}")
            padding_idx = int(padding_idx) % V  # as torch: a negative index counts from the end
        self.padding_idx = padding_idx

    def __repr__(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}{pad})"

    def config(self):
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def infer_shape(self, input_shape):
        return (*input_shape, self.embedding_dim)

    def param_specs(self):
        return [("weight", (self.num_embeddings, self.embedding_dim))]

    def initial_params(self, rng):
        W = rng.standard_normal((self.num_embeddings, self.embedding_dim))
        if self.padding_idx is not None:
            W[self.padding_idx] = 0.0
        return {"weight": W}

    def _out_of_range(self, X):
        """(position, index) of the first host index outside [0, num_embeddings), or None."""
        bad = (X < 0) | (X >= self.num_embeddings)
        if not bad.any():
            return None
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        return at, int(X[at])

    def check_host_input(self, X, name):
        """Every index of a whole host input in range, once, before it is uploaded: on a GPU the
        per-batch check below would synchronise the host every step."""
        found = self._out_of_range(X)
        if found:
            at, index = found
            raise ValueError(f"{name}: expected indices in [0, {self.num_embeddings}) for "
                             f"{self!r}, got {index} at {name}[{', '.join(map(str, at))}]")

    def _check_indices(self, X):
        if X.shape[1:] != self.input_shape:
            raise ValueError(f"{self!r} input: expected shape (batch, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(X.shape)}")
        if X.dtype not in (np.int32, np.int64):
            raise TypeError(f"{self!r} input: expected int32 or int64 indices (an input "
                            f"gb.Input(shape, dtype='int64')), got dtype {X.dtype}")
        # fit/evaluate/predict check their whole input on the host (check_host_input); a direct
        # forward is checked here where the indices are host memory (the CPU and the simulator),
        # before any kernel. On a GPU that would synchronise the host every step: a bad index
        # given straight to forward there gives NaN rows.
        found = self._out_of_range(X) if isinstance(X, np.ndarray) and X.size else None
        if found:
            at, index = found
            raise ValueError(f"{self!r} input: expected indices in [0, {self.num_embeddings}), got "
                             f"{index} at index {at} of the batch of shape {fmt_shape(X.shape)}")

    def forward(self, X, train=False, input_grad=True):
        self._check_indices(X)
        be = self.backend
        xp, ops = be.xp, be.ops
        idx = xp.ascontiguousarray(X).reshape(-1)
        n, D = idx.shape[0], self.embedding_dim
        W = self.params["weight"]
        out_shape = (X.shape[0], *self.output_shape)
        if not train:
            return ops.embedding(W, idx, be.empty((n, D))).reshape(out_shape), no_backprop
        Y = self.workspace(X.shape[0], lambda: be.empty((n, D)))
        ops.embedding(W, idx, Y)
        pad, dW = self.padding_idx, self.grads["weight"]

        def backprop(dY):
            dY = xp.ascontiguousarray(dY).reshape(n, D)
            ops.embedding_backward(dY, idx, dW, pad, accumulate=self.take_accumulate())
            return None  # integer indices have no gradient

        return Y.reshape(out_shape), backprop


register(Embedding)
