"""Linear products on CPU through oneDNN where it is faster than torch's BLAS (`run.linear_backend`).

torch's fp32 `mm` on x86 runs MKL's sgemm, and MKL picks its kernels by CPU vendor: on an AMD EPYC it ran
flan-t5-small's products slower than oneDNN (which torch also ships, and which picks its kernels by instruction
set); on Intel, MKL is the faster (figures: bench/RESULTS.md). So `auto` takes oneDNN on x86 CPUs not made by Intel.
Through oneDNN go a linear layer's forward and input-gradient products and the chunked loss's two LM-head products;
weight gradients stay with torch's mm, which is faster at that layout on both vendors. Same math: fp32 products,
their sums taken in another order (tests compare outputs and gradients with F.linear and peft's).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError

BACKENDS = ("auto", "torch", "onednn")
_onednn = False  # set for a training run by `linear_backend`


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...); "" where the system does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("vendor_id")), "")


def onednn_available() -> bool:
    """An x86 CPU and a torch build with oneDNN's linear kernel."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def wants_onednn(backend: str) -> bool:
    """Whether `run.linear_backend` = backend routes linear products through oneDNN on this machine."""
    if backend == "torch":
        return False
    if backend == "onednn":
        if not onednn_available():
            raise PeftlabError("run.linear_backend=onednn needs an x86 CPU and a torch build with oneDNN "
                               "(torch.backends.mkldnn.is_available()): use auto or torch")
        return True
    return onednn_available() and cpu_vendor() not in ("GenuineIntel", "")


@contextlib.contextmanager
def linear_backend(onednn: bool) -> Iterator[None]:
    """Inside, `linear` and `mm_t` take oneDNN (where `onednn` and the operands allow it)."""
    global _onednn
    before, _onednn = _onednn, onednn
    try:
        yield
    finally:
        _onednn = before


def _through_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """oneDNN takes fp32 CPU operands with rows to multiply; autocast and torch.compile keep torch's own."""
    return (_onednn and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) for a 2-D a; b may be a transposed view (oneDNN reads its strides, no copy)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D operands, outside autograd (the chunked loss's own backward)."""
    return _onednn_mm_t(a, b) if _through_onednn(a, b) else a @ b.T


class OneDNNLinear(torch.autograd.Function):
    """F.linear with the output and the input's gradient by oneDNN, the weight's gradient by torch's mm. Keeps
    what F.linear keeps: the weight, and the input only where the weight wants a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, weight)
        ctx.input_shape = x.shape
        # folded back as aten::matmul folds: not a view, so a mark (`recompute.recomputable`) on it holds for
        # the views that attention takes of it
        return torch.ops.aten._unsafe_view(_onednn_mm_t(rows, weight, bias), (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = _onednn_mm_t(grad_rows, weight.T).reshape(ctx.input_shape) if ctx.needs_input_grad[0] else None
        grad_weight = grad_rows.T @ rows if ctx.needs_input_grad[1] else None
        grad_bias = grad_rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN inside `linear_backend(True)` (fp32 on CPU)."""
    if _through_onednn(x, weight) and (bias is None or bias.dtype == weight.dtype):
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
