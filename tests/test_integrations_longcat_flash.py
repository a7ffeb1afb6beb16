"""transformers' LongCat-Flash (the real model classes, tiny, random init, offline):
the swap end to end (logits, greedy generation, gradients), bf16, dtype casts and
loading, the way back for saving, and clear errors."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.longcat_flash")
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM  # noqa: E402

from moepp_kernels.integrations import (  # noqa: E402
    LongcatFlashMoEPP,
    replace_longcat_flash_moe,
    restore_longcat_flash_moe,
)
from moepp_kernels.integrations.longcat_flash import config_from_longcat_flash_moe  # noqa: E402

VOCAB = 64
# Hidden 16, 3 routed + 2 identity experts, top-2, 2 layers (each with two attention blocks).
TINY = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_attention_heads=2, num_key_value_heads=2,
            ffn_hidden_size=24, expert_ffn_hidden_size=8, n_routed_experts=3, zero_expert_num=2, moe_topk=2,
            q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, head_dim=4,
            max_position_embeddings=64, routed_scaling_factor=2.0, pad_token_id=0, eos_token_id=1)


def tiny_model(seed: int = 0, **changes) -> LongcatFlashForCausalLM:
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(LongcatFlashConfig(**{**TINY, **changes})).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)  # a selection bias that changes choices (transformers inits zeros)
    return model


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_config_is_read_from_the_module():
    cfg = config_from_longcat_flash_moe(tiny_model().model.layers[0].mlp)
    assert (cfg.hidden_size, cfg.ffn_size, cfg.n_ffn, cfg.n_copy, cfg.n_zero, cfg.top_k) == (16, 8, 3, 2, 0, 2)
    assert cfg.selection_bias and not cfg.renormalize and cfg.routed_scaling_factor == 2.0
    assert cfg.scale_identity_weights  # transformers scales every chosen weight, identity experts included


def test_swapped_model_matches_transformers_fp32():
    original = tiny_model()
    model = copy.deepcopy(original)
    assert replace_longcat_flash_moe(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(layer.mlp, LongcatFlashMoEPP) for layer in model.model.layers)
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, original(ids).logits) < 1e-4
    generate = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids[:1]))
    torch.testing.assert_close(model.generate(ids[:1], **generate), original.generate(ids[:1], **generate),
                               rtol=0, atol=0)
    loss_of(original, ids).backward()
    loss_of(model, ids).backward()
    grads = {n: p.grad for n, p in original.named_parameters() if ".mlp." not in n}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)
    for layer, ref in zip(model.model.layers, original.model.layers):
        ours, theirs = layer.mlp.moepp, ref.mlp
        torch.testing.assert_close(ours.router.gate_weight.grad, theirs.router.classifier.weight.grad, rtol=1e-4,
                                   atol=1e-7)
        if hasattr(theirs.experts, "gate_up_proj"):  # transformers 5.x
            up_grad, down_grad = theirs.experts.gate_up_proj.grad[:3], theirs.experts.down_proj.grad
        else:  # 4.57 (an expert no token chose has no grad there, zeros here)
            def grad(w):
                return torch.zeros_like(w) if w.grad is None else w.grad

            mlps = list(theirs.experts)[:3]
            up_grad = torch.stack([torch.cat([grad(m.gate_proj.weight), grad(m.up_proj.weight)]) for m in mlps])
            down_grad = torch.stack([grad(m.down_proj.weight) for m in mlps])
        torch.testing.assert_close(ours.up.grad, up_grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.down.grad, down_grad, rtol=1e-4, atol=1e-7)


def test_swapped_model_bf16():
    original = tiny_model().to(torch.bfloat16)
    model = copy.deepcopy(original)
    replace_longcat_flash_moe(model)
    layer = model.model.layers[0].mlp.moepp
    assert layer.up.dtype == torch.bfloat16 and layer.router.gate_weight.dtype == torch.float32
    ids = token_ids(4, 16)
    with torch.no_grad():
        assert rel_err(model(ids).logits, original(ids).logits) < 2e-2
    loss = loss_of(model, ids)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "to_device_and_dtype"])
def test_casting_the_swapped_model_keeps_the_router_fp32(cast):
    model = tiny_model()
    replace_longcat_flash_moe(model)
    apply = {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
             "bfloat16": lambda m: m.bfloat16(), "to_device_and_dtype": lambda m: m.to("cpu", torch.float16)}[cast]
    apply(model)
    layer = model.model.layers[1].mlp.moepp
    assert layer.router.gate_weight.dtype == torch.float32 and layer.router.selection_bias.dtype == torch.float32
    assert layer.up.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        assert torch.isfinite(model(token_ids()).logits).all()


def test_bf16_state_dict_and_dtype_loading(tmp_path):
    # load_state_dict of a bf16 checkpoint (copying, and assign=True) keeps the router fp32
    model = tiny_model()
    replace_longcat_flash_moe(model)
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for assign in (False, True):
        target = copy.deepcopy(model).to(torch.bfloat16)
        target.load_state_dict(bf16, assign=assign)
        router = target.model.layers[0].mlp.moepp.router
        assert router.gate_weight.dtype == torch.float32 and router.selection_bias.dtype == torch.float32
        with torch.no_grad():
            assert torch.isfinite(target(token_ids()).logits).all()
    # a checkpoint loaded with a bf16 dtype by transformers, then swapped
    tiny_model().save_pretrained(tmp_path)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    loaded = LongcatFlashForCausalLM.from_pretrained(tmp_path, **{key: torch.bfloat16})
    replace_longcat_flash_moe(loaded)
    layer = loaded.model.layers[0].mlp.moepp
    assert layer.up.dtype == torch.bfloat16 and layer.router.gate_weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(loaded(token_ids()).logits).all()


def test_restore_for_saving(tmp_path):
    original = tiny_model()
    model = copy.deepcopy(original)
    replace_longcat_flash_moe(model)
    assert restore_longcat_flash_moe(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(type(layer.mlp) is type(original.model.layers[0].mlp) for layer in model.model.layers)
    expected, got = original.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        want = expected[key]
        if key.endswith("experts.gate_up_proj"):  # earlier 5.x: the identity experts' rows are never read
            want = torch.cat([want[:3], torch.zeros_like(want[3:])])
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    model.save_pretrained(tmp_path)
    reloaded = LongcatFlashForCausalLM.from_pretrained(tmp_path).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_padded_gate_up_proj_of_earlier_5x_releases():
    # Earlier 5.x releases held gate_up_proj for every expert, identity ones included (rows never
    # read); later ones (5.25) hold the routed experts' only, and their forward cannot run the padded
    # weights: a padded copy of the model is swapped, matched with the unpadded one, and restored padded.
    original = tiny_model()
    if not hasattr(original.model.layers[0].mlp.experts, "gate_up_proj"):
        pytest.skip("transformers 4.57 keeps its experts in a ModuleList")
    model = copy.deepcopy(original)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if experts.gate_up_proj.shape[0] == 3:
            padding = torch.randn(2, *experts.gate_up_proj.shape[1:])
            experts.gate_up_proj = torch.nn.Parameter(torch.cat([experts.gate_up_proj.detach(), padding]))
    replace_longcat_flash_moe(model)
    ids = token_ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, original(ids).logits) < 1e-4
    restore_longcat_flash_moe(model)
    for layer, ref in zip(model.model.layers, original.model.layers):
        got, want = layer.mlp.experts.gate_up_proj, ref.mlp.experts.gate_up_proj
        assert got.shape == (5, 16, 16)
        assert torch.equal(got[:3], want[:3]) and not got[3:].any()


def test_clear_errors():
    with pytest.raises(ValueError, match="holds no LongcatFlashMoE"):
        replace_longcat_flash_moe(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="router_bias"):
        replace_longcat_flash_moe(tiny_model(router_bias=True))
    with pytest.raises(ValueError, match="SwiGLU"):
        replace_longcat_flash_moe(tiny_model(hidden_act="gelu"))
    with pytest.raises(ValueError, match="not transformers' LongcatFlashMoE"):
        config_from_longcat_flash_moe(torch.nn.Linear(2, 2))
