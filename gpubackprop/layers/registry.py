"""The one registry of layer types: each layer module declares its classes here, once.

``register(cls, *tokens)`` records a layer class under its type name (``cls.type_name``, by default
the class name) and the model-spec tokens that make it. Everything that needs the list of layers is
derived from it: checkpoints (``describe``/``rebuild``: ``{"type": name, **layer.config()}`` and
back through ``cls.from_config``), the ``gpubackprop.*`` exports (``LAYER_TYPES``), the spec parser
(``gpubackprop.modelspec``: parse, ``token.make(ctx)`` -> constructor arguments, then
``layer.build(shape)``) and the command line's ``--model`` help (``token.help``).

A new layer is one module (the class, its ``config()``, a ``register`` call) plus its kernels, and
the module's import in ``gpubackprop/layers/__init__.py``.
"""

LAYER_TYPES = {}  # type name -> class, in registration order
SPEC_TOKENS = {}  # model-spec token name -> SpecToken, in registration order

REQUIRED = object()  # marks a token argument that must be given


class DescriptionError(ValueError):
    """A layer description (a checkpoint's architecture) that names no layer or does not fit it."""


class SpecToken:
    """How a model-spec token reads and what it makes.

    ``args``: {name: (kind, default)} in order, ``REQUIRED`` for a must-give (kinds: "int", "pair"
    (an int or HxW), "pair0" (the same, >= 0), "eps" (a float > 0), "unit" (a float in [0, 1]),
    "prob" (a float in [0, 1)), "bool", "init"); ``positional``: the names that may be given without
    ``name=``. ``make(ctx)`` returns [(type name, constructor kwargs)] for the token's parameters
    ``ctx.params`` and input shape ``ctx.shape`` (e.g. a Flatten and a Dense for ``dense`` on an
    image); ``needs``: "image" or "sequence" when the token's arguments are read off such an input.
    ``fuses_activation``: an activation token right after this one becomes its ``activation=``.
    ``block``: the token takes a chain in parentheses (``res(...)``), planned by ``ctx.inner()``.
    ``activation``: the token is that activation (fused into the layer before, else a layer).
    ``help``: the usage line of ``--model``'s help; ``example``: shown when an argument is missing.
    """

    def __init__(self, name, make, args=None, positional=(), needs=None, fuses_activation=False,
                 block=False, activation=None, help="", example=None):
        self.name, self.make, self.needs, self.activation = name, make, needs, activation
        self.args = dict(args or {})
        self.positional = tuple(positional)
        self.fuses_activation, self.block = fuses_activation, block
        self.help, self.example = help, example

    @property
    def defaults(self):
        return {k: default for k, (_, default) in self.args.items()}

    def __repr__(self):
        return f"SpecToken({self.name!r})"


def plain(value):
    """3 for 3 or (3, 3), (3, 5) for (3, 5): a token's int-or-HxW argument as a constructor takes it."""
    pair = value if isinstance(value, tuple) else (value, value)
    return pair[0] if pair[0] == pair[1] else tuple(pair)


def register(cls, *tokens):
    """Record ``cls`` (a Layer subclass) and its spec tokens; returns ``cls``."""
    name = getattr(cls, "type_name", None) or cls.__name__
    if LAYER_TYPES.get(name, cls) is not cls:
        raise ValueError(f"layer type {name!r} registered twice ({LAYER_TYPES[name]} and {cls})")
    LAYER_TYPES[name] = cls
    for tok in tokens:
        if tok.name in SPEC_TOKENS:
            raise ValueError(f"spec token {tok.name!r} registered twice")
        SPEC_TOKENS[tok.name] = tok
    return cls


def type_name(layer):
    """The registered type name of ``layer``'s class; TypeError for an unregistered class."""
    name = getattr(type(layer), "type_name", None) or type(layer).__name__
    if LAYER_TYPES.get(name) is not type(layer):
        raise TypeError(f"layer: expected one of the layers in gpubackprop.layers.LAYER_TYPES "
                        f"({', '.join(LAYER_TYPES)}), got {type(layer).__name__}")
    return name


def describe(layer):
    """A JSON-able description of a layer (tree): {"type": type name, **layer.config()}."""
    return {"type": type_name(layer), **layer.config()}


def rebuild(desc):
    """The layer (tree) ``describe`` gave ``desc`` for; ``DescriptionError`` if it cannot be made."""
    kind = desc.get("type") if isinstance(desc, dict) else None
    cls = LAYER_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DescriptionError(f"architecture: unknown layer description {desc!r}")
    try:
        return cls.from_config({k: v for k, v in desc.items() if k != "type"})
    except DescriptionError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise DescriptionError(f"architecture: bad layer description {desc!r} "
                               f"({type(e).__name__}: {e})") from None
