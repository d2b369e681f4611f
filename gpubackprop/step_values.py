"""Per-step values on the device: what a captured CUDA graph's kernels read instead of host scalars.

A CUDA graph freezes every kernel parameter at capture, so a value that changes from step to step
(the learning rate of a schedule, Adam's bias corrections, the Dropout step; later the loss scale)
cannot be a kernel argument. ``StepValues`` owns one small float64 device array ``values``, one
slot per such value, which the ``*_values`` ops read (``ops.sgd_values``, ``ops.adam_values``,
``ops.dropout_values``, ...), and advances it on the device:

- **host slots** (``HOST_SLOTS``) are pure functions of the step (a schedule is one, see
  ``gpubackprop.schedules``; Adam's corrections are of its step count). The host computes them,
  with the same float64 arithmetic as the host-scalar ops (``adam_coefficients``), for a block of
  steps at a time (an epoch) into a table ``table`` (rows × len(HOST_SLOTS)), uploaded outside the
  captured region; the first kernel of every step (``ops.step_advance``) copies row ``counter`` into
  ``values`` and increments ``counter``, both on the device. So the kernels round the same float64
  numbers to the array dtype as the host-scalar kernels do: the two paths agree bit for bit.
- **device slots** (``DEVICE_SLOTS``) are state that kernels themselves update (the loss scale of a
  dynamic loss scaler, after its overflow check); ``step_advance`` leaves them alone, ``set``
  gives the initial value.

Adding a slot is one line: append its name to ``HOST_SLOTS`` (and give its per-step value in the
row dict of whoever owns it, as ``Optimizer.step_row`` does) or to ``DEVICE_SLOTS``; kernels read
``values[SLOT[name]]``. Existing indices never move (append only).

Why float64 whatever the model dtype: the host-scalar path computes lr/(1 − β1^t) etc. in float64
and rounds once, in the kernel, to the array dtype; holding those float64 numbers keeps that one
rounding (bitwise equality), a float16/bfloat16 model would lose the learning rate's precision in
its own dtype, and the step count is exact in float64 up to 2^53. The array is a few dozen bytes;
reading one float64 per kernel is free.

Why a device-side advance rather than one captured copy from pinned host memory (both are allowed
by the design): a captured copy reads its pinned source when the graph *runs*, so the host could
not write step k+1's values until step k's copy had run without a host synchronisation or a ring of
graphs; the table + counter lets the host queue many steps ahead with no synchronisation, as
PyTorch's capturable Adam keeps its step on the device.
"""

import numpy as np

HOST_SLOTS = (
    "lr",          # the learning rate of this step (a schedule's value, or opt.lr)
    "lr_c",        # Adam: lr / (1 − β1^t)
    "sqrt_bc2",    # Adam: √(1 − β2^t)
    "decay",       # AdamW: 1 − lr·wd (1 when not decoupled)
    "step",        # the model's training-pass counter that Dropout hashes (an integer < 2^53)
)
DEVICE_SLOTS = ()  # updated by kernels (mixed precision appends "loss_scale" here)
SLOTS = HOST_SLOTS + DEVICE_SLOTS
SLOT = {name: i for i, name in enumerate(SLOTS)}
N_HOST = len(HOST_SLOTS)


class StepValues:
    """One float64 device array ``values`` (a slot per per-step value, ``SLOT[name]``), advanced on
    the device from a host-filled table of rows; see the module docstring."""

    def __init__(self, backend, rows):
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows: expected an integer >= 1, got {rows!r}")
        self.backend = backend
        xp = backend.xp
        self.values = xp.zeros(len(SLOTS), np.float64)
        self.table = xp.zeros((int(rows), N_HOST), np.float64)
        self.counter = xp.zeros(1, np.int64)
        self._host = np.zeros((int(rows), N_HOST), np.float64)  # staging for one upload a block

    def __repr__(self):
        return f"StepValues(slots={list(SLOTS)}, rows={self.table.shape[0]})"

    @property
    def rows(self):
        return self.table.shape[0]

    @staticmethod
    def index(name):
        """The slot of ``name`` in ``values``."""
        if name not in SLOT:
            raise ValueError(f"name: expected one of {SLOTS}, got {name!r}")
        return SLOT[name]

    def fill(self, rows, start=0):
        """Host rows (dicts name -> value; a missing host slot is 0) into the table at rows
        start.., and the counter to ``start``: one upload, outside any captured region."""
        rows = list(rows)
        if start < 0 or start + len(rows) > self.rows:
            raise ValueError(f"rows: {len(rows)} rows from row {start} do not fit the table's "
                             f"{self.rows}")
        for name in {k for r in rows for k in r}:
            if name not in HOST_SLOTS:
                raise ValueError(f"rows: {name!r} is not a host slot; expected names from "
                                 f"{HOST_SLOTS}")
        self._host[start:start + len(rows)] = 0
        for i, r in enumerate(rows, start):
            for name, v in r.items():
                self._host[i, SLOT[name]] = v
        if self.backend.on_gpu:
            self.table.set(self._host)  # one host-to-device copy of the block
        else:
            self.table[...] = self._host
        self.counter[...] = start

    def set(self, name, value):
        """Set one slot now (an initial value of a device slot; outside any captured region)."""
        self.values[self.index(name)] = value

    def advance(self):
        """values[host slots] = table[counter]; counter += 1: one kernel, on the device."""
        self.backend.ops.step_advance(self.table, self.counter, self.values)

    def host(self):
        """The values as a host dict (a host read: for tests and diagnostics only)."""
        from gpubackprop.backend import to_numpy

        v = to_numpy(self.values)
        return {name: float(v[i]) for i, name in enumerate(SLOTS)}
