"""Memory estimates, checked before a model allocates its buffers.

A size that cannot be allocated (``dense(1000000000)``, a class label of 1e9) should fail with a
line naming the layer or the label, not with NumPy's or CuPy's out-of-memory traceback half way
through building. The estimates here are what the library itself will allocate, compared with
what the device has free now: the host's available physical memory (``MemAvailable``), or the
GPU's free memory plus the blocks CuPy's pool holds for reuse.
"""

import os

# The most per-parameter state any optimizer here keeps: Adam's two moments (RMSprop with
# momentum also keeps two, SGD with momentum one). The model does not know its optimizer when it
# builds, so it budgets for the largest.
OPTIMIZER_COPIES = 2
# Initial values are drawn on the host in float64 and concatenated before the upload: two host
# float64 copies of every parameter exist for a moment while the model builds.
STAGING_BYTES_PER_VALUE = 2 * 8

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n):
    """A byte count as a person reads it: "512 bytes", "21.3 GiB", "3.7 TiB"."""
    n = float(n)
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024


def host_available_bytes():
    """Physical memory a new allocation can get without swapping, or None when unknown.

    Linux's MemAvailable counts reclaimable page cache; without /proc, the free pages.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_available_bytes(backend):
    """(bytes free on the backend's device or None when unknown, the device's name for messages)."""
    if not backend.on_gpu:  # the CPU, and the CUDA simulator (NumPy arrays in host memory)
        return host_available_bytes(), "the cpu"
    xp = backend.xp  # CuPy, as the backend imported it
    try:
        free, _ = xp.cuda.runtime.memGetInfo()
        free += xp.get_default_memory_pool().free_bytes()  # freed blocks CuPy hands out again
    except Exception:  # a driver that cannot answer: no estimate rather than a failed build
        return None, "the GPU"
    return int(free), "the GPU"


def layer_sizes(layer):
    """(parameter count, state value count) of a built leaf layer, from its specs alone."""
    n_params = sum(_size(shape) for _, shape in layer.param_specs())
    n_state = sum(_size(shape) for _, shape, _ in layer.state_specs())
    return n_params, n_state


def check_model(layers, backend):
    """Raise ValueError when a model's buffers cannot fit, before any of them is allocated.

    ``layers``: [(name for messages, e.g. "layers[0] Dense(64, 10, ...)", built leaf layer)].
    Counts, for every parameter, the value, its gradient and ``OPTIMIZER_COPIES`` of optimizer
    state in the model dtype, plus the layers' non-trained state; on the host also the float64
    initial values while they are staged. On the CPU these share one memory: its peak is the
    larger of the build (staging, values and gradients) and training (values, gradients, state).
    The message names the layer that cannot fit on its own, else the model and its largest layer.
    """
    itemsize = backend.dtype.itemsize
    dtype = backend.dtype.name
    sizes = [(name, *layer_sizes(layer)) for name, layer in layers]
    if not any(n or s for _, n, s in sizes):
        return

    def device_need(n, s):  # bytes on the model's device
        train = (n * (2 + OPTIMIZER_COPIES) + s) * itemsize
        if backend.on_gpu:
            return train
        return max(train, n * STAGING_BYTES_PER_VALUE + s * 8 + (2 * n + s) * itemsize)

    def host_need(n, s):  # bytes of host memory while the initial values are staged (GPU)
        return n * STAGING_BYTES_PER_VALUE + s * 8

    available, device = device_available_bytes(backend)
    what = f"{dtype} parameters, their gradients and optimizer state"
    checks = [(device_need, available, device, what)]
    if backend.on_gpu:
        checks.insert(0, (host_need, host_available_bytes(), "the host",
                          "parameters' initial values (drawn on the host in float64)"))
    for need, available, device, what in checks:
        if available is None:
            continue
        total = need(sum(n for _, n, _ in sizes), sum(s for _, _, s in sizes))
        if total <= available:
            continue
        name, n, s = max(sizes, key=lambda size: need(size[1], size[2]))
        has = f"{device} has {format_bytes(available)} available"
        if need(n, s) > available or len(sizes) == 1:
            raise ValueError(f"{name} needs {format_bytes(need(n, s))} for its {n:,} {what}; {has}")
        n_all = sum(n for _, n, _ in sizes)
        raise ValueError(f"model: needs {format_bytes(total)} for its {n_all:,} {what} (the "
                         f"largest layer, {name}, {format_bytes(need(n, s))}); {has}")


def activation_bytes(model, batch_size):
    """A floor on the training-mode activation memory of one batch: each leaf layer's output and
    its gradient (layers keep both for reuse), plus the input batch, in the model dtype."""
    itemsize = model.backend.dtype.itemsize
    inputs = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]
    per_sample = sum(_size(shape) for shape in inputs)
    per_sample += sum(2 * _size(layer.output_shape) for _, layer in model.leaves())
    return per_sample * int(batch_size) * itemsize


def check_batch(model, batch_size):
    """Raise ValueError when one training batch's activations cannot fit on the model's device
    (on top of the model's own buffers, which are allocated already)."""
    need = activation_bytes(model, batch_size)
    available, device = device_available_bytes(model.backend)
    if available is not None and need > available:
        raise ValueError(f"batch_size: a batch of {int(batch_size):,} samples needs at least "
                         f"{format_bytes(need)} for the activations and their gradients; {device} "
                         f"has {format_bytes(available)} available (use a smaller batch)")


def class_bytes(n_classes, n_samples):
    """A floor on the memory a classifier of ``n_classes`` outputs needs for ``n_samples`` samples:
    its output layer's weights and biases from a single input (value, gradient and optimizer
    state, float32), and one float64 output per class for every sample (the one-hot targets, the
    predicted probabilities)."""
    return int(n_classes) * (2 * 4 * (2 + OPTIMIZER_COPIES) + 8 * int(n_samples))


def _size(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n
