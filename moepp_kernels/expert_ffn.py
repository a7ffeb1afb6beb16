"""The FFN experts on permuted rows (spec: "Experts"): fused gather (x*k folded
in) -> grouped GEMM 1 -> fused SwiGLU -> grouped GEMM 2, keeping only GEMM 1's
output for the backward. The custom ops are in _ops/expert_ffn.py; this is the
validating entry point.
"""

import math

from torch import Tensor

from . import grouped_gemm
from ._ops.expert_ffn import apply_expert_ffn
from ._tensors import MODEL_DTYPES, check_backend, check_tensor
from .permute import check_plan


def expert_ffn(x: Tensor, up: Tensor, down: Tensor, plan, *, top_k: int, scale: float = 1.0,
               backend: str = "auto") -> Tensor:
    """y [T * top_k, D]: the FFN experts' outputs by permuted row (rows past
    plan.offsets[-1] are unused).

    Args:
        x: [T, D] float32, bfloat16 or float16.
        up: [n_ffn, 2I, D] (gate rows, then up rows); down: [n_ffn, D, I]; x's dtype and device.
        plan: the PermutationPlan of the tokens' [T, top_k] expert ids (build_plan).
        top_k: slots per token.
        scale: multiplies x on its way into the experts (the x*k flag).
        backend: a grouped-GEMM backend (grouped_gemm.BACKENDS); "auto" picks one.
    Differentiable w.r.t. x, up and down. The plan's indices are checked on the CPU
    (O(T * k)), raising ValueError. On CUDA a check would wait for the device: it runs
    only with MOEPP_CHECK_INDICES=1; otherwise the kernels (CUDA, CUTLASS's arguments,
    Triton) clamp the offsets into the buffers and read a slot naming no token as zeros.
    """
    check_tensor("x", x, dtypes=MODEL_DTYPES, shape=(None, None))
    tokens, d = x.shape
    check_tensor("up", up, dtypes=(x.dtype,), shape=(None, None, d), device=x.device)
    n_ffn, two_i = up.shape[0], up.shape[1]
    if two_i % 2:
        raise ValueError(f"up must have an even row count 2I (gate rows, then up rows), got {two_i}")
    check_tensor("down", down, dtypes=(x.dtype,), shape=(n_ffn, d, two_i // 2), device=x.device)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    check_backend(x.device)
    check_plan(plan, tokens, top_k, n_ffn, x.device)
    resolved = grouped_gemm.resolve_backend(backend, x.device, x.dtype, (d, two_i // 2))
    return apply_expert_ffn(x, up, down, plan, top_k, float(scale), resolved)
