"""Differential fuzzing against the reference (hypothesis): random expert layouts and
routing options, token counts from 0, float dtypes and rows with the values the spec
defines (ties, +inf, -inf, NaN, huge magnitudes). The router, and the layer forward and
backward, must agree with moepp_kernels.reference.

Deterministic in CI: a fixed, database-free profile of MOEPP_FUZZ_EXAMPLES examples per
test (default 25); set it higher for a longer search."""

import os

import pytest
import torch
from conftest import TOLERANCES, assert_norm_close, assert_within_reference_error, float64_leaf, float64_params

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moepp_kernels import MoEPPConfig, MoEPPLayer, fused_router  # noqa: E402
from moepp_kernels import reference as R  # noqa: E402

settings.register_profile("moepp", derandomize=True, database=None, deadline=None, print_blob=True,
                          max_examples=int(os.environ.get("MOEPP_FUZZ_EXAMPLES", "25")))
FUZZ = settings.get_profile("moepp")


@st.composite
def configs(draw, max_experts=24):
    n_ffn = draw(st.integers(1, 12))
    n_constant, n_copy, n_zero = draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 2))
    n = n_ffn + n_constant + n_copy + n_zero
    return MoEPPConfig(
        hidden_size=draw(st.sampled_from([8, 13, 16])), ffn_size=draw(st.sampled_from([8, 11])), n_ffn=n_ffn,
        n_constant=n_constant, n_copy=n_copy, n_zero=n_zero, top_k=draw(st.integers(1, min(n, 16))),
        gating=draw(st.sampled_from(["softmax_topk", "topk_softmax"])), gate_depth=draw(st.sampled_from([1, 2])),
        normalize_logits=draw(st.booleans()), logits_std=draw(st.sampled_from([0.5, 1.0, 2.0])),
        renormalize=draw(st.booleans()), selection_bias=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), scale_identity_weights=draw(st.booleans()),
        scale_input_by_topk=draw(st.booleans()),
    )


SPECIAL = ["random", "tied", "half_tied", "pos_inf", "neg_inf", "nan", "huge"]


def logit_rows(kinds, n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind in kinds:
        row = torch.randn(n, generator=g) * 2
        if kind == "tied":
            row = torch.full((n,), 0.25)
        elif kind == "half_tied":
            row[n // 2:] = row[0]
        elif kind in ("pos_inf", "neg_inf", "nan"):
            value = {"pos_inf": float("inf"), "neg_inf": float("-inf"), "nan": float("nan")}[kind]
            row[torch.randperm(n, generator=g)[: max(1, n // 3)]] = value
        elif kind == "huge":
            row = row * 1e30
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty(0, n)


def routing_agrees(ours_ids, ref, cfg, bias):
    """[T] bool: the same experts, or a different choice among experts whose selection
    scores tie within fp32 rounding (which one wins a near-tie is not defined)."""
    score = ref.probs if cfg.gating == "softmax_topk" else R.normalize_logits(ref.logits, cfg.logits_std) \
        if cfg.normalize_logits else ref.logits
    if bias is not None:
        score = score + bias
    score = torch.nan_to_num(score, nan=float("-inf"))
    same = (ours_ids.long() == ref.topk_ids).all(dim=-1)
    kth = score.gather(-1, ref.topk_ids)[:, -1:]
    chosen = score.gather(-1, ours_ids.long())
    near = (chosen >= kth - 1e-6 * kth.abs().clamp_min(1)).all(dim=-1) | (kth == float("-inf")).squeeze(-1)
    assert (same | near).all(), "our router chose an expert the reference scores clearly lower"
    return same


def assert_close_or_tiny(actual, expected, name, noise):
    """fp32 norm tolerance, with an absolute floor for results that are 0 in exact
    arithmetic and rounding noise on both sides (a gate fixed at 1 by renormalising one
    slot, or softmax probabilities that normalisation makes independent of the logits,
    as with two experts): `noise` is the RMS of the largest gradient of the problem
    times fp32's rounding, the size of that noise."""
    err = (actual.double() - expected.double()).norm().item()
    bound = 2e-5 * expected.double().norm().item() + noise * max(actual.numel(), 1) ** 0.5
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


@FUZZ
@given(cfg=configs(), kinds=st.lists(st.sampled_from(SPECIAL), max_size=9), residual=st.booleans(),
       seed=st.integers(0, 2**16))
def test_router_matches_reference(cfg, kinds, residual, seed):
    n = cfg.n_experts
    logits = logit_rows(kinds, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = logits.shape[0]
    prev = torch.randn(tokens, n, generator=g) if residual else None
    weight = torch.randn(n, n, generator=g) / n if residual else None
    bias = 0.05 * torch.randn(n, generator=g) if cfg.selection_bias else None
    out = fused_router(logits, cfg, prev_logits=prev, residual_weight=weight, selection_bias=bias, return_stats=True)
    ref = R.route(logits, cfg, prev, weight, bias)
    same = routing_agrees(out.topk_ids, ref, cfg, bias)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(out.topk_weights[same], ref.topk_weights[same], atol=atol, rtol=rtol)
    assert torch.isfinite(out.topk_weights).all() and (out.topk_weights >= 0).all()
    assert int(out.counts.sum()) == tokens * cfg.top_k


@FUZZ
@given(cfg=configs(), tokens=st.sampled_from([0, 1, 2, 5, 17]), residual=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
       huge=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_matches_reference(cfg, tokens, residual, dtype, huge, seed):
    """Forward and backward; bf16 / fp16 bounded by the same-precision reference's own
    error against a float64 run. `huge` scales the inputs by 1e3 (by 10 in fp16, whose
    range ends at 65504: the experts' products overflow beyond that in every implementation)."""
    scale = (10.0 if dtype == torch.float16 else 1e3) if huge else 1.0
    torch.manual_seed(seed)
    layer = MoEPPLayer(cfg, has_residual=residual, dtype=dtype)
    with torch.no_grad():
        if residual:
            layer.router.residual_weight.normal_(std=0.2)
        if cfg.selection_bias:
            layer.router.selection_bias.normal_(std=0.05)
    x = (torch.randn(tokens, cfg.hidden_size) * scale).to(dtype).requires_grad_()
    prev = torch.randn(tokens, cfg.n_experts).requires_grad_() if residual else None
    params = layer.reference_params()
    out, logits = layer(x, prev)
    ref, ref_logits = R.moepp_layer(x, params, cfg, prev)
    assert out.shape == x.shape and out.dtype == dtype
    route = fused_router(layer.router.gate_logits(x), cfg, prev_logits=prev,
                         residual_weight=layer.router.residual_weight if residual else None,
                         selection_bias=layer.router.selection_bias)
    ref_route = R.route(R.gate_logits(x, params), cfg, prev, params.residual_weight, params.selection_bias)
    same = routing_agrees(route.topk_ids, ref_route, cfg, params.selection_bias)
    assert_norm_close(logits, ref_logits, torch.float32, "logits")
    leaves = [x] + list(layer.parameters())
    if tokens == 0:  # the reference builds no graph for an empty batch; ours gives zero gradients
        grads = torch.autograd.grad(out.sum() + logits.sum(), leaves, allow_unused=True)
        assert all(gr is None or not gr.any() for gr in grads)
        return
    g = torch.Generator().manual_seed(seed + 2)
    grad_out = torch.randn(x.shape, generator=g).to(dtype)
    ours = torch.autograd.grad((out.float() * grad_out.float()).sum(), leaves, allow_unused=True)
    # The reference builds no graph when every slot went to a zero expert: all its gradients are 0.
    theirs = torch.autograd.grad((ref.float() * grad_out.float()).sum(), leaves, allow_unused=True) \
        if ref.requires_grad else [None] * len(leaves)
    if dtype == torch.float32:
        assert_norm_close(out[same], ref[same], dtype, "out")
        if same.all():
            noise = 1e-5 * max([b.double().square().mean().sqrt().item() for b in theirs if b is not None] + [0.0])
            for (name, _), a, b in zip([("x", None)] + list(layer.named_parameters()), ours, theirs):
                assert_close_or_tiny(a, torch.zeros_like(a) if b is None else b, name, noise)
        return
    x64, prev64, params64 = float64_leaf(x), float64_leaf(prev), float64_params(params)
    exact, _ = R.moepp_layer(x64, params64, cfg, prev64)
    exact_route = R.route(R.gate_logits(x64, params64), cfg, prev64, params64.residual_weight,
                          params64.selection_bias)
    same &= (exact_route.topk_ids == ref_route.topk_ids).all(dim=-1)
    # Where the same-precision reference overflows, no comparison is defined.
    same &= torch.isfinite(ref.float()).all(dim=-1)
    assert_within_reference_error(out[same], ref[same], exact[same], dtype, "out")
