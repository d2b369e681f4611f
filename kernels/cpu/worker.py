"""The one worker thread on which the fused CPU set runs the second of two halves of a call's work
(Conv2d's chunks, the direct convolution's sample chunks) while the calling thread runs the first.

A plain thread that waits on a future rather than a pool that spins: Numba's parallel regions
(OpenMP here) and OpenBLAS's threads keep spinning on the cores for a while after their work, and
a split whose second thread runs at a fraction of a core loses (kernels/cpu/direct_conv.py has the
figures). The kernels the halves call release the GIL (``nogil``), as NumPy's GEMMs do.
"""

import os
import threading

_WORKER = []
_LOCK = threading.Lock()
# A forked child has no worker thread (the executor's thread stays in the parent): it makes its own.
os.register_at_fork(after_in_child=_WORKER.clear)


def worker():
    """The worker thread's executor, made on first use."""
    with _LOCK:
        if not _WORKER:
            from concurrent.futures import ThreadPoolExecutor

            _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubackprop-cpu"))
        return _WORKER[0]


def in_halves(count, run):
    """``run(0, k)`` here and ``run(k, count)`` on the worker thread at once, k = ⌈count/2⌉."""
    k = (count + 1) // 2
    in_two(lambda: run(0, k), lambda: run(k, count))


def in_two(first, second):
    """``second()`` on the worker thread while ``first()`` runs here; returns when both are done
    (an exception of either is raised here, after both have finished)."""
    future = worker().submit(second)
    try:
        first()
    finally:
        future.result()
