"""What every CUDA kernel of the set shares: the registry of kernel bodies and their signatures,
compilation, launch sizes, and launching on CuPy's current stream.

A kernel body is a plain Python function registered with ``@kernel_body(signature)``; the
signature is a template in which ``{t}`` stands for the float type and ``{l}`` for the label type.
``kernel(body, dtype)`` compiles it for one dtype on first use, so that importing the set costs no
compilation and needs no GPU; ``REGISTRY`` lists every body, which is how the compile check
(tests/test_cuda_compile.py) finds them all.

Device helpers are ``cuda.jit(device=True, inline="always")``: NVVM inlines them into the kernel,
and numba-cuda can then compile the kernel to PTX without a CUDA driver (a non-inlined device
function makes it ask the driver for the compute capability).
"""

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
_KERNELS = {}


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
    return REGISTRY[body].format(t=dtype.name, l=label_dtype.name if label_dtype else "")


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


class Launcher:
    """Launch sizes, scratch buffers and CuPy's stream for the ops of ``CudaOps``."""

    def __init__(self, xp):
        self.xp = xp
        self.simulator = SIMULATOR
        self._streams = {}
        self._scratch = {}
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
        else:
            k[blocks, threads, self._stream()](*args)

    def _stream(self):
        """CuPy's current stream as a Numba stream, so kernels queue behind CuPy's work."""
        ptr = cupy_module().cuda.get_current_stream().ptr
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = cuda.external_stream(ptr) if ptr else cuda.default_stream()
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
