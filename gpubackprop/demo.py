"""`make demo`: an MLP on scikit-learn's digits (8×8 images, 10 classes), 80/20 split, seeded."""

import time

import numpy as np

import gpubackprop as gb


def load_digits_split(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0  # pixels are 0..16
    return train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)


def main(device="auto", kernels="fused", epochs=30, seed=0):
    X_train, X_test, y_train, y_test = load_digits_split(seed)
    model = gb.Sequential([gb.Dense(64, 128, activation="relu"),
                           gb.Dense(128, 64, activation="relu"),
                           gb.Dense(64, 10)], device=device, seed=seed, kernels=kernels)
    loss = gb.SoftmaxCrossEntropy()
    opt = gb.Adam(lr=0.002)
    print(model)
    start = time.perf_counter()
    gb.fit(model, loss, opt, X_train, y_train, epochs=epochs, batch_size=32,
           validation=(X_test, y_test))
    seconds = time.perf_counter() - start
    metrics = gb.evaluate(model, loss, X_test, y_test)
    print(f"digits: {len(X_train)} train / {len(X_test)} test, {epochs} epochs in {seconds:.1f} s "
          f"on {model.device} ({model.backend.ops.name} kernels)")
    print(f"test accuracy {metrics['accuracy']:.4f}  test loss {metrics['loss']:.4f}")
    return metrics


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
