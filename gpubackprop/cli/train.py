"""``gpubackprop train``: train a model on a data set, with checkpoints, exact resume, schedules
and early stopping."""

import argparse
import contextlib
import os
import sys
import time
import warnings

from gpubackprop.backend import DTYPES
from gpubackprop.cli.options import (
    HEADER_HELP,
    PRECISION_HELP,
    PRECISIONS,
    Formatter,
    Options,
    add_device_options,
    check_checkpoint_file,
    float_in,
    hidden_layers,
    int_at_least,
    resolve_device,
)
from gpubackprop.cli.scoring import LABEL_LOSSES, check_labels, make_loss, score, targets
from gpubackprop.cuda_graph import CUDA_GRAPH_MODES
from gpubackprop.datasets import HEADERS, SCALINGS
from gpubackprop.distributed import COMMUNICATORS, require_launcher
from gpubackprop.kernels.reference import ACTIVATIONS
from gpubackprop.layers import INITS, SPEC_TOKENS
from gpubackprop.modelspec import PRESETS, token_names
from gpubackprop.optimizers import OPTIMIZER_NAMES
from gpubackprop.outputs import check_output_path, lock_output, write_json
from gpubackprop.schedules import SCHEDULE_NAMES

# Options whose value a resumed run must share with the checkpoint (the rest may change).
MUST_MATCH = ("dataset", "label_column", "header", "val_split", "test_split", "scale", "model", "layers",
              "activation", "init", "dtype", "precision", "seed", "loss", "optimizer", "lr", "momentum",
              "weight_decay", "clip_norm", "batch_size", "schedule", "step_size", "gamma",
              "warmup_steps", "min_lr", "early_stopping", "monitor", "restore_best")


def model_help():
    """The spec grammar of --model; the tokens' lines come from the layer registry (each layer
    module declares its own), in the parser's order."""
    names = token_names()
    lines = "\n".join(f"  {SPEC_TOKENS[n].help}" for n in names if SPEC_TOKENS[n].activation is None)
    acts = "|".join(n for n in names if SPEC_TOKENS[n].activation is not None)
    return f"""\
--model: a preset name or a spec, tokens joined by '-', sizes inferred from the data:
{lines}
  {acts}
                after conv/dense: fused into that layer; elsewhere an activation layer
  init=         weights of conv/dense: {' | '.join(INITS)} (default: dense he before
                relu/leaky_relu/gelu/gelu_tanh, else xavier; conv PyTorch's uniform), e.g.
                dense(128,init=lecun)
  'classes' is the number of classes (dense(classes)); a dense on images flattens them first.
presets: {', '.join(PRESETS)}
  mlp (flatten-dense(h)-ACT-...-dense(classes) from --layers/--activation/--init),
  lenet5 (conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-dense(120)-relu-
  dense(84)-relu-dense(classes), adapted to small images), resnet (conv-bn-relu, two residual
  stages of 16 and 32 channels, gap, dense), lstm (lstm(128)-last-dense(classes))."""


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train a model on a data set", formatter_class=Formatter,
        description="Train a model on a data set, then report its test accuracy."
                    "\n\n" + model_help() + "\n\nWith --checkpoint the full training state is "
                    "saved at the end of every epoch (atomically:\na crash leaves the previous "
                    "checkpoint intact); --resume "
                    "continues from it and ends\nexactly where the uninterrupted run would have "
                    "(bit for bit on the CPU).",
        epilog="example:\n  gpubackprop train --dataset digits --layers 128,64 --epochs 20 "
               "--lr 0.002 --plot curves.png")
    defaults = {}
    p.set_defaults(func=cmd_train, option_defaults=defaults)
    g = Options(p.add_argument_group("data"), defaults)
    g.add("--dataset", None, "digits | mnist:DIR | csv:PATH | npz:PATH (required unless --resume)",
          metavar="SPEC")
    g.add("--label-column", None, "csv only: the label column, by header name or index "
          "(negative counts from the end; default: the last column)", metavar="COL")
    g.add("--header", "auto", HEADER_HELP, choices=HEADERS)
    g.add("--val-split", 0.0, "fraction of the training data held out for validation "
          "(seeded by --seed)", type=float_in(0, 1, name="a fraction in [0, 1)"), metavar="F")
    g.add("--test-split", 0.2, "digits and csv only: fraction held out as the test set",
          type=float_in(0, 1, name="a fraction in [0, 1)"), metavar="F")
    g.add("--scale", "auto", "feature scaling: auto (pixels to [0, 1], other data standardised), "
          "standard, minmax or none; statistics come from the training split only",
          choices=SCALINGS)
    g = Options(p.add_argument_group("model"), defaults)
    g.add("--model", "mlp", f"{' | '.join(PRESETS)} | a spec like 'conv(16,3,pad=1)-relu-"
          "maxpool(2)-flatten-dense(10)' or 'lstm(64)-last-dense(classes)' (grammar above)",
          metavar="SPEC")
    g.add("--layers", [128, 64], "mlp only: hidden layer sizes, e.g. 256,128 ('none': no hidden "
          "layer)", type=hidden_layers, metavar="N,N,...")
    g.add("--activation", "relu", "mlp only: activation of the hidden layers",
          choices=ACTIVATIONS)
    g.add("--init", None, "weight initialisation (default: he for relu-like, xavier otherwise)",
          choices=INITS)
    g.add("--dtype", "float32", "floating-point type", choices=DTYPES)
    g.add("--precision", "fp32", PRECISION_HELP, choices=PRECISIONS)
    g.add("--seed", 0, "seed of the weights, the batch order and the splits",
          type=int_at_least(0), metavar="N")
    g = Options(p.add_argument_group("training"), defaults)
    g.add("--loss", "ce", "ce: softmax cross-entropy; mse: mean squared error on one-hot targets; "
          "bce: binary cross-entropy of one sigmoid a class on one-hot 0/1 targets (accuracy: "
          "every output on the right side of 0.5)", choices=LABEL_LOSSES)
    g.add("--optimizer", "adam", "update rule (momentum = SGD with momentum 0.9)",
          choices=OPTIMIZER_NAMES)
    g.add("--lr", None, "learning rate (default: 0.001 for adam/adamw/rmsprop, 0.01 for "
          "sgd/momentum)", type=float_in(0, low_open=True, name="a finite number > 0"),
          metavar="LR")
    g.add("--momentum", None, "momentum for sgd, momentum and rmsprop",
          type=float_in(0, 1, name="a number in [0, 1)"), metavar="M")
    g.add("--weight-decay", 0.0, "L2 weight decay (decoupled for adamw)",
          type=float_in(0, name="a finite number >= 0"), metavar="WD")
    g.add("--clip-norm", None, "clip the global gradient norm to this value",
          type=float_in(0, low_open=True, name="a finite number > 0"), metavar="C")
    g.add("--epochs", 10, "passes over the training data", type=int_at_least(0), metavar="N")
    g.add("--batch-size", 128, "samples per step", type=int_at_least(1), metavar="N")
    g = Options(p.add_argument_group("learning-rate schedule and early stopping"), defaults)
    g.add("--schedule", "constant", "learning-rate schedule: step (x gamma every --step-size "
          "epochs), exponential (x gamma every epoch), cosine (to --min-lr at the last step)",
          choices=SCHEDULE_NAMES)
    g.add("--step-size", 10, "epochs between decays of the step schedule",
          type=int_at_least(1), metavar="E")
    g.add("--gamma", 0.1, "decay factor of the step and exponential schedules",
          type=float_in(0, low_open=True, name="a finite number > 0"), metavar="G")
    g.add("--min-lr", 0.0, "final learning rate of the cosine schedule",
          type=float_in(0, name="a finite number >= 0"), metavar="LR")
    g.add("--warmup-steps", 0, "linear warm-up over this many steps before the schedule",
          type=int_at_least(0), metavar="N")
    g.add("--early-stopping", 0, "stop after this many epochs without improvement of --monitor "
          "(needs --val-split; 0: off)", type=int_at_least(0), metavar="PATIENCE")
    g.add("--monitor", "val_loss", "metric watched by early stopping",
          choices=("val_loss", "val_accuracy"))
    g.add("--restore-best", True, "with early stopping, end with the best epoch's parameters "
          "(default: yes)", action=argparse.BooleanOptionalAction)
    g = Options(p.add_argument_group("checkpoints and safety"), defaults)
    g.add("--checkpoint", None, "save the full training state here (.npz) after every epoch",
          metavar="PATH")
    g.add("--checkpoint-every", 0, "also save every N steps (0: only at epoch ends)",
          type=int_at_least(0), metavar="N")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --checkpoint (options not given are taken "
                        "from it)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --checkpoint exists (it is replaced at the end "
                        "of the first epoch)")
    g.add("--nan-check-every", 10, "check loss, gradients and weights for NaN/Inf every N steps "
          "and stop naming the step and layer (0: only before checkpoints)",
          type=int_at_least(0), metavar="N")
    p.add_argument("--comm", default="single", choices=COMMUNICATORS,
                   help="data-parallel training under mpiexec: every rank takes its share of each "
                        "global\nbatch (--batch-size), gradients are all-reduced; rank 0 alone "
                        "prints and writes\n(mpi: mpi4py, 'gpubackprop[mpi]'; nccl: one GPU a rank)")
    g = add_device_options(p, defaults, "device")
    g.add_argument("--cuda-graph", default="auto", choices=CUDA_GRAPH_MODES,
                   help="the training step captured once as a CUDA graph and replayed (auto: on a "
                        "GPU where\nthe model's layers allow it, else the eager step; on: "
                        "graphs, or an error saying\nwhy not; off: the eager step); the same "
                        "results either way (default: auto)")
    g = p.add_argument_group("output")
    g.add_argument("--metrics-json", metavar="PATH",
                   help="write {test_accuracy, test_loss, epochs: [...], seconds} as JSON")
    g.add_argument("--plot", metavar="PATH",
                   help="draw train/validation loss and accuracy curves, in the format of the "
                        "extension\n(.png, .pdf, .svg, .jpg, ...; png without one)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--quiet", "-q", action="store_true", help="print only the final result")


def _say(args, text):
    if not getattr(args, "quiet", False):
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)


def _model_from_config(cfg, sample_shape, n_classes, device, kernels):
    """(model, plan) of the configuration's --model for samples of ``sample_shape``."""
    from gpubackprop.modelspec import build_model

    return build_model(cfg["model"], sample_shape, n_classes, hidden=cfg["layers"],
                       activation=cfg["activation"], init=cfg["init"], device=device,
                       dtype=cfg["dtype"], seed=cfg["seed"], kernels=kernels,
                       precision=cfg.get("precision") or "fp32")


def _flat_first(architecture):
    """True for a checkpoint whose model starts with a Dense layer (made before images kept
    their shape): its data is given as flat rows."""
    layers = architecture.get("layers") or [{}]
    return layers[0].get("type") == "Dense"


def _check_model_options(cfg, given):
    """--layers/--activation/--init shape only the mlp preset; a spec's syntax is checked before any data
    is loaded (its sizes once the data's shape is known)."""
    from gpubackprop import modelspec

    name = cfg["model"].strip().lower() if isinstance(cfg["model"], str) else cfg["model"]
    if name != "mlp":
        for key in ("layers", "activation", "init"):
            if key in given:
                raise ValueError(f"{key}: --{key} shapes the layers of --model mlp only; with "
                                 f"--model {cfg['model']} write it in the spec (e.g. "
                                 f"dense(128,init=he)-relu)")
    if name not in modelspec.PRESETS:
        modelspec.parse(cfg["model"])


def _optimizer_from_config(cfg):
    from gpubackprop.optimizers import make_optimizer

    kwargs = {"weight_decay": cfg["weight_decay"], "clip_norm": cfg["clip_norm"]}
    if cfg["momentum"] is not None:
        if cfg["optimizer"] not in ("sgd", "momentum", "rmsprop"):
            raise ValueError(f"momentum: only sgd, momentum and rmsprop take --momentum, got "
                             f"--optimizer {cfg['optimizer']}")
        kwargs["momentum"] = cfg["momentum"]
    if cfg["optimizer"] == "adamw" and cfg["weight_decay"] == 0.0:
        kwargs.pop("weight_decay")  # AdamW's own default decay (0.01) unless one is given
    return make_optimizer(cfg["optimizer"], cfg["lr"], **kwargs)


def _default_lr(optimizer):
    return 0.01 if optimizer in ("sgd", "momentum") else 0.001


def _train_config(args):
    """The run's configuration: defaults, then the checkpoint's (on --resume), then the options given."""
    given = {k: v for k, v in vars(args).items() if k in args.option_defaults and v is not None}
    cfg = dict(args.option_defaults)
    ckpt = None
    if args.resume:
        if not args.checkpoint:
            raise ValueError("resume: expected --checkpoint PATH, the run to continue")
        from gpubackprop.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        saved = ckpt.config
        if not saved or "dataset" not in saved:
            raise ValueError(f"checkpoint {args.checkpoint}: not made by 'gpubackprop train' "
                             f"(no training configuration); cannot resume it")
        for key in MUST_MATCH:
            if key in given and key in saved and _norm(given[key]) != _norm(saved[key]):
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"checkpoint {args.checkpoint}: made with {flag} "
                                 f"{_show(saved[key])}, not {_show(given[key])}; resume with the "
                                 f"same options or start a new run without --resume")
        cfg.update({k: v for k, v in saved.items() if k in cfg})
    elif args.checkpoint and os.path.exists(args.checkpoint) and not args.overwrite:
        raise ValueError(f"checkpoint {args.checkpoint} already exists: add --resume to continue "
                         f"it or --overwrite to start a new run over it")
    cfg.update(given)
    _check_model_options(cfg, given)
    if cfg["dataset"] is None:
        raise ValueError("dataset: expected --dataset digits|mnist:DIR|csv:PATH|npz:PATH")
    if cfg["lr"] is None:
        cfg["lr"] = _default_lr(cfg["optimizer"])
    if cfg["early_stopping"] and not cfg["val_split"]:
        raise ValueError("early-stopping: needs validation data; add --val-split, e.g. 0.1")
    return cfg, ckpt


def _early_stopping_note(stopper, done, epochs):
    """What early stopping did: where it stopped and why, and whose weights the model ends with."""
    if stopper.best_epoch is None:
        return f"early stopping: {stopper.monitor} never had a finite value; kept the last weights"
    best = f"{stopper.monitor} {stopper.best:.4f}"
    if stopper.wait >= stopper.patience:
        what = (f"early stopping: stopped after epoch {done} of {epochs}: {stopper.monitor} did "
                f"not improve for {stopper.wait} epoch{'s' if stopper.wait > 1 else ''} "
                f"(patience {stopper.patience}); ")
    else:
        what = f"early stopping: ran all {epochs} epochs without stopping; "
    if not stopper.restore_best:
        return what + f"kept the last epoch's weights (the best was epoch {stopper.best_epoch}, " \
                      f"{best}; --restore-best to restore it)"
    if stopper.best_epoch == done:
        return what + f"the last epoch is the best ({best})"
    return what + f"restored the weights of epoch {stopper.best_epoch}, the best ({best})"


def _already_done(args, cfg, ckpt, comm):
    """True (after one line saying so) when the checkpoint's run has nothing left to train; a
    ValueError when --epochs ends before the epoch the run is in."""
    state = ckpt.training_state()
    if state is None:
        return False
    epochs = cfg["epochs"]
    if state.finished:
        es = state.early_stopping or {}
        best = f"; it holds the weights of epoch {es['best_epoch']}" if cfg["restore_best"] and \
            es.get("best_epoch") else ""
        why = f" (early stopping on {cfg['monitor']}, patience {cfg['early_stopping']})" \
            if cfg["early_stopping"] else ""
        message = (f"checkpoint {args.checkpoint}: the run already stopped early after epoch "
                   f"{state.epoch}{why}{best}; nothing to resume: to train more start a new run "
                   f"(--overwrite or another --checkpoint)")
    elif state.batch == 0 and state.epoch >= epochs:
        more = f"resume with a larger --epochs, e.g. --epochs {state.epoch + 10}"
        count = f"{state.epoch} epoch{'s' if state.epoch != 1 else ''}"
        message = (f"checkpoint {args.checkpoint}: the run already completed its {count}; "
                   f"nothing to resume: to train more, {more}")
    elif state.epoch >= epochs:
        raise ValueError(f"epochs: the run in {args.checkpoint} is in epoch {state.epoch + 1} "
                         f"already; --epochs {epochs} ends before it (give at least "
                         f"--epochs {state.epoch + 1})")
    else:
        return False
    if comm.is_root:
        print(message)
    return True


def _flatten_data(data):
    for name in ("X_train", "X_val", "X_test"):
        X = getattr(data, name)
        if X is not None:
            setattr(data, name, X.reshape(len(X), -1))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def cmd_train(args):
    from gpubackprop.distributed import communicator

    # Without a launcher, MPI would run this process alone as a world of one: say so instead.
    require_launcher(args.comm, command="mpiexec -n N gpubackprop train ...", name="comm",
                     single="--comm single")
    comm = communicator(args.comm)
    if not comm.is_root:
        args.quiet = True  # rank 0 alone prints and writes
        warnings.simplefilter("ignore", UserWarning)  # and warns: every rank loads the same data
    # Every output checked before anything is read or trained: a folder given as --checkpoint
    # (said so, naming a file instead), an unwritable path, a plot format matplotlib lacks.
    check_checkpoint_file(args.checkpoint)
    for path, flag in ((args.checkpoint, "checkpoint"), (args.metrics_json, "metrics-json"),
                       (args.plot, "plot")):
        if path:
            check_output_path(path, flag)
    if args.plot:
        from gpubackprop.plotting import plot_format

        plot_format(args.plot)  # matplotlib there, and an extension it writes: before training
    # Rank 0 writes the checkpoint: it holds the path from before the resume reads it until the
    # end, so a second run on the same path stops here (the Checkpointer's lock is the same one).
    lock = contextlib.nullcontext()
    if args.checkpoint and comm.is_root:
        lock = lock_output(args.checkpoint, "checkpoint")
    with lock:
        return _train(args, comm)


def _train(args, comm):
    import gpubackprop as gb
    from gpubackprop.checkpoint import Checkpointer, fault_point
    from gpubackprop.datasets import load_dataset
    from gpubackprop.schedules import EarlyStopping, make_schedule

    cfg, ckpt = _train_config(args)
    if ckpt is not None and _already_done(args, cfg, ckpt, comm):
        return 0
    device, why = resolve_device(cfg["device"])

    data = load_dataset(cfg["dataset"], val_split=cfg["val_split"], test_split=cfg["test_split"],
                        seed=cfg["seed"], scale=cfg["scale"], label_column=cfg["label_column"],
                        header=cfg["header"],
                        scaling=None if ckpt is None else ckpt.scaling)
    n_classes = data.n_classes
    if ckpt is not None:
        n_classes = ckpt.architecture["layers"][-1].get("n_out", n_classes)
        if _flat_first(ckpt.architecture) and len(data.sample_shape) > 1:
            _flatten_data(data)
    model, plan = _model_from_config(cfg, data.sample_shape, n_classes, device, cfg["kernels"])
    if ckpt is not None:
        from gpubackprop.checkpoint import architecture, unfused_batch_norm

        mine = architecture(model)
        if ckpt.architecture != mine and ckpt.architecture == unfused_batch_norm(mine):
            # saved before "bn-relu" became one BatchNorm(activation=): resumed as it was built
            model = ckpt.build_model(device=device, kernels=cfg["kernels"])
    cfg["model_spec"] = plan.spec  # the preset expanded, for the record (not an option)
    loss = make_loss(cfg["loss"])
    opt = _optimizer_from_config(cfg)
    for split in ("train", "val", "test"):
        if split != "val" or data.X_val is not None:
            check_labels(data.split(split)[1], n_classes, f"dataset {cfg['dataset']} ({split})")
    steps_per_epoch = -(-len(data.X_train) // cfg["batch_size"])
    schedule = None
    if cfg["schedule"] != "constant" or cfg["warmup_steps"]:
        schedule = make_schedule(cfg["schedule"], cfg["lr"], steps_per_epoch, cfg["epochs"],
                                 step_size=cfg["step_size"], gamma=cfg["gamma"],
                                 warmup_steps=cfg["warmup_steps"], min_lr=cfg["min_lr"])
    stopper = None
    if cfg["early_stopping"]:
        stopper = EarlyStopping(cfg["monitor"], cfg["early_stopping"],
                                restore_best=cfg["restore_best"])
    state = None
    if ckpt is not None:
        state = ckpt.restore(model, opt, loss)

    n_val = 0 if data.X_val is None else len(data.X_val)
    shape_note = "" if len(data.sample_shape) == 1 else \
        f" (images of {'x'.join(map(str, data.sample_shape))})"
    _say(args, f"{data.name}: {len(data.X_train)} train / {n_val} validation / "
               f"{len(data.X_test)} test samples, {data.n_features} features, {n_classes} "
               f"classes{shape_note}")
    _say(args, f"model {cfg['model']}: {plan.summary()}")
    _say(args, f"{model.n_params:,} parameters, {cfg['dtype']}, on {device} ({why}), "
               f"{model.backend.ops.name} kernels; {opt!r}")
    if state is not None:
        _say(args, f"resuming {args.checkpoint} at epoch {state.epoch + 1}, batch {state.batch}, "
                   f"step {state.step}")

    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    previous = 0.0 if state is None else state.seconds
    checkpointer = None
    if args.checkpoint:
        checkpointer = Checkpointer(args.checkpoint, model, opt, loss, config=cfg,
                                    scaling=data.scaling, clock=clock, seconds=previous)
    epochs = cfg["epochs"]

    epoch_began = [clock()]

    def per_epoch(epoch, logs):
        parts = [f"{k} {v:.4f}" if k != "lr" else f"lr {v:.3g}" for k, v in logs.items()
                 if k != "epoch"]
        now = clock()
        _say(args, f"epoch {epoch + 1}/{epochs}: " + "  ".join(parts) +
             f"  ({now - epoch_began[0]:.1f} s, {previous + now:.1f} s in all)")
        epoch_began[0] = now

    on_step = None
    if os.environ.get("GPUBACKPROP_TEST_FAULT", "").startswith("kill-after-step:"):
        on_step = lambda step: fault_point("kill-after-step", step)  # noqa: E731
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    X_val = None if data.X_val is None else (data.X_val, targets(cfg["loss"], data.y_val,
                                                                   n_classes))
    history = gb.fit(model, loss, opt, data.X_train, targets(cfg["loss"], data.y_train, n_classes),
                     epochs=epochs, batch_size=cfg["batch_size"], validation=X_val,
                     progress=progress and not args.quiet, callback=per_epoch, schedule=schedule,
                     early_stopping=stopper, nan_check_every=cfg["nan_check_every"], state=state,
                     on_checkpoint=checkpointer, checkpoint_every=cfg["checkpoint_every"],
                     on_step=on_step, comm=comm, cuda_graph=args.cuda_graph)
    seconds = previous + clock()
    if stopper is not None:
        _say(args, _early_stopping_note(stopper, len(history["loss"]), epochs))
    test = score(model, loss, cfg["loss"], data.X_test, data.y_test, n_classes)
    epochs_out = []
    for i in range(len(history["loss"])):
        row = {"epoch": i + 1}
        for key, values in history.items():
            row[key if key.startswith("val_") else f"train_{key}"] = values[i]
        epochs_out.append(row)
    if not comm.is_root:
        return 0
    print(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
          f"({len(data.X_test)} samples, {len(epochs_out)} epochs, {seconds:.1f} s)")
    if args.metrics_json:
        write_json(args.metrics_json, {"test_accuracy": float(test["accuracy"]),
                                        "test_loss": float(test["loss"]), "epochs": epochs_out,
                                        "seconds": float(seconds)})
    if args.plot:
        from gpubackprop.plotting import plot_history

        plot_history(epochs_out, args.plot, title=f"{data.name}: test accuracy "
                                                  f"{test['accuracy']:.4f}")
    return 0

