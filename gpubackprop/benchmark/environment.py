"""Facts about the machine a benchmark ran on: devices, CPU and GPU, library versions and threads."""

import os
import platform
import time

import numpy as np

from gpubackprop import backend as backend_mod
from gpubackprop.benchmark import contenders


def devices_available(requested="all"):
    if requested == "all":
        return ["cpu"] + (["cuda"] if backend_mod.has_cupy_gpu() else [])
    if requested == "cuda" and not backend_mod.has_cupy_gpu():
        raise ValueError("device: 'cuda' was requested but no CUDA GPU is usable (CuPy + Numba)")
    return [requested]


def blas_threads():
    """Threads of NumPy's BLAS (threadpoolctl when installed, else the CPU count)."""
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return int(info["num_threads"])
    except Exception:
        pass
    return os.cpu_count() or 1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_arch():
    """The CPU's microarchitecture as LLVM (and so Numba) names it, e.g. 'znver3' or 'znver4': a
    model name such as 'AMD EPYC' covers generations that differ (AVX-512 or not), and the kernels'
    speed with them."""
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name() or "unknown"
    except Exception:  # noqa: BLE001 (an LLVM build without it)
        return "unknown"


def gpu_name():
    if not backend_mod.has_cupy_gpu():
        return None
    cp = backend_mod.cupy_module()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def machine_type(gpu=None):
    """A file-name-safe name for this kind of machine, e.g. 'cpu-amd-epyc-znver3-2c' (the model
    name, ``cpu_arch``, the cores) or 'gpu-nvidia-h100'."""
    def slug(s):
        keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in s)
        words = [w for w in keep.split("-") if w and w not in ("r", "tm", "cpu", "processor", "with")]
        return "-".join(words[:5])
    if gpu:
        return "gpu-" + slug(gpu)
    arch = cpu_arch()
    model = slug(cpu_model())
    if arch != "unknown" and arch not in model:
        model = f"{model}-{slug(arch)}"
    return f"cpu-{model}-{os.cpu_count()}c"


def environment(devices):
    import numba

    env = {
        "machine_type": machine_type(gpu_name() if "cuda" in devices else None),
        "cpu": cpu_model(), "cpu_arch": cpu_arch(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__, "numba": numba.__version__, "blas_threads": blas_threads(),
        "numba_threads": numba.get_num_threads(), "devices": devices,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        env["blas"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:
        env["blas"] = "unknown"
    torch = contenders.torch_module()
    env["torch"] = torch.__version__ if torch is not None else "not installed"
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        env["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    try:
        import sklearn
        env["sklearn"] = sklearn.__version__
    except Exception:
        env["sklearn"] = "not installed"
    if "cuda" in devices:
        cp = backend_mod.cupy_module()
        env["gpu"] = gpu_name()
        env["cupy"] = cp.__version__
        env["cupy_tf32"] = os.environ.get("CUPY_TF32", "0")
    return env

