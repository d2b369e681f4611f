"""Datasets: IDX parsing (raw and gzip), CSV header and label detection, npz, splits and scaling."""

import gzip

import numpy as np
import pytest

from gpubackprop.datasets import (
    MNIST_FILES,
    DatasetError,
    apply_scaling,
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
    ("1,2,0\n3,4,-1\n", None, "label column 3 .*got '-1'"),
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
