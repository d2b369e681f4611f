"""Losses by their command-line names, and how train and evaluate score a model on class labels."""

import numpy as np

from gpubackprop.losses import LOSSES

# The losses ``targets`` feeds class labels to: train's --loss choices, and what evaluate and
# predict score a checkpoint with (its own loss; ce for one saved without a loss).
LABEL_LOSSES = tuple(LOSSES)


def make_loss(name):
    return LOSSES[name]()


def checkpoint_loss(ckpt):
    """The command-line name of the loss a checkpoint was trained with ("ce" when it names none)."""
    names = {LOSSES[name].__name__: name for name in LABEL_LOSSES}
    return names.get(ckpt.meta.get("loss"), "ce")


def targets(loss_name, y, n_classes):
    """Class labels as the loss wants them: indices for ce, one-hot rows for mse, and for bce the
    same rows as its 0/1 targets (one sigmoid output a class, only the label's is 1)."""
    if loss_name in ("mse", "bce"):
        onehot = np.zeros((len(y), n_classes))
        onehot[np.arange(len(y)), y] = 1.0
        return onehot
    return y


def check_labels(y, n_classes, what):
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise ValueError(f"{what}: label {bad} is out of range: the model has {n_classes} outputs "
                         f"(classes 0..{n_classes - 1})")


def score(model, loss, loss_name, X, y, n_classes):
    """{"loss", "accuracy"} on host data; accuracy by arg-max for every loss."""
    import gpubackprop as gb

    metrics = gb.evaluate(model, loss, X, targets(loss_name, y, n_classes))
    if "accuracy" not in metrics:
        metrics["accuracy"] = float((model.predict(X).argmax(axis=1) == y).mean())
    return metrics

