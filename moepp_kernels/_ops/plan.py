"""The permutation plan's custom op (private: moepp_kernels.build_plan is the API)."""

from typing import Tuple

import torch
from torch import Tensor

from .. import _C
from .._tensors import stream_handle, view
from . import custom_op


def _build_plan(topk_ids: Tensor, n_ffn: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(offsets [n_ffn + 1], row_src [T * k], slot_row [T, k]), all int32."""
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


build_plan = custom_op("build_plan", _build_plan)


@build_plan.register_fake
def _build_plan_fake(topk_ids, n_ffn):
    return (topk_ids.new_empty((n_ffn + 1,)), topk_ids.new_empty((topk_ids.numel(),)), torch.empty_like(topk_ids))
