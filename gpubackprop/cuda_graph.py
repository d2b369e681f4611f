"""The training step as one CUDA graph: captured once per (model, batch shape, training mode),
replayed at every step, so no Python runs between the step's kernels.

``fit(..., cuda_graph=...)``:

- ``"auto"`` (the default): graphs where they can run (a model on a real GPU, the fused kernel set,
  one process, every layer capturable, nvmath-python installed), the eager step elsewhere: on the
  CPU and in Numba's simulator always (nothing to capture there).
- ``"on"``: graphs, or a ``ValueError`` naming what prevents them (e.g. the model is on the CPU),
  never a silent eager run.
- ``"off"``: the eager step (host-scalar kernels, CuPy's matmul).
- a ``GraphSettings``: graphs with explicit settings (warm-up steps, the capture backend); what the
  tests (a host capture backend, no GPU) and ``make gpu-check`` use.

How a step runs with graphs (``StepGraphs``): the batch is gathered into static input buffers (one
per input and target, per batch shape); the step itself is one function, ``_step``, that advances
the per-step values on the device (``StepValues``: the learning rate from the schedule, Adam's
corrections, the Dropout step), runs forward, loss, backward, clipping and the update with the
``*_values`` kernels, and adds the batch's loss and correct count into device totals. The first
``warmup`` steps of each shape run ``_step`` eagerly on the capture stream (kernel compilation,
cuBLAS's handle and workspace, every workspace and scratch buffer allocated); then it is captured
into a graph (a private CuPy memory pool serves what the step allocates, kept for the graph's
lifetime) and replayed from then on. The host afterwards advances the counters the Python step
would have (the optimizer's and the model's steps), so checkpoints and resumes are unchanged.
A ragged last batch is a shape of its own: eager for its warm-up steps, then its own graph.
The per-step values of an epoch are computed at its start: the learning rate from ``schedule``
for every step, else ``opt.lr`` as it is then (a change by ``on_step`` takes effect at the next
epoch).

The GEMMs of a graph run go through ``kernels/cuda/cublas.py`` (nvmath-python: CuPy's cuBLAS
wrappers raise during capture), in the warm-up steps as in the replays, so replay equals the eager
steps of the same run bit for bit.
"""

import functools
import warnings

import numpy as np

CUDA_GRAPH_MODES = ("auto", "on", "off")
DEFAULT_WARMUP = 2  # eager steps per shape before its capture (compilation, lazily made buffers)

# Leaf layers whose training step is capturable: only device kernels (the ops, CuPy elementwise,
# GEMMs through backend.matmul), no host synchronisation, no per-step host scalar (Dropout reads
# the step from StepValues). A layer not listed runs the step eagerly (auto) or is named in the
# "on" error. The recurrent layers qualify without dropout between layers (that dropout takes the
# step as a host scalar).
CAPTURABLE_LAYERS = frozenset({
    "Dense", "Conv2d", "Dropout", "Activation", "Flatten", "Reshape", "BatchNorm1d", "BatchNorm2d",
    "LayerNorm", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "LastStep", "RNN", "LSTM", "GRU",
})


def check_mode(cuda_graph):
    """``cuda_graph`` checked: one of CUDA_GRAPH_MODES or a GraphSettings."""
    if isinstance(cuda_graph, GraphSettings):
        return cuda_graph
    if not isinstance(cuda_graph, str) or cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph: expected one of {CUDA_GRAPH_MODES} or a GraphSettings, got "
                         f"{cuda_graph!r}")
    return cuda_graph


def graphs_unavailable():
    """Why this process cannot capture CUDA graphs (a sentence), or None when it can."""
    from gpubackprop.backend import has_cupy_gpu, is_cudasim, nvmath_cublas

    if is_cudasim():
        return "Numba's CUDA simulator runs the step eagerly (nothing to capture)"
    if not has_cupy_gpu():
        return "no CUDA GPU (CuPy + Numba): the CPU runs the step eagerly"
    if nvmath_cublas() is None:
        return ("nvmath-python is not installed (its cuBLAS bindings run the GEMMs during "
                "capture): pip install 'gpubackprop[gpu]'")
    return None


def model_problems(model, comm=None, device=True):
    """What keeps this model's step out of a graph (a list of sentences; empty: capturable);
    ``device=False`` leaves out the device (a host capture backend)."""
    problems = []
    be = model.backend
    if device and not be.on_gpu:
        problems.append(f"the model runs on {be.device!r}"
                        + (" in Numba's CUDA simulator" if be.device == "cuda" else "")
                        + ", not on a CUDA GPU")
    if be.kernels != "fused":
        problems.append(f"kernels={be.kernels!r}: the reference set reads the per-step values on "
                        f"the host; graphs need kernels='fused'")
    # bf16/fp16 are capturable: the 16-bit Dense GEMMs are GemmEx through nvmath-python
    # (Matmul16, as in the eager run), the float32 ones cuBLAS as in fp32 graph runs, the 16-bit weight copy one cast kernel into a kept buffer, and fp16's loss
    # scaler lives on the device (scale, unscale + inf check, the update's skip gate, the scale
    # update: kernels reading its state array, no host read).
    if comm is not None and comm.size > 1:
        problems.append(f"data-parallel training over {comm.size} processes (the gradient "
                        f"all-reduce is not captured)")
    for key, layer in model.leaves():
        key = key.rstrip(".")
        name = type(layer).__name__
        if name not in CAPTURABLE_LAYERS:
            problems.append(f"layer {key} ({name}) is not capturable yet")
        elif getattr(layer, "dropout", 0) and name in ("RNN", "LSTM", "GRU"):
            problems.append(f"layer {key} ({name}) has dropout between layers, which reads the "
                            f"step on the host")
    return problems


def resolve(cuda_graph, model, comm=None):
    """The GraphSettings to train with, or None for the eager step; ValueError for "on" where
    graphs cannot run (naming why)."""
    mode = check_mode(cuda_graph)
    if mode == "off":
        return None
    settings = mode if isinstance(mode, GraphSettings) else GraphSettings(strict=mode == "on")
    if settings.capture is not None:  # an explicit capture backend (tests): the model decides
        problems = model_problems(model, comm, device=False)
    else:
        why = graphs_unavailable()
        problems = ([why] if why else []) + model_problems(model, comm)
    if problems:
        if mode == "auto":
            return None
        raise ValueError(f"cuda_graph: {mode if isinstance(mode, str) else 'graphs'!r} cannot "
                         f"capture this training step: "
                         f"{'; '.join(dict.fromkeys(problems))}; use cuda_graph='auto' or 'off'")
    return settings


class GraphSettings:
    """Explicit graph settings: ``warmup`` eager steps per batch shape before it is captured;
    ``capture`` the capture backend (None: CuPy stream capture on a GPU); ``strict``: a failed
    capture raises (else, as with cuda_graph="auto", that shape runs eagerly, with a warning)."""

    def __init__(self, warmup=DEFAULT_WARMUP, capture=None, strict=True):
        from gpubackprop.validation import positive_int

        self.warmup = positive_int(warmup, "warmup")
        self.strict = bool(strict)
        for name in ("begin_run", "end_run", "capture", "replay"):
            if capture is not None and not callable(getattr(capture, name, None)):
                raise TypeError(f"capture: expected a capture backend with a {name}() method, got "
                                f"{type(capture).__name__}")
        self.capture = capture

    def __repr__(self):
        return (f"GraphSettings(warmup={self.warmup}, capture={self.capture!r}, "
                f"strict={self.strict})")


class CupyCapture:
    """CUDA stream capture through CuPy on a non-blocking stream; allocations during capture come
    from a private memory pool that nothing else uses, so the graph's buffers stay its own."""

    name = "cupy"

    def __init__(self, cp):
        self.cp = cp
        self._stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()

    def __repr__(self):
        return "CupyCapture()"

    def begin_run(self):
        """Make the capture stream current for the whole run (warm-up steps, gathers, replays and
        fit's host reads), ordered after what the previous stream queued (the data upload)."""
        self._previous = self.cp.cuda.get_current_stream()
        self._stream.wait_event(self._previous.record())
        self._stream.use()

    def end_run(self):
        """The previous stream current again, ordered after the run's work."""
        self._previous.wait_event(self._stream.record())
        self._previous.use()

    def capture(self, fn, touched):
        """(graph, fn's result): ``fn`` run under capture (its kernels recorded, not run, so the
        arrays in ``touched``, what a step writes, are left as they are)."""
        cp, s = self.cp, self._stream
        with cp.cuda.using_allocator(self.pool.malloc):
            s.begin_capture()  # CuPy's default mode: relaxed
            try:
                out = fn()
            except BaseException:
                try:
                    s.end_capture()
                except Exception:  # the capture was already invalidated: the first error matters
                    pass
                raise
            graph = s.end_capture()
        return graph, out

    def replay(self, graph):
        graph.launch(stream=self._stream)


class _Entry:
    """One batch shape's static buffers, its step count and, once captured, its graph."""

    __slots__ = ("inputs", "targets", "runs", "graph", "out", "keep", "eager")

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets
        self.runs, self.graph, self.out, self.keep = 0, None, None, None
        self.eager = False  # its capture failed (not strict): eager from then on


class StepGraphs:
    """The step of one (model, loss, optimizer) as CUDA graphs, one per batch shape: static input
    buffers, StepValues, device totals, warm-up, capture and replay; see the module docstring."""

    def __init__(self, model, loss, opt, settings, rows):
        from gpubackprop.step_values import StepValues

        self.model, self.loss, self.opt = model, loss, opt
        self.be = be = model.backend
        self.warmup, self.strict = settings.warmup, settings.strict
        self.backend_ = settings.capture
        if self.backend_ is None:
            self.backend_ = CupyCapture(be.xp)
        self.values = StepValues(be, rows)
        self.entries = {}  # key -> _Entry
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.inputs = None  # the last step's (static) input buffers
        self.total_loss = be.zeros(())
        self.total_correct = be.xp.zeros((), np.int64)
        self._cublas = be.on_gpu and isinstance(self.backend_, CupyCapture)
        if self._cublas:  # the GEMMs capture allows, in the warm-up steps as in the replays
            be.use_cublas_matmul(True)
        self.backend_.begin_run()

    def close(self):
        """The end of the run: the previous stream and xp.matmul back."""
        self.backend_.end_run()
        if self._cublas:
            self.be.use_cublas_matmul(False)

    def totals(self):
        """The epoch's running (loss sum, correct count) as device 0-d arrays."""
        return self.total_loss, self.total_correct

    def __repr__(self):
        return (f"StepGraphs(shapes={len(self.entries)}, captures={self.captures}, "
                f"replays={self.replays}, warmup={self.warmup})")

    @staticmethod
    def key(Xb, Tb, train=True):
        """The graph cache key: the shapes and dtypes of every input and target, and the mode."""
        def sig(A):
            return tuple((tuple(a.shape), str(a.dtype)) for a in (A if isinstance(A, list) else [A]))
        return sig(Xb), sig(Tb), bool(train)

    # ---- per epoch ---------------------------------------------------------------------------
    def begin_epoch(self, schedule, step, n_rows, start, total_loss, total_correct):
        """Fill StepValues for this epoch's steps ``start`` .. ``n_rows - 1`` (global step ``step``
        at ``start``), and set the device totals to the epoch's running totals so far."""
        opt, ctx = self.opt, self.model.context
        rows = []
        for j in range(n_rows - start):
            lr = opt.lr if schedule is None else float(schedule(step + j))
            rows.append({**opt.step_row(lr, opt.steps + j + 1), "step": ctx.step + j})
        self.values.fill(rows, start=start)
        self.total_loss[...] = total_loss
        self.total_correct[...] = total_correct

    # ---- per step ----------------------------------------------------------------------------
    def step(self, Xd, Td, idx):
        """One training step on the rows ``idx`` of the device data (Xd, Td): gathered into the
        shape's static buffers, then eager (warm-up), captured, or replayed. Returns the step's
        (loss value, outputs) as device arrays (static ones once captured)."""

        n = int(idx.shape[0])
        key = self.key(_like(Xd, n), _like(Td, n))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(_static(self.be, Xd, n), _static(self.be, Td, n))
        _gather(self.be, Xd, idx, entry.inputs)
        _gather(self.be, Td, idx, entry.targets)
        self.inputs = entry.inputs
        if entry.eager or (entry.graph is None and entry.runs < self.warmup):
            entry.runs += 1
            self.eager_steps += 1
            return self._step(entry)
        if entry.graph is None:
            ctx, opt = self.model.context, self.opt
            counters = (ctx.step, opt.steps)
            try:
                entry.graph, entry.out = self.backend_.capture(lambda: self._step(entry),
                                                               self._touched())
                failed = None
            except Exception as e:
                if self.strict:
                    raise
                failed = e
            finally:
                # Capture ran the Python of a step but no kernel: the counters it advanced go
                # back, and the replay (or eager step) below is the step.
                ctx.step, opt.steps = counters
            if failed is not None:
                warnings.warn(f"cuda_graph: capturing the step of the batch shape {key[0]} failed "
                              f"({type(failed).__name__}: {failed}); that shape runs eagerly",
                              RuntimeWarning, stacklevel=3)
                entry.eager = True
                entry.runs += 1
                self.eager_steps += 1
                return self._step(entry)
            entry.keep = self._buffers_in_use()
            self.captures += 1
        self.backend_.replay(entry.graph)
        self.model.context.step += 1  # what the step's forward pass counts in eager mode
        self.opt.steps += 1
        self.replays += 1
        return entry.out

    def _step(self, entry):
        """The captured step: device-side per-step values, the step, the totals; no host read."""
        from gpubackprop.training import step_on_device

        model, loss, be = self.model, self.loss, self.be
        ctx = model.context
        self.values.advance()
        ctx.step_values = self.values
        try:
            value, Y = step_on_device(model, loss, self.opt, entry.inputs, entry.targets)
        finally:
            ctx.step_values = None
        n = _rows(entry.inputs)
        self.total_loss[...] = self.total_loss + value * n  # as fit's eager totals, in place
        if loss.classification and Y is not None:
            self.total_correct[...] = self.total_correct + loss.correct(be, Y, entry.targets)
        return value, Y

    def _touched(self):
        """The arrays a step writes that outlive it: parameters, gradients, the model's state,
        the optimizer's, StepValues' and the totals."""
        model, opt = self.model, self.opt
        out = [model.flat_params, model.flat_grads, *getattr(model, "state_buffers", {}).values(),
               *(opt.buffers or {}).values(), self.values.values, self.values.counter,
               self.total_loss, self.total_correct]
        if opt._scale is not None:
            out.append(opt._scale)
        scaler = getattr(model, "loss_scaler", None)
        if scaler is not None:  # fp16: the scale, its growth tracker and the found-inf flag
            out.append(scaler.state)
        return out

    def _buffers_in_use(self):
        """References to the buffers a graph reads that a cache could drop (kernel-set scratch,
        layer workspaces): kept with the graph, so their memory is never handed out again."""
        keep = list(getattr(self.be.ops, "_scratch", {}).values())
        # The 16-bit GEMM's operand copies (a float32 operand's, cast per shape) and the
        # model's own buffers (its input rounded to 16 bits).
        for gemm in (self.be.matmul, self.be.matmul16):
            keep.extend(getattr(gemm, "_buffers", {}).values())
        keep.extend(self.model.__dict__.get("_workspaces", {}).values())
        for _, layer in self.model.leaves():
            keep.extend(layer.__dict__.get("_workspaces", {}).values())
        return keep


def _like(A, n):
    """Shape stand-ins of a batch of n rows of the device data A (an array or a list)."""
    if isinstance(A, list):
        return [_Shape((n, *a.shape[1:]), a.dtype) for a in A]
    return _Shape((n, *A.shape[1:]), A.dtype)


class _Shape:
    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _static(be, A, n):
    if isinstance(A, list):
        return [be.xp.empty((n, *a.shape[1:]), a.dtype) for a in A]
    return be.xp.empty((n, *A.shape[1:]), A.dtype)


def _gather(be, A, idx, out):
    """out = A[idx] (rows), into the static buffer: one take kernel, no allocation."""
    if isinstance(A, list):
        for a, o in zip(A, out, strict=True):
            be.xp.take(a, idx, axis=0, out=o)
    else:
        be.xp.take(A, idx, axis=0, out=out)


def _rows(A):
    return (A[0] if isinstance(A, list) else A).shape[0]


@functools.lru_cache(maxsize=None)
def graphs_info():
    """One line for ``gpubackprop info``: whether fit's cuda_graph='auto' captures, and why not."""
    why = graphs_unavailable()
    if why is None:
        return "available (fit(cuda_graph='auto') captures each step shape after its warm-up)"
    return f"not available: {why}"
