"""Released-checkpoint layout <-> MoEPPLayer (the model swap: test_integrations_released_moepp.py)."""

import pytest
import torch
from torch import nn

from moepp_kernels import MoEPPConfig, MoEPPLayer
from moepp_kernels import reference as R

CFG = MoEPPConfig.moepp_7b().with_(hidden_size=32, ffn_size=24)


class ReleasedExpertFFN(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.up_proj = nn.Linear(d, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)


class ReleasedConstantExpert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(d))
        self.wg = nn.Linear(d, 2, bias=False)


class ReleasedLayer(nn.Module):
    """A stand-in with the released layer's parameter names (spec: "Checkpoint layout"),
    computing through the reference."""

    def __init__(self, cfg, residual=True):
        super().__init__()
        self.cfg = cfg
        self.moe = nn.Module()
        self.moe.gate = nn.Module()
        n, d = cfg.n_experts, cfg.hidden_size
        self.moe.gate.wg = nn.Linear(d, n, bias=False) if cfg.gate_depth == 1 else nn.Sequential(
            nn.Linear(d, 8 * n, bias=False), nn.Tanh(), nn.Linear(8 * n, n, bias=False))
        if residual:
            self.moe.gate.gate_map = nn.Linear(n, n, bias=False)
        self.moe.experts = nn.Module()
        experts = [ReleasedExpertFFN(d, cfg.ffn_size) for _ in range(cfg.n_ffn)]
        experts += [ReleasedConstantExpert(d) for _ in range(cfg.n_constant)]
        experts += [nn.Identity() for _ in range(cfg.n_copy + cfg.n_zero)]
        self.moe.experts.experts = nn.ModuleList(experts)

    def forward(self, x, prev=None):
        e = self.moe.experts.experts
        cfg = self.cfg
        gate = self.moe.gate
        params = R.MoEPPParams(
            up=torch.stack([e[i].up_proj.weight for i in range(cfg.n_ffn)]),
            down=torch.stack([e[i].down_proj.weight for i in range(cfg.n_ffn)]),
            const_gate=torch.stack([e[c].wg.weight for c in range(cfg.n_ffn, cfg.copy_begin)]),
            const_value=torch.stack([e[c].constant for c in range(cfg.n_ffn, cfg.copy_begin)]),
            gate_weight=gate.wg.weight if cfg.gate_depth == 1 else None,
            gate_w1=gate.wg[0].weight if cfg.gate_depth == 2 else None,
            gate_w2=gate.wg[2].weight if cfg.gate_depth == 2 else None,
            residual_weight=gate.gate_map.weight if prev is not None else None)
        return R.moepp_layer(x, params, cfg, prev)


@pytest.mark.parametrize("gate_depth", [1, 2])
def test_from_state_dict_computes_what_the_released_layer_does(gate_depth):
    cfg = CFG.with_(gate_depth=gate_depth)
    torch.manual_seed(0)
    released = ReleasedLayer(cfg)
    layer = MoEPPLayer.from_moepp_state_dict(released.state_dict(), cfg)
    assert layer.up.dtype == torch.float32 and layer.router.residual_weight is not None
    x, prev = torch.randn(9, 32), torch.randn(9, cfg.n_experts)
    out, logits = layer(x, prev)
    r_out, r_logits = released(x, prev)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, r_logits)


def test_round_trip_and_prefix():
    torch.manual_seed(0)
    released = ReleasedLayer(CFG)
    sd = {f"model.layers.3.mlp.{k}": v for k, v in released.state_dict().items()}
    layer = MoEPPLayer.from_moepp_state_dict(sd, CFG, prefix="model.layers.3.mlp.")
    back = layer.to_moepp_state_dict(prefix="model.layers.3.mlp.")
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_first_layer_without_gate_map():
    released = ReleasedLayer(CFG, residual=False)
    layer = MoEPPLayer.from_moepp_state_dict(released.state_dict(), CFG)
    assert layer.router.residual_weight is None
    assert "moe.gate.gate_map.weight" not in layer.to_moepp_state_dict()


def test_bad_state_dicts():
    sd = ReleasedLayer(CFG).state_dict()
    missing = dict(sd)
    del missing["moe.experts.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing keys.*experts.3.up_proj"):
        MoEPPLayer.from_moepp_state_dict(missing, CFG)
    with pytest.raises(ValueError, match="unexpected keys"):
        MoEPPLayer.from_moepp_state_dict({**sd, "moe.extra": torch.zeros(1)}, CFG)
    wrong = {**sd, "moe.experts.experts.17.constant": torch.zeros(33)}
    with pytest.raises(ValueError, match="experts.17.constant"):
        MoEPPLayer.from_moepp_state_dict(wrong, CFG)
    with pytest.raises(ValueError, match="missing keys"):
        MoEPPLayer.from_moepp_state_dict(sd, CFG.with_(gate_depth=2))
