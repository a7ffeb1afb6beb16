import pytest

from moepp_kernels import MoEPPConfig


def test_presets_layouts():
    c7 = MoEPPConfig.moepp_7b()
    assert (c7.n_ffn, c7.n_constant, c7.n_copy, c7.n_zero, c7.n_experts) == (16, 2, 1, 1, 20)
    assert c7.normalize_logits and not c7.scale_input_by_topk
    assert MoEPPConfig.moepp_0_6b().n_experts == 12
    assert MoEPPConfig.moepp_1b().n_experts == 20
    assert MoEPPConfig.moepp_2b().n_experts == 40
    lc = MoEPPConfig.longcat()
    assert lc.selection_bias and not lc.renormalize and lc.routed_scaling_factor == 6.0


def test_expert_kinds_follow_the_checkpoint_order():
    c = MoEPPConfig.moepp_7b()
    kinds = [c.expert_kind(e) for e in range(c.n_experts)]
    assert kinds == ["ffn"] * 16 + ["constant"] * 2 + ["copy"] + ["zero"]
    with pytest.raises(ValueError, match="expert"):
        c.expert_kind(20)


@pytest.mark.parametrize(
    "changes, exc, name",
    [
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 21}, ValueError, "top_k"),  # k > N
        ({"n_ffn": -1}, ValueError, "n_ffn"),
        ({"gating": "mixtral"}, ValueError, "gating"),
        ({"gate_depth": 3}, ValueError, "gate_depth"),
        ({"logits_std": 0.0}, ValueError, "logits_std"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routed_scaling_factor"),
        ({"hidden_size": 2.0}, TypeError, "hidden_size"),
        ({"n_ffn": 0, "n_constant": 0, "n_copy": 0, "n_zero": 0, "top_k": 1}, ValueError, "expert"),
    ],
)
def test_config_validates_itself(changes, exc, name):
    with pytest.raises(exc, match=name):
        MoEPPConfig.moepp_7b().with_(**changes)
