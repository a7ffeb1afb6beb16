"""Grouped-GEMM backends vs dense GEMMs with the same total rows (efficiency),
with achieved TFLOP/s: the FFN's two products (GEMM 1 [M, D] x [D, 2I], GEMM 2
[M, I] x [I, D]) over expert-sorted rows, 75% of T * k slots on FFN experts."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU

from moepp_kernels import MoEPPConfig, grouped_gemm

# (preset, tokens) per device; T = 65536 is the large-M training shape.
GPU_CASES = [("7b", 16384), ("7b", 65536)]
CPU_CASES = [("0.6b", 1024)]
QUICK_TOKENS = 128
FFN_SHARE = 0.75
PRESETS = {"0.6b": MoEPPConfig.moepp_0_6b, "7b": MoEPPConfig.moepp_7b}


def backends(device: str) -> list:
    out = ["torch", "dense"]
    if device == "cuda":
        out.append("triton")
        try:
            grouped_gemm.resolve_backend("cutlass", torch.device("cuda"), torch.bfloat16)
            out.append("cutlass")
        except ValueError:
            pass
    if hasattr(torch, "_grouped_mm") and (device == "cpu" or torch.cuda.get_device_capability() >= (9, 0)):
        out.append("grouped_mm")
    return out


def cases() -> list:
    out = [pytest.param("cpu", p, t, id=f"cpu-{p}-T{t}") for p, t in CPU_CASES]
    mark = pytest.mark.skipif(not HAS_GPU, reason="no GPU")
    out += [pytest.param("cuda", p, t, id=f"cuda-{p}-T{t}", marks=mark) for p, t in GPU_CASES]
    return out


@pytest.mark.parametrize("device, preset, tokens", cases())
@pytest.mark.parametrize("impl", ["torch", "grouped_mm", "cutlass", "triton", "dense"])
def bench_grouped_gemm(measure, quick, device, preset, tokens, impl):
    if impl not in backends(device):
        pytest.skip(f"{impl} is not available on {device}")
    cfg = PRESETS[preset]()
    tokens = QUICK_TOKENS if quick else tokens
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d, i, g = cfg.hidden_size, cfg.ffn_size, cfg.n_ffn
    rows = int(FFN_SHARE * tokens * cfg.top_k)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.randint(0, g, (rows,), generator=gen), minlength=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).to(device)
    x = torch.randn(rows, d, device=device, dtype=dtype)
    a = torch.randn(rows, i, device=device, dtype=dtype)
    up = torch.randn(g, 2 * i, d, device=device, dtype=dtype) / d**0.5
    down = torch.randn(g, d, i, device=device, dtype=dtype) / i**0.5
    if impl == "dense":
        def fn():
            return x @ up[0].t(), a @ down[0].t()
    else:
        def fn():
            return grouped_gemm.forward(x, up, offsets, impl), grouped_gemm.forward(a, down, offsets, impl)
    with torch.no_grad():
        measure(f"grouped gemm {device} {preset} T={tokens} M={rows}", impl, device, fn, flops=6 * rows * d * i)
