"""The gate's fp32 product on model-dtype tokens (moepp::gate_linear): forward and backward
against x.float() @ Wᵀ, over dtypes and row counts around the CPU's 512-row chunks, and no
fp32 copy of x kept for the backward."""

import pytest
import torch
from conftest import DEVICES, assert_close, assert_norm_close

from moepp_kernels import MoEPPConfig, MoEPPLayer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# T = 0, 1; below, at and past one chunk; two chunks and a tail; D not a power of two; fp32 dx
# over the host cache's threshold (_tensors.CACHED_BUFFER_BYTES: a cached block)
@pytest.mark.parametrize("tokens", [0, 1, 511, 512, 513, 1300, 26300])
def test_gate_linear_matches_the_fp32_product(device, dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 40, generator=g).to(dtype).to(device).requires_grad_()
    w = torch.randn(14, 40, generator=g).to(device).requires_grad_()
    out = torch.ops.moepp.gate_linear(x, w)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    want = x32 @ w32.t()
    assert out.dtype == torch.float32 and out.shape == (tokens, 14)
    assert_close(out, want, torch.float32, "logits")  # x is exact in fp32: an fp32 product either way
    grad = torch.randn(tokens, 14, generator=g).to(device)
    out.backward(grad)
    want.backward(grad)
    assert x.grad.dtype == dtype
    assert_close(x.grad, x32.grad.to(dtype), dtype, "grad x")  # the fp32 gradient, rounded once
    assert_norm_close(w.grad, w32.grad, torch.float32, "grad weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_keeps_no_fp32_copy_of_its_input(dtype):
    # The gate's fp32 product keeps x itself for the backward, not x.float() (twice x's size).
    cfg = MoEPPConfig(hidden_size=64, ffn_size=32, n_ffn=4, n_constant=1, n_copy=1, n_zero=1, top_k=2)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=dtype)
    x = torch.randn(600, 64).to(dtype).requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x)
    assert (dtype, (600, 64)) in saved
    assert (torch.float32, (600, 64)) not in saved, saved
    out.float().sum().backward()
    assert x.grad.dtype == dtype and layer.router.gate_weight.grad is not None
