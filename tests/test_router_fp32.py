"""The router stays float32 whatever the model is cast to (spec: "Router (all in
fp32)"): `.to(dtype)`, `.half()`, `.bfloat16()`, device-and-dtype `.to`, and
load_state_dict of a bf16 / fp16 checkpoint, copying or with assign=True."""

import pytest
import torch

from moepp_kernels import MoEPPConfig, MoEPPLayer

CFG = MoEPPConfig.moepp_7b().with_(hidden_size=32, ffn_size=16)
LONGCAT = MoEPPConfig.longcat(hidden_size=32, ffn_size=16, n_ffn=4, n_identity=2, top_k=2)
CASTS = {
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to_fp16": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "to_device_and_dtype": (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    "float": (lambda m: m.float(), torch.float32),
}


def router_tensors(layer: MoEPPLayer) -> dict:
    return dict(layer.router.named_parameters()) | dict(layer.router.named_buffers())


@pytest.mark.parametrize("cfg", [CFG, CFG.with_(gate_depth=2), LONGCAT], ids=["gate1", "gate2", "longcat"])
@pytest.mark.parametrize("cast", CASTS, ids=CASTS.keys())
def test_casts_leave_the_router_fp32(cfg, cast):
    apply, expert_dtype = CASTS[cast]
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, dtype=torch.float32)
    before = {k: v.detach().clone() for k, v in router_tensors(layer).items()}
    x = torch.randn(5, 32)
    layer(x, torch.randn(5, cfg.n_experts))[0].sum().backward()  # grads too stay fp32
    assert apply(layer) is layer
    assert layer.up.dtype == expert_dtype and layer.const_value.dtype == expert_dtype
    for name, t in router_tensors(layer).items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, before[name]), f"{name} was rounded through {expert_dtype}"
        if isinstance(t, torch.nn.Parameter):
            assert t.grad is not None and t.grad.dtype == torch.float32, name
    out, logits = layer(x.to(expert_dtype), torch.randn(5, cfg.n_experts))
    assert out.dtype == expert_dtype and logits.dtype == torch.float32


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_checkpoint_loads_into_an_fp32_router(dtype, assign):
    torch.manual_seed(0)
    checkpoint = {k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in MoEPPLayer(LONGCAT, dtype=dtype).state_dict().items()}
    layer = MoEPPLayer(LONGCAT, dtype=dtype)
    layer.load_state_dict(checkpoint, assign=assign)
    for name, t in router_tensors(layer).items():
        assert t.dtype == torch.float32, name
        torch.testing.assert_close(t, checkpoint[f"router.{name}"].float(), rtol=0, atol=0)
    assert layer.up.dtype == dtype and torch.equal(layer.up, checkpoint["up"])
    assert torch.isfinite(layer(torch.randn(3, 32, dtype=dtype))[0]).all()
