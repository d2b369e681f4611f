"""A small CNN on scikit-learn's digits (1x8x8 images), on the demo's seeded 80/20 split.

    python examples/cnn_digits.py            # CPU or GPU (device auto); --device cpu to force

The model is written as a spec (the command line's --model syntax), parsed by
gpubackprop.modelspec into Conv2d, BatchNorm2d, MaxPool2d, Flatten, Dropout and Dense layers; each
activation token fuses into the conv layer before it. Adam with a cosine learning-rate schedule,
15 epochs of batch 32, seeded: the same run gives the same accuracy on the CPU.
The same training from the command line:

    gpubackprop train --dataset digits --model "<SPEC below>" --epochs 15 --batch-size 32 \
        --lr 0.003 --schedule cosine

(its split is gpubackprop.datasets' seeded 80/20 split rather than the demo's stratified one).
"""

import argparse
import time

import gpubackprop as gb
from gpubackprop.demo import load_digits_split
from gpubackprop.modelspec import build_model
from gpubackprop.schedules import make_schedule

SPEC = ("conv(32,3,pad=1)-relu-bn-conv(32,3,pad=1)-relu-bn-maxpool(2)-conv(64,3,pad=1)-relu-bn-"
        "maxpool(2)-flatten-dropout(0.3)-dense(10)")


def main(device="auto", kernels="fused", epochs=15, seed=0, spec=SPEC, lr=0.003, batch_size=32,
         precision="fp32"):
    X_train, X_test, y_train, y_test = load_digits_split(seed)
    X_train = X_train.reshape(-1, 1, 8, 8)  # rows of 64 pixels back to images
    X_test = X_test.reshape(-1, 1, 8, 8)
    model, plan = build_model(spec, (1, 8, 8), 10, device=device, seed=seed, kernels=kernels,
                              precision=precision)
    loss = gb.SoftmaxCrossEntropy()
    opt = gb.Adam(lr=lr)
    schedule = make_schedule("cosine", lr, -(-len(X_train) // batch_size), epochs)
    print(plan.summary())
    start = time.perf_counter()
    gb.fit(model, loss, opt, X_train, y_train, epochs=epochs, batch_size=batch_size,
           progress=False, schedule=schedule)
    seconds = time.perf_counter() - start
    metrics = gb.evaluate(model, loss, X_test, y_test)
    print(f"digits CNN: {len(X_train)} train / {len(X_test)} test, {model.n_params:,} parameters, "
          f"{epochs} epochs in {seconds:.1f} s on {model.device} ({model.backend.ops.name} "
          f"kernels)")
    print(f"test accuracy {metrics['accuracy']:.4f}  test loss {metrics['loss']:.4f}")
    return metrics, seconds


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kernels", default="fused", choices=("fused", "reference"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", default=SPEC)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="bf16/fp16: mixed precision (on the CPU an emulation, not a speed-up)")
    a = p.parse_args()
    main(a.device, a.kernels, a.epochs, a.seed, a.spec, a.lr, a.batch_size, a.precision)
