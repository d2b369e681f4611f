"""Datasets for the command line: ``digits``, ``mnist:DIR``, ``csv:PATH`` and ``npz:PATH``.

``load_dataset(spec, ...)`` returns a ``Dataset``: host float64 features and int64 class labels for
a train, an optional validation and a test split, already scaled. Scaling statistics come from
the training split only and are kept in ``Dataset.scaling`` so that a checkpoint can apply the
same transform to new data (``apply_scaling``).

Images keep their shape, channels first: ``digits`` is (N, 1, 8, 8), ``mnist:DIR`` (N, 1, 28, 28),
an ``npz`` X of shape (N, H, W) becomes (N, 1, H, W) and (N, C, H, W) stays; CSV rows are
(N, features). ``Dataset.sample_shape`` is one sample's shape. Scaling: ``auto`` divides the
pixels of digits (by 16) and MNIST (by 255) by a fixed number, and standardises other data;
``standard`` and ``minmax`` use per-feature statistics, i.e. one mean/std (or min/max) per pixel
and channel for images, computed over the training samples.

CSV files may start with a header row: ``header="auto"`` takes row 1 as one only when none of its
cells is a number (so a data row with one bad cell is an error, never a lost sample), ``"yes"``
always, ``"no"`` never.

Every problem with a file (missing, wrong IDX magic number, mismatched counts, a CSV cell that is
not a number, ragged CSV rows, labels out of range or too large to give a class count that can be
allocated) raises ``DatasetError``, a ``ValueError`` whose message names the file and what is
wrong, with the row (as a line number of the file) and column for CSV cells. Labels that leave most
of the classes 0..max unused give a ``UserWarning``.
"""

import csv
import gzip
import math
import os
import warnings

import numpy as np

from gpubackprop import memory

SCALINGS = ("auto", "standard", "minmax", "none")
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")
HEADERS = ("auto", "yes", "no")
# Labels warn when more than half of the classes 0..max never occur and at least this many do not
# (a single label 100000 would otherwise build a 100,001-class model without a word).
UNUSED_CLASSES_WARNING = 10

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DatasetError(ValueError):
    """A dataset file or specification that cannot be used; the message says which and why."""


class Dataset:
    """Scaled host arrays: ``X_train`` (n, *sample_shape) float64, ``y_train`` (n,) int64, same for
    val/test."""

    def __init__(self, name, X_train, y_train, X_test, y_test, X_val=None, y_val=None,
                 n_classes=None, scaling=None):
        self.name = name
        self.X_train, self.y_train = X_train, y_train
        self.X_val, self.y_val = X_val, y_val
        self.X_test, self.y_test = X_test, y_test
        if n_classes is None:
            n_classes = class_count((y_train, y_val, y_test), f"dataset {name!r}")
        self.n_classes = n_classes
        self.scaling = scaling or {"kind": "none"}

    @property
    def sample_shape(self):
        """One sample's shape: (features,) or (channels, height, width)."""
        return tuple(int(s) for s in self.X_train.shape[1:])

    @property
    def n_features(self):
        return int(np.prod(self.sample_shape, dtype=np.int64))

    def __repr__(self):
        val = 0 if self.X_val is None else len(self.X_val)
        return (f"Dataset({self.name!r}: {len(self.X_train)} train, {val} validation, "
                f"{len(self.X_test)} test, {self.n_features} features, {self.n_classes} classes, "
                f"scaling {self.scaling['kind']!r})")

    def split(self, name):
        """(X, y) of the split called "train", "val" or "test"."""
        if name == "val" and self.X_val is None:
            raise DatasetError(f"split: the dataset {self.name!r} has no validation split "
                               f"(train with --val-split > 0)")
        return {"train": (self.X_train, self.y_train), "val": (self.X_val, self.y_val),
                "test": (self.X_test, self.y_test)}[name]


# ---- the spec ---------------------------------------------------------------------------------
def parse_spec(spec):
    """("digits", None) | ("mnist", DIR) | ("csv", PATH) | ("npz", PATH)."""
    if not isinstance(spec, str) or not spec:
        raise DatasetError(f"dataset: expected digits, mnist:DIR, csv:PATH or npz:PATH, got {spec!r}")
    if spec == "digits":
        return "digits", None
    kind, sep, where = spec.partition(":")
    if not sep or kind not in ("mnist", "csv", "npz") or not where:
        raise DatasetError(f"dataset: expected digits, mnist:DIR, csv:PATH or npz:PATH, got {spec!r}")
    return kind, where


def load_dataset(spec, val_split=0.0, test_split=0.2, seed=0, scale="auto", label_column=None,
                 scaling=None, header="auto"):
    """Load, split and scale a dataset by its command-line spec.

    ``test_split`` is used by the sources without a test split of their own (digits, csv, and a
    ``mnist:DIR`` folder holding only one IDX pair, e.g. just t10k); ``val_split`` takes a seeded
    fraction of the training split for validation. ``scaling``, when given (a ``Dataset.scaling``
    dict, e.g. from a checkpoint), is applied instead of fitting a new one. ``header``: a CSV's
    header row, "auto" | "yes" | "no" (see ``load_csv``).
    """
    kind, where = parse_spec(spec)
    if scale not in SCALINGS:
        raise DatasetError(f"scale: expected one of {SCALINGS}, got {scale!r}")
    _fraction(val_split, "val_split")
    _fraction(test_split, "test_split")
    if label_column is not None and kind != "csv":
        raise DatasetError(f"label_column: only csv:PATH datasets have a label column, got "
                           f"dataset {spec!r}")
    if header_mode(header) != "auto" and kind != "csv":
        raise DatasetError(f"header: only csv:PATH datasets have a header row, got header="
                           f"{header!r} for dataset {spec!r}")
    if kind == "digits":
        X, y = _digits()
        X_train, y_train, X_test, y_test = _holdout(X, y, test_split, seed, "test_split")
        default_scale = ("fixed", 16.0)
    elif kind == "mnist":
        splits = mnist_splits(where)
        if len(splits) == 2:
            (X_train, y_train), (X_test, y_test) = splits["train"], splits["test"]
        else:  # one pair alone (a folder with just t10k): held out like a CSV
            (X, y), = splits.values()
            X_train, y_train, X_test, y_test = _holdout(X, y, test_split, seed, "test_split")
        default_scale = ("fixed", 255.0)
    elif kind == "csv":
        X, y = load_csv(where, label_column, header)
        X_train, y_train, X_test, y_test = _holdout(X, y, test_split, seed, "test_split")
        default_scale = ("standard", None)
    else:
        X_train, y_train, X_test, y_test = load_npz(where)
        default_scale = ("standard", None)
    X_val = y_val = None
    if val_split:
        X_train, y_train, X_val, y_val = _holdout(X_train, y_train, val_split, seed + 1,
                                                  "val_split")
    if scaling is None:
        scaling = fit_scaling(X_train, scale, default_scale)
    X_train, X_test = apply_scaling(X_train, scaling), apply_scaling(X_test, scaling)
    if X_val is not None:
        X_val = apply_scaling(X_val, scaling)
    return Dataset(spec, X_train, y_train, X_test, y_test, X_val, y_val, scaling=scaling)


def _fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DatasetError(f"{name}: expected a fraction in [0, 1), got {value!r}")


def _holdout(X, y, fraction, seed, name):
    """Seeded split: (X_keep, y_keep, X_held, y_held) with round(fraction·n) samples held out."""
    n = len(X)
    n_held = int(round(fraction * n))
    if n_held == 0:
        return X, y, X[:0], y[:0]
    if n_held >= n:
        raise DatasetError(f"{name}: {fraction} of {n} samples leaves none to train on")
    order = np.random.default_rng(seed).permutation(n)
    keep, held = np.sort(order[n_held:]), np.sort(order[:n_held])
    return X[keep], y[keep], X[held], y[held]


# ---- scaling ----------------------------------------------------------------------------------
def fit_scaling(X_train, scale, default):
    """The scaling for ``scale`` (auto: ``default``), its statistics from ``X_train`` only."""
    kind = scale
    if scale == "auto":
        kind, divisor = default
        if kind == "fixed":
            return {"kind": "fixed", "divisor": divisor}
    if kind == "none":
        return {"kind": "none"}
    if kind == "standard":
        mean = X_train.mean(axis=0)
        std = X_train.std(axis=0)
        std[std == 0] = 1.0  # a constant feature stays 0 rather than becoming NaN
        return {"kind": "standard", "shift": mean, "scale": std}  # per feature (pixel)
    lo, hi = X_train.min(axis=0), X_train.max(axis=0)
    span = hi - lo
    span[span == 0] = 1.0
    return {"kind": "minmax", "shift": lo, "scale": span}


def apply_scaling(X, scaling):
    """X transformed by a ``fit_scaling`` result: (X − shift) / scale, or X / divisor."""
    X = np.asarray(X, dtype=np.float64)
    kind = scaling["kind"]
    if kind == "none":
        return X
    if kind == "fixed":
        return X / float(scaling["divisor"])
    shift, scale = np.asarray(scaling["shift"]), np.asarray(scaling["scale"])
    if X.ndim >= 2 and X.shape[1:] != shift.shape and X[0].size == shift.size:
        # The same features in another layout (an image as a flat row, or the other way round).
        shift, scale = shift.reshape(X.shape[1:]), scale.reshape(X.shape[1:])
    if X.ndim < 2 or X.shape[1:] != shift.shape:
        raise DatasetError(f"features: expected {shift.size} features per sample (the "
                           f"training data's, shape {shift.shape}), got shape {X.shape}")
    return (X - shift) / scale


# ---- digits -----------------------------------------------------------------------------------
def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("dataset digits: needs scikit-learn (pip install scikit-learn)") from None
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float64).reshape(-1, 1, 8, 8), y.astype(np.int64)


# ---- MNIST IDX files --------------------------------------------------------------------------
def read_idx(path):
    """The array in an IDX file (raw or gzip-compressed), with its magic number and sizes checked."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read it ({e})") from None
    if len(data) < 4:
        raise DatasetError(f"{path}: not an IDX file (only {len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or data[3] == 0:
        raise DatasetError(f"{path}: not an IDX file (magic number 0x{data[:4].hex()}, expected "
                           f"0x0000TTNN with a type code TT and NN dimensions, e.g. 0x00000803)")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path}: expected {expected} bytes for an IDX array of shape {dims}, "
                           f"got {len(data)} (truncated or corrupt)")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _present(directory, stem):
    """The path of ``stem`` or ``stem``.gz in ``directory``, or None."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _missing(directory, stem, why=""):
    return DatasetError(f"mnist:{directory}: missing {stem} (or {stem}.gz){why}")


def _mnist_pair(directory, split, images_path, labels_path):
    """(images (count, 1, rows, columns) float64 raw pixels, int64 digit labels) of one split."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DatasetError(f"mnist:{directory}: {split} images: expected a 3-D IDX array "
                           f"(count, rows, columns), got shape {images.shape}")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected a 1-D IDX array of labels, got shape "
                           f"{labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"mnist:{directory}: {split} split has {images.shape[0]} images "
                           f"but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DatasetError(f"mnist:{directory}: {split} split has no images")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise DatasetError(f"{labels_path}: expected digit labels 0..9, got {bad}")
    return images[:, None, :, :].astype(np.float64), labels


def mnist_splits(directory):
    """{"train": (X, y), "test": (X, y)} of the MNIST IDX pairs in ``directory``: both pairs, or
    one alone (e.g. only ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, which
    ``load_dataset`` then splits by ``test_split``). X is (count, 1, rows, columns) raw pixels."""
    if not os.path.isdir(directory):
        raise DatasetError(f"mnist:{directory}: no such directory")
    found = {}
    for split in ("train", "test"):
        stems = MNIST_FILES[f"{split}_images"], MNIST_FILES[f"{split}_labels"]
        paths = [_present(directory, stem) for stem in stems]
        if paths == [None, None]:
            continue
        for stem, other, path in ((stems[0], stems[1], paths[0]), (stems[1], stems[0], paths[1])):
            if path is None:
                raise _missing(directory, stem, f", the other half of the pair with {other}")
        found[split] = _mnist_pair(directory, split, *paths)
    if not found:
        raise DatasetError(
            f"mnist:{directory}: no MNIST IDX files; expected {MNIST_FILES['train_images']} and "
            f"{MNIST_FILES['train_labels']} (the train split) and {MNIST_FILES['test_images']} and "
            f"{MNIST_FILES['test_labels']} (the test split), each optionally .gz, or one of the two "
            f"pairs alone, split by test_split")
    if len(found) == 2 and found["train"][0].shape[1:] != found["test"][0].shape[1:]:
        raise DatasetError(f"mnist:{directory}: train images are {_shape_text(found['train'][0])}, "
                           f"test images {_shape_text(found['test'][0])}")
    return found


def load_mnist(directory):
    """(X_train, y_train, X_test, y_test) from the four MNIST IDX files in ``directory``.

    Images are (count, 1, rows, columns) arrays of raw pixel values (0..255, scaled later); t10k is
    the test split. ``load_dataset("mnist:DIR")`` also takes a folder with one of the pairs alone.
    """
    splits = mnist_splits(directory)
    for split in ("train", "test"):
        if split not in splits:
            raise _missing(directory, MNIST_FILES[f"{split}_images"],
                           "; load_dataset splits a folder holding one pair alone by test_split")
    return (*splits["train"], *splits["test"])


def write_idx(path, array):
    """Write ``array`` (uint8 or another IDX type) as an IDX file; gzip when ``path`` ends in .gz."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DatasetError(f"array: no IDX type for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = array.astype(IDX_DTYPES[code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


# ---- CSV --------------------------------------------------------------------------------------
def header_mode(header):
    """"auto", "yes" or "no" for a ``header`` argument (True is "yes", False "no")."""
    if header is True or header is False:
        return "yes" if header else "no"
    if isinstance(header, str) and header in HEADERS:
        return header
    raise DatasetError(f"header: expected 'auto', 'yes' or 'no' (or True/False), got {header!r}")


def _is_number(cell):
    try:
        float(cell)
        return True
    except ValueError:
        return False


def read_csv_rows(path, header="auto", where=None):
    """(header names or None, [(line, cells)]) of a CSV file's non-blank rows.

    ``line`` is the file line a row starts on (1-based, as an editor counts), so that messages point
    at the row a user sees. ``header``: "auto" takes row 1 as a header only when none of its cells
    is a number; "yes" always; "no" never. Every row must have as many cells as the header (or the
    first row).
    """
    mode = header_mode(header)
    where = where or f"csv:{path}"
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows, line = [], 1
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    rows.append((line, cells))
                line = reader.line_num + 1  # a quoted cell may span lines
    except FileNotFoundError:
        raise DatasetError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{where}: cannot read it ({e})") from None
    if not rows:
        raise DatasetError(f"{where}: the file is empty")
    names = None
    first_line, first = rows[0]
    if mode == "yes" or (mode == "auto" and not any(_is_number(c) for c in first)):
        names, rows = [c.strip() for c in first], rows[1:]
        if not rows:
            raise DatasetError(f"{where}: no data rows after the header (row {first_line})")
    width = len(names) if names is not None else len(rows[0][1])
    like = "the header" if names is not None else f"row {rows[0][0]}"
    for line, cells in rows:
        if len(cells) != width:
            raise DatasetError(f"{where}: row {line} has {len(cells)} columns, expected {width} "
                               f"(as {like})")
    return names, rows


def _cell_name(j, names):
    return f"column {j + 1}" + ("" if names is None else f" ({names[j]!r})")


def _numbers(rows, columns, names, where):
    """float64 array (rows, columns) of finite numbers; a bad cell is an error naming its row
    (file line) and column."""
    try:  # one NumPy conversion; the loop below only finds (and names) a bad cell
        X = np.array([[cells[j] for j in columns] for _, cells in rows], dtype=np.float64)
        if np.isfinite(X).all():
            return X
    except ValueError:
        pass
    X = np.empty((len(rows), len(columns)))
    for i, (line, cells) in enumerate(rows):
        for k, j in enumerate(columns):
            text = cells[j].strip()
            try:
                X[i, k] = float(text)
            except ValueError:
                got = "an empty cell" if not text else repr(cells[j])
                raise DatasetError(f"{where}: row {line}, {_cell_name(j, names)}: expected a "
                                   f"number, got {got}") from None
            if not math.isfinite(X[i, k]):
                raise DatasetError(f"{where}: row {line}, {_cell_name(j, names)}: expected a "
                                   f"finite number, got {cells[j]!r}")
    return X


def load_csv(path, label_column=None, header="auto"):
    """(X, y) from a CSV file: one sample a row, integer class labels in ``label_column``.

    ``label_column`` is a column name (needs a header) or an index (negative counts from the
    end); default: the last column. ``header``: "auto" (row 1 is a header only when none of its
    cells is a number), "yes" or "no"; True/False mean yes/no.
    """
    where = f"csv:{path}"
    names, rows = read_csv_rows(path, header, where)
    width = len(rows[0][1])
    if width < 2:
        raise DatasetError(f"{where}: expected at least 2 columns (features and a label), "
                           f"got {width}")
    label = _label_index(path, label_column, names, width)
    X = _numbers(rows, [j for j in range(width) if j != label], names, where)
    y = np.empty(len(rows))  # float64 until the class count is checked: int64 could overflow
    for i, (line, cells) in enumerate(rows):
        cell = cells[label].strip()
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not float(value).is_integer() or value < 0:
            raise DatasetError(f"{where}: row {line}, label {_cell_name(label, names)}: expected "
                               f"a class index 0, 1, 2, ..., got {cell!r}")
        y[i] = value
    check_class_count(y, len(rows),
                      lambda i: f"{where}: row {rows[i][0]}, label {_cell_name(label, names)}")
    return X, y.astype(np.int64)


def _label_index(path, label_column, header, width):
    if label_column is None:
        return width - 1
    text = str(label_column).strip()
    try:
        index = int(text)
    except ValueError:
        if header is None:
            raise DatasetError(f"label_column: {text!r} is a name but csv:{path} has no header; "
                               f"give a column index") from None
        if text not in header:
            raise DatasetError(f"label_column: expected one of the header's names {header} or an "
                               f"index, got {text!r}") from None
        return header.index(text)
    if not -width <= index < width:
        raise DatasetError(f"label_column: expected an index in [{-width}, {width - 1}] for "
                           f"{width} columns, got {index}")
    return index % width


# ---- NPZ --------------------------------------------------------------------------------------
def _shape_text(X):
    return "x".join(map(str, X.shape[1:]))


def load_npz(path):
    """(X_train, y_train, X_test, y_test) from an .npz archive with those four arrays.

    X is (N, features), (N, H, W) (one channel: returned as (N, 1, H, W)) or (N, C, H, W).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise DatasetError(f"npz:{path}: missing arrays {missing}; expected {list(NPZ_KEYS)}"
                                   f", found {data.files}")
            arrays = {k: data[k] for k in NPZ_KEYS}
    except FileNotFoundError:
        raise DatasetError(f"npz:{path}: file not found") from None
    except DatasetError:
        raise
    except Exception as e:  # not a zip, truncated, pickled objects, ...
        raise DatasetError(f"npz:{path}: not a readable .npz archive ({e})") from None
    out = []
    for split in ("train", "test"):
        X, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        if X.ndim not in (2, 3, 4) or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise DatasetError(f"npz:{path}: X_{split}: expected a numeric array of shape (N, "
                               f"features), (N, H, W) or (N, C, H, W), got shape {X.shape} and "
                               f"dtype {X.dtype}")
        if X.ndim == 3:
            X = X[:, None]  # one channel
        if len(X) == 0:
            raise DatasetError(f"npz:{path}: X_{split}: expected at least one sample")
        if not np.isfinite(X.astype(np.float64)).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(X.astype(np.float64)))[0])
            raise DatasetError(f"npz:{path}: X_{split}: expected finite values, got "
                               f"{X[bad]} at index {bad}")
        y = _class_labels(y, f"npz:{path}: y_{split}", len(X))
        if len(y) != len(X):
            raise DatasetError(f"npz:{path}: X_{split} has {len(X)} samples but y_{split} has "
                               f"{len(y)} labels")
        out += [X.astype(np.float64), y]
    if out[0].shape[1:] != out[2].shape[1:]:
        if out[0].ndim == 2 and out[2].ndim == 2:
            raise DatasetError(f"npz:{path}: X_train has {out[0].shape[1]} features, X_test "
                               f"{out[2].shape[1]}")
        raise DatasetError(f"npz:{path}: X_train's samples are {_shape_text(out[0])}, X_test's "
                           f"{_shape_text(out[2])}")
    return tuple(out)


def _class_labels(y, name, n_samples):
    """``y`` as int64 class indices; ``n_samples``: the data set's, for the class count check."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.number):
        raise DatasetError(f"{name}: expected 1-D integer class labels, got shape {y.shape} and "
                           f"dtype {y.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.isfinite(y).all() or not np.all(np.mod(y, 1) == 0):
            raise DatasetError(f"{name}: expected integer class labels, got non-integer values")
    if y.size and y.min() < 0:
        raise DatasetError(f"{name}: expected class labels >= 0, got {y.min()}")
    check_class_count(y, n_samples, lambda i: f"{name}[{i}]")
    return y.astype(np.int64)


def check_class_count(y, n_samples, locate):
    """Refuse a label so large that a model of one output per class 0..label cannot be allocated
    (``memory.class_bytes`` against the host's available memory). ``locate(i)`` names where
    ``y[i]`` is, e.g. "csv:PATH: row 7, label column 5"."""
    if not len(y):
        return
    i = int(np.argmax(y))
    top = int(y[i])
    need = memory.class_bytes(top + 1, n_samples)
    available = memory.host_available_bytes()
    if available is not None and need > available:
        raise DatasetError(f"{locate(i)}: label {top} makes {top + 1:,} classes (one output per "
                           f"class 0..{top}), which need at least {memory.format_bytes(need)} for "
                           f"{n_samples:,} samples; the host has {memory.format_bytes(available)} "
                           f"available; expected class labels 0, 1, 2, ... (renumber them)")


def class_count(labels, name="labels"):
    """The class count of integer labels (a sequence of arrays; None and empty ones skipped): the
    largest label + 1. Warns (``UserWarning``) when the labels leave most of those classes unused,
    which builds a model far larger than the classes that occur."""
    ys = [np.asarray(y).ravel() for y in labels if y is not None and np.size(y)]
    if not ys:
        raise DatasetError(f"{name}: expected at least one class label, got none")
    every = np.concatenate(ys)
    n = int(every.max()) + 1
    distinct = int(np.unique(every).size)
    unused = n - distinct
    if unused >= UNUSED_CLASSES_WARNING and unused > distinct:
        warnings.warn(f"{name}: the largest label is {n - 1}, so the model gets {n:,} classes, but "
                      f"only {distinct:,} distinct labels occur ({unused:,} classes never do); "
                      f"renumber the labels 0..{distinct - 1} for a smaller model", UserWarning,
                      stacklevel=3)
    return n


def load_features(path, header="auto"):
    """A float64 feature array from .npy, .npz (X, X_test or the only array) or .csv (no labels):
    (N, features), or (N, C, H, W) images (an (N, H, W) array gets one channel axis). ``header``:
    a CSV's header row, "auto" | "yes" | "no" as for ``load_csv``; every other row is a sample."""
    lower = str(path).lower()
    if header_mode(header) != "auto" and not lower.endswith(".csv"):
        raise DatasetError(f"header: only .csv inputs have a header row, got header={header!r} "
                           f"for input {path}")
    if not os.path.isfile(path):
        raise DatasetError(f"input {path}: file not found")
    try:
        if lower.endswith(".npy"):
            X = np.load(path, allow_pickle=False)
        elif lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                key = next((k for k in ("X", "X_test") if k in data.files), None)
                if key is None and len(data.files) == 1:
                    key = data.files[0]
                if key is None:
                    raise DatasetError(f"input {path}: expected an array named X or X_test, found "
                                       f"{data.files}")
                X = data[key]
        elif lower.endswith(".csv"):
            X = _csv_features(path, header)
        else:
            raise DatasetError(f"input {path}: expected a .npy, .npz or .csv file")
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"input {path}: cannot read it ({e})") from None
    if X.ndim == 1:
        X = X.reshape(1, -1)
    if X.ndim not in (2, 3, 4) or not np.issubdtype(X.dtype, np.number):
        raise DatasetError(f"input {path}: expected a numeric array of shape (N, features), "
                           f"(N, H, W) or (N, C, H, W), got shape {X.shape} and dtype {X.dtype}")
    if X.ndim == 3:
        X = X[:, None]
    return X.astype(np.float64)


def _csv_features(path, header):
    names, rows = read_csv_rows(path, header, f"input {path}")
    return _numbers(rows, range(len(rows[0][1])), names, f"input {path}")


# ---- digits as sequences ------------------------------------------------------------------------
def digits_rows(test_split=0.2, seed=0):
    """scikit-learn's digits as sequences: each 8x8 image read row by row, top to bottom, as 8 time
    steps of 8 pixels (scaled to [0, 1]), for recurrent models; a ``Dataset`` with X (n, 8, 8)
    (samples x time steps x features) and the seeded holdout split of ``load_dataset("digits")``.
    A model must remember the earlier rows to tell the digits apart."""
    _fraction(test_split, "test_split")
    X, y = _digits()
    X_train, y_train, X_test, y_test = _holdout(X.reshape(-1, 8, 8), y, test_split, seed,
                                                "test_split")
    scaling = {"kind": "fixed", "divisor": 16.0}
    return Dataset("digits-rows", apply_scaling(X_train, scaling), y_train,
                   apply_scaling(X_test, scaling), y_test, scaling=scaling)
