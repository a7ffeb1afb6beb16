"""A battery of bad inputs to every exported function that takes tensors: each
tensor argument in turn gets the wrong dtype, the wrong shape, a non-contiguous
layout, an unsupported device, no rows, or non-finite values. The answer must be a
clear Python exception naming the argument, or (for values the spec defines: NaN,
inf, empty inputs) a result; never a crash, which would take this process down."""

import pytest
import torch

from moepp_kernels import (
    MoEPPConfig,
    MoEPPLayer,
    RouterOutput,
    build_plan,
    combine,
    expert_ffn,
    fused_router,
    load_balance_loss,
    moepp_layer,
)

CFG = MoEPPConfig(hidden_size=16, ffn_size=8, n_ffn=4, n_constant=1, n_copy=1, n_zero=1, top_k=2)
T = 5


def layer():
    torch.manual_seed(0)
    return MoEPPLayer(CFG, has_residual=True, dtype=torch.float32)


def good_calls():
    """name -> (function, {tensor argument: value}, other keyword arguments)."""
    m = layer()
    x = torch.randn(T, CFG.hidden_size)
    logits = torch.randn(T, CFG.n_experts)
    route = fused_router(logits, CFG, return_stats=True)
    plan = build_plan(route.topk_ids, CFG.n_ffn)
    y = torch.randn(T * CFG.top_k, CFG.hidden_size)
    mix = torch.randn(T, 2 * CFG.n_constant)
    n = CFG.n_experts
    return {
        "fused_router": (lambda **a: fused_router(a.pop("logits"), CFG, **a),
                         {"logits": logits, "prev_logits": torch.randn(T, n), "residual_weight": torch.randn(n, n),
                          "selection_bias": None}, {}),
        "build_plan": (lambda **a: build_plan(a["topk_ids"], CFG.n_ffn), {"topk_ids": route.topk_ids}, {}),
        "expert_ffn": (lambda **a: expert_ffn(a["x"], a["up"], a["down"], plan, top_k=CFG.top_k),
                       {"x": x, "up": m.up.detach(), "down": m.down.detach()}, {}),
        "combine": (lambda **a: combine(a["x"], a["y"], RouterOutput(a["topk_ids"], a["topk_weights"], None, None,
                                                                    None, None), plan, a["const_logits"],
                                        a["const_value"], CFG),
                    {"x": x, "y": y, "topk_ids": route.topk_ids, "topk_weights": route.topk_weights,
                     "const_logits": mix, "const_value": m.const_value.detach()}, {}),
        "moepp_layer": (lambda **a: moepp_layer(a.pop("x"), CFG, **a),
                        {"x": x, "up": m.up, "down": m.down, "const_gate": m.const_gate, "const_value": m.const_value,
                         "gate_weight": m.router.gate_weight, "residual_weight": m.router.residual_weight,
                         "prev_logits": torch.randn(T, n)}, {}),
        "MoEPPLayer": (lambda **a: m(a["x"], a["prev_logits"]), {"x": x, "prev_logits": torch.randn(T, n)}, {}),
        "MoEPPRouter": (lambda **a: m.router(a["x"], a["prev_logits"]), {"x": x, "prev_logits": torch.randn(T, n)},
                        {}),
        "load_balance_loss": (lambda **a: load_balance_loss(a["f"], a["P"], CFG), {"f": route.f, "P": route.P}, {}),
    }


CALLS = good_calls()
CASES = [(name, arg) for name, (_, tensors, _) in CALLS.items() for arg, t in tensors.items() if t is not None]


def mutations(t: torch.Tensor):
    """(kind, bad tensor): kinds that must raise, and kinds with a defined answer."""
    wrong_dtype = t.to(torch.int32) if t.is_floating_point() else t.to(torch.float32)
    out = [("dtype", wrong_dtype), ("shape", t[..., :-1] if t.dim() and t.shape[-1] > 1 else t.reshape(-1, 1)),
           ("device", torch.empty(t.shape, dtype=t.dtype, device="meta"))]
    if t.dim() >= 1 and t.numel() > 1:
        wide = torch.cat([t, t], dim=-1) if t.dim() else t
        out.append(("layout", wide[..., ::2]))
    if t.dim() == 0 or t.numel() == 0:
        out = [o for o in out if o[0] != "shape"]
    return out


@pytest.mark.parametrize(("name", "arg"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_bad_tensor_gets_a_clear_error_naming_it(name, arg):
    fn, tensors, kwargs = CALLS[name]
    for kind, bad in mutations(tensors[arg]):
        args = dict(tensors, **{arg: bad})
        with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
            fn(**args, **kwargs)
        msg = str(info.value)
        assert arg.split(".")[-1] in msg or arg in msg or "shape" in msg or "hidden size" in msg, \
            f"{name}: {kind} of {arg} gave an error that names neither: {msg}"


@pytest.mark.parametrize("name", [n for n in CALLS if n not in ("build_plan",)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3e38])
def test_non_finite_values_give_a_result(name, value):
    """Values the spec defines (NaN ranks as -inf, +inf shares the mass, ...): no error."""
    fn, tensors, kwargs = CALLS[name]
    for arg, t in tensors.items():
        if t is None or not t.is_floating_point():
            continue
        filled = t.detach().clone()
        filled.view(-1)[0] = value
        fn(**dict(tensors, **{arg: filled}), **kwargs)


def test_no_tokens_give_empty_results():
    m = layer()
    x = torch.zeros(0, CFG.hidden_size, requires_grad=True)
    out, logits, balance = m(x, torch.zeros(0, CFG.n_experts), return_balance_loss=True)
    assert out.shape == (0, CFG.hidden_size) and logits.shape == (0, CFG.n_experts) and torch.isfinite(balance)
    (out.sum() + logits.sum() + balance).backward()
    route = fused_router(torch.zeros(0, CFG.n_experts), CFG, return_stats=True)
    plan = build_plan(route.topk_ids, CFG.n_ffn)
    assert int(plan.offsets[-1]) == 0
    y = expert_ffn(x.detach(), m.up.detach(), m.down.detach(), plan, top_k=CFG.top_k)
    assert y.shape == (0, CFG.hidden_size)
    assert combine(x.detach(), y, route, plan, torch.zeros(0, 2), m.const_value.detach(), CFG).shape == x.shape
