"""The MoE++ authors' released model (a test double with its contract and layout,
tests/released_moepp.py): config read from each module, the swap end to end, the
call contract, the way back, and clear errors for modules that do not fit."""

import copy
import subprocess
import sys

import pytest
import released_moepp as released
import torch
from torch import nn

from moepp_kernels import MoEPPConfig, replace_moepp_layers, restore_moepp_layers
from moepp_kernels.integrations import ReleasedMoEPPLayer, config_from_released_module

# Gating flag sets the released layer supports: its defaults, the 7B's (logits norm, no x*k),
# a 1-layer gate with a norm target other than 1, and the "mixtral" top-k-then-softmax gating.
FLAG_SETS = {
    "defaults": {},
    "7b": {"logits_norm": True, "no_mul_topk": True},
    "one_layer_gate": {"two_layer": False, "logits_norm": True, "norm_std": 0.5},
    "mixtral": {"mixtral": True, "logits_norm": True},
}


def tiny_model(seed: int = 0, **flags) -> released.MoeForCausalLM:
    torch.manual_seed(seed)
    return released.MoeForCausalLM(vocab=64, d=32, i=24, n=8, layers=3, **flags)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_config_is_read_from_the_module(flags):
    block = tiny_model(**flags).layers[0].mlp
    cfg = config_from_released_module(block)
    mixtral = flags.get("mixtral", False)
    assert (cfg.hidden_size, cfg.ffn_size, cfg.n_ffn, cfg.n_constant, cfg.n_copy, cfg.n_zero, cfg.top_k) == (
        32, 24, 4, 2, 1, 1, released.MOE_TOP_K)
    assert cfg.gating == ("topk_softmax" if mixtral else "softmax_topk")
    assert cfg.gate_depth == (2 if flags.get("two_layer", True) else 1)
    assert cfg.normalize_logits == flags.get("logits_norm", False)
    assert cfg.logits_std == flags.get("norm_std", 1.0)
    assert cfg.scale_input_by_topk == (not (mixtral or flags.get("no_mul_topk", False)))
    assert config_from_released_module(block, top_k=3).top_k == 3


@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_swapped_model_matches_the_released_one_fp32(flags):
    original = tiny_model(**flags)
    model = copy.deepcopy(original)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    names = replace_moepp_layers(model)
    assert names == [f"layers.{i}.mlp" for i in range(3)]
    assert all(isinstance(layer.mlp, ReleasedMoEPPLayer) for layer in model.layers)
    # logits to 1e-4 relative; eight greedy tokens identical
    with torch.no_grad():
        assert rel_err(model(ids), original(ids)) < 1e-4
    torch.testing.assert_close(model.greedy(ids[:1], 8), original.greedy(ids[:1], 8), rtol=0, atol=0)
    # the same gradients for every non-expert parameter, finite ones everywhere (but for the first
    # layer's G, which that layer never applies, in the released model neither)
    for m in (original, model):
        nn.functional.cross_entropy(m(ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    grads = {n: p.grad for n, p in original.named_parameters() if ".mlp." not in n}
    for name, p in model.named_parameters():
        if name == "layers.0.mlp.moepp.router.residual_weight":
            assert p.grad is None and original.layers[0].mlp.moe.gate.gate_map.weight.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for layer, ref in zip(model.layers, original.layers):
        for e in range(4):
            expert = ref.mlp.moe.experts.experts[e]
            torch.testing.assert_close(layer.mlp.moepp.up.grad[e], expert.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(layer.mlp.moepp.down.grad[e], expert.down_proj.weight.grad, rtol=1e-4,
                                       atol=1e-6)


def test_swapped_model_bf16_keeps_dtypes():
    original = tiny_model(logits_norm=True, no_mul_topk=True).to(torch.bfloat16)
    model = copy.deepcopy(original)
    replace_moepp_layers(model)
    layer = model.layers[1].mlp.moepp
    assert layer.up.dtype == torch.bfloat16 and layer.router.gate_w1.dtype == torch.float32
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # the released layer applies G in bf16, we in fp32 (spec: the differences): compare by relative norm
        assert rel_err(model(ids), original(ids)) < 3e-2


def test_call_contract_positional_and_keyword():
    model = tiny_model()
    x = torch.randn(2, 5, 32)
    prev = torch.randn(10, 8)
    reference = copy.deepcopy(model.layers[1].mlp)
    replace_moepp_layers(model)
    mlp = model.layers[1].mlp
    out, logits = mlp(x, None, prev)
    assert out.shape == x.shape and logits.shape == (10, 8) and logits.dtype == torch.float32
    for call in (lambda: mlp(x, gate_residual=prev), lambda: mlp(hidden_states=x, used_token=None, gate_residual=prev),
                 lambda: mlp(x, torch.ones(2, 5), prev.double())):
        out2, logits2 = call()
        torch.testing.assert_close(out2, out)
        torch.testing.assert_close(logits2, logits)
    r_out, r_logits = reference(x.clone(), gate_residual=prev)
    torch.testing.assert_close(out, r_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, r_logits, rtol=1e-5, atol=1e-5)
    first_out, _ = mlp(x)  # the first layer's call: no gate_residual
    assert first_out.shape == x.shape


def test_restore_gives_the_released_modules_back():
    original = tiny_model(logits_norm=True)
    model = copy.deepcopy(original)
    replace_moepp_layers(model)
    assert restore_moepp_layers(model) == [f"layers.{i}.mlp" for i in range(3)]
    assert all(type(layer.mlp) is released.MoEBlock for layer in model.layers)
    expected, got = original.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert model.layers[0].mlp.moe_use_logits_norm is True
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(model(ids), original(ids), rtol=0, atol=0)


def test_restore_follows_a_later_cast_mode_and_freeze():
    model = tiny_model()
    replace_moepp_layers(model)
    model.to(torch.bfloat16).eval().requires_grad_(False)
    restore_moepp_layers(model)
    block = model.layers[0].mlp
    experts = block.moe.experts.experts
    assert experts[0].up_proj.weight.dtype == torch.bfloat16 and experts[4].constant.dtype == torch.bfloat16
    assert not block.training and not any(p.requires_grad for p in block.parameters())


def test_explicit_config_is_used_as_given():
    model = tiny_model()
    cfg = config_from_released_module(model.layers[0].mlp).with_(top_k=1)
    replace_moepp_layers(model, cfg)
    assert model.layers[0].mlp.moepp.config is cfg


def _block(**flags) -> released.MoEBlock:
    torch.manual_seed(0)
    return released.MoEBlock(32, 24, 8, **flags)


def test_modules_that_do_not_fit_get_clear_errors():
    with pytest.raises(ValueError, match="not a released MoE\\+\\+ layer"):
        config_from_released_module(nn.Linear(4, 4))
    block = _block()
    del block.moe_feature_no_mul_topk
    del block.moe.moe_feature_no_mul_topk
    with pytest.raises(ValueError, match="moe_feature_no_mul_topk"):
        config_from_released_module(block)
    block = _block()
    block.moe_2layer_gate = False
    with pytest.raises(ValueError, match="moe_2layer_gate"):
        config_from_released_module(block)
    block = _block()
    experts = block.moe.experts.experts
    experts[3], experts[4] = experts[4], experts[3]
    with pytest.raises(ValueError, match="FFN, constant, copy, zero"):
        config_from_released_module(block)
    block = _block()
    block.moe.experts.experts.append(released.CopyExpert())
    with pytest.raises(ValueError, match="scores 8 experts but .* 9"):
        config_from_released_module(block)
    block = _block()
    block.moe.experts.experts[6] = nn.ReLU()
    with pytest.raises(ValueError, match="experts.6: ReLU is none of the released expert kinds"):
        config_from_released_module(block)
    block = _block()
    block.moe.experts.experts[1].up_proj = nn.Linear(32, 48, bias=True)
    with pytest.raises(ValueError, match="experts.1.up_proj: expected a bias-free nn.Linear"):
        config_from_released_module(block)
    block = _block()
    block.moe.experts.experts[7] = released.CopyExpert()
    with pytest.raises(ValueError, match="masks exactly one zero expert"):
        config_from_released_module(block)
    with pytest.raises(ValueError, match="holds no released MoE\\+\\+ layer module"):
        replace_moepp_layers(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="config must be a MoEPPConfig"):
        replace_moepp_layers(tiny_model(), config={"top_k": 2})


def test_wrong_config_for_the_weights_is_refused():
    with pytest.raises(ValueError, match="missing keys"):
        replace_moepp_layers(tiny_model(), MoEPPConfig.moepp_7b().with_(hidden_size=32, ffn_size=24, n_ffn=4,
                                                                        gate_depth=1))


def test_importing_the_package_does_not_import_transformers(tmp_path):
    code = ("import sys, moepp_kernels, moepp_kernels.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    # from a directory of its own: the installed package, not the source tree next to the tests
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
