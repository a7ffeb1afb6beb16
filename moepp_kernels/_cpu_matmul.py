"""The layer's fp32 matmuls on the CPU through oneDNN where torch's own run a slower path.

torch.mm in fp32 calls the BLAS torch was built with (MKL in the pip wheels). On AMD's AVX-512
CPUs MKL runs its AVX2 kernels: on the Zen CPU that CI runs on, a 128 x 1024 x 1024 product takes
1.33 ms through torch.mm and 0.60 ms through oneDNN's matmul (torch.ops.mkldnn._linear_pointwise,
the op torch's own CPU compiler emits), whose AVX-512 kernels run on any vendor's CPU. On Intel
CPUs both libraries run AVX-512 kernels. bf16 and fp16 products already go through oneDNN in
torch.mm, so only fp32 ones change route. Results differ from torch.mm's as any two summation
orders do (a few fp32 ulps).

oneDNN keeps one compiled kernel per shape: an expert's first product at a new row count costs
a compilation (0.1 to 1 ms), after which its cache holds it (ONEDNN_PRIMITIVE_CACHE_CAPACITY
shapes, 1024 by default).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _onednn_fp32_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


ONEDNN_FP32 = _onednn_fp32_available()  # read once: the CPU and the build do not change


def uses_onednn(a: Tensor, b: Tensor | None = None) -> bool:
    """Whether mm(a, b) goes through oneDNN: fp32 CPU operands, none of M, K, N zero, on an
    AVX-512 CPU, while torch.backends.mkldnn is enabled (torch.backends.mkldnn.flags(enabled=False)
    opts out)."""
    return (ONEDNN_FP32 and a.dtype == torch.float32 and a.device.type == "cpu" and a.numel() > 0
            and (b is None or b.numel() > 0) and torch.backends.mkldnn.enabled)


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a [M, K] · b [K, N] -> [M, N] (into `out` when given), as torch.mm; any strides."""
    if not uses_onednn(a, b):
        return torch.mm(a, b, out=out)
    product = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # a · (bᵀ)ᵀ
    return product if out is None else out.copy_(product)


class _AddMM(torch.autograd.Function):
    """c + a · b through oneDNN, the sum as the product's epilogue; its backward through mm."""

    @staticmethod
    def forward(ctx, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.ops.mkldnn._linear_pointwise.binary(a, c, b.t(), None, "add")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        return (grad, mm(grad, b.t()) if ctx.needs_input_grad[1] else None,
                mm(a.t(), grad) if ctx.needs_input_grad[2] else None)


def add_mm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """c [M, N] + a [M, K] · b [K, N], a new tensor, as torch.addmm(c, a, b) (autograd included).
    torch.compile traces torch.addmm: oneDNN's fused sum has no fake-tensor rule."""
    if torch.compiler.is_compiling() or not uses_onednn(a, b) or c.shape != (a.shape[0], b.shape[1]):
        return torch.addmm(c, a, b)
    return _AddMM.apply(c, a, b)
