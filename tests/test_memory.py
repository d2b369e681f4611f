"""Memory estimates: a model too large for its device is refused, naming the layer, before it
allocates anything; the estimates and the byte counts they compare with."""

from types import SimpleNamespace

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import memory

GiB = 1 << 30


@pytest.fixture
def host_has(monkeypatch):
    """Set the host's available memory (bytes) for the test, whatever this machine has."""
    def set_available(n):
        monkeypatch.setattr(memory, "host_available_bytes", lambda: n)
    return set_available


@pytest.fixture
def no_initial_values(monkeypatch):
    """Fail the test if a layer draws its initial values: the check must come first."""
    def refuse(self, rng):
        raise AssertionError("initial values drawn before the memory check")
    monkeypatch.setattr(gb.Dense, "initial_params", refuse)


@pytest.mark.parametrize("n,text", [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1 KiB"),
                                    (int(21.3 * GiB), "21.3 GiB"), (int(3.7 * 1024 * GiB), "3.7 TiB"),
                                    (954 * GiB, "954 GiB"), (1023.9 * GiB, "1.02e+03 GiB")])
def test_format_bytes(n, text):
    assert memory.format_bytes(n) == text


def test_host_available_bytes_is_a_plausible_count():
    n = memory.host_available_bytes()
    assert n is None or (isinstance(n, int) and 1 << 20 < n < 1 << 60)


def test_a_huge_dense_layer_is_refused_naming_it(host_has, no_initial_values):
    # dense(1000000000) used to end in NumPy's "_ArrayMemoryError: Unable to allocate 477. GiB".
    host_has(int(21.3 * GiB))
    model = gb.Sequential([gb.Dense(64, 10**9, activation="relu"), gb.Dense(10**9, 10)],
                          device="cpu")
    with pytest.raises(ValueError, match=r"^layers\[0\] Dense\(64, 1000000000, activation='relu', "
                                         r"init='he'\) needs 1.42 TiB for its 65,000,000,000 float32 "
                                         r"parameters, their gradients and optimizer state; the cpu "
                                         r"has 21.3 GiB available$"):
        model.get_params()
    with pytest.raises(ValueError, match=r"^layers\[0\] Dense\(64, 1000000000"):
        model.predict(np.zeros((1, 64)))  # every way into the buffers is checked


def test_the_whole_model_is_refused_when_no_layer_alone_is_too_large(host_has, no_initial_values):
    n = 1000 * 1000 + 1000  # Dense(1000, 1000): weights and biases
    # float32 on the CPU: 16 bytes a parameter for training (value, gradient, two optimizer
    # moments), 24 while building (two float64 staging copies, value, gradient): 24 governs.
    host_has(24 * n * 2 - 1)
    model = gb.Sequential([gb.Dense(1000, 1000), gb.Dense(1000, 1000)], device="cpu")
    with pytest.raises(ValueError, match=r"^model: needs 45.8 MiB for its 2,002,000 float32 "
                                         r"parameters, .* \(the largest layer, layers\[0\] Dense\(1000, "
                                         r"1000, .*\), 22.9 MiB\); the cpu has 45.8 MiB available$"):
        model.get_params()


def test_a_model_that_fits_exactly_builds(host_has):
    n = 1000 * 1000 + 1000
    host_has(24 * n * 2)
    model = gb.Sequential([gb.Dense(1000, 1000), gb.Dense(1000, 1000)], device="cpu")
    assert model.n_params == 2 * n
    host_has(8 * 4 * n)  # float64: training (4 copies of 8 bytes) is the larger need
    model = gb.Sequential([gb.Dense(1000, 1000)], device="cpu", dtype="float64")
    assert model.n_params == n
    host_has(8 * 4 * n - 1)
    with pytest.raises(ValueError, match=r"float64 parameters"):
        gb.Sequential([gb.Dense(1000, 1000)], device="cpu", dtype="float64").get_params()


def test_nested_layers_are_named_by_their_path(host_has, no_initial_values):
    host_has(100 * 2**20)
    model = gb.Sequential([gb.Dense(8, 8),
                           gb.Residual(gb.Sequential([gb.Dense(8, 8), gb.Dense(8, 8)])),
                           gb.Sequential([gb.Dense(8, 10**7), gb.Dense(10**7, 2)])], device="cpu")
    with pytest.raises(ValueError, match=r"^layers\[2\]\[0\] Dense\(8, 10000000, "):
        model.get_params()


def test_layer_state_counts():
    bn = gb.BatchNorm1d(5)
    bn.build((5,))
    assert memory.layer_sizes(bn) == (10, 5 + 5 + 1)  # weight, bias; running mean, var, count
    dense = gb.Dense(3, 4)
    assert memory.layer_sizes(dense) == (16, 0)


class FakeCupy:
    """What check_model reads from CuPy: free device memory and the pool's free blocks."""

    def __init__(self, free, pooled):
        self.cuda = SimpleNamespace(runtime=SimpleNamespace(memGetInfo=lambda: (free, 80 * GiB)))
        self._pool = SimpleNamespace(free_bytes=lambda: pooled)

    def get_default_memory_pool(self):
        return self._pool


def gpu_backend(free, pooled=0, dtype="float32"):
    return SimpleNamespace(on_gpu=True, xp=FakeCupy(free, pooled), dtype=np.dtype(dtype))


def test_gpu_memory_is_cupy_free_memory_plus_its_pool():
    assert memory.device_available_bytes(gpu_backend(3 * GiB, GiB)) == (4 * GiB, "the GPU")
    broken = SimpleNamespace(on_gpu=True, xp=SimpleNamespace(), dtype=np.dtype("float32"))
    assert memory.device_available_bytes(broken) == (None, "the GPU")  # no estimate: no check


def test_gpu_check_counts_device_and_host_staging(host_has):
    dense = gb.Dense(1000, 1000)
    n = dense.n_params
    layers = [("layers[0] Dense(1000, 1000)", dense)]
    host_has(16 * n)
    memory.check_model(layers, gpu_backend(16 * n))  # fits both: no error
    with pytest.raises(ValueError, match=r"^layers\[0\] Dense\(1000, 1000\) needs 15.3 MiB for its "
                                         r"1,001,000 float32 parameters, their gradients and "
                                         r"optimizer state; the GPU has 7.64 MiB available$"):
        memory.check_model(layers, gpu_backend(8 * n))
    host_has(16 * n - 1)  # the float64 initial values are drawn on the host
    with pytest.raises(ValueError, match=r"needs 15.3 MiB for its 1,001,000 parameters' initial "
                                         r"values \(drawn on the host in float64\); the host has"):
        memory.check_model(layers, gpu_backend(16 * n))


def test_unknown_memory_skips_the_check(host_has):
    host_has(None)
    assert gb.Sequential([gb.Dense(4, 3)], device="cpu").n_params == 15


def test_check_batch_refuses_a_batch_whose_activations_cannot_fit(host_has):
    model = gb.Sequential([gb.Dense(4, 1000, activation="relu"), gb.Dense(1000, 2)], device="cpu")
    model.get_params()  # builds it
    # Per sample: the 4 inputs, then each layer's output and its gradient: 4 + 2 * (1000 + 2).
    assert memory.activation_bytes(model, 10) == (4 + 2 * 1002) * 10 * 4
    host_has(GiB)
    memory.check_batch(model, 1000)
    with pytest.raises(ValueError, match=r"^batch_size: a batch of 1,000,000 samples needs at least "
                                         r"7.48 GiB for the activations .*; the cpu has 1 GiB "
                                         r"available \(use a smaller batch\)$"):
        memory.check_batch(model, 10**6)


def test_class_bytes_floor():
    # Per class: a weight and a bias (4 float32 copies each) and one float64 output per sample.
    assert memory.class_bytes(10, 100) == 10 * (32 + 800)


def test_fit_checks_the_batch_before_the_first_step(host_has):
    model = gb.Sequential([gb.Dense(4, 1000, activation="relu"), gb.Dense(1000, 2)], device="cpu",
                          seed=0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((1000, 4)).astype(np.float32), rng.integers(0, 2, 1000)
    loss, opt = gb.SoftmaxCrossEntropy(), gb.SGD(lr=0.1)
    host_has(2 << 20)  # 2 MiB: a batch of 1000 needs (4 + 2 * 1002) * 4 * 1000 bytes, 7.7 MiB
    before = model.get_params()
    with pytest.raises(ValueError, match=r"^batch_size: a batch of 1,000 samples needs at least "
                                         r"7.66 MiB .*; the cpu has 2 MiB available"):
        gb.fit(model, loss, opt, X, y, epochs=1, batch_size=1000, progress=False)
    for key, value in model.get_params().items():  # no step was taken
        np.testing.assert_array_equal(value, before[key])
    # A batch size beyond the data gathers the data alone: 100 samples fit in 2 MiB.
    gb.fit(model, loss, opt, X[:100], y[:100], epochs=1, batch_size=10**9, progress=False)
    gb.fit(model, loss, opt, X, y, epochs=1, batch_size=128, progress=False)
