"""MoEPPConfig: the expert layout and routing options of one MoE++ layer.

Expert ids are laid out as [FFN x n_ffn | constant x n_constant | copy x n_copy | zero x n_zero]
(spec: moepp-semantics.md, "Shapes and names").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GATINGS = ("softmax_topk", "topk_softmax")


@dataclass(frozen=True)
class MoEPPConfig:
    """Layout and options of a MoE++ (or LongCat-Flash-style) layer.

    Attributes:
        hidden_size: D.
        ffn_size: I, the width of each FFN expert.
        n_ffn, n_constant, n_copy, n_zero: how many experts of each kind.
        top_k: k, experts per token.
        gating: "softmax_topk" (softmax over all N, then top-k; MoE++) or
            "topk_softmax" (top-k of the logits, softmax over those k).
        gate_depth: 1 (l = x·W_gᵀ) or 2 (l = tanh(x·W_1ᵀ)·W_2ᵀ, W_1 [8N, D]).
        normalize_logits: divide the logits by std(l)/logits_std before gating.
        logits_std: sigma, the target std of the normalisation.
        renormalize: softmax_topk only: divide the k gates by their sum after
            masking the zero experts.
        selection_bias: the router owns a per-expert selection bias [N]
            (LongCat-Flash): chosen by scores + bias, weighted by scores.
        routed_scaling_factor: multiplies the final gates.
        scale_identity_weights: whether copy (identity) experts' gates are
            multiplied by routed_scaling_factor too.
        scale_input_by_topk: experts see x * top_k (the original's default).
        balance_tau: tau, the load-balance weight of zero-computation experts.
        balance_coef: beta, the weight of the load-balance loss.
        capacity_factor: gamma of the paper's expert capacity (training-side extras;
            1.1 is the paper's), or None for no capacity: see capacity.py.
    """

    hidden_size: int
    ffn_size: int
    n_ffn: int
    n_constant: int = 0
    n_copy: int = 0
    n_zero: int = 0
    top_k: int = 2
    gating: str = "softmax_topk"
    gate_depth: int = 1
    normalize_logits: bool = False
    logits_std: float = 1.0
    renormalize: bool = True
    selection_bias: bool = False
    routed_scaling_factor: float = 1.0
    scale_identity_weights: bool = True
    scale_input_by_topk: bool = False
    balance_tau: float = 0.75
    balance_coef: float = 0.01
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_size", "n_ffn", "n_constant", "n_copy", "n_zero", "top_k", "gate_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MoEPPConfig.{name} must be an int, got {type(value).__name__}")
        for name in ("hidden_size", "ffn_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEPPConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_ffn", "n_constant", "n_copy", "n_zero"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEPPConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_experts < 1:
            raise ValueError("MoEPPConfig: the layer needs at least one expert (n_ffn + n_constant + n_copy + n_zero)")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"MoEPPConfig.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.gating not in GATINGS:
            raise ValueError(f"MoEPPConfig.gating must be one of {GATINGS}, got {self.gating!r}")
        if self.gate_depth not in (1, 2):
            raise ValueError(f"MoEPPConfig.gate_depth must be 1 or 2, got {self.gate_depth}")
        if not (math.isfinite(self.logits_std) and self.logits_std > 0):
            raise ValueError(f"MoEPPConfig.logits_std must be finite and > 0, got {self.logits_std}")
        if not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"MoEPPConfig.routed_scaling_factor must be finite, got {self.routed_scaling_factor}")
        if not (math.isfinite(self.balance_tau) and self.balance_tau >= 0):
            raise ValueError(f"MoEPPConfig.balance_tau must be finite and >= 0, got {self.balance_tau}")
        if not math.isfinite(self.balance_coef):
            raise ValueError(f"MoEPPConfig.balance_coef must be finite, got {self.balance_coef}")
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) or not (
                    math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
                raise ValueError(f"MoEPPConfig.capacity_factor must be None or a finite number > 0, got "
                                 f"{self.capacity_factor!r}")
            if self.n_zero < 1:
                raise ValueError("MoEPPConfig.capacity_factor needs a zero expert (n_zero >= 1): dropped slots "
                                 "become zero-expert slots of weight 0")
            if self.balance_tau * self.n_ffn + self.n_experts - self.n_ffn == 0:
                raise ValueError("MoEPPConfig.capacity_factor: tau * n_ffn + n_zc is 0 (balance_tau = 0 and no "
                                 "zero-computation experts), so the capacity is undefined")

    @property
    def n_experts(self) -> int:
        return self.n_ffn + self.n_constant + self.n_copy + self.n_zero

    @property
    def constant_begin(self) -> int:
        return self.n_ffn

    @property
    def copy_begin(self) -> int:
        return self.n_ffn + self.n_constant

    @property
    def zero_begin(self) -> int:
        return self.n_ffn + self.n_constant + self.n_copy

    @property
    def input_scale(self) -> float:
        """What the experts see x multiplied by: top_k with scale_input_by_topk (x_e = x * k), else 1."""
        return float(self.top_k) if self.scale_input_by_topk else 1.0

    def expert_kind(self, expert: int) -> str:
        """"ffn", "constant", "copy" or "zero" for expert id `expert`."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert must be in [0, {self.n_experts}), got {expert}")
        if expert < self.constant_begin:
            return "ffn"
        if expert < self.copy_begin:
            return "constant"
        if expert < self.zero_begin:
            return "copy"
        return "zero"

    def with_(self, **changes: object) -> MoEPPConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # Presets (spec: "Shapes and names"; the paper's layouts and the released 7B layer).
    @classmethod
    def moepp_7b(cls) -> MoEPPConfig:
        """The released MoE++-7B layer: 16 FFN + 2 constant + 1 copy + 1 zero, top-2,
        logits normalisation on (sigma 1.0), x*k scaling off."""
        return cls(hidden_size=1536, ffn_size=4096, n_ffn=16, n_constant=2, n_copy=1, n_zero=1, top_k=2,
                   normalize_logits=True, scale_input_by_topk=False)

    @classmethod
    def moepp_0_6b(cls) -> MoEPPConfig:
        """The paper's 0.6B layout, (8+4)E: 8 FFN + 2 constant + 1 copy + 1 zero."""
        return cls(hidden_size=768, ffn_size=2048, n_ffn=8, n_constant=2, n_copy=1, n_zero=1, top_k=2,
                   scale_input_by_topk=True)

    @classmethod
    def moepp_1b(cls) -> MoEPPConfig:
        """The paper's 1B layout, (16+4)E."""
        return cls.moepp_0_6b().with_(n_ffn=16)

    @classmethod
    def moepp_2b(cls) -> MoEPPConfig:
        """The paper's 2B layout, (32+8)E: 32 FFN + 6 constant + 1 copy + 1 zero."""
        return cls.moepp_0_6b().with_(n_ffn=32, n_constant=6)

    @classmethod
    def longcat(cls, hidden_size: int = 1024, ffn_size: int = 512, n_ffn: int = 64, n_identity: int = 32,
                top_k: int = 6, routed_scaling_factor: float = 6.0) -> MoEPPConfig:
        """LongCat-Flash style: FFN experts plus identity (copy) experts, selection
        bias, no renormalisation, routed scaling factor."""
        return cls(hidden_size=hidden_size, ffn_size=ffn_size, n_ffn=n_ffn, n_copy=n_identity, top_k=top_k,
                   renormalize=False, selection_bias=True, routed_scaling_factor=routed_scaling_factor)
