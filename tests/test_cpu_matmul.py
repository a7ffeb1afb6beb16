"""The products inside the moepp:: ops (moepp_kernels._cpu_matmul): fp32 through oneDNN on the
CPUs where it is picked, torch.mm elsewhere. Both routes, on any CPU with oneDNN, against
torch.mm / torch.addmm over the operand layouts the expert FFN, the gate and the router pass
(transposed views, row windows), then the layer and the wide router's residual op on both routes
against the reference; autocast and tracing. Products over K terms summed in another order
differ by K-dependent ulps: compared in norm."""

import pytest
import torch
from conftest import assert_norm_close
from torch._subclasses.fake_tensor import FakeTensorMode

from moepp_kernels import MoEPPConfig, MoEPPLayer, _cpu_matmul, fused_router
from moepp_kernels import reference as R
from moepp_kernels.router import RESIDUAL_IN_KERNEL_MAX_EXPERTS

ROUTES = [pytest.param(False, id="torch.mm"),
          pytest.param(True, id="onednn", marks=pytest.mark.skipif(
              not _cpu_matmul.onednn_op_available(), reason="this torch has no oneDNN matmul op"))]


@pytest.fixture(params=ROUTES)
def onednn(request, monkeypatch):
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", request.param)
    return request.param


def operands(m: int, k: int, n: int, layout: str, seed: int = 0):
    """a [m, k], b [k, n] in one of the layouts the callers pass."""
    g = torch.Generator().manual_seed(seed)
    if layout == "row_major":  # the FFN's a; grad_input's b = w_e
        return torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    if layout == "b_transposed":  # forward's b = w_e.t()
        return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).t()
    if layout == "a_transposed":  # grad_weight's a = dy_e.t()
        return torch.randn(k, m, generator=g).t(), torch.randn(k, n, generator=g)
    rows = torch.randn(m + 5, k + 3, generator=g)  # a window of a wider buffer: strided rows
    return rows[2:m + 2, 1:k + 1], torch.randn(k, n, generator=g)


@pytest.mark.parametrize("layout", ["row_major", "b_transposed", "a_transposed", "strided_window"])
# M = 1 (decode), N not a power of two, K = 1
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 40, 14), (130, 1, 33), (256, 200, 70)])
def test_mm_matches_torch_mm(onednn, layout, m, k, n):
    a, b = operands(m, k, n, layout)
    assert _cpu_matmul.uses_onednn(a, b) == onednn
    want = torch.mm(a, b)
    assert_norm_close(_cpu_matmul.mm(a, b), want, torch.float32, "mm")
    out = torch.full((m + 3, n), float("nan"))
    written = _cpu_matmul.mm(a, b, out=out[1:m + 1])
    assert written.data_ptr() == out[1].data_ptr()
    assert_norm_close(out[1:m + 1], want, torch.float32, "mm out")
    assert out[0].isnan().all() and out[m + 1:].isnan().all()  # nothing outside out


# M = 0 (an expert or a batch without rows), K = 0 (a product over no rows: zeros), N = 0
@pytest.mark.parametrize("m, k, n", [(0, 8, 5), (6, 0, 5), (6, 8, 0)])
def test_empty_extents(onednn, m, k, n):
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    assert not _cpu_matmul.uses_onednn(a, b)
    assert torch.equal(_cpu_matmul.mm(a, b), torch.zeros(m, n))
    assert torch.equal(_cpu_matmul.add_mm(c, a, b), torch.addmm(c, a, b))


# the router's l + r·Gᵀ (square), a rectangular product, one row, a broadcast c (torch.addmm's way)
@pytest.mark.parametrize("m, k, n, c_shape", [(300, 96, 96, None), (77, 13, 40, None), (1, 20, 20, None),
                                              (50, 30, 20, (20,))])
def test_add_mm_matches_addmm(onednn, m, k, n, c_shape):
    g = torch.Generator().manual_seed(m)
    c = torch.randn(c_shape or (m, n), generator=g)
    a, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    got = _cpu_matmul.add_mm(c, a, w.t())
    assert got.shape == (m, n) and got.data_ptr() != c.data_ptr()
    assert_norm_close(got, torch.addmm(c, a, w.t()), torch.float32, "add_mm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_on_torch_mm(onednn, dtype):
    """bf16 / fp16 products are torch.mm's (oneDNN's already where the CPU has bf16): bit for bit."""
    a, b = operands(33, 48, 20, "b_transposed")
    a, b = a.to(dtype), b.to(dtype)
    assert not _cpu_matmul.uses_onednn(a, b)
    assert torch.equal(_cpu_matmul.mm(a, b), torch.mm(a, b))


def test_mkldnn_flag_opts_out(monkeypatch):
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", True)
    a, b = operands(8, 8, 8, "row_major")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # as torch.backends.mkldnn.flags(enabled=False)
    assert not _cpu_matmul.uses_onednn(a, b)
    assert torch.equal(_cpu_matmul.mm(a, b), torch.mm(a, b))


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_environment_forces_the_route(monkeypatch, value, expected):
    if not _cpu_matmul.onednn_op_available():
        pytest.skip("this torch has no oneDNN matmul op")
    monkeypatch.setenv("MOEPP_ONEDNN_FP32", value)
    assert _cpu_matmul._onednn_fp32() is expected


def test_environment_rejects_other_values(monkeypatch):
    monkeypatch.setenv("MOEPP_ONEDNN_FP32", "yes")
    with pytest.raises(ValueError, match="MOEPP_ONEDNN_FP32"):
        _cpu_matmul._onednn_fp32()


def test_autocast_does_not_reach_in(onednn):
    """Products keep their operands' dtype under torch.autocast (the router's stay fp32)."""
    a, b = operands(40, 24, 16, "b_transposed")
    into = torch.empty(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product, summed = _cpu_matmul.mm(a, b), _cpu_matmul.add_mm(torch.ones(40, 16), a, b)
        written = _cpu_matmul.mm_into(a, b, into)
    assert product.dtype == summed.dtype == torch.float32
    assert written is into  # mm_into writes its `out` itself
    assert_norm_close(product, torch.mm(a, b), torch.float32, "mm")
    assert_norm_close(into, torch.mm(a, b), torch.float32, "mm_into")
    assert_norm_close(summed, torch.mm(a, b) + 1, torch.float32, "add_mm")


def test_traced_products_are_torch_mm(monkeypatch):
    """torch.compile traces torch.mm / torch.addmm: inductor refuses oneDNN's op on a weight that
    is not a graph constant, and its fused sum has no fake-tensor rule."""
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", True)
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    a, b, c = torch.randn(16, 24), torch.randn(24, 8), torch.randn(16, 8)
    fn = torch.compile(lambda a, b, c: (_cpu_matmul.mm(a, b), _cpu_matmul.add_mm(c, a, b)), backend=backend,
                       fullgraph=True)
    product, summed = fn(a, b, c)
    assert any("mm" in s for s in seen) and not any("mkldnn" in s for s in seen)
    assert_norm_close(product, a @ b, torch.float32, "mm")
    assert_norm_close(summed, torch.addmm(c, a, b), torch.float32, "add_mm")


WIDE = MoEPPConfig(hidden_size=32, ffn_size=24, n_ffn=130, n_constant=2, n_copy=1, n_zero=1, top_k=4)
assert WIDE.n_experts > RESIDUAL_IN_KERNEL_MAX_EXPERTS  # the router's residual runs as moepp::residual_logits


def test_wide_router_residual_forward_and_backward(onednn):
    g = torch.Generator().manual_seed(0)
    n, tokens = WIDE.n_experts, 45
    leaves = [torch.randn(tokens, n, generator=g), torch.randn(tokens, n, generator=g),
              torch.randn(n, n, generator=g) / n**0.5]
    d_w, d_l = torch.randn(tokens, WIDE.top_k, generator=g), torch.randn(tokens, n, generator=g)

    def grads(route):
        inputs = [t.clone().requires_grad_() for t in leaves]
        ids, weights, logits = route(*inputs)
        return ids, logits, torch.autograd.grad((weights * d_w).sum() + (logits * d_l).sum(), inputs)

    def fused(lg, pv, wt):
        out = fused_router(lg, WIDE, prev_logits=pv, residual_weight=wt)
        return out.topk_ids.long(), out.topk_weights, out.logits

    def reference(lg, pv, wt):
        ref = R.route(lg, WIDE, pv, wt)
        return ref.topk_ids, ref.topk_weights, ref.logits

    (ids, logits, ours), (ref_ids, ref_logits, theirs) = grads(fused), grads(reference)
    assert torch.equal(ids, ref_ids)
    assert_norm_close(logits, ref_logits, torch.float32, "logits")
    for name, a, b in zip(("logits", "prev_logits", "residual_weight"), ours, theirs):
        assert_norm_close(a, b, torch.float32, f"grad {name}")


def test_wide_router_residual_under_fake_tensors():
    with FakeTensorMode():
        n = WIDE.n_experts
        out = fused_router(torch.empty(7, n), WIDE, prev_logits=torch.empty(7, n), residual_weight=torch.empty(n, n))
        assert out.logits.shape == (7, n) and out.topk_ids.shape == (7, WIDE.top_k)


# a two-layer gate (its second product as moepp::gate_linear), the wide router's residual GEMM
@pytest.mark.parametrize("cfg", [pytest.param(MoEPPConfig.moepp_0_6b().with_(hidden_size=48, ffn_size=40,
                                                                              gate_depth=2), id="2layer_gate"),
                                 pytest.param(WIDE, id="wide_residual")])
def test_layer_matches_reference(onednn, cfg):
    """The layer's fp32 forward and backward, every product through the route, and the same
    under torch.autocast (the ops keep fp32: routing in fp32 as the spec says)."""
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, dtype=torch.float32)
    with torch.no_grad():
        layer.router.residual_weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(150, cfg.hidden_size, generator=g).requires_grad_()
    prev = torch.randn(150, cfg.n_experts, generator=g)
    params = layer.reference_params()
    ref, _ = R.moepp_layer(x, params, cfg, prev)
    leaves = (x, layer.up, layer.down, layer.router.residual_weight)
    theirs = torch.autograd.grad(ref.square().sum(), leaves)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = layer(x, prev)
        assert out.dtype == torch.float32
        assert_norm_close(out, ref, torch.float32, "out")
        ours = torch.autograd.grad(out.square().sum(), leaves)
        for name, a, b in zip(("x", "up", "down", "residual_weight"), ours, theirs):
            assert_norm_close(a, b, torch.float32, name)
