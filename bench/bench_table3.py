"""The paper's Table 3 on our kernels: expert forward time (permutation plan,
FFN experts, combine: FFN plus zero-computation experts; the router excluded)
of a MoE++ layer vs a vanilla MoE with the same FFN experts, top-2, at the
0.6B/1B/2B/7B layouts, sweeping tau. Reported per case: our speedup, the ideal
(FFN-work ratio), the paper's number, and the target vs measured share of
slots routed to zero-computation experts."""

from __future__ import annotations

import pytest
import torch
from conftest import devices
from synthetic import (
    PRESETS,
    TAUS,
    biased_logits,
    calibrate_bias,
    ideal_speedup,
    measured_share,
    paper_speedup,
    target_share,
    vanilla_config,
)

from moepp_kernels import MoEPPLayer, build_plan, fused_router, grouped_gemm
from moepp_kernels._ops.combine import layout_scalars
from moepp_kernels._ops.expert_ffn import apply_expert_ffn

# Tokens per layout: T = 16384 on a GPU; CPU-sized on the CPU (same comparisons, 2 cores).
GPU_TOKENS = 16384
CPU_TOKENS = {"0.6b": 1024, "1b": 1024, "2b": 1024, "7b": 256}
QUICK_TOKENS = 64


def expert_forward(layer: MoEPPLayer, x: torch.Tensor, logits: torch.Tensor):
    """Routing done once; returns the timed closure over plan + FFN + combine."""
    cfg = layer.config
    route = fused_router(logits, cfg)
    mix = torch.zeros(x.shape[0], 2 * cfg.n_constant, device=x.device)
    scale = cfg.input_scale

    backend = grouped_gemm.resolve_backend("auto", x.device, x.dtype, (cfg.hidden_size, cfg.ffn_size))

    def run():  # what the layer runs after its router (the private ops: no index checks)
        plan = build_plan(route.topk_ids, cfg.n_ffn)
        y = apply_expert_ffn(x, layer.up, layer.down, plan, cfg.top_k, scale, backend)
        return torch.ops.moepp.combine(x, y, route.topk_ids, route.topk_weights, plan.slot_row, mix,
                                       layer.const_value, *layout_scalars(cfg))

    return run, measured_share(cfg, route.topk_ids)



@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("size", list(PRESETS))
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("impl", ["moepp", "vanilla"])
def bench_table3(measure, quick, device, size, tau, impl):
    cfg = PRESETS[size]()
    if impl == "vanilla":
        cfg = vanilla_config(cfg)
    tokens = QUICK_TOKENS if quick else (GPU_TOKENS if device == "cuda" else CPU_TOKENS[size])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=dtype, device=device)
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device)
    bias = calibrate_bias(cfg, target_share(cfg, tau)) if impl == "moepp" else 0.0
    with torch.no_grad():
        run, share = expert_forward(layer, x, biased_logits(cfg, tokens, bias, device))
        full = PRESETS[size]()
        measure(f"table3 {device} {size} T={tokens} tau={tau:.2f}", impl, device, run, extra={
            "size": size, "tau": tau, "tokens": tokens, "measured_zc_share": share,
            "target_zc_share": target_share(full, tau) if impl == "moepp" else 0.0,
            "ideal_speedup": ideal_speedup(full, tau), "paper_speedup": paper_speedup(size, tau)})
