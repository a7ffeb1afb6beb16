"""The matmuls inside the moepp:: ops, and fp32 ones on the CPU through oneDNN where torch's run
MKL's AVX2 kernels.

torch.mm in fp32 calls the BLAS torch was built with (MKL in the pip wheels), which runs its AVX2
kernels on AMD's CPUs, AVX-512 ones included. On the Zen 5 CPU CI runs on, a 128 x 1024 x 1024
product takes 1.33 ms through torch.mm and 0.60 ms through oneDNN's matmul
(torch.ops.mkldnn._linear_pointwise, the op torch's CPU compiler emits), whose AVX-512 kernels run
on any vendor's CPU. So fp32 products on a non-Intel AVX-512 CPU go through oneDNN. On Intel CPUs
MKL runs AVX-512 kernels itself, and torch.mm stays (oneDNN was not measured against it there).
MOEPP_ONEDNN_FP32=1 or 0 forces either way. bf16 products already go through oneDNN in torch.mm
on CPUs with AVX512-BF16. Results differ from torch.mm's as any two summation orders do (a few
fp32 ulps).

oneDNN compiles a kernel per shape: an expert's product at a new row count costs a compilation
the first time, after which its cache holds it (ONEDNN_PRIMITIVE_CACHE_CAPACITY shapes, 1024 by
default). Measured on that CPU (2 threads), 600 products of 60 to 200 rows (141 row counts) by
1024 by 1024: 0.77 ms each on the first pass, 0.64 ms cached, 1.45 ms through torch.mm; 60
products of about 2000 new rows: 12.2 ms each, 9.5 ms cached, 20.4 ms through torch.mm.

For the bodies of the moepp:: custom ops: no autograd, and autocast does not reach in (the
products run in their operands' dtype, as the ops' schemas say: the router's stay fp32 under
torch.autocast). Traced by torch.compile they are torch.mm / torch.addmm (inductor refuses
oneDNN's op with a weight that is not a graph constant).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_op_available() -> bool:
    """Whether this torch has oneDNN's matmul op (any x86 build with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_fp32() -> bool:
    forced = os.environ.get("MOEPP_ONEDNN_FP32", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"MOEPP_ONEDNN_FP32 must be 0 or 1, got {forced!r}")
    if not onednn_op_available():
        return False
    if forced:
        return forced == "1"
    return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and _cpu_vendor() not in ("", "GenuineIntel"))


ONEDNN_FP32 = _onednn_fp32()  # read once: the CPU, the build and the environment do not change


def uses_onednn(a: Tensor, b: Tensor | None = None) -> bool:
    """Whether mm(a, b) goes through oneDNN: fp32 CPU operands, none of M, K, N zero, where
    ONEDNN_FP32, torch.backends.mkldnn enabled and not traced by torch.compile."""
    return (ONEDNN_FP32 and a.dtype == torch.float32 and a.device.type == "cpu" and a.numel() > 0
            and (b is None or (b.dtype == torch.float32 and b.numel() > 0))
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling())


def _autocast_off(device_type: str):
    """A context in which torch's own products keep their operands' dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a [M, K] · b [K, N] -> [M, N] (into `out` when given), as torch.mm, in the operands' dtype.
    Any strides (oneDNN's op copies a transposed `a` contiguous first)."""
    if uses_onednn(a, b):
        product = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # a · (bᵀ)ᵀ
        return product if out is None else out.copy_(product)
    with _autocast_off(a.device.type):
        return torch.mm(a, b, out=out)


def mm_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a [M, K] · b [K, N] written into `out` itself by torch.mm, in the operands' dtype. oneDNN's
    op returns a fresh product instead, which mm copies: at [T, D] fp32 sizes the allocator maps
    it anew and faults it in on every call (the gate's dx at T 2048, D 1024: 2048 faults, a few
    ms). At few K torch.mm's product costs no more (K 96: 2.00 vs 2.02 ms with oneDNN's copy; K
    768: 16.7 vs 15.4 ms; 2 threads, Zen 4)."""
    with _autocast_off(a.device.type):
        return torch.mm(a, b, out=out)


def add_mm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """c [M, N] + a [M, K] · b [K, N], a new tensor, as torch.addmm(c, a, b), in the operands'
    dtype; through oneDNN the sum is the product's epilogue."""
    if uses_onednn(a, b) and c.dtype == torch.float32 and c.shape == (a.shape[0], b.shape[1]):
        return torch.ops.mkldnn._linear_pointwise.binary(a, c, b.t(), None, "add")
    with _autocast_off(a.device.type):
        return torch.addmm(c, a, b)
