"""The paper's expert capacity (spec: "The paper's training-side extras"), opt-in
with MoEPPConfig.capacity_factor = gamma:

    C_ffn = gamma * tau * S / (tau * n_ffn + n_zc)   per FFN expert
    C_zc  = gamma * S / (tau * n_ffn + n_zc)         per zero-computation expert

rounded up, with S = T * k the token slots (the spec writes T: counted in tokens,
gamma = 1.1 at top-2 would drop about half the slots of a balanced router; in
slots it leaves gamma - 1 headroom over the balanced load, its intent). An
expert keeps its first C slots in (token, slot) order, so the lowest token index
keeps its place; an over-capacity slot is dropped: it becomes a slot of the first
zero expert with weight 0 (no row, no FFN work, contributes exactly 0; the other
gates are not renormalised). Static shapes, no host sync: traced whole by
torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MoEPPConfig


def expert_capacity(config: MoEPPConfig, tokens: int) -> tuple[int, int]:
    """(C_ffn, C_zc) for `tokens` tokens (T * k slots)."""
    if config.capacity_factor is None:
        raise ValueError("config.capacity_factor is None: the layer has no expert capacity")
    n_zc = config.n_experts - config.n_ffn
    per = config.capacity_factor * tokens * config.top_k / (config.balance_tau * config.n_ffn + n_zc)
    return math.ceil(config.balance_tau * per), math.ceil(per)


def slot_positions(topk_ids: Tensor, n_experts: int) -> Tensor:
    """Each slot's place among its expert's slots in (token, slot) order, [T, k] int64: its
    row in the permutation plan over all n_experts experts (rows stably sorted by expert)
    less its expert's first row."""
    offsets, _, slot_row = torch.ops.moepp.build_plan(topk_ids, n_experts)
    return slot_row.long() - offsets.long()[topk_ids.long()]


def apply_capacity(topk_ids: Tensor, topk_weights: Tensor, config: MoEPPConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, weights, dropped_share): over-capacity slots become zero-expert slots of
    weight 0; dropped_share is the fraction of slots dropped (fp32 scalar tensor)."""
    c_ffn, c_zc = expert_capacity(config, topk_ids.shape[0])
    ids = topk_ids.long()
    limit = torch.where(ids < config.n_ffn, torch.full_like(ids, c_ffn), torch.full_like(ids, c_zc))
    dropped = slot_positions(topk_ids, config.n_experts) >= limit
    new_ids = torch.where(dropped, torch.full_like(topk_ids, config.zero_begin), topk_ids)
    new_weights = torch.where(dropped, torch.zeros_like(topk_weights), topk_weights)
    share = dropped.float().sum() / max(dropped.numel(), 1)
    return new_ids, new_weights, share
