"""Training curves: train/validation loss and accuracy per epoch, drawn with matplotlib (Agg)."""

import io

from gpubackprop.outputs import atomic_write


def require_matplotlib():
    """Fail early, before a long run, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plot: needs matplotlib (pip install matplotlib)") from None


def plot_history(epochs, path, title=None):
    """Draw loss (left) and accuracy (right, when there is any) per epoch to ``path`` (PNG by default).

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
    fmt = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt if fmt in ("png", "svg", "pdf") else "png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
