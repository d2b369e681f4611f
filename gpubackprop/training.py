"""Training: ``train_step``, ``fit``, ``evaluate`` and ``predict``.

Data is checked on the host once, uploaded once, and batches are gathered on the device from a
permutation drawn by the model's host RNG; nothing crosses to the host inside a step unless a
number is asked for.
"""

import numpy as np

from gpubackprop.validation import features, positive_int, same_length


def _check_pair(model, loss, X, y, x_name="X", y_name="y"):
    """Host-checked (X, targets) as arrays in the model's dtype."""
    Xh = features(X, model.n_in, x_name)
    Th = loss.targets(y, model.n_out, model.dtype, y_name)
    same_length(Xh, Th, x_name, y_name)
    return Xh, Th


def _step(model, loss, opt, Xd, Td):
    """One step on device arrays already checked: forward, BP1, backward (BP2–BP4), update."""
    model.zero_grads()
    Y, backprop = model.forward(Xd, train=True, input_grad=False)
    value, dY = loss.loss_and_grad(model.backend, Y, Td)
    backprop(dY)
    opt.step(model)
    return value, Y


def train_step(model, loss, opt, X_batch, y_batch):
    """One gradient step on one batch; returns the batch's mean loss (before the update)."""
    be = model.backend
    Xh, Th = _check_pair(model, loss, X_batch, y_batch, "X_batch", "y_batch")
    value, _ = _step(model, loss, opt, be.to_device(Xh), be.to_device(Th, Th.dtype))
    return float(value)


def fit(model, loss, opt, X, y, epochs=10, batch_size=128, validation=None, shuffle=True,
        progress=True, callback=None):
    """Mini-batch training; returns the history {"loss": [...], "accuracy": [...], "val_...": [...]}.

    The order of the batches comes from the model's seeded host RNG, so a run is reproducible.
    ``callback(epoch, logs)``, if given, runs after every epoch and may return True to stop.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs: expected an integer >= 0, got {epochs!r}")
    batch_size = positive_int(batch_size, "batch_size")
    be = model.backend
    Xh, Th = _check_pair(model, loss, X, y)
    Xd, Td = be.to_device(Xh), be.to_device(Th, Th.dtype)
    val = None
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise ValueError(f"validation: expected a pair (X_val, y_val), got "
                             f"{type(validation).__name__}")
        Xv, Tv = _check_pair(model, loss, *validation, "X_val", "y_val")
        val = (be.to_device(Xv), be.to_device(Tv, Tv.dtype))

    n = Xh.shape[0]
    n_batches = -(-n // batch_size)
    history = {"loss": []}
    if loss.classification:
        history["accuracy"] = []
    if val is not None:
        history["val_loss"] = []
        if loss.classification:
            history["val_accuracy"] = []
    bar = _progress_bar(epochs * n_batches, progress)
    try:
        for epoch in range(epochs):
            order = be.rng.permutation(n) if shuffle else np.arange(n)
            order_d = be.to_device(order, np.int64)
            total_loss = total_correct = 0
            for b in range(n_batches):
                idx = order_d[b * batch_size:(b + 1) * batch_size]
                Xb, Tb = Xd[idx], Td[idx]  # device-side gather
                value, Y = _step(model, loss, opt, Xb, Tb)
                total_loss = total_loss + value * idx.shape[0]
                if loss.classification:
                    total_correct = total_correct + loss.correct(be, Y, Tb)
                if bar is not None:
                    bar.update(1)
            logs = {"epoch": epoch + 1, "loss": float(total_loss) / n}
            if loss.classification:
                logs["accuracy"] = float(total_correct) / n
            if val is not None:
                logs.update({f"val_{k}": v for k, v in _evaluate_device(model, loss, *val).items()})
            for k in history:
                history[k].append(logs[k])
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "epoch"})
            if callback is not None and callback(epoch, logs):
                break
    finally:
        if bar is not None:
            bar.close()
    return history


def _progress_bar(total, progress):
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", leave=True, dynamic_ncols=True)


def _evaluate_device(model, loss, Xd, Td, batch_size=4096):
    be = model.backend
    n = Xd.shape[0]
    total_loss = total_correct = 0
    for s in range(0, n, batch_size):
        Xb, Tb = Xd[s:s + batch_size], Td[s:s + batch_size]
        Y = model(Xb)
        total_loss = total_loss + loss.value(be, Y, Tb) * Xb.shape[0]
        if loss.classification:
            total_correct = total_correct + loss.correct(be, Y, Tb)
    metrics = {"loss": float(total_loss) / n}
    if loss.classification:
        metrics["accuracy"] = float(total_correct) / n
    return metrics


def evaluate(model, loss, X, y, batch_size=4096):
    """{"loss": mean loss, "accuracy": fraction correct (classification losses only)}."""
    batch_size = positive_int(batch_size, "batch_size")
    be = model.backend
    Xh, Th = _check_pair(model, loss, X, y)
    return _evaluate_device(model, loss, be.to_device(Xh), be.to_device(Th, Th.dtype), batch_size)


def predict(model, X, loss=None, batch_size=4096):
    """Host predictions: the outputs, or with ``loss`` its probabilities (softmax / sigmoid)."""
    return model.predict(X, loss=loss, batch_size=batch_size)
