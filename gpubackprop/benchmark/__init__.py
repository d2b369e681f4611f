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
  ever sees, so the runner sleeps ``quiesce_s`` (outside the timed region) before every block,
  then makes ``prime_calls`` untimed calls: the pause lets the contender's own threads fall
  asleep and the contenders in between evict its caches, so the first call after it is slower
  than the steps of a training loop (2-core AMD EPYC, the resnet preset: gpubackprop's by
  ~25%, PyTorch's by ~10%).
- PyTorch runs with ``torch.set_num_threads`` equal to NumPy's BLAS thread count; on CUDA with
  TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``), as CuPy's default float32 GEMM.
- FLOPs of a training step of an MLP with layer sizes n_0 … n_L and batch B:
  6·B·Σ n_(l−1)·n_l (forward GEMM, weight-gradient GEMM, input-gradient GEMM, 2 FLOPs a
  multiply-add each). The GEMM limit is the time the step's own GEMMs take alone, back to back.
- Bytes of an elementwise op: the minimal bytes read plus written (``op_bytes``).
- Networks (sections ``lenet5``, ``vgg``, ``resnet``, ``lstm``, ``gru``; ``NETWORKS``): each a model
  spec on a per-sample input shape, against its torch.nn twin built from the same plan and loaded
  with the same weights (``twins``). Its FLOPs are those of the GEMMs the step performs
  (``plan_step_gemms``: per convolution the forward GEMM W·cols, the weight-gradient GEMM and,
  except for the model's first layer, the input-gradient GEMM Wᵀ·Δ; three per dense layer; per
  recurrent layer the input projection, one hidden GEMM a time step, one hidden-gradient GEMM a
  step after the first, two weight-gradient GEMMs and the input gradient; residual blocks count
  their layers; 2 FLOPs a multiply-add): nominal FLOPs, the direct convolution's as PyTorch's,
  for GFLOP/s and "of peak" = FLOPs / (the peak sgemm rate, a large square GEMM) / t(step). "Of
  GEMM limit" is t(the GEMMs the contender's step really runs, alone, in its layouts and threads,
  ``plan_step_schedule`` on its built model: Winograd's 16 GEMMs a chunk in two halves, none for a
  direct convolution, the fused recurrent ops' row chunks) / t(step). The time split (``split``)
  comes from a separate, instrumented run of real steps that clocks every layer's forward and
  backward pass and, inside conv and recurrent layers, every im2col, col2im, Winograd transform,
  GEMM and time-loop call.

The package, one module a network family: ``timing`` (Contender, Timer, medians), ``contenders``
(the shared step and PyTorch), ``mlp``, ``networks`` (the conv and recurrent nets, with ``twins``:
their torch.nn twins, ``gemm_limit``: their GEMMs, ``split``: where their steps' time goes),
``gemm``, ``ops``, ``memory``, ``environment`` (machine facts) and ``runner`` (``build_parser``,
``run``, ``main``). A run of some sections only (``--sections vgg``) writes its files as
<machine-type>-<sections>.json/.md, so that it leaves the full run's files alone.
"""

from gpubackprop.benchmark import contenders
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
from gpubackprop.benchmark.gemm_limit import (
    LAYOUTS,
    Region,
    conv_path,
    gemm_limit_contender,
    plan_step_flops,
    plan_step_gemms,
    plan_step_schedule,
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
from gpubackprop.benchmark.networks import (
    NETWORKS,
    QUICK_NETWORKS,
    Network,
    network_contender,
    network_plan,
    network_section,
    torch_network_contender,
    vgg_spec,
)
from gpubackprop.benchmark.ops import OP_NAMES, OP_SHAPES, op_bytes, op_contenders, ops_section
from gpubackprop.benchmark.runner import SECTIONS, build_parser, main, run
from gpubackprop.benchmark.split import SPLIT_CATEGORIES, categories_of, step_time_split
from gpubackprop.benchmark.timing import Contender, Timer, median, ratio_median, sync_for, xp_for
from gpubackprop.benchmark.twins import load_weights, torch_twin

__all__ = [
    "Contender", "LAYOUTS", "LR", "MOMENTUM", "NETWORKS", "Network", "OP_NAMES", "OP_SHAPES",
    "PEAK_GEMM", "QUICK_NETWORKS", "QUICK_PEAK_GEMM", "QUICK_SHAPES", "Region", "SCALING_BASE",
    "SCALING_BATCHES", "SCALING_WIDTHS", "SECTIONS", "SHAPES", "SPLIT_CATEGORIES", "Timer",
    "blas_threads", "build_parser", "categories_of", "configure_torch", "contenders", "conv_path",
    "cpu_model", "devices_available", "environment", "gemm_contender", "gemm_flops",
    "gemm_limit_contender", "gemm_section", "gpu_name", "gpubackprop_contender", "load_weights",
    "machine_type", "main", "median", "memory_section", "mlp_layers", "network_contender",
    "network_plan", "network_section", "op_bytes", "op_contenders", "ops_section",
    "peak_gemm_gflops", "plan_step_flops", "plan_step_gemms", "plan_step_schedule", "ratio_median",
    "run", "scaling_section", "sklearn_contender", "step_flops", "step_gemms", "step_time_split",
    "sync_for", "throughput_section", "torch_contender", "torch_module", "torch_network_contender",
    "torch_step_contender", "torch_twin", "vgg_spec", "xp_for",
]
