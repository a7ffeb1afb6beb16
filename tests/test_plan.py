"""The permutation plan against a plain-PyTorch stable sort."""

import pytest
import torch
from conftest import DEVICES

from moepp_kernels import build_plan


def expected_plan(ids: torch.Tensor, n_ffn: int):
    flat = ids.flatten().long().cpu()
    is_ffn = (flat >= 0) & (flat < n_ffn)
    slots = torch.nonzero(is_ffn).flatten()
    order = torch.sort(flat[slots], stable=True).indices
    row_src = slots[order]
    counts = torch.bincount(flat[slots], minlength=n_ffn)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    slot_row = torch.full_like(flat, -1)
    slot_row[row_src] = torch.arange(row_src.numel())
    return offsets, row_src, slot_row.view(ids.shape)


def check(ids, n_ffn):
    plan = build_plan(ids, n_ffn)
    offsets, row_src, slot_row = expected_plan(ids, n_ffn)
    m = int(offsets[-1])
    assert plan.offsets.dtype == plan.row_src.dtype == plan.slot_row.dtype == torch.int32
    assert torch.equal(plan.offsets.cpu().long(), offsets)
    assert torch.equal(plan.row_src[:m].cpu().long(), row_src)
    assert torch.equal(plan.slot_row.cpu().long(), slot_row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "tokens, k, n_experts, n_ffn",
    [
        (0, 2, 20, 16),  # T = 0
        (1, 1, 20, 16),  # T = 1, k = 1
        (37, 2, 20, 16),  # MoE++-7B layout
        (300, 6, 96, 64),  # LongCat-like
        (1000, 12, 768, 512),  # many experts
        (5000, 2, 12, 8),  # several chunks on the GPU
        (50, 3, 7, 7),  # no zero-computation experts, N not a power of two
        (40, 2, 5, 0),  # no FFN experts at all
    ],
)
def test_plan_matches_a_stable_sort(device, tokens, k, n_experts, n_ffn):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    check(ids.to(torch.int32).to(device), n_ffn)


@pytest.mark.parametrize("device", DEVICES)
def test_all_slots_to_one_expert_and_empty_experts(device):
    ids = torch.full((3000, 1), 5, dtype=torch.int32, device=device)  # experts 0-4 and 6-7 stay empty
    check(ids, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_all_slots_to_zero_computation_experts(device):
    ids = torch.randint(8, 12, (64, 2), dtype=torch.int32, device=device)
    plan = build_plan(ids, 8)
    assert plan.offsets.abs().sum() == 0 and (plan.slot_row == -1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_ids_get_no_row(device):
    ids = torch.tensor([[0, -3], [99, 1]], dtype=torch.int32, device=device)
    check(ids, 4)


def test_bad_input():
    with pytest.raises(TypeError, match="topk_ids"):
        build_plan(torch.zeros(4, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="topk_ids"):
        build_plan(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="contiguous"):
        build_plan(torch.zeros(2, 4, dtype=torch.int32).t(), 4)
    with pytest.raises(ValueError, match="n_ffn"):
        build_plan(torch.zeros(4, 2, dtype=torch.int32), -1)
    with pytest.raises(ValueError, match="n_ffn"):
        build_plan(torch.zeros(4, 2, dtype=torch.int32), 1025)
