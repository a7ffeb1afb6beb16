"""An expert-parallel MoE++ layer over a torch.distributed process group.

Rank r holds a contiguous range of the FFN experts (`expert_ranges`); the router
(gate weights, G, selection bias) and the constant / copy / zero experts are
replicated on every rank. Per step (spec: the MoE++ deployment argument): route
and plan locally; only FFN slots travel: their rows (x_e, x*k folded in, model
dtype) go to the ranks owning their experts, are grouped expert-major for the
local grouped-GEMM FFN, and come back by the reverse exchange; the combine
epilogue then runs on the source rank, where zero / copy / constant slots are
resolved in registers. Gates never travel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import grouped_gemm
from .._ops.combine import layout_scalars
from .._ops.expert_ffn import apply_expert_ffn
from .._tensors import MODEL_DTYPES, check_tensor
from ..checkpoint import RESIDUAL, _copy, _layout, _tensor
from ..config import MoEPPConfig
from ..layer import MoEPPLayer, _gate_and_mix
from ..permute import PermutationPlan, build_plan
from ..router import MoEPPRouter, fused_router
from .exchange import exchange_counts, exchange_rows, expert_major_order, expert_ranges


def _local_plan(offsets: list[int], device: torch.device) -> PermutationPlan:
    """The plan of rows already gathered, expert-major (one slot per row, top_k 1)."""
    rows = offsets[-1]
    ident = torch.arange(rows, dtype=torch.int32, device=device)
    return PermutationPlan(torch.tensor(offsets, dtype=torch.int32, device=device), ident, ident.reshape(rows, 1))


class ExpertParallelMoEPPLayer(nn.Module):
    """A MoEPPLayer whose FFN experts are sharded over `group` (default: the world).

    Parameters: `router` (replicated MoEPPRouter, fp32), `up` [n_local, 2I, D] and
    `down` [n_local, D, I] for this rank's experts `expert_range` = [lo, hi),
    `const_gate` [n_constant, 2, D] and `const_value` [n_constant, D] (replicated).
    forward(x [..., D], prev_logits=None [T, N]) -> (out [..., D], logits [T, N]) with
    the single-device layer's contract; T may differ per rank, 0 included. Gradients:
    the experts' on their owning rank; the replicated parameters' are this rank's
    tokens' part (their sum over ranks is the single-device gradient: all-reduce them
    as data parallelism does).

    Host syncs: exactly one per forward, copying the per-(rank, expert) row counts to
    the host (the row exchange needs its sizes); the backward adds none.
    """

    def __init__(self, config: MoEPPConfig, group: dist.ProcessGroup | None = None, has_residual: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                 gemm_backend: str = "auto"):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoEPPLayer needs an initialised torch.distributed process group")
        if dtype not in MODEL_DTYPES:
            raise TypeError(f"dtype must be one of {MODEL_DTYPES}, got {dtype}")
        if gemm_backend not in grouped_gemm.BACKENDS:
            raise ValueError(f"gemm_backend must be one of {grouped_gemm.BACKENDS}, got {gemm_backend!r}")
        self.config, self.group, self.gemm_backend = config, group, gemm_backend
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.ranges = expert_ranges(config.n_ffn, self.world)
        self.expert_range = self.ranges[self.rank]
        n_local = self.expert_range[1] - self.expert_range[0]
        d, i, c = config.hidden_size, config.ffn_size, config.n_constant
        kw = {"device": device, "dtype": dtype}
        self.router = MoEPPRouter(config, has_residual=has_residual, device=device)
        self.up = nn.Parameter(torch.empty(n_local, 2 * i, d, **kw))
        self.down = nn.Parameter(torch.empty(n_local, d, i, **kw))
        self.const_gate = nn.Parameter(torch.empty(c, 2, d, **kw))
        self.const_value = nn.Parameter(torch.empty(c, d, **kw))

    @classmethod
    def from_layer(cls, layer: MoEPPLayer, group: dist.ProcessGroup | None = None) -> ExpertParallelMoEPPLayer:
        """This rank's shard of a full MoEPPLayer (the same layer on every rank): its
        experts, and copies of everything replicated."""
        if not isinstance(layer, MoEPPLayer):
            raise TypeError(f"layer must be a MoEPPLayer, got {type(layer).__name__}")
        ep = cls(layer.config, group, has_residual=layer.router.residual_weight is not None, dtype=layer.up.dtype,
                 device=layer.up.device, gemm_backend=layer.gemm_backend)
        lo, hi = ep.expert_range
        with torch.no_grad():
            ep.router.load_state_dict(layer.router.state_dict())
            ep.up.copy_(layer.up[lo:hi])
            ep.down.copy_(layer.down[lo:hi])
            ep.const_gate.copy_(layer.const_gate)
            ep.const_value.copy_(layer.const_value)
        return ep

    @classmethod
    def from_moepp_state_dict(cls, state_dict: dict, config: MoEPPConfig, group: dist.ProcessGroup | None = None,
                              prefix: str = "", gemm_backend: str = "auto",
                              dtype: torch.dtype | None = None) -> ExpertParallelMoEPPLayer:
        """This rank's shard from a released MoE++ layer's state dict (spec: "Checkpoint
        layout"): only this rank's FFN experts are read, so `state_dict` may hold just
        those (e.g. loaded lazily) plus the replicated gate and constant experts. The model
        dtype is the experts' unless `dtype` is given."""
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        lo, hi = expert_ranges(config.n_ffn, dist.get_world_size(group))[dist.get_rank(group)]
        # Every tensor of the layout but the other ranks' FFN experts, whose keys may be absent.
        needed = [(key, name, index) for key, name, index in _layout(config)
                  if name not in ("up", "down") or lo <= index < hi]
        missing = [prefix + key for key, _, _ in needed if key not in own]
        if missing:
            raise ValueError(f"state_dict: missing keys for this rank's shard: {missing[:5]}"
                             + (" ..." if len(missing) > 5 else ""))
        # The model dtype from an expert tensor (the gate may be stored in fp32).
        model_tensors = [own[key] for key, name, _ in needed if not name.startswith("router.")]
        ref = model_tensors[0] if model_tensors else own[needed[0][0]]
        ep = cls(config, group, has_residual=RESIDUAL in own, dtype=dtype or ref.dtype, device=ref.device,
                 gemm_backend=gemm_backend)
        with torch.no_grad():
            for key, name, index in needed:
                local = index - lo if name in ("up", "down") else index
                _copy(_tensor(ep, name, local), own[key], prefix + key)
            if RESIDUAL in own:
                _copy(ep.router.residual_weight, own[RESIDUAL], prefix + RESIDUAL)
        return ep

    def to_layer(self) -> MoEPPLayer:
        """The full single-device MoEPPLayer, on every rank: the expert shards all-gathered
        (a collective: every rank of the group must call it)."""
        cfg = self.config
        widest = max(hi - lo for lo, hi in self.ranges)
        layer = MoEPPLayer(cfg, has_residual=self.router.residual_weight is not None, dtype=self.up.dtype,
                           device=self.up.device, gemm_backend=self.gemm_backend)
        with torch.no_grad():
            layer.router.load_state_dict(self.router.state_dict())
            layer.const_gate.copy_(self.const_gate)
            layer.const_value.copy_(self.const_value)
            for name in ("up", "down"):
                mine = self.get_parameter(name).detach()
                padded = mine.new_zeros((widest, *mine.shape[1:]))
                padded[:mine.shape[0]] = mine
                parts = [torch.empty_like(padded) for _ in range(self.world)]
                dist.all_gather(parts, padded, group=self.group)
                full = torch.cat([part[:hi - lo] for part, (lo, hi) in zip(parts, self.ranges)])
                layer.get_parameter(name).copy_(full)
        return layer

    def forward(self, x: Tensor, prev_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [..., D] -> (out [..., D], logits [T, N]); see the class docstring."""
        cfg = self.config
        d = cfg.hidden_size
        check_tensor("x", x, dtypes=(self.up.dtype,), device=self.up.device)
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"x must have hidden size {d} in its last dim, got shape {list(x.shape)}")
        r = self.router
        if prev_logits is not None and r.residual_weight is None:
            raise ValueError("prev_logits was given but this layer has no residual weight (has_residual=False)")
        backend = grouped_gemm.resolve_backend(self.gemm_backend, x.device, x.dtype, (d, cfg.ffn_size))
        scale, k = cfg.input_scale, cfg.top_k
        x2 = x.reshape(-1, d)
        tokens = x2.shape[0]
        logits, mix = _gate_and_mix(x2.float(), cfg, getattr(r, "gate_weight", None), getattr(r, "gate_w1", None),
                                    getattr(r, "gate_w2", None), self.const_gate, scale)
        route = fused_router(logits, cfg, prev_logits=prev_logits,
                             residual_weight=r.residual_weight if prev_logits is not None else None,
                             selection_bias=r.selection_bias)
        plan = build_plan(route.topk_ids, cfg.n_ffn)
        counts = exchange_counts(plan.offsets, self.ranges, self.group)  # the one host sync
        sent = sum(counts.send)
        # Only FFN slots' rows leave this rank, already ordered by expert and so by owning rank.
        rows_out = x2.index_select(0, plan.row_src[:sent].long() // k)
        if scale != 1.0:
            rows_out = rows_out * scale
        rows_in = exchange_rows(rows_out, counts.send, counts.recv, group=self.group)
        order, local_offsets = expert_major_order(counts.recv_per_expert)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel())
        y_local = apply_expert_ffn(rows_in.index_select(0, order.to(x.device)), self.up, self.down,
                                   _local_plan(local_offsets, x.device), 1, 1.0, backend)
        # Results go back in the order they came, and land in this rank's plan rows ([T * k, D] as the combine reads).
        y = exchange_rows(y_local.index_select(0, back.to(x.device)), counts.recv, counts.send, out_rows=tokens * k,
                          group=self.group)
        out = torch.ops.moepp.combine(x2, y, route.topk_ids, route.topk_weights, plan.slot_row, mix,
                                      self.const_value, *layout_scalars(cfg))
        return out.reshape(x.shape), route.logits
