"""``PositionalEmbedding``: a learned vector per position, added to a sequence of embeddings.

    x = gb.Input((T,), dtype="int64")
    h = gb.PositionalEmbedding(max_len, 64)(gb.Embedding(vocab, 64)(x))   # (N, T, 64)

Input and output (N, T, embedding_dim) with T <= max_len: ``Y = X + weight[:T]``, the table
``weight`` (max_len, embedding_dim) broadcast over the batch, as a PyTorch model writes it with a
parameter (``x + self.weight[:T]``) or an ``nn.Embedding(max_len, embedding_dim)`` looked up at
``arange(T)``. Its initial values are that Embedding's, N(0, 1) (GPT-2 draws N(0, 0.02²) instead:
``set_params`` to use another). Backward: ``dX = dY`` (passed through, no copy) and
``dweight[:T] (+)= Σ_batch dY``, the bias gradient's deterministic column sum over the (N, T·D)
view; the rows past T get no gradient.
"""

from gpubackprop.layers.base import Layer, fmt_shape, no_backprop
from gpubackprop.layers.registry import SpecToken, register
from gpubackprop.validation import positive_int


class PositionalEmbedding(Layer):
    """Adds the learned ``weight[:T]`` (max_len, embedding_dim), initialised N(0, 1), to every
    (T, embedding_dim) sample, T <= max_len."""

    def __init__(self, max_len, embedding_dim):
        self.max_len = positive_int(max_len, "max_len")
        self.embedding_dim = positive_int(embedding_dim, "embedding_dim")

    def __repr__(self):
        return f"PositionalEmbedding({self.max_len}, {self.embedding_dim})"

    def config(self):
        return {"max_len": self.max_len, "embedding_dim": self.embedding_dim}

    def infer_shape(self, input_shape):
        shape = tuple(input_shape)
        D = self.embedding_dim
        if len(shape) != 2 or shape[1] != D:
            raise ValueError(f"expected a sequence of shape (T, {D}) (time steps, embedding_dim), "
                             f"got {fmt_shape(shape)}")
        if shape[0] > self.max_len:
            raise ValueError(f"max_len: expected sequences of at most max_len={self.max_len} time "
                             f"steps, got {shape[0]} (input shape {fmt_shape(shape)}); make "
                             f"max_len >= {shape[0]}")
        return shape

    def param_specs(self):
        return [("weight", (self.max_len, self.embedding_dim))]

    def initial_params(self, rng):
        return {"weight": rng.standard_normal((self.max_len, self.embedding_dim))}

    def forward(self, X, train=False, input_grad=True):
        self.check_input(X)
        be = self.backend
        xp, ops = be.xp, be.ops
        N, T, D = X.shape
        P = self.params["weight"][:T]  # the first T rows: a contiguous view of the table
        if not train:
            return xp.add(X, P), no_backprop
        Y = self.workspace(N, lambda: be.empty(X.shape))
        xp.add(X, P, out=Y)  # one broadcast pass over the batch
        dW = self.grads["weight"]
        dP = dW[:T].reshape(T * D)

        def backprop(dY):
            accumulate = self.take_accumulate()
            dY2 = (dY if dY.flags.c_contiguous else xp.ascontiguousarray(dY)).reshape(N, T * D)
            # BP4's column sum: each (t, d) entry sums its N batch rows in order (deterministic).
            ops.bias_grad(dY2, dP, accumulate=accumulate)
            if not accumulate and T < self.max_len:
                dW[T:] = 0  # positions this input never reaches: no stale gradient
            return dY if input_grad else None  # Y = X + P: dX is dY itself (never written into)

        return Y, backprop


def _make_posemb(ctx):
    T, D = ctx.shape
    max_len = ctx.params["max_len"]
    return [("PositionalEmbedding", {"max_len": T if max_len is None else ctx.size("max_len"),
                                     "embedding_dim": D})]


register(PositionalEmbedding, SpecToken(
    "posemb", _make_posemb, {"max_len": ("int", None)}, positional=("max_len",), needs="sequence",
    help="posemb(max_len=T)   learned positional embedding added to (time steps, features) "
         "sequences"))

