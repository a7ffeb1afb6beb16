"""The layer's building blocks as public ops: expert_ffn and combine against the
reference's per-expert computation, forward and backward, over dtypes."""

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, assert_norm_close, assert_within_reference_error, float64_leaf

from moepp_kernels import _C, MoEPPConfig, RouterOutput, build_plan, combine, expert_ffn, grouped_gemm, permute
from moepp_kernels import reference as R
from moepp_kernels._tensors import view

CFG = MoEPPConfig(hidden_size=40, ffn_size=24, n_ffn=5, n_constant=2, n_copy=1, n_zero=1, top_k=3)


def routing(tokens, cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[: cfg.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, cfg.top_k, generator=g)
    return ids.to(torch.int32).to(device), weights.to(device)


def assert_matches(actual, reference, exact, dtype, name):
    """fp32 against the reference; bf16 / fp16 against the float64 run, bounded by the
    same-precision reference's own error (conftest.REFERENCE_ERROR_FACTOR)."""
    if dtype == torch.float32:
        assert_norm_close(actual, reference, dtype, name)
    else:
        assert_within_reference_error(actual, reference, exact, dtype, name)


def route_of(ids, weights):
    """A RouterOutput holding just the ids and gates combine reads."""
    return RouterOutput(ids, weights, None, None, None, None)


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
    y = expert_ffn(x, up, down, plan, top_k=CFG.top_k, scale=scale, backend=backend)
    m = int(plan.offsets[-1])
    src_tokens = (plan.row_src[:m].long() // CFG.top_k).tolist()
    experts = ids.flatten()[plan.row_src[:m].long()].long().tolist()

    def per_row(x, up, down):
        return torch.stack([R.ffn_expert(x[t:t + 1] * scale, up[e], down[e])[0] for t, e in zip(src_tokens, experts)])

    expected = per_row(x, up, down)
    exact_leaves = [float64_leaf(t) for t in (x, up, down)]
    exact = per_row(*exact_leaves)
    assert_matches(y[:m], expected, exact, dtype, "y")
    with torch.no_grad():  # the inference op: no h kept, expert-sized temporaries
        y_inference = expert_ffn(x, up, down, plan, top_k=CFG.top_k, scale=scale, backend=backend)
    assert_matches(y_inference[:m], expected, exact, dtype, "y (inference)")
    grad = torch.randn(m, d, generator=g).to(dtype).to(device)
    ours = torch.autograd.grad((y[:m].float() * grad.float()).sum(), (x, up, down))
    ref = torch.autograd.grad((expected.float() * grad.float()).sum(), (x, up, down))
    exact_grads = torch.autograd.grad((exact * grad.double()).sum(), exact_leaves)
    for name, a, b, e in zip(("x", "up", "down"), ours, ref, exact_grads):
        assert_matches(a, b, e, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [40, 13])
@pytest.mark.parametrize("scale", [1.0, 3.0])  # x*k off, on (k = 3)
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
    cfg = cfg.with_(scale_input_by_topk=scale != 1.0)
    assert scale in (1.0, float(cfg.top_k))
    out = combine(x, y, route_of(ids, weights), plan, mix, const_value, cfg)

    def plain_sum(x, y, weights, mix, const_value, acc):
        """The same sum written plainly in `acc`: per slot, the expert's output times the gate."""
        x_e = x.to(acc) * scale
        out = torch.zeros(tokens, d, device=device, dtype=acc)
        for t in range(tokens):
            for j in range(cfg.top_k):
                e, w = int(ids[t, j]), weights[t, j].to(acc)
                kind = cfg.expert_kind(e)
                if kind == "ffn":
                    out[t] += w * y[int(plan.slot_row[t, j])].to(acc)
                elif kind == "copy":
                    out[t] += w * x_e[t]
                elif kind == "constant":
                    c = e - cfg.constant_begin
                    a = torch.softmax(mix[t, 2 * c:2 * c + 2].to(acc), -1)
                    out[t] += w * (a[0] * x_e[t] + a[1] * const_value[c].to(acc))
        return out

    leaves = (x, y, weights, mix, const_value)
    exact_leaves = [float64_leaf(t) for t in leaves]
    expected = plain_sum(*leaves, torch.float32)
    exact = plain_sum(*exact_leaves, torch.float64)
    assert_matches(out, expected.to(dtype), exact, dtype, "out")  # the reference returns the model dtype
    grad = torch.randn(tokens, d, generator=g).to(dtype).to(device)
    ours = torch.autograd.grad((out.float() * grad.float()).sum(), leaves)
    ref = torch.autograd.grad((expected * grad.float()).sum(), leaves, allow_unused=True)
    exact_grads = torch.autograd.grad((exact * grad.double()).sum(), exact_leaves, allow_unused=True)
    m = int(plan.offsets[-1])
    for name, a, b, e in zip(("x", "y", "weights", "const_logits", "const_value"), ours, ref, exact_grads):
        if name == "y":  # rows past the plan's total: no slot reads them, their gradient is exactly 0
            assert torch.equal(a[m:], torch.zeros_like(a[m:])), "grad y: rows no slot reads"
            a, b, e = a[:m], b[:m], e[:m]
        assert_matches(a, b, e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 3])
def test_combine_backward_cpu_writes_every_row_of_grad_y(dtype, threads):
    # The CPU op writes dy whole: the rows FFN slots read get their gradient, every other row
    # (past the plan's total: slots of zero-computation experts) 0, into a buffer it never zeroes
    # first; here one full of NaN. Token 0 sends all its slots to zero-computation experts.
    from moepp_kernels._ops.combine import _inputs, layout_scalars

    tokens, d, k = 23, 40, CFG.top_k
    ids, weights = routing(tokens, CFG, "cpu", seed=4)
    ids[0] = torch.arange(CFG.n_ffn, CFG.n_ffn + k, dtype=torch.int32)
    plan = build_plan(ids, CFG.n_ffn)
    g = torch.Generator().manual_seed(5)
    x, grad_out = (torch.randn(tokens, d, generator=g).to(dtype) for _ in range(2))
    y = torch.randn(tokens * k, d, generator=g).to(dtype)
    mix, const_value = torch.randn(tokens, 2 * CFG.n_constant, generator=g), torch.randn(CFG.n_constant, d).to(dtype)
    grad_y = torch.full_like(y, float("nan"))
    outs = (torch.empty_like(x), torch.empty(tokens, k), torch.empty(tokens, 2 * CFG.n_constant),
            torch.empty(tokens, CFG.n_constant))
    _C.combine_backward(_inputs(x, y, ids, weights, plan.slot_row, mix, const_value),
                        _C.ExpertLayout(*layout_scalars(CFG)[:4]), 1.0, view(grad_out), view(grad_y),
                        *(view(t) for t in outs), threads, 0)
    m = int(plan.offsets[-1])
    assert torch.equal(grad_y[m:], torch.zeros_like(grad_y[m:]))
    want = torch.zeros(tokens * k, d)
    for t, j in zip(*torch.nonzero(ids < CFG.n_ffn, as_tuple=True)):
        want[plan.slot_row[t, j]] = weights[t, j] * grad_out[t].float()
    torch.testing.assert_close(grad_y.float(), want.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_constant_value_gradient_in_row_chunks(dtype):
    # On the CPU, dv_c = Σ_t v_coef[t, c] · dout[t] of a half-precision dout runs over chunks of 512
    # rows converted to fp32 (T = 1300: two whole chunks and a tail); it is the exact sum, rounded once.
    from moepp_kernels._ops.combine import _grad_const_value

    g = torch.Generator().manual_seed(3)
    v_coef = torch.rand(1300, 2, generator=g)
    grad_out = torch.randn(1300, 24, generator=g).to(dtype)
    want = (v_coef.double().t() @ grad_out.double()).to(dtype)
    torch.testing.assert_close(_grad_const_value(v_coef, grad_out, dtype), want, rtol=8e-3, atol=0.05)


def test_combine_bad_config_is_a_type_error():
    ids, weights = routing(4, CFG, "cpu")
    plan = build_plan(ids, CFG.n_ffn)
    with pytest.raises(TypeError, match="config"):
        combine(torch.zeros(4, 40), torch.zeros(12, 40), route_of(ids, weights), plan, torch.zeros(4, 4),
                torch.zeros(2, 40), (5, 8, 7, 9))


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
    """The gather computes dtype(scale * float(x)) (at scale 1 it copies x's rows): for all 65536
    bit patterns of x it matches torch's conversions bit for bit (NaNs as NaNs)."""
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


def small_case(tokens=4):
    ids, weights = routing(tokens, CFG, "cpu", seed=5)
    plan = build_plan(ids, CFG.n_ffn)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, 40, generator=g)
    up, down = torch.randn(CFG.n_ffn, 48, 40, generator=g), torch.randn(CFG.n_ffn, 40, 24, generator=g)
    return ids, weights, plan, x, up, down


def with_entry(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


def test_expert_ffn_rejects_bad_plans_naming_the_field():
    """The inputs that crashed the process before the checks (issue "Hardening")."""
    ids, _, plan, x, up, down = small_case()
    rows = int(plan.offsets[-1])
    bad = {
        "plan.offsets": plan._replace(offsets=torch.tensor([0, 6, 3, 3, 3, 3], dtype=torch.int32)),  # decreasing
        "plan.row_src": plan._replace(row_src=with_entry(plan.row_src, 0, 77_777)),
        "plan.slot_row": plan._replace(slot_row=with_entry(plan.slot_row, 0, 5_000_000)),
    }
    for field, broken in bad.items():
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            expert_ffn(x, up, down, broken, top_k=CFG.top_k)
    with pytest.raises(ValueError, match=r"plan\.offsets"):
        expert_ffn(x, up, down, plan._replace(offsets=with_entry(plan.offsets, -1, 99)), top_k=CFG.top_k)
    assert rows > 1
    swapped = plan.row_src.clone()
    swapped[[0, 1]] = plan.row_src[[1, 0]]
    with pytest.raises(ValueError, match=r"plan\.row_src"):  # rows whose slots point elsewhere
        expert_ffn(x, up, down, plan._replace(row_src=swapped), top_k=CFG.top_k)
    with pytest.raises(TypeError, match="plan"):
        expert_ffn(x, up, down, (plan.offsets, plan.row_src, plan.slot_row), top_k=CFG.top_k)
    with pytest.raises(ValueError, match=r"plan\.row_src must have shape \[8\]"):  # built for another top_k
        expert_ffn(x, up, down, plan, top_k=2)
    with pytest.raises(TypeError, match="down"):
        expert_ffn(x, up, down.double(), plan, top_k=CFG.top_k)
    with pytest.raises(ValueError, match="gemm_backend"):
        expert_ffn(x, up, down, plan, top_k=CFG.top_k, backend="fast")


def test_combine_rejects_bad_indices_naming_the_field():
    ids, weights, plan, x, _, _ = small_case()
    tokens, k = ids.shape
    args = (torch.zeros(tokens * k, 40), route_of(ids, weights))
    rest = (torch.zeros(tokens, 2 * CFG.n_constant), torch.zeros(CFG.n_constant, 40), CFG)
    ffn = int((ids < CFG.n_ffn).flatten().nonzero()[0])
    zero = int((ids >= CFG.zero_begin).flatten().nonzero()[0]) if (ids >= CFG.zero_begin).any() else None
    cases = [
        (plan._replace(slot_row=with_entry(plan.slot_row, ffn, 5_000_000)), ids, r"plan\.slot_row"),
        (plan._replace(slot_row=with_entry(plan.slot_row, ffn, -3)), ids, r"plan\.slot_row"),
        (plan, with_entry(ids, 0, CFG.n_experts + 3), "topk_ids"),
        (plan, with_entry(ids, 0, -1), "topk_ids"),
    ]
    if zero is not None:  # a zero expert's slot given a row
        cases.append((plan, with_entry(ids, ffn, CFG.zero_begin), "topk_ids"))
    for broken_plan, broken_ids, match in cases:
        with pytest.raises(ValueError, match=match):
            combine(x, args[0], route_of(broken_ids, weights), broken_plan, *rest)
    with pytest.raises(TypeError, match="route"):
        combine(x, args[0], (ids, weights), plan, *rest)
    with pytest.raises(TypeError, match=r"route\.topk_weights"):
        combine(x, args[0], route_of(ids, weights.double()), plan, *rest)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_index_checks_on_cuda_only_when_asked(monkeypatch):
    ids, _, plan, x, up, down = small_case()
    broken = plan._replace(row_src=with_entry(plan.row_src, 0, 77_777))
    to_cuda = [t.cuda() for t in (x, up, down)]
    cuda_plan = type(plan)(*(t.cuda() for t in broken))
    monkeypatch.setattr(permute, "CHECK_INDICES", True)
    with pytest.raises(ValueError, match=r"plan\.row_src"):
        expert_ffn(*to_cuda, cuda_plan, top_k=CFG.top_k)


def test_kernels_skip_indices_outside_their_buffers():
    """Below the checks: the kernels read any index value without leaving their buffers
    (csrc/moe/indices.h). An entry naming no row gives a zero row (gather) or adds
    nothing (row sum, combine)."""
    x = torch.arange(12.0).reshape(3, 4)
    row_src = torch.tensor([0, 77_777, -1, 5], dtype=torch.int32)
    out = torch.full((4, 4), 7.0)
    total = torch.tensor([4], dtype=torch.int32)  # views hold raw pointers: every tensor stays alive
    _C.gather_rows(view(x), view(row_src), view(total), 2, 1.0, view(out), 1, 0)
    assert torch.equal(out, torch.stack([x[0], torch.zeros(4), torch.zeros(4), x[2]]))
    src = torch.ones(6, 4)
    slot_row = torch.tensor([[0, 5_000_000], [-3, 1], [2, 3]], dtype=torch.int32)
    summed = torch.empty(3, 4)
    _C.row_sum(view(src), view(slot_row), 1.0, view(summed), 1, 0)
    assert torch.equal(summed, torch.tensor([1.0, 1.0, 2.0]).unsqueeze(1).expand(3, 4))
    cfg = MoEPPConfig(hidden_size=4, ffn_size=4, n_ffn=2, n_zero=1, top_k=2)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int32)
    weights = torch.ones(3, 2)
    y = torch.ones(6, 4)
    combined, mix, values = torch.empty(3, 4), torch.empty(3, 0), torch.empty(0, 4)
    _C.combine_forward(_C.CombineViews(view(x), view(y), view(ids), view(weights), view(slot_row), view(mix),
                                       view(values)),
                       _C.ExpertLayout(cfg.n_ffn, cfg.copy_begin, cfg.zero_begin, cfg.n_experts), 1.0, view(combined),
                       1, 0)
    assert torch.equal(combined, summed)


def test_torch_backward_windows_few_row_products(monkeypatch):
    """The torch backend's dy · V_e over a 192-row window (MKL's few-rows kernel at 8 KiB weight
    rows, one thread, fp32: _ops/expert_ffn._windowed_grad_a): experts of 95 (not windowed), 96, 150 and
    191 rows (windowed; the first window starts at row 0, the last ends at the last valid row),
    30 and 192 (not windowed), against the per-expert reference."""
    from moepp_kernels import _cpu_matmul
    from moepp_kernels._ops import expert_ffn as ops

    if not torch.backends.mkl.is_available():
        pytest.skip("the window applies to MKL's sgemm only")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the rule's condition; torch's own threads stay
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", False)  # MKL's products per expert, as on a CPU without AVX-512
    monkeypatch.setattr(ops, "CPU_GEMMS", False)
    counts, d, i = [150, 30, 96, 192, 95, 191], 8, 2048
    ids = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))].reshape(-1, 1)
    plan = build_plan(ids, len(counts))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ids.shape[0], d, generator=g).requires_grad_()
    up = (torch.randn(len(counts), 2 * i, d, generator=g) / d**0.5).requires_grad_()
    down = (torch.randn(len(counts), d, i, generator=g) / i**0.5).requires_grad_()
    seen, grad_a = [], ops._windowed_grad_a

    def counting_grad_a(dy_all, down_e, lo, hi, valid_rows, out):
        seen.append(hi - lo)
        return grad_a(dy_all, down_e, lo, hi, valid_rows, out)

    monkeypatch.setattr(ops, "_windowed_grad_a", counting_grad_a)
    y = expert_ffn(x, up, down, plan, top_k=1, backend="torch")
    grad = torch.randn(y.shape, generator=g)
    products, mm = [], torch.mm

    def counting_mm(a, b, **kwargs):
        if tuple(b.shape) == (d, i):  # dy · V_e: the rows it ran over
            products.append(a.shape[0])
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", counting_mm)
    ours = torch.autograd.grad((y * grad).sum(), (x, up, down))
    monkeypatch.setattr(torch, "mm", mm)
    assert sorted(seen) == sorted(counts)
    assert sorted(products) == [30, 95, 192, 192, 192, 192]  # 96, 150 and 191 over their windows
    rows = plan.row_src.long()
    experts = ids.flatten()[rows].long()
    expected = torch.cat([R.ffn_expert(x[rows[experts == e]], up[e], down[e]) for e in range(len(counts))])
    ref = torch.autograd.grad((expected * grad).sum(), (x, up, down))
    for name, a, b in zip(("x", "up", "down"), ours, ref):
        assert_norm_close(a, b, torch.float32, name)
