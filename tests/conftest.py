"""Shared test helpers: devices (CUDA skipped cleanly without a GPU) and the
one table of per-dtype tolerances."""

import pytest
import torch

import moepp_kernels

HAS_CUDA = torch.cuda.is_available() and moepp_kernels.built_with_cuda()

# (atol, rtol) per dtype, for every comparison against the reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                            pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")]),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, msg: str = "") -> None:
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=msg or None)
