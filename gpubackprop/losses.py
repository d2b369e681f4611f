"""Losses: ``MSE``, ``SoftmaxCrossEntropy`` and ``BinaryCrossEntropy`` (both from logits).

Each loss checks targets on the host (``targets``), then on the device gives the mean loss and
the gradient with respect to the model's outputs in one call (``loss_and_grad``): that gradient
is BP1's ∇_A C, already multiplied by σ' for the softmax and sigmoid outputs folded into the loss.
Conventions follow PyTorch: MSE is the mean over all elements, the cross-entropies the mean over
the batch (BCE: over all elements, as ``BCEWithLogitsLoss``). ``SoftmaxCrossEntropy`` also takes
per-position logits (N, ..., C) with targets (N, ...) (a sequence model's (N, T, C) and (N, T),
batch first): the classes on the last axis, the mean over all N·prod(...) positions, which is
torch's ``CrossEntropyLoss`` of ``logits.reshape(-1, C)`` and ``targets.reshape(-1)`` (torch itself
puts C on axis 1: (N, C, T)); its accuracy counts every position.
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

    def check_output_shape(self, shape, what="model output"):
        """Raise unless the model's per-sample output ``shape`` suits this loss (one vector)."""
        if len(shape) != 1:
            raise ValueError(f"{what}: expected one vector of outputs per sample for "
                             f"{type(self).__name__}, got per-sample shape {shape}; end "
                             f"the model with Flatten() or GlobalAvgPool2d()")

    def n_predictions(self, T):
        """How many predictions ``correct`` counts over the targets ``T``: one a sample."""
        return T.shape[0]

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
    """−log softmax(z)[y] averaged over the batch, from logits; targets are class indices.

    Logits (N, C) with targets (N,), or per position (N, ..., C) with targets (N, ...): the classes
    on the last axis, the mean over every position (torch's CrossEntropyLoss on the flattened
    positions); accuracy is over all positions. ``ignore_index`` (an int, as torch's; default None:
    every target must be a class) marks targets left out (padding): no loss, no gradient, no
    accuracy count, the mean over the others (NaN when a batch has none, as torch)."""

    classification = True

    def __init__(self, ignore_index=None):
        super().__init__()
        if ignore_index is not None and (isinstance(ignore_index, bool) or
                                         not isinstance(ignore_index, (int, np.integer))):
            raise TypeError(f"ignore_index: expected an integer or None, got {ignore_index!r}")
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def __repr__(self):
        return "SoftmaxCrossEntropy()" if self.ignore_index is None else \
            f"SoftmaxCrossEntropy(ignore_index={self.ignore_index})"

    def check_output_shape(self, shape, what="model output"):
        if len(shape) < 1:
            raise ValueError(f"{what}: expected class scores on the last axis per sample for "
                             f"{type(self).__name__}, got per-sample shape {shape}")

    def targets(self, y, n_outputs, dtype=None, name="y"):
        """Host int64 class indices, checked: ``n_outputs`` is the number of classes, or the
        model's per-sample output shape (..., C), whose leading axes the targets repeat."""
        shape = (int(n_outputs),) if np.ndim(n_outputs) == 0 else tuple(n_outputs)
        positions, n_classes = shape[:-1], shape[-1]
        h = host_array(y, name)
        if not positions and h.ndim == 2 and h.shape[1] == 1:
            h = h[:, 0]
        if positions and h.ndim == 1:  # one label a sample: the model should end in one vector
            raise ValueError(f"model output: expected one vector of outputs per sample for "
                             f"{type(self).__name__}, got per-sample shape {shape}; end the model "
                             f"with Flatten() or GlobalAvgPool2d(), or give {name} one class index "
                             f"a position, of shape (n, {', '.join(map(str, positions))})")
        if h.ndim != 1 + len(positions) or h.shape[1:] != positions:
            want = "1-D class indices" if not positions else \
                f"class indices of shape (n, {', '.join(map(str, positions))}) (one a position of " \
                f"the outputs (n, {', '.join(map(str, shape))}))"
            raise ValueError(f"{name}: expected {want}, got {describe(h)}")
        if not np.issubdtype(h.dtype, np.integer):
            check_finite(h, name)
            if h.dtype == bool or not np.all(np.equal(np.mod(h, 1), 0)):
                raise ValueError(f"{name}: expected integer class indices, got non-integer "
                                 f"values of dtype {h.dtype} (e.g. {h[np.mod(h, 1) != 0][:3]})")
        bad = (h < 0) | (h >= n_classes)
        if self.ignore_index is not None:
            bad &= h != self.ignore_index
        if h.size and bad.any():
            where = np.argwhere(bad)[0]
            at = f" at {name}[{', '.join(map(str, where))}]" if positions else ""
            raise ValueError(f"{name}: expected class indices in [0, {n_classes - 1}] for "
                             f"{n_classes} outputs, got {h[tuple(where)]}{at}")
        return h.astype(np.int64)

    def check_outputs(self, Y, T):
        if Y.shape[:-1] != T.shape:
            raise ValueError(f"{type(self).__name__}: expected targets of shape "
                             f"{tuple(Y.shape[:-1])} for logits of shape {tuple(Y.shape)} (one "
                             f"class index a position), got targets of shape {tuple(T.shape)}")

    def loss_and_grad(self, be, Y, T):
        if Y.ndim != 2 or T.shape != Y.shape[:1]:
            self.check_outputs(Y, T)
            if Y.ndim > 2:  # per position: the fused kernel on the (positions, C) rows, viewed
                value, dY = self.loss_and_grad(be, Y.reshape(-1, Y.shape[-1]), T.reshape(-1))
                return value, dY.reshape(Y.shape)
        B = Y.shape[0]
        bufs = self._buffers.get(Y.shape)  # (dY, per-row losses), reused at this shape
        if bufs is None or bufs[0].dtype != Y.dtype or type(bufs[0]) is not type(Y):
            if len(self._buffers) > 8:
                self._buffers.clear()
            bufs = self._buffers[Y.shape] = (be.empty(Y.shape, Y.dtype), be.empty((B,), Y.dtype))
        dY, rows = bufs
        if self.ignore_index is not None:
            return self._ignoring(be, Y, T, dY, rows)
        # BP1 for softmax + CE: Δᴸ = (softmax(Z) − onehot(y)) / B, in one fused kernel (B rows:
        # all positions of a per-position loss, so the mean is over every position).
        be.ops.softmax_ce(Y, T, dY, rows)
        return rows.sum() / B, dY

    def _ignoring(self, be, Y, T, dY, rows):
        """The mean over the rows whose target is not ``ignore_index``: the fused kernel on every
        row (an ignored one as class 0), then those rows' loss and gradient zeroed and the rest
        rescaled from 1/B to 1/n_kept; n_kept stays on the device (no host read)."""
        xp = be.xp
        keep = T != self.ignore_index
        be.ops.softmax_ce(Y, xp.where(keep, T, 0), dY, rows)
        n_kept = keep.sum().astype(Y.dtype)
        # Kept rows: 1/B -> 1/n_kept; with none kept the gradient is 0 and the loss 0/0 = NaN
        # (torch's), without NumPy's warning.
        with np.errstate(divide="ignore", invalid="ignore"):
            dY *= xp.where(keep, Y.shape[0] / xp.maximum(n_kept, 1), 0).astype(Y.dtype)[:, None]
            return (rows * keep).sum() / n_kept, dY

    def link(self, be, Y):
        xp = be.xp
        e = xp.exp(Y - Y.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def correct(self, be, Y, T):
        """Number of positions (rows) whose arg-max is the label, as a device scalar (positions
        whose target is ``ignore_index`` left out)."""
        match = Y.argmax(axis=-1) == T
        if self.ignore_index is not None:
            match &= T != self.ignore_index
        return match.sum()

    def n_predictions(self, T):
        """Every position is a prediction, but those whose target is ``ignore_index``."""
        return T.size if self.ignore_index is None else (T != self.ignore_index).sum()


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


class MultiLoss(Loss):
    """The loss of a model with several outputs: sum_i weights[i] * losses[i](Y_i, T_i).

    ``losses`` has one loss per output, in the order of the model's ``outputs=``; ``weights``
    (default all 1) one number per output. Targets ``y`` are a list in that order; the gradient of
    output i is weights[i] times its loss's. fit, evaluate and gradcheck take it (or a plain list of
    losses, weights 1); fit reports the weighted loss (no accuracy: say which output's with
    ``evaluate`` on that output's loss).
    """

    def __init__(self, losses, weights=None):
        super().__init__()
        if not isinstance(losses, (list, tuple)) or not losses \
                or not all(isinstance(x, Loss) and not isinstance(x, MultiLoss) for x in losses):
            raise TypeError(f"losses: expected a non-empty list of losses (one per output), got "
                            f"{losses!r}")
        self.losses = list(losses)
        weights = [1.0] * len(self.losses) if weights is None else list(weights)
        if len(weights) != len(self.losses) or not all(
                isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
                and np.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights: expected {len(self.losses)} finite numbers >= 0 (one per "
                             f"loss), got {weights!r}")
        self.weights = [float(w) for w in weights]

    def __repr__(self):
        return f"MultiLoss({self.losses!r}, weights={self.weights!r})"

    def _pairs(self, Y, T):
        if not isinstance(Y, (list, tuple)) or len(Y) != len(self.losses):
            raise ValueError(f"MultiLoss: expected a list of {len(self.losses)} outputs, got "
                             f"{type(Y).__name__}")
        return zip(self.losses, self.weights, Y, T, strict=True)

    def targets(self, y, n_outputs, dtype, name="y"):
        if not isinstance(y, (list, tuple)) or len(y) != len(self.losses):
            raise ValueError(f"{name}: expected a list of {len(self.losses)} target arrays (one per "
                             f"output), got {type(y).__name__}")
        if not isinstance(n_outputs, (list, tuple)) or len(n_outputs) != len(self.losses):
            raise ValueError(f"MultiLoss of {len(self.losses)} losses: expected a model with as "
                             f"many outputs, got one of {n_outputs!r} outputs per sample")
        return [loss.targets(t, n, dtype, f"{name}[{i}]")
                for i, (loss, t, n) in enumerate(zip(self.losses, y, n_outputs, strict=True))]

    def loss_and_grad(self, be, Y, T):
        total, grads = 0, []
        for i, (loss, w, y, t) in enumerate(self._pairs(Y, T)):
            value, dY = loss.loss_and_grad(be, y, t)
            # Own buffers: one loss object may serve several outputs (its buffer is reused).
            g = self._buffer(be, f"dY{i}", dY.shape, dY.dtype)
            be.xp.multiply(dY, w, out=g)
            total = total + w * value
            grads.append(g)
        return total, grads

    def value(self, be, Y, T):
        total = 0
        for loss, w, y, t in self._pairs(Y, T):
            total = total + w * loss.value(be, y, t)
        return total

    def link(self, be, Y):
        return [loss.link(be, y) for loss, y in zip(self.losses, Y, strict=True)]


def as_loss(loss):
    """A loss, or a list of them (one per output of a model) as a ``MultiLoss``."""
    return MultiLoss(loss) if isinstance(loss, (list, tuple)) else loss


# The command-line names of the losses (--loss), in the order help texts list them.
LOSSES = {"ce": SoftmaxCrossEntropy, "mse": MSE, "bce": BinaryCrossEntropy}
