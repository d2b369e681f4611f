"""A plan's network in torch.nn: one builder for every benchmarked network (conv, BatchNorm,
residual blocks, pooling, recurrent layers, dense), and gpubackprop's weights loaded into it, so
that both libraries time the same network from the same starting point.

Module positions follow torch's habit (a fused activation is its own module after the layer), so
the keys differ from gpubackprop's; ``load_weights`` pairs them with ``renumber_state_dict``, which
checks every name and shape.
"""

from gpubackprop.benchmark import contenders


def torch_twin(p):
    """The plan as a torch.nn.Sequential with the same layers, parameters and buffers."""
    nn = contenders.torch_module().nn
    return nn.Sequential(*_modules(nn, p.entries))


def _activation(nn, name):
    return {"identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
            "leaky_relu": nn.LeakyReLU,  # both default to a slope of 0.01
            # gpubackprop's gelu is the exact (erf) GELU, gelu_tanh the tanh approximation
            "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}[name]()


def _modules(nn, entries):
    mods = []
    for kind, kw, ins, _, _ in entries:
        if kind == "Conv2d":
            mods.append(nn.Conv2d(kw["in_channels"], kw["out_channels"], kw["kernel_size"],
                                  stride=kw["stride"], padding=kw["padding"],
                                  dilation=kw["dilation"], groups=kw["groups"], bias=kw["bias"]))
        elif kind == "Dense":
            mods.append(nn.Linear(kw["n_in"], kw["n_out"]))
        elif kind in ("BatchNorm1d", "BatchNorm2d"):
            mods.append(getattr(nn, kind)(kw["num_features"], eps=kw["eps"],
                                          momentum=kw["momentum"]))
        elif kind == "LayerNorm":
            mods.append(nn.LayerNorm(kw["normalized_shape"], eps=kw["eps"]))
        elif kind == "Activation":
            mods.append(_activation(nn, kw["activation"]))
        elif kind == "Residual":
            mods.append(_residual_class(nn)(*_modules(nn, kw["block"])))
        elif kind == "MaxPool2d":
            mods.append(nn.MaxPool2d(kw["kernel_size"], kw["stride"], kw["padding"],
                                     kw["dilation"]))
        elif kind == "AvgPool2d":
            mods.append(nn.AvgPool2d(kw["kernel_size"], kw["stride"], kw["padding"],
                                     count_include_pad=kw["count_include_pad"]))
        elif kind == "GlobalAvgPool2d":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif kind == "Flatten":
            mods.append(nn.Flatten())
        elif kind == "Reshape":
            mods.append(nn.Unflatten(1, tuple(kw["shape"])) if len(ins) == 1 else
                        nn.Sequential(nn.Flatten(), nn.Unflatten(1, tuple(kw["shape"]))))
        elif kind == "Dropout":
            mods.append(nn.Dropout(kw["p"]))
        elif kind in ("RNN", "LSTM", "GRU"):
            extra = {"nonlinearity": kw["nonlinearity"]} if kind == "RNN" else {}
            mods.append(_outputs_class(nn, kind)(kw["input_size"], kw["hidden_size"],
                                                 kw["num_layers"], batch_first=True, **extra))
        elif kind == "LastStep":
            mods.append(_last_step_class(nn)())
        else:
            raise ValueError(f"torch_twin: no torch counterpart for {kind} here")
        if kw.get("activation", "identity") != "identity" and kind != "Activation":
            mods.append(_activation(nn, kw["activation"]))
    return mods


_CLASSES = {}


def _residual_class(nn):
    """Y = X + block(X), the block's modules numbered as in a Sequential (keys "3.0.weight")."""
    if "Residual" not in _CLASSES:
        class TorchResidual(nn.Sequential):
            def forward(self, x):
                return x + super().forward(x)
        _CLASSES["Residual"] = TorchResidual
    return _CLASSES["Residual"]


def _outputs_class(nn, kind):
    """nn.LSTM/GRU/RNN returning only the top layer's outputs (N, T, H), as gpubackprop's layer."""
    if kind not in _CLASSES:
        base = getattr(nn, kind)
        _CLASSES[kind] = type(f"Torch{kind}Outputs", (base,),
                              {"forward": lambda self, x: base.forward(self, x)[0]})
    return _CLASSES[kind]


def _last_step_class(nn):
    if "LastStep" not in _CLASSES:
        class TorchLastStep(nn.Module):
            def forward(self, x):
                return x[:, -1]
        _CLASSES["LastStep"] = TorchLastStep
    return _CLASSES["LastStep"]


def load_weights(net, model):
    """Copy a gpubackprop model's parameters and buffers into its torch twin ``net`` (in place)."""
    from gpubackprop.state_dict import renumber_state_dict

    torch = contenders.torch_module()
    sd = renumber_state_dict(model.state_dict(), net)
    dtype = next(net.parameters()).dtype
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    net.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()})
    return net
