"""The CPU's fused bf16 first half of the experts (csrc/moe/up_swiglu_bf16.h: gather, GEMM 1 and
SwiGLU in one pass): h against the fp64 product of the scaled gathered rows, a bit for bit as
swiglu_forward computes it from that h, the layer through it against the unfused route, and
clear errors for bad input (checked before the CPU's: run everywhere). The kernel's tests are
skipped on CPUs without AVX512-BF16."""

import pytest
import torch
from conftest import assert_close, assert_norm_close

from moepp_kernels import _C, MoEPPConfig, MoEPPLayer, build_plan
from moepp_kernels._ops import expert_ffn
from moepp_kernels._tensors import view

needs_bf16_cpu = pytest.mark.skipif(not _C.up_swiglu_bf16_supported(), reason="needs a CPU with AVX512-BF16")


def run(x, up, row_src, offsets, top_k, scale, keep_h=True):
    rows, inner = row_src.shape[0], up.shape[1] // 2
    a = torch.full((rows, inner), float("nan"), dtype=torch.bfloat16)
    h = torch.full((rows, 2 * inner), float("nan"), dtype=torch.bfloat16) if keep_h else None
    _C.up_swiglu_bf16(view(x), view(row_src), view(offsets), view(up), top_k, scale, view(a),
                      None if h is None else view(h), 2)
    return a, h


def expected_h(x, up, row_src, offsets, top_k, scale):
    """scale * x[token(r)] · U_eᵀ in fp64 (zero rows for slots that name no token)."""
    tokens = x.shape[0]
    src = row_src.long()
    valid = (src >= 0) & (src < tokens * top_k)
    xg = torch.zeros(src.shape[0], x.shape[1], dtype=torch.float64)
    xg[valid] = x.double()[src[valid] // top_k]
    h = torch.empty(src.shape[0], up.shape[1], dtype=torch.float64)
    for e in range(up.shape[0]):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        h[lo:hi] = scale * xg[lo:hi] @ up[e].double().t()
    return h


def swiglu_of(h):
    a = torch.empty(h.shape[0], h.shape[1] // 2, dtype=torch.bfloat16)
    rows = torch.tensor([h.shape[0]], dtype=torch.int32)  # a one-expert plan (kept alive through the call)
    _C.swiglu_forward(view(h), view(rows), view(a), 1, 0)
    return a


# (tokens, D, I, n_ffn, k, scale): T = 0; T = 1 with D = 2; rows not a multiple of the 6-row tile;
# one panel (I 32) and three (odd across two workers); K pairs not a multiple of the 16-pair
# transpose (D 70); x*k scale 2 (exact) and 1.5; LongCat-like widths
CASES = [(0, 64, 32, 4, 2, 1.0), (1, 2, 32, 3, 1, 1.0), (37, 64, 32, 4, 2, 2.0), (50, 70, 96, 5, 3, 1.5),
         (300, 256, 64, 8, 6, 1.0)]


@needs_bf16_cpu
@pytest.mark.parametrize("tokens, dim, inner, n_ffn, top_k, scale", CASES)
@pytest.mark.parametrize("keep_h", [True, False])
def test_matches_the_product_and_swiglu(tokens, dim, inner, n_ffn, top_k, scale, keep_h):
    g = torch.Generator().manual_seed(tokens + dim)
    x = torch.randn(tokens, dim, generator=g).bfloat16()
    up = (torch.randn(n_ffn, 2 * inner, dim, generator=g) * dim ** -0.5).bfloat16()
    # two zero-computation experts beside the FFN ones: their slots get no row of the plan
    plan = build_plan(torch.randint(0, n_ffn + 2, (tokens, top_k), generator=g, dtype=torch.int32), n_ffn)
    row_src, offsets = plan.row_src, plan.offsets
    a, h = run(x, up, row_src, offsets, top_k, scale, keep_h)
    rows = offsets[-1].item()
    a, h = a[:rows], None if h is None else h[:rows]
    want = expected_h(x, up, row_src, offsets, top_k, scale)[:rows]
    if keep_h:
        assert_close(h.double(), want, torch.bfloat16, "h")
        assert torch.equal(a, swiglu_of(h))  # a from the rounded h, as swiglu_forward computes it
    else:
        assert_close(a.double(), swiglu_of(want.bfloat16()).double(), torch.bfloat16, "a")


@needs_bf16_cpu
def test_empty_experts_all_rows_to_one_and_slots_naming_no_token():
    # experts 0 and 2 get no rows, expert 1 all; slot -1 and slot T * k name no token: zero rows
    g = torch.Generator().manual_seed(3)
    x, up = torch.randn(10, 64, generator=g).bfloat16(), torch.randn(3, 64, 64, generator=g).bfloat16()
    row_src = torch.tensor([0, 5, -1, 19, 20, 7], dtype=torch.int32)
    offsets = torch.tensor([0, 0, 6, 6], dtype=torch.int32)
    a, h = run(x, up, row_src, offsets, 2, 1.0)
    assert_close(h.double(), expected_h(x, up, row_src, offsets, 2, 1.0), torch.bfloat16, "h")
    assert torch.equal(h[[2, 4]], torch.zeros(2, 64, dtype=torch.bfloat16))
    assert torch.equal(a, swiglu_of(h))


@needs_bf16_cpu
def test_rows_past_the_plan_are_not_written():
    x, up = torch.randn(4, 64).bfloat16(), torch.randn(2, 64, 64).bfloat16()
    row_src = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    a, h = run(x, up, row_src, torch.tensor([0, 2, 4], dtype=torch.int32), 1, 1.0)
    assert torch.isnan(a[4:].float()).all() and torch.isnan(h[4:].float()).all()
    assert not torch.isnan(a[:4].float()).any()


@needs_bf16_cpu
@pytest.mark.parametrize("name", ["longcat", "0.6b"])
def test_layer_matches_the_unfused_route(monkeypatch, name):
    """The bf16 layer, forward and backward, with the fused first half and without it."""
    cfg = (MoEPPConfig.longcat(hidden_size=64, ffn_size=32, n_ffn=16, n_identity=8, top_k=6) if name == "longcat"
           else MoEPPConfig.moepp_0_6b().with_(hidden_size=64, ffn_size=96))
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.bfloat16)
    x = torch.randn(100, 64).bfloat16()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(expert_ffn, "UP_SWIGLU_BF16", fused)
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, layer.up.grad, layer.down.grad))
        layer.zero_grad(set_to_none=True)
    for got, want, what in zip(results[0], results[1], ("out", "grad x", "grad up", "grad down")):
        assert_norm_close(got, want, torch.bfloat16, what)


def good_args():
    x, up = torch.randn(4, 64).bfloat16(), torch.randn(2, 64, 64).bfloat16()
    return dict(x=x, row_src=torch.arange(4, dtype=torch.int32), offsets=torch.tensor([0, 2, 4], dtype=torch.int32),
                up=up, a=torch.empty(4, 32).bfloat16(), h=torch.empty(4, 64).bfloat16(), top_k=1)


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(x=t["x"].float()), "x"),  # wrong dtype
    (lambda t: t.update(x=torch.randn(4, 63).bfloat16(), up=torch.randn(2, 64, 63).bfloat16()), "x"),  # D odd
    (lambda t: t.update(up=torch.randn(2, 48, 64).bfloat16(), a=torch.empty(4, 24).bfloat16(),
                        h=torch.empty(4, 48).bfloat16()), "up"),  # I not a multiple of 32
    (lambda t: t.update(offsets=torch.tensor([0, 3, 2], dtype=torch.int32)), "offsets"),  # decreasing
    (lambda t: t.update(offsets=torch.tensor([0, 2, 5], dtype=torch.int32)), "offsets"),  # past the rows
    (lambda t: t.update(a=torch.empty(4, 31).bfloat16()), "a"),  # wrong shape
    (lambda t: t.update(h=torch.empty(4, 64).bfloat16()[:, ::2].contiguous().t()), "h"),  # wrong shape
    (lambda t: t.update(row_src=t["row_src"].long()), "row_src"),  # wrong dtype
    (lambda t: t.update(top_k=0), "top_k"),
    # no FFN experts: offsets [1], its one bound past the rows
    (lambda t: t.update(up=torch.empty(0, 64, 64).bfloat16(), offsets=torch.tensor([9], dtype=torch.int32)),
     "offsets"),
])
def test_bad_input_names_the_argument(change, name):
    args = good_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        _C.up_swiglu_bf16(view(args["x"]), view(args["row_src"]), view(args["offsets"]), view(args["up"]),
                          args["top_k"], 1.0, view(args["a"]), view(args["h"]), 1)
