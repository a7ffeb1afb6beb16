"""An expert-parallel MoE++ layer over a torch.distributed process group.

Rank r holds a contiguous range of the FFN experts (`expert_ranges`); the router
(gate weights, G, selection bias) and the constant / copy / zero experts are
replicated on every rank. Per step (spec: the MoE++ deployment argument): route
and plan locally; only FFN slots travel: their token rows (model dtype) go to the
ranks owning their experts, whose FFN gathers them expert-major with x*k folded
in (one pass), and come back by the reverse exchange; the combine
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
from ..capacity import expert_capacity, slot_positions
from ..checkpoint import RESIDUAL, load_entries, model_tensor, moepp_entries
from ..config import MoEPPConfig
from ..layer import MoEPPLayer, _route_tokens
from ..permute import CHECK_INDICES, PermutationPlan, build_plan
from ..router import MoEPPRouter
from .exchange import exchange_counts, exchange_fixed_rows, exchange_rows, expert_major_order, expert_ranges


def _local_plan(offsets: Tensor, order: Tensor) -> tuple[PermutationPlan, Tensor]:
    """The plan under which the local FFN reads the received rows in `order` (its row r is
    received row order[r]: one slot per row, top_k 1), so the FFN's own gather does the
    reordering (and x*k) in its one pass; and the inverse order, which takes the FFN's
    output rows back to the order received."""
    order = order.to(device=offsets.device, dtype=torch.int32)
    back = torch.empty_like(order)
    back[order.long()] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return PermutationPlan(offsets, order, back.reshape(-1, 1)), back.long()


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

    Host syncs: the exchange makes one per forward, copying the per-(rank, expert) row
    counts to the host (the row exchange needs its sizes); its backward adds none. With
    expert capacity (config.capacity_factor) it makes none: every split is fixed by T and
    the layout (each expert gets C_ffn rows from every rank), so every rank must have the
    same T (checked on the CPU, and on CUDA with MOEPP_CHECK_INDICES=1). The local FFN
    adds what its grouped-GEMM backend needs: `torch` reads the group offsets on the host,
    `triton` on the device; with `triton` and capacity the step has no host sync at all
    and can be captured in a CUDA graph.
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
        experts = expert_ranges(config.n_ffn, dist.get_world_size(group))[dist.get_rank(group)]
        own, entries = moepp_entries(state_dict, config, prefix, experts)
        ref = model_tensor(own, entries)
        if ref is None and dtype is None:
            raise ValueError("state_dict: this rank holds no FFN or constant expert to read the model dtype from; "
                             "pass dtype=")
        device = (own[entries[0][0]] if ref is None else ref).device
        ep = cls(config, group, has_residual=RESIDUAL in own, dtype=dtype or ref.dtype, device=device,
                 gemm_backend=gemm_backend)
        load_entries(ep, own, entries, prefix)
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
        route, mix = _route_tokens(x2, cfg, getattr(r, "gate_weight", None), getattr(r, "gate_w1", None),
                                   getattr(r, "gate_w2", None), self.const_gate, r.residual_weight, r.selection_bias,
                                   prev_logits)
        if cfg.capacity_factor is not None:
            y, slot_row = self._experts_at_capacity(x2, route.topk_ids, backend)
            out = torch.ops.moepp.combine(x2, y, route.topk_ids, route.topk_weights, slot_row, mix,
                                          self.const_value, *layout_scalars(cfg))
            return out.reshape(x.shape), route.logits
        plan = build_plan(route.topk_ids, cfg.n_ffn)
        counts = exchange_counts(plan.offsets, self.ranges, self.group)  # the one host sync
        sent = sum(counts.send)
        # Only FFN slots' rows leave this rank, already ordered by expert and so by owning rank.
        rows_out = x2.index_select(0, plan.row_src[:sent].long() // k)
        rows_in = exchange_rows(rows_out, counts.send, counts.recv, group=self.group)
        order, local_offsets = expert_major_order(counts.recv_per_expert)
        offsets = torch.tensor(local_offsets, dtype=torch.int32, device=x.device)
        local_plan, back = _local_plan(offsets, order)
        y_local = apply_expert_ffn(rows_in, self.up, self.down, local_plan, 1, scale, backend)
        # Results go back in the order they came, and land in this rank's plan rows ([T * k, D] as the combine reads).
        y = exchange_rows(y_local.index_select(0, back), counts.recv, counts.send, out_rows=tokens * k,
                          group=self.group)
        out = torch.ops.moepp.combine(x2, y, route.topk_ids, route.topk_weights, plan.slot_row, mix,
                                      self.const_value, *layout_scalars(cfg))
        return out.reshape(x.shape), route.logits

    def _experts_at_capacity(self, x2: Tensor, topk_ids: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        """The FFN slots' outputs with expert capacity: every expert gets exactly C_ffn rows
        from every rank (its kept slots, then zero rows), so every split is fixed by T and
        the layout alone: no count exchange, no host sync (every rank must have the same T).
        Returns y [T * k, D] in slot order and slot_row [T, k] for the combine."""
        cfg, k, d = self.config, self.config.top_k, self.config.hidden_size
        tokens, slots = x2.shape[0], topk_ids.numel()
        if not torch.compiler.is_compiling() and (x2.device.type == "cpu" or CHECK_INDICES):
            self._check_equal_tokens(tokens, x2.device)
        cap, _ = expert_capacity(cfg, tokens)
        dev = x2.device
        flat = topk_ids.reshape(-1).long()
        is_ffn = flat < cfg.n_ffn
        # after the drop, every kept slot's place is < C; row e * C + place of the send buffer, the rest a spare row
        dest = torch.where(is_ffn, flat * cap + slot_positions(topk_ids, cfg.n_experts).reshape(-1),
                           torch.full_like(flat, cfg.n_ffn * cap))
        slot_of_row = torch.full((cfg.n_ffn * cap + 1,), slots, dtype=torch.long, device=dev).scatter_(
            0, dest, torch.arange(slots, device=dev))[:-1]
        x_ext = torch.cat([x2, x2.new_zeros(1, d)])  # row T: the zero row of unused places
        token_of_row = torch.where(slot_of_row < slots, slot_of_row // k, torch.full_like(slot_of_row, tokens))
        rows_out = x_ext.index_select(0, token_of_row)
        n_local = self.expert_range[1] - self.expert_range[0]
        send = [(hi - lo) * cap for lo, hi in self.ranges]
        recv = [n_local * cap] * self.world
        rows_in = exchange_fixed_rows(rows_out, send, recv, group=self.group)
        # received rank-major [W, n_local, C]; the FFN reads them expert-major [n_local, W, C]
        order = torch.arange(rows_in.shape[0], device=dev).reshape(self.world, n_local, cap).transpose(0, 1)
        per_expert = self.world * cap
        offsets = torch.arange(n_local + 1, dtype=torch.int32, device=dev) * per_expert
        local_plan, _ = _local_plan(offsets, order.reshape(-1))
        y_local = apply_expert_ffn(rows_in, self.up, self.down, local_plan, 1, cfg.input_scale, backend)
        y_back = y_local.reshape(n_local, self.world, cap, d).transpose(0, 1).reshape(-1, d)
        y_rows = exchange_fixed_rows(y_back, recv, send, group=self.group)  # [n_ffn * C, D], expert-major
        y = torch.cat([y_rows, y_rows.new_zeros(1, d)]).index_select(0, dest)
        slot_row = torch.where(is_ffn, torch.arange(slots, device=dev), torch.full_like(flat, -1))
        return y, slot_row.to(torch.int32).reshape(topk_ids.shape)

    def _check_equal_tokens(self, tokens: int, device: torch.device) -> None:
        """ValueError on every rank unless all ranks have `tokens` tokens (capacity mode's splits
        are computed from T, so different T would mismatch them: a hang or garbage on NCCL)."""
        both = torch.tensor([tokens, -tokens], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        most, fewest = int(both[0]), -int(both[1])
        if most != fewest:
            raise ValueError(f"x: expert capacity needs the same number of tokens on every rank; this rank has "
                             f"{tokens}, the group between {fewest} and {most}")
