"""The fused router's custom ops (private: moepp_kernels.fused_router is the API).

moepp::router_forward(logits, prev_logits?, residual_weight?, selection_bias?,
top_k, copy_begin, zero_begin, gating, normalize, sigma, renormalize, scaling,
scale_identity, with_stats) and its backward take the options as typed scalars
(RouterScalars, made from a MoEPPConfig by router_scalars). They are positional:
keyword-only scalars double the dispatcher's per-call cost (measured on torch
2.14: about 10 us more per op call for ten of them).
"""

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._tensors import device_code, optional_view, stream_handle, view
from ..config import MoEPPConfig
from . import custom_op, per_config

_GATING_CODES = {"softmax_topk": 0, "topk_softmax": 1}


class RouterScalars(NamedTuple):
    """The router ops' scalar arguments in schema order (copy experts are
    [copy_begin, zero_begin), zero experts [zero_begin, n_experts))."""

    top_k: int
    copy_begin: int
    zero_begin: int
    gating: str
    normalize: bool
    sigma: float
    renormalize: bool
    scaling: float
    scale_identity: bool


@per_config
def router_scalars(config: MoEPPConfig) -> RouterScalars:
    """RouterScalars of `config` (cached per config, which is frozen)."""
    return RouterScalars(config.top_k, config.copy_begin, config.zero_begin, config.gating, config.normalize_logits,
                         float(config.logits_std), config.renormalize, float(config.routed_scaling_factor),
                         config.scale_identity_weights)


def router_options(num_experts: int, scalars: RouterScalars) -> "_C.RouterOptions":
    """A new C++ RouterOptions for N = num_experts."""
    o = _C.RouterOptions()
    o.num_experts = num_experts
    o.top_k = scalars.top_k
    o.copy_begin = scalars.copy_begin
    o.copy_end = scalars.zero_begin
    o.zero_begin = scalars.zero_begin
    o.gating = _GATING_CODES[scalars.gating]
    o.normalize = scalars.normalize
    o.sigma = scalars.sigma
    o.renormalize = scalars.renormalize
    o.scaling = scalars.scaling
    o.scale_identity = scalars.scale_identity
    return o


@functools.lru_cache(maxsize=1024)
def _cached_options(num_experts: int, *scalars) -> "_C.RouterOptions":
    """The ops' options per (N, scalars), built once (the C++ side only reads them): a
    call costs a lookup instead of a dozen attribute writes."""
    return router_options(num_experts, RouterScalars(*scalars))


def _router_forward(logits: Tensor, prev_logits: Optional[Tensor], residual_weight: Optional[Tensor],
                    selection_bias: Optional[Tensor], top_k: int, copy_begin: int, zero_begin: int, gating: str,
                    normalize: bool, sigma: float, renormalize: bool, scaling: float, scale_identity: bool,
                    with_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(topk_ids [T, k] int32, topk_weights [T, k], logits_out [T, N] or [0] without
    prev_logits, counts [N] int32, prob_sum [N] or [0] without with_stats)."""
    tokens, n = logits.shape
    dev = logits.device
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=dev)
    weights = torch.empty((tokens, top_k), dtype=logits.dtype, device=dev)
    logits_out = torch.empty((tokens, n) if prev_logits is not None else (0,), dtype=logits.dtype, device=dev)
    counts = torch.zeros((n,), dtype=torch.int32, device=dev)
    partials = None
    if with_stats:
        partials = torch.empty((_C.router_partial_rows(tokens, n, device_code(dev)), n), dtype=logits.dtype,
                               device=dev)
    options = _cached_options(n, top_k, copy_begin, zero_begin, gating, normalize, sigma, renormalize, scaling,
                              scale_identity)
    _C.router_forward(options, view(logits), optional_view(prev_logits), optional_view(residual_weight),
                      optional_view(selection_bias), view(ids), view(weights),
                      view(logits_out) if prev_logits is not None else None, view(counts), optional_view(partials),
                      torch.get_num_threads(), stream_handle(dev))
    prob_sum = partials.sum(dim=0) if partials is not None else logits.new_empty((0,))
    return ids, weights, logits_out, counts, prob_sum


router_forward = custom_op("router_forward", _router_forward)


@router_forward.register_fake
def _router_forward_fake(logits, prev_logits, residual_weight, selection_bias, top_k, *options_and_stats):
    tokens, n = logits.shape
    return (
        logits.new_empty((tokens, top_k), dtype=torch.int32),
        logits.new_empty((tokens, top_k)),
        logits.new_empty((tokens, n) if prev_logits is not None else (0,)),
        logits.new_empty((n,), dtype=torch.int32),
        logits.new_empty((n,) if options_and_stats[-1] else (0,)),  # with_stats
    )


@torch.library.custom_op("moepp::router_backward", mutates_args=())
def router_backward(grad_weights: Optional[Tensor], grad_logits_out: Optional[Tensor],
                    grad_prob_sum: Optional[Tensor], routed_logits: Tensor, ids: Tensor,
                    residual_weight: Optional[Tensor], top_k: int, copy_begin: int, zero_begin: int, gating: str,
                    normalize: bool, sigma: float, renormalize: bool, scaling: float,
                    scale_identity: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dl' [T, N], dL/dr [T, N] or [0] without residual_weight)."""
    tokens, n = routed_logits.shape
    grad_logits = torch.empty_like(routed_logits)
    grad_prev = torch.empty_like(routed_logits) if residual_weight is not None else routed_logits.new_empty((0,))
    options = _cached_options(n, top_k, copy_begin, zero_begin, gating, normalize, sigma, renormalize, scaling,
                              scale_identity)
    _C.router_backward(options, view(routed_logits), view(ids), optional_view(grad_weights),
                       optional_view(grad_logits_out), optional_view(grad_prob_sum), optional_view(residual_weight),
                       view(grad_logits), view(grad_prev) if residual_weight is not None else None,
                       torch.get_num_threads(), stream_handle(routed_logits.device))
    return grad_logits, grad_prev


@router_backward.register_fake
def _router_backward_fake(grad_weights, grad_logits_out, grad_prob_sum, routed_logits, ids, residual_weight,
                          *_options):
    grad_prev_shape = routed_logits.shape if residual_weight is not None else (0,)
    return torch.empty_like(routed_logits), routed_logits.new_empty(grad_prev_shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, prev_logits, residual_weight, _bias, *scalars, with_stats = inputs
    ids, _weights, logits_out, _counts, _prob_sum = output
    routed = logits_out if prev_logits is not None else logits
    ctx.save_for_backward(routed, ids, prev_logits, residual_weight)
    ctx.scalars = scalars
    ctx.with_stats = with_stats
    ctx.set_materialize_grads(False)


def _contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t.contiguous()


# None for the ten scalar inputs (no gradient).
_NO_SCALAR_GRADS = (None,) * (len(RouterScalars._fields) + 1)


def _backward(ctx, _d_ids, d_weights, d_logits_out, _d_counts, d_prob_sum):
    """Gradients for (logits, prev_logits, residual_weight, selection_bias, scalars...)."""
    routed, ids, prev_logits, residual_weight = ctx.saved_tensors
    grad_logits, grad_prev = torch.ops.moepp.router_backward(
        _contiguous_or_none(d_weights),
        _contiguous_or_none(d_logits_out) if prev_logits is not None else None,
        _contiguous_or_none(d_prob_sum) if ctx.with_stats else None,
        routed, ids, residual_weight, *ctx.scalars,
    )
    if prev_logits is None:
        return grad_logits, None, None, None, *_NO_SCALAR_GRADS
    grad_residual = grad_logits.t() @ prev_logits  # dG = Σ_t dl'_tᵀ r_t, a GEMM over tokens
    return grad_logits, grad_prev, grad_residual, None, *_NO_SCALAR_GRADS


torch.library.register_autograd("moepp::router_forward", _backward, setup_context=_setup_context)
