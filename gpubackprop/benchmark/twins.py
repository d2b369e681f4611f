"""A plan's network in torch.nn: one builder for every benchmarked network (conv, BatchNorm,
residual blocks, pooling, recurrent layers, transformer encoder layers (a run of equal ones as one
nn.TransformerEncoder), dense), and gpubackprop's weights loaded into it, so
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
    for i, (kind, kw, ins, _, _) in enumerate(entries):
        if kind == "TransformerEncoderLayer":
            if i > 0 and entries[i - 1][0] == kind and entries[i - 1][1] == kw:
                continue  # a run of equal encoder layers is one nn.TransformerEncoder
            n = 1
            while i + n < len(entries) and entries[i + n][:2] == (kind, kw):
                n += 1
            mods.append(_encoder(nn, kw, n))
        elif kind == "Conv2d":
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
        if kw.get("activation", "identity") != "identity" and kind not in (
                "Activation", "TransformerEncoderLayer"):  # the encoder's activation is inside it
            mods.append(_activation(nn, kw["activation"]))
    return mods


_CLASSES = {}


def _encoder(nn, kw, num_layers):
    """nn.TransformerEncoder of ``num_layers`` copies of the encoder layer ``kw`` describes (batch
    first), with its src_mask/is_causal passed at every call."""
    if kw.get("src_mask") is not None:
        raise ValueError("torch_twin: an encoder with src_mask has no twin here (is_causal has)")
    layer = nn.TransformerEncoderLayer(kw["d_model"], kw["nhead"], kw.get("dim_feedforward", 2048),
                                       kw.get("dropout", 0.1), kw.get("activation", "relu"),
                                       layer_norm_eps=kw.get("layer_norm_eps", 1e-5),
                                       batch_first=True, norm_first=kw.get("norm_first", False))
    if "Encoder" not in _CLASSES:
        class TorchEncoder(nn.TransformerEncoder):
            def forward(self, x):
                if not self.causal:
                    return super().forward(x)
                T = x.shape[1]
                mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device,
                                                                      dtype=x.dtype)
                return super().forward(x, mask=mask, is_causal=True)
        _CLASSES["Encoder"] = TorchEncoder
    enc = _CLASSES["Encoder"](layer, num_layers, enable_nested_tensor=False)
    enc.causal = bool(kw.get("is_causal", False))
    return enc


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
