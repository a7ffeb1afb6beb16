"""The fused top-k router with routing-score residuals (spec: "Router").

`fused_router` takes gate logits l [T, N] (fp32; fp64 for gradcheck) and runs
one kernel: l' = l + r·Gᵀ, optional normalisation, softmax / top-k, zero-expert
masking, renormalisation, scaling, per-expert counts and (optionally) the
per-expert probability sums for the load-balance loss. It is a torch.library
custom op with a fused backward, so torch.compile(fullgraph=True) traces it.
`MoEPPRouter` owns the gate weights and G and calls the gate GEMM first.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C
from ._tensors import check_backend, check_tensor, device_code, optional_view, stream_handle, view
from .config import MoEPPConfig

MAX_TOP_K: int = _C.ROUTER_MAX_TOP_K
MAX_EXPERTS: int = _C.ROUTER_MAX_EXPERTS
# Up to this many experts r·Gᵀ (N² FMAs a token) runs inside the router kernel
# with G staged in shared memory; above it, it is a GEMM (cuBLAS / BLAS) before
# the kernel, which is what pays once G no longer fits on chip.
RESIDUAL_IN_KERNEL_MAX_EXPERTS = 128
_GATING_CODES = {"softmax_topk": 0, "topk_softmax": 1}


class RouterOutput(NamedTuple):
    """What the router returns; T = tokens, N = experts, k = top_k.

    topk_ids: [T, k] int32. topk_weights: [T, k] gates (dtype of the logits).
    logits: [T, N] l + r·Gᵀ, to pass on to the next MoE++ layer.
    counts: [N] int32 slots per expert. f, P: [N] load-balance statistics (fraction
    of slots per expert, mean probability per expert; P carries gradients), or
    None unless asked for.
    """

    topk_ids: Tensor
    topk_weights: Tensor
    logits: Tensor
    counts: Tensor
    f: Optional[Tensor]
    P: Optional[Tensor]


def _router_options(num_experts: int, options: List[float]) -> "_C.RouterOptions":
    top_k, copy_begin, copy_end, zero_begin, gating, normalize, sigma, renormalize, scaling, scale_identity = options
    o = _C.RouterOptions()
    o.num_experts = num_experts
    o.top_k = int(top_k)
    o.copy_begin = int(copy_begin)
    o.copy_end = int(copy_end)
    o.zero_begin = int(zero_begin)
    o.gating = int(gating)
    o.normalize = bool(normalize)
    o.sigma = float(sigma)
    o.renormalize = bool(renormalize)
    o.scaling = float(scaling)
    o.scale_identity = bool(scale_identity)
    return o


def options_from_config(config: MoEPPConfig) -> List[float]:
    """The router's scalar options as the flat list the custom ops take."""
    return [
        float(config.top_k), float(config.copy_begin), float(config.zero_begin), float(config.zero_begin),
        float(_GATING_CODES[config.gating]), float(config.normalize_logits), float(config.logits_std),
        float(config.renormalize), float(config.routed_scaling_factor), float(config.scale_identity_weights),
    ]


@torch.library.custom_op("moepp::router_forward", mutates_args=())
def _router_forward(logits: Tensor, prev_logits: Optional[Tensor], residual_weight: Optional[Tensor],
                    selection_bias: Optional[Tensor], options: List[float],
                    with_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    tokens, n = logits.shape
    k = int(options[0])
    dev = logits.device
    ids = torch.empty((tokens, k), dtype=torch.int32, device=dev)
    weights = torch.empty((tokens, k), dtype=logits.dtype, device=dev)
    logits_out = torch.empty((tokens, n) if prev_logits is not None else (0,), dtype=logits.dtype, device=dev)
    counts = torch.zeros((n,), dtype=torch.int32, device=dev)
    partials = None
    if with_stats:
        partials = torch.empty((_C.router_partial_rows(tokens, n, device_code(dev)), n), dtype=logits.dtype,
                               device=dev)
    _C.router_forward(
        _router_options(n, options), view(logits), optional_view(prev_logits), optional_view(residual_weight),
        optional_view(selection_bias), view(ids), view(weights),
        view(logits_out) if prev_logits is not None else None, view(counts), optional_view(partials),
        torch.get_num_threads(), stream_handle(dev),
    )
    prob_sum = partials.sum(dim=0) if partials is not None else logits.new_empty((0,))
    return ids, weights, logits_out, counts, prob_sum


@_router_forward.register_fake
def _router_forward_fake(logits, prev_logits, residual_weight, selection_bias, options, with_stats):
    tokens, n = logits.shape
    k = int(options[0])
    return (
        logits.new_empty((tokens, k), dtype=torch.int32),
        logits.new_empty((tokens, k)),
        logits.new_empty((tokens, n) if prev_logits is not None else (0,)),
        logits.new_empty((n,), dtype=torch.int32),
        logits.new_empty((n,) if with_stats else (0,)),
    )


@torch.library.custom_op("moepp::router_backward", mutates_args=())
def _router_backward(grad_weights: Optional[Tensor], grad_logits_out: Optional[Tensor],
                     grad_prob_sum: Optional[Tensor], routed_logits: Tensor, ids: Tensor,
                     residual_weight: Optional[Tensor], options: List[float]) -> Tuple[Tensor, Tensor]:
    tokens, n = routed_logits.shape
    dev = routed_logits.device
    grad_logits = torch.empty_like(routed_logits)
    grad_prev = torch.empty_like(routed_logits) if residual_weight is not None else routed_logits.new_empty((0,))
    _C.router_backward(
        _router_options(n, options), view(routed_logits), view(ids), optional_view(grad_weights),
        optional_view(grad_logits_out), optional_view(grad_prob_sum), optional_view(residual_weight),
        view(grad_logits), view(grad_prev) if residual_weight is not None else None, torch.get_num_threads(),
        stream_handle(dev),
    )
    return grad_logits, grad_prev


@_router_backward.register_fake
def _router_backward_fake(grad_weights, grad_logits_out, grad_prob_sum, routed_logits, ids, residual_weight,
                          options):
    grad_prev_shape = routed_logits.shape if residual_weight is not None else (0,)
    return torch.empty_like(routed_logits), routed_logits.new_empty(grad_prev_shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, prev_logits, residual_weight, _bias, options, with_stats = inputs
    ids, _weights, logits_out, _counts, _prob_sum = output
    routed = logits_out if prev_logits is not None else logits
    ctx.save_for_backward(routed, ids, prev_logits, residual_weight)
    ctx.options = options
    ctx.with_stats = with_stats
    ctx.set_materialize_grads(False)


def _contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t.contiguous()


def _backward(ctx, _d_ids, d_weights, d_logits_out, _d_counts, d_prob_sum):
    routed, ids, prev_logits, residual_weight = ctx.saved_tensors
    grad_logits, grad_prev = torch.ops.moepp.router_backward(
        _contiguous_or_none(d_weights),
        _contiguous_or_none(d_logits_out) if prev_logits is not None else None,
        _contiguous_or_none(d_prob_sum) if ctx.with_stats else None,
        routed, ids, residual_weight, ctx.options,
    )
    grad_residual = None
    if prev_logits is not None:
        grad_residual = grad_logits.t() @ prev_logits  # dG = Σ_t dl'_tᵀ r_t, a GEMM over tokens
    else:
        grad_prev = None
    return grad_logits, grad_prev, grad_residual, None, None, None


torch.library.register_autograd("moepp::router_forward", _backward, setup_context=_setup_context)


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
        logits = torch.addmm(logits, prev_logits, residual_weight.t())
        prev_logits = residual_weight = None
    ids, weights, logits_out, counts, prob_sum = torch.ops.moepp.router_forward(
        logits, prev_logits, residual_weight, selection_bias, options_from_config(config), return_stats)
    passed_on = logits_out if prev_logits is not None else logits
    f = p = None
    if return_stats:
        f = counts.to(torch.float32) / max(tokens * k, 1)
        p = prob_sum / max(tokens, 1)
    return RouterOutput(ids, weights, passed_on, counts, f, p)


class MoEPPRouter(nn.Module):
    """Gate GEMM(s) in fp32 followed by the fused router.

    Parameters: `gate_weight` [N, D] (gate_depth 1) or `gate_w1` [8N, D] and
    `gate_w2` [N, 8N] (gate_depth 2); `residual_weight` G [N, N] when
    `has_residual`, applied when prev_logits is given (every MoE++ layer but the
    first, like the released layer); buffer `selection_bias` [N] when
    config.selection_bias.
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

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        if self.residual_weight is not None:
            nn.init.zeros_(self.residual_weight)

    def gate_logits(self, x: Tensor) -> Tensor:
        """fp32 logits [T, N] for x [T, D] (any float dtype)."""
        x32 = x.float()
        if self.config.gate_depth == 1:
            return F.linear(x32, self.gate_weight)
        return F.linear(torch.tanh(F.linear(x32, self.gate_w1)), self.gate_w2)

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
