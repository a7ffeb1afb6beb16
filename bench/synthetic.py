"""Controlled synthetic routing for the paper's Table 3 (spec: cost model).

The share of token slots routed to zero-computation experts is set from tau:
    share(tau) = n_zc / (tau * n_ffn + n_zc)
so that MoE++'s FFN work relative to a vanilla MoE of the same size is
1 - share = tau * n_ffn / (tau * n_ffn + n_zc). The share is produced the way
a trained router would produce it: random gate logits with a bias added to the
zero-computation experts' logits, the bias found by bisection.
"""

from __future__ import annotations

import torch

from moepp_kernels import MoEPPConfig, fused_router

# Expert forward time, MoE++ vs vanilla (spec: "The paper's headline"): vanilla ms, then ms per tau.
PAPER_MS = {
    "0.6b": (535.3, {0.10: 202.4, 0.25: 277.8, 0.50: 387.3, 0.75: 427.6, 1.00: 449.6}),
    "1b": (610.9, {0.10: 289.3, 1.00: 530.2}),
    "2b": (683.4, {0.10: 417.9, 1.00: 590.5}),
    "7b": (1859.0, {0.75: 1455.0}),
}
TAUS = (0.10, 0.25, 0.50, 0.75, 1.00)
PRESETS = {"0.6b": MoEPPConfig.moepp_0_6b, "1b": MoEPPConfig.moepp_1b, "2b": MoEPPConfig.moepp_2b,
           "7b": MoEPPConfig.moepp_7b}


def n_zero_computation(cfg: MoEPPConfig) -> int:
    return cfg.n_experts - cfg.n_ffn


def target_share(cfg: MoEPPConfig, tau: float) -> float:
    return n_zero_computation(cfg) / (tau * cfg.n_ffn + n_zero_computation(cfg))


def ideal_speedup(cfg: MoEPPConfig, tau: float) -> float:
    """Vanilla FFN work over MoE++ FFN work."""
    return 1.0 / (1.0 - target_share(cfg, tau))


def paper_speedup(size: str, tau: float) -> float | None:
    vanilla, per_tau = PAPER_MS[size]
    return vanilla / per_tau[tau] if tau in per_tau else None


def vanilla_config(cfg: MoEPPConfig) -> MoEPPConfig:
    """The same FFN experts, no zero-computation experts."""
    return cfg.with_(n_constant=0, n_copy=0, n_zero=0)


def biased_logits(cfg: MoEPPConfig, tokens: int, bias: float, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.n_experts, generator=g)
    logits[:, cfg.n_ffn:] += bias
    return logits.to(device)


def measured_share(cfg: MoEPPConfig, ids: torch.Tensor) -> float:
    return (ids >= cfg.n_ffn).float().mean().item()


def calibrate_bias(cfg: MoEPPConfig, share: float, tokens: int = 8192) -> float:
    """The zero-computation logit bias whose routing sends `share` of the slots there."""
    low, high = -30.0, 30.0
    for _ in range(40):
        mid = (low + high) / 2
        ids = fused_router(biased_logits(cfg, tokens, mid, "cpu", seed=1), cfg).topk_ids
        if measured_share(cfg, ids) < share:
            low = mid
        else:
            high = mid
    return (low + high) / 2
