"""torch.compile(fullgraph=True) traces the fused router and the layer (CPU; the layer
with every grouped-GEMM backend on a GPU)."""

import pytest
import torch
from conftest import HAS_CUDA

from moepp_kernels import MoEPPConfig, MoEPPRouter


class TwoLayerRouting(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.first = MoEPPRouter(cfg)
        self.second = MoEPPRouter(cfg, has_residual=True)
        with torch.no_grad():
            self.second.residual_weight.normal_(std=0.1)

    def forward(self, x):
        a = self.first(x, return_stats=True)
        b = self.second(x, a.logits, return_stats=True)
        return (a.topk_weights.sum() + b.topk_weights.square().sum() + b.logits.sum() + (a.f * a.P).sum(),
                b.topk_ids)


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=32)
    model = TwoLayerRouting(cfg)
    x = torch.randn(2, 8, 32)
    eager_loss, eager_ids = model(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, ids = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(ids, eager_ids)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_compile_inductor_forward():
    torch.manual_seed(0)
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=32)
    router = MoEPPRouter(cfg)
    x = torch.randn(16, 32)
    compiled = torch.compile(router, fullgraph=True)
    out, ref = compiled(x, return_stats=True), router(x, return_stats=True)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    torch.testing.assert_close(out.topk_weights, ref.topk_weights)
    torch.testing.assert_close(out.P, ref.P)


def test_compile_fullgraph_layer_forward_and_backward():
    from moepp_kernels import MoEPPLayer

    torch.manual_seed(0)
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=32, ffn_size=16)
    first, second = MoEPPLayer(cfg, has_residual=False, dtype=torch.float32), MoEPPLayer(cfg, dtype=torch.float32)

    def two_layers(x):
        h, logits = first(x)
        out, _, balance = second(h, logits, return_balance_loss=True)
        return out.square().sum() + balance

    x = torch.randn(3, 7, 32)
    params = list(first.parameters()) + list(second.parameters())
    eager = two_layers(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "triton", "cutlass"])
def test_compile_fullgraph_layer_on_the_gpu(backend):
    """Nothing on the CUDA path breaks the graph: no call into the extension or query of
    the device outside the custom ops (the backend choice included)."""
    from moepp_kernels import MoEPPLayer, grouped_gemm

    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=256, ffn_size=384)
    try:
        grouped_gemm.resolve_backend(backend, torch.device("cuda"), torch.bfloat16, (256, 384))
    except ValueError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.bfloat16, device="cuda", gemm_backend=backend)
    x = torch.randn(64, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(x):
        out, logits = layer(x)
        return out.float().square().sum() + logits.sum()

    params = [x, *layer.parameters()]
    eager = step(x)
    eager_grads = torch.autograd.grad(eager, params)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
