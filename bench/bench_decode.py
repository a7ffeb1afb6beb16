"""Decode shapes (T = 1, 8, 64): the fused layer's forward vs the time to read
the touched experts' weights once at the measured copy bandwidth."""

from __future__ import annotations

import pytest
import torch
from conftest import copy_bandwidth, devices

from moepp_kernels import MoEPPConfig, MoEPPLayer

PRESET = {"cuda": MoEPPConfig.moepp_7b, "cpu": MoEPPConfig.moepp_0_6b}



@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("tokens", [1, 8, 64])
def bench_decode(measure, device, tokens):
    cfg = PRESET[device]()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=dtype, device=device)
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
    with torch.no_grad():
        ids = layer.router(x).topk_ids
        touched = int(torch.unique(ids[ids < cfg.n_ffn]).numel())
        weight_bytes = touched * 3 * cfg.hidden_size * cfg.ffn_size * layer.up.element_size()
        read_ms = 2 * weight_bytes / (copy_bandwidth(device) * 1e9) * 1e3  # copy bandwidth counts read + write

        def fn():
            return layer(x)

        case = f"decode {device} {'7b' if device == 'cuda' else '0.6b'} T={tokens}"
        measure(case, "fused", device, fn, extra={"touched_ffn_experts": touched, "weight_bytes": weight_bytes,
                                                   "weight_read_ms": read_ms})
