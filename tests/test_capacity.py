"""Expert capacity (capacity.py; spec: "The paper's training-side extras"): the sizes,
which slots are dropped (lowest token index keeps its place), the layer against the
reference with capacity on, forward and backward, the dropped share in the router's
statistics, and torch.compile(fullgraph=True) on the CPU."""

import math

import pytest
import torch
from conftest import assert_close, assert_norm_close

from moepp_kernels import MoEPPConfig, MoEPPLayer, fused_router, moepp_layer
from moepp_kernels import reference as R
from moepp_kernels.capacity import apply_capacity, expert_capacity, slot_positions

CFG = MoEPPConfig.moepp_0_6b().with_(hidden_size=32, ffn_size=16, capacity_factor=0.8)


def test_sizes_follow_the_formula():
    cfg = MoEPPConfig.moepp_0_6b().with_(capacity_factor=1.1)  # 8 FFN + 4 zc, tau 0.75, top-2
    c_ffn, c_zc = expert_capacity(cfg, 1000)
    per = 1.1 * 2000 / (0.75 * 8 + 4)
    assert (c_ffn, c_zc) == (math.ceil(0.75 * per), math.ceil(per)) == (165, 220)
    # the balanced load of an FFN expert is (FFN share) * T * k / n_ffn = 150 slots: 10% headroom
    assert c_ffn == math.ceil(1.1 * 0.6 * 2000 / 8)
    assert expert_capacity(cfg, 0) == (0, 0)


def test_config_validation():
    for bad in (0.0, -1.0, float("inf"), True, "1.1"):
        with pytest.raises(ValueError, match="capacity_factor"):
            CFG.with_(capacity_factor=bad)
    with pytest.raises(ValueError, match="needs a zero expert"):
        MoEPPConfig.longcat(hidden_size=8, ffn_size=4, n_ffn=4, n_identity=2, top_k=2).with_(capacity_factor=1.1)
    with pytest.raises(ValueError, match="is None"):
        expert_capacity(CFG.with_(capacity_factor=None), 4)


def test_lowest_token_index_keeps_its_place():
    cfg = MoEPPConfig(hidden_size=4, ffn_size=4, n_ffn=2, n_copy=1, n_zero=1, top_k=1, capacity_factor=0.5)
    c_ffn, c_zc = expert_capacity(cfg, 8)  # ceil(0.5 * 8 * 0.75 / 3.5) = 1, ceil(0.5 * 8 / 3.5) = 2
    assert (c_ffn, c_zc) == (1, 2)
    ids = torch.tensor([[0], [0], [1], [2], [0], [2], [2], [1]], dtype=torch.int32)
    assert slot_positions(ids, 4).flatten().tolist() == [0, 1, 0, 0, 2, 1, 2, 1]
    weights = torch.rand(8, 1)
    new_ids, new_weights, share = apply_capacity(ids, weights, cfg)
    # expert 0 keeps token 0, expert 1 token 2, the copy expert tokens 3 and 5; the rest go to the zero expert
    assert new_ids.flatten().tolist() == [0, 3, 1, 2, 3, 2, 3, 3]
    kept = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(new_weights.flatten(), torch.where(kept, weights.flatten(), torch.zeros(8)))
    assert share.item() == 0.5


# T = 0, T = 1 (nothing can overflow), a T with drops, all tokens to one expert (most dropped)
@pytest.mark.parametrize("tokens, one_expert", [(0, False), (1, False), (37, False), (40, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_the_reference(tokens, one_expert, dtype):
    torch.manual_seed(0)
    layer = MoEPPLayer(CFG, dtype=dtype)
    if one_expert:
        with torch.no_grad():
            layer.router.gate_weight.zero_()
            layer.router.gate_weight[3] = 1.0
    x = torch.randn(tokens, 32, dtype=dtype)
    x = x.abs() if one_expert else x
    prev = torch.randn(tokens, CFG.n_experts)
    params = layer.reference_params()
    route = fused_router(layer.router.gate_logits(x), CFG, prev_logits=prev, residual_weight=params.residual_weight)
    ref_route = R.route(layer.router.gate_logits(x), CFG, prev, params.residual_weight)
    assert torch.equal(route.topk_ids.long(), ref_route.topk_ids)
    if tokens:  # the dropped share: every expert's slots beyond its capacity
        c_ffn, c_zc = expert_capacity(CFG, tokens)
        limits = torch.tensor([c_ffn] * CFG.n_ffn + [c_zc] * (CFG.n_experts - CFG.n_ffn))
        over = (route.counts.long() - limits).clamp(min=0).sum().item()
        assert route.dropped.item() == pytest.approx(over / (tokens * CFG.top_k))
    if one_expert:
        assert route.dropped.item() > 0.4
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out, logits = layer(xs[0], prev)
    r_out, r_logits = R.moepp_layer(xs[1], params, CFG, prev)
    assert_close(out, r_out, dtype)
    if tokens:
        grad = torch.randn_like(out)
        (out * grad).sum().backward()
        got = [xs[0].grad, layer.up.grad, layer.router.gate_weight.grad]
        layer.zero_grad()
        (r_out * grad).sum().backward()
        for a, b in zip(got, [xs[1].grad, layer.up.grad, layer.router.gate_weight.grad]):
            assert_norm_close(a, b, dtype)


def test_dropped_share_comes_with_the_router_statistics():
    torch.manual_seed(1)
    layer = MoEPPLayer(CFG, has_residual=False, dtype=torch.float32)
    x = torch.randn(64, 32)
    _, _, route = moepp_layer(x, CFG, up=layer.up, down=layer.down, const_gate=layer.const_gate,
                              const_value=layer.const_value, gate_weight=layer.router.gate_weight, return_router=True)
    assert route.dropped is not None and 0.0 < route.dropped.item() < 1.0
    assert route.f is not None and int(route.counts.sum()) == 64 * CFG.top_k  # counts: as the router chose
    assert fused_router(torch.randn(4, CFG.n_experts), CFG.with_(capacity_factor=None)).dropped is None


def test_compile_fullgraph_with_capacity():
    torch.manual_seed(0)
    layer = MoEPPLayer(CFG, dtype=torch.float32)
    x, prev = torch.randn(24, 32), torch.randn(24, CFG.n_experts)
    out, logits = layer(x, prev)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    c_out, c_logits = compiled(x, prev)
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_logits, logits)
    c_out.sum().backward()
    assert torch.isfinite(layer.up.grad).all()
