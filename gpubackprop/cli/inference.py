"""What evaluate and predict share: a checkpoint's model on the chosen device, its data set, and
data in the model's per-sample layout."""

import numpy as np

from gpubackprop.cli.options import check_checkpoint_file, resolve_device


def load_for_inference(args):
    from gpubackprop.checkpoint import load_checkpoint

    check_checkpoint_file(args.checkpoint)
    ckpt = load_checkpoint(args.checkpoint)
    device, _ = resolve_device(args.device)
    model = ckpt.build_model(device=device, kernels=args.kernels)
    return ckpt, model


def dataset_for(ckpt, spec, args):
    from gpubackprop.datasets import load_dataset

    cfg = ckpt.config
    spec = spec or cfg.get("dataset")
    if spec is None:
        raise ValueError("dataset: expected --dataset (the checkpoint does not name one)")
    scaling = ckpt.scaling
    # A CSV is read as in training (label column, header row) unless the command says otherwise.
    csv = spec.startswith("csv:")
    label_column = cfg.get("label_column") if csv else None
    header = args.header or (cfg.get("header", "auto") if csv else "auto")
    data = load_dataset(spec, val_split=cfg.get("val_split", 0.0),
                        test_split=cfg.get("test_split", 0.2), seed=cfg.get("seed", 0),
                        label_column=label_column, header=header,
                        scaling=scaling if scaling is not None else {"kind": "none"})
    return data


def model_input_shape(model):
    """One sample's shape as the model takes it: (features,) or (channels, height, width)."""
    shape = getattr(model, "input_shape", None)
    return tuple(shape) if shape else (int(model.n_in),)


def n_outputs(model):
    shape = getattr(model, "output_shape", None)
    return int(shape[-1]) if shape else int(model.n_out)


def fit_input(X, model, what, checkpoint):
    """X in the model's per-sample layout: images given as flat rows (or the other way round) are
    reshaped when the sizes agree; otherwise a ValueError naming both shapes."""
    shape = model_input_shape(model)
    if X.shape[1:] == shape:
        return X
    if int(np.prod(X.shape[1:])) == int(np.prod(shape)):
        return X.reshape((len(X), *shape))
    got = "x".join(map(str, X.shape[1:]))
    want = "x".join(map(str, shape))
    raise ValueError(f"{what}: has samples of shape {got} ({int(np.prod(X.shape[1:]))} "
                     f"features), the model in {checkpoint} expects {want} "
                     f"({int(np.prod(shape))} features)")

