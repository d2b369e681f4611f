"""``gpubackprop evaluate``: a saved model's loss and accuracy on a data set's split."""

from gpubackprop.cli.inference import dataset_for, fit_input, load_for_inference, n_outputs
from gpubackprop.cli.options import HEADER_HELP, Formatter, add_device_options
from gpubackprop.cli.scoring import check_labels, checkpoint_loss, make_loss, score
from gpubackprop.datasets import HEADERS
from gpubackprop.outputs import json_text


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="test a saved model on a data set", formatter_class=Formatter,
        description="Load a checkpoint and report its loss and accuracy on a data set's test "
                    "split\n(the same split, scaling and seed as in training).",
        epilog="example:\n  gpubackprop evaluate --checkpoint run.npz --dataset mnist:data/mnist")
    p.set_defaults(func=cmd_evaluate)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint from train")
    p.add_argument("--dataset", metavar="SPEC",
                   help="digits | mnist:DIR | csv:PATH | npz:PATH (default: the training one)")
    p.add_argument("--header", choices=HEADERS, default=None,
                   help=f"{HEADER_HELP} (default: the training run's, else auto)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split to evaluate (default: test)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line (a non-finite loss as null)")
    add_device_options(p, None, "device")


def cmd_evaluate(args):
    ckpt, model = load_for_inference(args)
    data = dataset_for(ckpt, args.dataset, args)
    X, y = data.split(args.split)
    if len(X) == 0:
        raise ValueError(f"split: the {args.split} split of {data.name} is empty")
    X = fit_input(X, model, f"dataset {data.name}", args.checkpoint)
    n_out = n_outputs(model)
    check_labels(y, n_out, f"dataset {data.name} ({args.split})")
    loss_name = checkpoint_loss(ckpt)
    metrics = score(model, make_loss(loss_name), loss_name, X, y, n_out)
    if args.json:
        print(json_text({"split": args.split, "loss": metrics["loss"],
                          "accuracy": metrics["accuracy"], "samples": len(X)}))
    else:
        print(f"{args.split} accuracy {metrics['accuracy']:.4f}  {args.split} loss "
              f"{metrics['loss']:.4f}  ({len(X)} samples of {data.name})")
    return 0

