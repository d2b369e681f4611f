"""Training: ``train_step``, ``fit``, ``evaluate`` and ``predict``.

Data is checked on the host once, uploaded once, and batches are gathered on the device from a
permutation drawn by the model's host RNG; nothing crosses to the host inside a step unless a
number is asked for.
"""

import sys

import numpy as np

from gpubackprop.cuda_graph import StepGraphs, check_mode
from gpubackprop.cuda_graph import resolve as resolve_graphs
from gpubackprop.losses import as_loss
from gpubackprop.precision import store16
from gpubackprop.validation import describe, positive_int, same_length, samples


def check_pair(model, loss, X, y, x_name="X", y_name="y"):
    """Host-checked (X, targets) as arrays in the model's dtype; X is (n, *model.input_shape).

    A model with several inputs (its ``input_shape`` a list) takes X as a list in ``inputs=``
    order, one with several outputs a ``MultiLoss`` and y as a list: those come back as lists."""
    be = model.backend  # builds the model: its input and output shapes are known from here on
    several = isinstance(model.output_shape, list)
    outs = model.output_shape if several else [model.output_shape]
    per_output = loss.losses if len(getattr(loss, "losses", ())) == len(outs) else [loss] * len(outs)
    for i, (shape, out_loss) in enumerate(zip(outs, per_output, strict=True)):
        # One vector a sample, or for SoftmaxCrossEntropy class scores on the last axis of each
        # position (..., C), with targets (n, ...).
        out_loss.check_output_shape(tuple(shape), "model output" + (f" {i}" if len(outs) > 1 else ""))
    Xh = check_inputs(model, X, x_name)
    if len(outs) > 1 and not hasattr(loss, "losses"):
        raise ValueError(f"loss: the model has {len(outs)} outputs; expected a gb.MultiLoss (or a "
                         f"list) of {len(outs)} losses, got {type(loss).__name__}")
    sizes = [shape[0] if len(shape) == 1 else tuple(shape) for shape in outs]  # classes, or shape
    Th = loss.targets(y, sizes if several else sizes[0], be.dtype, y_name)
    for i, t in enumerate(Th if isinstance(Th, list) else [Th]):
        same_length(_first(Xh), t, x_name, f"{y_name}[{i}]" if isinstance(Th, list) else y_name)
    return Xh, Th


def check_inputs(model, X, x_name="X"):
    """X as host arrays, checked against the model's inputs: an array, or for a model with several
    inputs (its ``input_shape`` a list) a list in ``inputs=`` order; integer and bool inputs
    (``gb.Input(..., dtype="int64")``) must hold integers (bools)."""
    several = isinstance(model.input_shape, list)
    shapes = model.input_shape if several else [model.input_shape]
    if several and (not isinstance(X, (list, tuple)) or len(X) != len(shapes)):
        raise ValueError(f"{x_name}: expected a list of {len(shapes)} input arrays (the model's "
                         f"inputs= order), got {type(X).__name__}")
    Xs = list(X) if several else [X]
    Xh = []
    for i, (x, shape, dtype) in enumerate(zip(Xs, shapes, model.input_dtypes, strict=True)):
        name = f"{x_name}[{i}]" if several else x_name
        h = samples(x, shape, name)
        if dtype is not None and not (np.issubdtype(h.dtype, np.integer) if dtype.kind in "iu"
                                      else h.dtype == bool):
            raise TypeError(f"{name}: expected {'integers' if dtype.kind in 'iu' else 'booleans'} "
                            f"for an input of dtype {dtype.name}, got {describe(h)}")
        Xh.append(h)
    for i, h in enumerate(Xh[1:], 1):
        same_length(Xh[0], h, f"{x_name}[0]", f"{x_name}[{i}]")
    # Layers with host-side rules for what they read straight from an input (an Embedding's index
    # range) check the whole input here, once, on any device, before it is uploaded.
    for i, (h, layers) in enumerate(zip(Xh, model.input_consumers(), strict=True)):
        for layer in layers:
            if hasattr(layer, "check_host_input"):
                layer.check_host_input(h, f"{x_name}[{i}]" if several else x_name)
    return Xh if several else Xh[0]


def upload_inputs(be, model, Xh):
    """Checked host inputs onto the device: the model dtype, integer and bool inputs their own."""
    several = isinstance(Xh, list)
    out = [be.to_device(h) if dt is None else be.to_device(h, dt)
           for h, dt in zip(Xh if several else [Xh], model.input_dtypes, strict=True)]
    return out if several else out[0]


# A model's data is an array, or a list of arrays (several inputs or outputs): these treat both.
def _first(A):
    return A[0] if isinstance(A, list) else A


def rows(A):
    """The number of samples of a batch (an array or a list of them)."""
    return _first(A).shape[0]


def take(A, index):
    """The rows ``index`` (an index array or a slice) of an array or of each array of a list."""
    return [a[index] for a in A] if isinstance(A, list) else A[index]


def upload_targets(be, T):
    """Checked host targets (an array or a list of them) onto the device, in their own dtypes."""
    if isinstance(T, list):
        return [upload_targets(be, t) for t in T]
    return be.to_device(T, T.dtype)


def step_on_device(model, loss, opt, Xd, Td, comm=None, share=1.0):
    """One step on device arrays already checked: forward, BP1, backward (BP2–BP4), update.

    With a communicator of several ranks, ``share`` is this rank's fraction of the global batch:
    the local gradient (a mean over the local rows) times ``share``, summed over the ranks, is the
    gradient of the mean over the global batch; one all-reduce of the flat gradient buffer.
    """
    if getattr(model, "loss_scaler", None) is not None and not model.backend.on_gpu:
        # fp16 on NumPy: an overflowing step (inf in the scaled gradients, which the loss scaler
        # skips) without NumPy's overflow warnings, as on a GPU.
        with np.errstate(over="ignore", invalid="ignore"):
            return _step(model, loss, opt, Xd, Td, comm, share)
    return _step(model, loss, opt, Xd, Td, comm, share)


def _step(model, loss, opt, Xd, Td, comm, share):
    scaler = getattr(model, "loss_scaler", None)  # fp16: the dynamic loss scale (precision.py)
    if rows(Xd) == 0:  # a rank whose share of a short last batch is empty adds nothing
        model.flat_grads[...] = 0
        value, Y = model.backend.xp.zeros((), model.backend.dtype), None
    else:
        model.zero_grads()
        Y, backprop = model.forward(Xd, train=True, input_grad=False)
        value, dY = loss.loss_and_grad(model.backend, Y, Td)
        if model.precision != "fp32":  # the loss in float32; its gradient enters as 16 bits
            if scaler is not None:
                dY = [scaler.scale_grad(d) for d in dY] if isinstance(dY, list) else \
                    scaler.scale_grad(dY)
            if not getattr(model, "_output_grad16", False):  # else the last Dense's cast rounds it
                dY = store16(model.backend, dY)
        backprop(dY)
    if comm is not None and comm.size > 1:
        if share != 1.0:
            model.flat_grads *= share
        comm.allreduce_sum(model.flat_grads)
    if scaler is None:
        opt.step(model)
    else:  # unscale + inf check in one pass, the update skipped on overflow, the scale updated
        scaler.unscale(model.flat_grads)
        opt.step(model)  # the optimizer gates its gradient factor on the scaler's flag
        scaler.update()
    return value, Y


def _broadcast_model(comm, model, opt):
    """Rank 0's parameters, non-trained state and optimizer state on every rank."""
    comm.broadcast(model.flat_params)
    state = getattr(model, "flat_state", None)
    if state is not None and state.size:
        comm.broadcast(state)
    for buf in (opt.buffers or {}).values():
        comm.broadcast(buf)


def train_step(model, loss, opt, X_batch, y_batch):
    """One gradient step on one batch; returns the batch's mean loss (before the update)."""
    be = model.backend
    loss = as_loss(loss)
    Xh, Th = check_pair(model, loss, X_batch, y_batch, "X_batch", "y_batch")
    value, _ = step_on_device(model, loss, opt, upload_inputs(be, model, Xh),
                              upload_targets(be, Th))
    return float(value)


class TrainingDiverged(FloatingPointError):
    """A non-finite loss, gradient or parameter stopped training; the message names step and layer."""


class TrainingState:
    """Where a run stands, as host values: enough for ``fit(state=...)`` to continue it exactly.

    ``epoch`` is the index of the current epoch and ``batch`` the batches done in it (0 at an epoch
    boundary); ``order`` is the current epoch's sample order while ``batch > 0``; ``step`` counts
    optimizer steps over the whole run; ``totals`` are the epoch's running (loss sum, correct
    count) as 0-d arrays; ``history`` holds the finished epochs' metrics; ``best_params`` the flat
    parameters of the best epoch for early stopping with ``restore_best``.
    """

    def __init__(self, epoch=0, batch=0, step=0, order=None, totals=None, history=None,
                 early_stopping=None, best_params=None, finished=False, seconds=0.0):
        self.epoch, self.batch, self.step = int(epoch), int(batch), int(step)
        self.order = order
        self.totals = totals
        self.history = history
        self.early_stopping = early_stopping
        self.best_params = best_params
        self.finished = bool(finished)
        self.seconds = float(seconds)

    def __repr__(self):
        return (f"TrainingState(epoch={self.epoch}, batch={self.batch}, step={self.step}, "
                f"finished={self.finished})")


def fit(model, loss, opt, X, y, epochs=10, batch_size=128, validation=None, shuffle=True,
        progress="auto", callback=None, *, schedule=None, early_stopping=None, nan_check_every=None,
        state=None, on_checkpoint=None, checkpoint_every=None, on_step=None, comm=None,
        cuda_graph="auto"):
    """Mini-batch training; returns the history {"loss": [...], "accuracy": [...], "val_...": [...]}.

    The order of the batches comes from the model's seeded host RNG, so a run is reproducible.
    ``callback(epoch, logs)``, if given, runs after every epoch and may return True to stop.
    ``progress``: "auto" draws a progress bar on stderr only when stderr is a terminal (not into
    logs or pipes); True always, False never.

    Optional, keyword-only:
    ``schedule(step) -> lr`` sets ``opt.lr`` before every step (``gpubackprop.schedules``);
    ``early_stopping`` an ``EarlyStopping`` watching a metric of the epoch's logs;
    ``nan_check_every=N`` checks loss, gradients and parameters for NaN/Inf every N steps (one host
    read) and raises ``TrainingDiverged`` naming the step and the first layer affected; whatever it
    is (also None or 0), the end of every epoch checks the epoch's loss and the parameters, in the
    read of the epoch's loss, and raises ``TrainingDiverged`` too: a diverged run never returns;
    ``on_checkpoint(state)`` receives a ``TrainingState`` at the end of every epoch and every
    ``checkpoint_every`` steps, after a finiteness check (nothing non-finite is ever handed out);
    ``state`` (a ``TrainingState``, with the model, optimizer and ``model.backend.rng`` restored
    to the same moment) continues an interrupted run so that it ends exactly as the uninterrupted
    one; ``on_step(step)`` runs after every step (``step`` counts from 1).
    ``comm`` (a ``gpubackprop.distributed`` communicator or its name, "single" | "mpi" | "nccl")
    trains data-parallel: every rank takes its share of each global batch of ``batch_size``, one
    all-reduce a step combines the gradients, the reported metrics are over all ranks, and
    ``on_checkpoint`` and the progress bar run on rank 0 only (the checkpoint's running totals are
    the global ones).
    ``cuda_graph`` "auto" | "on" | "off": the step as one CUDA graph per batch shape, replayed
    (``gpubackprop.cuda_graph``; auto: where a GPU can, eager on the CPU and in the simulator; on:
    a ValueError where it cannot); the same results as the eager step.
    """
    from gpubackprop.distributed import communicator, shard_bounds
    from gpubackprop.memory import check_batch

    comm = communicator("single" if comm is None else comm)
    rank, size = comm.rank, comm.size
    cuda_graph = check_mode(cuda_graph)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs: expected an integer >= 0, got {epochs!r}")
    batch_size = positive_int(batch_size, "batch_size")
    nan_check_every = None if not nan_check_every else positive_int(nan_check_every,
                                                                    "nan_check_every")
    checkpoint_every = None if not checkpoint_every else positive_int(checkpoint_every,
                                                                      "checkpoint_every")
    be = model.backend
    loss = as_loss(loss)
    Xh, Th = check_pair(model, loss, X, y)
    Xd, Td = upload_inputs(be, model, Xh), upload_targets(be, Th)
    val = None
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise ValueError(f"validation: expected a pair (X_val, y_val), got "
                             f"{type(validation).__name__}")
        Xv, Tv = check_pair(model, loss, *validation, "X_val", "y_val")
        val = (upload_inputs(be, model, Xv), upload_targets(be, Tv))

    n = rows(Xh)
    n_batches = -(-n // batch_size)
    # The largest batch this rank gathers (a batch_size beyond the data takes all of it), checked
    # against the device before the first step: a clear ValueError instead of a MemoryError.
    check_batch(model, -(-min(batch_size, n) // size))
    settings = resolve_graphs(cuda_graph, model, comm)  # None: the eager step
    history = {"loss": []}
    if loss.classification:
        history["accuracy"] = []
    if val is not None:
        history["val_loss"] = []
        if loss.classification:
            history["val_accuracy"] = []
    state = _start_state(state, history, n, n_batches, be)
    history = state.history
    if size > 1:
        _broadcast_model(comm, model, opt)
    if early_stopping is not None and state.early_stopping is not None:
        early_stopping.load_state(state.early_stopping)
    best = None if state.best_params is None else be.to_device(state.best_params)
    step = state.step
    remaining = 0 if state.finished else max(0, (epochs - state.epoch) * n_batches - state.batch)
    bar = _progress_bar(remaining, progress if comm.is_root else False)
    Xb = None
    graphs = None if settings is None else StepGraphs(model, loss, opt, settings, n_batches)

    def guard(value, epoch, b):
        if not bool(_all_finite(be, value, model)):  # the one host read
            raise TrainingDiverged(_diagnose(model, loss, value, Xb, step, epoch, b, n_batches))

    def snapshot(epoch, b, order, totals, finished=False):
        if totals is not None and size > 1:
            # The global running totals (a collective: every rank is here); rank 0 resumes with
            # them and the others with zeros, so the epoch's sum over ranks stays right.
            sums = comm.allreduce_host([float(t) for t in totals])
            totals = tuple(np.array(v, dtype=np.asarray(t).dtype) for v, t in zip(sums, totals,
                                                                                 strict=True))
        es = None if early_stopping is None else early_stopping.state()
        return TrainingState(epoch, b, step, order, totals, history, es,
                             None if best is None else be.to_host(best), finished)

    try:
        epoch = state.epoch
        while not state.finished and epoch < epochs:
            if state.batch and epoch == state.epoch:
                order, b0 = np.asarray(state.order), state.batch
                total_loss, total_correct = (_scalar(be, t if comm.is_root else 0 * np.asarray(t))
                                             for t in state.totals)
            else:
                order = be.rng.permutation(n) if shuffle else np.arange(n)
                b0, total_loss, total_correct = 0, 0, 0
            order_d = be.to_device(order, np.int64)
            if graphs is not None:  # this epoch's per-step values, the totals so far on the device
                graphs.begin_epoch(schedule, step, n_batches, b0, total_loss, total_correct)
            for b in range(b0, n_batches):
                start, stop = b * batch_size, min(n, (b + 1) * batch_size)
                lo, hi = shard_bounds(start, stop, rank, size)
                idx = order_d[lo:hi]
                if schedule is not None:
                    opt.lr = float(schedule(step))
                if graphs is None:
                    Xb, Tb = take(Xd, idx), take(Td, idx)  # device-side gather
                    value, Y = step_on_device(model, loss, opt, Xb, Tb, comm,
                                              (hi - lo) / (stop - start))
                    total_loss = total_loss + value * idx.shape[0]
                    if loss.classification and Y is not None:
                        total_correct = total_correct + loss.correct(be, Y, Tb)
                else:  # gathered into the shape's static buffers; the totals kept on the device
                    value, Y = graphs.step(Xd, Td, idx)
                    Xb, total_loss, total_correct = graphs.inputs, *graphs.totals()
                step += 1
                if nan_check_every and step % nan_check_every == 0:
                    guard(value, epoch, b)
                if bar is not None:
                    if step == state.step + 1:  # the ETA leaves out this first step's one-off
                        bar.unpause()  # kernel compilation and warm-up
                    bar.update(1)
                if checkpoint_every and on_checkpoint is not None and b + 1 < n_batches \
                        and step % checkpoint_every == 0:
                    guard(value, epoch, b)
                    mid_state = snapshot(epoch, b + 1, order, (_host_scalar(be, total_loss),
                                                               _host_scalar(be, total_correct)))
                    if comm.is_root:
                        on_checkpoint(mid_state)
                if on_step is not None:
                    on_step(step)
            # The epoch's loss total is read anyway: that one read also says whether the parameters
            # are finite (NaN if not; the last update can break them after the last finite loss),
            # so that a diverged run stops here, every epoch, with or without nan_check_every.
            epoch_loss = _nan_unless_params_finite(be, total_loss, model)
            if size > 1:  # the epoch's totals over all ranks: one small host all-reduce an epoch
                epoch_loss, total_correct = comm.allreduce_host([float(epoch_loss),
                                                                 float(total_correct)])
            logs = {"epoch": epoch + 1, "loss": float(epoch_loss) / n}
            if loss.classification:  # per sample, or per position of a per-position loss
                logs["accuracy"] = float(total_correct) / float(loss.n_predictions(Th))
            if not np.isfinite(logs["loss"]):
                raise TrainingDiverged(_diagnose(model, loss, total_loss, Xb, step, epoch,
                                                 n_batches - 1, n_batches))
            if val is not None:
                logs.update({f"val_{k}": v for k, v in _evaluate_device(model, loss, *val).items()})
            if schedule is not None:
                logs["lr"] = opt.lr
            for k in history:
                history[k].append(logs[k])
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k != "epoch"})
            stop = False
            if early_stopping is not None:
                improved, stop = early_stopping.update(epoch + 1, logs)
                if improved and early_stopping.restore_best:
                    best = be.xp.array(model.flat_params, copy=True)
            if callback is not None and callback(epoch, logs):
                stop = True
            epoch += 1
            done = stop or epoch >= epochs
            if done and best is not None:
                model.flat_params[...] = best  # restore the best epoch's parameters
            if on_checkpoint is not None:
                if nan_check_every is None or step % nan_check_every:
                    guard(value, epoch - 1, n_batches - 1)
                done_state = snapshot(epoch, 0, None, None, finished=stop)
                if comm.is_root:
                    on_checkpoint(done_state)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        if graphs is not None:
            graphs.close()
    return history


def _start_state(state, history, n, n_batches, be):
    if state is None:
        return TrainingState(history=history)
    if not isinstance(state, TrainingState):
        raise TypeError(f"state: expected a TrainingState, got {type(state).__name__}")
    if state.batch:
        if state.order is None or np.shape(state.order) != (n,) or state.totals is None:
            raise ValueError(f"state: expected the epoch's order of {n} samples and its running "
                             f"totals, got order of shape {np.shape(state.order)}")
        if not 0 < state.batch < n_batches:
            raise ValueError(f"state: batch {state.batch} is outside the epoch's {n_batches} "
                             f"batches (another batch size or data set?)")
    if state.history is not None:
        if set(state.history) != set(history):
            raise ValueError(f"state: its history has metrics {sorted(state.history)}, this run "
                             f"records {sorted(history)} (validation data added or removed?)")
        history = {k: list(v) for k, v in state.history.items()}
    return TrainingState(state.epoch, state.batch, state.step, state.order, state.totals, history,
                         state.early_stopping, state.best_params, state.finished, state.seconds)


def _host_scalar(be, x):
    """A running total as a host 0-d array of its own dtype (int 0 before any batch)."""
    return np.array(be.to_host(x)) if not isinstance(x, int) else np.array(x)


def _scalar(be, a):
    """A saved running total back as the kind of scalar the loop accumulates into."""
    a = np.asarray(a)
    return be.xp.asarray(a) if be.on_gpu else a[()]


def _nan_unless_params_finite(be, total, model):
    """``total`` (a device scalar), or NaN when a parameter is NaN or infinite; no host read."""
    xp = be.xp
    return xp.where(xp.isfinite(model.flat_params).all(), total, np.nan)  # a scalar: no transfer


def _all_finite(be, value, model):
    xp = be.xp
    params = xp.isfinite(model.flat_params).all()
    if getattr(model, "loss_scaler", None) is not None:
        # fp16: an overflowing gradient is the loss scaler's to handle (the step was skipped)
        return xp.isfinite(value) & params
    return xp.isfinite(value) & xp.isfinite(model.flat_grads).all() & params


def _diagnose(model, loss, value, Xb, step, epoch, b, n_batches):
    """Where the non-finite values first are: parameters, then the forward pass, then gradients."""
    be = model.backend
    xp = be.xp
    where = None
    for key, layer in model.param_keys():
        if not all(bool(xp.isfinite(p).all()) for p in layer.params.values()):
            where = f"the parameters of layer {key[:-1]} ({layer!r})"
            break
    from gpubackprop.layers import Sequential

    if where is None and Xb is not None and isinstance(model, Sequential):  # a chain, layer by layer
        A = Xb
        for i, layer in enumerate(model.layers):
            A, _ = layer.forward(A, train=False)
            if not bool(xp.isfinite(A).all()):
                where = f"the output of layer {i} ({layer!r})"
                break
    if where is None:
        for key, layer in model.param_keys():
            if not all(bool(xp.isfinite(g).all()) for g in layer.grads.values()):
                where = f"the gradients of layer {key[:-1]} ({layer!r})"
                break
    value = float(value)
    what = f"the loss is {value}" if not np.isfinite(value) else "the loss is finite"
    where = where or "the loss"
    return (f"training diverged: non-finite values found at step {step} (epoch {epoch + 1}, "
            f"batch {b + 1}/{n_batches}): "
            f"{what}; first non-finite values in {where}; try a smaller learning rate or "
            f"gradient clipping")


def _progress_bar(total, progress):
    if isinstance(progress, str) and progress == "auto":
        # A bar redrawn with carriage returns is noise in a log file or a pipe.
        progress = sys.stderr is not None and sys.stderr.isatty()
    elif not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress: expected 'auto', True or False, got {progress!r}")
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", leave=True, dynamic_ncols=True)


def _evaluate_device(model, loss, Xd, Td, batch_size=4096):
    be = model.backend
    n = rows(Xd)
    total_loss = total_correct = 0
    for s in range(0, n, batch_size):
        Xb, Tb = take(Xd, slice(s, s + batch_size)), take(Td, slice(s, s + batch_size))
        Y = model(Xb)
        total_loss = total_loss + loss.value(be, Y, Tb) * rows(Xb)
        if loss.classification:
            total_correct = total_correct + loss.correct(be, Y, Tb)
    metrics = {"loss": float(total_loss) / n}
    if loss.classification:  # accuracy over all predictions: samples, or every position
        metrics["accuracy"] = float(total_correct) / float(loss.n_predictions(Td))
    return metrics


def evaluate(model, loss, X, y, batch_size=4096):
    """{"loss": mean loss, "accuracy": fraction correct (classification losses only; for logits
    (N, ..., C) with targets (N, ...) the fraction of all positions)}."""
    batch_size = positive_int(batch_size, "batch_size")
    be = model.backend
    loss = as_loss(loss)
    Xh, Th = check_pair(model, loss, X, y)
    return _evaluate_device(model, loss, upload_inputs(be, model, Xh), upload_targets(be, Th),
                            batch_size)


def predict(model, X, loss=None, batch_size=4096):
    """Host predictions: the outputs, or with ``loss`` its probabilities (softmax / sigmoid)."""
    return model.predict(X, loss=loss, batch_size=batch_size)
