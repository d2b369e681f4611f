"""Device choice: the one module that imports CuPy and numba.cuda.

A ``Backend`` carries everything device-specific that the rest of the library needs: the array
module ``xp`` (numpy or cupy), the dtype, the kernel set ``ops``, transfers, the host RNG and
``synchronize``. Layers, losses and optimizers only ever talk to a backend.

The GPU stack is imported lazily (``cupy_module()``, ``numba_cuda()``) so that
``import gpubackprop`` stays fast on machines with and without a GPU.
"""

import functools
import importlib
import os
import sys

import numpy as np

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
KERNEL_SETS = ("fused", "reference")


def is_cudasim():
    """True when Numba's CUDA simulator is switched on (it must be set before Numba is imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cupy_module():
    """The cupy module, or None when it is not installed."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def numba_cuda():
    """The numba.cuda module, or None when Numba's CUDA target cannot be imported.

    This is the one place that configures Numba's CUDA target. It switches off the per-launch
    synchronisation of CUDA-array-interface arguments: every kernel is launched on CuPy's current
    stream, which already orders it after the work that produced its inputs, so that sync would
    only stall the host; and the low-occupancy warnings. Numba reads these from its config at each
    launch (``numba.cuda.core.config`` in numba-cuda, or ``numba.core.config`` in older Numba), so
    they are set there, whenever numba.cuda was imported.
    """
    try:
        from numba import cuda
    except Exception:
        return None
    for name in ("numba.cuda.core.config", "numba.core.config"):
        try:
            config = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(config, "CUDA_ARRAY_INTERFACE_SYNC"):
            config.CUDA_ARRAY_INTERFACE_SYNC = 0
        if hasattr(config, "CUDA_LOW_OCCUPANCY_WARNINGS"):
            # Small grids are deliberate (a block per row, a column reduction's chunks): Numba's
            # warning for every launch under 128 blocks is noise in a training loop.
            config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    return cuda


@functools.lru_cache(maxsize=None)
def nvmath_cublas():
    """nvmath-python's cuBLAS bindings (``nvmath.bindings.cublas``: GEMMs that CUDA graph capture
    allows), or None when nvmath-python is not installed."""
    try:
        from nvmath.bindings import cublas
    except Exception:
        return None
    return cublas


@functools.lru_cache(maxsize=None)
def has_cupy_gpu():
    """True when CuPy and Numba both see a CUDA GPU (never under the simulator)."""
    if is_cudasim():
        return False
    cp, cuda = cupy_module(), numba_cuda()
    if cp is None or cuda is None:
        return False
    try:
        return bool(cp.is_available()) and bool(cuda.is_available())
    except Exception:
        return False


def tf32_enabled():
    """True when float32 GEMMs on the GPU may use TF32 tensor cores (10-bit mantissa inputs).

    CuPy uses TF32 for float32 matmul only when CUPY_TF32 > 0 (read at its first float32 GEMM;
    off by default), and NVIDIA_TF32_OVERRIDE=1 forces it in cuBLAS for every library. Neither is
    set by gpubackprop: float32 training is full float32 unless the user asks otherwise.
    """
    return os.environ.get("CUPY_TF32", "0").strip() not in ("", "0") or \
        os.environ.get("NVIDIA_TF32_OVERRIDE", "").strip() == "1"


def cuda_available():
    """True when ``device="cuda"`` can run: a real GPU, or Numba's CUDA simulator."""
    return has_cupy_gpu() or (is_cudasim() and numba_cuda() is not None)


_announced = set()


def resolve_device(device, announce=True):
    """Turn ``auto`` into ``cpu`` or ``cuda``; raise if ``cuda`` is asked for and absent.

    ``announce``: say once, on stderr, when ``auto`` falls back to the CPU (a model's backend
    does; a configuration check at construction does not).
    """
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "auto":
        if has_cupy_gpu():
            return "cuda"
        if announce and "auto" not in _announced:
            _announced.add("auto")
            print("gpubackprop: no CUDA GPU found (CuPy + Numba), using the CPU", file=sys.stderr)
        return "cpu"
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "device: 'cuda' was requested but no CUDA GPU is usable (needs cupy-cuda12x and "
            "numba-cuda seeing a GPU: pip install 'gpubackprop[gpu]'); use device='cpu' or 'auto'"
        )
    return device


def check_dtype(dtype):
    name = np.dtype(dtype).name if _is_dtype_like(dtype) else None
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    return np.dtype(name)


def _is_dtype_like(x):
    try:
        np.dtype(x)
        return True
    except TypeError:
        return False


# Every kernel set: (module, ops class, what runs it). The device -> kernel-set mapping is
# ``kernel_set`` alone; ``load_ops``, ``gpubackprop info`` and ``kernels.info`` all read it.
KERNEL_SET_IMPLEMENTATIONS = {
    "reference": ("gpubackprop.kernels.reference", "ReferenceOps", "plain NumPy/CuPy"),
    "fused-cpu": ("gpubackprop.kernels.cpu", "CpuOps", "Numba CPU"),
    "fused-cuda": ("gpubackprop.kernels.cuda", "CudaOps", "Numba CUDA"),
}


def kernel_set(device, kernels):
    """The name of the set a model on ``device`` ("cpu" or "cuda", resolved) with ``kernels``
    runs: "reference" on either device, else "fused-cuda" on cuda and "fused-cpu" on the CPU."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels: expected one of {KERNEL_SETS}, got {kernels!r}")
    if kernels == "reference":
        return "reference"
    return "fused-cuda" if device == "cuda" else "fused-cpu"


def load_ops(device, kernels, xp):
    """The kernel set for a device: fused (Numba CPU / Numba CUDA) or the plain-xp reference."""
    module, cls, _ = KERNEL_SET_IMPLEMENTATIONS[kernel_set(device, kernels)]
    return getattr(importlib.import_module(module), cls)(xp)


class Backend:
    """Device, dtype, kernel set and host RNG of one model."""

    def __init__(self, device="auto", dtype="float32", kernels="fused", seed=0, precision="fp32"):
        from gpubackprop.precision import check_precision

        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype)
        # "bf16"/"fp16": the 16-bit values the layers store (gpubackprop.precision); on the CPU an
        # emulation of the GPU's numerics (float32 arrays holding 16-bit values), not a speed-up.
        self.precision = check_precision(precision, self.dtype)
        # Under the simulator the CUDA kernels run on NumPy arrays; on a GPU, on CuPy arrays.
        self.xp = cupy_module() if self.device == "cuda" and has_cupy_gpu() else np
        self.kernels = kernels
        self.ops = load_ops(self.device, kernels, self.xp)
        # The float32 GEMM the layers call: xp.matmul, or cuBLAS through nvmath-python while a
        # CUDA graph run lasts (use_cublas_matmul), whose calls stream capture allows. A bf16/fp16
        # model on device="cuda" has a second one for the layers that keep 16-bit device arrays
        # (Dense: GemmEx on 16-bit operands); every other layer's GEMMs (those computing in float32,
        # gpubackprop.precision.PATHS, and Conv2d, whose backward reads float32 Δ as the CPU
        # emulation does) stay float32, so that the GPU computes the emulation's numbers.
        self.matmul = self.xp.matmul
        self.matmul16 = None
        if self.precision != "fp32" and self.device == "cuda":
            self.matmul16 = self._matmul16()
        self.rng = np.random.default_rng(seed)

    def _matmul16(self):
        """A bf16/fp16 model's GEMM on device='cuda': cuBLAS GemmEx on 16-bit operands (16-bit
        storage as it is, float32 ones cast), float32 accumulation, float32 or 16-bit C
        (kernels/cuda/gemm16.py); in the simulator or without nvmath-python, float32 GEMMs of
        the same 16-bit values (Widened16Matmul: the same numbers, no tensor cores)."""
        from gpubackprop.kernels.cuda.gemm16 import Matmul16, Widened16Matmul

        cublas = nvmath_cublas() if self.on_gpu else None
        if cublas is None:
            if self.on_gpu:
                import warnings

                warnings.warn("precision: bf16/fp16 GEMMs need nvmath-python for cuBLAS GemmEx "
                              "(pip install 'gpubackprop[gpu]'); using float32 GEMMs of the "
                              "16-bit values", RuntimeWarning, stacklevel=3)
            return Widened16Matmul(self.xp, self.ops, self.precision)
        return Matmul16(self.xp, cublas, self.ops, self.precision)

    def __repr__(self):
        where = "" if self.precision == "fp32" else f", precision={self.precision!r}"
        return (f"Backend(device={self.device!r}, dtype={self.dtype.name!r}{where}, "
                f"ops={self.ops.name!r}, xp={self.xp.__name__})")

    @property
    def on_gpu(self):
        return self.xp is not np

    def to_device(self, a, dtype=None):
        """A contiguous device copy (or the array itself when nothing needs to change)."""
        dtype = self.dtype if dtype is None else dtype
        if self.on_gpu:
            return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))
        return np.ascontiguousarray(to_numpy(a), dtype=dtype)

    def to_host(self, a):
        return to_numpy(a)

    def empty(self, shape, dtype=None):
        return self.xp.empty(shape, dtype=self.dtype if dtype is None else dtype)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=self.dtype if dtype is None else dtype)

    def use_cublas_matmul(self, on=True):
        """Route the layers' float32 GEMMs through cuBLAS by nvmath-python (on) or back to
        xp.matmul (a bf16/fp16 model's ``matmul16``, GemmEx, is capture-safe and stays)."""
        if not on:
            close = getattr(self.matmul, "close", None)
            if close is not None:
                close()
            self.matmul = self.xp.matmul
            return
        from gpubackprop.kernels.cuda.cublas import CublasMatmul

        cublas = nvmath_cublas()
        if cublas is None or not self.on_gpu:
            raise RuntimeError("cuBLAS through nvmath-python needs a model on a CUDA GPU and "
                               "nvmath-python (pip install 'gpubackprop[gpu]')")
        self.matmul = CublasMatmul(self.xp, cublas, tf32=tf32_enabled())

    def synchronize(self):
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def blas_threads(n):
    """A context that runs NumPy's (and SciPy's) BLAS on ``n`` threads while it lasts; n=0 or None:
    as they are. Small GEMMs (a batch of 32 of a sequence model) run faster on one thread than
    on two that hand work back and forth."""
    import contextlib

    if not n:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def is_device_array(a):
    """True for a CuPy array (checked without importing CuPy when it was never imported)."""
    return "cupy" in sys.modules and type(a).__module__.startswith("cupy")


def to_numpy(a):
    """A host NumPy view or copy of a NumPy/CuPy array or array-like."""
    if is_device_array(a):
        return a.get()
    return np.asarray(a)
