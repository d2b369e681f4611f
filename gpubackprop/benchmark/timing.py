"""How a contender is timed: interleaved rounds of blocks, the device synchronised around each
clock read, a quiet machine waited for on the CPU, and medians over rounds."""

import statistics
import time

import numpy as np

from gpubackprop import backend as backend_mod


class Contender:
    """One thing to time: ``step()`` does ``samples`` samples of work; ``sync()`` waits for it."""

    def __init__(self, name, step, sync=None, samples=1, library="gpubackprop", device="cpu",
                 kernels=None, note=""):
        self.name = name
        self.step = step
        self.sync = sync or no_sync
        self.samples = samples
        self.library = library
        self.device = device
        self.kernels = kernels
        self.note = note

    def __repr__(self):
        return f"Contender({self.name!r}, device={self.device!r})"


def no_sync():
    pass


class Timer:
    """Interleaved timing of several contenders: medians of per-round results.

    rounds: timed rounds; block_s: seconds of calls in one block; warmup_s: untimed calls first;
    quiesce_s: sleep before every block (lets other thread pools stop spinning; CPU only);
    prime_calls: untimed calls after that sleep, before the clock starts. The pause leaves the
    contender's own thread pool asleep and its caches and pages cold (the other contenders ran in
    between), so the first call after it is slower than a training loop's steps: measured on the
    2-core AMD EPYC, the resnet preset's first step after a 0.15 s pause 68 ms against 54 ms
    for the next ones (PyTorch 62 against 57), and a block of a ~70 ms step holds one call. With
    one untimed call a block times steady steps, as a training run makes them.
    """

    def __init__(self, rounds=9, block_s=0.1, warmup_s=0.3, quiesce_s=0.15, max_calls=100000,
                 max_busy=0.15, max_wait_s=3.0, prime_calls=1):
        self.rounds = rounds
        self.block_s = block_s
        self.warmup_s = warmup_s
        self.quiesce_s = quiesce_s
        self.max_calls = max_calls
        self.max_busy = max_busy
        self.max_wait_s = max_wait_s
        self.prime_calls = prime_calls
        self.busy = []  # the machine's busy fraction seen in each pause (other processes)

    def run(self, contenders):
        """{name: [seconds per call, one per round]} for every contender, timed interleaved."""
        calls = {}
        for c in contenders:
            calls[c.name] = self._warm_up(c)
        times = {c.name: [] for c in contenders}
        for r in range(self.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for c in order:
                n = calls[c.name]
                if self.quiesce_s and c.device == "cpu":
                    self.busy.append(self._quiesce())
                    for _ in range(self.prime_calls):
                        c.step()
                c.sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    c.step()
                c.sync()
                times[c.name].append((time.perf_counter() - t0) / n)
        return times

    def _quiesce(self):
        """Sleep quiesce_s, longer (up to max_wait_s) while other processes keep the CPUs busy.

        On a shared machine another process's burst would take a core from a multi-threaded
        block; waiting for a quiet moment keeps such rounds out. Returns the last busy fraction.
        """
        waited = 0.0
        while True:
            before = _cpu_times()
            time.sleep(self.quiesce_s)
            waited += self.quiesce_s
            busy = _busy_fraction(before, _cpu_times())
            if busy is None or busy <= self.max_busy or waited >= self.max_wait_s:
                return busy

    def _warm_up(self, c):
        """Run ``c`` for warmup_s (at least 3 calls); return the calls in one block."""
        c.step()  # compiles, allocates workspaces
        c.sync()
        n = 0
        t0 = time.perf_counter()
        while True:
            c.step()
            n += 1
            if n >= 2:
                c.sync()
                el = time.perf_counter() - t0
                if (el >= self.warmup_s and n >= 3) or n >= self.max_calls:
                    break
        per_call = el / n
        return int(min(self.max_calls, max(1, round(self.block_s / max(per_call, 1e-9)))))


def _cpu_times():
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _busy_fraction(before, after):
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def ratio_median(num, den):
    """Median over rounds of num[r]/den[r] (both lists of seconds: den/num in throughput terms)."""
    return median([d / n for n, d in zip(num, den, strict=False)])


def xp_for(device):
    if device == "cuda":
        return backend_mod.cupy_module()
    return np


def sync_for(device):
    if device != "cuda":
        return None
    cp = backend_mod.cupy_module()
    return cp.cuda.get_current_stream().synchronize

