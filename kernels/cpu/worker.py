"""The one worker thread on which the fused CPU set runs the second of two halves of a call's work
(Conv2d's chunks, the direct convolution's sample chunks, BatchNorm's halves) while the calling
thread runs the first.

Not a pool whose threads spin between calls on their own: Numba's parallel regions (OpenMP here)
and OpenBLAS's threads keep spinning on the cores for a while after their work, and a split whose
second thread runs at a fraction of a core loses (kernels/cpu/direct_conv.py has the figures). The
kernels the halves call release the GIL (``nogil``), as NumPy's GEMMs do.

The hand-off spins briefly instead of sleeping, both ways: on these VMs (no cpuidle driver: an
idle vCPU halts) waking a sleeping thread costs 0.05-0.3 ms, and a step of the resnet preset makes
24 two-way calls: measured with a thread pool's futures (2-core AMD EPYC znver3), the worker's
half started 0.05-0.28 ms after the call and the caller woke 0.1-0.2 ms after the worker ended,
7.1 ms of a 85 ms step. So the worker, after a job, spins (in a compiled loop that holds no GIL)
up to ``IDLE_SPIN_S`` for the next one, then sleeps on an event; the caller, once its own half is
done, spins for the worker's end up to ``JOIN_SPIN_S``, then polls. Each side's flag store is made
outside the GIL by the spinning side's compiled code or under the GIL by the other, and the end
flag is stored only after the worker has let go of the GIL, so that the waking side never waits
for the GIL on a thread that would have to be woken. Measured (same VM, each worker in its own
process, interleaved with PyTorch, medians): the LeNet-5 step 12.8 / 14.5 ms -> 9.5 / 10.6 (two
runs), the resnet preset's 96.8 / 90.5 -> 88.8 / 85.4; the resnet step's time past the calling
thread's own halves 7.1 -> 2.2-5.4 ms. What is left of it is mostly the worker's start, 0.1-0.2
ms on a large call: it spins, but then waits for the GIL while the caller's half makes its
Python calls, and that wait sleeps.
"""

import os
import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Seconds the worker spins for its next job after one (then it sleeps until woken), and the caller
# for the worker's half once its own is done (then it polls every POLL_S): a few ms, since both
# spins take a core's time from anything else that would run on it (the gaps between a conv
# step's two-way calls, and the halves' imbalance, are well under a millisecond here).
IDLE_SPIN_S = 0.005
JOIN_SPIN_S = 0.01
POLL_S = 0.0005
_JOB, _DONE, _ASLEEP = 0, 1, 2  # the shared flags' slots (int64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _load_acquire(typingctx, flags, i):
    """flags[i] by an atomic acquire load: LLVM may neither hoist it out of a loop nor reorder
    later loads before it."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(flags, i), codegen


@intrinsic
def _store_release(typingctx, flags, i, value):
    """flags[i] = value by an atomic release store (earlier stores visible before it)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(flags, i, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """The spin-loop hint (x86 ``pause``): yields the core's pipeline while spinning."""
    def codegen(context, builder, sig, args):
        if _X86:  # (elsewhere a plain loop)
            fty = ir.FunctionType(ir.VoidType(), [])
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=fty), [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, nogil=True)
def _signal_and_spin(flags, done, want, spins):
    """flags[_DONE] = done, then spin until flags[_JOB] == want or ``spins`` rounds have passed;
    whether it came. Runs without the GIL: the caller spinning for _DONE can take it at once."""
    _store_release(flags, _DONE, done)
    return _spin_for(flags, _JOB, want, spins)


@njit(cache=True, nogil=True)
def _spin_for(flags, slot, want, spins):
    """Spin until flags[slot] == want or ``spins`` rounds have passed; whether it came."""
    for _ in range(spins):
        if _load_acquire(flags, slot) == want:
            return True
        _pause()
    return _load_acquire(flags, slot) == want


def _spin_seconds():
    """Seconds one spin round (a load and a pause) takes here, measured once."""
    flags = np.zeros(3, np.int64)
    _spin_for(flags, _JOB, 1, 1000)  # compiled
    t0 = time.perf_counter()
    _spin_for(flags, _JOB, 1, 200000)
    return max((time.perf_counter() - t0) / 200000, 1e-9)


class _Worker:
    """A thread that runs one job at a time for ``run``: job k handed over by flags[_JOB] = k, its
    end by flags[_DONE] = k."""

    def __init__(self):
        self.flags = np.zeros(3, np.int64)
        self.seq = 0
        self.job = None
        self.error = None
        self.owner = None  # the thread inside run (a nested call runs its halves in turn)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        per = _spin_seconds()
        self.idle_spins = max(int(IDLE_SPIN_S / per), 1)
        self.join_spins = max(int(JOIN_SPIN_S / per), 1)
        self.thread = threading.Thread(target=self._loop, name="gpubackprop-cpu", daemon=True)
        self.thread.start()

    def _loop(self):
        flags, done = self.flags, 0
        while True:
            want = done + 1
            if not _signal_and_spin(flags, done, want, self.idle_spins):
                flags[_ASLEEP] = 1  # under the GIL, as the caller's read of it (see run)
                while flags[_JOB] != want:
                    self.wake.wait()
                    self.wake.clear()
                flags[_ASLEEP] = 0
            try:
                self.job()
            except BaseException as e:  # raised in the caller, after both halves
                self.error = e
            self.job = None
            done = want

    def run(self, first, second):
        """``second()`` on the worker while ``first()`` runs on the calling thread; one after the
        other where called from inside a half (the worker is busy with this call's)."""
        me = threading.current_thread()
        if me is self.thread or self.owner is me:
            first()
            second()
            return
        with self.lock:  # one call at a time (threads of the user's that train models at once)
            self.owner = me
            try:
                self._run(first, second)
            finally:
                self.owner = None

    def _run(self, first, second):
        self.seq += 1
        want = self.seq
        self.job, self.error = second, None
        self.flags[_JOB] = want
        if self.flags[_ASLEEP]:
            self.wake.set()
        try:
            first()
        finally:
            if not _spin_for(self.flags, _DONE, want, self.join_spins):
                while self.flags[_DONE] != want:
                    time.sleep(POLL_S)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


_WORKER = []
_LOCK = threading.Lock()
# A forked child has no worker thread (the thread stays in the parent): it makes its own.
os.register_at_fork(after_in_child=_WORKER.clear)


def worker():
    """The worker, made on first use."""
    with _LOCK:
        if not _WORKER:
            _WORKER.append(_Worker())
        return _WORKER[0]


def in_halves(count, run):
    """``run(0, k)`` here and ``run(k, count)`` on the worker thread at once, k = ⌈count/2⌉."""
    k = (count + 1) // 2
    in_two(lambda: run(0, k), lambda: run(k, count))


def in_two(first, second):
    """``second()`` on the worker thread while ``first()`` runs here; returns when both are done
    (an exception of either is raised here, after both have finished)."""
    worker().run(first, second)
