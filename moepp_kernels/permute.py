"""Permutation plan: only the slots routed to FFN experts, stably sorted by
expert, so each expert's rows are contiguous (ARCHITECTURE.md, data flow).

Zero-computation slots (constant, copy, zero experts) get no row: they are
resolved in the combine epilogue. Buffers are sized T * k (an upper bound) so
shapes never depend on the routing and no host sync is needed; the true row
count lives on the device in offsets[n_ffn].
"""

from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from . import _C
from ._tensors import check_backend, check_tensor, stream_handle, view


class PermutationPlan(NamedTuple):
    """offsets [n_ffn + 1] int32: expert e owns rows [offsets[e], offsets[e+1]).
    row_src [T * k] int32: the slot (t * k + j) of each row; rows past
    offsets[n_ffn] are unused. slot_row [T, k] int32: each slot's row, -1 for
    zero-computation slots."""

    offsets: Tensor
    row_src: Tensor
    slot_row: Tensor


@torch.library.custom_op("moepp::build_plan", mutates_args=())
def _build_plan(topk_ids: Tensor, n_ffn: int) -> Tuple[Tensor, Tensor, Tensor]:
    dev = topk_ids.device
    offsets = torch.empty(n_ffn + 1, dtype=torch.int32, device=dev)
    row_src = torch.empty(topk_ids.numel(), dtype=torch.int32, device=dev)
    slot_row = torch.empty_like(topk_ids)
    workspace = None
    if dev.type == "cuda":
        workspace = torch.empty(_C.plan_workspace_ints(topk_ids.numel(), n_ffn), dtype=torch.int32, device=dev)
    _C.build_plan(view(topk_ids), n_ffn, view(offsets), view(row_src), view(slot_row),
                  None if workspace is None else view(workspace), stream_handle(dev))
    return offsets, row_src, slot_row


@_build_plan.register_fake
def _build_plan_fake(topk_ids, n_ffn):
    return (topk_ids.new_empty((n_ffn + 1,)), topk_ids.new_empty((topk_ids.numel(),)), torch.empty_like(topk_ids))


def build_plan(topk_ids: Tensor, n_ffn: int) -> PermutationPlan:
    """Plan for topk_ids [T, k] (int32) with experts [0, n_ffn) being FFN experts.
    Ids outside [0, n_ffn) (zero-computation experts) get no row."""
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32,), shape=(None, None))
    if not isinstance(n_ffn, int) or not 0 <= n_ffn <= _C.MAX_PLAN_EXPERTS:
        raise ValueError(f"n_ffn must be an int in [0, {_C.MAX_PLAN_EXPERTS}], got {n_ffn!r}")
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"topk_ids: tokens * top_k must be < 2**31, got {topk_ids.numel()}")
    check_backend(topk_ids.device)
    return PermutationPlan(*torch.ops.moepp.build_plan(topk_ids, n_ffn))
