"""What the commands share on the command line: the parser and its usage error, the argument
types, the options kept None until a resumed run can tell what was given, --device/--kernels,
--header's help, and the check of a --checkpoint that names a folder."""

import argparse
import os

import numpy as np

from gpubackprop.backend import DEVICES, KERNEL_SETS
from gpubackprop.precision import PRECISIONS  # noqa: F401 (train's --precision choices)

PROG = "gpubackprop"


# --precision (train): gpubackprop.precision's names, and what they mean on each device.
PRECISION_HELP = ("mixed precision: fp32, or bf16/fp16 with float32 master weights and 16-bit "
                  "activations (fp16 with a dynamic loss scale). On the CPU the 16-bit modes "
                  "emulate the GPU's numerics for testing and are not a speed feature (slower than "
                  "fp32); the speed-up is a GPU's")

class UsageError(Exception):
    """A command-line usage problem (reported as one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


def int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def float_in(low, high=None, low_open=False, name="a number"):
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


def hidden_layers(text):
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


class Options:
    """Adds options whose defaults stay None, so a resumed run can tell what was given."""

    def __init__(self, group, defaults):
        self.group, self.defaults = group, defaults

    def add(self, flag, default, help, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        self.defaults[dest] = default
        if default is not None and "action" not in kw:
            help = f"{help} (default: {default})"
        self.group.add_argument(flag, dest=dest, default=None, help=help, **kw)


def add_device_options(p, defaults, title):
    """--device and --kernels in a group named ``title``; returns the group."""
    g = p.add_argument_group(title)
    choices = {"device": DEVICES, "kernels": KERNEL_SETS}
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
    return g


def resolve_device(device):
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


def check_checkpoint_file(path):
    """A folder given as --checkpoint (train, resume, evaluate, predict): say so and name a file,
    before the checkpoint is read or an output check calls it a folder in general terms."""
    if path and os.path.isdir(path):
        raise ValueError(f"checkpoint: {path} is a directory, not a checkpoint file; name a file, "
                         f"e.g. --checkpoint {os.path.join(path, 'run.npz')}")


HEADER_HELP = ("csv only: whether row 1 is a header row: auto takes row 1 as a header only when "
               "none of its cells is a number; yes always; no never (every row is data)")


