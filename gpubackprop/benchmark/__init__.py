"""Benchmarks: training-step throughput against PyTorch and scikit-learn, the GEMM limit, fused vs
reference elementwise ops, scaling with batch size and width, and memory.

``gpubackprop bench`` and ``python -m bench`` (from the repository root) both run ``main``.

How it measures (the same on every device):

- Every contender of one table is built first, warmed up, then timed *interleaved*: round after
  round, each contender runs one block of calls (about ``block_s`` seconds) in a rotating order,
  with the device synchronised before each clock read. Throughputs are medians over rounds, and
  a ratio "A over B" is the median of the per-round ratios, so slow drifts of a shared machine
  cancel out.
- On the CPU, the thread pools of different libraries (OpenBLAS and Numba's OpenMP for
  gpubackprop, MKL/OpenMP for PyTorch) busy-wait for a while after each call. A block that starts
  while another library's threads still spin loses a core to them, which no single-library user
  ever sees, so the runner sleeps ``quiesce_s`` (outside the timed region) before every block.
- PyTorch runs with ``torch.set_num_threads`` equal to NumPy's BLAS thread count; on CUDA with
  TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``), as CuPy's default float32 GEMM.
- FLOPs of a training step of an MLP with layer sizes n_0 … n_L and batch B:
  6·B·Σ n_(l−1)·n_l (forward GEMM, weight-gradient GEMM, input-gradient GEMM, 2 FLOPs a
  multiply-add each). The GEMM limit is the time the step's own GEMMs take alone, back to back.
- Bytes of an elementwise op: the minimal bytes read plus written (``op_bytes``).
- LeNet-5 (section ``lenet5``): the ``lenet5`` model preset on 1x28x28 inputs, batch 128, against
  the same network in torch.nn. Its FLOPs are those of the GEMMs the step performs
  (``cnn_step_gemms``: per convolution the forward GEMM W·cols, the weight-gradient GEMM and, except
  for the first layer, the input-gradient GEMM Wᵀ·Δ; three per dense layer, 2 FLOPs a
  multiply-add). "Of GEMM limit" is again t(those GEMMs alone, same layouts) / t(step); "of peak"
  is FLOPs / (the peak sgemm rate, a large square GEMM) / t(step). The conv layers' time split
  comes from a separate, instrumented run that clocks every im2col, conv GEMM, col2im,
  bias+activation (forward, derivative and bias gradient) and pooling call inside real steps.

The package, one module a network family: ``timing`` (Contender, Timer, medians), ``contenders``
(the shared step and PyTorch), ``mlp``, ``cnn``, ``lstm``, ``gemm``, ``ops``, ``memory``,
``environment`` (machine facts) and ``runner`` (``build_parser``, ``run``, ``main``).
"""

from gpubackprop.benchmark import contenders
from gpubackprop.benchmark.cnn import (
    LENET,
    QUICK_LENET,
    SPLIT_CATEGORIES,
    cnn_contender,
    cnn_gemm_contender,
    cnn_step_flops,
    cnn_step_gemms,
    conv_time_split,
    lenet_plan,
    lenet_section,
    torch_cnn,
    torch_cnn_contender,
)
from gpubackprop.benchmark.contenders import (
    LR,
    MOMENTUM,
    configure_torch,
    torch_module,
    torch_step_contender,
)
from gpubackprop.benchmark.environment import (
    blas_threads,
    cpu_model,
    devices_available,
    environment,
    gpu_name,
    machine_type,
)
from gpubackprop.benchmark.gemm import PEAK_GEMM, QUICK_PEAK_GEMM, gemm_flops, gemm_section, peak_gemm_gflops
from gpubackprop.benchmark.lstm import (
    LSTM_SHAPE,
    QUICK_LSTM_SHAPE,
    lstm_contender,
    lstm_section,
    lstm_step_flops,
    torch_lstm_contender,
)
from gpubackprop.benchmark.memory import memory_section
from gpubackprop.benchmark.mlp import (
    QUICK_SHAPES,
    SCALING_BASE,
    SCALING_BATCHES,
    SCALING_WIDTHS,
    SHAPES,
    gemm_contender,
    gpubackprop_contender,
    mlp_layers,
    scaling_section,
    sklearn_contender,
    step_flops,
    step_gemms,
    throughput_section,
    torch_contender,
)
from gpubackprop.benchmark.ops import OP_NAMES, OP_SHAPES, op_bytes, op_contenders, ops_section
from gpubackprop.benchmark.runner import SECTIONS, build_parser, main, run
from gpubackprop.benchmark.timing import Contender, Timer, median, ratio_median, sync_for, xp_for

__all__ = [
    "LENET", "LR", "LSTM_SHAPE", "MOMENTUM", "OP_NAMES", "OP_SHAPES", "PEAK_GEMM", "QUICK_LENET",
    "QUICK_LSTM_SHAPE", "QUICK_PEAK_GEMM", "QUICK_SHAPES", "SCALING_BASE", "SCALING_BATCHES",
    "SCALING_WIDTHS", "SECTIONS", "SHAPES", "SPLIT_CATEGORIES", "Contender", "Timer", "blas_threads",
    "build_parser", "cnn_contender", "cnn_gemm_contender", "cnn_step_flops", "cnn_step_gemms",
    "configure_torch", "contenders", "conv_time_split", "cpu_model", "devices_available",
    "environment", "gemm_contender", "gemm_flops", "gemm_section", "gpu_name",
    "gpubackprop_contender", "lenet_plan", "lenet_section", "lstm_contender", "lstm_section",
    "lstm_step_flops", "machine_type", "main", "median", "memory_section", "mlp_layers",
    "op_bytes", "op_contenders", "ops_section", "peak_gemm_gflops", "ratio_median", "run",
    "scaling_section", "sklearn_contender", "step_flops", "step_gemms", "sync_for",
    "throughput_section", "torch_cnn", "torch_cnn_contender", "torch_contender",
    "torch_lstm_contender", "torch_module", "torch_step_contender", "xp_for",
]
