"""The ``gpubackprop`` command: train, evaluate, predict, bench, info, gradcheck.

Every problem a user can cause (a bad argument, a missing or malformed file, a checkpoint from
another model, a diverging run) ends the command with one line on stderr,
``gpubackprop: error: <what is wrong>``, and exit status 2; no existing file is modified.
Set GPUBACKPROP_DEBUG=1 to get the full traceback instead.
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

PROG = "gpubackprop"
LOSS_NAMES = ("ce", "mse")
OPTIMIZER_NAMES = ("sgd", "momentum", "rmsprop", "adam", "adamw")
SCHEDULE_NAMES = ("constant", "step", "exponential", "cosine")
# Options whose value a resumed run must share with the checkpoint (the rest may change).
MUST_MATCH = ("dataset", "label_column", "val_split", "test_split", "scale", "model", "layers",
              "activation", "init", "dtype", "seed", "loss", "optimizer", "lr", "momentum",
              "weight_decay", "clip_norm", "batch_size", "schedule", "step_size", "gamma",
              "warmup_steps", "min_lr", "early_stopping", "monitor", "restore_best")


class UsageError(Exception):
    """A command-line usage problem (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


# ---- argument types -----------------------------------------------------------------------------
def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def _float_in(low, high=None, low_open=False, name="a number"):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not np.isfinite(value) or value < low or (low_open and value == low) \
                or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value
    return parse


def _layers(text):
    text = text.strip()
    if text in ("", "none"):
        return []
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = None
    if sizes is None or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected hidden layer sizes like 256,128 (positive "
                                         f"integers separated by commas, or 'none'), got {text!r}")
    return sizes


# ---- the parser ---------------------------------------------------------------------------------
DESCRIPTION = """\
Train neural networks by backpropagation on an NVIDIA GPU (CuPy + Numba CUDA) or the CPU.

A model is a chain of layers ending in one output per class, given by --model: a preset
(mlp: dense layers from --layers/--activation, the default; lenet5; resnet) or a spec such as
  conv(32,3,pad=1)-relu-maxpool(2)-conv(64,3,pad=1)-relu-maxpool(2)-flatten-dense(128)-relu-dense(10)
(see 'gpubackprop train --help'). Data sets are named like this:
  digits        scikit-learn's 8x8 handwritten digits (1797 images of 1x8x8, 10 classes)
  mnist:DIR     the four MNIST IDX files in DIR (train-images-idx3-ubyte, ..., optionally .gz)
  csv:PATH      a CSV file, one sample a row, the class in the last column (or --label-column)
  npz:PATH      a NumPy .npz archive with arrays X_train, y_train, X_test, y_test (X: (N, features),
                (N, H, W) or (N, C, H, W))
"""

EPILOG = """\
examples:
  gpubackprop train --dataset digits --layers 128,64 --epochs 20 --optimizer adam --lr 0.002
  gpubackprop train --dataset digits --model "conv(16,3,pad=1)-relu-maxpool(2)-flatten-dense(10)"
  gpubackprop train --dataset mnist:data/mnist --model lenet5 --optimizer momentum --lr 0.05
  gpubackprop train --dataset mnist:data/mnist --checkpoint run.npz --metrics-json run.json --plot run.png
  gpubackprop train --dataset mnist:data/mnist --checkpoint run.npz --resume     (continue a run)
  gpubackprop evaluate --checkpoint run.npz --dataset mnist:data/mnist
  gpubackprop predict --checkpoint run.npz --input new.csv --output predictions.csv
  gpubackprop info

'gpubackprop COMMAND --help' explains each command's options.
"""


MODEL_HELP = """\
--model: a preset name or a spec, tokens joined by '-', sizes inferred from the data:
  conv(out,k,stride=1,pad=0,dil=1,groups=1,bias=true)   2-D convolution (k etc.: N or HxW)
  maxpool(k,stride=k,pad=0,dil=1)  avgpool(k,stride=k,pad=0,count_include_pad=true)
  gap (global average pool)  flatten  dense(n)  bn  ln  dropout(p=0.5)
  res(SPEC)     residual block Y = X + SPEC(X), e.g. res(conv(16,3,pad=1)-bn-relu-conv(16,3,pad=1)-bn)
  identity|sigmoid|tanh|relu|leaky_relu|gelu   after conv/dense: fused into that layer
  'classes' is the number of classes (dense(classes)); a dense on images flattens them first.
presets: mlp (flatten-dense(h)-ACT-...-dense(classes) from --layers/--activation/--init),
  lenet5 (conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-dense(120)-relu-
  dense(84)-relu-dense(classes), adapted to small images), resnet (conv-bn-relu, two residual
  stages of 16 and 32 channels, gap, dense)."""


class _Options:
    """Adds options whose defaults stay None, so a resumed run can tell what was given."""

    def __init__(self, group, defaults):
        self.group, self.defaults = group, defaults

    def add(self, flag, default, help, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        self.defaults[dest] = default
        if default is not None and "action" not in kw:
            help = f"{help} (default: {default})"
        self.group.add_argument(flag, dest=dest, default=None, help=help, **kw)


def build_parser():
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    from gpubackprop import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # train
    p = sub.add_parser(
        "train", help="train a model on a data set", formatter_class=_Formatter,
        description="Train a model on a data set, then report its test accuracy."
                    "\n\n" + MODEL_HELP + "\n\nWith --checkpoint the full training state is "
                    "saved at the end of every epoch (atomically:\na crash leaves the previous "
                    "checkpoint intact); --resume "
                    "continues from it and ends\nexactly where the uninterrupted run would have "
                    "(bit for bit on the CPU).",
        epilog="example:\n  gpubackprop train --dataset digits --layers 128,64 --epochs 20 "
               "--lr 0.002 --plot curves.png")
    defaults = {}
    p.set_defaults(func=cmd_train, option_defaults=defaults)
    g = _Options(p.add_argument_group("data"), defaults)
    g.add("--dataset", None, "digits | mnist:DIR | csv:PATH | npz:PATH (required unless --resume)",
          metavar="SPEC")
    g.add("--label-column", None, "csv only: the label column, by header name or index "
          "(negative counts from the end; default: the last column)", metavar="COL")
    g.add("--val-split", 0.0, "fraction of the training data held out for validation "
          "(seeded by --seed)", type=_float_in(0, 1, name="a fraction in [0, 1)"), metavar="F")
    g.add("--test-split", 0.2, "digits and csv only: fraction held out as the test set",
          type=_float_in(0, 1, name="a fraction in [0, 1)"), metavar="F")
    g.add("--scale", "auto", "feature scaling: auto (pixels to [0, 1], other data standardised), "
          "standard, minmax or none; statistics come from the training split only",
          choices=("auto", "standard", "minmax", "none"))
    g = _Options(p.add_argument_group("model"), defaults)
    g.add("--model", "mlp", "mlp | lenet5 | resnet | a spec like 'conv(16,3,pad=1)-relu-maxpool(2)-"
          "flatten-dense(10)' (grammar above)", metavar="SPEC")
    g.add("--layers", [128, 64], "mlp only: hidden layer sizes, e.g. 256,128 ('none': no hidden "
          "layer)", type=_layers, metavar="N,N,...")
    g.add("--activation", "relu", "mlp only: activation of the hidden layers",
          choices=("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu"))
    g.add("--init", None, "weight initialisation (default: he for relu-like, xavier otherwise)",
          choices=("he", "xavier", "lecun", "normal"))
    g.add("--dtype", "float32", "floating-point type", choices=("float32", "float64"))
    g.add("--seed", 0, "seed of the weights, the batch order and the splits",
          type=_int_at_least(0), metavar="N")
    g = _Options(p.add_argument_group("training"), defaults)
    g.add("--loss", "ce", "ce: softmax cross-entropy; mse: mean squared error on one-hot targets",
          choices=LOSS_NAMES)
    g.add("--optimizer", "adam", "update rule (momentum = SGD with momentum 0.9)",
          choices=OPTIMIZER_NAMES)
    g.add("--lr", None, "learning rate (default: 0.001 for adam/adamw/rmsprop, 0.01 for "
          "sgd/momentum)", type=_float_in(0, low_open=True, name="a finite number > 0"),
          metavar="LR")
    g.add("--momentum", None, "momentum for sgd, momentum and rmsprop",
          type=_float_in(0, 1, name="a number in [0, 1)"), metavar="M")
    g.add("--weight-decay", 0.0, "L2 weight decay (decoupled for adamw)",
          type=_float_in(0, name="a finite number >= 0"), metavar="WD")
    g.add("--clip-norm", None, "clip the global gradient norm to this value",
          type=_float_in(0, low_open=True, name="a finite number > 0"), metavar="C")
    g.add("--epochs", 10, "passes over the training data", type=_int_at_least(0), metavar="N")
    g.add("--batch-size", 128, "samples per step", type=_int_at_least(1), metavar="N")
    g = _Options(p.add_argument_group("learning-rate schedule and early stopping"), defaults)
    g.add("--schedule", "constant", "learning-rate schedule: step (x gamma every --step-size "
          "epochs), exponential (x gamma every epoch), cosine (to --min-lr at the last step)",
          choices=SCHEDULE_NAMES)
    g.add("--step-size", 10, "epochs between decays of the step schedule",
          type=_int_at_least(1), metavar="E")
    g.add("--gamma", 0.1, "decay factor of the step and exponential schedules",
          type=_float_in(0, low_open=True, name="a finite number > 0"), metavar="G")
    g.add("--min-lr", 0.0, "final learning rate of the cosine schedule",
          type=_float_in(0, name="a finite number >= 0"), metavar="LR")
    g.add("--warmup-steps", 0, "linear warm-up over this many steps before the schedule",
          type=_int_at_least(0), metavar="N")
    g.add("--early-stopping", 0, "stop after this many epochs without improvement of --monitor "
          "(needs --val-split; 0: off)", type=_int_at_least(0), metavar="PATIENCE")
    g.add("--monitor", "val_loss", "metric watched by early stopping",
          choices=("val_loss", "val_accuracy"))
    g.add("--restore-best", True, "with early stopping, end with the best epoch's parameters "
          "(default: yes)", action=argparse.BooleanOptionalAction)
    g = _Options(p.add_argument_group("checkpoints and safety"), defaults)
    g.add("--checkpoint", None, "save the full training state here (.npz) after every epoch",
          metavar="PATH")
    g.add("--checkpoint-every", 0, "also save every N steps (0: only at epoch ends)",
          type=_int_at_least(0), metavar="N")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --checkpoint (options not given are taken "
                        "from it)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --checkpoint exists (it is replaced at the end "
                        "of the first epoch)")
    g.add("--nan-check-every", 10, "check loss, gradients and weights for NaN/Inf every N steps "
          "and stop naming the step and layer (0: only before checkpoints)",
          type=_int_at_least(0), metavar="N")
    p.add_argument("--comm", default="single", choices=("single", "mpi", "nccl"),
                   help="data-parallel training under mpiexec: every rank takes its share of each "
                        "global\nbatch (--batch-size), gradients are all-reduced; rank 0 alone "
                        "prints and writes\n(mpi: mpi4py, 'gpubackprop[mpi]'; nccl: one GPU a rank)")
    _device_options(p, defaults, "device")
    g = p.add_argument_group("output")
    g.add_argument("--metrics-json", metavar="PATH",
                   help="write {test_accuracy, test_loss, epochs: [...], seconds} as JSON")
    g.add_argument("--plot", metavar="PATH",
                   help="draw train/validation loss and accuracy curves (PNG)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--quiet", "-q", action="store_true", help="print only the final result")

    # evaluate
    p = sub.add_parser(
        "evaluate", help="test a saved model on a data set", formatter_class=_Formatter,
        description="Load a checkpoint and report its loss and accuracy on a data set's test "
                    "split\n(the same split, scaling and seed as in training).",
        epilog="example:\n  gpubackprop evaluate --checkpoint run.npz --dataset mnist:data/mnist")
    p.set_defaults(func=cmd_evaluate)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint from train")
    p.add_argument("--dataset", metavar="SPEC",
                   help="digits | mnist:DIR | csv:PATH | npz:PATH (default: the training one)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split to evaluate (default: test)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    _device_options(p, None, "device")

    # predict
    p = sub.add_parser(
        "predict", help="predict classes of new data with a saved model",
        formatter_class=_Formatter,
        description="Load a checkpoint and write the predicted class of every sample (or, with "
                    "--probabilities,\nthe probability of every class). Features are scaled "
                    "as in training.",
        epilog="examples:\n  gpubackprop predict --checkpoint run.npz --input new.csv --output "
               "pred.csv\n  gpubackprop predict --checkpoint run.npz --dataset digits --output "
               "pred.npy --probabilities")
    p.set_defaults(func=cmd_predict)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint from train")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="PATH",
                     help="features only: .npy, .npz (array X) or .csv (header optional)")
    src.add_argument("--dataset", metavar="SPEC", help="a data set; its --split is predicted")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="with --dataset: which split (default: test)")
    p.add_argument("--output", metavar="PATH",
                   help="write .npy or .csv (default: print one prediction a line)")
    p.add_argument("--probabilities", action="store_true",
                   help="write class probabilities instead of classes")
    _device_options(p, None, "device")

    # bench
    sub.add_parser("bench", help="benchmark training steps (see 'gpubackprop bench --help')",
                   add_help=False, formatter_class=_Formatter,
                   description="Runs gpubackprop.benchmark with the remaining arguments.")

    # info
    p = sub.add_parser("info", help="versions, devices and the active kernel set",
                       formatter_class=_Formatter,
                       description="Print the versions of Python and the libraries, the devices "
                                   "seen, which kernel set\nis active and why, and how long the "
                                   "kernels take to compile on first use.")
    p.set_defaults(func=cmd_info)
    p.add_argument("--no-compile", action="store_true",
                   help="skip measuring the first-use compile time")
    p.add_argument("--ptx", action="store_true",
                   help="compile every CUDA kernel with the real CUDA compiler (NVVM + ptxas for "
                        "sm_80 and sm_90;\nno GPU needed, numba-cuda[cu12]) and print registers per "
                        "thread")
    _device_options(p, None, "device")

    # gradcheck
    p = sub.add_parser(
        "gradcheck", help="check backprop against finite differences", formatter_class=_Formatter,
        description="Build a small float64 model on random data and print the maximum relative "
                    "error between\nbackprop's gradients and central finite differences. Exit "
                    "status 1 if above --tol.")
    p.set_defaults(func=cmd_gradcheck)
    p.add_argument("--layers", type=_layers, default=[6, 5], metavar="N,N,...",
                   help="hidden layer sizes (default: 6,5)")
    p.add_argument("--activation", default="tanh",
                   choices=("identity", "sigmoid", "tanh", "relu", "leaky_relu", "gelu"),
                   help="hidden activation (default: tanh)")
    p.add_argument("--loss", default="ce", choices=("ce", "mse", "bce"),
                   help="loss (default: ce)")
    p.add_argument("--features", type=_int_at_least(1), default=4, metavar="N",
                   help="input features (default: 4)")
    p.add_argument("--classes", type=_int_at_least(1), default=3, metavar="N",
                   help="outputs (default: 3)")
    p.add_argument("--samples", type=_int_at_least(1), default=8, metavar="N",
                   help="batch size (default: 8)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, metavar="N",
                   help="seed (default: 0)")
    p.add_argument("--tol", type=_float_in(0, low_open=True, name="a number > 0"), default=1e-6,
                   help="largest acceptable relative error (default: 1e-6)")
    _device_options(p, None, "device")
    return parser


def _device_options(p, defaults, title):
    g = p.add_argument_group(title)
    choices = {"device": ("auto", "cpu", "cuda"), "kernels": ("fused", "reference")}
    helps = {"device": "auto (the GPU when CuPy and Numba see one, else the CPU), cpu or cuda",
             "kernels": "fused (Numba kernels) or reference (plain NumPy/CuPy)"}
    for name in ("device", "kernels"):
        default = choices[name][0]
        if defaults is not None:
            defaults[name] = default
            g.add_argument(f"--{name}", default=None, choices=choices[name],
                           help=f"{helps[name]} (default: {default})")
        else:
            g.add_argument(f"--{name}", default=default, choices=choices[name],
                           help=f"{helps[name]} (default: {default})")


# ---- helpers --------------------------------------------------------------------------------------
def _resolve_device(device):
    """auto -> cuda or cpu, with the reason, without the backend's stderr note."""
    from gpubackprop.backend import cuda_available, has_cupy_gpu, is_cudasim

    if device == "auto":
        return ("cuda", "a CUDA GPU was found") if has_cupy_gpu() else \
            ("cpu", "no CUDA GPU found")
    if device == "cuda" and not cuda_available():
        raise RuntimeError("device: 'cuda' was requested but no CUDA GPU is usable (needs "
                           "cupy-cuda12x and numba-cuda seeing a GPU); use --device cpu or auto")
    return device, "under Numba's CUDA simulator" if device == "cuda" and is_cudasim() else \
        "as requested"


def _check_output_path(path, flag):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a folder, expected a file path")


def _say(args, text):
    if not getattr(args, "quiet", False):
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)


def _make_loss(name):
    import gpubackprop as gb

    return {"ce": gb.SoftmaxCrossEntropy, "mse": gb.MSE, "bce": gb.BinaryCrossEntropy}[name]()


def _targets(loss_name, y, n_classes):
    """Class labels as the loss wants them: indices for ce, one-hot rows for mse."""
    if loss_name == "mse":
        onehot = np.zeros((len(y), n_classes))
        onehot[np.arange(len(y)), y] = 1.0
        return onehot
    return y


def _check_labels(y, n_classes, what):
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise ValueError(f"{what}: label {bad} is out of range: the model has {n_classes} outputs "
                         f"(classes 0..{n_classes - 1})")


def _score(model, loss, loss_name, X, y, n_classes):
    """{"loss", "accuracy"} on host data; accuracy by arg-max for every loss."""
    import gpubackprop as gb

    metrics = gb.evaluate(model, loss, X, _targets(loss_name, y, n_classes))
    if "accuracy" not in metrics:
        metrics["accuracy"] = float((model.predict(X).argmax(axis=1) == y).mean())
    return metrics


def _write_json(path, obj):
    from gpubackprop.checkpoint import atomic_write

    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _model_from_config(cfg, sample_shape, n_classes, device, kernels):
    """(model, plan) of the configuration's --model for samples of ``sample_shape``."""
    from gpubackprop.modelspec import build_model

    return build_model(cfg["model"], sample_shape, n_classes, hidden=cfg["layers"],
                       activation=cfg["activation"], init=cfg["init"], device=device,
                       dtype=cfg["dtype"], seed=cfg["seed"], kernels=kernels)


def _model_input_shape(model):
    """One sample's shape as the model takes it: (features,) or (channels, height, width)."""
    shape = getattr(model, "input_shape", None)
    return tuple(shape) if shape else (int(model.n_in),)


def _n_outputs(model):
    shape = getattr(model, "output_shape", None)
    return int(shape[-1]) if shape else int(model.n_out)


def _fit_input(X, model, what, checkpoint):
    """X in the model's per-sample layout: images given as flat rows (or the other way round) are
    reshaped when the sizes agree; otherwise a ValueError naming both shapes."""
    shape = _model_input_shape(model)
    if X.shape[1:] == shape:
        return X
    if int(np.prod(X.shape[1:])) == int(np.prod(shape)):
        return X.reshape((len(X), *shape))
    got = "x".join(map(str, X.shape[1:]))
    want = "x".join(map(str, shape))
    raise ValueError(f"{what}: has samples of shape {got} ({int(np.prod(X.shape[1:]))} "
                     f"features), the model in {checkpoint} expects {want} "
                     f"({int(np.prod(shape))} features)")


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


# ---- train ----------------------------------------------------------------------------------------
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
    import gpubackprop as gb
    from gpubackprop.checkpoint import Checkpointer, fault_point
    from gpubackprop.datasets import load_dataset
    from gpubackprop.distributed import communicator
    from gpubackprop.schedules import EarlyStopping, make_schedule

    comm = communicator(args.comm)
    if not comm.is_root:
        args.quiet = True  # rank 0 alone prints and writes
    cfg, ckpt = _train_config(args)
    for path, flag in ((args.checkpoint, "checkpoint"), (args.metrics_json, "metrics-json"),
                       (args.plot, "plot")):
        if path:
            _check_output_path(path, flag)
    if args.plot:
        from gpubackprop.plotting import require_matplotlib

        require_matplotlib()
    device, why = _resolve_device(cfg["device"])

    data = load_dataset(cfg["dataset"], val_split=cfg["val_split"], test_split=cfg["test_split"],
                        seed=cfg["seed"], scale=cfg["scale"], label_column=cfg["label_column"],
                        scaling=None if ckpt is None else ckpt.scaling)
    n_classes = data.n_classes
    if ckpt is not None:
        n_classes = ckpt.architecture["layers"][-1].get("n_out", n_classes)
        if _flat_first(ckpt.architecture) and len(data.sample_shape) > 1:
            _flatten_data(data)
    model, plan = _model_from_config(cfg, data.sample_shape, n_classes, device, cfg["kernels"])
    cfg["model_spec"] = plan.spec  # the preset expanded, for the record (not an option)
    loss = _make_loss(cfg["loss"])
    opt = _optimizer_from_config(cfg)
    for split in ("train", "val", "test"):
        if split != "val" or data.X_val is not None:
            _check_labels(data.split(split)[1], n_classes, f"dataset {cfg['dataset']} ({split})")
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

    def per_epoch(epoch, logs):
        parts = [f"{k} {v:.4f}" if k != "lr" else f"lr {v:.3g}" for k, v in logs.items()
                 if k != "epoch"]
        _say(args, f"epoch {epoch + 1}/{epochs}: " + "  ".join(parts) +
             f"  ({previous + clock():.1f} s)")

    on_step = None
    if os.environ.get("GPUBACKPROP_TEST_FAULT", "").startswith("kill-after-step:"):
        on_step = lambda step: fault_point("kill-after-step", step)  # noqa: E731
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    X_val = None if data.X_val is None else (data.X_val, _targets(cfg["loss"], data.y_val,
                                                                   n_classes))
    history = gb.fit(model, loss, opt, data.X_train, _targets(cfg["loss"], data.y_train, n_classes),
                     epochs=epochs, batch_size=cfg["batch_size"], validation=X_val,
                     progress=progress and not args.quiet, callback=per_epoch, schedule=schedule,
                     early_stopping=stopper, nan_check_every=cfg["nan_check_every"], state=state,
                     on_checkpoint=checkpointer, checkpoint_every=cfg["checkpoint_every"],
                     on_step=on_step, comm=comm)
    seconds = previous + clock()
    test = _score(model, loss, cfg["loss"], data.X_test, data.y_test, n_classes)
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
        _write_json(args.metrics_json, {"test_accuracy": float(test["accuracy"]),
                                        "test_loss": float(test["loss"]), "epochs": epochs_out,
                                        "seconds": float(seconds)})
    if args.plot:
        from gpubackprop.plotting import plot_history

        plot_history(epochs_out, args.plot, title=f"{data.name}: test accuracy "
                                                  f"{test['accuracy']:.4f}")
    return 0


# ---- evaluate and predict -------------------------------------------------------------------------
def _load_for_inference(args):
    from gpubackprop.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    device, _ = _resolve_device(args.device)
    model = ckpt.build_model(device=device, kernels=args.kernels)
    return ckpt, model


def _dataset_for(ckpt, spec, args):
    from gpubackprop.datasets import load_dataset

    cfg = ckpt.config
    spec = spec or cfg.get("dataset")
    if spec is None:
        raise ValueError("dataset: expected --dataset (the checkpoint does not name one)")
    scaling = ckpt.scaling
    label_column = cfg.get("label_column") if spec.startswith("csv:") else None
    data = load_dataset(spec, val_split=cfg.get("val_split", 0.0),
                        test_split=cfg.get("test_split", 0.2), seed=cfg.get("seed", 0),
                        label_column=label_column,
                        scaling=scaling if scaling is not None else {"kind": "none"})
    return data


def cmd_evaluate(args):
    ckpt, model = _load_for_inference(args)
    data = _dataset_for(ckpt, args.dataset, args)
    X, y = data.split(args.split)
    if len(X) == 0:
        raise ValueError(f"split: the {args.split} split of {data.name} is empty")
    X = _fit_input(X, model, f"dataset {data.name}", args.checkpoint)
    n_out = _n_outputs(model)
    _check_labels(y, n_out, f"dataset {data.name} ({args.split})")
    loss_name = {"MSE": "mse", "SoftmaxCrossEntropy": "ce"}.get(ckpt.meta.get("loss"), "ce")
    metrics = _score(model, _make_loss(loss_name), loss_name, X, y, n_out)
    if args.json:
        print(json.dumps({"split": args.split, "loss": metrics["loss"],
                          "accuracy": metrics["accuracy"], "samples": len(X)}))
    else:
        print(f"{args.split} accuracy {metrics['accuracy']:.4f}  {args.split} loss "
              f"{metrics['loss']:.4f}  ({len(X)} samples of {data.name})")
    return 0


def cmd_predict(args):
    from gpubackprop.checkpoint import atomic_write
    from gpubackprop.datasets import apply_scaling, load_features

    if args.output:
        _check_output_path(args.output, "output")
        if not args.output.lower().endswith((".npy", ".csv")):
            raise ValueError(f"output: expected a path ending in .npy or .csv, got {args.output!r}")
    ckpt, model = _load_for_inference(args)
    if args.input:
        X = _fit_input(load_features(args.input), model, f"input {args.input}", args.checkpoint)
        if ckpt.scaling is not None:
            X = apply_scaling(X, ckpt.scaling)
    else:
        X, _ = _dataset_for(ckpt, args.dataset, args).split(args.split)
        X = _fit_input(X, model, f"dataset {args.dataset}", args.checkpoint)
    probs = model.predict(X, loss=_make_loss("ce"))  # softmax of the outputs
    out = probs if args.probabilities else probs.argmax(axis=1).astype(np.int64)
    if args.output and args.output.lower().endswith(".npy"):
        atomic_write(args.output, lambda f: np.save(f, out))
    else:
        if out.ndim == 1:
            lines = ["class"] + [str(int(v)) for v in out]
        else:
            lines = [",".join(f"p{j}" for j in range(out.shape[1]))] + \
                    [",".join(f"{v:.6g}" for v in row) for row in out]
        text = "\n".join(lines) + "\n"
        if args.output:
            atomic_write(args.output, lambda f: f.write(text.encode()))
        else:
            sys.stdout.write(text)
    if args.output:
        print(f"wrote {len(out)} predictions to {args.output}")
    return 0


# ---- info, gradcheck, bench -----------------------------------------------------------------------
def _version(module_name):
    try:
        from importlib.metadata import version

        return version(module_name)
    except Exception:
        return None


def cmd_info(args):
    from gpubackprop import __version__
    from gpubackprop.backend import cupy_module, has_cupy_gpu, is_cudasim, numba_cuda

    rows = [("gpubackprop", __version__),
            ("python", f"{platform.python_version()} ({platform.python_implementation()}, "
                       f"{platform.machine()})"),
            ("numpy", np.__version__)]
    import numba

    rows.append(("numba", numba.__version__))
    rows.append(("numba-cuda", _version("numba-cuda") or "not installed"))
    cp = cupy_module()
    rows.append(("cupy", getattr(cp, "__version__", "?") if cp is not None else "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    print()
    cuda = numba_cuda()
    gpu = has_cupy_gpu()
    if gpu:
        try:
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            print(f"GPU: {name} (device {cp.cuda.Device().id} of "
                  f"{cp.cuda.runtime.getDeviceCount()})")
        except Exception:
            print("GPU: yes")
    else:
        reasons = []
        if cp is None:
            reasons.append("CuPy is not installed")
        if cuda is None:
            reasons.append("numba.cuda cannot be imported")
        if not reasons:
            reasons.append("CuPy/Numba see no CUDA device" if not is_cudasim() else
                           "the simulator is on (NUMBA_ENABLE_CUDASIM=1)")
        print(f"GPU: none ({'; '.join(reasons)})")
    print(f"CUDA simulator: {'on (device cuda runs in Numba simulator)' if is_cudasim() else 'off'}")
    if gpu:
        from gpubackprop.backend import tf32_enabled

        tf32 = "TF32 allowed (CUPY_TF32 or NVIDIA_TF32_OVERRIDE set)" if tf32_enabled() else \
            "full float32 (TF32 off)"
        print(f"float32 GEMMs: {tf32}")
    print(f"CPU: {os.cpu_count()} cores, Numba threads {numba.config.NUMBA_NUM_THREADS}")

    device, why = _resolve_device(args.device)
    kind = {("cuda", "fused"): "Numba CUDA" + (" (simulated)" if is_cudasim() else ""),
            ("cpu", "fused"): "Numba CPU"}.get((device, args.kernels), "plain NumPy/CuPy")
    print(f"kernel set: {args.kernels} ({kind}) on {device}, because --device {args.device}: "
          f"{why}")
    from gpubackprop.kernels import info

    for k, v in info.describe(device, args.kernels).items():
        print(f"  {k}: {v}")
    if not args.no_compile:
        # The first step of a typical model comes first: it pays for exactly the kernels such a
        # model uses (compiled, or loaded from Numba's on-disk cache), as a user's first step does.
        first, later = _compile_time(device, args.kernels)
        print(f"first training step: {first:.2f} s (relu MLP 16-16-4, Adam, batch 32: compiling "
              f"or loading its kernels); a later step takes {later * 1e3:.2f} ms")
        if args.kernels == "fused":
            for dtype in ("float32", "float64"):
                seconds = info.compile_time(device, dtype)
                print(f"the MLP kernels ({dtype}: dense, loss, optimizers; serial and parallel): "
                      f"{seconds:.2f} s to compile, or to load from Numba's on-disk cache")
            print("the conv, pooling, normalization, dropout and recurrent kernels compile on "
                  "first use")
    if args.ptx:
        _print_ptx_report()
    return 0


def _print_ptx_report():
    """Registers per thread of every CUDA kernel, from ptxas (no GPU needed)."""
    from gpubackprop.backend import is_cudasim

    if is_cudasim():
        raise RuntimeError("--ptx: the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); it compiles nothing")
    try:
        from gpubackprop.kernels.cuda import ptx
    except ImportError as e:
        raise RuntimeError(f"--ptx: needs numba-cuda ({e})") from None
    if ptx.ptxas_path() is None:
        raise RuntimeError("--ptx: ptxas not found (pip install 'numba-cuda[cu12]')")
    reports = ptx.compile_all()
    print()
    print(f"CUDA kernels through NVVM + ptxas ({len(reports)} compilations; registers per thread):")
    print(ptx.register_table(reports))
    dirty = [r for r in reports if not r.clean]
    print("spills / stack / local memory: " + (", ".join(f"{r.name} ({r.dtype}, {r.arch})"
                                                       for r in dirty) if dirty else "none"))


def _compile_time(device, kernels):
    """Seconds of the first and of a later training step of a tiny model (both dtypes' kernels
    compile on first use; float32 is the default one measured)."""
    import gpubackprop as gb

    model = gb.Sequential([gb.Dense(16, 16, activation="relu"), gb.Dense(16, 4)], device=device,
                          kernels=kernels)
    X = np.random.default_rng(0).normal(size=(32, 16))
    y = np.arange(32) % 4
    loss, opt = gb.SoftmaxCrossEntropy(), gb.Adam(1e-3)
    t0 = time.perf_counter()
    gb.train_step(model, loss, opt, X, y)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        gb.train_step(model, loss, opt, X, y)
    return first, (time.perf_counter() - t0) / 5


def cmd_gradcheck(args):
    import gpubackprop as gb

    device, _ = _resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    sizes = [args.features] + list(args.layers) + [args.classes]
    layers = [gb.Dense(sizes[i], sizes[i + 1],
                       activation=args.activation if i < len(sizes) - 2 else "identity")
              for i in range(len(sizes) - 1)]
    model = gb.Sequential(layers, device=device, dtype="float64", seed=args.seed,
                          kernels=args.kernels)
    X = rng.normal(size=(args.samples, args.features))
    if args.loss == "ce":
        y = rng.integers(0, args.classes, args.samples)
    elif args.loss == "mse":
        y = rng.normal(size=(args.samples, args.classes))
    else:
        y = (rng.random((args.samples, args.classes)) > 0.5).astype(np.float64)
    err = gb.gradcheck(model, _make_loss(args.loss), X, y)
    ok = err <= args.tol
    print(f"gradcheck {'-'.join(map(str, sizes))} {args.activation}, loss {args.loss}, "
          f"{model.n_params} parameters, {device}/{args.kernels}: max relative error {err:.3e} "
          f"(tolerance {args.tol:g}): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_bench(argv):
    import importlib

    try:
        benchmark = importlib.import_module("gpubackprop.benchmark")
    except ModuleNotFoundError as e:
        if e.name != "gpubackprop.benchmark":
            raise
        raise ValueError("bench: gpubackprop.benchmark is not available in this installation"
                         ) from None
    code = benchmark.main(list(argv))
    return 0 if code is None else int(code)


# ---- entry point ----------------------------------------------------------------------------------
def main(argv=None):
    """Run the command line; returns the exit status (0 ok, 1 a failed check, 2 a usage/data error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # The NaN guard reports divergence itself; Numba's performance hints are not errors.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            warnings.filterwarnings("ignore", module="numba")
            if argv and argv[0] == "bench":
                return cmd_bench(argv[1:])
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.command is None:
                raise UsageError(f"expected a command: train, evaluate, predict, bench, info or "
                                 f"gradcheck (see '{PROG} --help')")
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("GPUBACKPROP_DEBUG") and not isinstance(e, UsageError):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        from gpubackprop.distributed import abort_parallel_job

        abort_parallel_job(2)  # under mpiexec: end every rank, none waits in a collective
        return 2
