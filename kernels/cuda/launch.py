"""What every CUDA kernel of the set shares: the registry of kernel bodies and their signatures,
compilation, launch sizes, and launching on CuPy's current stream.

A kernel body is a plain Python function registered with ``@kernel_body(signature)``; the
signature is a template in which ``{t}`` stands for the float type, ``{l}`` for the label type and
``{h}`` for a 16-bit storage type.
``kernel(body, dtype)`` compiles it for one dtype on first use, so that importing the set costs no
compilation and needs no GPU; ``REGISTRY`` lists every body, which is how the compile check
(tests/test_cuda_compile.py) finds them all.

Device helpers are ``cuda.jit(device=True, inline="always")``: NVVM inlines them into the kernel,
and numba-cuda can then compile the kernel to PTX without a CUDA driver (a non-inlined device
function makes it ask the driver for the compute capability).

Launching: a Numba dispatcher call types every argument and wraps every CuPy array in a Numba
device array (through ``__cuda_array_interface__``) at each launch: ~60 µs for a 4-argument
kernel on an H100 host, where the kernels of a small network run for a few µs. ``FastLaunch``
does that work once per compiled kernel: it keeps the kernel's signature and writes each
argument's parameters straight from the CuPy array (Numba's array ABI: meminfo, parent, size,
itemsize, data pointer, shape, strides), checking dtype, rank and contiguity against the
signature, and launches through cuda.core as Numba itself does.
``GPUBACKPROP_CUDA_LAUNCH=numba`` launches through the dispatcher instead (to compare or debug).
"""

import ctypes
import os
import warnings

import numpy as np

from gpubackprop.backend import cupy_module, is_cudasim, numba_cuda

cuda = numba_cuda()
if cuda is None:
    raise ImportError("the fused CUDA kernels need numba-cuda (pip install 'gpubackprop[gpu]')")

SIMULATOR = is_cudasim()
# Threads a block: a power of two (the block reductions halve it). Under the simulator (one Python
# thread per CUDA thread) 2 blocks of 32 still exercise several blocks, the grid-stride loop and
# ragged tails while staying fast.
THREADS = 32 if SIMULATOR else 256
SIM_BLOCKS = 2
REDUCE_BLOCKS = SIM_BLOCKS if SIMULATOR else 256  # fixed: the summation order depends on it

REGISTRY = {}  # body -> signature template
LABEL_DTYPES = ("int32", "int64")  # what {l} is compiled for by the compile check
HALF_DTYPES = ("float16", "uint16")  # what {h} is: fp16, and bf16 as its bits
_KERNELS = {}
_FAST = {}  # compiled kernel -> its FastLaunch


def kernel_body(signature):
    """Register a kernel body with its signature template (``{t}`` float, ``{l}`` label type)."""
    def register(body):
        REGISTRY[body] = signature
        return body
    return register


def device_function(fn):
    """A device helper that NVVM inlines into every kernel that calls it."""
    return cuda.jit(device=True, inline="always")(fn)


def signature(body, dtype, label_dtype=None):
    # A body has {l} (labels) or {h} (16-bit storage: float16, or uint16 holding bfloat16 bits,
    # kernels/cuda/precision.py), filled from the same second dtype.
    second = label_dtype.name if label_dtype else ""
    return REGISTRY[body].format(t=dtype.name, l=second, h=second)


def kernel(body, dtype, label_dtype=None):
    """``body`` compiled for ``dtype`` (and the label dtype), once per process."""
    key = (body, dtype, label_dtype)
    k = _KERNELS.get(key)
    if k is None:
        # On a GPU the compiled kernel is also cached on disk (the simulator compiles nothing).
        options = {} if SIMULATOR else {"cache": True}
        k = _KERNELS[key] = cuda.jit(signature(body, dtype, label_dtype), **options)(body)
    return k


def as_2d(a):
    return a if a.ndim == 2 else a.reshape(1, -1)


def as_1d(a):
    return a if a.ndim == 1 else a.reshape(-1)


def _array_params(ty, body_name, position):
    """A function appending a CuPy array's parameters of Numba's array ABI to a list, after
    checking it against the signature's array type ``ty``."""
    dtype, ndim, c_layout = np.dtype(str(ty.dtype)), ty.ndim, ty.layout == "C"
    ndarray = cupy_module().ndarray

    def params(a, out):
        if not isinstance(a, ndarray):
            raise TypeError(f"{body_name} argument {position}: expected a CuPy array, got "
                            f"{type(a).__name__}")
        if a.dtype != dtype or a.ndim != ndim or (c_layout and not a.flags.c_contiguous):
            layout = "C-contiguous" if a.flags.c_contiguous else "strided"
            raise TypeError(f"{body_name} argument {position}: expected a "
                            f"{'C-contiguous ' if c_layout else ''}{ndim}-d {dtype} array, got a "
                            f"{layout} {a.ndim}-d {a.dtype} array")
        # CuPy's own strides; Numba derives a C array's from its shape, which differs only on an
        # axis of size 1, whose stride no index multiplies.
        out += (0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides)
    return params


def _scalar_params(ty):
    """A function appending a scalar as the ctypes value Numba passes for type ``ty``."""
    name = str(ty)
    if name == "bool":
        return lambda v, out: out.append(bool(v))
    ctype = {"float32": ctypes.c_float, "float64": ctypes.c_double}.get(name) or getattr(ctypes, f"c_{name}")
    return lambda v, out: out.append(ctype(v))


class FastLaunch:
    """One compiled kernel, launched on a cuda.core stream with its parameters written directly."""

    def __init__(self, dispatcher, body_name):
        from cuda.core import LaunchConfig, launch

        (overload,) = dispatcher.overloads.values()
        self.name = body_name
        self.kernel = overload._codelibrary.get_cufunc().kernel
        self.params = [_array_params(t, body_name, i) if hasattr(t, "ndim") else _scalar_params(t)
                       for i, t in enumerate(overload.argument_types)]
        self._launch, self._LaunchConfig, self._configs = launch, LaunchConfig, {}

    def __call__(self, stream, blocks, threads, args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: expected {len(self.params)} kernel arguments, got "
                            f"{len(args)}")
        params = []
        for put, a in zip(self.params, args, strict=True):
            put(a, params)
        config = self._configs.get((blocks, threads))
        if config is None:
            config = self._configs[blocks, threads] = self._LaunchConfig(grid=blocks, block=threads)
        self._launch(stream, config, self.kernel, *params)


def _fast_launch_available():
    if SIMULATOR or os.environ.get("GPUBACKPROP_CUDA_LAUNCH", "fast") == "numba":
        return False
    try:
        from cuda.core import LaunchConfig, launch  # noqa: F401
        from numba.cuda.cudadrv.driver import _to_core_stream  # noqa: F401
    except ImportError:  # an older numba-cuda: its dispatcher launches
        return False
    return True


class Launcher:
    """Launch sizes, scratch buffers and CuPy's stream for the ops of ``CudaOps``."""

    def __init__(self, xp):
        self.xp = xp
        self.simulator = SIMULATOR
        self._streams = {}
        self._scratch = {}
        self.fast = _fast_launch_available()
        if self.simulator:
            self.max_blocks = SIM_BLOCKS
        else:
            if cupy_module() is None or xp is not cupy_module():
                raise TypeError(f"xp: expected cupy for the fused CUDA kernels on a GPU, got "
                                f"{getattr(xp, '__name__', xp)!r}")
            # Enough blocks to fill every SM several times over; the grid-stride loop does the rest.
            self.max_blocks = 32 * cuda.get_current_device().MULTIPROCESSOR_COUNT

    def launch(self, body, work, dtype, *args, label_dtype=None, blocks=None, threads=THREADS):
        """Launch ``body`` over ``work`` items (grid-stride) on CuPy's current stream."""
        if work <= 0:
            return
        k = kernel(body, dtype, label_dtype)
        if blocks is None:
            blocks = min(self.max_blocks, -(-work // threads))
        if self.simulator:
            k[blocks, threads](*args)
        elif self.fast and (fast := self._fast_launch(k, body)) is not None:
            fast(self._stream(core=True), blocks, threads, args)
        else:
            k[blocks, threads, self._stream()](*args)

    def _fast_launch(self, k, body):
        """``k``'s FastLaunch; None, and the dispatcher from then on, where this numba-cuda lacks
        the internals FastLaunch reads (the same kernels, ~60 µs a launch slower)."""
        fast = _FAST.get(k)
        if fast is None:
            try:
                fast = _FAST[k] = FastLaunch(k, body.__name__)
            except (AttributeError, ImportError, ValueError) as e:
                warnings.warn(f"CUDA kernels launch through Numba's dispatcher: this numba-cuda "
                              f"lacks what the fast launch reads ({e})", RuntimeWarning, stacklevel=3)
                self.fast = False
                return None
        return fast

    def _stream(self, core=False):
        """CuPy's current stream as a Numba stream (or the cuda.core stream the fast launch takes),
        so kernels queue behind CuPy's work."""
        ptr = cupy_module().cuda.get_current_stream().ptr
        s = self._streams.get((ptr, core))
        if s is None:
            s = cuda.external_stream(ptr) if ptr else cuda.default_stream()
            if core:
                from numba.cuda.cudadrv.driver import _to_core_stream

                s = _to_core_stream(s)
            self._streams[ptr, core] = s
        return s

    def scratch(self, name, shape, dtype):
        """A device buffer kept for reuse by (name, shape, dtype): a step allocates nothing."""
        key = (name, shape, dtype)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) > 32:
                self._scratch.clear()
            buf = self._scratch[key] = self.xp.empty(shape, dtype)
        return buf
