"""Permutation plan: only the slots routed to FFN experts, stably sorted by
expert, so each expert's rows are contiguous (ARCHITECTURE.md, data flow).

Zero-computation slots (constant, copy, zero experts) get no row: they are
resolved in the combine epilogue. Buffers are sized T * k (an upper bound) so
shapes never depend on the routing and no host sync is needed; the true row
count lives on the device in offsets[n_ffn]. The kernel is the custom op
moepp::build_plan (_ops/plan.py).
"""

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C
from ._ops import call_op
from ._tensors import check_backend, check_tensor

# Check the values of the indices a public op reads through on CUDA too (a host sync per
# call); on the CPU they are always checked.
CHECK_INDICES = os.environ.get("MOEPP_CHECK_INDICES", "0") not in ("", "0")


class PermutationPlan(NamedTuple):
    """offsets [n_ffn + 1] int32: expert e owns rows [offsets[e], offsets[e+1]).
    row_src [T * k] int32: the slot (t * k + j) of each row; rows past
    offsets[n_ffn] are unused. slot_row [T, k] int32: each slot's row, -1 for
    zero-computation slots."""

    offsets: Tensor
    row_src: Tensor
    slot_row: Tensor


def build_plan(topk_ids: Tensor, n_ffn: int) -> PermutationPlan:
    """Plan for topk_ids [T, k] (int32) with experts [0, n_ffn) being FFN experts.
    Ids outside [0, n_ffn) (zero-computation experts) get no row."""
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32,), shape=(None, None))
    if not isinstance(n_ffn, int) or isinstance(n_ffn, bool) or not 0 <= n_ffn <= _C.MAX_PLAN_EXPERTS:
        raise ValueError(f"n_ffn must be an int in [0, {_C.MAX_PLAN_EXPERTS}], got {n_ffn!r}")
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"topk_ids: tokens * top_k must be < 2**31, got {topk_ids.numel()}")
    check_backend(topk_ids.device)
    return PermutationPlan(*call_op(torch.ops.moepp.build_plan, topk_ids, n_ffn))


def _first_bad(name: str, bad: Tensor, values: Tensor, what: str) -> None:
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(values[i])} {what}")


def check_plan(plan: object, tokens: int, top_k: int, n_ffn: int, device: torch.device,
               topk_ids: Optional[Tensor] = None, n_experts: int = 0) -> PermutationPlan:
    """Raises TypeError / ValueError naming the field unless `plan` is a plan for T = tokens
    tokens of top_k slots and n_ffn FFN experts on `device`. The values (offsets from 0,
    non-decreasing, within T * k; every row's slot in range and pointing back at the row;
    with topk_ids [T, k] of n_experts experts, ids in range and a row exactly for the FFN
    slots) are checked on the CPU always, O(T * k),
    and on CUDA when MOEPP_CHECK_INDICES=1 (it waits for the device); never while
    torch.compile traces (they need the values)."""
    if not isinstance(plan, PermutationPlan):
        raise TypeError(f"plan must be a PermutationPlan (from build_plan), got {type(plan).__name__}")
    slots = tokens * top_k
    check_tensor("plan.offsets", plan.offsets, dtypes=(torch.int32,), shape=(n_ffn + 1,), device=device)
    check_tensor("plan.row_src", plan.row_src, dtypes=(torch.int32,), shape=(slots,), device=device)
    check_tensor("plan.slot_row", plan.slot_row, dtypes=(torch.int32,), shape=(tokens, top_k), device=device)
    if torch.compiler.is_compiling() or (device.type == "cuda" and not CHECK_INDICES):
        return plan
    offsets = plan.offsets.cpu()
    steps = offsets.diff()
    if int(offsets[0]) != 0 or bool((steps < 0).any()) or int(offsets[-1]) > slots:
        raise ValueError(f"plan.offsets must rise from 0 without decreasing to at most T * k = {slots}; got "
                         f"{offsets.tolist() if offsets.numel() <= 32 else offsets}")
    rows = int(offsets[-1])
    row_src = plan.row_src[:rows].cpu().long()
    slot_row = plan.slot_row.reshape(-1).cpu().long()
    _first_bad("plan.row_src", (row_src < 0) | (row_src >= slots), row_src, f"is outside [0, T * k = {slots})")
    _first_bad("plan.slot_row", (slot_row < -1) | (slot_row >= rows), slot_row, f"is outside [-1, rows = {rows})")
    _first_bad("plan.row_src", slot_row[row_src] != torch.arange(rows), row_src,
               "names a slot whose plan.slot_row does not point back at this row")
    has_row = slot_row >= 0
    if int(has_row.sum()) != rows:
        raise ValueError(f"plan.slot_row gives {int(has_row.sum())} slots a row; plan.offsets has {rows} rows")
    if topk_ids is not None:
        ids = topk_ids.reshape(-1).cpu().long()
        _first_bad("topk_ids (flattened)", (ids < 0) | (ids >= n_experts), ids, f"is outside [0, {n_experts})")
        _first_bad("topk_ids (flattened)", ((ids >= 0) & (ids < n_ffn)) != has_row, ids,
                   "disagrees with the plan: FFN slots, and only they, have a row")
    return plan
