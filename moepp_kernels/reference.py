"""Plain-PyTorch reference of a MoE++ layer, written from spec/moepp-semantics.md.

The oracle of every test and the baseline of every benchmark: readable, not fast.
Section names in comments refer to the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MoEPPConfig


class ReferenceRouting(NamedTuple):
    topk_ids: Tensor  # [T, k] int64
    topk_weights: Tensor  # [T, k], dtype of the logits
    logits: Tensor  # [T, N] l after the residual: passed on to the next layer
    probs: Tensor  # [T, N] p = softmax(z) over all experts


@dataclass
class MoEPPParams:
    """The tensors of one layer. Gate: `gate_weight` [N, D] (depth 1) or
    `gate_w1` [8N, D] and `gate_w2` [N, 8N] (depth 2), all fp32; `residual_weight`
    G [N, N] (None in the first layer); `selection_bias` [N] or None;
    `up` [n_ffn, 2I, D], `down` [n_ffn, D, I], `const_gate` [n_constant, 2, D],
    `const_value` [n_constant, D] in the model dtype."""

    up: Tensor
    down: Tensor
    const_gate: Tensor
    const_value: Tensor
    gate_weight: Tensor | None = None
    gate_w1: Tensor | None = None
    gate_w2: Tensor | None = None
    residual_weight: Tensor | None = None
    selection_bias: Tensor | None = None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the model dtypes; fp64 for a float64 run (the tests' high-precision oracle)."""
    return torch.promote_types(dtype, torch.float32)


def gate_logits(x: Tensor, params: MoEPPParams) -> Tensor:
    """Router step 1: fp32 logits [T, N] from x [T, D] (gate weights taken in fp32;
    fp64 for a float64 x)."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    if params.gate_weight is not None:
        return xa @ params.gate_weight.to(acc).t()
    return torch.tanh(xa @ params.gate_w1.to(acc).t()) @ params.gate_w2.to(acc).t()


def _nan_to_neg_inf(v: Tensor) -> Tensor:
    return torch.where(torch.isnan(v), torch.full_like(v, float("-inf")), v)


def safe_softmax(z: Tensor) -> Tensor:
    """Softmax over the last dim with the limits the spec defines: NaN counts as
    -inf; a row with no finite or +inf value gives all zeros; +inf entries share
    the mass equally. Gradients are 0 where the result is constant."""
    z = _nan_to_neg_inf(z)
    row_max = z.amax(dim=-1, keepdim=True)
    finite_row = torch.isfinite(row_max)
    p = torch.softmax(torch.where(finite_row, z, torch.zeros_like(z)), dim=-1)
    is_pos_inf = (z == float("inf")).to(z.dtype)
    inf_share = is_pos_inf / is_pos_inf.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(finite_row, p, inf_share)


def normalize_logits(logits: Tensor, sigma: float) -> Tensor:
    """Router step 3: z = l / (std(l) / sigma), unbiased std over the experts.
    Skipped (z = l) for a row whose std is 0 or not finite, when N == 1, or when
    sigma / std overflows (spec: "Known failure modes")."""
    n = logits.shape[-1]
    if n == 1:
        return logits
    row_finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
    safe = torch.where(row_finite, logits, torch.zeros_like(logits))
    var = ((safe - safe.mean(dim=-1, keepdim=True)) ** 2).sum(dim=-1, keepdim=True) / (n - 1)
    usable = row_finite & torch.isfinite(var) & (var > 0)
    scale = sigma / torch.sqrt(torch.where(usable, var, torch.ones_like(var)))
    usable = usable & torch.isfinite(scale)
    return torch.where(usable, logits * torch.where(usable, scale, torch.ones_like(scale)), logits)


def route(logits: Tensor, config: MoEPPConfig, prev_logits: Tensor | None = None,
          residual_weight: Tensor | None = None, selection_bias: Tensor | None = None) -> ReferenceRouting:
    """Router steps 2-5 from gate logits l [T, N]."""
    n, k = config.n_experts, config.top_k
    if logits.shape[-1] != n:
        raise ValueError(f"logits: expected {n} experts in the last dimension, got {logits.shape[-1]}")
    routed = logits if prev_logits is None else logits + prev_logits @ residual_weight.t()  # step 2
    z = normalize_logits(routed, config.logits_std) if config.normalize_logits else routed  # step 3
    probs = safe_softmax(z)
    score = probs if config.gating == "softmax_topk" else _nan_to_neg_inf(z)
    if selection_bias is not None:
        score = _nan_to_neg_inf(score + selection_bias)
    # Top-k with ties to the lowest id: a stable descending sort keeps id order among equals.
    ids = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]

    is_zero = ids >= config.zero_begin
    if config.gating == "softmax_topk":
        gates = torch.where(is_zero, torch.zeros_like(probs[:, :k]), probs.gather(-1, ids))
        if config.renormalize:
            total = gates.sum(dim=-1, keepdim=True)
            has_mass = total > 0
            gates = torch.where(has_mass, gates / torch.where(has_mass, total, torch.ones_like(total)),
                                torch.zeros_like(gates))
    else:
        gates = safe_softmax(z.gather(-1, ids))
    is_copy = (ids >= config.copy_begin) & (ids < config.zero_begin)
    unscaled = is_copy if not config.scale_identity_weights else torch.zeros_like(is_copy)
    scale = torch.where(unscaled, torch.ones_like(gates), torch.full_like(gates, config.routed_scaling_factor))
    weights = gates * scale
    if config.capacity_factor is not None:
        ids, weights = _capacity_drop(ids, weights, config)
    return ReferenceRouting(ids, weights, routed, probs)


def _capacity_drop(ids: Tensor, weights: Tensor, config: MoEPPConfig) -> tuple[Tensor, Tensor]:
    """Expert capacity (spec: training-side extras; capacity.py has the rounding): an expert keeps
    its first C slots in (token, slot) order; the others become first-zero-expert slots of weight 0."""
    tokens, k = ids.shape
    n_zc = config.n_experts - config.n_ffn
    per = config.capacity_factor * tokens * k / (config.balance_tau * config.n_ffn + n_zc)
    limit = torch.full((config.n_experts,), math.ceil(per), dtype=torch.long, device=ids.device)
    limit[: config.n_ffn] = math.ceil(config.balance_tau * per)
    one_hot = F.one_hot(ids.reshape(-1), config.n_experts)
    place = ((one_hot.cumsum(0) - one_hot) * one_hot).sum(-1).reshape(tokens, k)  # earlier slots, same expert
    dropped = place >= limit[ids]
    return (torch.where(dropped, torch.full_like(ids, config.zero_begin), ids),
            torch.where(dropped, torch.zeros_like(weights), weights))


def load_balance_stats(routing: ReferenceRouting, config: MoEPPConfig) -> tuple[Tensor, Tensor]:
    """f_i (fraction of token-slots routed to expert i, fp32) and P_i (mean router
    probability of expert i); zeros when there are no tokens."""
    tokens = routing.topk_ids.shape[0]
    counts = torch.bincount(routing.topk_ids.flatten(), minlength=config.n_experts)
    f = counts.to(torch.float32) / max(tokens * config.top_k, 1)
    p = routing.probs.sum(dim=0) / max(tokens, 1)
    return f, p


def load_balance_loss(f: Tensor, p: Tensor, config: MoEPPConfig) -> Tensor:
    """L_b = sum_i eta_i f_i P_i; eta_i = 1 for FFN experts, tau for the others."""
    eta = torch.full((config.n_experts,), config.balance_tau, dtype=p.dtype, device=p.device)
    eta[: config.n_ffn] = 1.0
    return (eta * f.to(p.dtype) * p).sum()


def ffn_expert(x: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """y = (silu(gate) * up) @ V_eᵀ with [gate | up] = x @ U_eᵀ."""
    h = x @ up.t()
    gate, up_part = h.chunk(2, dim=-1)
    return (F.silu(gate) * up_part) @ down.t()


def constant_expert(x: Tensor, const_gate: Tensor, const_value: Tensor) -> Tensor:
    """y = a1 * x + a2 * v with [a1, a2] = softmax(x @ W_cᵀ)."""
    a = torch.softmax(x @ const_gate.t(), dim=-1)
    return a[:, :1] * x + a[:, 1:] * const_value


def experts_combine(x: Tensor, routing: ReferenceRouting, params: MoEPPParams, config: MoEPPConfig) -> Tensor:
    """out[t] = sum over the k slots of gate * y_expert(x_e[t]), accumulated in
    fp32 (fp64 for a float64 x) and returned in the model dtype (spec: "Experts", "Combine")."""
    x_e = x * config.top_k if config.scale_input_by_topk else x  # a new tensor: the caller's x is untouched
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for expert in range(config.n_experts):
        token, slot = torch.nonzero(routing.topk_ids == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        kind = config.expert_kind(expert)
        if kind == "zero":
            continue
        xs = x_e[token]
        if kind == "ffn":
            y = ffn_expert(xs, params.up[expert], params.down[expert])
        elif kind == "constant":
            c = expert - config.constant_begin
            y = constant_expert(xs, params.const_gate[c], params.const_value[c])
        else:
            y = xs
        gate = routing.topk_weights[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, gate.to(acc) * y.to(acc))
    return out.to(x.dtype)


def moepp_layer(x: Tensor, params: MoEPPParams, config: MoEPPConfig,
                prev_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The whole layer: (out [..., D], routed logits [T, N]) for x [..., D]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    routing = route(gate_logits(x2, params), config, prev_logits, params.residual_weight, params.selection_bias)
    return experts_combine(x2, routing, params, config).reshape(shape), routing.logits
