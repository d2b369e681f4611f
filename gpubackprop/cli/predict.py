"""``gpubackprop predict``: the classes (or class probabilities) a saved model gives new data."""

import sys

import numpy as np

from gpubackprop.cli.inference import dataset_for, fit_input, load_for_inference
from gpubackprop.cli.options import HEADER_HELP, Formatter, add_device_options
from gpubackprop.cli.scoring import checkpoint_loss, make_loss
from gpubackprop.datasets import HEADERS
from gpubackprop.outputs import atomic_write, check_output_path


def add_parser(sub):
    p = sub.add_parser(
        "predict", help="predict classes of new data with a saved model",
        formatter_class=Formatter,
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
                     help="features only: .npy, .npz (array X) or .csv (header row: see --header)")
    src.add_argument("--dataset", metavar="SPEC", help="a data set; its --split is predicted")
    p.add_argument("--header", choices=HEADERS, default=None,
                   help=f"{HEADER_HELP} (default: auto; with --dataset the training run's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="with --dataset: which split (default: test)")
    p.add_argument("--output", metavar="PATH",
                   help="write .npy or .csv (default: print one prediction a line)")
    p.add_argument("--probabilities", action="store_true",
                   help="write class probabilities instead of classes")
    add_device_options(p, None, "device")


def cmd_predict(args):
    from gpubackprop.datasets import apply_scaling, load_features

    if args.output:
        check_output_path(args.output, "output")
        if not args.output.lower().endswith((".npy", ".csv")):
            raise ValueError(f"output: expected a path ending in .npy or .csv, got {args.output!r}")
    ckpt, model = load_for_inference(args)
    if args.input:
        X = load_features(args.input, header=args.header or "auto")
        X = fit_input(X, model, f"input {args.input}", args.checkpoint)
        if ckpt.scaling is not None:
            X = apply_scaling(X, ckpt.scaling)
    else:
        X, _ = dataset_for(ckpt, args.dataset, args).split(args.split)
        X = fit_input(X, model, f"dataset {args.dataset}", args.checkpoint)
    # The outputs through the training loss's link: softmax (ce, mse) or per-class sigmoid (bce).
    loss_name = checkpoint_loss(ckpt)
    probs = model.predict(X, loss=make_loss("bce" if loss_name == "bce" else "ce"))
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

