"""Reference normalization ops: batch norm (train, eval, backward) and layer norm (forward, backward).

Batch norm takes X (N, C, *): the statistics of channel c are over its M = N·L values X[:, c, ...]
(BatchNorm1d's (N, C) has L = 1, BatchNorm2d's (N, C, H, W) has L = H·W). Layer norm takes X (M, D):
the statistics of a row are over its D values. The variance that normalises is the biased one
(÷ M, as PyTorch does); ``invstd`` = 1/√(var + eps) is what the forward keeps for the backward, and
x̂ = (x − mean)·invstd is recomputed from it there.

Backward, per group of M values with g = γ·dY (batch norm: γ is one number per group):
    dX = invstd/M · (M·g − Σg − x̂·Σ(g·x̂)),   dγ = Σ dY·x̂,   dβ = Σ dY
(the two sums subtract the gradient's components along the mean and along x̂, which the
normalisation removed from the output).
"""


def _as_ncl(a):
    """(N, C, *) viewed as (N, C, L); a view for the C-contiguous arrays the ops take."""
    return a.reshape(a.shape[0], a.shape[1], -1)


class NormalizationOps:
    """Plain-xp normalization ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    # ---- batch norm ------------------------------------------------------------------------------
    def batch_norm_train(self, X, gamma, beta, eps, Y, mean, invstd):
        """Per-channel batch mean and biased variance over N·L into ``mean``, ``invstd`` (C,);
        Y = (X − mean)·invstd·γ + β. X, Y (N, C, *)."""
        X3 = _as_ncl(X)
        m = X3.mean(axis=(0, 2))
        d = X3 - m[:, None]  # two passes: the mean first, then the squares about it
        var = (d * d).mean(axis=(0, 2))
        mean[...] = m
        invstd[...] = 1 / self.xp.sqrt(var + eps)
        _as_ncl(Y)[...] = d * invstd[:, None] * gamma[:, None] + beta[:, None]
        return Y

    def batch_norm_eval(self, X, gamma, beta, running_mean, running_var, eps, Y):
        """Y = (X − running_mean)/√(running_var + eps)·γ + β, per channel. X, Y (N, C, *)."""
        invstd = 1 / self.xp.sqrt(running_var + eps)
        _as_ncl(Y)[...] = ((_as_ncl(X) - running_mean[:, None]) * invstd[:, None] * gamma[:, None]
                           + beta[:, None])
        return Y

    def batch_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False):
        """dX from dY; dγ = Σ dY·x̂ and dβ = Σ dY per channel, written or (``accumulate``) added.

        dX uses this call's sums, never the accumulated ones.
        """
        X3, dY3 = _as_ncl(X), _as_ncl(dY)
        M = X3.shape[0] * X3.shape[2]
        xhat = (X3 - mean[:, None]) * invstd[:, None]
        db = dY3.sum(axis=(0, 2))
        dg = (dY3 * xhat).sum(axis=(0, 2))
        k = gamma * invstd / M
        _as_ncl(dX)[...] = k[:, None] * (M * dY3 - db[:, None] - xhat * dg[:, None])
        _write_or_add(dgamma, dg, accumulate)
        _write_or_add(dbeta, db, accumulate)
        return dX

    # ---- layer norm ------------------------------------------------------------------------------
    def layer_norm(self, X, gamma, beta, eps, Y, mean, invstd):
        """Per-row mean and biased variance of X (M, D) into ``mean``, ``invstd`` (M,);
        Y = (X − mean)·invstd·γ + β with γ, β (D,)."""
        m = X.mean(axis=1)
        d = X - m[:, None]
        var = (d * d).mean(axis=1)
        mean[...] = m
        invstd[...] = 1 / self.xp.sqrt(var + eps)
        Y[...] = d * invstd[:, None] * gamma + beta
        return Y

    def layer_norm_backward(self, dY, X, gamma, mean, invstd, dX, dgamma, dbeta, accumulate=False):
        """dX from dY (M, D); dγ = Σ_rows dY·x̂ and dβ = Σ_rows dY, written or added."""
        D = X.shape[1]
        xhat = (X - mean[:, None]) * invstd[:, None]
        dg = (dY * xhat).sum(axis=0)
        db = dY.sum(axis=0)
        g = dY * gamma
        sg = g.sum(axis=1)
        sgx = (g * xhat).sum(axis=1)
        dX[...] = (invstd / D)[:, None] * (D * g - sg[:, None] - xhat * sgx[:, None])
        _write_or_add(dgamma, dg, accumulate)
        _write_or_add(dbeta, db, accumulate)
        return dX


def _write_or_add(out, value, accumulate):
    if accumulate:
        out += value
    else:
        out[...] = value
