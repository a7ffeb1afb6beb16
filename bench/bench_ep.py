"""Expert parallelism on 2 ranks, gloo over CPU processes and, where 2+ GPUs are present,
NCCL with a GPU per rank: per token, the bytes that cross the wire for the MoE++ EP layer
vs a vanilla-MoE EP layer with the same FFN experts and vs "zero-computation slots
remapped to expert 0 with weight 0" (how vLLM / SGLang run LongCat-Flash's
identity experts), over the tau sweep; and the step time (forward + backward, the
slowest rank; the two layers' steps interleaved) MoE++ EP vs vanilla EP against the ideal
FFN-work ratio."""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import step
from synthetic import TAUS, ideal_speedup, target_share, vanilla_config

from moepp_kernels import MoEPPConfig, MoEPPLayer, fused_router
from moepp_kernels.distributed import ExpertParallelMoEPPLayer, expert_ranges

WORLD = 2
SIZES = {"quick": dict(d=64, i=128, tokens=128, reps=2), "full": dict(d=768, i=2048, tokens=2048, reps=5)}
DEADLINE_S = 600


def layout(size: dict) -> MoEPPConfig:
    """The paper's 0.6B layout (8 FFN + 2 constant + 1 copy + 1 zero, top-2) at the bench's D and I."""
    return MoEPPConfig.moepp_0_6b().with_(hidden_size=size["d"], ffn_size=size["i"])


def inputs(cfg: MoEPPConfig, tokens: int, rank: int) -> torch.Tensor:
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(10 + rank))
    x[:, 0] = 1.0  # a constant feature: the gate's column 0 then biases the zero-computation experts' logits
    return x


def full_layer(cfg: MoEPPConfig, zc_bias: float) -> MoEPPLayer:
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.float32)
    with torch.no_grad():
        layer.router.gate_weight[:, 0] = 0.0
        layer.router.gate_weight[cfg.n_ffn:, 0] = zc_bias
    return layer


def zc_share(cfg: MoEPPConfig, layer: MoEPPLayer, x: torch.Tensor) -> float:
    with torch.no_grad():
        ids = fused_router(layer.router.gate_logits(x), cfg).topk_ids
    return (ids >= cfg.n_ffn).float().mean().item()


def calibrate(cfg: MoEPPConfig, tau: float, tokens: int) -> float:
    """The zero-computation bias whose routing sends tau's target share of slots there."""
    x, low, high = inputs(cfg, tokens, 0), -30.0, 30.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if zc_share(cfg, full_layer(cfg, mid), x) < target_share(cfg, tau) else (low, mid)
    return (low + high) / 2


class WireMeter:
    """Wraps dist.all_to_all_single: bytes this rank sends to other ranks (its own chunk stays)."""

    def __init__(self):
        self.bytes = 0
        self.inner = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        rows = input.shape[0]
        splits = input_split_sizes or [rows // dist.get_world_size()] * dist.get_world_size()
        row_bytes = input[:1].numel() * input.element_size()
        self.bytes += (rows - splits[dist.get_rank()]) * row_bytes
        return self.inner(output, input, output_split_sizes, input_split_sizes, **kwargs)


def predicted_bytes(cfg: MoEPPConfig, layer: MoEPPLayer, x: torch.Tensor, rank: int) -> int:
    """The bytes an EP forward should put on the wire for this rank's tokens and no more: a row of x
    to, and a result row back from, each rank holding the expert of one of its FFN slots (summed over
    the ranks, exactly what they send), and its per-expert counts for the other ranks (int64)."""
    ranges = expert_ranges(cfg.n_ffn, WORLD)
    owner = torch.tensor([r for r, (lo, hi) in enumerate(ranges) for _ in range(lo, hi)], device=x.device)
    with torch.no_grad():
        ids = fused_router(layer.router.gate_logits(x), cfg).topk_ids.long()
    ffn = ids < cfg.n_ffn
    remote = int((ffn & (owner[ids.clamp(max=cfg.n_ffn - 1)] != rank)).sum())
    lo, hi = ranges[rank]
    return 2 * remote * x.shape[1] * x.element_size() + (cfg.n_ffn - (hi - lo)) * 8


def step_ms(layers: dict, x: torch.Tensor, reps: int) -> dict:
    """{impl: median step ms of the slowest rank}, the layers' steps (conftest.step's training
    step: forward, then the backward from a fixed upstream gradient) interleaved (a, b, a, b, ...)
    so that the VM's drifting speed weighs on both alike; on a GPU each step is timed from a
    synchronised start to its synchronised end."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x = x.detach().requires_grad_()
    steps = {impl: step(lambda layer=layer: layer(x), "forward_backward", layer, inputs=(x,))
             for impl, layer in layers.items()}
    times = {impl: [] for impl in layers}
    for fn in steps.values():
        fn()
    for _ in range(reps):
        for impl, fn in steps.items():
            sync()
            dist.barrier()
            start = time.perf_counter()
            fn()
            sync()
            times[impl].append(time.perf_counter() - start)
    out = {}
    for impl, t in times.items():
        worst = torch.tensor(statistics.median(t) * 1e3, device=x.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        out[impl] = float(worst)
    return out


def run_rank(rank: int, port: int, backend: str, size: dict, biases: dict, results) -> None:
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        torch.set_num_threads(1)
        meter = WireMeter()
        dist.all_to_all_single = meter
        cfg = layout(size)
        x = inputs(cfg, size["tokens"], rank).to(device)
        out = {}
        expert0_rank = next(r for r, (lo, hi) in enumerate(expert_ranges(cfg.n_ffn, WORLD)) if lo <= 0 < hi)
        for tau, bias in biases.items():
            per_impl, layers = {}, {}
            for impl, c in (("moepp_ep", cfg), ("vanilla_ep", vanilla_config(cfg))):
                full = full_layer(cfg, bias) if impl == "moepp_ep" else None
                if full is None:  # the vanilla layer: the same FFN experts, no zero-computation experts
                    donor = full_layer(cfg, 0.0)
                    full = MoEPPLayer(c, has_residual=False, dtype=torch.float32)
                    with torch.no_grad():
                        full.up.copy_(donor.up)
                        full.down.copy_(donor.down)
                        full.router.gate_weight.copy_(donor.router.gate_weight[:c.n_experts])
                full = full.to(device)
                layers[impl] = layer = ExpertParallelMoEPPLayer.from_layer(full)
                meter.bytes = 0
                with torch.no_grad():
                    layer(x)
                per_impl[impl] = {"fwd_bytes": meter.bytes, "predicted_bytes": predicted_bytes(c, full, x, rank)}
                if impl == "moepp_ep":
                    share = zc_share(cfg, full, x)
                    zc_slots = round(share * size["tokens"] * cfg.top_k)
                    # remapped to expert 0 with weight 0: zc slots travel to expert 0's rank and back
                    extra = 0 if rank == expert0_rank else 2 * zc_slots * cfg.hidden_size * 4
                    per_impl["remap_ep"] = {"fwd_bytes": meter.bytes + extra,
                                            "predicted_bytes": per_impl[impl]["predicted_bytes"] + extra,
                                            "median_ms": float("nan")}
                    per_impl[impl]["measured_ffn_share"] = 1.0 - share
            for impl, ms in step_ms(layers, x, size["reps"]).items():
                per_impl[impl]["median_ms"] = ms
            totals = {}
            for impl, r in per_impl.items():
                b = torch.tensor([float(r["fwd_bytes"]), float(r["predicted_bytes"])], device=device)
                dist.all_reduce(b)
                totals[impl] = {"median_ms": r["median_ms"],
                                "wire_bytes_per_token": float(b[0]) / (WORLD * size["tokens"]),
                                "wire_bytes_vs_predicted": float(b[0] / b[1]) if float(b[1]) else 1.0,
                                **{k: v for k, v in r.items()
                                   if k not in ("fwd_bytes", "predicted_bytes", "median_ms")}}
            out[tau] = totals
        results.put((rank, out))
    except BaseException:  # noqa: B036 (report anything to the parent)
        import traceback

        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def backend_skip(backend: str):
    """Why this backend cannot run here, or None."""
    if not dist.is_available():
        return "needs torch.distributed"
    if backend == "gloo":
        return None if dist.is_gloo_available() else "needs gloo"
    if not dist.is_nccl_available() or torch.cuda.device_count() < WORLD:
        return f"NCCL needs {WORLD} GPUs"
    return None


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def bench_expert_parallel(record_result, quick, backend):
    if backend_skip(backend):
        pytest.skip(backend_skip(backend))
    size = SIZES["quick" if quick else "full"]
    cfg = layout(size)
    biases = {tau: calibrate(cfg, tau, size["tokens"]) for tau in TAUS}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, port, backend, size, biases, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        reports = dict(results.get(timeout=DEADLINE_S) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [r for r in reports.values() if isinstance(r, str)]
    assert not failures, "\n".join(failures)
    for tau, impls in reports[0].items():
        case = f"ep {backend} W={WORLD} 0.6b-layout D={size['d']} T={size['tokens']}/rank tau={tau:.2f}"
        for impl, r in impls.items():
            record_result(case, impl, {"device": "cuda" if backend == "nccl" else "cpu", "tau": tau,
                                       "ideal_speedup": ideal_speedup(cfg, tau),
                                       "target_ffn_share": 1.0 - target_share(cfg, tau), **r})
