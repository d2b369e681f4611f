"""Model descriptions: a compact text spec parsed into layers, and the named presets.

A spec is a chain of tokens joined by ``-``; each token is a layer name with optional arguments
in parentheses (positional first, then ``name=value``)::

    conv(32,3,pad=1)-relu-maxpool(2)-conv(64,3,pad=1)-relu-maxpool(2)-flatten-dense(128)-relu-dense(10)

Tokens (sizes of the input are inferred from the data's per-sample shape):

    conv(out, k, stride=1, pad=0, dil=1, groups=1, bias=true, init=)   Conv2d; k/stride/pad/dil take
                                                    an int or HxW (e.g. 3x5)
    maxpool(k, stride=k, pad=0, dil=1)              MaxPool2d
    avgpool(k, stride=k, pad=0, count_include_pad=true)   AvgPool2d
    gap                                             GlobalAvgPool2d: (C, H, W) -> (C,)
    flatten                                         Flatten: (C, H, W) -> (C·H·W,)
    dense(n, init=)                                 Dense; a Flatten is put in front of it when its
                                                    input is an image
    bn(eps=1e-5, momentum=0.1)                      BatchNorm2d on images, BatchNorm1d on vectors
    ln(eps=1e-5)                                    LayerNorm over the whole sample
    dropout(p=0.5)                                  Dropout
    lstm(h, layers=1, bidir=false, dropout=0) | gru(...) | rnn(..., relu=false)
                                                    LSTM / GRU / RNN over (T, F) sequences ->
                                                    (T, h); a one-channel image (1, H, W) is read
                                                    as H rows of W features (a Reshape in front)
    last                                            LastStep: (T, h) -> (h,), the last time step
    transformer(heads, ff=2048, layers=1, dropout=0.1, gelu=false, prenorm=false, causal=false)
                                                    TransformerEncoderLayers over (T, d_model)
                                                    sequences (d_model: the features)
    posemb(max_len=T)                               PositionalEmbedding: a learned (max_len, F)
                                                    table added to (T, F) sequences, T <= max_len
    res(SPEC)                                       Residual: Y = X + SPEC(X), SPEC maps a shape
                                                    to itself, e.g.
                                                    res(conv(16,3,pad=1)-bn-relu-conv(16,3,pad=1)-bn)
    identity | sigmoid | tanh | relu | leaky_relu | gelu | gelu_tanh
                                                    right after conv, dense or bn: that layer's
                                                    fused activation=; elsewhere an Activation layer

``classes`` stands for the number of classes wherever an integer goes (``dense(classes)``).
Presets by name: ``mlp`` (hidden dense layers from ``hidden``/``activation``/``init``, the
command line's --layers/--activation/--init), ``lenet5`` and ``resnet`` (see ``preset_spec``).

Every problem raises ``SpecError`` (a ``ValueError``) naming the token, its number in the chain
and the character position where it starts, e.g.
``model: token 3 'maxpool(x)' at character 17: k: expected an integer or HxW, got 'x'``.
"""

import os
import re

from gpubackprop.kernels.reference import ACTIVATIONS  # noqa: F401 (modelspec.ACTIVATIONS, as before)
from gpubackprop.layers import LAYER_TYPES, SPEC_TOKENS
from gpubackprop.layers.registry import REQUIRED

PRESETS = ("mlp", "lenet5", "resnet", "lstm")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PAIR = re.compile(r"^(\d+)x(\d+)$")

# Every token comes from the layer registry (each layer module declares its own): the names, the
# arguments with their kinds and defaults, and what each makes (gpubackprop.layers.registry).


def layer_tokens():
    """{name: (positional names, {argument: default})} of the layer tokens (not res, activations)."""
    return {name: (tok.positional, tok.defaults) for name, tok in SPEC_TOKENS.items()
            if not tok.block and tok.activation is None}


def token_names():
    """Every name a token may have, as errors list them: the layers, then res, the activations."""
    return (*layer_tokens(), *(n for n, t in SPEC_TOKENS.items() if t.block),
            *(n for n, t in SPEC_TOKENS.items() if t.activation is not None))


# As the package's own layers registered them (a layer registered later is in the functions').
LAYER_TOKENS = layer_tokens()
TOKEN_NAMES = token_names()
INITS = ("he", "xavier", "lecun", "normal")


class SpecError(ValueError):
    """A model spec that does not parse or does not fit the data; the message says where."""


class Token:
    """One parsed token: ``name``, ``args`` (list of (keyword or None, text, char)), ``inner``
    (the parsed chain inside ``res(...)``), its 1-based number ``index`` in its chain and the
    1-based character position ``char`` in the whole spec."""

    def __init__(self, name, text, index, char, args=(), inner=None):
        self.name, self.text, self.index, self.char = name, text, index, char
        self.args, self.inner = list(args), inner
        self.params = {}  # filled by _read_params

    def __repr__(self):
        return f"Token({self.text!r}, index={self.index}, char={self.char})"

    def error(self, message):
        return SpecError(f"model: token {self.index} {self.text!r} at character {self.char}: "
                         f"{message}")


# ---- parsing ----------------------------------------------------------------------------------
def parse(text):
    """The tokens of a spec (presets are not expanded here); ``SpecError`` if it does not parse."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"model: expected a spec like 'conv(8,3)-relu-flatten-dense(10)' or a "
                        f"preset ({', '.join(PRESETS)}), got {text!r}")
    tokens = _parse_chain(text, 0, len(text))
    for t in tokens:
        _read_params(t)
    return tokens


def _parse_chain(text, start, end):
    tokens = []
    i = start
    while True:
        while i < end and text[i].isspace():
            i += 1
        index = len(tokens) + 1
        m = _NAME.match(text, i, end)
        if m is None:
            bad = text[i:end].split("-")[0].strip() or text[i:i + 1]
            what = f"{bad!r}" if i < end else "the end of the spec"
            raise SpecError(f"model: token {index} at character {i + 1}: expected a layer name "
                            f"({', '.join(token_names())}), got {what}")
        name_start, i = i, m.end()
        name = m.group().lower()
        args, inner = [], None
        if i < end and text[i] == "(":
            close = _matching(text, i, end, index, name_start)
            token_text = text[name_start:close + 1]
            if name == "res":
                inner_tokens = _parse_chain(text, i + 1, close)
                for t in inner_tokens:
                    _read_params(t)
                inner = inner_tokens
            else:
                args = _split_args(text, i + 1, close, index, token_text, name_start)
            i = close + 1
        else:
            token_text = text[name_start:i]
        tok = Token(name, token_text, index, name_start + 1, args, inner)
        if name == "res" and inner is None:
            raise tok.error("expected a block in parentheses, e.g. res(conv(16,3,pad=1)-bn)")
        names = token_names()
        if name not in names:
            # The name sharing the longest prefix ("relux": relu, not res).
            near = sorted((n for n in names if n[:2] == name[:2]),
                          key=lambda n: -len(os.path.commonprefix([n, name])))
            raise tok.error(f"unknown layer {name!r}; expected one of {', '.join(names)}"
                            + (f" (did you mean {near[0]}?)" if near else ""))
        tokens.append(tok)
        while i < end and text[i].isspace():
            i += 1
        if i >= end:
            return tokens
        if text[i] != "-":
            raise tok.error(f"expected '-' between tokens, got {text[i:i + 1]!r} at character "
                            f"{i + 1}")
        i += 1


def _matching(text, open_at, end, index, name_start):
    depth = 0
    for j in range(open_at, end):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    raise SpecError(f"model: token {index} {text[name_start:end]!r} at character "
                    f"{name_start + 1}: expected ')' to close the '(' at character {open_at + 1}")


def _split_args(text, start, end, index, token_text, name_start):
    parts, j0 = [], start
    for j in range(start, end + 1):
        if j == end or text[j] == ",":
            raw = text[j0:j]
            stripped = raw.strip()
            at = j0 + (len(raw) - len(raw.lstrip())) + 1
            if not stripped:
                if j == end and not parts and j0 == start:
                    break  # "name()"
                raise SpecError(f"model: token {index} {token_text!r} at character "
                                f"{name_start + 1}: empty argument at character {at}")
            key, eq, value = stripped.partition("=")
            if eq:
                parts.append((key.strip().lower(), value.strip(), at))
            else:
                parts.append((None, stripped, at))
            j0 = j + 1
    return parts


def _read_params(tok):
    """Fill ``tok.params`` from its arguments: positional, then keywords; values converted."""
    spec = SPEC_TOKENS[tok.name]
    if spec.activation is not None or spec.block:
        if tok.args:
            raise tok.error(f"{tok.name} takes no arguments")
        return
    positional, defaults = spec.positional, spec.defaults
    params = dict(defaults)
    given = set()
    seen_keyword = False
    for n, (key, value, _at) in enumerate(tok.args):
        if key is None:
            if seen_keyword:
                raise tok.error(f"positional argument {value!r} after a keyword argument")
            if n >= len(positional):
                raise tok.error(f"expected at most {len(positional)} positional argument"
                                f"{'s' if len(positional) != 1 else ''}"
                                + (f" ({', '.join(positional)})" if positional else "")
                                + f", got {len(tok.args)}")
            key = positional[n]
        else:
            seen_keyword = True
            if key not in defaults:
                raise tok.error(f"unknown argument {key!r}; {tok.name} takes "
                                f"{', '.join(defaults) or 'no arguments'}")
        if key in given:
            raise tok.error(f"argument {key!r} given twice")
        given.add(key)
        params[key] = _convert(tok, key, spec.args[key][0], value)
    missing = [k for k, v in params.items() if v is REQUIRED]
    if missing:
        raise tok.error(f"missing argument {missing[0]!r}; e.g. {spec.example}")
    tok.params = params


_FLOATS = {"eps": "a number > 0", "unit": "a number in [0, 1]", "prob": "a probability in [0, 1)"}


def _convert(tok, key, kind, value):
    low = value.lower()
    if kind in ("int", "pair", "pair0"):
        if low == "classes" and kind == "int":
            return "classes"
        m = _PAIR.match(low) if kind != "int" else None
        if m:
            v = (int(m.group(1)), int(m.group(2)))
        elif low.isdigit():
            v = int(low)
        else:
            raise tok.error(f"{key}: expected {'an integer' if kind == 'int' else 'an integer or HxW'}"
                            f", got {value!r}")
        low_ok = 0 if kind == "pair0" else 1
        if min(v if isinstance(v, tuple) else (v,)) < low_ok:
            raise tok.error(f"{key}: expected {'>= 0' if low_ok == 0 else 'a positive value'}, "
                            f"got {value!r}")
        return v
    if kind in _FLOATS:
        try:
            v = float(value)
        except ValueError:
            raise tok.error(f"{key}: expected a number, got {value!r}") from None
        if not (v >= 0 and (v > 0 if kind == "eps" else v <= 1 if kind == "unit" else v < 1)):
            raise tok.error(f"{key}: expected {_FLOATS[kind]}, got {value!r}")
        return v
    if kind == "bool":
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise tok.error(f"{key}: expected true or false, got {value!r}")
    if low not in INITS:
        raise tok.error(f"{key}: expected one of {', '.join(INITS)}, got {value!r}")
    return low


# ---- presets ----------------------------------------------------------------------------------
def preset_spec(name, input_shape, hidden=(128, 64), activation="relu", init=None):
    """The spec text a preset stands for, for this per-sample input shape.

    mlp:    [flatten-] dense(h1)-ACT-dense(h2)-ACT-...-dense(classes)   (hidden, activation, init)
    lenet5: conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-dense(120)-relu-
            dense(84)-relu-dense(classes); on images smaller than 20x20 the second conv keeps its
            size (pad=2) and a pooling that would go below 1x1 is left out.
    resnet: conv(16,3,pad=1)-bn-relu-res(conv(16,3,pad=1)-bn-relu-conv(16,3,pad=1)-bn)-relu-
            conv(32,3,stride=2,pad=1)-bn-relu-res(...32 channels...)-relu-gap-dense(classes); the
            relus after a norm or a sum are Activation layers.
    lstm:   lstm(128)-last-dense(classes), for sequences (T, F) or one-channel images read row by
            row (the digits as 8 steps of 8 pixels).
    """
    shape = tuple(int(s) for s in input_shape)
    if name == "mlp":
        parts = ["flatten"] if len(shape) > 1 else []
        extra = f",init={init}" if init else ""
        for h in hidden:
            parts += [f"dense({h}{extra})", activation]
        parts.append(f"dense(classes{extra})")
        return "-".join(parts)
    if name == "lstm":  # sequences (T, F), or one-channel images read row by row
        return "lstm(128)-last-dense(classes)"
    if len(shape) != 3:
        raise SpecError(f"model: the {name} preset needs image data (channels, height, width), "
                        f"got samples of shape {_fmt(shape)}")
    _, H, W = shape
    if name == "lenet5":
        if min(H, W) < 2:
            raise SpecError(f"model: the lenet5 preset needs images of at least 2x2, got "
                            f"{_fmt(shape)}")
        h = min(H, W) // 2
        parts = ["conv(6,5,pad=2)", "relu", "maxpool(2)"]
        if h >= 10:
            parts += ["conv(16,5)", "relu"]
            h -= 4
        else:
            parts += ["conv(16,5,pad=2)", "relu"]
        if h >= 2:
            parts.append("maxpool(2)")
        parts += ["flatten", "dense(120)", "relu", "dense(84)", "relu", "dense(classes)"]
        return "-".join(parts)
    if name == "resnet":
        def cbr(conv):
            return f"{conv}-bn-relu"

        def block(c):
            return f"res({cbr(f'conv({c},3,pad=1)')}-conv({c},3,pad=1)-bn)-relu"
        down = "conv(32,3,stride=2,pad=1)" if min(H, W) >= 2 else "conv(32,3,pad=1)"
        return "-".join([cbr("conv(16,3,pad=1)"), block(16), cbr(down), block(32), "gap",
                         "dense(classes)"])
    raise SpecError(f"model: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")


def expand(spec, input_shape, hidden=(128, 64), activation="relu", init=None):
    """The spec with a preset name replaced by its text (any other spec unchanged)."""
    name = spec.strip().lower() if isinstance(spec, str) else spec
    if name in PRESETS:
        return preset_spec(name, input_shape, hidden, activation, init)
    return spec


# ---- shapes and layers ------------------------------------------------------------------------
def _fmt(shape):
    return "x".join(map(str, shape)) if len(shape) != 1 else f"{shape[0]} features"


class Plan:
    """A parsed and shape-checked model: ``entries`` of (kind, kwargs, in shape, out shape, token)
    ready to become layers (``layers()``), the ``spec`` it came from and the ``output_shape``."""

    def __init__(self, spec, entries, input_shape, layers):
        self.spec, self.entries, self.input_shape = spec, entries, tuple(input_shape)
        self._layers = layers  # built while planning: their shapes are the entries'

    @property
    def output_shape(self):
        return self.entries[-1][3] if self.entries else self.input_shape

    def __repr__(self):
        return f"Plan({self.spec!r}, {self.summary()})"

    def summary(self):
        """A line like ``1x8x8 -> Conv2d(1,8,3,relu) 8x8x8 -> ... -> Dense(64,10) 10``."""
        return " -> ".join([_fmt(self.input_shape)] + [_entry_text(e) for e in self.entries])

    def layers(self):
        """The layer objects (gpubackprop.Conv2d, Dense, ...) of this plan, freshly made."""
        from gpubackprop.layers import registry

        return [registry.rebuild(registry.describe(layer)) for layer in self._layers]


_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True,
             "activation": "identity", "count_include_pad": True, "eps": 1e-5, "momentum": 0.1}
_POSITIONAL = ("in_channels", "out_channels", "kernel_size", "n_in", "n_out", "normalized_shape",
               "num_features", "p")


def _entry_text(e):
    kind, kw, _, out, _ = e
    if kind == "Residual":
        inner = "; ".join(_entry_text(x) for x in kw["block"])
        return f"Residual[{inner}] {_fmt(out)}"
    pool = kind in ("MaxPool2d", "AvgPool2d")
    if pool and kw["stride"] == kw["kernel_size"]:
        kw = {k: v for k, v in kw.items() if k != "stride"}
    args = ",".join(str(v) if k in _POSITIONAL else f"{k}={v}" for k, v in kw.items()
                    if v is not None and not (k in _DEFAULTS and v == _DEFAULTS[k]
                                              and not (pool and k == "stride")))
    args = args.replace(" ", "")
    if kw.get("activation", "identity") != "identity":
        args = args.replace(f"activation={kw['activation']}", kw["activation"])
    return f"{kind}({args}) {_fmt(out)}"


def plan(spec, input_shape, n_classes, hidden=(128, 64), activation="relu", init=None):
    """Parse ``spec`` (or a preset name), infer every size from ``input_shape`` (one sample's shape:
    ``(features,)``, ``(time steps, features)`` or ``(channels, height, width)``) and check that
    it ends in ``n_classes`` outputs; returns a ``Plan``. ``SpecError`` names the offending token."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape) or len(shape) not in (1, 2, 3):
        raise SpecError(f"model: expected samples of shape (features,), (time steps, features) or "
                        f"(channels, height, width), got {shape}")
    text = expand(spec, shape, hidden, activation, init)
    tokens = parse(text)
    entries, layers, out = _plan_chain(tokens, shape, n_classes)
    if len(out) != 1:
        raise tokens[-1].error(f"the model's output is {_fmt(out)} per sample; end with "
                               f"flatten or gap and dense(classes)")
    if n_classes is not None and out[0] != n_classes:
        raise tokens[-1].error(f"the model ends with {out[0]} outputs but the data has "
                               f"{n_classes} classes; end with dense({n_classes}) or "
                               f"dense(classes)")
    return Plan(text, entries, shape, layers)


class _Context:
    """What a token's ``make`` sees: its parameters, the input shape, the class count, the activation
    fused into it, and how to raise an error that names the token."""

    fmt = staticmethod(_fmt)

    def __init__(self, tok, shape, n_classes, activation):
        self.tok, self.params, self.shape = tok, tok.params, shape
        self.n_classes, self.activation = n_classes, activation

    def error(self, message):
        return self.tok.error(message)

    def size(self, key):
        """The integer argument ``key``, ``classes`` read as the number of classes."""
        value = self.params[key]
        if value != "classes":
            return value
        if self.n_classes is None:
            raise self.error(f"{self.tok.name}(classes) needs the number of classes")
        return self.n_classes

    def inner(self):
        """The chain inside ``res(...)``, planned on this token's input shape."""
        entries, layers, out = _plan_chain(self.tok.inner, self.shape, self.n_classes)
        inner = Plan(self.tok.text, entries, self.shape, layers)
        assert inner.output_shape == out
        return inner


_NEEDS = {"image": (3, "image input (channels, height, width)"),
          "sequence": (2, "sequences (time steps, features)")}


def _plan_chain(tokens, shape, n_classes):
    """(entries, layers, output shape): each token's layers made and built in turn."""
    fused, prev = {}, None
    for t in tokens:  # an activation right after conv/dense is that layer's activation=
        act = SPEC_TOKENS[t.name].activation
        if act is not None and prev is not None and SPEC_TOKENS[prev.name].fuses_activation \
                and id(prev) not in fused:
            fused[id(prev)] = act
            fused[id(t)] = None  # consumed
        prev = t
    entries, layers = [], []
    for t in tokens:
        if fused.get(id(t), "") is None:
            continue
        spec = SPEC_TOKENS[t.name]
        if spec.needs is not None and len(shape) != _NEEDS[spec.needs][0]:
            raise t.error(f"needs {_NEEDS[spec.needs][1]}, got {_fmt(shape)}")
        made = spec.make(_Context(t, shape, n_classes, fused.get(id(t), "identity")))
        for n, item in enumerate(made):
            kind, kw = item[0], item[1]
            try:
                layer = item[2] if len(item) > 2 else \
                    LAYER_TYPES[kind](**{k: v for k, v in kw.items() if v is not None})
                out = tuple(layer.build(shape))
            except ValueError as e:  # the layer's own words, with where the token is
                raise t.error(str(e)) from None
            # The token's own layer is its last; those before it adapt the input (a Flatten).
            entries.append((kind, kw, shape, out, t if n == len(made) - 1 else None))
            layers.append(layer)
            shape = out
    return entries, layers, shape


def build_layers(spec, input_shape, n_classes, hidden=(128, 64), activation="relu", init=None):
    """(layers, plan): the layer objects of ``spec`` for this input shape and class count."""
    p = plan(spec, input_shape, n_classes, hidden, activation, init)
    return p.layers(), p


def build_model(spec, input_shape, n_classes, hidden=(128, 64), activation="relu", init=None,
                **model_options):
    """A ``gpubackprop.Sequential`` of ``spec``; ``model_options``: device, dtype, seed, kernels."""
    import gpubackprop as gb

    layers, p = build_layers(spec, input_shape, n_classes, hidden, activation, init)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) > 1:
        model_options.setdefault("input_shape", shape)
    return gb.Sequential(layers, **model_options), p
