"""``gpubackprop bench``: hands its arguments to gpubackprop.benchmark, which parses them itself."""

from gpubackprop.cli.options import Formatter


def add_parser(sub):
    sub.add_parser("bench", help="benchmark training steps (see 'gpubackprop bench --help')",
                   add_help=False, formatter_class=Formatter,
                   description="Runs gpubackprop.benchmark with the remaining arguments.")


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

