"""Training curves: train/validation loss and accuracy per epoch, drawn with matplotlib (Agg)."""

import io
import os

from gpubackprop.outputs import atomic_write


def require_matplotlib():
    """Fail early, before a long run, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plot: needs matplotlib (pip install matplotlib)") from None


def plot_format(path):
    """The file format ``path`` asks for by its extension (``curves.svg``: svg), png without one.

    The formats are matplotlib's (png, pdf, svg, jpg, ...), less pgf when its TeX program is
    missing (it fails only when the figure is saved); any other extension is a ValueError naming
    the path and the supported ones, so that a run can check it before it trains.
    """
    require_matplotlib()
    import shutil

    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    has_tex = shutil.which(matplotlib.rcParams["pgf.texsystem"]) is not None
    supported = [e for e in sorted(FigureCanvasBase.get_supported_filetypes())
                 if e != "pgf" or has_tex]
    base = os.path.basename(os.fspath(path))
    if "." not in base.lstrip("."):
        return "png"
    ext = base.rsplit(".", 1)[-1].lower()
    if ext not in supported:
        raise ValueError(f"plot: {os.fspath(path)} ends in .{ext}, not a plot format; expected a "
                         f"path ending in one of {', '.join('.' + e for e in supported)} (the "
                         f"extension chooses the format)")
    return ext


def plot_history(epochs, path, title=None):
    """Draw loss (left) and accuracy (right, when there is any) per epoch to ``path``, in the format
    of its extension (``plot_format``).

    ``epochs`` is a list of dicts like the command line's metrics: {"epoch", "train_loss",
    "train_accuracy", "val_loss", "val_accuracy"}. The file is written atomically.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [e["epoch"] for e in epochs]
    has_acc = any("train_accuracy" in e or "val_accuracy" in e for e in epochs)
    fig = Figure(figsize=(10 if has_acc else 5.5, 4), dpi=100)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    panels = [("loss", axes[0])] + ([("accuracy", axes[1])] if has_acc else [])
    for metric, ax in panels:
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            points = [(x, e[key]) for x, e in zip(xs, epochs, strict=True) if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), style, markersize=3,
                        label="train" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=plot_format(path))
    atomic_write(path, lambda f: f.write(buf.getvalue()))
