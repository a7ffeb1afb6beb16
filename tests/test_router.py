"""The fused router against the reference: forward, backward, edge cases, bad input."""

import pytest
import torch
from conftest import DEVICES, TOLERANCES, assert_close

from moepp_kernels import _C, MoEPPConfig, MoEPPRouter, fused_router
from moepp_kernels import reference as R

CONFIGS = {
    "7b": MoEPPConfig.moepp_7b(),  # N = 20, not a power of two; normalisation on
    "0.6b": MoEPPConfig.moepp_0_6b(),  # N = 12
    "2b_topk_softmax": MoEPPConfig.moepp_2b().with_(gating="topk_softmax"),  # N = 40
    "7b_no_renorm": MoEPPConfig.moepp_7b().with_(renormalize=False, routed_scaling_factor=2.5),
    "longcat": MoEPPConfig.longcat(n_ffn=64, n_identity=32, top_k=6),  # N = 96, selection bias
    "longcat_unscaled_identity": MoEPPConfig.longcat(n_ffn=64, n_identity=32, top_k=6).with_(
        scale_identity_weights=False),
    "n1_k1": MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=1, top_k=1),  # N = 1
    "k1": MoEPPConfig.moepp_7b().with_(top_k=1),  # k = 1: the zero expert may take the only slot
    "k_eq_n": MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=5, n_constant=1, n_copy=1, n_zero=1, top_k=8),
    "n257_k16": MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=250, n_constant=4, n_copy=2, n_zero=1, top_k=16,
                            normalize_logits=True),
    "n1024_k12": MoEPPConfig.longcat(n_ffn=768, n_identity=256, top_k=12),  # the largest N
}


def make_inputs(cfg, tokens, residual, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.n_experts
    logits = torch.randn(tokens, n, generator=g, dtype=dtype).mul_(2).to(device)
    prev = torch.randn(tokens, n, generator=g, dtype=dtype).to(device) if residual else None
    weight = (torch.randn(n, n, generator=g, dtype=dtype) / n**0.5).to(device) if residual else None
    bias = (0.05 * torch.randn(n, generator=g, dtype=dtype)).to(device) if cfg.selection_bias else None
    return logits, prev, weight, bias


def check_forward(out, ref, cfg, dtype=torch.float32):
    assert out.topk_ids.dtype == torch.int32
    assert torch.equal(out.topk_ids.long().cpu(), ref.topk_ids.cpu())
    assert_close(out.topk_weights, ref.topk_weights, dtype)
    assert_close(out.logits, ref.logits, dtype)
    counts = torch.bincount(ref.topk_ids.flatten().cpu(), minlength=cfg.n_experts)
    assert torch.equal(out.counts.cpu().long(), counts)
    assert not torch.isnan(out.topk_weights).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("residual", [False, True], ids=["first_layer", "residual"])
@pytest.mark.parametrize("tokens", [0, 1, 37])  # T = 0, T = 1, a ragged T
def test_forward_matches_reference(device, name, residual, tokens):
    cfg = CONFIGS[name]
    logits, prev, weight, bias = make_inputs(cfg, tokens, residual, device)
    out = fused_router(logits, cfg, prev_logits=prev, residual_weight=weight, selection_bias=bias, return_stats=True)
    ref = R.route(logits, cfg, prev, weight, bias)
    check_forward(out, ref, cfg)
    f, p = R.load_balance_stats(ref, cfg)
    assert_close(out.f, f)
    assert_close(out.P, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("residual", [False, True], ids=["first_layer", "residual"])
def test_backward_matches_reference(device, name, residual):
    cfg = CONFIGS[name]
    tokens = 29
    logits, prev, weight, bias = make_inputs(cfg, tokens, residual, device, seed=1)
    g = torch.Generator().manual_seed(2)
    d_w = torch.randn(tokens, cfg.top_k, generator=g).to(device)
    d_l = torch.randn(tokens, cfg.n_experts, generator=g).to(device)
    d_p = torch.randn(cfg.n_experts, generator=g).to(device)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (logits, prev, weight) if t is not None]
        weights, routed, p = fn(*leaves)
        loss = (weights * d_w).sum() + (routed * d_l).sum() + (p * d_p).sum()
        return torch.autograd.grad(loss, leaves)

    def fused(lg, pv=None, wt=None):
        out = fused_router(lg, cfg, prev_logits=pv, residual_weight=wt, selection_bias=bias, return_stats=True)
        return out.topk_weights, out.logits, out.P

    def reference(lg, pv=None, wt=None):
        ref = R.route(lg, cfg, pv, wt, bias)
        return ref.topk_weights, ref.logits, R.load_balance_stats(ref, cfg)[1]

    for got, want in zip(grads(fused), grads(reference)):
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gating", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(device, gating, normalize):
    cfg = MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=3, n_constant=1, n_copy=1, n_zero=1, top_k=3,
                      gating=gating, normalize_logits=normalize, logits_std=1.5, routed_scaling_factor=1.5)
    logits, prev, weight, _ = make_inputs(cfg, 5, True, device, dtype=torch.float64, seed=3)
    inputs = tuple(t.requires_grad_() for t in (logits, prev, weight))

    def fn(lg, pv, wt):
        out = fused_router(lg, cfg, prev_logits=pv, residual_weight=wt, return_stats=True)
        return out.topk_weights, out.logits, out.P

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_depth", [1, 2])
def test_module_with_hidden_state_dtypes(device, x_dtype, gate_depth):
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=64, gate_depth=gate_depth)
    torch.manual_seed(0)
    router = MoEPPRouter(cfg, has_residual=True).to(device)
    with torch.no_grad():
        router.residual_weight.normal_(std=0.1)
    x = torch.randn(3, 5, 64, device=device).to(x_dtype)
    prev = torch.randn(15, cfg.n_experts, device=device)
    out = router(x, prev, return_stats=True)
    params = R.MoEPPParams(up=None, down=None, const_gate=None, const_value=None,
                           gate_weight=getattr(router, "gate_weight", None), gate_w1=getattr(router, "gate_w1", None),
                           gate_w2=getattr(router, "gate_w2", None))
    ref = R.route(R.gate_logits(x.reshape(15, 64), params), cfg, prev, router.residual_weight)
    check_forward(out, ref, cfg)
    (out.topk_weights.sum() + out.P.square().sum()).backward()
    assert router.residual_weight.grad is not None and torch.isfinite(router.residual_weight.grad).all()
    grad_gate = router.gate_weight.grad if gate_depth == 1 else router.gate_w1.grad
    assert grad_gate is not None and torch.isfinite(grad_gate).all()


# --- edge cases named by the spec's failure modes -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_ties_choose_the_lowest_ids(device):
    cfg = MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=6, n_zero=2, top_k=3, normalize_logits=True)
    logits = torch.zeros(4, 8, device=device)  # all-equal logits with normalisation on: std = 0
    out = fused_router(logits, cfg)
    assert out.topk_ids.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(out.topk_weights.cpu(), torch.full((4, 3), 1 / 3))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_expert_ranked_first(device):
    cfg = MoEPPConfig.moepp_7b()
    logits = torch.zeros(2, 20, device=device)
    logits[:, 19] = 6.0  # the zero expert
    logits[:, 3] = 2.0
    out = fused_router(logits, cfg)
    assert out.topk_ids.tolist() == [[19, 3]] * 2
    assert out.topk_weights.tolist() == [[0.0, 1.0]] * 2
    out = fused_router(logits, cfg.with_(top_k=1))  # only slot is the zero expert: weights 0, not NaN
    assert out.topk_weights.tolist() == [[0.0]] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_several_zero_experts_all_chosen(device):
    cfg = MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=4, n_zero=3, top_k=3)
    logits = torch.zeros(3, 7, device=device)
    logits[:, 4:] = 10.0
    out = fused_router(logits, cfg, return_stats=True)
    assert out.topk_ids.tolist() == [[4, 5, 6]] * 3
    assert out.topk_weights.abs().sum() == 0
    logits.requires_grad_()
    out = fused_router(logits, cfg)
    out.topk_weights.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gating", ["softmax_topk", "topk_softmax"])
def test_non_finite_logits_are_defined(device, normalize, gating):
    cfg = MoEPPConfig.moepp_7b().with_(normalize_logits=normalize, gating=gating, top_k=3)
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(6, 20)
    logits[0, 4] = nan
    logits[1, :] = nan
    logits[2, 7] = inf
    logits[2, 9] = inf
    logits[3, 2] = -inf
    logits[4, :] = -inf
    logits[5, 0] = inf
    logits[5, 1] = -inf
    logits = logits.to(device)
    out = fused_router(logits, cfg, return_stats=True)
    ref = R.route(logits, cfg)
    assert torch.equal(out.topk_ids.long().cpu(), ref.topk_ids.cpu())
    torch.testing.assert_close(out.topk_weights.cpu(), ref.topk_weights.cpu())
    assert not torch.isnan(out.topk_weights).any() and not torch.isnan(out.P).any()
    logits.requires_grad_()
    fused_router(logits, cfg, return_stats=True).topk_weights.sum().backward()
    assert not torch.isnan(logits.grad).any()


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(device):
    cfg = MoEPPConfig.moepp_7b()
    logits = torch.zeros(0, 20, device=device, requires_grad=True)
    out = fused_router(logits, cfg, return_stats=True)
    assert out.topk_ids.shape == (0, 2) and out.counts.sum() == 0
    assert out.P.abs().sum() == 0 and out.f.abs().sum() == 0
    (out.topk_weights.sum() + out.P.sum()).backward()
    assert logits.grad.shape == (0, 20)



def long_row_logits(kind, tokens, n, g):
    logits = torch.randn(tokens, n, generator=g).mul_(2)
    if kind == "coarse":  # values on a grid of 0.5: many exact ties among the best
        return logits.mul_(2).round_().div_(2)
    if kind == "flat_top":  # 70 equal best entries: more candidates than the selection keeps apart
        return logits.clamp_(max=1.0).index_fill_(1, torch.randperm(n, generator=g)[:70], 3.0)
    if kind == "mostly_masked":  # all but 5 entries -inf: fewer finite scores than k
        keep = torch.rand(tokens, n, generator=g).argsort(-1)[:, :5]
        return torch.full_like(logits, float("-inf")).scatter_(1, keep, logits.gather(1, keep))
    if kind == "non_finite":  # NaN entries; a row of them; +inf maxima (the softmax's limits)
        logits.masked_fill_(torch.rand(tokens, n, generator=g) < 0.2, float("nan"))
        logits[0] = float("nan")
        logits[1, [3, n - 1]] = float("inf")
        return logits
    return logits


# The CPU's selection for long rows (N >= 128, k > 2: column maxima bound the k-th
# best, then only entries reaching the bound are ranked) against the reference's
# stable sort: N = 128 (the shortest such row), 257 (a tail past the columns), 1024.
@pytest.mark.parametrize("n", [128, 257, 1024])
@pytest.mark.parametrize("k", [3, 12, 16])
@pytest.mark.parametrize("kind", ["random", "coarse", "flat_top", "mostly_masked", "non_finite"])
def test_long_rows_select_as_the_reference(n, k, kind):
    cfg = MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=n - 3, n_constant=1, n_copy=1, n_zero=1, top_k=k)
    logits = long_row_logits(kind, 64, n, torch.Generator().manual_seed(n * k))
    out = fused_router(logits, cfg)
    ref = R.route(logits, cfg)
    assert torch.equal(out.topk_ids.long(), ref.topk_ids)
    assert_close(out.topk_weights, ref.topk_weights, torch.float32)

# --- bad input --------------------------------------------------------------------------------

CFG = MoEPPConfig.moepp_7b()


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"logits": torch.zeros(4, 20, dtype=torch.bfloat16)}, TypeError, "logits"),
        ({"logits": torch.zeros(4, 20, dtype=torch.int64)}, TypeError, "logits"),
        ({"logits": [[0.0] * 20]}, TypeError, "logits"),
        ({"logits": torch.zeros(4, 19)}, ValueError, "logits"),
        ({"logits": torch.zeros(4, 20, 1)}, ValueError, "logits"),
        ({"logits": torch.zeros(20, 4).t()}, ValueError, "contiguous"),
        ({"logits": torch.zeros(4, 20, device="meta")}, ValueError, "logits"),
        ({"prev_logits": torch.zeros(4, 20)}, ValueError, "residual_weight"),
        ({"residual_weight": torch.zeros(20, 20)}, ValueError, "prev_logits"),
        ({"prev_logits": torch.zeros(4, 20), "residual_weight": torch.zeros(20, 19)}, ValueError, "residual_weight"),
        ({"prev_logits": torch.zeros(3, 20), "residual_weight": torch.zeros(20, 20)}, ValueError, "prev_logits"),
        ({"prev_logits": torch.zeros(4, 20, dtype=torch.float64), "residual_weight": torch.zeros(20, 20)},
         TypeError, "prev_logits"),
        ({"selection_bias": torch.zeros(21)}, ValueError, "selection_bias"),
        ({"selection_bias": torch.zeros(40)[::2]}, ValueError, "selection_bias"),
        ({"config": CFG.with_(top_k=17)}, ValueError, "top_k"),  # k > 16
        ({"config": "moepp_7b"}, TypeError, "config"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, name):
    args = {"logits": torch.zeros(4, 20), "config": CFG}
    args.update(kwargs)
    logits, config = args.pop("logits"), args.pop("config")
    with pytest.raises(exc, match=name):
        fused_router(logits, config, **args)


def test_too_many_experts():
    cfg = MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=1025, top_k=2)
    with pytest.raises(ValueError, match="n_experts"):
        fused_router(torch.zeros(1, 1025), cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="selection_bias"):
        fused_router(torch.zeros(4, 20, device="cuda"), CFG, selection_bias=torch.zeros(20))


def test_module_bad_input():
    router = MoEPPRouter(CFG.with_(hidden_size=16))
    with pytest.raises(ValueError, match="hidden size"):
        router(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="prev_logits"):
        router(torch.zeros(2, 16), torch.zeros(2, 20))
    first_layer = MoEPPRouter(CFG.with_(hidden_size=16), has_residual=True)(torch.zeros(2, 16))
    assert first_layer.logits.shape == (2, 20)  # G unused without prev_logits, like the released layer


def test_cpp_checks_raise_value_error_naming_the_argument():
    """The C++ layer's own checks (last line of defence) surface as ValueError."""
    from moepp_kernels._ops.router import router_options, router_scalars
    from moepp_kernels._tensors import view

    opts = router_options(20, router_scalars(CFG))
    logits = torch.zeros(4, 20)
    ids = torch.zeros(4, 3, dtype=torch.int32)  # wrong k
    with pytest.raises(ValueError, match="ids"):
        _C.router_forward(opts, view(logits), None, None, None, view(ids), view(torch.zeros(4, 2)), None,
                          view(torch.zeros(20, dtype=torch.int32)), None, 1, 0)
    opts.top_k = 30
    with pytest.raises(ValueError, match="top_k"):
        _C.router_validate_options(opts)


def test_tolerance_table_covers_the_model_dtypes():
    assert {torch.float32, torch.bfloat16, torch.float16, torch.float64} <= set(TOLERANCES)
