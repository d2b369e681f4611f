"""A character-level transformer language model trained on the standard library's own source code.

    python examples/transformer_charlm.py            # CPU or GPU (device auto); --device cpu to force

Text every Python installation has: the ``*.py`` files directly under
``sysconfig.get_paths()["stdlib"]``, read in sorted order up to ``--budget`` bytes, one byte a
character (the vocabulary is the bytes that occur). The first 90% of the text trains, the last
10% validates (split by position, so validation is unseen files). The model reads ``--context``
characters and predicts, at every position, the next one:

    Embedding(V, 64) -> PositionalEmbedding(context, 64)
      -> 2 x TransformerEncoderLayer(64, 4 heads, feed-forward 256, gelu, pre-norm, causal)
      -> LayerNorm(64) -> Dense(64, V) at each position

One functional ``gb.Model`` with (context,) int64 inputs and (context, V) logits: ``gb.Dense``
maps the last axis, as torch's ``nn.Linear``, so the head is the same Dense at every position,
and ``gb.SoftmaxCrossEntropy`` takes the (B, context, V) logits with (B, context) targets, the mean
over every position (as a GPT is trained). Training is ``gb.fit``: the training text cut into
windows every ``--stride`` characters, shuffled each epoch, Adam with global-norm clipping and a
warm-up then cosine learning rate (``gpubackprop.schedules``), the validation windows evaluated
after each epoch.

Reported: validation bits per character (the mean cross-entropy / ln 2 over non-overlapping
windows of the validation text, every position of a window predicted from the ones before it in
the window) against the unigram baseline (the cross-entropy of the training text's character
frequencies, add-one smoothed, on the same validation characters), the next-character accuracy
over all validation positions, and a sampled continuation of a validation prompt. With the
defaults (seed 0, 2 epochs of 56,248 windows of 64 characters, 3,516 steps of 32) it reaches
2.134 validation bits/char against the unigram baseline's 4.571, next-character accuracy 0.605
(measured: 278.9 s of training with the two validation passes, on a loaded 2-core Intel Xeon VM,
one BLAS thread, fused CPU kernels; seed 1: 2.146 in 252.8 s); README.md, "A character-level
transformer", has the details.

BLAS runs on ``--blas-threads`` threads (default 1, as examples/lstm_digits.py: the GEMMs are
small, and on shared cores several BLAS threads wait on each other).
"""

import argparse
import math
import pathlib
import sysconfig
import time

import numpy as np

import gpubackprop as gb
from gpubackprop.backend import blas_threads
from gpubackprop.schedules import CosineLR, Warmup


# ---- data ---------------------------------------------------------------------------------------
def stdlib_text(budget=2_000_000):
    """The bytes of the standard library's top-level ``*.py`` files in sorted order, at most
    ``budget`` of them (the last file cut), and the number of files read."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        if size >= budget:
            break
        data = path.read_bytes()[:budget - size]
        parts.append(data)
        size += len(data)
    if not parts:
        raise RuntimeError(f"no *.py files found under {root}")
    return b"".join(parts), len(parts)


class CharData:
    """Text as ids over its own byte vocabulary, split by position into train and validation."""

    def __init__(self, text, val_fraction=0.1):
        raw = np.frombuffer(text, dtype=np.uint8)
        self.vocab = np.unique(raw)  # the bytes that occur, sorted
        lookup = np.zeros(256, np.int64)
        lookup[self.vocab] = np.arange(len(self.vocab))
        ids = lookup[raw]
        n_val = int(len(ids) * val_fraction)
        self.train, self.val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]

    @property
    def size(self):
        return len(self.vocab)

    def decode(self, ids):
        return bytes(self.vocab[np.asarray(ids)]).decode("utf-8", errors="replace")

    def train_windows(self, context, stride):
        """The training text as windows of ``context`` characters starting every ``stride``
        characters, and their next characters: inputs and targets, (W, context) each."""
        starts = np.arange(0, len(self.train) - context, stride)
        offsets = starts[:, None] + np.arange(context)
        return self.train[offsets], self.train[offsets + 1]

    def val_windows(self, context):
        """The validation text as non-overlapping windows: inputs and targets, (W, context) each."""
        n = (len(self.val) - 1) // context
        X = self.val[:n * context].reshape(n, context)
        Y = self.val[1:n * context + 1].reshape(n, context)
        return X, Y

    def unigram_bits(self, targets):
        """Bits per character of the training frequencies (add-one smoothed) on ``targets``."""
        counts = np.bincount(self.train, minlength=self.size) + 1.0
        return float(-np.log2(counts / counts.sum())[np.ravel(targets)].mean())


# ---- model --------------------------------------------------------------------------------------
def char_transformer(vocab, context, d_model=64, nhead=4, num_layers=2, dim_feedforward=256,
                     dropout=0.0, device="auto", kernels="fused", seed=0):
    """One functional gb.Model: (context,) int64 ids -> (context, vocab) logits, every position
    predicted from the ones before it (causal self-attention)."""
    x = gb.Input((context,), dtype="int64")
    h = gb.PositionalEmbedding(context, d_model)(gb.Embedding(vocab, d_model)(x))
    for _ in range(num_layers):
        h = gb.TransformerEncoderLayer(d_model, nhead, dim_feedforward=dim_feedforward,
                                       dropout=dropout, activation="gelu", norm_first=True,
                                       is_causal=True)(h)
    h = gb.LayerNorm(d_model)(h)  # pre-norm layers leave the residual stream unnormalised
    logits = gb.Dense(d_model, vocab)(h)  # on the last axis: the same head at every position
    return gb.Model(inputs=x, outputs=logits, device=device, kernels=kernels, seed=seed)


def bits_per_char(model, X, Y, batch_size=256):
    """Mean cross-entropy over every position of the windows X -> Y, in bits."""
    return gb.evaluate(model, gb.SoftmaxCrossEntropy(), X, Y, batch_size)["loss"] / math.log(2)


def sample(model, prompt, n, rng, temperature=0.8):
    """``n`` ids drawn one at a time after ``prompt`` (>= context ids), each from the softmax (at
    ``temperature``) of the last position's logits over the last ``context`` ids."""
    context = model.input_shape[0]
    ids = list(prompt)
    for _ in range(n):
        window = np.array(ids[-context:], np.int64)[None]
        z = model.predict(window)[0, -1].astype(np.float64) / temperature
        p = np.exp(z - z.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return ids[len(prompt):]


# ---- the run ------------------------------------------------------------------------------------
def main(device="auto", kernels="fused", epochs=2, stride=32, seed=0, budget=2_000_000, context=64,
         batch_size=32, d_model=64, nhead=4, num_layers=2, dim_feedforward=256, dropout=0.0,
         lr=3e-3, warmup=100, clip_norm=1.0, sample_chars=300, temperature=0.8, threads=1,
         quiet=False):
    """Train, evaluate and sample; returns {"val_bits", "val_accuracy", "unigram_bits", "seconds",
    "steps", "history", "n_params", "train_chars", "val_chars", "sample"}."""
    with blas_threads(threads):
        return _run(device, kernels, epochs, stride, seed, budget, context, batch_size, d_model,
                    nhead, num_layers, dim_feedforward, dropout, lr, warmup, clip_norm,
                    sample_chars, temperature, quiet)


def _run(device, kernels, epochs, stride, seed, budget, context, batch_size, d_model, nhead,
         num_layers, dim_feedforward, dropout, lr, warmup, clip_norm, sample_chars, temperature,
         quiet):
    say = print if not quiet else (lambda *a, **k: None)
    if stride < 1:
        raise ValueError(f"stride: expected an integer >= 1, got {stride}")
    text, n_files = stdlib_text(budget)
    data = CharData(text)
    if len(data.val) < context + 2 or len(data.train) < context + 2:
        raise ValueError(f"budget: {budget} bytes give too little text for context {context}")
    model = char_transformer(data.size, context, d_model, nhead, num_layers, dim_feedforward,
                             dropout, device, kernels, seed)
    X, Y = data.train_windows(context, stride)
    X_val, Y_val = data.val_windows(context)
    unigram = data.unigram_bits(Y_val)
    say(f"{n_files} stdlib files, {len(text):,} bytes: {len(data.train):,} train characters "
        f"({len(X):,} windows of {context}, every {stride}) / {len(data.val):,} validation, "
        f"vocabulary {data.size}; {model.n_params:,} parameters on {model.device} "
        f"({model.backend.ops.name} kernels)")
    say(f"unigram baseline on validation: {unigram:.3f} bits/char")
    steps = epochs * -(-len(X) // batch_size)
    warm = min(warmup, max(steps - 1, 0))
    schedule = Warmup(CosineLR(lr, max(steps - warm, 1), min_lr=lr / 10), warm) if warm \
        else CosineLR(lr, max(steps, 1), min_lr=lr / 10)
    loss = gb.SoftmaxCrossEntropy()  # logits (B, context, V), targets (B, context): every position
    opt = gb.Adam(lr, clip_norm=clip_norm)  # one global norm over all the model's gradients
    start = time.perf_counter()

    def report(epoch, logs):
        say(f"epoch {epoch + 1}  train {logs['loss'] / math.log(2):.3f} bits/char  validation "
            f"{logs['val_loss'] / math.log(2):.3f} bits/char, next-character accuracy "
            f"{logs['val_accuracy']:.3f}  {time.perf_counter() - start:6.1f} s")

    history = gb.fit(model, loss, opt, X, Y, epochs=epochs, batch_size=batch_size,
                     validation=(X_val, Y_val), schedule=schedule, callback=report,
                     progress="auto" if not quiet else False)
    seconds = time.perf_counter() - start  # training and the per-epoch validation passes
    bits = history["val_loss"][-1] / math.log(2) if epochs else bits_per_char(model, X_val, Y_val)
    say(f"validation: {bits:.3f} bits/char (unigram {unigram:.3f}) after {steps} steps of "
        f"{batch_size}x{context} characters in {seconds:.1f} s")
    prompt = data.val[:context]
    continuation = data.decode(sample(model, prompt, sample_chars, np.random.default_rng(seed),
                                      temperature)) if sample_chars else ""
    if sample_chars:
        say(f"--- prompt (validation text) ---\n{data.decode(prompt)}\n--- sampled continuation "
            f"(temperature {temperature}) ---\n{continuation}")
    return {"val_bits": bits, "val_accuracy": history["val_accuracy"][-1] if epochs else None,
            "unigram_bits": unigram, "seconds": seconds, "steps": steps, "history": history,
            "n_params": model.n_params, "train_chars": len(data.train),
            "val_chars": int(Y_val.size), "sample": continuation}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults: about 2-5 minutes on 2 CPU cores.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--kernels", default="fused", choices=("fused", "reference"))
    p.add_argument("--epochs", type=int, default=2, help="passes over the windows (default 2)")
    p.add_argument("--stride", type=int, default=32,
                   help="characters between training windows' starts (default 32)")
    p.add_argument("--seed", type=int, default=0, help="model, batches and sampling (default 0)")
    p.add_argument("--budget", type=int, default=2_000_000,
                   help="bytes of stdlib source read (default 2000000; 10%% validates)")
    p.add_argument("--context", type=int, default=64, help="characters a window (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="windows a step (default 32)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--nhead", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--dim-feedforward", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--sample-chars", type=int, default=300, help="characters sampled at the end")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--blas-threads", type=int, default=1, help="0: the BLAS default")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse_args()
    main(a.device, a.kernels, a.epochs, a.stride, a.seed, a.budget, a.context, a.batch_size,
         a.d_model, a.nhead, a.num_layers, a.dim_feedforward, a.dropout, a.lr, a.warmup,
         a.clip_norm, a.sample_chars, a.temperature, a.blas_threads)
