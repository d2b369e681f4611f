"""Data-parallel training across processes: a communicator chosen once (``single``, ``mpi``, ``nccl``).

Every rank holds the whole model and the whole data set, draws the same seeded permutation each
epoch and takes its own share of every global batch, so all ranks run the same number of steps.
After each backward pass one all-reduce turns the ranks' gradients into the gradient of the whole
global batch (the flat gradient buffer makes it a single call); every rank then applies the same
update to the same parameters, and the ranks stay bitwise identical. Parameters, optimizer state
and non-trained state (BatchNorm statistics) are broadcast from rank 0 at the start.

- ``mpi``: mpi4py (``pip install 'gpubackprop[mpi]'`` brings mpi4py and MPICH's ``mpiexec``). CuPy
  arrays go through a host copy unless the MPI library says it is CUDA-aware.
- ``nccl``: CuPy's NCCL bindings on CuPy's current stream, one GPU per rank, bootstrapped over MPI
  (the NCCL unique id is broadcast with mpi4py).

A rank that raises ends the whole job (``MPI.COMM_WORLD.Abort``) instead of leaving the others
waiting in a collective forever.
"""

import os
import sys
import time

import numpy as np

from gpubackprop.backend import cupy_module, is_device_array

COMMUNICATORS = ("single", "mpi", "nccl")


class Communicator:
    """One process, no communication: what ``fit`` uses when no communicator is given."""

    kind = "single"
    rank, size = 0, 1

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    @property
    def is_root(self):
        return self.rank == 0

    def broadcast(self, array):
        """Overwrite ``array`` (host or device) with rank 0's, in place."""
        return array

    def allreduce_sum(self, array):
        """Replace ``array`` (host or device) by its sum over the ranks, in place."""
        return array

    def allreduce_host(self, values):
        """Sum over the ranks of a few host float64 values (the metrics ``fit`` reports)."""
        return np.asarray(values, dtype=np.float64)

    def barrier(self):
        pass

    def abort(self, code=1):
        raise SystemExit(code)


class MPICommunicator(Communicator):
    """mpi4py's COMM_WORLD."""

    kind = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError(f"communicator: 'mpi' needs mpi4py (pip install 'gpubackprop[mpi]'): "
                               f"{e}") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        query = getattr(MPI, "Query_cuda_support", None)
        self.cuda_aware = bool(query()) if query is not None else False
        _abort_on_uncaught_exception(self.comm)
        _active.append(self)

    def _buffer(self, array):
        """What MPI reads and writes: the array itself, or a host copy of a device array."""
        if is_device_array(array) and not self.cuda_aware:
            cupy_module().cuda.get_current_stream().synchronize()  # the transport needs the data
            return array.get(), True
        if is_device_array(array):
            cupy_module().cuda.get_current_stream().synchronize()
        return array, False

    def broadcast(self, array):
        buf, copied = self._buffer(array)
        self.comm.Bcast(buf, root=0)
        if copied:
            array.set(buf)
        return array

    def allreduce_sum(self, array):
        buf, copied = self._buffer(array)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if copied:
            array.set(buf)
        return array

    def allreduce_host(self, values):
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        _flush_before_abort()
        self.comm.Abort(code)


class NCCLCommunicator(MPICommunicator):
    """NCCL on CuPy's current stream for device arrays; MPI for host values and the bootstrap."""

    kind = "nccl"

    def __init__(self):
        super().__init__()
        cp = cupy_module()
        if cp is None:
            raise RuntimeError("communicator: 'nccl' needs CuPy with NCCL (pip install "
                               "'gpubackprop[gpu]') and a GPU per rank")
        from cupy.cuda import nccl

        self.nccl = nccl
        cp.cuda.Device(self.rank % cp.cuda.runtime.getDeviceCount()).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def _device_args(self, array):
        stream = cupy_module().cuda.get_current_stream().ptr
        return array.data.ptr, array.size, self._types[array.dtype], stream

    def broadcast(self, array):
        if not is_device_array(array):
            return super().broadcast(array)
        ptr, n, dtype, stream = self._device_args(array)
        self.nccl_comm.bcast(ptr, n, dtype, 0, stream)
        return array

    def allreduce_sum(self, array):
        if not is_device_array(array):
            return super().allreduce_sum(array)
        ptr, n, dtype, stream = self._device_args(array)
        self.nccl_comm.allReduce(ptr, ptr, n, dtype, self.nccl.NCCL_SUM, stream)
        return array


# What MPI launchers put in the environment of the processes they start: PMI (MPICH's hydra and
# gforker, Intel MPI, MVAPICH, srun --mpi=pmi2), PMIx (Open MPI, srun --mpi=pmix), Open MPI's own,
# hydra's control channel (HYDI_*/HYDRA_*), MPICH's local-rank variables.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                      "OMPI_COMM_WORLD_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID",
                      "MV2_COMM_WORLD_SIZE")
LAUNCHER_PREFIXES = ("HYDI_", "HYDRA_")


def launched_by_mpi(environ=None):
    """True when an MPI launcher (mpiexec, mpirun, srun) started this process, by its environment."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARIABLES) or \
        any(name.startswith(LAUNCHER_PREFIXES) for name in environ)


def require_launcher(kind, command="mpiexec -n N python SCRIPT", name="comm",
                     single="comm='single'"):
    """Refuse a parallel communicator (``kind`` "mpi" or "nccl") in a process that no MPI launcher
    started: MPI would run it alone as a world of one, silently, instead of data-parallel.
    ``mpiexec -n 1`` is still fine; so is an unknown launcher whose world has several ranks.
    ``command`` is how to start it, ``name`` the argument and ``single`` the one-process choice
    as the error names them."""
    if kind not in ("mpi", "nccl") or launched_by_mpi():
        return
    try:
        from mpi4py import MPI
    except ImportError:
        return  # communicator() says that mpi4py is missing
    if MPI.COMM_WORLD.Get_size() > 1:
        return
    raise ValueError(f"{name}: {kind!r} trains data-parallel across processes started by an MPI "
                     f"launcher, but this process was not started by one (an MPI world of 1 "
                     f"process, no launcher variable such as PMI_RANK or OMPI_COMM_WORLD_SIZE); "
                     f"start it with "
                     f"'{command}' (-n 1 for one process), or train in one process with {single}")


def communicator(kind="single"):
    """The communicator for ``kind``: "single" (one process), "mpi" or "nccl"."""
    if isinstance(kind, Communicator):
        return kind
    if kind not in COMMUNICATORS:
        raise ValueError(f"communicator: expected one of {COMMUNICATORS}, got {kind!r}")
    if kind == "mpi":
        return MPICommunicator()
    if kind == "nccl":
        return NCCLCommunicator()
    return Communicator()


def shard_bounds(start, stop, rank, size):
    """This rank's share [lo, hi) of the global batch [start, stop): near-equal contiguous pieces
    in rank order, so every rank knows every rank's share and the ranks run the same steps."""
    n = stop - start
    return start + rank * n // size, start + (rank + 1) * n // size


ABORT_GRACE_S = 0.5


def _flush_before_abort():
    """Flush, then give mpiexec a moment to forward this rank's last output: MPI_Abort kills the
    ranks at once, and output still in the launcher's pipes would be lost (seen on a busy machine)."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)


_hooked = False
_active = []  # the MPI communicator of this process, once made


def abort_parallel_job(code):
    """End every rank of a parallel job (after this rank reported its error); no-op otherwise."""
    for comm in _active:
        if comm.size > 1:
            comm.abort(code)


def _abort_on_uncaught_exception(comm):
    """An uncaught exception on one rank aborts every rank (no rank hangs in a collective)."""
    global _hooked
    if _hooked or comm.Get_size() == 1:
        return
    _hooked = True
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.write(f"gpubackprop: rank {comm.Get_rank()} failed; aborting all "
                         f"{comm.Get_size()} ranks\n")
        _flush_before_abort()
        comm.Abort(1)

    sys.excepthook = hook
