"""Optimizers: SGD (momentum, Nesterov), RMSprop, Adam, AdamW, with torch.optim's update rules.

Each one updates a model's flat parameter buffer in one vectorised pass (one fused kernel) from
its flat gradient buffer. ``clip_norm`` scales all gradients together by
min(1, clip_norm / (‖g‖₂ + 1e-6)); the factor is computed and applied on the device.
``state_dict``/``load_state_dict`` read out and restore everything an update depends on.
"""

import numpy as np

from gpubackprop.validation import non_negative_float


def _positive_float(value, name):
    value = non_negative_float(value, name)
    if value == 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return value


def _fraction(value, name):
    value = non_negative_float(value, name)
    if value >= 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return value


class Optimizer:
    buffer_names = ()

    def __init__(self, lr, weight_decay=0.0, clip_norm=None):
        self.lr = non_negative_float(lr, "lr")
        self.weight_decay = non_negative_float(weight_decay, "weight_decay")
        self.clip_norm = None if clip_norm is None else _positive_float(clip_norm, "clip_norm")
        self.steps = 0
        self.buffers = None  # {name: device array like the flat parameters}, made on first step
        self._scale = None  # 1-element device array: the clip factor (1 without clipping)
        self._prepared_for = None  # the flat parameter buffer the state was last checked against

    def hyperparams(self):
        return {"lr": self.lr, "weight_decay": self.weight_decay, "clip_norm": self.clip_norm}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({args})"

    def _prepare(self, model):
        p, be = model.flat_params, model.backend
        if p is not self._prepared_for:  # once per parameter buffer, not on every step
            self._make_state(be, p)
            self._prepared_for = p
        if self.clip_norm is not None:
            be.ops.clip_scale(model.flat_grads, self.clip_norm, self._scale)
        return be.ops, p, model.flat_grads

    def _make_state(self, be, p):
        if self.buffers is None:
            self.buffers = {name: be.zeros(p.shape) for name in self.buffer_names}
        for buf in self.buffers.values():
            if buf.shape != p.shape:
                raise ValueError(f"optimizer state: made for {buf.size} parameters, the model has "
                                 f"{p.size}; use a new optimizer")
        self._scale = be.xp.ones(1, dtype=p.dtype)

    def step(self, model):
        """One update of ``model.flat_params`` from ``model.flat_grads``.

        With ``model.context.step_values`` set (a captured CUDA graph's step), the learning rate
        and the bias corrections are read from that device array instead of ``self.lr`` and
        ``self.steps``; ``step_row`` gives what it must hold. Under fp16 the model's loss scaler
        turns the gradient factor into the skip factor when its gradients overflowed (on the
        device: the update kernels then change nothing); ``steps`` counts the call either way."""
        ops, p, g = self._prepare(model)
        scaler = getattr(model, "loss_scaler", None)
        if scaler is not None:
            scaler.gate(self._scale, self.clip_norm is not None)
        self.steps += 1
        sv = model.context.step_values
        if sv is None:
            self._update(ops, p, g, self._scale)
        else:
            self._update_values(ops, p, g, self._scale, sv.values)

    def step_row(self, lr, step):
        """The StepValues host slots of the update that is optimizer step ``step`` (1 for the
        first) at learning rate ``lr``, in the float64 arithmetic of the host-scalar ops."""
        return {"lr": float(lr)}

    # ---- state for checkpoints -------------------------------------------------------------------
    def state_dict(self):
        """Host copies of the update state: {"type", "steps", "hyperparams", "buffers": {...}}."""
        from gpubackprop.backend import to_numpy

        buffers = {} if self.buffers is None else {k: np.array(to_numpy(v))
                                                   for k, v in self.buffers.items()}
        return {"type": type(self).__name__, "steps": self.steps,
                "hyperparams": self.hyperparams(), "buffers": buffers}

    def load_state_dict(self, state, model):
        """Restore ``state_dict()`` output onto this optimizer for ``model``."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state: expected type {type(self).__name__}, got "
                             f"{state.get('type')!r}")
        buffers = state.get("buffers", {})
        n = model.n_params
        if buffers and set(buffers) != set(self.buffer_names):
            raise ValueError(f"optimizer state: expected buffers {list(self.buffer_names)}, got "
                             f"{sorted(buffers)}")
        for name, arr in buffers.items():
            if np.shape(arr) != (n,):
                raise ValueError(f"optimizer state buffer {name!r}: expected shape ({n},), got "
                                 f"{np.shape(arr)}")
        be = model.backend
        self.buffers = {k: be.to_device(np.asarray(v)) for k, v in buffers.items()} or None
        self._prepared_for = None
        self.steps = int(state.get("steps", 0))


class SGD(Optimizer):
    """p −= lr·d, d = g + wd·p, with momentum buf = μ·buf + d (Nesterov: d + μ·buf)."""

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        self.momentum = _fraction(momentum, "momentum")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = bool(nesterov)
        self.buffer_names = ("momentum",) if self.momentum else ()

    def hyperparams(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                **super().hyperparams()}

    def _update(self, ops, p, g, scale):
        buf = self.buffers.get("momentum", p)  # unused without momentum
        ops.sgd(p, g, buf, self.lr, self.momentum, self.nesterov, self.weight_decay, scale)

    def _update_values(self, ops, p, g, scale, values):
        buf = self.buffers.get("momentum", p)
        ops.sgd_values(p, g, buf, values, self.momentum, self.nesterov, self.weight_decay, scale)


class RMSprop(Optimizer):
    """square_avg = α·sa + (1−α)·d²; p −= lr·d / (√sa + eps) (through momentum if > 0)."""

    def __init__(self, lr=0.01, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0,
                 clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        self.alpha = _fraction(alpha, "alpha")
        self.eps = _positive_float(eps, "eps")
        self.momentum = _fraction(momentum, "momentum")
        self.buffer_names = ("square_avg", "momentum") if self.momentum else ("square_avg",)

    def hyperparams(self):
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps, "momentum": self.momentum,
                **super().hyperparams()}

    def _update(self, ops, p, g, scale):
        sa = self.buffers["square_avg"]
        buf = self.buffers.get("momentum", sa)
        ops.rmsprop(p, g, sa, buf, self.lr, self.alpha, self.eps, self.weight_decay,
                    self.momentum, scale)

    def _update_values(self, ops, p, g, scale, values):
        sa = self.buffers["square_avg"]
        buf = self.buffers.get("momentum", sa)
        ops.rmsprop_values(p, g, sa, buf, values, self.alpha, self.eps, self.weight_decay,
                           self.momentum, scale)


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` is L2 added to the gradient (torch's Adam)."""

    decoupled = False
    buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=None):
        super().__init__(lr, weight_decay, clip_norm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.betas = (_fraction(betas[0], "betas[0]"), _fraction(betas[1], "betas[1]"))
        self.eps = _positive_float(eps, "eps")

    def hyperparams(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                **super().hyperparams()}

    def _update(self, ops, p, g, scale):
        ops.adam(p, g, self.buffers["exp_avg"], self.buffers["exp_avg_sq"], self.lr,
                 self.betas[0], self.betas[1], self.eps, self.weight_decay, self.decoupled,
                 self.steps, scale)

    def _update_values(self, ops, p, g, scale, values):
        ops.adam_values(p, g, self.buffers["exp_avg"], self.buffers["exp_avg_sq"], values,
                        self.betas[0], self.betas[1], self.eps, self.weight_decay, self.decoupled,
                        scale)

    def step_row(self, lr, step):
        from gpubackprop.kernels.reference.optimizers import adam_coefficients

        lr_c, sqrt_bc2, _, decay = adam_coefficients(float(lr), self.betas[0], self.betas[1],
                                                     self.weight_decay, self.decoupled, step)
        return {"lr": float(lr), "lr_c": float(lr_c), "sqrt_bc2": sqrt_bc2, "decay": float(decay)}


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 − lr·wd before the Adam step (torch's AdamW)."""

    decoupled = True

    def __init__(self, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, clip_norm=None):
        super().__init__(lr, betas, eps, weight_decay, clip_norm)


# The command-line names (--optimizer); "momentum" is SGD with momentum 0.9 (make_optimizer).
OPTIMIZERS = {"sgd": SGD, "momentum": SGD, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def make_optimizer(name, lr, **kwargs):
    """An optimizer by its command-line name; "momentum" is SGD with momentum 0.9."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZER_NAMES}, got {name!r}")
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
    return OPTIMIZERS[name](lr=lr, **kwargs)
