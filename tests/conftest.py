"""Shared test helpers: devices (CUDA skipped cleanly without a GPU) and the
one table of per-dtype tolerances."""

import pytest
import torch

import moepp_kernels
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


def assert_layer_matches_reference(layer, x: torch.Tensor, dtype: torch.dtype) -> None:
    """A first layer (no prev logits): its output and the gradients of sum(out²)
    for x, up and down against the reference."""
    out, _ = layer(x)
    ref, _ = R.moepp_layer(x, layer.reference_params(), layer.config)
    assert_norm_close(out, ref, dtype, "out")
    leaves = (x, layer.up, layer.down)
    ours = torch.autograd.grad(out.float().square().sum(), leaves)
    theirs = torch.autograd.grad(ref.float().square().sum(), leaves)
    for name, a, b in zip(("x", "up", "down"), ours, theirs):
        assert_norm_close(a, b, dtype, name)


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
