"""Losses by their command-line names, and how train and evaluate score a model on class labels."""

import numpy as np

from gpubackprop.losses import LOSSES

# The losses ``targets`` feeds class labels to (bce wants 0/1 targets): train's --loss choices,
# and what evaluate scores a checkpoint with (its own loss when it is one of these, else ce).
LABEL_LOSSES = tuple(name for name in LOSSES if name != "bce")


def make_loss(name):
    return LOSSES[name]()


def targets(loss_name, y, n_classes):
    """Class labels as the loss wants them: indices for ce, one-hot rows for mse."""
    if loss_name == "mse":
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

