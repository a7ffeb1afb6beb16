"""Router benchmark: the fused router vs the plain PyTorch op sequence users
would otherwise run (torch_ops) and vs the NaN-safe reference, side by side, at
T in {1, 128, 4096, 65536, 262144}, for the MoE++-7B layout (N = 20, k = 2) and
a LongCat-like one (N = 768, k = 12; up to T = 16384 on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import devices, interleaved_ms, record_bandwidth, round_record
from telemetry import nvml_snapshot

from moepp_kernels import MoEPPConfig, _cpu_matmul, fused_router
from moepp_kernels import reference as R
from moepp_kernels.router import RESIDUAL_IN_KERNEL_MAX_EXPERTS

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
def bench_router(record_result, quick, device, layout, tokens, residual):
    """fused, torch_ops and the reference timed in alternating rounds (interleaved_ms), and, where
    the fused router runs the residual as a GEMM too (N > 128), l + r·Gᵀ alone: residual_gemm as
    torch_ops runs it (torch.addmm), and residual_gemm_fused as the fused router does where that
    differs (oneDNN's fp32 matmul where _cpu_matmul picks it). torch_ops over the fused
    router's GEMM bounds its ratio there; each side's time beyond its own GEMM is compared too."""
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
    fns = {
        "fused": lambda: fused_router(logits, cfg, prev_logits=prev, residual_weight=weight, selection_bias=bias),
        "torch_ops": lambda: torch_ops(logits, cfg, prev, weight, bias),
        "reference": lambda: R.route(logits, cfg, prev, weight, bias),
    }
    if residual and n > RESIDUAL_IN_KERNEL_MAX_EXPERTS:
        fns["residual_gemm"] = lambda: torch.addmm(logits, prev, weight.t())
        if _cpu_matmul.uses_onednn(prev, weight):
            fns["residual_gemm_fused"] = lambda: _cpu_matmul.add_mm(logits, prev, weight.t())
    clocks = {"nvml_before": nvml_snapshot()} if device == "cuda" else {}
    with torch.no_grad():
        rounds = interleaved_ms(fns, device, rounds=5, reps=3 if tokens <= 4096 else 2)
    if device == "cuda":
        clocks["nvml_after"] = nvml_snapshot()
    moved = router_bytes(tokens, cfg, residual)
    case = f"router {device} {layout} T={tokens} {'residual' if residual else 'first'}"
    for impl, round_ms in rounds.items():
        record = {**round_record(device, round_ms), **clocks}
        record_bandwidth(record, device, moved)
        record_result(case, impl, record)
