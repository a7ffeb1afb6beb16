"""The reference against hand-computed cases of the spec (it is the oracle, so
it gets checked against arithmetic, not against the kernels)."""

import math

import torch

from moepp_kernels import MoEPPConfig
from moepp_kernels import reference as R

# 2 FFN | 1 constant | 1 copy | 1 zero -> ids 0,1 | 2 | 3 | 4
SMALL = MoEPPConfig(hidden_size=4, ffn_size=3, n_ffn=2, n_constant=1, n_copy=1, n_zero=1, top_k=2)


def test_zero_expert_on_top_gives_the_other_weight_one():
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 3.0]])
    r = R.route(logits, SMALL)
    assert r.topk_ids.tolist() == [[4, 1]]
    assert r.topk_weights.tolist() == [[0.0, 1.0]]


def test_only_zero_experts_chosen_gives_zero_weights_not_nan():
    r = R.route(torch.tensor([[0.0, 1.0, 0.0, 0.0, 3.0]]), SMALL.with_(top_k=1))
    assert r.topk_weights.tolist() == [[0.0]]
    cfg = SMALL.with_(n_zero=2, n_copy=0)  # ids 3 and 4 are zero experts
    r = R.route(torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]]), cfg)
    assert r.topk_ids.tolist() == [[3, 4]] and r.topk_weights.tolist() == [[0.0, 0.0]]


def test_softmax_topk_without_renormalisation_keeps_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    r = R.route(logits, SMALL.with_(renormalize=False))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(r.topk_weights, p[:, :2])


def test_topk_softmax_softmaxes_the_chosen_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])
    r = R.route(logits, SMALL.with_(gating="topk_softmax"))
    assert r.topk_ids.tolist() == [[4, 0]]
    torch.testing.assert_close(r.topk_weights, torch.softmax(torch.tensor([[5.0, 2.0]]), -1))


def test_ties_go_to_the_lowest_id_and_equal_logits_skip_normalisation():
    r = R.route(torch.zeros(1, 5), SMALL.with_(normalize_logits=True))
    assert r.topk_ids.tolist() == [[0, 1]]
    assert r.topk_weights.tolist() == [[0.5, 0.5]]


def test_normalisation_divides_by_unbiased_std():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0]])
    z = R.normalize_logits(logits, 2.0)
    torch.testing.assert_close(z, logits / (logits.std(unbiased=True) / 2.0))


def test_selection_bias_chooses_but_does_not_weight():
    cfg = MoEPPConfig(hidden_size=4, ffn_size=3, n_ffn=3, n_copy=1, top_k=1, renormalize=False,
                      selection_bias=True, routed_scaling_factor=6.0, scale_identity_weights=False)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    p = torch.softmax(logits, -1)
    r = R.route(logits, cfg, selection_bias=torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert r.topk_ids.tolist() == [[1]]
    torch.testing.assert_close(r.topk_weights, 6.0 * p[:, 1:2])
    r = R.route(logits, cfg, selection_bias=torch.tensor([0.0, 0.0, 0.0, 1.0]))  # the copy expert: unscaled
    torch.testing.assert_close(r.topk_weights, p[:, 3:4])


def test_non_finite_logits_are_defined():
    nan, inf = float("nan"), float("inf")
    r = R.route(torch.tensor([[nan, 1.0, 0.0, 0.0, 0.0]]), SMALL)
    assert r.topk_ids.tolist()[0][0] == 1 and not torch.isnan(r.topk_weights).any()
    r = R.route(torch.tensor([[inf, 1.0, inf, 0.0, 0.0]]), SMALL.with_(normalize_logits=True))
    assert r.topk_ids.tolist() == [[0, 2]] and r.topk_weights.tolist() == [[0.5, 0.5]]
    r = R.route(torch.full((1, 5), -inf), SMALL)
    assert r.topk_weights.tolist() == [[0.0, 0.0]]


def test_residual_adds_r_times_g_transposed_before_normalisation():
    cfg = SMALL.with_(normalize_logits=True)
    logits, prev, g = torch.randn(3, 5), torch.randn(3, 5), torch.randn(5, 5)
    r = R.route(logits, cfg, prev, g)
    torch.testing.assert_close(r.logits, logits + prev @ g.t())


def _tiny_params(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    d, i, n = cfg.hidden_size, cfg.ffn_size, cfg.n_experts
    return R.MoEPPParams(
        up=torch.randn(cfg.n_ffn, 2 * i, d, dtype=dtype), down=torch.randn(cfg.n_ffn, d, i, dtype=dtype),
        const_gate=torch.randn(cfg.n_constant, 2, d, dtype=dtype), const_value=torch.randn(cfg.n_constant, d, dtype=dtype),
        gate_weight=torch.randn(n, d),
    )


def test_layer_matches_a_token_by_token_computation():
    cfg = SMALL.with_(scale_input_by_topk=True)
    params = _tiny_params(cfg)
    x = torch.randn(6, cfg.hidden_size)
    x_before = x.clone()
    out, _ = R.moepp_layer(x, params, cfg)
    assert torch.equal(x, x_before)  # the x*k flag does not mutate the caller's tensor
    routing = R.route(R.gate_logits(x, params), cfg)
    for t in range(6):
        xe = x[t] * cfg.top_k
        expected = torch.zeros(cfg.hidden_size)
        for e, w in zip(routing.topk_ids[t].tolist(), routing.topk_weights[t].tolist()):
            kind = cfg.expert_kind(e)
            if kind == "ffn":
                h = params.up[e] @ xe
                y = params.down[e] @ (torch.nn.functional.silu(h[:3]) * h[3:])
            elif kind == "constant":
                a = torch.softmax(params.const_gate[0] @ xe, -1)
                y = a[0] * xe + a[1] * params.const_value[0]
            elif kind == "copy":
                y = xe
            else:
                y = torch.zeros_like(xe)
            expected += w * y
        torch.testing.assert_close(out[t], expected, atol=1e-4, rtol=1e-4)


def test_zero_expert_output_is_zero_even_for_nan_input():
    cfg = SMALL.with_(top_k=1)
    params = _tiny_params(cfg)
    x = torch.ones(2, 4)
    x[0, 1] = float("nan")
    routing = R.ReferenceRouting(torch.tensor([[4], [4]]), torch.tensor([[0.5], [1.0]]), torch.zeros(2, 5),
                                 torch.zeros(2, 5))
    out = R.experts_combine(x, routing, params, cfg)
    assert torch.equal(out, torch.zeros_like(out))


def test_load_balance_stats_and_loss():
    cfg = SMALL
    logits = torch.randn(8, 5)
    r = R.route(logits, cfg)
    f, p = R.load_balance_stats(r, cfg)
    assert math.isclose(f.sum().item(), 1.0, rel_tol=1e-6) and math.isclose(p.sum().item(), 1.0, rel_tol=1e-6)
    eta = torch.tensor([1.0, 1.0, 0.75, 0.75, 0.75])
    torch.testing.assert_close(R.load_balance_loss(f, p, cfg), (eta * f * p).sum())
    f0, p0 = R.load_balance_stats(R.route(torch.zeros(0, 5), cfg), cfg)
    assert f0.abs().sum() == 0 and p0.abs().sum() == 0
