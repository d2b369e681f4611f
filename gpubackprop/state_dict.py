"""PyTorch weights in and out: ``state_dict()`` / ``load_state_dict()`` with torch's key names and
layouts, safetensors files, and ``renumber_state_dict`` for chains numbered differently.

**Keys.** ``"{position}.{name}"``, the position being the layer's index in the model (nested
``Sequential``: ``"{i}.{j}.{name}"``; a ``Residual`` is transparent, its block's keys are the
Residual's position, as in ``get_params()``; a functional ``Model``: its distinct layers' positions
in the order the graph first uses them), and the name and layout torch's for the equivalent
module: ``Dense`` -> ``nn.Linear`` (``weight`` (n_out, n_in), ``bias``; ``get_params()`` calls them
``W``/``b``), ``Conv2d`` (``weight`` (C_out, C_in/groups, kH, kW), ``bias``), ``BatchNorm1d/2d``
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` as an int64 0-d
array), ``LayerNorm`` (``weight``, ``bias``), ``RNN``/``LSTM``/``GRU`` (``weight_ih_l0``,
``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ...). Within a layer the order is torch's:
parameters, then buffers. The model's step counter is not in it (torch modules have none; it is
training progress, saved by checkpoints with the optimizer's state).

**Positions and fused activations.** A layer with a fused activation (``Dense(.., activation=
"relu")``) is one position here and two in a ``torch.nn.Sequential`` (``Linear``, ``ReLU``), so the
positions of later layers differ. ``state_dict()`` keeps the model's own positions, because they
are what ``load_state_dict`` and ``get_params()`` use and because torch's positions cannot be
inferred (the ReLU may be a module, a functional call in ``forward``, or absent). Two ways across:
build the model as torch's module reads (``Dense`` then ``Activation("relu")``: the keys are then
identical), or map the positions with ``renumber_state_dict(sd, target)``, which pairs the entries
of both state dicts in order (parameterless modules have no entries, so they drop out), checks
that every pair has the same name and shape, and returns ``sd``'s values under the target's keys.
That is the remapping PyTorch users write by hand, made explicit and checked, rather than a guess
inside ``load_state_dict``.
"""

import collections
import collections.abc
import os

import numpy as np

from gpubackprop.layers.base import size_of
from gpubackprop.layers.dense import Dense
from gpubackprop.validation import check_finite, describe, host_array

# Dense keeps its public "W"/"b" (get_params, checkpoints); torch.nn.Linear calls them so.
_LINEAR_NAMES = {"W": "weight", "b": "bias"}

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = "What load_state_dict(strict=False) did not match, as torch returns it."

_Slot = collections.namedtuple("_Slot", ["key", "buffer", "offset", "shape"])


def _layout(model):
    """[_Slot] for every state-dict entry of ``model``, in torch's order (per layer: its parameters,
    then its buffers)."""
    if getattr(model, "_outer", None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is part of another model: use the outer "
                           f"model's state dict")
    model.backend  # noqa: B018 (build first)
    per_layer = collections.defaultdict(list)
    for key, layer, name, offset, shape in model._params:
        torch_name = _LINEAR_NAMES[name] if isinstance(layer, Dense) else name
        per_layer[id(layer)].append(_Slot(key[:len(key) - len(name)] + torch_name, model.flat_params,
                                          offset, shape))
    for key, layer, _, dt, offset, shape, _ in model._states:
        per_layer[id(layer)].append(_Slot(key, model.state_buffers[dt], offset, shape))
    return [slot for _, layer in model.leaves() for slot in per_layer.get(id(layer), [])]


def state_dict(model):
    """An OrderedDict {key: host NumPy array} with torch's keys and layouts (module docstring)."""
    slots = _layout(model)
    be = model.backend
    hosts = {}  # one device-to-host transfer per buffer, not one per array
    out = collections.OrderedDict()
    for slot in slots:
        host = hosts.get(id(slot.buffer))
        if host is None:
            host = hosts[id(slot.buffer)] = np.asarray(be.to_host(slot.buffer))
        out[slot.key] = host[slot.offset:slot.offset + size_of(slot.shape)].reshape(slot.shape).copy()
    return out


def _to_host(value, name):
    """A host NumPy array of a NumPy/CuPy array, an ``__array__`` object or a torch tensor (through
    ``.detach().cpu().numpy()``, so that torch is not imported and tensors that require grad work)."""
    if not isinstance(value, np.ndarray) and all(hasattr(value, a) for a in ("detach", "cpu", "numpy")):
        t = value.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":  # NumPy has no bfloat16
            t = t.float()
        value = t.numpy()
    if getattr(value, "dtype", None) is not None and str(value.dtype) == "bfloat16":
        value = np.asarray(value).astype(np.float32)  # ml_dtypes' bfloat16 (a BF16 safetensors
        # tensor): exact in float32, which the model's dtype takes from here
    return host_array(value, name)


def _check_strict(strict):
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"strict: expected True or False, got {strict!r}")
    return bool(strict)


def load_state_dict(model, sd, strict=True, what="state_dict"):
    """Copy ``sd`` ({key: array}, e.g. a torch module's ``state_dict()``) into the model's buffers.

    Every key, shape and dtype is checked before anything is written: on any error the model is
    unchanged. Floating values of any float dtype are cast to the model's dtype (as torch's
    ``copy_``); ``num_batches_tracked`` takes integers. ``strict=True``: missing or unexpected keys
    are a ValueError; ``strict=False`` loads the keys that match. A shape or dtype mismatch is an
    error either way, as in torch. Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
    ``what`` names the source in errors (a file path for ``load_safetensors``).
    """
    strict = _check_strict(strict)
    if not isinstance(sd, collections.abc.Mapping):
        raise TypeError(f"{what}: expected a dict {{key: array}} like model.state_dict() returns, got "
                        f"{type(sd).__name__}")
    slots = _layout(model)
    expected = {slot.key for slot in slots}
    missing = [slot.key for slot in slots if slot.key not in sd]
    unexpected = [key for key in sd if key not in expected]
    if strict and (missing or unexpected):
        hint = ""
        if missing and unexpected:
            hint = ("; a torch.nn.Sequential with parameterless modules (ReLU, ...) between the "
                    "layers numbers them differently: renumber_state_dict(sd, model) maps its "
                    "positions to the model's")
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {unexpected} (expected "
                         f"the keys of model.state_dict(){hint})")
    staged = []
    for slot in slots:
        if slot.key not in sd:
            continue
        name = f"{what}[{slot.key!r}]"
        h = _to_host(sd[slot.key], name)
        if h.shape != slot.shape:
            raise ValueError(f"{name}: expected shape {slot.shape}, got {describe(h)}")
        dt = slot.buffer.dtype
        if np.issubdtype(dt, np.floating) and not np.issubdtype(h.dtype, np.floating):
            raise TypeError(f"{name}: expected floating-point values (cast to the model's {dt}), "
                            f"got {describe(h)}")
        if np.issubdtype(dt, np.integer) and (h.dtype == bool or not np.issubdtype(h.dtype, np.integer)):
            raise TypeError(f"{name}: expected an integer count ({dt}), got {describe(h)}")
        staged.append((slot, check_finite(h, name)))
    _write(model.backend, staged)
    return IncompatibleKeys(missing, unexpected)


def _write(be, staged):
    """Write the checked arrays: per buffer one host copy, filled, and one transfer back."""
    hosts = {}
    for slot, h in staged:
        entry = hosts.get(id(slot.buffer))
        if entry is None:
            entry = hosts[id(slot.buffer)] = (slot.buffer, np.array(be.to_host(slot.buffer)))
        entry[1][slot.offset:slot.offset + size_of(slot.shape)] = h.ravel()
    for buf, host in hosts.values():
        buf[...] = be.to_device(host, buf.dtype)  # in place: the layers hold views of it


def _entries(target, name):
    """[(key, shape or None)] of ``target``: a gpubackprop model, anything with a ``state_dict()``
    method (a torch module), or a mapping {key: array}."""
    from gpubackprop.layers.model import Model  # here: the model module imports this one

    if isinstance(target, Model):
        return [(slot.key, slot.shape) for slot in _layout(target)]
    if not isinstance(target, collections.abc.Mapping) and callable(getattr(target, "state_dict", None)):
        target = target.state_dict()
    if not isinstance(target, collections.abc.Mapping):
        raise TypeError(f"{name}: expected a model, a torch module or a dict {{key: array}}, got "
                        f"{type(target).__name__}")
    return [(key, _shape(value)) for key, value in target.items()]


def _shape(value):
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(n) for n in shape)


def _split(key):
    """("3.1", "weight") for "3.1.weight": the module's position and the tensor's name."""
    prefix, _, name = str(key).rpartition(".")
    return prefix, name


def renumber_state_dict(sd, target):
    """``sd``'s values under ``target``'s keys, paired in order: for loading a ``torch.nn.Sequential``
    whose parameterless modules (ReLU, Flatten, Dropout) shift the positions (module docstring).

    ``target`` is a gpubackprop model (torch -> gpubackprop), a torch module or its state dict
    (gpubackprop -> torch). Both must have the same layers with parameters in the same order: the
    i-th entries must have the same name ("weight", "running_mean", ...) and, where both have one,
    the same shape, and one module's entries must all go to one module; else a ValueError names
    both keys.
    """
    if not isinstance(sd, collections.abc.Mapping):
        raise TypeError(f"sd: expected a dict {{key: array}} (a state dict), got {type(sd).__name__}")
    source = [(key, _shape(value)) for key, value in sd.items()]
    dest = _entries(target, "target")
    modules, reverse = {}, {}
    for i, ((key, shape), (tkey, tshape)) in enumerate(zip(source, dest, strict=False)):
        (prefix, name), (tprefix, tname) = _split(key), _split(tkey)
        problem = None
        if name != tname:
            problem = "the names differ"
        elif shape is not None and tshape is not None and shape != tshape:
            problem = f"the shapes differ: {shape} vs {tshape}"
        elif modules.setdefault(prefix, tprefix) != tprefix:
            problem = f"module {prefix!r}'s entries would go to both {modules[prefix]!r} and {tprefix!r}"
        elif reverse.setdefault(tprefix, prefix) != prefix:
            problem = f"modules {reverse[tprefix]!r} and {prefix!r} would both go to {tprefix!r}"
        if problem is not None:
            raise ValueError(f"sd: entry {i}, {key!r}, does not line up with the target's {tkey!r} "
                             f"({problem}); entries are paired in order, so both models need the "
                             f"same layers with parameters, in the same order")
    if len(source) != len(dest):
        longer, what = (source, "sd") if len(source) > len(dest) else (dest, "the target")
        extra = [key for key, _ in longer[min(len(source), len(dest)):]]
        raise ValueError(f"sd: {len(source)} entries, the target {len(dest)}; {what} has more: "
                         f"{extra}")
    return collections.OrderedDict((tkey, sd[key]) for (key, _), (tkey, _) in zip(source, dest, strict=True))


# ---- safetensors files ---------------------------------------------------------------------------
def save_safetensors(model, path):
    """Write ``state_dict(model)`` to ``path`` as a safetensors file (no pickle), atomically."""
    from safetensors.numpy import save

    from gpubackprop.checkpoint import atomic_write

    # "pt": the layouts are PyTorch's, so torch-side loaders (transformers) take the file as is.
    data = save(dict(state_dict(model)), metadata={"format": "pt"})
    atomic_write(path, lambda f: f.write(data))


def load_safetensors(model, path, strict=True):
    """Load a safetensors file (``save_safetensors``'s, or one written from a torch state dict)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from gpubackprop.precision import bfloat16_type

    bfloat16_type()  # ml_dtypes registers "bfloat16" with NumPy: BF16 tensors (torch's) then load
    path = os.fspath(path)
    try:
        sd = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"path: expected a safetensors file, {path!r} is not one ({e})") from None
    except TypeError as e:  # a dtype NumPy lacks even with ml_dtypes
        raise ValueError(f"path: {path!r} holds a dtype NumPy cannot read ({e}); convert it to "
                         f"float32 first") from None
    return load_state_dict(model, sd, strict, what=path)
