"""Shared test helpers: devices (CUDA skipped cleanly without a GPU) and the
one table of per-dtype tolerances."""

import dataclasses

import pytest
import torch

import moepp_kernels
from moepp_kernels import moepp_layer
from moepp_kernels import reference as R

HAS_CUDA = torch.cuda.is_available() and moepp_kernels.built_with_cuda()

# Per dtype: (atol, rtol) for element-wise comparisons against the reference,
# and `norm`, the bound on ||got - want|| / ||want|| for results that reduce over
# many bf16/fp16 products (layer outputs, weight gradients).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
NORM_TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
# bf16 / fp16 results reduced over many products are judged against a float64 run of the
# reference (FlashAttention's rule): our relative error against it may be at most
# REFERENCE_ERROR_FACTOR times the same-precision reference's own error against it, plus
# REFERENCE_ERROR_FLOOR (for results the reference gets exactly). A fixed bound against the
# low-precision reference flags correct results and misses regressions that stay under it.
REFERENCE_ERROR_FACTOR = {torch.float16: 2.0, torch.bfloat16: 2.0}
REFERENCE_ERROR_FLOOR = {torch.float16: 2.0**-13, torch.bfloat16: 2.0**-10}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                            pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")]),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, msg: str = "") -> None:
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=msg or None)


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """||actual - expected|| <= NORM_TOLERANCES[dtype] * ||expected|| (computed in fp64)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, ref = (a - e).norm().item(), e.norm().item()
    assert err <= NORM_TOLERANCES[dtype] * max(ref, 1e-12), f"{msg}: relative error {err / max(ref, 1e-12):.3g}"


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = actual.detach().cpu().double(), exact.detach().cpu().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return (a - e).norm().item() / max(e.norm().item(), 1e-300)


def assert_within_reference_error(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor,
                                  dtype: torch.dtype, msg: str = "") -> None:
    """Low precision: relative_error(actual, exact) <= REFERENCE_ERROR_FACTOR *
    relative_error(reference, exact) + REFERENCE_ERROR_FLOOR, where `exact` is a
    float64 run and `reference` the plain-PyTorch reference in `dtype`."""
    ours, theirs = relative_error(actual, exact), relative_error(reference, exact)
    bound = REFERENCE_ERROR_FACTOR[dtype] * theirs + REFERENCE_ERROR_FLOOR[dtype]
    assert ours <= bound, (f"{msg}: error {ours:.3g} against float64, more than {REFERENCE_ERROR_FACTOR[dtype]} x "
                           f"the {dtype} reference's {theirs:.3g} + {REFERENCE_ERROR_FLOOR[dtype]:.3g}")


def float64_leaf(t):
    """A float64 copy of t that is a leaf of its own (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def float64_params(params: R.MoEPPParams) -> R.MoEPPParams:
    return R.MoEPPParams(**{f.name: float64_leaf(getattr(params, f.name)) for f in dataclasses.fields(params)})


def assert_layer_matches_reference(layer, x: torch.Tensor, dtype: torch.dtype) -> None:
    """A first layer (no prev logits): its output and the gradients of sum(out²)
    for x, up and down against the reference (in bf16 / fp16: bounded by the
    reference's own error against a float64 run, on tokens routed alike by all)."""
    out, _ = layer(x)
    params = layer.reference_params()
    ref, _ = R.moepp_layer(x, params, layer.config)
    leaves = (x, layer.up, layer.down)
    ours = torch.autograd.grad(out.float().square().sum(), leaves)
    theirs = torch.autograd.grad(ref.float().square().sum(), leaves)
    if dtype == torch.float32:
        assert_norm_close(out, ref, dtype, "out")
        for name, a, b in zip(("x", "up", "down"), ours, theirs):
            assert_norm_close(a, b, dtype, name)
        return
    x64, params64 = float64_leaf(x), float64_params(params)
    exact, _ = R.moepp_layer(x64, params64, layer.config)
    agree = routed_alike(layer, x, (params, params64))
    assert agree.float().mean() >= 0.99  # fp32 routing in all three; flips only on near-ties
    assert_within_reference_error(out[agree], ref[agree], exact[agree], dtype, "out")
    if agree.all():
        exact_grads = torch.autograd.grad(exact.square().sum(), (x64, params64.up, params64.down))
        for name, a, b, e in zip(("x", "up", "down"), ours, theirs, exact_grads):
            assert_within_reference_error(a, b, e, dtype, name)


def routed_alike(layer, x: torch.Tensor, params_list, prev: torch.Tensor = None) -> torch.Tensor:
    """[T] bool: tokens the layer and the reference with each of params_list route to the same experts."""
    r = layer.router
    ids = moepp_layer(x, layer.config, up=layer.up, down=layer.down, const_gate=layer.const_gate,
                      const_value=layer.const_value, gate_weight=getattr(r, "gate_weight", None),
                      gate_w1=getattr(r, "gate_w1", None), gate_w2=getattr(r, "gate_w2", None),
                      residual_weight=r.residual_weight, selection_bias=r.selection_bias, prev_logits=prev,
                      return_router=True)[2].topk_ids.long().cpu()
    agree = torch.ones(ids.shape[0], dtype=torch.bool)
    for params in params_list:
        x_p = x.to(params.up.dtype)
        prev_p = None if prev is None else prev.to(R.accumulation_dtype(params.up.dtype))
        ref_ids = R.route(R.gate_logits(x_p.reshape(-1, x.shape[-1]), params), layer.config, prev_p,
                          params.residual_weight, params.selection_bias).topk_ids.cpu()
        agree &= (ids == ref_ids).all(dim=-1)
    return agree


def assert_forward_replays_in_cuda_graph(layer, *inputs: torch.Tensor) -> None:
    """Nothing in the layer's forward waits for the host: a CUDA graph captures it (after a
    warm-up on a side stream, which compiles / loads the kernels) and replays it to the
    eager result."""
    with torch.no_grad():
        eager, _ = layer(*inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, _ = layer(*inputs)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
