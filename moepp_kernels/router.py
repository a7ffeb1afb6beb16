"""The fused top-k router with routing-score residuals (spec: "Router").

`fused_router` takes gate logits l [T, N] (fp32; fp64 for gradcheck) and runs
one kernel: l' = l + r·Gᵀ, optional normalisation, softmax / top-k, zero-expert
masking, renormalisation, scaling, per-expert counts and (optionally) the
per-expert probability sums for the load-balance loss. The kernel is the
torch.library custom op moepp::router_forward (_ops/router.py) with a fused
backward, so torch.compile(fullgraph=True) traces it. `MoEPPRouter` owns the
gate weights and G and calls the gate GEMM first.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import _C
from ._ops import call_op
from ._ops import gate as _gate  # noqa: F401 (registers moepp::gate_linear)
from ._ops.router import router_scalars
from ._tensors import check_backend, check_tensor
from .capacity import apply_capacity
from .config import MoEPPConfig

MAX_TOP_K: int = _C.ROUTER_MAX_TOP_K
MAX_EXPERTS: int = _C.ROUTER_MAX_EXPERTS
# Up to this many experts r·Gᵀ (N² FMAs a token) runs inside the router kernel
# with G staged in shared memory; above it, it is a GEMM (cuBLAS / BLAS) before
# the kernel, which is what pays once G no longer fits on chip.
RESIDUAL_IN_KERNEL_MAX_EXPERTS = 128


class RouterOutput(NamedTuple):
    """What the router returns; T = tokens, N = experts, k = top_k.

    topk_ids: [T, k] int32. topk_weights: [T, k] gates (dtype of the logits).
    logits: [T, N] l + r·Gᵀ, to pass on to the next MoE++ layer.
    counts: [N] int32 slots per expert as chosen (before any capacity drop). f, P:
    [N] load-balance statistics (fraction of slots per expert, mean probability per
    expert; P carries gradients), or None unless asked for. dropped: with expert
    capacity (config.capacity_factor), the fraction of slots dropped (fp32 scalar
    tensor; ids and weights are then the ones after the drop, capacity.py), else None.
    """

    topk_ids: Tensor
    topk_weights: Tensor
    logits: Tensor
    counts: Tensor
    f: Optional[Tensor]
    P: Optional[Tensor]
    dropped: Optional[Tensor] = None


def fused_router(logits: Tensor, config: MoEPPConfig, *, prev_logits: Optional[Tensor] = None,
                 residual_weight: Optional[Tensor] = None, selection_bias: Optional[Tensor] = None,
                 return_stats: bool = False) -> RouterOutput:
    """Route T tokens among N = config.n_experts experts.

    Args:
        logits: [T, N] gate logits, float32 (float64 accepted, for gradcheck).
        config: layout and routing options.
        prev_logits: [T, N] logits passed on by the previous MoE++ layer (r).
        residual_weight: [N, N] this layer's G; given exactly with prev_logits.
        selection_bias: [N] selection bias (chooses by score + bias).
        return_stats: also return the load-balance statistics f and P.
    Returns:
        RouterOutput (see its docstring). Differentiable w.r.t. logits,
        prev_logits and residual_weight through topk_weights, logits and P.
    """
    if not isinstance(config, MoEPPConfig):
        raise TypeError(f"config must be a MoEPPConfig, got {type(config).__name__}")
    n, k = config.n_experts, config.top_k
    if n > MAX_EXPERTS:
        raise ValueError(f"config.n_experts must be <= {MAX_EXPERTS} for the fused router, got {n}")
    if k > MAX_TOP_K:
        raise ValueError(f"config.top_k must be <= {MAX_TOP_K} for the fused router, got {k}")
    check_tensor("logits", logits, dtypes=(torch.float32, torch.float64), shape=(None, n))
    dtype, dev = logits.dtype, logits.device
    tokens = logits.shape[0]
    if tokens * k >= 2**31:
        raise ValueError(f"logits: tokens * top_k must be < 2**31, got {tokens} * {k}")
    if (prev_logits is None) != (residual_weight is None):
        missing = "residual_weight" if residual_weight is None else "prev_logits"
        raise ValueError(f"{missing} is required: prev_logits and residual_weight go together")
    if prev_logits is not None:
        check_tensor("prev_logits", prev_logits, dtypes=(dtype,), shape=(tokens, n), device=dev)
        check_tensor("residual_weight", residual_weight, dtypes=(dtype,), shape=(n, n), device=dev)
    if selection_bias is not None:
        check_tensor("selection_bias", selection_bias, dtypes=(dtype,), shape=(n,), device=dev)
    check_backend(dev)
    if prev_logits is not None and n > RESIDUAL_IN_KERNEL_MAX_EXPERTS:
        logits = call_op(torch.ops.moepp.residual_logits, logits, prev_logits, residual_weight)
        prev_logits = residual_weight = None
    ids, weights, logits_out, counts, prob_sum = call_op(
        torch.ops.moepp.router_forward, logits, prev_logits, residual_weight, selection_bias, *router_scalars(config),
        return_stats)
    passed_on = logits_out if prev_logits is not None else logits
    f = p = dropped = None
    if return_stats:
        f = counts.to(torch.float32) / max(tokens * k, 1)
        p = prob_sum / max(tokens, 1)
    if config.capacity_factor is not None:
        ids, weights, dropped = apply_capacity(ids, weights, config)
    return RouterOutput(ids, weights, passed_on, counts, f, p, dropped)


class MoEPPRouter(nn.Module):
    """Gate GEMM(s) in fp32 followed by the fused router.

    Parameters: `gate_weight` [N, D] (gate_depth 1) or `gate_w1` [8N, D] and
    `gate_w2` [N, 8N] (gate_depth 2); `residual_weight` G [N, N] when
    `has_residual`, applied when prev_logits is given (every MoE++ layer but the
    first, like the released layer); buffer `selection_bias` [N] when
    config.selection_bias. All float32 whatever the model is cast to.
    """

    def __init__(self, config: MoEPPConfig, has_residual: bool = False, device: Optional[torch.device] = None):
        super().__init__()
        self.config = config
        n, d = config.n_experts, config.hidden_size
        kw = {"device": device, "dtype": torch.float32}
        if config.gate_depth == 1:
            self.gate_weight = nn.Parameter(torch.empty(n, d, **kw))
        else:
            self.gate_w1 = nn.Parameter(torch.empty(8 * n, d, **kw))
            self.gate_w2 = nn.Parameter(torch.empty(n, 8 * n, **kw))
        self.residual_weight = nn.Parameter(torch.empty(n, n, **kw)) if has_residual else None
        if config.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(n, **kw))
        else:
            self.selection_bias = None
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        """Device moves apply to the router; dtype casts (`.to(torch.bfloat16)`, `.half()`,
        a model-wide `torch_dtype`) do not: its parameters, buffers and grads stay float32
        (spec: "Router (all in fp32)"), each converted from its original, not round-tripped."""

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_float32, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A bf16 / fp16 checkpoint's router tensors are read as float32, also with load_state_dict(assign=True),
        # which would otherwise adopt the checkpoint's dtype (state_dict is load_state_dict's own copy).
        for name in (*self._parameters, *self._buffers):
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                state_dict[prefix + name] = t.float()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        if self.residual_weight is not None:
            nn.init.zeros_(self.residual_weight)

    def gate_logits(self, x: Tensor) -> Tensor:
        """fp32 logits [T, N] for x [T, D] (any float dtype)."""
        first = self.gate_weight if self.config.gate_depth == 1 else self.gate_w1
        h = call_op(torch.ops.moepp.gate_linear, x, first)
        return h if self.config.gate_depth == 1 else call_op(torch.ops.moepp.gate_linear, torch.tanh(h), self.gate_w2)

    def forward(self, x: Tensor, prev_logits: Optional[Tensor] = None, return_stats: bool = False) -> RouterOutput:
        """Route x [..., D] (flattened to [T, D]); prev_logits [T, N] from the previous layer."""
        check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=None)
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must have hidden size {self.config.hidden_size} in its last dim, got {x.shape[-1]}")
        if prev_logits is not None and self.residual_weight is None:
            raise ValueError("prev_logits was given but this router has no residual weight (has_residual=False)")
        logits = self.gate_logits(x.reshape(-1, x.shape[-1]))
        residual_weight = self.residual_weight if prev_logits is not None else None
        return fused_router(logits, self.config, prev_logits=prev_logits, residual_weight=residual_weight,
                            selection_bias=self.selection_bias, return_stats=return_stats)
