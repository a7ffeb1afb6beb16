"""Triton kernels under TRITON_INTERPRET=1 against the reference (fp32, fp16: the
interpreter computes bf16 dots wrongly). Run by test_triton.py in a subprocess,
since the interpreter is chosen when triton.jit decorates the kernels."""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton.py"

from conftest import assert_layer_matches_reference, assert_norm_close  # noqa: E402

from moepp_kernels import MoEPPConfig, MoEPPLayer, build_plan, expert_ffn, triton_ffn  # noqa: E402
from moepp_kernels import reference as R  # noqa: E402

# Group sizes: ragged with empty groups, a single group, all rows in one of several groups.
GROUP_SIZES = {"ragged": [5, 0, 17, 1, 0, 9], "one_group": [23], "all_in_one": [0, 0, 31, 0]}


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("groups", list(GROUP_SIZES))
@pytest.mark.parametrize("n, k", [(40, 24), (19, 37)])  # not multiples of the 16-wide blocks
def test_grouped_products(dtype, groups, n, k):
    sizes = GROUP_SIZES[groups]
    offsets = offsets_of(sizes)
    rows = int(offsets[-1]) + 3  # rows past the total stay untouched
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    w = (torch.randn(len(sizes), n, k, generator=g) / k**0.5).to(dtype)
    out = triton_ffn.linear(a, w, offsets)
    gin = triton_ffn.linear_grad_input(dy, w, offsets)
    gw = triton_ffn.weight_grad(dy, a, offsets)
    for e in range(len(sizes)):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert_norm_close(out[lo:hi], a[lo:hi].float() @ w[e].float().t(), dtype, f"forward e={e}")
        assert_norm_close(gin[lo:hi], dy[lo:hi].float() @ w[e].float(), dtype, f"grad_input e={e}")
        assert_norm_close(gw[e], dy[lo:hi].float().t() @ a[lo:hi].float(), dtype, f"grad_weight e={e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dims", [(40, 24), (13, 7)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_expert_ffn_fused_gather_swiglu(dtype, dims, scale):
    d, i = dims
    cfg = MoEPPConfig(hidden_size=d, ffn_size=i, n_ffn=5, n_constant=2, n_copy=1, n_zero=1, top_k=3)
    tokens = 21
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:3] for _ in range(tokens)]).to(torch.int32)
    plan = build_plan(ids, cfg.n_ffn)
    x = torch.randn(tokens, d, generator=g).to(dtype).requires_grad_()
    up = (torch.randn(5, 2 * i, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    down = (torch.randn(5, d, i, generator=g) / i**0.5).to(dtype).requires_grad_()
    y = expert_ffn(x, up, down, plan, top_k=3, scale=scale, backend="triton")
    m = int(plan.offsets[-1])
    src = plan.row_src[:m].long()
    expected = torch.stack([R.ffn_expert(x[t:t + 1].float() * scale, up[e].float(), down[e].float())[0]
                            for t, e in zip((src // 3).tolist(), ids.flatten()[src].tolist())])
    assert_norm_close(y[:m], expected, dtype, "y")
    with torch.no_grad():  # the inference op writes no h
        y_inference = expert_ffn(x, up, down, plan, top_k=3, scale=scale, backend="triton")
    assert_norm_close(y_inference[:m], expected, dtype, "y (inference)")
    grad = torch.randn(m, d, generator=g)
    ours = torch.autograd.grad((y[:m].float() * grad).sum(), (x, up, down))
    ref = torch.autograd.grad((expected * grad).sum(), (x, up, down))
    for name, a, b in zip(("x", "up", "down"), ours, ref):
        assert_norm_close(a, b, dtype, name)


def test_layer_with_the_triton_backend():
    cfg = MoEPPConfig.moepp_0_6b().with_(hidden_size=32, ffn_size=16)
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, dtype=torch.float32, gemm_backend="triton")
    x = torch.randn(19, 32, requires_grad=True)
    assert_layer_matches_reference(layer, x, torch.float32)


def test_malformed_plans_stay_inside_the_buffers():
    """Offsets and row sources with any values (the public entry checks them on the CPU;
    the kernels must not leave their buffers either way): a slot naming no token reads
    zeros, groups are clamped to the rows there are."""
    from moepp_kernels._ops.expert_ffn import expert_ffn as expert_ffn_op

    d, i, tokens = 16, 8, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, d, generator=g)
    up, down = torch.randn(2, 2 * i, d, generator=g), torch.randn(2, d, i, generator=g)
    row_src = torch.tensor([0, 77_777, -3, 5, 6, 7, 1, 2], dtype=torch.int32)
    slot_row = torch.arange(8, dtype=torch.int32).reshape(tokens, 2)
    for offsets in ([0, 4, 8], [0, 6, 3], [-5, 40, 2**31 - 1]):
        offsets = torch.tensor(offsets, dtype=torch.int32)
        leaf = x.clone().requires_grad_()
        y, _ = expert_ffn_op(leaf, up.requires_grad_(), down.requires_grad_(), row_src, slot_row, offsets, 2, 1.0,
                             "triton")
        rows = int(offsets.clamp(0, 8)[-1])
        assert torch.isfinite(y[:rows]).all()
        y[:rows].sum().backward()  # the weight-gradient kernels read the same plan
        assert torch.isfinite(leaf.grad).all() and torch.isfinite(up.grad).all()
        up.grad = down.grad = None
    y, _ = expert_ffn_op(x, up, down, row_src, slot_row, torch.tensor([0, 4, 8], dtype=torch.int32), 2, 1.0,
                         "triton")
    assert torch.equal(y[1], torch.zeros(d)) and torch.equal(y[2], torch.zeros(d))
