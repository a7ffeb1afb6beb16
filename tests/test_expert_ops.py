"""The layer's building blocks as public ops: expert_ffn and combine against the
reference's per-expert computation, forward and backward, over dtypes."""

import pytest
import torch
from conftest import DEVICES, assert_norm_close

from moepp_kernels import _C, MoEPPConfig, build_plan, combine, expert_ffn, grouped_gemm
from moepp_kernels import reference as R
from moepp_kernels._tensors import view

CFG = MoEPPConfig(hidden_size=40, ffn_size=24, n_ffn=5, n_constant=2, n_copy=1, n_zero=1, top_k=3)


def routing(tokens, cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[: cfg.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, cfg.top_k, generator=g)
    return ids.to(torch.int32).to(device), weights.to(device)


def grouped_gemm_backend_ok(backend: str, device: str, dtype: torch.dtype, dims: tuple) -> bool:
    try:
        grouped_gemm.resolve_backend(backend, torch.device(device), dtype, dims)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(40, 24), (13, 7)], ids=["aligned", "odd"])  # D, I not multiples of 8
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_expert_ffn_matches_reference(device, dtype, dims, scale, backend):
    if not grouped_gemm_backend_ok(backend, device, dtype, dims):
        pytest.skip(f"{backend} is not available for {dtype} {dims} on {device}")
    d, i = dims
    tokens = 29
    ids, _ = routing(tokens, CFG, device)
    plan = build_plan(ids, CFG.n_ffn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(dtype).to(device).requires_grad_()
    up = (torch.randn(CFG.n_ffn, 2 * i, d, generator=g) / d**0.5).to(dtype).to(device).requires_grad_()
    down = (torch.randn(CFG.n_ffn, d, i, generator=g) / i**0.5).to(dtype).to(device).requires_grad_()
    y = expert_ffn(x, up, down, plan.row_src, plan.slot_row, plan.offsets, CFG.top_k, scale, backend)
    m = int(plan.offsets[-1])
    src_tokens = plan.row_src[:m].long() // CFG.top_k
    experts = ids.flatten()[plan.row_src[:m].long()].long()
    expected = torch.stack([R.ffn_expert(x[t:t + 1] * scale, up[e], down[e])[0]
                            for t, e in zip(src_tokens.tolist(), experts.tolist())])
    assert_norm_close(y[:m], expected, dtype, "y")
    with torch.no_grad():  # the inference op: no h kept, expert-sized temporaries
        y_inference = expert_ffn(x, up, down, plan.row_src, plan.slot_row, plan.offsets, CFG.top_k, scale, backend)
    assert_norm_close(y_inference[:m], expected, dtype, "y (inference)")
    grad = torch.randn(m, d, generator=g).to(dtype).to(device)
    ours = torch.autograd.grad((y[:m].float() * grad.float()).sum(), (x, up, down))
    ref = torch.autograd.grad((expected.float() * grad.float()).sum(), (x, up, down))
    for name, a, b in zip(("x", "up", "down"), ours, ref):
        assert_norm_close(a, b, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [40, 13])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_combine_matches_reference(device, dtype, d, scale):
    cfg = CFG.with_(hidden_size=d)
    tokens = 31
    ids, weights = routing(tokens, cfg, device, seed=2)
    plan = build_plan(ids, cfg.n_ffn)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, d, generator=g).to(dtype).to(device).requires_grad_()
    y = torch.randn(tokens * cfg.top_k, d, generator=g).to(dtype).to(device).requires_grad_()
    weights.requires_grad_()
    const_gate = torch.randn(cfg.n_constant, 2, d, generator=g).to(device)
    const_value = torch.randn(cfg.n_constant, d, generator=g).to(dtype).to(device).requires_grad_()
    mix = (scale * (x.float() @ const_gate.reshape(-1, d).t())).detach().requires_grad_()
    out = combine(x, y, ids, weights, plan.slot_row, mix, const_value, cfg.n_ffn, cfg.copy_begin, cfg.zero_begin,
                  cfg.n_experts, scale)

    # The same sum written plainly: per slot, the expert's output times the gate.
    x_e = x.float() * scale
    expected = torch.zeros(tokens, d, device=device)
    for t in range(tokens):
        for j in range(cfg.top_k):
            e, w = int(ids[t, j]), weights[t, j]
            kind = cfg.expert_kind(e)
            if kind == "ffn":
                expected[t] += w * y[int(plan.slot_row[t, j])].float()
            elif kind == "copy":
                expected[t] += w * x_e[t]
            elif kind == "constant":
                c = e - cfg.constant_begin
                a = torch.softmax(mix[t, 2 * c:2 * c + 2], -1)
                expected[t] += w * (a[0] * x_e[t] + a[1] * const_value[c].float())
    assert_norm_close(out, expected, dtype, "out")
    grad = torch.randn(tokens, d, generator=g).to(dtype).to(device)
    leaves = (x, y, weights, mix, const_value)
    ours = torch.autograd.grad((out.float() * grad.float()).sum(), leaves)
    ref = torch.autograd.grad((expected * grad.float()).sum(), leaves, allow_unused=True)
    for name, a, b in zip(("x", "y", "weights", "const_logits", "const_value"), ours, ref):
        if name == "y":  # rows past the plan's total are unused
            m = int(plan.offsets[-1])
            a, b = a[:m], b[:m]
        assert_norm_close(a, b, dtype, name)


def test_combine_bad_layout_is_a_value_error():
    ids, weights = routing(4, CFG, "cpu")
    plan = build_plan(ids, CFG.n_ffn)
    x = torch.zeros(4, 40)
    with pytest.raises(ValueError, match="layout"):
        combine(x, torch.zeros(12, 40), ids, weights, plan.slot_row, torch.zeros(4, 4), torch.zeros(2, 40),
                5, 8, 7, 9, 1.0)


def test_grouped_mm_refuses_unaligned_rows_clearly():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    with pytest.raises(ValueError, match="16 bytes"):
        grouped_gemm.resolve_backend("grouped_mm", torch.device("cpu"), torch.bfloat16, (13, 7))
    assert grouped_gemm.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, (13, 7)) == "torch"


def test_swiglu_element_math_over_the_float_range():
    """The kernels' own exp (no libm, so the CPU loops vectorise) against float64 silu:
    within 5e-7 relative error from -100 to 100, and torch's answers at +-inf and NaN."""
    gate = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([float("inf"), -float("inf"), float("nan")])])
    up = torch.linspace(-3, 3, gate.numel())
    h = torch.cat([gate, up]).reshape(1, -1)
    offsets = torch.tensor([1], dtype=torch.int32)
    a = torch.empty(1, gate.numel())
    _C.swiglu_forward(view(h), view(offsets), view(a), 1, 0)
    g64 = gate.double().requires_grad_()
    expected = torch.nn.functional.silu(g64) * up.double()
    torch.testing.assert_close(a[0].double(), expected.detach(), rtol=5e-7, atol=1e-30, equal_nan=True)

    da = torch.linspace(-1, 1, gate.numel()).reshape(1, -1)
    dh, a_again = torch.empty_like(h), torch.empty_like(a)
    _C.swiglu_backward(view(h), view(da), view(offsets), view(dh), view(a_again), 1, 0)
    (d_gate,) = torch.autograd.grad((expected * da[0].double()).sum(), g64)
    finite = gate.isfinite()
    torch.testing.assert_close(a_again, a, equal_nan=True)
    torch.testing.assert_close(dh[0, : gate.numel()][finite].double(), d_gate[finite], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(dh[0, gate.numel():].double(), (torch.nn.functional.silu(gate.double()) * da[0]),
                               rtol=5e-7, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("scale", [1.0, 0.7, 3e-3, 3.0])  # exact round trip, rounding, subnormals, overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_conversions_match_torch_for_every_16_bit_value(dtype, scale):
    """The gather computes dtype(scale * float(x)): for all 65536 bit patterns of x it
    matches torch's conversions bit for bit (NaNs as NaNs)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    rows = x.shape[0]
    out = torch.empty_like(x)
    row_src, offsets = torch.arange(rows, dtype=torch.int32), torch.tensor([rows], dtype=torch.int32)
    _C.gather_rows(view(x), view(row_src), view(offsets), 1, scale, view(out), 1, 0)  # views need live tensors
    expected = (x.float() * scale).to(dtype)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    compared = ~nan
    if 5e-324 * 1.0 == 0.0:  # this thread flushes fp32 subnormals (torch 2.5's inductor loads -ffast-math code)
        tiny = torch.finfo(torch.float32).tiny
        compared &= ~(((x.float().abs() < tiny) | (expected.float().abs() < tiny)) & (x != 0))
    assert torch.equal(out[compared].view(torch.int16), expected[compared].view(torch.int16))
