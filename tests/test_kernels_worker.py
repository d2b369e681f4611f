"""kernels/cpu/worker.py: the worker thread's two-way calls, as the fused CPU set's halves make
them: both halves run, the second on the worker thread, the call returns after both; errors of
either half are raised after both; a nested call and calls from several threads at once; a worker
that went to sleep between calls; a forked child."""

import os
import threading
import time

import pytest

from gpubackprop.kernels.cpu import worker as worker_mod
from gpubackprop.kernels.cpu.worker import in_halves, in_two


def test_both_halves_run_the_second_on_the_worker():
    seen = {}

    def first():
        time.sleep(0.01)
        seen["first"] = threading.current_thread().name

    def second():
        time.sleep(0.02)  # ends after the first: the call still waits for it
        seen["second"] = threading.current_thread().name

    in_two(first, second)
    assert seen == {"first": threading.current_thread().name, "second": "gpubackprop-cpu"}


def test_in_halves_splits_the_count():
    parts = []
    lock = threading.Lock()

    def run(a, b):
        with lock:
            parts.append((a, b))

    in_halves(7, run)
    assert sorted(parts) == [(0, 4), (4, 7)]


@pytest.mark.parametrize("failing", ["first", "second", "both"])
def test_an_error_is_raised_after_both_halves(failing):
    done = []

    def half(name):
        def run():
            time.sleep(0.01)
            done.append(name)
            if failing in (name, "both"):
                raise ValueError(name)
        return run

    with pytest.raises(ValueError, match="first" if failing != "second" else "second"):
        in_two(half("first"), half("second"))
    assert sorted(done) == ["first", "second"]
    out = []
    in_two(lambda: out.append(1), lambda: out.append(2))  # the worker still serves
    assert sorted(out) == [1, 2]


def test_a_nested_call_runs_its_halves_in_turn():
    out = []
    lock = threading.Lock()

    def add(x):
        with lock:
            out.append(x)

    in_two(lambda: in_two(lambda: add(1), lambda: add(2)),
           lambda: in_two(lambda: add(3), lambda: add(4)))
    assert sorted(out) == [1, 2, 3, 4]


def test_calls_from_several_threads_at_once_each_run_both_halves():
    counts = [0] * 4
    errors = []

    def user(i):
        try:
            for _ in range(200):
                got = []
                in_two(lambda got=got: got.append("a"), lambda got=got: got.append("b"))
                assert sorted(got) == ["a", "b"]
                counts[i] += 1
        except BaseException as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and counts == [200] * 4


def test_a_sleeping_worker_is_woken():
    in_two(lambda: None, lambda: None)
    time.sleep(worker_mod.IDLE_SPIN_S * 4)  # past its spin: it sleeps on its event
    assert worker_mod.worker().flags[worker_mod._ASLEEP] == 1
    out = []
    in_two(lambda: out.append(1), lambda: out.append(2))
    assert sorted(out) == [1, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_worker():
    in_two(lambda: None, lambda: None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own worker thread, then report
        try:
            out = []
            in_two(lambda: out.append(1), lambda: out.append(2))
            os.write(w, b"ok" if sorted(out) == [1, 2] else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 2) == b"ok" and status == 0
