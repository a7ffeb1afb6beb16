"""The MoE++ layer: router -> permutation plan -> FFN experts on permuted rows
-> combine epilogue, forward and backward (ARCHITECTURE.md, data flow).

`moepp_layer` is the functional form (all tensors explicit); `MoEPPLayer` the
module holding the router and expert weights, with the original layer's
`forward(x, prev_logits) -> (out, logits)` contract.
"""

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import grouped_gemm, reference
from ._ops import call_op
from ._ops.combine import layout_scalars
from ._ops.expert_ffn import apply_expert_ffn
from ._tensors import MODEL_DTYPES, check_tensor
from .config import MoEPPConfig
from .permute import build_plan
from .router import MoEPPRouter, RouterOutput, fused_router


def load_balance_loss(f: Tensor, p: Tensor, config: MoEPPConfig) -> Tensor:
    """L_b = Σ_i η_i f_i P_i with η_i = 1 for FFN experts and τ (config.balance_tau)
    for zero-computation experts (spec: "The paper's training-side extras").
    f, p: the router's fused statistics [N] (float32, or float64 for a float64 router);
    gradients flow through p."""
    if not isinstance(config, MoEPPConfig):
        raise TypeError(f"config must be a MoEPPConfig, got {type(config).__name__}")
    check_tensor("f", f, dtypes=(torch.float32, torch.float64), shape=(config.n_experts,))
    check_tensor("P", p, dtypes=(torch.float32, torch.float64), shape=(config.n_experts,), device=f.device)
    eta = torch.where(torch.arange(config.n_experts, device=p.device) < config.n_ffn,
                      torch.ones((), dtype=p.dtype, device=p.device),
                      torch.full((), config.balance_tau, dtype=p.dtype, device=p.device))
    return (eta * f.to(p.dtype) * p).sum()


def _check_weights(config: MoEPPConfig, x: Tensor, up: Tensor, down: Tensor, const_gate: Tensor,
                   const_value: Tensor) -> None:
    d, i = config.hidden_size, config.ffn_size
    c = config.n_constant
    for name, t, shape in (("up", up, (config.n_ffn, 2 * i, d)), ("down", down, (config.n_ffn, d, i)),
                           ("const_gate", const_gate, (c, 2, d)), ("const_value", const_value, (c, d))):
        check_tensor(name, t, dtypes=(x.dtype,), shape=shape, device=x.device)


def _gate_and_mix(x: Tensor, config: MoEPPConfig, gate_weight: Optional[Tensor], gate_w1: Optional[Tensor],
                  gate_w2: Optional[Tensor], const_gate: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Router logits [T, N] and constant-expert mixing logits [T, 2C] (of x_e) in
    fp32, from one fp32 GEMM over x [T, D] (the mixing weights ride along with the gate's)."""
    d = config.hidden_size
    first = gate_weight if config.gate_depth == 1 else gate_w1
    width = first.shape[0]
    both = call_op(torch.ops.moepp.gate_linear, x, torch.cat([first, const_gate.reshape(-1, d).float()]))
    logits = (both[:, :width] if config.gate_depth == 1
              else call_op(torch.ops.moepp.gate_linear, torch.tanh(both[:, :width]), gate_w2))
    mix = both[:, width:] * scale
    return logits.contiguous(), mix.contiguous()


def _route_tokens(x2: Tensor, config: MoEPPConfig, gate_weight: Optional[Tensor], gate_w1: Optional[Tensor],
                  gate_w2: Optional[Tensor], const_gate: Tensor, residual_weight: Optional[Tensor],
                  selection_bias: Optional[Tensor], prev_logits: Optional[Tensor], return_stats: bool = False
                  ) -> tuple[RouterOutput, Tensor]:
    """The layer's routing step for x2 [T, D]: (the RouterOutput, the constant experts' mixing
    logits [T, 2C]). G applies only with prev_logits (every MoE++ layer but the first)."""
    logits, mix = _gate_and_mix(x2, config, gate_weight, gate_w1, gate_w2, const_gate, config.input_scale)
    route = fused_router(logits, config, prev_logits=prev_logits,
                         residual_weight=residual_weight if prev_logits is not None else None,
                         selection_bias=selection_bias, return_stats=return_stats)
    return route, mix


def moepp_layer(x: Tensor, config: MoEPPConfig, *, up: Tensor, down: Tensor, const_gate: Tensor,
                const_value: Tensor, gate_weight: Optional[Tensor] = None, gate_w1: Optional[Tensor] = None,
                gate_w2: Optional[Tensor] = None, residual_weight: Optional[Tensor] = None,
                selection_bias: Optional[Tensor] = None, prev_logits: Optional[Tensor] = None,
                gemm_backend: str = "auto", return_router: bool = False
                ) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, RouterOutput]]:
    """One MoE++ layer on x [..., D] (fp32, bf16 or fp16).

    Weights: up [n_ffn, 2I, D], down [n_ffn, D, I], const_gate [n_constant, 2, D],
    const_value [n_constant, D] in x's dtype; gate_weight [N, D] (gate_depth 1) or
    gate_w1 [8N, D] and gate_w2 [N, 8N] (gate_depth 2), residual_weight [N, N] and
    selection_bias [N] in fp32. prev_logits [T, N] (fp32) from the previous layer
    applies the routing-score residual (needs residual_weight).
    Returns (out [..., D], logits [T, N] to pass on), plus the RouterOutput
    (ids, gates, counts, f, P) when return_router.
    """
    if not isinstance(config, MoEPPConfig):
        raise TypeError(f"config must be a MoEPPConfig, got {type(config).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x must have hidden size {config.hidden_size} in its last dim, got shape {list(x.shape)}")
    if (x.numel() // config.hidden_size) * config.top_k >= 2**31:
        raise ValueError(f"x: tokens * top_k must be < 2**31 (int32 slot indices), got "
                         f"{x.numel() // config.hidden_size} * {config.top_k}")
    check_tensor("x", x, dtypes=MODEL_DTYPES)
    _check_weights(config, x, up, down, const_gate, const_value)
    n, d = config.n_experts, config.hidden_size
    if config.gate_depth == 1:
        check_tensor("gate_weight", gate_weight, dtypes=(torch.float32,), shape=(n, d), device=x.device)
    else:
        check_tensor("gate_w1", gate_w1, dtypes=(torch.float32,), shape=(8 * n, d), device=x.device)
        check_tensor("gate_w2", gate_w2, dtypes=(torch.float32,), shape=(n, 8 * n), device=x.device)
    if prev_logits is not None and residual_weight is None:
        raise ValueError("prev_logits was given but residual_weight is None")
    backend = grouped_gemm.resolve_backend(gemm_backend, x.device, x.dtype, (config.hidden_size, config.ffn_size))
    scale = config.input_scale

    x2 = x.reshape(-1, d)
    route, mix = _route_tokens(x2, config, gate_weight, gate_w1, gate_w2, const_gate, residual_weight, selection_bias,
                               prev_logits, return_router)
    plan = build_plan(route.topk_ids, config.n_ffn)
    # The layer made the plan itself: its indices need no checks (the private ops take it as is).
    y = apply_expert_ffn(x2, up, down, plan, config.top_k, scale, backend)
    out = call_op(torch.ops.moepp.combine, x2, y, route.topk_ids, route.topk_weights, plan.slot_row, mix,
                  const_value, *layout_scalars(config))
    out = out.reshape(x.shape)
    return (out, route.logits, route) if return_router else (out, route.logits)


class MoEPPLayer(nn.Module):
    """A MoE++ layer (or LongCat-Flash-style layer) as one module.

    Holds `router` (MoEPPRouter: fp32 gate weights, G when has_residual,
    selection bias), `up` [n_ffn, 2I, D], `down` [n_ffn, D, I], `const_gate`
    [n_constant, 2, D] and `const_value` [n_constant, D] in `dtype`.
    forward(x, prev_logits=None) -> (out, logits) like the released layer; with
    return_balance_loss=True also beta * L_b from the router's fused statistics.
    """

    def __init__(self, config: MoEPPConfig, has_residual: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, gemm_backend: str = "auto"):
        super().__init__()
        if dtype not in MODEL_DTYPES:
            raise TypeError(f"dtype must be one of {MODEL_DTYPES}, got {dtype}")
        if gemm_backend not in grouped_gemm.BACKENDS:
            raise ValueError(f"gemm_backend must be one of {grouped_gemm.BACKENDS}, got {gemm_backend!r}")
        self.config = config
        self.gemm_backend = gemm_backend
        d, i, c = config.hidden_size, config.ffn_size, config.n_constant
        kw = {"device": device, "dtype": dtype}
        self.router = MoEPPRouter(config, has_residual=has_residual, device=device)
        self.up = nn.Parameter(torch.empty(config.n_ffn, 2 * i, d, **kw))
        self.down = nn.Parameter(torch.empty(config.n_ffn, d, i, **kw))
        self.const_gate = nn.Parameter(torch.empty(c, 2, d, **kw))
        self.const_value = nn.Parameter(torch.empty(c, d, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        for p in (self.up, self.down, self.const_gate, self.const_value):
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    def forward(self, x: Tensor, prev_logits: Optional[Tensor] = None, return_balance_loss: bool = False):
        """x [..., D] -> (out [..., D], logits [T, N]) (+ beta * L_b when asked)."""
        r = self.router
        result = moepp_layer(
            x, self.config, up=self.up, down=self.down, const_gate=self.const_gate, const_value=self.const_value,
            gate_weight=getattr(r, "gate_weight", None), gate_w1=getattr(r, "gate_w1", None),
            gate_w2=getattr(r, "gate_w2", None), residual_weight=r.residual_weight, selection_bias=r.selection_bias,
            prev_logits=prev_logits, gemm_backend=self.gemm_backend, return_router=return_balance_loss)
        if not return_balance_loss:
            return result
        out, logits, route = result
        return out, logits, self.config.balance_coef * load_balance_loss(route.f, route.P, self.config)

    @classmethod
    def from_moepp_state_dict(cls, state_dict: dict, config: MoEPPConfig, prefix: str = "",
                              gemm_backend: str = "auto") -> "MoEPPLayer":
        """A layer holding the weights of a released MoE++ layer's state dict
        (keys `moe.gate.wg.weight`, `moe.experts.experts.{e}.up_proj.weight`, ...,
        after `prefix`); see checkpoint.py."""
        from .checkpoint import layer_from_moepp_state_dict

        return layer_from_moepp_state_dict(state_dict, config, prefix=prefix, gemm_backend=gemm_backend)

    def reference_params(self) -> "reference.MoEPPParams":
        """This layer's tensors as the plain-PyTorch reference takes them (shared, not copied)."""
        r = self.router
        return reference.MoEPPParams(
            up=self.up, down=self.down, const_gate=self.const_gate, const_value=self.const_value,
            gate_weight=getattr(r, "gate_weight", None), gate_w1=getattr(r, "gate_w1", None),
            gate_w2=getattr(r, "gate_w2", None), residual_weight=r.residual_weight, selection_bias=r.selection_bias)

    def to_moepp_state_dict(self, prefix: str = "") -> dict:
        """The inverse of from_moepp_state_dict: the released layout's keys."""
        from .checkpoint import moepp_state_dict_from_layer

        return moepp_state_dict_from_layer(self, prefix=prefix)
