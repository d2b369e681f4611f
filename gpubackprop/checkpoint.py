"""Checkpoints that lose nothing, written so that a crash never leaves a broken one behind.

A checkpoint is one ``.npz`` archive (no pickle) holding, as arrays: the parameters
(``param/{key}``), the model's non-trained state and step counter (``buffer/{key}``, from
``model.get_state()``; absent in checkpoints of older versions), the optimizer's buffers
(``opt/{name}``), the current epoch's sample order and running totals when saved mid-epoch, the
best parameters for early stopping and the scaling statistics; and, as a JSON string in the
array ``meta``: the format version, the architecture, the model/loss/optimizer/training
configuration, the host RNG state (``rng.bit_generator.state``), epoch, batch and step, the
history, and a SHA-256 digest of every array so that any corruption is caught on load.

Writes are atomic (``gpubackprop.outputs.atomic_write``): a temporary file in the same folder,
flushed and fsynced, renamed over the previous file with ``os.replace``, then the folder fsynced. A
process killed at any moment leaves either the old or the new checkpoint, whole. A ``Checkpointer``
holds the path's lock (``{path}.lock``) from its first save, so that a second run writing the same
checkpoint fails, naming it, instead of overwriting the first one's checkpoints.
"""

import hashlib
import json
import os
import re

import numpy as np

# atomic_write, fault_point and FAULT_ENV lived here before outputs.py; still importable from here.
from gpubackprop.outputs import FAULT_ENV, atomic_write, fault_point, lock_output  # noqa: F401
from gpubackprop.training import TrainingState

FORMAT = "gpubackprop-checkpoint"
# 2: activation "gelu" is the exact (erf) GELU; before, it was the tanh form, now "gelu_tanh".
VERSION = 2
READS = (1, 2)  # the versions load_checkpoint upgrades (upgrade_meta) and reads


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# ---- describing a model -----------------------------------------------------------------------
def architecture(layer):
    """A JSON description of a layer tree: {"type": type name, **layer.config()} (the registry's)."""
    from gpubackprop.layers import registry

    return registry.describe(layer)


def build_layer(desc):
    """The layer tree that ``architecture`` describes (a model's options aside)."""
    from gpubackprop.layers import registry

    try:
        return registry.rebuild(desc)
    except registry.DescriptionError as e:
        raise CheckpointError(str(e)) from None


def unfused_batch_norm(desc):
    """``desc`` (an architecture) with every BatchNorm's activation= as a BatchNorm followed by an
    Activation layer: how the spec's "bn-ACT" was built before the bn token fused the activation
    after it. ``--resume`` of such a checkpoint rebuilds its own architecture (the same values;
    only the layer positions, and so the parameter names, differ)."""
    if isinstance(desc, list):
        out = []
        for d in desc:
            d = unfused_batch_norm(d)
            if isinstance(d, dict) and d.get("type") in ("BatchNorm1d", "BatchNorm2d") \
                    and "activation" in d:
                act = d["activation"]
                out += [{k: v for k, v in d.items() if k != "activation"},
                        {"type": "Activation", "activation": act}]
            else:
                out.append(d)
        return out
    if isinstance(desc, dict):
        return {k: unfused_batch_norm(v) for k, v in desc.items()}
    return desc


def describe_architecture(desc):
    """A short text like ``[Conv2d(1, 8, 3), Flatten(), Dense(64, 10, identity)]``."""
    kind = desc.get("type")
    if kind == "Dense":
        return f"Dense({desc['n_in']}, {desc['n_out']}, {desc['activation']})"
    if kind == "Residual":
        return f"Residual({describe_architecture(desc['block'])})"
    if kind == "Sequential" or kind is None:
        return "[" + ", ".join(describe_architecture(x) for x in desc.get("layers", [])) + "]"
    if kind == "Model":  # a functional graph: its distinct layers, in their key order
        return "Model[" + ", ".join(describe_architecture(x) for x in desc.get("layers", [])) + "]"
    try:
        return " ".join(repr(build_layer(desc)).split())  # as the constructor call
    except CheckpointError:
        return f"{kind}(?)"


# ---- saving -----------------------------------------------------------------------------------
def _digest(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def save_checkpoint(path, model, opt=None, loss=None, state=None, config=None, scaling=None):
    """Write everything needed to continue (or use) ``model`` to ``path``, atomically.

    ``state`` is a ``TrainingState`` (from ``fit(on_checkpoint=...)``); ``config`` any JSON-able
    dict (the command line's options); ``scaling`` a ``Dataset.scaling`` dict.
    """
    be = model.backend
    arrays = {f"param/{k}": v for k, v in model.get_params().items()}
    # Non-trained state (running statistics) and the model's step counter (Dropout's masks).
    arrays.update({f"buffer/{k}": v for k, v in model.get_state().items()})
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": {"architecture": architecture(model), "dtype": be.dtype.name,
                  "seed": model.seed, "device": be.device, "kernels": be.kernels,
                  # mixed precision (the fp16 loss scale itself is model state: buffer/loss_scale*)
                  "precision": model.precision,
                  "loss_scaler": None if model.loss_scaler is None else model.loss_scaler.config()},
        "loss": None if loss is None else type(loss).__name__,
        "rng": _jsonable(be.rng.bit_generator.state),
        "config": _jsonable(config or {}),
    }
    if opt is not None:
        sd = opt.state_dict()
        arrays.update({f"opt/{k}": v for k, v in sd["buffers"].items()})
        meta["optimizer"] = {"type": sd["type"], "steps": sd["steps"],
                             "hyperparams": _jsonable(sd["hyperparams"]),
                             "buffers": sorted(sd["buffers"])}
    if state is not None:
        meta["training"] = {"epoch": state.epoch, "batch": state.batch, "step": state.step,
                            "finished": state.finished, "seconds": state.seconds,
                            "history": _jsonable(state.history),
                            "early_stopping": _jsonable(state.early_stopping)}
        if state.batch:
            arrays["state/order"] = np.asarray(state.order, dtype=np.int64)
            arrays["state/total_loss"] = np.asarray(state.totals[0])
            arrays["state/total_correct"] = np.asarray(state.totals[1])
        if state.best_params is not None:
            arrays["state/best_params"] = np.asarray(state.best_params)
    if scaling is not None:
        meta["scaling"] = {k: v for k, v in scaling.items() if not isinstance(v, np.ndarray)}
        arrays.update({f"scaling/{k}": v for k, v in scaling.items() if isinstance(v, np.ndarray)})
    for key, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {path}: refusing to save non-finite values in "
                                  f"{key!r}; the previous checkpoint is kept")
    meta["digest"] = _digest(arrays)
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays), kind="checkpoint")


class Checkpointer:
    """``fit(on_checkpoint=Checkpointer(path, model, opt, ...))``: saves each state it is given.

    It holds the lock of ``path`` (``gpubackprop.outputs.OutputLock``) from ``lock()`` or its first
    save until ``close()``, the end of a ``with`` block, or its own end: another process saving to
    the same path gets ``OutputLocked`` naming it. (Not at construction: the ranks of a
    data-parallel run all build one, and rank 0 alone saves.)
    """

    def __init__(self, path, model, opt, loss=None, config=None, scaling=None, clock=None,
                 seconds=0.0):
        self.path, self.model, self.opt, self.loss = path, model, opt, loss
        self.config, self.scaling = config, scaling
        self.clock = clock  # seconds since this process started training, for the total time
        self.seconds = seconds  # time spent before a resume
        self.saved = 0
        self._lock = None

    def __repr__(self):
        return f"Checkpointer({self.path!r}, saved={self.saved})"

    def lock(self):
        """Take the path's lock now, to fail before training rather than at the first save."""
        if self._lock is None:
            self._lock = lock_output(self.path, "checkpoint")
        return self

    def close(self):
        """Let go of the path's lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self.lock()

    def __exit__(self, *exc):
        self.close()

    def __call__(self, state):
        self.lock()
        if self.clock is not None:
            state.seconds = self.seconds + self.clock()
        save_checkpoint(self.path, self.model, self.opt, self.loss, state, self.config,
                        self.scaling)
        self.saved += 1


# ---- loading ----------------------------------------------------------------------------------
class Checkpoint:
    """A loaded checkpoint: ``meta`` (dict) and ``arrays``; restores a model, optimizer and run."""

    def __init__(self, path, meta, arrays):
        self.path, self.meta, self.arrays = path, meta, arrays

    def __repr__(self):
        t = self.meta.get("training", {})
        return (f"Checkpoint({self.path!r}, {describe_architecture(self.architecture)}, "
                f"epoch={t.get('epoch')}, step={t.get('step')})")

    @property
    def architecture(self):
        return self.meta["model"]["architecture"]

    @property
    def config(self):
        return self.meta.get("config", {})

    @property
    def params(self):
        return {k[len("param/"):]: v for k, v in self.arrays.items() if k.startswith("param/")}

    @property
    def model_state(self):
        """{key: array} of ``model.get_state()`` when saved (None for an older checkpoint)."""
        state = {k[len("buffer/"):]: v for k, v in self.arrays.items() if k.startswith("buffer/")}
        return state or None

    @property
    def scaling(self):
        if "scaling" not in self.meta:
            return None
        s = dict(self.meta["scaling"])
        s.update({k[len("scaling/"):]: v for k, v in self.arrays.items()
                  if k.startswith("scaling/")})
        return s

    def build_model(self, device="auto", kernels="fused"):
        """A fresh model (a Sequential, or a functional Model) with this checkpoint's architecture,
        dtype and parameters."""
        from gpubackprop.layers import registry

        desc, m = self.architecture, self.meta["model"]
        cls = registry.LAYER_TYPES.get(desc.get("type")) if isinstance(desc, dict) else None
        try:
            if cls is None or not hasattr(cls, "_init_model"):
                raise ValueError(f"expected a model description, got {desc!r}")
            mixed = {"precision": m["precision"], "loss_scaler": m.get("loss_scaler")} \
                if m.get("precision", "fp32") != "fp32" else {}
            model = cls.from_config({k: v for k, v in desc.items() if k != "type"}, device=device,
                                    dtype=m["dtype"], seed=m["seed"], kernels=kernels, **mixed)
        except registry.DescriptionError as e:
            raise CheckpointError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path}: bad architecture ({e})") from None
        self.restore_model(model)
        return model

    def check_model(self, model):
        """Raise ``CheckpointError`` unless ``model`` has this checkpoint's architecture and dtype."""
        mine = self.architecture
        theirs = architecture(model)
        if mine != theirs:
            raise CheckpointError(f"checkpoint {self.path}: made for the architecture "
                                  f"{describe_architecture(mine)}, but the model is "
                                  f"{describe_architecture(theirs)}")
        dtype = self.meta["model"]["dtype"]
        if model.dtype.name != dtype:
            raise CheckpointError(f"checkpoint {self.path}: made for dtype {dtype}, but the model "
                                  f"is {model.dtype.name}")
        precision = self.meta["model"].get("precision", "fp32")
        if model.precision != precision:
            raise CheckpointError(f"checkpoint {self.path}: made for precision {precision}, but the "
                                  f"model is {model.precision}")

    def restore_model(self, model):
        self.check_model(model)
        state = self.model_state
        if state is None and len(model.get_state()) > 1:
            raise CheckpointError(f"checkpoint {self.path}: has no model state, but the model "
                                  f"has {sorted(k for k in model.get_state() if k != 'step')}")
        try:
            model.set_params(self.params)
            if state is not None:
                model.set_state(state)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.path}: {e}") from None

    def restore(self, model, opt=None, loss=None):
        """Parameters, optimizer state and host RNG state back onto ``model``/``opt``; returns the
        ``TrainingState`` to pass to ``fit(state=...)`` (None when the checkpoint has none)."""
        self.restore_model(model)
        if loss is not None and self.meta.get("loss") not in (None, type(loss).__name__):
            raise CheckpointError(f"checkpoint {self.path}: made with the loss "
                                  f"{self.meta['loss']}, not {type(loss).__name__}")
        if opt is not None:
            o = self.meta.get("optimizer")
            if o is None:
                raise CheckpointError(f"checkpoint {self.path}: has no optimizer state")
            state = {"type": o["type"], "steps": o["steps"], "hyperparams": o["hyperparams"],
                     "buffers": {name: self.arrays[f"opt/{name}"] for name in o["buffers"]}}
            try:
                opt.load_state_dict(state, model)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"checkpoint {self.path}: {e}") from None
        try:
            model.backend.rng.bit_generator.state = self.meta["rng"]
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {self.path}: bad RNG state ({e})") from None
        return self.training_state()

    def training_state(self):
        t = self.meta.get("training")
        if t is None:
            return None
        a = self.arrays
        batch = t["batch"]
        return TrainingState(
            t["epoch"], batch, t["step"],
            order=a["state/order"] if batch else None,
            totals=(a["state/total_loss"], a["state/total_correct"]) if batch else None,
            history=t["history"], early_stopping=t["early_stopping"],
            best_params=a.get("state/best_params"), finished=t["finished"], seconds=t["seconds"])


def load_checkpoint(path):
    """Read and verify a checkpoint; ``CheckpointError`` if it is missing, corrupt or truncated."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, truncated, CRC error, pickled objects, ...
        raise CheckpointError(f"checkpoint {path}: not a readable gpubackprop checkpoint "
                              f"(corrupt or truncated: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except Exception:
        raise CheckpointError(f"checkpoint {path}: not a gpubackprop checkpoint (no readable "
                              f"'meta' entry)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a gpubackprop checkpoint")
    if meta.get("version") not in READS:
        raise CheckpointError(f"checkpoint {path}: format version {meta.get('version')}, this "
                              f"gpubackprop reads versions {', '.join(map(str, READS))}")
    if meta.get("digest") != _digest(arrays):
        raise CheckpointError(f"checkpoint {path}: corrupt (its arrays do not match its digest)")
    return Checkpoint(path, upgrade_meta(meta), arrays)


def upgrade_meta(meta):
    """A checkpoint's meta as the current version writes it. Version 1's "gelu" was the tanh form:
    it becomes "gelu_tanh" in the architecture and the training configuration (--activation and
    the --model spec's gelu tokens), so the model rebuilds, and resumes, as it was trained."""
    if meta["version"] >= 2:
        return meta
    meta = dict(meta, version=VERSION)
    if isinstance(meta.get("model"), dict) and "architecture" in meta["model"]:
        meta["model"] = dict(meta["model"], architecture=_gelu_as_tanh(meta["model"]["architecture"]))
    config = meta.get("config")
    if isinstance(config, dict):
        config = dict(config)
        if config.get("activation") == "gelu":
            config["activation"] = "gelu_tanh"
        if isinstance(config.get("model"), str):
            config["model"] = re.sub(r"(?<!\w)gelu(?![\w(])", "gelu_tanh", config["model"])
        meta["config"] = config
    return meta


def _gelu_as_tanh(desc):
    """A layer description with every activation "gelu" as "gelu_tanh" (nested layers too)."""
    if isinstance(desc, list):
        return [_gelu_as_tanh(x) for x in desc]
    if not isinstance(desc, dict):
        return desc
    return {k: "gelu_tanh" if k == "activation" and v == "gelu" else _gelu_as_tanh(v)
            for k, v in desc.items()}
