"""The token exchange of expert parallelism (torch.distributed all-to-alls with
autograd), kept apart from the layer: the count exchange with the step's one host
sync, the row exchange and its reverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def expert_ranges(n_ffn: int, world: int) -> list[tuple[int, int]]:
    """[lo, hi) of the FFN experts each rank holds: contiguous, the first n_ffn % world
    ranks one expert more (a rank may hold none when n_ffn < world)."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    base, extra = divmod(n_ffn, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (r < extra))
    return list(zip(bounds, bounds[1:]))


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over rows with uneven splits; the backward is the reverse exchange.
    The output has `out_rows` rows (>= the rows received; the rest are left unwritten)."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], out_rows: int, group) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.in_rows = send, recv, group, x.shape[0]
        out = x.new_empty((out_rows, *x.shape[1:]))
        dist.all_to_all_single(out[:sum(recv)], x[:sum(send)].contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        sent = sum(ctx.send)
        grad_x = grad.new_empty((ctx.in_rows, *grad.shape[1:]))
        grad_x[sent:].zero_()  # rows that never left have no gradient from here
        dist.all_to_all_single(grad_x[:sent], grad[:sum(ctx.recv)].contiguous(), ctx.send, ctx.recv,
                               group=ctx.group)
        return grad_x, None, None, None, None


def exchange_rows(x: Tensor, send: list[int], recv: list[int], out_rows: int | None = None,
                  group=None) -> Tensor:
    """Rows x[:sum(send)] go out, send[r] of them to rank r in rank order; returns the
    rows received ([out_rows or sum(recv), ...], recv[r] from rank r in rank order).
    Differentiable: the gradient takes the reverse exchange."""
    return _AllToAll.apply(x, send, recv, sum(recv) if out_rows is None else out_rows, group)


def exchange_fixed_rows(x: Tensor, send: list[int], recv: list[int], group=None) -> Tensor:
    """exchange_rows for splits fixed in advance (expert capacity), through torch's functional
    collectives, so that torch.compile(fullgraph=True) traces it and autograd reverses it."""
    return funcol.all_to_all_single_autograd(x, recv, send, group if group is not None else dist.group.WORLD)


@dataclass(frozen=True)
class DispatchCounts:
    """Host-side row counts of one step. send[r]: rows this rank sends rank r.
    recv[r]: rows it receives from rank r. recv_per_expert[r][e]: of those, the rows
    for this rank's local expert e (the received rows are rank-major, expert-major
    within a rank)."""

    send: list[int]
    recv: list[int]
    recv_per_expert: list[list[int]]


def exchange_counts(offsets: Tensor, ranges: list[tuple[int, int]], group=None) -> DispatchCounts:
    """From this rank's plan offsets [n_ffn + 1] (device), the counts every rank needs:
    one small all-to-all of per-(rank, local expert) counts, then ONE copy to the host,
    the only host sync of an expert-parallel step (the row exchange needs its sizes)."""
    per_expert = (offsets[1:] - offsets[:-1]).to(torch.int64)
    local = ranges[dist.get_rank(group)]
    split = [hi - lo for lo, hi in ranges]
    received = per_expert.new_empty(len(ranges) * (local[1] - local[0]))
    dist.all_to_all_single(received, per_expert, [local[1] - local[0]] * len(ranges), split, group=group)
    host = torch.cat([per_expert, received]).tolist()
    mine, theirs = host[:len(per_expert)], host[len(per_expert):]
    n_local = local[1] - local[0]
    recv_per_expert = [theirs[r * n_local:(r + 1) * n_local] for r in range(len(ranges))]
    return DispatchCounts(send=[sum(mine[lo:hi]) for lo, hi in ranges], recv=[sum(c) for c in recv_per_expert],
                          recv_per_expert=recv_per_expert)


def expert_major_order(recv_per_expert: list[list[int]]) -> tuple[Tensor, list[int]]:
    """The received rows' indices in expert-major order (rank-major within an expert),
    and the local experts' group offsets in that order."""
    counts = torch.tensor(recv_per_expert, dtype=torch.int64).reshape(len(recv_per_expert), -1)  # [W, L]
    start = (counts.flatten().cumsum(0) - counts.flatten()).reshape(counts.shape)  # rank-major block starts
    block_counts, block_starts = counts.t().flatten(), start.t().flatten()
    total = int(counts.sum())
    first_of_block = block_counts.cumsum(0) - block_counts
    order = torch.repeat_interleave(block_starts - first_of_block, block_counts) + torch.arange(total)
    offsets = [0, *counts.sum(0).cumsum(0).tolist()]
    return order, offsets
