"""The layer's CPU matmuls (moepp_kernels._cpu_matmul): fp32 through oneDNN on AVX-512 CPUs,
torch.mm elsewhere; both routes against torch.mm / torch.addmm, with the operand layouts the
expert FFN, the gate and the router pass (transposed views, row slices), forward and backward.
Products over K terms summed in another order differ by K-dependent ulps: compared in norm."""

import pytest
import torch
from conftest import assert_norm_close

from moepp_kernels import _cpu_matmul

ROUTES = [pytest.param(False, id="torch.mm"),
          pytest.param(True, id="onednn", marks=pytest.mark.skipif(
              not _cpu_matmul.ONEDNN_FP32, reason="oneDNN's fp32 route needs an AVX-512 CPU and mkldnn"))]


def operands(m: int, k: int, n: int, layout: str, seed: int = 0):
    """a [m, k], b [k, n] in one of the layouts the callers pass."""
    g = torch.Generator().manual_seed(seed)
    if layout == "row_major":  # x_e · U_eᵀ's a, grad_input's b = w_e
        return torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    if layout == "b_transposed":  # forward's b = w_e.t()
        return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).t()
    if layout == "a_transposed":  # grad_weight's a = dy_e.t()
        return torch.randn(k, m, generator=g).t(), torch.randn(k, n, generator=g)
    rows = torch.randn(m + 5, k + 3, generator=g)  # a window of a wider buffer: strided rows
    return rows[2:m + 2, 1:k + 1], torch.randn(k, n, generator=g)


@pytest.mark.parametrize("onednn", ROUTES)
@pytest.mark.parametrize("layout", ["row_major", "b_transposed", "a_transposed", "strided_window"])
# M = 1 (decode), N not a power of two, K = 1
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 40, 14), (130, 1, 33), (256, 200, 70)])
def test_mm_matches_torch_mm(monkeypatch, onednn, layout, m, k, n):
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", onednn)
    a, b = operands(m, k, n, layout)
    assert _cpu_matmul.uses_onednn(a, b) == onednn
    want = torch.mm(a, b)
    assert_norm_close(_cpu_matmul.mm(a, b), want, torch.float32, "mm")
    out = torch.full((m + 3, n), float("nan"))
    written = _cpu_matmul.mm(a, b, out=out[1:m + 1])
    assert written.data_ptr() == out[1].data_ptr()
    assert_norm_close(out[1:m + 1], want, torch.float32, "mm out")
    assert out[0].isnan().all() and out[m + 1:].isnan().all()  # nothing outside out


@pytest.mark.parametrize("onednn", ROUTES)
# M = 0 (an expert or a batch without rows), K = 0 (a product over no rows: zeros), N = 0
@pytest.mark.parametrize("m, k, n", [(0, 8, 5), (6, 0, 5), (6, 8, 0)])
def test_mm_empty_extents(monkeypatch, onednn, m, k, n):
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", onednn)
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert not _cpu_matmul.uses_onednn(a, b)
    assert torch.equal(_cpu_matmul.mm(a, b), torch.zeros(m, n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_on_torch_mm(dtype):
    """torch.mm already runs bf16 / fp16 through oneDNN where it is fast: the same call, bit for bit."""
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


@pytest.mark.parametrize("onednn", ROUTES)
@pytest.mark.parametrize("m, k, n", [(1, 20, 20), (300, 96, 96), (77, 13, 13)])
def test_add_mm_forward_and_backward_match_addmm(monkeypatch, onednn, m, k, n):
    """The router's l + r · Gᵀ: values and the gradients of all three operands."""
    monkeypatch.setattr(_cpu_matmul, "ONEDNN_FP32", onednn)
    g = torch.Generator().manual_seed(m)
    c, a, w = (torch.randn(m, n, generator=g), torch.randn(m, k, generator=g), torch.randn(n, k, generator=g))
    ours = [t.clone().requires_grad_() for t in (c, a, w)]
    ref = [t.clone().requires_grad_() for t in (c, a, w)]
    out = _cpu_matmul.add_mm(ours[0], ours[1], ours[2].t())
    want = torch.addmm(ref[0], ref[1], ref[2].t())
    assert_norm_close(out, want, torch.float32, "add_mm")
    grad = torch.randn(m, n, generator=g)
    out.backward(grad)
    want.backward(grad)
    for name, x, y in zip(("c", "a", "w"), ours, ref):
        assert_norm_close(x.grad, y.grad, torch.float32, f"grad {name}")


def test_add_mm_traces_as_addmm():
    """torch.compile traces torch.addmm (oneDNN's fused sum has no fake-tensor rule)."""
    c, a, w = torch.randn(16, 24), torch.randn(16, 24), torch.randn(24, 24)
    compiled = torch.compile(lambda c, a, w: _cpu_matmul.add_mm(c, a, w.t()), backend="eager", fullgraph=True)
    assert_norm_close(compiled(c, a, w), torch.addmm(c, a, w.t()), torch.float32, "compiled add_mm")
