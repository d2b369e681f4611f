"""The ``gpubackprop`` command: train, evaluate, predict, bench, info, gradcheck.

Every problem a user can cause (a bad argument, a missing or malformed file, a checkpoint from
another model, a diverging run) ends the command with one line on stderr,
``gpubackprop: error: <what is wrong>``, and exit status 2; no existing file is modified. A
warning (e.g. labels that leave most classes unused) is one line too, ``gpubackprop: warning: ...``.
Set GPUBACKPROP_DEBUG=1 to get the full traceback instead.
"""

import os
import sys
import warnings

import numpy as np

from gpubackprop.cli import bench, evaluate, gradcheck, info, predict, train
from gpubackprop.cli.options import PROG, Formatter, Parser, UsageError

__all__ = ["PROG", "UsageError", "build_parser", "main"]

# The commands in the order the help lists them; each module adds its own subparser.
COMMANDS = (train, evaluate, predict, bench, info, gradcheck)

DESCRIPTION = """\
Train neural networks by backpropagation on an NVIDIA GPU (CuPy + Numba CUDA) or the CPU.

A model is a chain of layers ending in one output per class, given by --model: a preset
(mlp: dense layers from --layers/--activation, the default; lenet5; resnet; lstm) or a spec such as
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


def build_parser():
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    from gpubackprop import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line on stderr, as the errors are: no source line, no file name."""
    text = " ".join(str(message).split()) or category.__name__
    if not issubclass(category, UserWarning):  # the library's own are UserWarnings; say what else
        text = f"{text} ({category.__name__})"
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file)


def main(argv=None):
    """Run the command line; returns the exit status (0 ok, 1 a failed check, 2 a usage/data error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # The NaN guard reports divergence itself; Numba's performance hints are not errors.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            warnings.filterwarnings("ignore", module="numba")
            warnings.showwarning = show_warning  # restored with the filters on the way out
            if argv and argv[0] == "bench":
                return bench.cmd_bench(argv[1:])
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.command is None:
                raise UsageError(f"expected a command: train, evaluate, predict, bench, info or "
                                 f"gradcheck (see '{PROG} --help')")
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout's reader left (`gpubackprop info | head`): stop quietly, as other tools do, with
        # stdout pointed at devnull so that the interpreter's final flush raises nothing either.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, the shell's status for a writer killed by the signal
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
