"""What the networks' contenders share: the step they all take (SGD with momentum on softmax
cross-entropy) and PyTorch's side of it (imported when installed, configured alike, its step).

Callers reach ``torch_module`` through this module (``contenders.torch_module()``), so that one
monkeypatch of it here stands for "PyTorch is not installed" everywhere.
"""

from gpubackprop.benchmark.timing import Contender

LR = 0.01
MOMENTUM = 0.9


def torch_module():
    """The torch module, or None when it is not installed."""
    try:
        import torch
    except Exception:
        return None
    return torch


def torch_step_contender(torch, modules, forward, X, y, batch, device):
    """PyTorch's training step of ``forward`` on one fixed batch: cross-entropy, SGD with momentum
    over the ``modules``' parameters, on ``device``."""
    dev = "cuda" if device == "cuda" else "cpu"
    for m in modules:
        m.to(dev)
    opt = torch.optim.SGD([q for m in modules for q in m.parameters()], lr=LR, momentum=MOMENTUM)
    lossf = torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X).to(dev), torch.from_numpy(y).to(dev)

    def step():
        opt.zero_grad()
        lossf(forward(Xt), yt).backward()
        opt.step()

    sync = torch.cuda.synchronize if dev == "cuda" else None
    return Contender("pytorch", step, sync, batch, "pytorch", device)


def configure_torch(threads):
    """Same threads as NumPy's BLAS; TF32 off on CUDA (CuPy's default float32 GEMM is full fp32)."""
    torch = torch_module()
    if torch is None:
        return
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
