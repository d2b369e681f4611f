"""What changes over a run: learning-rate schedules by step, and early stopping by epoch.

A schedule is a pure function of the global step t (0 for the first optimizer step), so a resumed
run gets exactly the learning rates the uninterrupted run would have had. ``fit(schedule=...)``
sets ``opt.lr = schedule(t)`` before every step.

    StepLR(lr, step_size, gamma)        lr · gamma^⌊t / step_size⌋
    ExponentialLR(lr, gamma, every=1)   lr · gamma^⌊t / every⌋        (every = steps per epoch: per epoch)
    CosineLR(lr, total_steps, min_lr)   min_lr + (lr − min_lr) · (1 + cos(π · min(t, T) / T)) / 2
    Warmup(schedule, warmup_steps)      schedule(0) · (t + 1) / warmup_steps for t < warmup_steps,
                                        then schedule(t − warmup_steps)
"""

import math

import numpy as np

from gpubackprop.validation import non_negative_float, positive_int


def _positive(value, name):
    value = non_negative_float(value, name)
    if value == 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return value


class Schedule:
    """Base: ``schedule(step) -> lr``; ``config()`` is JSON for checkpoints."""

    def __call__(self, step):
        raise NotImplementedError

    def config(self):
        return {"type": type(self).__name__, **self._args()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.config() == other.config()


class ConstantLR(Schedule):
    """The same learning rate at every step."""

    def __init__(self, lr):
        self.lr = non_negative_float(lr, "lr")

    def _args(self):
        return {"lr": self.lr}

    def __call__(self, step):
        return self.lr


class StepLR(Schedule):
    """lr · gamma^⌊step / step_size⌋ (torch's StepLR, counted in optimizer steps)."""

    def __init__(self, lr, step_size, gamma=0.1):
        self.lr = non_negative_float(lr, "lr")
        self.step_size = positive_int(step_size, "step_size")
        self.gamma = _positive(gamma, "gamma")

    def _args(self):
        return {"lr": self.lr, "step_size": self.step_size, "gamma": self.gamma}

    def __call__(self, step):
        return self.lr * self.gamma ** (step // self.step_size)


class ExponentialLR(Schedule):
    """lr · gamma^⌊step / every⌋: every=1 decays each step, every=steps-per-epoch each epoch."""

    def __init__(self, lr, gamma, every=1):
        self.lr = non_negative_float(lr, "lr")
        self.gamma = _positive(gamma, "gamma")
        self.every = positive_int(every, "every")

    def _args(self):
        return {"lr": self.lr, "gamma": self.gamma, "every": self.every}

    def __call__(self, step):
        return self.lr * self.gamma ** (step // self.every)


class CosineLR(Schedule):
    """Cosine annealing from lr to min_lr over total_steps, then min_lr (torch's CosineAnnealingLR)."""

    def __init__(self, lr, total_steps, min_lr=0.0):
        self.lr = non_negative_float(lr, "lr")
        self.total_steps = positive_int(total_steps, "total_steps")
        self.min_lr = non_negative_float(min_lr, "min_lr")

    def _args(self):
        return {"lr": self.lr, "total_steps": self.total_steps, "min_lr": self.min_lr}

    def __call__(self, step):
        t = min(step, self.total_steps)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t / self.total_steps)) / 2


class Warmup(Schedule):
    """Linear warm-up to ``schedule(0)`` over ``warmup_steps``, then ``schedule`` (shifted)."""

    def __init__(self, schedule, warmup_steps):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a Schedule (StepLR, CosineLR, ...), got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.warmup_steps = positive_int(warmup_steps, "warmup_steps")

    def _args(self):
        return {"schedule": self.schedule.config(), "warmup_steps": self.warmup_steps}

    def __repr__(self):
        return f"Warmup({self.schedule!r}, warmup_steps={self.warmup_steps})"

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.schedule(0) * (step + 1) / self.warmup_steps
        return self.schedule(step - self.warmup_steps)


SCHEDULES = {"ConstantLR": ConstantLR, "StepLR": StepLR, "ExponentialLR": ExponentialLR,
             "CosineLR": CosineLR}


def schedule_from_config(config):
    """The schedule that ``config()`` describes (for checkpoints)."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"schedule config: expected a dict with a 'type', got {config!r}")
    args = {k: v for k, v in config.items() if k != "type"}
    if config["type"] == "Warmup":
        return Warmup(schedule_from_config(args["schedule"]), args["warmup_steps"])
    if config["type"] not in SCHEDULES:
        raise ValueError(f"schedule config: expected a type in {list(SCHEDULES) + ['Warmup']}, "
                         f"got {config['type']!r}")
    return SCHEDULES[config["type"]](**args)


# The command-line names of the schedules (--schedule) that make_schedule builds.
SCHEDULE_NAMES = ("constant", "step", "exponential", "cosine")


def make_schedule(name, lr, steps_per_epoch, epochs, step_size=10, gamma=0.1, warmup_steps=0,
                  min_lr=0.0):
    """A schedule by its command-line name: constant | step | exponential | cosine.

    ``step_size`` is in epochs (step: multiply by gamma every step_size epochs); exponential
    multiplies by gamma every epoch; cosine anneals over the steps after the warm-up.
    """
    steps_per_epoch = positive_int(steps_per_epoch, "steps_per_epoch")
    if name == "constant":
        inner = ConstantLR(lr)
    elif name == "step":
        inner = StepLR(lr, positive_int(step_size, "step_size") * steps_per_epoch, gamma)
    elif name == "exponential":
        inner = ExponentialLR(lr, gamma, every=steps_per_epoch)
    elif name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup_steps)
        inner = CosineLR(lr, total, min_lr)
    else:
        raise ValueError(f"schedule: expected one of {SCHEDULE_NAMES}, got {name!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) \
            or warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps!r}")
    return Warmup(inner, warmup_steps) if warmup_steps else inner


class EarlyStopping:
    """Stop when ``monitor`` (e.g. "val_loss", "val_accuracy") has not improved for ``patience`` epochs.

    Improvement means lower for losses and higher for accuracies, by more than ``min_delta``.
    With ``restore_best`` the model gets back the parameters of its best epoch when training stops.
    The state (``best``, ``best_epoch``, ``wait``) is plain data, saved in checkpoints.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best=True):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor: expected a metric name like 'val_loss', got {monitor!r}")
        self.monitor = monitor
        self.patience = positive_int(patience, "patience")
        self.min_delta = non_negative_float(min_delta, "min_delta")
        self.restore_best = bool(restore_best)
        self.mode = "max" if "acc" in monitor else "min"
        self.best = None
        self.best_epoch = None
        self.wait = 0

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
                f"min_delta={self.min_delta}, restore_best={self.restore_best})")

    def config(self):
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta,
                "restore_best": self.restore_best}

    def state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state(self, state):
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]

    def update(self, epoch, logs):
        """Record one epoch's logs; returns (improved, stop)."""
        if self.monitor not in logs:
            raise ValueError(f"early stopping: monitor {self.monitor!r} is not among the epoch's "
                             f"metrics {sorted(k for k in logs if k != 'epoch')} (validation "
                             f"metrics need validation data)")
        value = float(logs[self.monitor])
        if self.best is None:
            improved = math.isfinite(value)
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return improved, self.wait >= self.patience
