"""Datasets: IDX parsing (raw and gzip), CSV header and label detection, npz, splits and scaling."""

import gzip
import warnings

import numpy as np
import pytest

from gpubackprop.datasets import (
    MNIST_FILES,
    DatasetError,
    apply_scaling,
    class_count,
    fit_scaling,
    load_csv,
    load_dataset,
    load_features,
    load_mnist,
    load_npz,
    parse_spec,
    read_idx,
    write_idx,
)


def write_mnist(folder, n_train=40, n_test=10, rows=4, cols=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for key, stem in MNIST_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


# ---- IDX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write_idx(path, a)
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"  # ubyte, 3 dimensions
    assert int.from_bytes(raw[4:8], "big") == 2
    np.testing.assert_array_equal(read_idx(path), a)


def test_idx_hand_written_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 0, 9])


@pytest.mark.parametrize("data,match", [
    (b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "magic number 0x12340801"),
    (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00", "not an IDX file"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x01", "expected 13 bytes"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (b"\x00\x00", "only 2 bytes"),
])
def test_idx_errors(tmp_path, data, match):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(DatasetError, match=match):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    X_train, y_train, X_test, y_test = load_mnist(str(tmp_path))
    assert X_train.shape == (40, 1, 4, 5) and X_test.shape == (10, 1, 4, 5)  # images keep shape
    np.testing.assert_array_equal(X_train[:, 0], arrays["train_images"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.X_train.min() >= 0 and data.X_train.max() <= 1  # pixels to [0, 1]
    np.testing.assert_allclose(data.X_test[:, 0], arrays["test_images"] / 255.0)
    assert data.n_classes == 10
    assert data.sample_shape == (1, 4, 5) and data.n_features == 20


def test_mnist_mismatched_counts(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES["train_labels"], np.zeros(39, np.uint8))
    with pytest.raises(DatasetError, match="40 images but 39 labels"):
        load_mnist(str(tmp_path))


def test_mnist_swapped_files_and_bad_labels(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES["test_labels"], np.zeros((10, 4, 5), np.uint8))
    with pytest.raises(DatasetError, match="expected a 1-D IDX array"):
        load_mnist(str(tmp_path))
    write_idx(tmp_path / MNIST_FILES["test_labels"], np.full(10, 12, np.uint8))
    with pytest.raises(DatasetError, match="expected digit labels 0..9, got 12"):
        load_mnist(str(tmp_path))


def test_mnist_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(DatasetError, match="missing t10k-images-idx3-ubyte"):
        load_mnist(str(tmp_path))


@pytest.mark.parametrize("split,gz", [("test", False), ("test", True), ("train", False)],
                         ids=["t10k", "t10k-gz", "train"])
def test_mnist_one_pair_alone_is_split_by_test_split(tmp_path, split, gz):
    # A folder holding only the t10k pair (or only the train pair) used to be refused.
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (40, 4, 5), dtype=np.uint8)
    labels = np.arange(40, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / (MNIST_FILES[f"{split}_images"] + suffix), images)
    write_idx(tmp_path / (MNIST_FILES[f"{split}_labels"] + suffix), labels)
    data = load_dataset(f"mnist:{tmp_path}", test_split=0.25, seed=5)
    assert (len(data.X_train), len(data.X_test)) == (30, 10)
    assert data.sample_shape == (1, 4, 5) and data.n_classes == 10
    assert data.scaling == {"kind": "fixed", "divisor": 255.0}
    # The two splits partition the pair's samples, each image with its own label.
    together = np.concatenate([data.X_train, data.X_test])[:, 0] * 255.0
    order = np.lexsort(together.reshape(40, -1).T)
    want = np.lexsort(images.reshape(40, -1).T.astype(np.float64))
    np.testing.assert_allclose(together[order], images[want])
    np.testing.assert_array_equal(np.concatenate([data.y_train, data.y_test])[order], labels[want])
    again = load_dataset(f"mnist:{tmp_path}", test_split=0.25, seed=5)
    np.testing.assert_array_equal(again.X_test, data.X_test)  # seeded
    with pytest.raises(DatasetError, match="missing (train|t10k)-images-idx3-ubyte .*load_dataset splits a "
                                           "folder holding one pair alone by test_split"):
        load_mnist(str(tmp_path))  # the four-file reader still wants all four


def test_mnist_half_a_pair_or_none(tmp_path):
    write_idx(tmp_path / MNIST_FILES["test_images"], np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DatasetError, match=r"missing t10k-labels-idx1-ubyte \(or t10k-labels-idx1-"
                                           r"ubyte.gz\), the other half of the pair with t10k-images"):
        load_dataset(f"mnist:{tmp_path}")
    (tmp_path / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(DatasetError, match="no MNIST IDX files; expected train-images-idx3-ubyte .*or "
                                           "one of the two pairs alone, split by test_split"):
        load_dataset(f"mnist:{tmp_path}")


# ---- CSV ----------------------------------------------------------------------------------------
def test_csv_header_detected_and_label_by_name(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,a,b\n1,0.5,2\n0,1.5,-3\n2,2.5,4\n")
    X, y = load_csv(str(path), "label")
    np.testing.assert_array_equal(X, [[0.5, 2], [1.5, -3], [2.5, 4]])
    np.testing.assert_array_equal(y, [1, 0, 2])
    X, y = load_csv(str(path), "0")  # an index works too
    np.testing.assert_array_equal(y, [1, 0, 2])


def test_csv_no_header_label_last_by_default(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("0,2.5,1\n1,-3,0\n")
    X, y = load_csv(str(path))
    np.testing.assert_array_equal(X, [[0, 2.5], [1, -3]])
    np.testing.assert_array_equal(y, [1, 0])
    X, y = load_csv(str(path), -3)
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_array_equal(X, [[2.5, 1], [-3, 0]])


@pytest.mark.parametrize("text,label,match", [
    ("a,b,y\n1,2,0\n3,oops,1\n", None, r"row 3, column 2 \('b'\): expected a number, got 'oops'"),
    ("1,2,0\n3,4,-1\n", None, "row 2, label column 3: .*got '-1'"),
    ("1,2,0\n3,4,0.5\n", None, "expected a class index"),
    ("1,2,0\n3,4\n", None, "row 2 has 2 columns, expected 3"),
    ("a,b,y\n1,2,0\n", "nope", "expected one of the header's names"),
    ("1,2,0\n", "y", "is a name but .* has no header"),
    ("1,2,0\n", 5, r"expected an index in \[-3, 2\]"),
    ("", None, "empty"),
])
def test_csv_errors(tmp_path, text, label, match):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_csv(str(path), label)


def test_csv_auto_header_only_when_no_cell_is_a_number(tmp_path):
    # One bad cell in a data row used to make row 1 a header: a sample lost without a word.
    path = tmp_path / "d.csv"
    path.write_text("1.0,2.0,abc,4.0,1\n5,6,7,8,0\n")
    with pytest.raises(DatasetError, match=r"d.csv: row 1, column 3: expected a number, got 'abc'"):
        load_csv(str(path))
    with pytest.raises(DatasetError, match=r"row 1, column 3: expected a number, got 'abc'"):
        load_dataset(f"csv:{path}")
    path.write_text("x1,x2,x3,x4,label\n1.0,2.0,3.0,4.0,1\n5,6,7,8,0\n")  # every cell a name
    X, y = load_csv(str(path))
    assert X.shape == (2, 4) and list(y) == [1, 0]


@pytest.mark.parametrize("header", ["yes", True])
def test_csv_header_yes_skips_a_numeric_first_row(tmp_path, header):
    path = tmp_path / "d.csv"
    path.write_text("10,20,1\n1,2,0\n3,4,1\n")
    X, y = load_csv(str(path), header=header)
    np.testing.assert_array_equal(X, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(y, [0, 1])
    X, y = load_csv(str(path), label_column=0, header=header)
    np.testing.assert_array_equal(y, [1, 3])


@pytest.mark.parametrize("header", ["no", False])
def test_csv_header_no_reads_every_row_as_data(tmp_path, header):
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n")
    with pytest.raises(DatasetError, match="row 1, column 1: expected a number, got 'a'"):
        load_csv(str(path), header=header)
    with pytest.raises(DatasetError, match="row 1, column 1: expected a number, got 'a'"):
        load_dataset(f"csv:{path}", header=header)
    path.write_text("1,2,0\n3,4,1\n")
    assert load_csv(str(path), header=header)[0].shape == (2, 2)


@pytest.mark.parametrize("header", ["maybe", "Yes", 1, None, ""])
def test_header_argument_is_checked(tmp_path, header):
    path = tmp_path / "d.csv"
    path.write_text("1,2,0\n")
    match = r"header: expected 'auto', 'yes' or 'no' \(or True/False\), got "
    with pytest.raises(DatasetError, match=match):
        load_csv(str(path), header=header)
    with pytest.raises(DatasetError, match=match):
        load_features(str(path.with_suffix(".csv")), header=header)
    with pytest.raises(DatasetError, match=match):
        load_dataset("digits", header=header)


def test_header_only_for_csv(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 3)))
    with pytest.raises(DatasetError, match="header: only .csv inputs have a header row"):
        load_features(str(tmp_path / "x.npy"), header="yes")
    with pytest.raises(DatasetError, match="header: only csv:PATH datasets have a header row"):
        load_dataset(f"npz:{tmp_path / 'x.npz'}", header="no")


@pytest.mark.parametrize("text,header,match", [
    # Rows are the file's lines, blank lines counted, as an editor shows them.
    ("a,b,y\n\n1,2,0\n\n3,x,1\n", "auto", r"row 5, column 2 \('b'\): expected a number, got 'x'"),
    ("1,,0\n3,4,1\n", "auto", "row 1, column 2: expected a number, got an empty cell"),
    ("a,b,y\n1, ,0\n", "auto", r"row 2, column 2 \('b'\): expected a number, got an empty cell"),
    ("1,2,0\n3,inf,1\n", "auto", "row 2, column 2: expected a finite number, got 'inf'"),
    ("a,b,y\n1,2\n", "auto", r"row 2 has 2 columns, expected 3 \(as the header\)"),
    ("1,2,0\n\n3,4,1,7\n", "no", r"row 3 has 4 columns, expected 3 \(as row 1\)"),
    ("a,b,y\n", "auto", r"no data rows after the header \(row 1\)"),
    ("1,2,0\n", "yes", r"no data rows after the header \(row 1\)"),
    ('a,"b\nB",y\n1,2,0\n3,x,1\n', "auto", r"row 4, column 2 \('b\\nB'\)"),  # a header cell on 2 lines
])
def test_csv_cells_and_rows_are_named(tmp_path, text, header, match):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_csv(str(path), header=header)


def test_prediction_input_csv_header_rule(tmp_path):
    # `predict --input` used to write 1 prediction for these 2 rows (row 1 taken as a header).
    path = tmp_path / "x.csv"
    path.write_text("1,2,x,3\n1,2,3,4\n")
    with pytest.raises(DatasetError, match=r"input .*x.csv: row 1, column 3: expected a number, "
                                           r"got 'x'"):
        load_features(str(path))
    path.write_text("a,b,c,d\n1,2,3,4\n5,6,7,8\n")
    assert load_features(str(path)).shape == (2, 4)
    with pytest.raises(DatasetError, match="row 1, column 1: expected a number, got 'a'"):
        load_features(str(path), header="no")
    path.write_text("1,2\n3,4\n")
    np.testing.assert_array_equal(load_features(str(path), header="yes"), [[3, 4]])
    np.testing.assert_array_equal(load_features(str(path), header=False), [[1, 2], [3, 4]])
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DatasetError, match=r"input .*: row 3 has 1 columns, expected 2 \(as the "
                                           r"header\)"):
        load_features(str(path))
    path.write_text("a,b\n1,nan\n")
    with pytest.raises(DatasetError, match=r"row 2, column 2 \('b'\): expected a finite number"):
        load_features(str(path))


# ---- class labels: sizes and gaps ---------------------------------------------------------------
GiB = 1 << 30


@pytest.fixture
def host_16gib(monkeypatch):
    """The host has 16 GiB available, whatever this machine has."""
    from gpubackprop import memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 16 * GiB)


def test_csv_label_too_large_for_a_class_count(tmp_path, host_16gib):
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n3,4,1000000000\n5,6,1\n")
    match = (r"csv:.*d.csv: row 3, label column 3 \('y'\): label 1000000000 makes 1,000,000,001 "
             r"classes .* the host has 16 GiB available")
    with pytest.raises(DatasetError, match=match):
        load_csv(str(path))
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"csv:{path}")
    path.write_text("1,2,0\n3,4,1e30\n")  # beyond int64: an error, not an OverflowError
    with pytest.raises(DatasetError, match=r"row 2, label column 3: label 1000000000000000019884624838656"):
        load_csv(str(path))


def test_npz_label_too_large_for_a_class_count(tmp_path, host_16gib):
    path = tmp_path / "d.npz"
    X = np.zeros((4, 2))
    np.savez(path, X_train=X, y_train=np.array([0, 1, 0, 10**9]), X_test=X, y_test=np.arange(4))
    with pytest.raises(DatasetError, match=r"npz:.*y_train\[3\]: label 1000000000 makes"):
        load_npz(str(path))
    np.savez(path, X_train=X, y_train=np.arange(4), X_test=X, y_test=np.array([0, 2e12, 1, 0]))
    with pytest.raises(DatasetError, match=r"y_test\[1\]: label 2000000000000 makes"):
        load_npz(str(path))


def test_labels_with_large_gaps_warn(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("".join(f"{i},{100000 if i % 2 else 0}\n" for i in range(10)))
    with pytest.warns(UserWarning, match=r"the largest label is 100000, so the model gets 100,001 "
                                         r"classes, but only 2 distinct labels occur"):
        data = load_dataset(f"csv:{path}")
    assert data.n_classes == 100001


@pytest.mark.parametrize("labels", [[0, 1, 2], list(range(1, 11)), [0, 9], list(range(0, 40, 2))],
                         ids=["dense", "from-1", "few-unused", "half-unused"])
def test_labels_without_large_gaps_do_not_warn(labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert class_count([np.array(labels), None, np.array([], np.int64)]) == max(labels) + 1


# ---- npz, specs, splits, scaling ----------------------------------------------------------------
def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, X_train=rng.normal(size=(20, 3)), y_train=np.arange(20) % 4,
             X_test=rng.normal(size=(5, 3)), y_test=np.arange(5) % 4)
    X_train, y_train, X_test, y_test = load_npz(str(path))
    assert X_train.shape == (20, 3) and y_test.dtype == np.int64
    np.savez(path, X_train=X_train, y_train=y_train)
    with pytest.raises(DatasetError, match=r"missing arrays \['X_test', 'y_test'\]"):
        load_npz(str(path))
    np.savez(path, X_train=X_train, y_train=y_train[:-1], X_test=X_test, y_test=y_test)
    with pytest.raises(DatasetError, match="20 samples but y_train has 19 labels"):
        load_npz(str(path))
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_npz(str(path))


@pytest.mark.parametrize("spec", ["", "mnist", "mnist:", "foo:bar", "csv", "digits:x"])
def test_bad_specs(spec):
    with pytest.raises(DatasetError, match="expected digits, mnist:DIR"):
        parse_spec(spec)


def test_scaling_uses_training_statistics_only(tmp_path):
    rng = np.random.default_rng(1)
    X_train = rng.normal(5.0, 2.0, size=(50, 3))
    X_test = rng.normal(100.0, 50.0, size=(10, 3))  # very different: must not leak in
    path = tmp_path / "d.npz"
    np.savez(path, X_train=X_train, y_train=np.arange(50) % 2, X_test=X_test,
             y_test=np.arange(10) % 2)
    data = load_dataset(f"npz:{path}")
    assert data.scaling["kind"] == "standard"
    np.testing.assert_allclose(data.scaling["shift"], X_train.mean(axis=0))
    np.testing.assert_allclose(data.X_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(data.X_train.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(data.X_test, (X_test - X_train.mean(0)) / X_train.std(0))
    mm = load_dataset(f"npz:{path}", scale="minmax")
    assert mm.X_train.min() == 0 and mm.X_train.max() == 1
    # With a validation split, the statistics come from the rest of the training split only.
    v = load_dataset(f"npz:{path}", val_split=0.2, seed=3)
    assert len(v.X_train) == 40 and len(v.X_val) == 10
    np.testing.assert_allclose(v.X_train.mean(axis=0), 0, atol=1e-12)


def test_constant_feature_and_reapplied_scaling():
    X = np.array([[1.0, 7.0], [3.0, 7.0]])
    s = fit_scaling(X, "standard", None)
    np.testing.assert_array_equal(apply_scaling(X, s), [[-1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(DatasetError, match="expected 2 features"):
        apply_scaling(np.ones((2, 3)), s)


def test_val_split_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "d.npz"
    X = np.arange(100, dtype=float).reshape(50, 2)
    np.savez(path, X_train=X, y_train=np.arange(50) % 3, X_test=X[:5], y_test=np.arange(5) % 3)
    a = load_dataset(f"npz:{path}", val_split=0.3, seed=7, scale="none")
    b = load_dataset(f"npz:{path}", val_split=0.3, seed=7, scale="none")
    c = load_dataset(f"npz:{path}", val_split=0.3, seed=8, scale="none")
    np.testing.assert_array_equal(a.X_val, b.X_val)
    assert not np.array_equal(a.X_val, c.X_val)
    assert len(a.X_val) == 15
    together = np.sort(np.concatenate([a.X_train[:, 0], a.X_val[:, 0]]))
    np.testing.assert_array_equal(together, X[:, 0])
    with pytest.raises(DatasetError, match="val_split"):
        load_dataset(f"npz:{path}", val_split=1.5)


def test_csv_dataset_holds_out_a_test_split(tmp_path):
    path = tmp_path / "d.csv"
    rows = [f"{i},{i % 3}" for i in range(20)]
    path.write_text("x,y\n" + "\n".join(rows) + "\n")
    data = load_dataset(f"csv:{path}", test_split=0.25, label_column="y")
    assert (len(data.X_train), len(data.X_test)) == (15, 5)
    assert data.n_classes == 3


def test_load_features(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    assert load_features(str(tmp_path / "x.npy")).shape == (3, 2)
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,4\n")
    np.testing.assert_array_equal(load_features(str(tmp_path / "x.csv")), [[1, 2], [3, 4]])
    with pytest.raises(DatasetError, match="file not found"):
        load_features(str(tmp_path / "none.npy"))


# ---- image shapes -------------------------------------------------------------------------------
def test_digits_are_1x8x8_images_scaled_by_16():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    data = load_dataset("digits", test_split=0.2, seed=0)
    assert data.X_train.shape == (1438, 1, 8, 8) and data.X_test.shape == (359, 1, 8, 8)
    assert data.sample_shape == (1, 8, 8) and data.n_features == 64 and data.n_classes == 10
    assert data.scaling == {"kind": "fixed", "divisor": 16.0}
    X, _ = load_digits(return_X_y=True)
    rows = {tuple(r) for r in X / 16.0}
    assert tuple(data.X_test[0].ravel()) in rows  # a sample is the 8x8 image, row-major
    assert data.X_train.max() <= 1 and data.X_train.min() >= 0


def test_npz_images_keep_their_shape_and_get_a_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, X_train=rng.random((12, 5, 6)), y_train=np.arange(12) % 3,
             X_test=rng.random((4, 5, 6)), y_test=np.arange(4) % 3)
    X_train, _, X_test, _ = load_npz(str(path))
    assert X_train.shape == (12, 1, 5, 6) and X_test.shape == (4, 1, 5, 6)
    np.savez(path, X_train=rng.random((12, 3, 5, 6)), y_train=np.arange(12) % 3,
             X_test=rng.random((4, 3, 5, 6)), y_test=np.arange(4) % 3)
    data = load_dataset(f"npz:{path}", val_split=0.25, seed=1)
    assert data.sample_shape == (3, 5, 6) and data.X_val.shape == (3, 3, 5, 6)
    np.savez(path, X_train=rng.random((12, 3, 5, 6)), y_train=np.arange(12) % 3,
             X_test=rng.random((4, 3, 5, 5)), y_test=np.arange(4) % 3)
    with pytest.raises(DatasetError, match="X_train's samples are 3x5x6, X_test's 3x5x5"):
        load_npz(str(path))
    np.savez(path, X_train=rng.random((12, 1, 3, 5, 6)), y_train=np.arange(12) % 3,
             X_test=rng.random((4, 1, 3, 5, 6)), y_test=np.arange(4) % 3)
    with pytest.raises(DatasetError, match=r"expected a numeric array of shape \(N, features\)"):
        load_npz(str(path))


def test_standard_scaling_of_images_is_per_pixel_from_training_data(tmp_path):
    rng = np.random.default_rng(2)
    X_train = rng.normal(3.0, 2.0, size=(40, 2, 3, 3))
    X_test = rng.normal(50.0, 9.0, size=(8, 2, 3, 3))
    path = tmp_path / "img.npz"
    np.savez(path, X_train=X_train, y_train=np.arange(40) % 2, X_test=X_test,
             y_test=np.arange(8) % 2)
    data = load_dataset(f"npz:{path}")
    assert data.scaling["shift"].shape == (2, 3, 3)
    np.testing.assert_allclose(data.X_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(data.X_train.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(data.X_test, (X_test - X_train.mean(0)) / X_train.std(0))
    # The same statistics apply to the images given as flat rows (e.g. a CSV to predict).
    flat = apply_scaling(X_test.reshape(8, -1), data.scaling)
    np.testing.assert_allclose(flat, data.X_test.reshape(8, -1))
    with pytest.raises(DatasetError, match=r"expected 18 features per sample"):
        apply_scaling(np.ones((2, 17)), data.scaling)
    mm = load_dataset(f"npz:{path}", scale="minmax")
    assert mm.X_train.min() == 0 and mm.X_train.max() == 1
    assert mm.scaling["shift"].shape == (2, 3, 3)


def test_load_features_keeps_images(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 1, 4, 4)))
    assert load_features(str(tmp_path / "x.npy")).shape == (3, 1, 4, 4)
    np.save(tmp_path / "x.npy", np.ones((3, 4, 4)))
    assert load_features(str(tmp_path / "x.npy")).shape == (3, 1, 4, 4)
    np.savez(tmp_path / "x.npz", X=np.ones((2, 3)))
    assert load_features(str(tmp_path / "x.npz")).shape == (2, 3)
