"""A capture backend for the CPU and the simulator (tests of gpubackprop.cuda_graph without a GPU)."""


class ReplayMismatch(AssertionError):
    pass


class _Recorder:
    """Stands in for the kernel set (and the GEMM): every call's op name and its arguments as a
    CUDA graph would freeze them (scalars by value, arrays by shape and dtype) go to ``log``."""

    def __init__(self, ops, log):
        self._ops, self._log = ops, log

    def __getattr__(self, name):
        target = getattr(self._ops, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self._log.append((name, _frozen(args), _frozen(tuple(sorted(kwargs.items())))))
            return target(*args, **kwargs)
        return call


def _frozen(x):
    if hasattr(x, "shape") and hasattr(x, "dtype") and getattr(x, "ndim", 0) > 0:
        return ("array", tuple(x.shape), str(x.dtype))
    if isinstance(x, (tuple, list)):
        return tuple(_frozen(v) for v in x)
    if callable(x):  # a function handed on (the GEMM): by name, as the kernels it launches
        return ("callable", getattr(x, "__name__", type(x).__name__))
    if hasattr(x, "item"):
        return x.item()
    return x


class HostCapture:
    """A capture backend for the CPU. ``capture`` runs the step once, recording its kernel-set and
    GEMM calls, then rolls back what it wrote (a real capture runs no kernel); the graph is the
    step function and that record. ``replay`` runs the step again and fails if any call differs
    from the captured one: a real graph would have replayed the captured parameters (a per-step
    host scalar, a changed shape), so such a step would not equal the eager one on a GPU."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.events = []

    def begin_run(self):
        self.events.append("begin")

    def end_run(self):
        self.events.append("end")

    def _recorded(self, fn):
        be, log = self.model.backend, []
        ops, matmul, matmul16 = be.ops, be.matmul, be.matmul16
        be.ops = _Recorder(ops, log)
        be.matmul = _Recorder(type("M", (), {"matmul": staticmethod(matmul)})(), log).matmul
        if matmul16 is not None:
            be.matmul16 = _Recorder(type("M", (), {"matmul16": staticmethod(matmul16)})(),
                                    log).matmul16
        try:
            out = fn()
        finally:
            be.ops, be.matmul, be.matmul16 = ops, matmul, matmul16
        return out, log

    def capture(self, fn, touched):
        saved = [a.copy() for a in touched]
        out, log = self._recorded(fn)
        for a, s in zip(touched, saved, strict=True):
            a[...] = s
        self.events.append(("capture", len(log)))
        return (fn, log), out

    def replay(self, graph):
        fn, log = graph
        # The step's Python also advances the host counters, which a real replay does not touch
        # (StepGraphs advances them after it).
        ctx = self.model.context
        counters = ctx.step, self.opt.steps
        _, again = self._recorded(fn)
        ctx.step, self.opt.steps = counters
        if again != log:
            first = next(i for i, (a, b) in enumerate(zip(again, log, strict=False)) if a != b) \
                if len(again) == len(log) else min(len(again), len(log))
            raise ReplayMismatch(f"replayed call {first} differs from the captured one: "
                                 f"{again[first] if first < len(again) else None} vs "
                                 f"{log[first] if first < len(log) else None}")
        self.events.append("replay")
