"""Losses: ``MSE``, ``SoftmaxCrossEntropy`` and ``BinaryCrossEntropy`` (both from logits).

Each loss checks targets on the host (``targets``), then on the device gives the mean loss and
the gradient with respect to the model's outputs in one call (``loss_and_grad``): that gradient
is BP1's ∇_A C, already multiplied by σ' for the softmax and sigmoid outputs folded into the loss.
Conventions follow PyTorch: MSE is the mean over all elements, the cross-entropies the mean over
the batch (BCE: over all elements, as ``BCEWithLogitsLoss``).
"""

import numpy as np

from gpubackprop.validation import check_finite, describe, host_array


class Loss:
    classification = False

    def __init__(self):
        self._buffers = {}

    def __repr__(self):
        return f"{type(self).__name__}()"

    def _buffer(self, be, name, shape, dtype=None):
        key = (name, shape, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 8:
                self._buffers.clear()
            buf = self._buffers[key] = be.empty(shape, dtype)
        return buf

    def check_outputs(self, Y, T):
        if Y.shape[0] != T.shape[0]:
            raise ValueError(f"{type(self).__name__}: expected as many targets as outputs, got "
                             f"{T.shape[0]} targets for outputs of shape {tuple(Y.shape)}")

    def value(self, be, Y, T):
        """Mean loss as a device scalar (no gradient)."""
        return self.loss_and_grad(be, Y, T)[0]

    def link(self, be, Y):
        """Outputs turned into predictions (probabilities for the classifiers)."""
        return Y


class MSE(Loss):
    """Mean over all elements of (pred − target)²; targets are 2-D floats like the outputs."""

    def targets(self, y, n_outputs, dtype, name="y"):
        h = host_array(y, name)
        if h.ndim == 1 and n_outputs == 1:
            h = h.reshape(-1, 1)
        if h.ndim != 2 or h.shape[1] != n_outputs:
            raise ValueError(f"{name}: expected MSE targets of shape (n, {n_outputs}), got "
                             f"{describe(h)}")
        return check_finite(h, name).astype(dtype, copy=False)

    def loss_and_grad(self, be, Y, T):
        self.check_outputs(Y, T)
        dY = self._buffer(be, "dY", Y.shape)
        be.xp.subtract(Y, T, out=dY)
        n = Y.size
        loss = be.xp.vdot(dY, dY) / n
        dY *= 2.0 / n  # d/dY mean((Y−T)²) = 2(Y−T)/N
        return loss, dY


class SoftmaxCrossEntropy(Loss):
    """−log softmax(z)[y] averaged over the batch, from logits; targets are class indices."""

    classification = True

    def targets(self, y, n_outputs, dtype=None, name="y"):
        h = host_array(y, name)
        if h.ndim == 2 and h.shape[1] == 1:
            h = h[:, 0]
        if h.ndim != 1:
            raise ValueError(f"{name}: expected 1-D class indices, got {describe(h)}")
        if not np.issubdtype(h.dtype, np.integer):
            check_finite(h, name)
            if h.dtype == bool or not np.all(np.equal(np.mod(h, 1), 0)):
                raise ValueError(f"{name}: expected integer class indices, got non-integer "
                                 f"values of dtype {h.dtype} (e.g. {h[np.mod(h, 1) != 0][:3]})")
        if h.size and (h.min() < 0 or h.max() >= n_outputs):
            bad = h[(h < 0) | (h >= n_outputs)][0]
            raise ValueError(f"{name}: expected class indices in [0, {n_outputs - 1}] for "
                             f"{n_outputs} outputs, got {bad}")
        return h.astype(np.int64)

    def loss_and_grad(self, be, Y, T):
        B = Y.shape[0]
        if T.shape[0] != B:
            self.check_outputs(Y, T)
        bufs = self._buffers.get(Y.shape)  # (dY, per-row losses), reused at this shape
        if bufs is None or bufs[0].dtype != Y.dtype or type(bufs[0]) is not type(Y):
            if len(self._buffers) > 8:
                self._buffers.clear()
            bufs = self._buffers[Y.shape] = (be.empty(Y.shape, Y.dtype), be.empty((B,), Y.dtype))
        dY, rows = bufs
        # BP1 for softmax + CE: Δᴸ = (softmax(Z) − onehot(y)) / B, in one fused kernel.
        be.ops.softmax_ce(Y, T, dY, rows)
        return rows.sum() / B, dY

    def link(self, be, Y):
        xp = be.xp
        e = xp.exp(Y - Y.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def correct(self, be, Y, T):
        """Number of rows whose arg-max is the label, as a device scalar."""
        return (Y.argmax(axis=1) == T).sum()


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy from logits, mean over all elements; targets in [0, 1], 1-D or 2-D."""

    classification = True

    def targets(self, y, n_outputs, dtype, name="y"):
        h = host_array(y, name)
        if h.ndim == 1:
            h = h.reshape(-1, 1)
        if h.ndim != 2 or h.shape[1] != n_outputs:
            raise ValueError(f"{name}: expected binary targets of shape (n,) or (n, {n_outputs}),"
                             f" got {describe(h)}")
        check_finite(h, name)
        if h.size and (h.min() < 0 or h.max() > 1):
            raise ValueError(f"{name}: expected binary targets in [0, 1], got values in "
                             f"[{h.min()}, {h.max()}]")
        return h.astype(dtype, copy=False)

    def loss_and_grad(self, be, Y, T):
        self.check_outputs(Y, T)
        xp = be.xp
        n = Y.size
        # Stable form: max(z, 0) − z·t + log(1 + e^−|z|) never overflows.
        loss = (xp.maximum(Y, 0) - Y * T + xp.log1p(xp.exp(-xp.abs(Y)))).sum() / n
        dY = self._buffer(be, "dY", Y.shape)
        dY[...] = be.ops.sigmoid(Y)  # BP1: Δᴸ = (σ(z) − t) / N
        dY -= T
        dY *= 1.0 / n
        return loss, dY

    def link(self, be, Y):
        return be.ops.sigmoid(Y)

    def correct(self, be, Y, T):
        return ((Y > 0) == (T > 0.5)).all(axis=1).sum()


# The command-line names of the losses (--loss), in the order help texts list them.
LOSSES = {"ce": SoftmaxCrossEntropy, "mse": MSE, "bce": BinaryCrossEntropy}
