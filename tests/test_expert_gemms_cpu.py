"""The CPU's own GEMM kernels for the experts (csrc/moe/expert_gemms_cpu.h), bf16 and fp32:
up_swiglu_cpu's h against the fp64 product of the scaled gathered rows and its a bit for bit as
swiglu_forward computes it from that h, down_cpu's y against the fp64 product, both through the
packed tiles and the unpacked path of experts of at most 2 rows; the backward's dh, a and dx and
weight_grad_cpu's gradients against fp64 products; bf16 rounding as torch's; the layer through
them against the per-expert route, and clear errors for bad input (checked before the CPU's: run
everywhere). bf16 runs both ways: as pairs through vdpbf16ps (skipped on CPUs without
AVX512-BF16, unless the build emulates it, as make test-sanitize's does) and widened to fp32.
The kernels' tests are skipped on CPUs without AVX-512."""

import pytest
import torch
from conftest import assert_close, assert_norm_close

from moepp_kernels import _C, MoEPPConfig, MoEPPLayer, build_plan
from moepp_kernels._ops import expert_ffn
from moepp_kernels._tensors import view

needs_cpu_gemms = pytest.mark.skipif(not _C.expert_gemms_cpu_supported(), reason="needs a CPU with AVX-512")
HAS_BF16_PAIRS = _C.expert_gemms_cpu_bf16_pairs()  # the default wherever the CPU has AVX512-BF16


@pytest.fixture(params=[
    pytest.param((torch.bfloat16, True), id="bf16-pairs",
                 marks=pytest.mark.skipif(not HAS_BF16_PAIRS, reason="needs AVX512-BF16 (or a build emulating it)")),
    pytest.param((torch.bfloat16, False), id="bf16-widened"),
    pytest.param((torch.float32, HAS_BF16_PAIRS), id="fp32"),
])
def dtype(request):
    """The kernels' dtype, bf16 as pairs (vdpbf16ps) or widened to fp32; the default restored after."""
    dtype, pairs = request.param
    _C.set_expert_gemms_cpu_bf16_pairs(pairs)
    yield dtype
    _C.set_expert_gemms_cpu_bf16_pairs(HAS_BF16_PAIRS)


def up_swiglu(x, up, row_src, offsets, top_k, scale, keep_h=True):
    rows, inner = row_src.shape[0], up.shape[1] // 2
    a = torch.full((rows, inner), float("nan"), dtype=x.dtype)
    h = torch.full((rows, 2 * inner), float("nan"), dtype=x.dtype) if keep_h else None
    _C.up_swiglu_cpu(view(x), view(row_src), view(offsets), view(up), top_k, scale, view(a),
                     None if h is None else view(h), 2)
    return a, h


def down(a, offsets, weight):
    y = torch.full((a.shape[0], weight.shape[1]), float("nan"), dtype=a.dtype)
    _C.down_cpu(view(a), view(offsets), view(weight), view(y), 2)
    return y


def expected_h(x, up, row_src, offsets, top_k, scale):
    """scale * x[token(r)] · U_eᵀ in fp64 (zero rows for slots that name no token)."""
    tokens = x.shape[0]
    src = row_src.long()
    valid = (src >= 0) & (src < tokens * top_k)
    xg = torch.zeros(src.shape[0], x.shape[1], dtype=torch.float64)
    xg[valid] = x.double()[src[valid] // top_k]
    return expected_y(scale * xg, offsets, up)


def expected_y(a, offsets, weight):
    """a_e · W_eᵀ in fp64 for each expert's rows, zero past the plan."""
    y = torch.zeros(a.shape[0], weight.shape[1], dtype=torch.float64)
    for e in range(weight.shape[0]):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        y[lo:hi] = a[lo:hi].double() @ weight[e].double().t()
    return y


def swiglu_of(h):
    a = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype)
    rows = torch.tensor([h.shape[0]], dtype=torch.int32)  # a one-expert plan (kept alive through the call)
    _C.swiglu_forward(view(h), view(rows), view(a), 1, 0)
    return a


def random_plan(tokens, n_ffn, top_k, g):
    """A plan with two zero-computation experts beside the FFN ones: their slots get no row."""
    return build_plan(torch.randint(0, n_ffn + 2, (tokens, top_k), generator=g, dtype=torch.int32), n_ffn)


# (tokens, D, I, n_ffn, k, scale): T = 0; T = 1 with D = 2 (rows of at most 2: the unpacked
# path); rows not a multiple of the 6-row tile; one panel (I 32) and three (odd across two
# workers); K words not a multiple of the 16-word transpose (D 70); x*k scale 2 (exact) and 1.5;
# LongCat-like widths
CASES = [(0, 64, 32, 4, 2, 1.0), (1, 2, 32, 3, 1, 1.0), (37, 64, 32, 4, 2, 2.0), (50, 70, 96, 5, 3, 1.5),
         (300, 256, 64, 8, 6, 1.0)]


@needs_cpu_gemms
@pytest.mark.parametrize("tokens, dim, inner, n_ffn, top_k, scale", CASES)
@pytest.mark.parametrize("keep_h", [True, False])
def test_up_swiglu_matches_the_product_and_swiglu(dtype, tokens, dim, inner, n_ffn, top_k, scale, keep_h):
    g = torch.Generator().manual_seed(tokens + dim)
    x = torch.randn(tokens, dim, generator=g).to(dtype)
    up = (torch.randn(n_ffn, 2 * inner, dim, generator=g) * dim ** -0.5).to(dtype)
    plan = random_plan(tokens, n_ffn, top_k, g)
    row_src, offsets = plan.row_src, plan.offsets
    a, h = up_swiglu(x, up, row_src, offsets, top_k, scale, keep_h)
    rows = offsets[-1].item()
    a, h = a[:rows], None if h is None else h[:rows]
    want = expected_h(x, up, row_src, offsets, top_k, scale)[:rows]
    if keep_h:
        assert_close(h.double(), want, dtype, "h")
        assert torch.equal(a, swiglu_of(h))  # a from the rounded h, as swiglu_forward computes it
    else:
        assert_close(a.double(), swiglu_of(want.to(dtype)).double(), dtype, "a")


# (tokens, D, I, n_ffn, k): T = 0; T = 1 (the unpacked path); D not a multiple of the 64-column
# panel (70: a panel with 6 columns; 100); I words not a multiple of 16 (I 40, 42); LongCat widths
DOWN_CASES = [(0, 64, 32, 4, 2), (1, 70, 40, 3, 1), (37, 100, 42, 4, 2), (50, 64, 96, 5, 3), (300, 1024, 64, 8, 6)]


@needs_cpu_gemms
@pytest.mark.parametrize("tokens, dim, inner, n_ffn, top_k", DOWN_CASES)
def test_down_matches_the_product(dtype, tokens, dim, inner, n_ffn, top_k):
    g = torch.Generator().manual_seed(tokens + dim)
    plan = random_plan(tokens, n_ffn, top_k, g)
    a = torch.randn(tokens * top_k, inner, generator=g).to(dtype)
    weight = (torch.randn(n_ffn, dim, inner, generator=g) * inner ** -0.5).to(dtype)
    y = down(a, plan.offsets, weight)
    rows = plan.offsets[-1].item()
    assert_close(y[:rows].double(), expected_y(a, plan.offsets, weight)[:rows], dtype, "y")
    assert torch.isnan(y[rows:].float()).all()  # rows past the plan are not written


def swiglu_grad(dy, offsets, weight, h):
    rows, inner = h.shape[0], h.shape[1] // 2
    dh = torch.full((rows, 2 * inner), float("nan"), dtype=h.dtype)
    a = torch.full((rows, inner), float("nan"), dtype=h.dtype)
    _C.swiglu_grad_cpu(view(dy), view(offsets), view(weight), view(h), view(dh), view(a), 2)
    return dh, a


def swiglu_backward_of(h, da):
    dh, a = torch.empty_like(h), torch.empty_like(da)
    rows = torch.tensor([h.shape[0]], dtype=torch.int32)
    _C.swiglu_backward(view(h), view(da), view(rows), view(dh), view(a), 1, 0)
    return dh, a


# (tokens, D, I, n_ffn, k): T = 0; T = 1; I 32 and 96 (panels of 64 columns with a 32-column
# tail); D 70 (dx's panel tail, K words not a multiple of 16); LongCat-like widths
GRAD_CASES = [(0, 64, 32, 4, 2), (1, 64, 32, 3, 1), (37, 70, 96, 4, 2), (50, 128, 64, 5, 3), (300, 256, 64, 8, 6)]


@needs_cpu_gemms
@pytest.mark.parametrize("tokens, dim, inner, n_ffn, top_k", GRAD_CASES)
def test_swiglu_grad_and_up_grad_input_match_the_products(dtype, tokens, dim, inner, n_ffn, top_k):
    g = torch.Generator().manual_seed(tokens + dim + 1)
    plan = random_plan(tokens, n_ffn, top_k, g)
    rows, offsets = tokens * top_k, plan.offsets
    dy, h = torch.randn(rows, dim, generator=g).to(dtype), torch.randn(rows, 2 * inner, generator=g).to(dtype)
    down_w = (torch.randn(n_ffn, dim, inner, generator=g) * dim ** -0.5).to(dtype)
    up_w = (torch.randn(n_ffn, 2 * inner, dim, generator=g) * inner ** -0.5).to(dtype)
    dh, a = swiglu_grad(dy, offsets, down_w, h)
    valid = offsets[-1].item()
    da = torch.zeros(rows, inner, dtype=torch.float64)  # dy_e · V_e in fp64
    for e in range(n_ffn):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        da[lo:hi] = dy[lo:hi].double() @ down_w[e].double()
    dh_want, a_want = swiglu_backward_of(h, da.to(dtype))
    assert_close(dh[:valid].double(), dh_want[:valid].double(), dtype, "dh")
    assert torch.equal(a[:valid], a_want[:valid])  # a from h alone, as swiglu_backward computes it
    assert torch.isnan(dh[valid:].float()).all() and torch.isnan(a[valid:].float()).all()
    dx = torch.full((rows, dim), float("nan"), dtype=dtype)
    _C.up_grad_input_cpu(view(dh), view(offsets), view(up_w), view(dx), 2)
    dx_want = torch.zeros(rows, dim, dtype=torch.float64)
    for e in range(n_ffn):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        dx_want[lo:hi] = dh[lo:hi].double() @ up_w[e].double()
    assert_close(dx[:valid].double(), dx_want[:valid], dtype, "dx")
    assert torch.isnan(dx[valid:].float()).all()


def weight_grad(lhs, rhs, offsets, n_ffn, rhs_src=None, top_k=1, scale=1.0):
    out = torch.full((n_ffn, lhs.shape[1], rhs.shape[1]), float("nan"), dtype=lhs.dtype)
    _C.weight_grad_cpu(view(lhs), view(rhs), None if rhs_src is None else view(rhs_src), view(offsets), top_k,
                       scale, view(out), 2)
    return out


def expected_weight_grad(lhs, rhs_rows, offsets, scale):
    """scale * lhs_eᵀ · rhs_e in fp64 per expert, zero for experts without rows."""
    out = torch.zeros(offsets.shape[0] - 1, lhs.shape[1], rhs_rows.shape[1], dtype=torch.float64)
    for e in range(out.shape[0]):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        out[e] = scale * lhs[lo:hi].double().t() @ rhs_rows[lo:hi].double()
    return out


# (tokens, n1, n2, n_ffn, k, scale): T = 0 (every expert empty: zeros); T = 1 (experts of one
# row); n1 70 (the transpose's 16-column tail) and n2 100 (a panel of 36 columns); experts of
# about 360 rows (K in two chunks of 256 rows); scale 2 and 1.5
WEIGHT_GRAD_CASES = [(0, 64, 64, 4, 2, 1.0), (1, 64, 70, 3, 1, 1.0), (37, 70, 100, 4, 2, 2.0),
                     (300, 96, 128, 3, 6, 1.5)]


@needs_cpu_gemms
@pytest.mark.parametrize("tokens, n1, n2, n_ffn, top_k, scale", WEIGHT_GRAD_CASES)
def test_weight_grad_matches_the_products(dtype, tokens, n1, n2, n_ffn, top_k, scale):
    g = torch.Generator().manual_seed(tokens + n1 + 2)
    plan = random_plan(tokens, n_ffn, top_k, g)
    rows, offsets = tokens * top_k, plan.offsets
    lhs = (0.1 * torch.randn(rows, n1, generator=g)).to(dtype)
    x = torch.randn(tokens, n2, generator=g).to(dtype)  # through row_src: d U's x
    got = weight_grad(lhs, x, offsets, n_ffn, plan.row_src, top_k, scale)
    x_rows = torch.zeros(rows, n2, dtype=dtype)
    valid = offsets[-1].item()
    x_rows[:valid] = x[plan.row_src[:valid].long() // top_k]
    assert_close(got.double(), expected_weight_grad(lhs, x_rows, offsets, scale), dtype, "through row_src")
    a = torch.randn(rows, n2, generator=g).to(dtype)  # rows as they are: d V's a
    assert_close(weight_grad(lhs, a, offsets, n_ffn).double(), expected_weight_grad(lhs, a, offsets, 1.0), dtype,
                 "rows as they are")


@needs_cpu_gemms
def test_weight_grad_all_rows_to_one_expert_and_slots_naming_no_token(dtype):
    # expert 1 gets all 601 rows (K in chunks of 256 rows, the last of 89), experts 0 and 2 none
    # (zeros); slots -1 and T * k name no token: zero rows of x
    g = torch.Generator().manual_seed(11)
    rows, tokens = 601, 400
    lhs, x = (0.1 * torch.randn(rows, 48, generator=g)).to(dtype), torch.randn(tokens, 80, generator=g).to(dtype)
    row_src = torch.randint(0, tokens, (rows,), generator=g, dtype=torch.int32)
    row_src[[5, 300]] = torch.tensor([-1, tokens], dtype=torch.int32)
    offsets = torch.tensor([0, 0, rows, rows], dtype=torch.int32)
    x_rows = x[row_src.long().clamp(0, tokens - 1)]
    x_rows[[5, 300]] = 0
    got = weight_grad(lhs, x, offsets, 3, row_src)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
    assert_close(got.double(), expected_weight_grad(lhs, x_rows, offsets, 1.0), dtype, "grad")


@needs_cpu_gemms
def test_bf16_outputs_round_to_nearest_even():
    # one product per output (a one-hot lhs; V_e = s · I), so the fp32 value is exact and only its
    # rounding to bf16 is tested against torch's (to nearest even; inf stays inf, NaN stays NaN:
    # 0 · inf and NaN make NaN)
    g = torch.Generator().manual_seed(13)
    rhs = (1000 * torch.randn(2, 4096, generator=g)).bfloat16()
    rhs[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    lhs = torch.zeros(2, 5, dtype=torch.bfloat16)
    lhs[0, 0], lhs[1, 3] = 1, 1
    offsets = torch.tensor([0, 1, 2], dtype=torch.int32)
    scale = 1 + 2 ** -8  # puts the products between bf16 values, ties among them
    got = weight_grad(lhs, rhs, offsets, 2, scale=scale)
    want = torch.stack([scale * (lhs[e:e + 1].float().t() @ rhs[e:e + 1].float()) for e in range(2)]).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    a = (1000 * torch.randn(7, 64, generator=g)).bfloat16()
    s = 1 + 2 ** -7
    eye = (s * torch.eye(64)).bfloat16().expand(1, 64, 64).contiguous()
    y = down(a, torch.tensor([0, 7], dtype=torch.int32), eye)
    assert torch.equal(y, (s * a.float()).bfloat16())


@needs_cpu_gemms
def test_swiglu_grad_epilogue_is_swiglu_backward_bit_for_bit(dtype):
    # V_e = identity (D = I): da = dy exactly, so dh and a must be swiglu_backward's to the bit
    g = torch.Generator().manual_seed(7)
    dy, h = torch.randn(40, 96, generator=g).to(dtype), torch.randn(40, 192, generator=g).to(dtype)
    eye = torch.eye(96).to(dtype).expand(3, 96, 96).contiguous()
    offsets = torch.tensor([0, 7, 7, 40], dtype=torch.int32)
    dh, a = swiglu_grad(dy, offsets, eye, h)
    dh_want, a_want = swiglu_backward_of(h, dy)
    assert torch.equal(dh, dh_want) and torch.equal(a, a_want)


@needs_cpu_gemms
def test_packed_and_unpacked_experts_agree_with_the_product(dtype):
    # experts of 1, 2 (unpacked), 3 and 7 rows (packed tiles, one with a tail), and an empty one
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 128, generator=g).to(dtype)
    up = (torch.randn(5, 128, 128, generator=g) * 128 ** -0.5).to(dtype)
    weight = (torch.randn(5, 96, 64, generator=g) * 64 ** -0.5).to(dtype)
    row_src = torch.arange(13, dtype=torch.int32)
    offsets = torch.tensor([0, 1, 3, 3, 6, 13], dtype=torch.int32)
    a, h = up_swiglu(x, up, row_src, offsets, 1, 1.0)
    assert_close(h.double(), expected_h(x, up, row_src, offsets, 1, 1.0), dtype, "h")
    assert torch.equal(a, swiglu_of(h))
    assert_close(down(a, offsets, weight).double(), expected_y(a, offsets, weight), dtype, "y")


@needs_cpu_gemms
@pytest.mark.parametrize("tokens", [3, 10])  # experts of 1 row (unpacked) and of 6 and 4 rows (packed)
def test_empty_experts_all_rows_to_one_and_slots_naming_no_token(dtype, tokens):
    # experts 0 and 2 get no rows, expert 1 all; slot -1 and slot T * k name no token: zero rows
    g = torch.Generator().manual_seed(3)
    x, up = torch.randn(tokens, 64, generator=g).to(dtype), torch.randn(3, 64, 64, generator=g).to(dtype)
    row_src = torch.tensor([0, 5, -1, 2 * tokens, 4, 3][:1 if tokens == 3 else 6], dtype=torch.int32)
    offsets = torch.tensor([0, 0, row_src.shape[0], row_src.shape[0]], dtype=torch.int32)
    a, h = up_swiglu(x, up, row_src, offsets, 2, 1.0)
    assert_close(h.double(), expected_h(x, up, row_src, offsets, 2, 1.0), dtype, "h")
    if tokens == 10:
        assert torch.equal(h[[2, 3]], torch.zeros(2, 64, dtype=dtype))
    assert torch.equal(a, swiglu_of(h))


@needs_cpu_gemms
def test_rows_past_the_plan_are_not_written(dtype):
    x, up = torch.randn(4, 64).to(dtype), torch.randn(2, 64, 64).to(dtype)
    row_src = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    a, h = up_swiglu(x, up, row_src, torch.tensor([0, 2, 4], dtype=torch.int32), 1, 1.0)
    assert torch.isnan(a[4:].float()).all() and torch.isnan(h[4:].float()).all()
    assert not torch.isnan(a[:4].float()).any()


@needs_cpu_gemms
@pytest.mark.parametrize("name", ["longcat", "0.6b"])
def test_layer_matches_the_per_expert_route(monkeypatch, dtype, name):
    """The layer, forward and backward, through the CPU's own kernels and through a product per
    expert (bf16 widened takes the weight gradients from weight_grad_cpu too)."""
    cfg = (MoEPPConfig.longcat(hidden_size=64, ffn_size=32, n_ffn=16, n_identity=8, top_k=6) if name == "longcat"
           else MoEPPConfig.moepp_0_6b().with_(hidden_size=64, ffn_size=96))
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=dtype)
    x = torch.randn(100, 64).to(dtype)
    results = []
    for own in (True, False):
        monkeypatch.setattr(expert_ffn, "CPU_GEMMS", own)
        assert expert_ffn.uses_cpu_gemms(x, layer.up, layer.down) == own
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, layer.up.grad, layer.down.grad))
        layer.zero_grad(set_to_none=True)
    for got, want, what in zip(results[0], results[1], ("out", "grad x", "grad up", "grad down")):
        assert_norm_close(got, want, dtype, what)


def test_bf16_pairs_only_where_the_cpu_has_them():
    if HAS_BF16_PAIRS:
        _C.set_expert_gemms_cpu_bf16_pairs(True)
        assert _C.expert_gemms_cpu_bf16_pairs()
    else:
        with pytest.raises(ValueError, match="enabled"):
            _C.set_expert_gemms_cpu_bf16_pairs(True)
        assert not _C.expert_gemms_cpu_bf16_pairs()


def good_args():
    x, up = torch.randn(4, 64).bfloat16(), torch.randn(2, 64, 64).bfloat16()
    return dict(x=x, row_src=torch.arange(4, dtype=torch.int32), offsets=torch.tensor([0, 2, 4], dtype=torch.int32),
                up=up, a=torch.empty(4, 32).bfloat16(), h=torch.empty(4, 64).bfloat16(), top_k=1)


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(x=t["x"].half()), "x"),  # dtype neither bf16 nor fp32
    (lambda t: t.update(x=t["x"].float()), "up"),  # dtypes differ
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
def test_up_swiglu_bad_input_names_the_argument(change, name):
    args = good_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        _C.up_swiglu_cpu(view(args["x"]), view(args["row_src"]), view(args["offsets"]), view(args["up"]),
                         args["top_k"], 1.0, view(args["a"]), view(args["h"]), 1)


def good_down_args():
    return dict(a=torch.randn(4, 32).bfloat16(), offsets=torch.tensor([0, 2, 4], dtype=torch.int32),
                down=torch.randn(2, 64, 32).bfloat16(), y=torch.empty(4, 64).bfloat16())


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(a=t["a"].half()), "a"),  # dtype neither bf16 nor fp32
    (lambda t: t.update(down=t["down"].float()), "down"),  # dtypes differ
    (lambda t: t.update(y=t["y"].float()), "y"),
    (lambda t: t.update(a=torch.randn(4, 31).bfloat16(), down=torch.randn(2, 64, 31).bfloat16()), "a"),  # I odd
    (lambda t: t.update(down=torch.randn(2, 64, 16).bfloat16()), "down"),  # I differs from a's
    (lambda t: t.update(y=torch.empty(4, 63).bfloat16()), "y"),  # wrong shape
    (lambda t: t.update(a=torch.randn(32, 4).bfloat16().t()), "a"),  # not contiguous
    (lambda t: t.update(offsets=torch.tensor([0, 3, 2], dtype=torch.int32)), "offsets"),  # decreasing
    (lambda t: t.update(offsets=torch.tensor([0, 2], dtype=torch.int32)), "offsets"),  # wrong length
    (lambda t: t.update(a=torch.randn(4, 32, 1).bfloat16()), "a"),  # wrong rank
])
def test_down_bad_input_names_the_argument(change, name):
    args = good_down_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        _C.down_cpu(view(args["a"]), view(args["offsets"]), view(args["down"]), view(args["y"]), 1)


def good_grad_args():
    return dict(dy=torch.randn(4, 64).bfloat16(), offsets=torch.tensor([0, 2, 4], dtype=torch.int32),
                down=torch.randn(2, 64, 32).bfloat16(), h=torch.randn(4, 64).bfloat16(),
                dh=torch.empty(4, 64).bfloat16(), a=torch.empty(4, 32).bfloat16(), up=torch.randn(2, 64, 64).bfloat16(),
                dx=torch.empty(4, 64).bfloat16())


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(dy=t["dy"].half()), "dy"),  # dtype neither bf16 nor fp32
    (lambda t: t.update(down=t["down"].float()), "down"),  # dtypes differ
    (lambda t: t.update(dy=torch.randn(4, 63).bfloat16(), down=torch.randn(2, 63, 32).bfloat16()), "dy"),  # D odd
    (lambda t: t.update(h=torch.randn(4, 62).bfloat16()), "h"),  # wrong shape
    (lambda t: t.update(dh=torch.empty(64, 4).bfloat16().t()), "dh"),  # not contiguous
    (lambda t: t.update(a=torch.empty(4, 33).bfloat16()), "a"),
    (lambda t: t.update(offsets=torch.tensor([0, 5, 4], dtype=torch.int32)), "offsets"),  # past the rows
    (lambda t: t.update(dy=torch.randn(4, 64, 1).bfloat16()), "dy"),  # wrong rank
])
def test_swiglu_grad_bad_input_names_the_argument(change, name):
    args = good_grad_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        _C.swiglu_grad_cpu(view(args["dy"]), view(args["offsets"]), view(args["down"]), view(args["h"]),
                           view(args["dh"]), view(args["a"]), 1)


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(dh=t["dh"].half()), "dh"),  # dtype neither bf16 nor fp32
    (lambda t: t.update(up=t["up"].float()), "up"),  # dtypes differ
    (lambda t: t.update(dx=t["dx"].float()), "dx"),
    (lambda t: t.update(up=torch.randn(2, 62, 64).bfloat16()), "up"),  # 2I differs from dh's
    (lambda t: t.update(dx=torch.empty(4, 63).bfloat16()), "dx"),  # wrong shape
    (lambda t: t.update(offsets=torch.tensor([2, 1, 4], dtype=torch.int32)), "offsets"),  # decreasing
])
def test_up_grad_input_bad_input_names_the_argument(change, name):
    args = good_grad_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        _C.up_grad_input_cpu(view(args["dh"]), view(args["offsets"]), view(args["up"]), view(args["dx"]), 1)


def good_weight_grad_args():
    return dict(lhs=torch.randn(4, 64).bfloat16(), rhs=torch.randn(3, 32).bfloat16(),
                rhs_src=torch.tensor([0, 1, 4, 5], dtype=torch.int32),
                offsets=torch.tensor([0, 2, 4], dtype=torch.int32), out=torch.empty(2, 64, 32).bfloat16())


@pytest.mark.parametrize("change, name", [
    (lambda t: t.update(lhs=t["lhs"].half()), "lhs"),  # dtype neither bf16 nor fp32
    (lambda t: t.update(rhs=t["rhs"].float()), "rhs"),  # dtypes differ
    (lambda t: t.update(out=t["out"].float()), "out"),
    (lambda t: t.update(rhs_src=t["rhs_src"].long()), "rhs_src"),  # not int32
    (lambda t: t.update(rhs_src=t["rhs_src"][:3]), "rhs_src"),  # not one per row
    (lambda t: t.update(rhs_src=None), "rhs"),  # without rhs_src rhs needs a row per lhs row
    (lambda t: t.update(out=torch.empty(2, 64, 31).bfloat16()), "out"),  # n2 differs from rhs's
    (lambda t: t.update(lhs=torch.randn(64, 4).bfloat16().t()), "lhs"),  # not contiguous
    (lambda t: t.update(offsets=torch.tensor([0, 5, 4], dtype=torch.int32)), "offsets"),  # past the rows
    (lambda t: t.update(offsets=torch.tensor([0, 4], dtype=torch.int32)), "offsets"),  # not one per expert
    (lambda t: t.update(top_k=0), "top_k"),
    (lambda t: t.update(out=torch.empty(2, 64).bfloat16()), "out"),  # wrong rank
])
def test_weight_grad_bad_input_names_the_argument(change, name):
    args = dict(good_weight_grad_args(), top_k=2)
    change(args)
    src = args["rhs_src"]
    with pytest.raises(ValueError, match=name):
        _C.weight_grad_cpu(view(args["lhs"]), view(args["rhs"]), None if src is None else view(src),
                           view(args["offsets"]), args["top_k"], 1.0, view(args["out"]), 1)
