"""Router benchmark: the fused router vs the plain PyTorch op sequence users
would otherwise run (torch_ops) and vs the NaN-safe reference, side by side, at
T in {1, 128, 4096, 65536, 262144}, for the MoE++-7B layout (N = 20, k = 2) and
a LongCat-like one (N = 768, k = 12; up to T = 16384 on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import devices

from moepp_kernels import MoEPPConfig, fused_router
from moepp_kernels import reference as R

LAYOUTS = {
    "N20_k2": MoEPPConfig.moepp_7b(),
    "N768_k12": MoEPPConfig.longcat(n_ffn=512, n_identity=256, top_k=12),
}
TOKENS = [1, 128, 4096, 65536, 262144]
QUICK_TOKENS = [1, 128, 4096]
# CPU-sized sweep for the large layout (its reference sorts T x 768 scores): make bench stays in minutes.
CPU_MAX_TOKENS = {"N20_k2": 262144, "N768_k12": 16384}


def torch_ops(logits, cfg: MoEPPConfig, prev, weight, bias):
    """What a user writes without us (the released layer's op sequence): l + r·Gᵀ, optional
    normalisation, softmax, top-k (of score + bias), zero-expert mask, renormalisation, scaling.
    Not NaN-safe, unlike the reference."""
    routed = logits if prev is None else torch.addmm(logits, prev, weight.t())
    z = routed / (routed.std(-1, keepdim=True) / cfg.logits_std) if cfg.normalize_logits else routed
    if cfg.gating == "softmax_topk":
        probs = torch.softmax(z, -1)
        ids = torch.topk(probs if bias is None else probs + bias, cfg.top_k, dim=-1).indices
        gates = probs.gather(-1, ids).masked_fill(ids >= cfg.zero_begin, 0.0)
        if cfg.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
    else:
        top, ids = torch.topk(z, cfg.top_k, dim=-1)
        gates = torch.softmax(top, -1)
    return ids, gates * cfg.routed_scaling_factor, routed


def router_bytes(tokens: int, cfg: MoEPPConfig, residual: bool) -> int:
    n, k = cfg.n_experts, cfg.top_k
    moved = 4 * tokens * n + 8 * tokens * k  # read l, write ids and weights
    if residual:
        moved += 4 * (2 * tokens * n + n * n)  # read r and G, write l'
    return moved


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("residual", [False, True], ids=["first", "residual"])
@pytest.mark.parametrize("impl", ["fused", "torch_ops", "reference"])
def bench_router(measure, quick, device, layout, tokens, residual, impl):
    if quick and tokens not in QUICK_TOKENS:
        pytest.skip("--quick")
    if device == "cpu" and tokens > CPU_MAX_TOKENS[layout]:
        pytest.skip("CPU-sized sweep")
    cfg = LAYOUTS[layout]
    n = cfg.n_experts
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, n, generator=g).to(device)
    prev = torch.randn(tokens, n, generator=g).to(device) if residual else None
    weight = (torch.randn(n, n, generator=g) / n**0.5).to(device) if residual else None
    bias = torch.zeros(n, device=device) if cfg.selection_bias else None
    if impl == "fused":
        def fn():
            return fused_router(logits, cfg, prev_logits=prev, residual_weight=weight, selection_bias=bias)
    elif impl == "torch_ops":
        def fn():
            return torch_ops(logits, cfg, prev, weight, bias)
    else:
        def fn():
            return R.route(logits, cfg, prev, weight, bias)
    with torch.no_grad():
        measure(f"router {device} {layout} T={tokens} {'residual' if residual else 'first'}", impl, device, fn,
                router_bytes(tokens, cfg, residual))
