"""The ops' eager path past the dispatcher (_ops.call_op): taken only in plain eager mode
without a gradient to record, with the same results as the dispatched custom ops, and
never where torch.compile, make_fx, FakeTensorMode or a functorch transform must see the
op (CPU)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from moepp_kernels import MoEPPConfig, MoEPPLayer, fused_router
from moepp_kernels import _ops as ops

CFG = MoEPPConfig(hidden_size=32, ffn_size=16, n_ffn=6, n_constant=2, n_copy=1, n_zero=1, top_k=2)


def moepp_ops_called(fn) -> set:
    """The moepp:: ops that went through the dispatcher while fn() ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("moepp::")}


def test_bypass_only_in_plain_eager_without_grad():
    x = torch.randn(3, 4)
    assert ops.bypasses_dispatcher((x, 2, None))
    w = torch.randn(4, requires_grad=True)
    assert not ops.bypasses_dispatcher((x, w))  # autograd must record the op
    with torch.no_grad():
        assert ops.bypasses_dispatcher((x, w))
    with FakeTensorMode():  # a dispatch mode: the op must reach it
        assert not ops.bypasses_dispatcher((x,))
    with torch.device("cpu"):  # a function mode
        assert not ops.bypasses_dispatcher((x,))
    seen = []
    torch.vmap(lambda t: seen.append(ops.bypasses_dispatcher((t,))) or t)(x)
    assert seen == [False]


@pytest.mark.parametrize("tokens", [1, 37])
def test_eager_layer_matches_the_dispatched_ops(monkeypatch, tokens):
    torch.manual_seed(0)
    layer = MoEPPLayer(CFG, has_residual=False, dtype=torch.float32)
    x = torch.randn(tokens, CFG.hidden_size)
    with torch.no_grad():
        assert moepp_ops_called(lambda: layer(x)) == set()  # router, plan, experts and combine all direct
        eager_out, eager_logits = layer(x)
        monkeypatch.setattr(ops, "bypasses_dispatcher", lambda args: False)
        assert {"moepp::router_forward", "moepp::build_plan", "moepp::combine"} <= moepp_ops_called(lambda: layer(x))
        out, logits = layer(x)
    assert torch.equal(eager_out, out)
    assert torch.equal(eager_logits, logits)


def test_training_step_goes_through_autograd():
    torch.manual_seed(0)
    layer = MoEPPLayer(CFG, has_residual=False, dtype=torch.float32)
    x = torch.randn(5, CFG.hidden_size, requires_grad=True)
    called = moepp_ops_called(lambda: layer(x)[0].sum().backward())
    assert {"moepp::router_forward", "moepp::expert_ffn", "moepp::combine", "moepp::combine_backward"} <= called
    assert x.grad is not None and layer.up.grad is not None


def test_make_fx_records_the_op():
    logits = torch.randn(4, CFG.n_experts)
    graph = make_fx(lambda t: fused_router(t, CFG).topk_weights)(logits)
    assert "moepp.router_forward" in str(graph.code)
