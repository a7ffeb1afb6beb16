"""The whole MoE++ layer against the reference, forward and backward (CPU, and
CUDA when there is a GPU)."""

import dataclasses

import pytest
import torch
from conftest import (
    DEVICES,
    assert_norm_close,
    assert_within_reference_error,
    float64_leaf,
    float64_params,
    routed_alike,
)

from moepp_kernels import MoEPPConfig, MoEPPLayer, load_balance_loss, moepp_layer
from moepp_kernels import reference as R

SMALL = {"hidden_size": 64, "ffn_size": 96}
CONFIGS = {
    "7b": MoEPPConfig.moepp_7b().with_(**SMALL),  # 16+2+1+1, normalisation on, x*k off
    "0.6b": MoEPPConfig.moepp_0_6b().with_(**SMALL),  # 8+2+1+1, x*k on
    "1b": MoEPPConfig.moepp_1b().with_(**SMALL),
    "2b": MoEPPConfig.moepp_2b().with_(**SMALL),  # 32+6+1+1
    "2layer_gate": MoEPPConfig.moepp_7b().with_(gate_depth=2, **SMALL),
    "topk_softmax": MoEPPConfig.moepp_0_6b().with_(gating="topk_softmax", **SMALL),
    "xk_off": MoEPPConfig.moepp_0_6b().with_(scale_input_by_topk=False, **SMALL),
    "longcat": MoEPPConfig.longcat(hidden_size=64, ffn_size=32, n_ffn=64, n_identity=32, top_k=6),
    "k1": MoEPPConfig.moepp_7b().with_(top_k=1, **SMALL),
    "k_eq_n": MoEPPConfig(hidden_size=64, ffn_size=32, n_ffn=3, n_constant=2, n_copy=1, n_zero=2, top_k=8),
    "odd_dims": MoEPPConfig.moepp_0_6b().with_(hidden_size=61, ffn_size=37),  # D, I not multiples of 8
}


def make_layer(cfg, dtype=torch.float32, device="cpu", residual=True, seed=0):
    torch.manual_seed(seed)
    layer = MoEPPLayer(cfg, has_residual=residual, dtype=dtype, device=device)
    with torch.no_grad():
        if residual:
            layer.router.residual_weight.normal_(std=0.2)
        if cfg.selection_bias:
            layer.router.selection_bias.normal_(std=0.05)
    return layer


def run_both(layer, x, prev, seed=1, exact=False):
    """(ours, reference) and, with exact, a float64 run of the reference: outputs,
    passed-on logits and the gradients of one loss for every input."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)
    grad_logits = torch.randn((x.numel() // x.shape[-1], layer.config.n_experts), generator=g).to(x.device)
    params = layer.reference_params()
    runs = [([x, prev], list(layer.parameters()), lambda: layer(x, prev)),
            ([x, prev], list(layer.parameters()), lambda: R.moepp_layer(x, params, layer.config, prev))]
    if exact:
        x64, prev64, params64 = float64_leaf(x), float64_leaf(prev), float64_params(params)
        # each layer parameter's float64 copy, found by the reference field that shares the tensor
        field_of = {id(getattr(params, f.name)): f.name for f in dataclasses.fields(params)}
        weights64 = [getattr(params64, field_of[id(p)]) for p in layer.parameters()]
        runs.append(([x64, prev64], weights64, lambda: R.moepp_layer(x64, params64, layer.config, prev64)))
    results = []
    for inputs_, weights, fn in runs:
        out, logits = fn()
        acc = R.accumulation_dtype(out.dtype)
        loss = (out.to(acc) * grad_out.to(acc)).sum() + (logits * grad_logits.to(logits.dtype)).sum()
        leaves = [t for t in inputs_ if t is not None] + weights
        results.append((out, logits, torch.autograd.grad(loss, leaves, allow_unused=True)))
    names = ["x"] + (["prev_logits"] if prev is not None else []) + [n for n, _ in layer.named_parameters()]
    return results, names


def inputs(cfg, tokens, dtype, device, residual, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype).to(device).requires_grad_()
    prev = torch.randn(tokens, cfg.n_experts, generator=g).to(device).requires_grad_() if residual else None
    return x, prev


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("residual", [False, True], ids=["first_layer", "residual"])
@pytest.mark.parametrize("tokens", [0, 1, 37])  # T = 0, T = 1, ragged
def test_layer_fp32_matches_reference(device, name, residual, tokens):
    cfg = CONFIGS[name]
    layer = make_layer(cfg, torch.float32, device, residual)
    x, prev = inputs(cfg, tokens, torch.float32, device, residual)
    ((out, logits, grads), (r_out, r_logits, r_grads)), names = run_both(layer, x, prev)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_norm_close(out, r_out, torch.float32, "out")
    assert_norm_close(logits, r_logits, torch.float32, "logits")
    for n, a, b in zip(names, grads, r_grads):
        assert_norm_close(a, b if b is not None else torch.zeros_like(a), torch.float32, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["7b", "2b", "2layer_gate", "topk_softmax", "longcat", "odd_dims"])
def test_layer_low_precision_matches_reference(device, dtype, name):
    """Our bf16 / fp16 error against a float64 run, bounded by the same-precision
    reference's own (conftest.REFERENCE_ERROR_FACTOR), on tokens all three route alike."""
    cfg = CONFIGS[name]
    layer = make_layer(cfg, dtype, device, residual=True)
    x, prev = inputs(cfg, 96, dtype, device, residual=True)
    ours = layer(x, prev, return_balance_loss=True)
    params = layer.reference_params()
    agree = routed_alike(layer, x, (params, float64_params(params)), prev)
    assert agree.float().mean() >= 0.99  # fp32 / fp64 routing; flips only on near-ties
    results, names = run_both(layer, x, prev, exact=True)
    (out, logits, grads), (r_out, r_logits, r_grads), (e_out, e_logits, e_grads) = results
    assert_within_reference_error(out[agree], r_out[agree], e_out[agree], dtype, "out")
    assert_norm_close(logits, r_logits, torch.float32, "logits")
    if agree.all():
        for n, a, b, e in zip(names, grads, r_grads, e_grads):
            zeros = torch.zeros_like(a)
            assert_within_reference_error(a, zeros if b is None else b, zeros if e is None else e, dtype, n)
    assert torch.isfinite(ours[2])


def _steer(layer, experts, strength=30.0):
    """Make every token route to `experts` (positive x, a large gate row each)."""
    with torch.no_grad():
        w = layer.router.gate_weight
        w.zero_()
        for rank, e in enumerate(experts):
            w[e] = strength / (rank + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_all_slots_to_one_ffn_expert_and_empty_experts(device):
    cfg = CONFIGS["7b"].with_(top_k=1)
    layer = make_layer(cfg, device=device, residual=False)
    _steer(layer, [5])
    x = torch.rand(40, 64, device=device).requires_grad_()
    ((out, _, grads), (r_out, _, r_grads)), names = run_both(layer, x, None)
    assert_norm_close(out, r_out, torch.float32, "out")
    for n, a, b in zip(names, grads, r_grads):
        assert_norm_close(a, b if b is not None else torch.zeros_like(a), torch.float32, n)
    up_grad = grads[names.index("up")]
    assert up_grad[5].abs().sum() > 0 and up_grad[:5].abs().sum() == 0  # empty experts: zero gradients


@pytest.mark.parametrize("device", DEVICES)
def test_every_slot_to_zero_computation_experts(device):
    cfg = CONFIGS["7b"]  # ids 16, 17 constant, 18 copy, 19 zero
    layer = make_layer(cfg, device=device, residual=False)
    _steer(layer, [17, 18])
    x = torch.rand(40, 64, device=device).requires_grad_()
    ((out, _, grads), (r_out, _, r_grads)), names = run_both(layer, x, None)
    assert_norm_close(out, r_out, torch.float32, "out")
    for n, a, b in zip(names, grads, r_grads):
        assert_norm_close(a, b if b is not None else torch.zeros_like(a), torch.float32, n)
    assert grads[names.index("up")].abs().sum() == 0 and grads[names.index("down")].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_only_zero_experts_give_exact_zero(device):
    cfg = CONFIGS["7b"].with_(top_k=1)
    layer = make_layer(cfg, device=device, residual=False)
    _steer(layer, [19])
    x = torch.rand(8, 64, device=device)
    out, _ = layer(x)
    assert torch.equal(out, torch.zeros_like(out))


def test_balance_loss_matches_reference_and_trains_the_router():
    cfg = CONFIGS["7b"]
    layer = make_layer(cfg, residual=False)
    x = torch.randn(50, 64)
    _, _, loss = layer(x, return_balance_loss=True)
    routing = R.route(R.gate_logits(x, layer.reference_params()), cfg)
    f, p = R.load_balance_stats(routing, cfg)
    torch.testing.assert_close(loss, cfg.balance_coef * R.load_balance_loss(f, p, cfg))
    torch.testing.assert_close(load_balance_loss(f, p, cfg), R.load_balance_loss(f, p, cfg))
    loss.backward()
    assert layer.router.gate_weight.grad.abs().sum() > 0


def test_full_size_7b_preset_bf16():
    cfg = MoEPPConfig.moepp_7b()  # D = 1536, I = 4096, 16 FFN experts
    layer = make_layer(cfg, torch.bfloat16, residual=True)
    x, prev = inputs(cfg, 6, torch.bfloat16, "cpu", residual=True)
    out, logits = layer(x, prev)
    r_out, r_logits = R.moepp_layer(x, layer.reference_params(), cfg, prev)
    assert_norm_close(out, r_out, torch.bfloat16, "out")
    out.float().square().sum().backward()
    assert torch.isfinite(layer.up.grad.float()).all() and torch.isfinite(x.grad.float()).all()


def test_x_is_not_mutated_by_input_scaling():
    cfg = CONFIGS["0.6b"]
    layer = make_layer(cfg, residual=False)
    x = torch.randn(10, 64)
    before = x.clone()
    layer(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "change, exc, name",
    [
        ({"x": torch.zeros(4, 63)}, ValueError, "hidden size"),
        ({"x": torch.zeros(4, 64, dtype=torch.int32)}, TypeError, "x"),
        ({"x": torch.zeros(64, 4).t()}, ValueError, "contiguous"),
        ({"up": torch.zeros(16, 192, 65)}, ValueError, "up"),
        ({"down": torch.zeros(16, 64, 96, dtype=torch.float16)}, TypeError, "down"),
        ({"const_value": torch.zeros(3, 64)}, ValueError, "const_value"),
        ({"gate_weight": torch.zeros(20, 64, dtype=torch.bfloat16)}, TypeError, "gate_weight"),
        ({"prev_logits": torch.zeros(4, 20)}, ValueError, "residual_weight"),
        ({"gemm_backend": "cublas"}, ValueError, "gemm_backend"),
        ({"x": torch.zeros(1, 64).expand(2**30, 64)}, ValueError, "2\\*\\*31"),  # T * k > 2^31
    ],
)
def test_bad_input_names_the_argument(change, exc, name):
    cfg = CONFIGS["7b"]
    layer = make_layer(cfg, residual=False)
    args = {"x": torch.zeros(4, 64), "up": layer.up, "down": layer.down, "const_gate": layer.const_gate,
            "const_value": layer.const_value, "gate_weight": layer.router.gate_weight}
    args.update(change)
    x = args.pop("x")
    with pytest.raises(exc, match=name):
        moepp_layer(x, cfg, **args)


def test_module_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        MoEPPLayer(CONFIGS["7b"], dtype=torch.int8)
    with pytest.raises(ValueError, match="gemm_backend"):
        MoEPPLayer(CONFIGS["7b"], gemm_backend="cutlass3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_with_the_grouped_mm_backend(dtype):
    """torch._grouped_mm (where this torch has it, on the CPU too) as the grouped-GEMM backend."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    cfg = CONFIGS["7b"]
    layer = make_layer(cfg, dtype, residual=True)
    layer.gemm_backend = "grouped_mm"
    x, prev = inputs(cfg, 37, dtype, "cpu", residual=True)
    ((out, logits, grads), (r_out, r_logits, r_grads)), names = run_both(layer, x, prev)
    assert_norm_close(out, r_out, dtype, "out")
    for n, a, b in zip(names, grads, r_grads):
        assert_norm_close(a, b if b is not None else torch.zeros_like(a), dtype, n)
