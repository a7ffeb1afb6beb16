"""What each rank runs in the expert-parallel tests (test_distributed_ep.py spawns
the ranks): every case compares the expert-parallel layer with the single-device
MoEPPLayer on the same tokens, forward and backward."""

from __future__ import annotations

import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from moepp_kernels import MoEPPConfig, MoEPPLayer
from moepp_kernels.distributed import ExpertParallelMoEPPLayer

# 6 FFN experts: an uneven split over 4 ranks (2, 2, 1, 1). fp32 throughout.
CFG = MoEPPConfig(hidden_size=16, ffn_size=8, n_ffn=6, n_constant=2, n_copy=1, n_zero=1, top_k=2,
                  normalize_logits=True, scale_input_by_topk=True)
SENT: list[int] = []  # elements each all_to_all_single of this rank sent (recorded by the wrapper below)
DEVICE = torch.device("cpu")  # this rank's device: cuda:<rank> with NCCL


def _recording(all_to_all):
    def wrapped(output, input, *args, **kwargs):
        SENT.append(input.numel())
        return all_to_all(output, input, *args, **kwargs)
    return wrapped


def full_layer(cfg: MoEPPConfig, seed: int, has_residual: bool = True) -> MoEPPLayer:
    torch.manual_seed(seed)  # the same weights on every rank
    layer = MoEPPLayer(cfg, has_residual=has_residual, dtype=torch.float32).to(DEVICE)
    if has_residual:
        with torch.no_grad():
            layer.router.residual_weight.normal_(std=0.3)
    return layer


def close(a, b, what: str) -> None:
    """Equal to 1e-5 relative, entries near zero judged against the tensor's largest entry (the
    grouped rows' order differs from the single-device layer's, so do BLAS's summation orders)."""
    atol = 1e-5 * float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}")


def compare(layers: list[MoEPPLayer], tokens: int, rank: int, x_fill=None) -> None:
    """Chain `layers` (single device) and their expert-parallel shards on this rank's tokens;
    outputs, logits and every gradient must agree."""
    eps = [ExpertParallelMoEPPLayer.from_layer(layer) for layer in layers]
    g = torch.Generator().manual_seed(100 + rank)
    x = (torch.randn(tokens, CFG.hidden_size, generator=g) if x_fill is None else x_fill(tokens)).to(DEVICE)
    w = torch.randn(tokens, CFG.hidden_size, generator=g).to(DEVICE)
    results = []
    for stack in (layers, eps):
        xi = x.clone().requires_grad_()
        h, logits = xi, None
        for layer in stack:
            h, logits = layer(h, logits)
        ((h * w).sum() + logits.sum()).backward()
        results.append((h.detach(), logits.detach(), xi.grad))
    for (a, b, name) in zip(results[1], results[0], ("out", "logits", "x.grad")):
        close(a, b, name)
    for i, (layer, ep) in enumerate(zip(layers, eps)):
        for name, p in ep.named_parameters():
            if name in ("up", "down"):
                continue
            ref = layer.get_parameter(name).grad
            if ref is None:
                assert p.grad is None, f"layer {i} {name}: a grad where the single-device layer has none"
            else:
                close(p.grad, ref, f"layer {i} {name}.grad (this rank's part)")
        lo, hi = ep.expert_range
        for name in ("up", "down"):
            total = layer.get_parameter(name).grad.clone()
            dist.all_reduce(total)  # the single-device gradients of every rank's tokens, summed
            close(ep.get_parameter(name).grad, total[lo:hi], f"layer {i} {name}.grad (owned experts)")


def case_uneven_tokens(rank, world):
    compare([full_layer(CFG, 0)], tokens=5 + 3 * rank, rank=rank)


def case_rank_without_tokens(rank, world):
    compare([full_layer(CFG, 1)], tokens=0 if rank == 1 else 7, rank=rank)


def case_no_tokens_anywhere(rank, world):
    compare([full_layer(CFG, 2)], tokens=0, rank=rank)


def case_residual_chain_two_layers(rank, world):
    compare([full_layer(CFG, 3, has_residual=False), full_layer(CFG, 4)], tokens=6 + rank, rank=rank)


def case_all_to_zero_computation_experts(rank, world):
    layer = full_layer(CFG, 5, has_residual=False)
    with torch.no_grad():  # positive x and gates that only the zero-computation experts' rows see
        layer.router.gate_weight[:CFG.n_ffn] = -1.0
        layer.router.gate_weight[CFG.n_ffn:] = torch.linspace(1.0, 2.0, CFG.n_experts - CFG.n_ffn,
                                                              device=DEVICE)[:, None]
    SENT.clear()
    compare([layer], tokens=9, rank=rank, x_fill=lambda t: torch.rand(t, CFG.hidden_size) + 0.5)
    # forward: the counts (n_ffn int64), then two empty row exchanges; the backward: two empty ones
    assert SENT == [CFG.n_ffn, 0, 0, 0, 0], f"rank {rank} sent {SENT}"


def case_all_to_one_ranks_experts(rank, world):
    layer = full_layer(CFG, 6, has_residual=False)
    with torch.no_grad():  # every token to experts 0 and 1 (rank 0's)
        layer.router.gate_weight[:2] = torch.tensor([2.0, 1.5], device=DEVICE)[:, None]
        layer.router.gate_weight[2:] = -1.0
    compare([layer], tokens=8, rank=rank, x_fill=lambda t: torch.rand(t, CFG.hidden_size) + 0.5)


def case_checkpoint_shard_and_gather_round_trip(rank, world):
    layer = full_layer(CFG.with_(gate_depth=2), 7)
    released = layer.to_moepp_state_dict(prefix="model.layers.1.mlp.")
    lo, hi = ExpertParallelMoEPPLayer.from_layer(layer).expert_range
    # a rank reads only its own FFN experts (and what is replicated)
    mine = {k: v for k, v in released.items()
            if ".experts.experts." not in k or not int(k.split(".experts.experts.")[1].split(".")[0]) < CFG.n_ffn
            or lo <= int(k.split(".experts.experts.")[1].split(".")[0]) < hi}
    ep = ExpertParallelMoEPPLayer.from_moepp_state_dict(mine, layer.config, prefix="model.layers.1.mlp.")
    assert ep.expert_range == (lo, hi)
    assert torch.equal(ep.up, layer.up[lo:hi]) and torch.equal(ep.down, layer.down[lo:hi])
    back = ep.to_layer()
    for name, t in layer.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert set(back.to_moepp_state_dict()) == {k[len("model.layers.1.mlp."):] for k in released}


def case_capacity_fixed_splits(rank, world):
    cfg = CFG.with_(capacity_factor=0.8)  # below 1: some slots are dropped
    layer = full_layer(cfg, 8)
    SENT.clear()
    compare([layer], tokens=12, rank=rank)  # the same T on every rank, as capacity mode requires
    # no count exchange (the rows travel by functional collectives, of sizes fixed by T)
    assert SENT == [], f"rank {rank} exchanged counts: {SENT}"
    # and the step traces whole: torch.compile(fullgraph=True), forward and backward
    ep = ExpertParallelMoEPPLayer.from_layer(layer)
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(rank)).to(DEVICE)
    eager_out, eager_logits = ep(x)
    compiled = torch.compile(ep, fullgraph=True, backend="aot_eager")
    out, logits = compiled(x)
    close(out, eager_out, "compiled out")
    close(logits, eager_logits, "compiled logits")
    out.square().sum().backward()
    assert ep.up.grad is not None and torch.isfinite(ep.up.grad).all()


def case_fewer_experts_than_ranks(rank, world):
    # 3 FFN experts: at W = 4 the last rank holds none (it still routes, sends and combines)
    compare([full_layer(CFG.with_(n_ffn=3), 9)], tokens=5 + rank, rank=rank)


def case_capacity_needs_equal_tokens(rank, world):
    ep = ExpertParallelMoEPPLayer.from_layer(full_layer(CFG.with_(capacity_factor=1.1), 10))
    try:
        ep(torch.randn(4 + rank, CFG.hidden_size).to(DEVICE))
    except ValueError as e:  # raised on every rank alike, before any row moves
        assert "same number of tokens on every rank" in str(e), str(e)
    else:
        raise AssertionError("different T per rank in capacity mode was not refused")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def run_rank(rank: int, world: int, port: int, names: list[str], results, backend: str = "gloo") -> None:
    """One rank: join the group (every collective under its timeout), run the cases."""
    global DEVICE
    try:
        if backend == "nccl":
            DEVICE = torch.device("cuda", rank)
            torch.cuda.set_device(DEVICE)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        dist.all_to_all_single = _recording(dist.all_to_all_single)
        torch.set_num_threads(1)
        for name in names:
            CASES[name](rank, world)
            dist.barrier()
        results.put((rank, None))
    except BaseException:  # noqa: B036 (report anything to the parent, then stop)
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
