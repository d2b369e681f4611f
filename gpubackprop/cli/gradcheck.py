"""``gpubackprop gradcheck``: backprop's gradients of a small float64 model against central
differences."""

import numpy as np

from gpubackprop.cli.options import (
    Formatter,
    add_device_options,
    float_in,
    hidden_layers,
    int_at_least,
    resolve_device,
)
from gpubackprop.cli.scoring import make_loss
from gpubackprop.kernels.reference import ACTIVATIONS
from gpubackprop.losses import LOSSES


def add_parser(sub):
    p = sub.add_parser(
        "gradcheck", help="check backprop against finite differences", formatter_class=Formatter,
        description="Build a small float64 model on random data and print the maximum relative "
                    "error between\nbackprop's gradients and central finite differences. Exit "
                    "status 1 if above --tol.")
    p.set_defaults(func=cmd_gradcheck)
    p.add_argument("--layers", type=hidden_layers, default=[6, 5], metavar="N,N,...",
                   help="hidden layer sizes (default: 6,5)")
    p.add_argument("--activation", default="tanh",
                   choices=ACTIVATIONS,
                   help="hidden activation (default: tanh)")
    p.add_argument("--loss", default="ce", choices=tuple(LOSSES),
                   help="loss (default: ce)")
    p.add_argument("--features", type=int_at_least(1), default=4, metavar="N",
                   help="input features (default: 4)")
    p.add_argument("--classes", type=int_at_least(1), default=3, metavar="N",
                   help="outputs (default: 3)")
    p.add_argument("--samples", type=int_at_least(1), default=8, metavar="N",
                   help="batch size (default: 8)")
    p.add_argument("--seed", type=int_at_least(0), default=0, metavar="N",
                   help="seed (default: 0)")
    p.add_argument("--tol", type=float_in(0, low_open=True, name="a number > 0"), default=1e-6,
                   help="largest acceptable relative error (default: 1e-6)")
    add_device_options(p, None, "device")


def cmd_gradcheck(args):
    import gpubackprop as gb

    device, _ = resolve_device(args.device)
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
    err = gb.gradcheck(model, make_loss(args.loss), X, y)
    ok = err <= args.tol
    print(f"gradcheck {'-'.join(map(str, sizes))} {args.activation}, loss {args.loss}, "
          f"{model.n_params} parameters, {device}/{args.kernels}: max relative error {err:.3e} "
          f"(tolerance {args.tol:g}): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1

