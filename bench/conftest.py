"""Benchmark plumbing: each case runs every implementation in one session, the
ratios are printed side by side at the end and written next to
pytest-benchmark's JSON (--moepp-summary PATH)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from telemetry import environment, nvml_snapshot  # noqa: E402
from timing import copy_bandwidth_gbs, gpu_time_ms  # noqa: E402

_RESULTS: dict = defaultdict(dict)  # case -> impl -> record
_COPY_BW: dict = {}
HAS_GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="smoke run: smallest shapes only")
    parser.addoption("--moepp-summary", default=None, help="write the side-by-side summary JSON here")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no GPU"))]


# Model dtypes benchmarked per device: bf16 on the GPU; on the CPU fp32 and bf16 (the layer's default).
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}
# The router's time beyond the residual GEMM is reported only when it exceeds this fraction of the
# GEMM's own time: below it, it is within the spread of two medians.
BEYOND_GEMM_RESOLUTION = 0.05


def device_dtypes() -> list:
    """(device, dtype) parameters over DTYPES, the GPU ones skipped without a GPU."""
    return [pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}",
                         marks=[pytest.mark.skipif(not HAS_GPU, reason="no GPU")] if device == "cuda" else [])
            for device, dtypes in DTYPES.items() for dtype in dtypes]


def step(run, mode: str, module: torch.nn.Module | None = None, inputs: tuple = ()):
    """What measure times: run() under no_grad for mode "forward"; else run() and the backward
    of its outputs that require grad from a fixed upstream gradient each (unit normal, drawn on
    the first call), after setting the grads of `module`'s parameters and of `inputs` to None
    (a training step's start). Not a loss: a loss's own ops (an fp32 copy of the output, its
    square, the mean's backward, with fresh [T, D] buffers every step) are no layer's work, cost
    every implementation alike and so only dilute the ratios; a unit-scale gradient also keeps
    the backward clear of the denormals a mean's tiny gradient can produce."""
    if mode == "forward":
        def fn():
            with torch.no_grad():
                return run()
        return fn

    upstream: list = []

    def fn():
        if module is not None:
            module.zero_grad(set_to_none=True)
        for tensor in inputs:
            tensor.grad = None
        out = run()
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not upstream:
            gen = torch.Generator().manual_seed(2)
            upstream.extend(torch.randn(o.shape, generator=gen).to(o) for o in outs)
        torch.autograd.backward(outs, upstream)
    return fn


def interleaved_ms(fns: dict, device: str, rounds: int, reps: int = 2) -> dict:
    """Times several implementations of one case in alternating rounds (a, b, c, a, b, c, ...),
    so that a machine whose speed drifts (a shared VM, a GPU's clocks) weighs on all of them
    alike: {impl: [ms per round]}. A round's time is the best of `reps` calls on the CPU, the
    CUDA-event median (timing.gpu_time_ms) on a GPU; one warm-up call each first."""
    for fn in fns.values():
        fn()
    out = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, fn in fns.items():
            if device == "cuda":
                out[impl].append(gpu_time_ms(fn, warmup=1, reps=max(reps, 5))["median_ms"])
                continue
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            out[impl].append(best * 1e3)
    return out


def copy_bandwidth(device: str) -> float:
    if device not in _COPY_BW:
        _COPY_BW[device] = copy_bandwidth_gbs(device)
    return _COPY_BW[device]


def record_bandwidth(record: dict, device: str, bytes_moved: int) -> None:
    """Adds the bytes a call moves, the bandwidth that achieves and its share of a copy's."""
    record["bytes_moved"] = bytes_moved
    record["achieved_gbs"] = bytes_moved / (record["median_ms"] * 1e-3) / 1e9
    record["copy_gbs"] = copy_bandwidth(device)
    record["fraction_of_copy_bw"] = record["achieved_gbs"] / record["copy_gbs"]


@pytest.fixture
def measure(benchmark):
    """measure(case, impl, device, fn, bytes_moved): times fn, records the result."""

    def run(case: str, impl: str, device: str, fn, bytes_moved: int | None = None, flops: int | None = None,
            extra: dict | None = None) -> None:
        benchmark.group = case
        benchmark.name = impl
        record = {"device": device}
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base  # activations + outputs of one call
            record["nvml_before"] = nvml_snapshot()
            timing = gpu_time_ms(fn)
            record["nvml_after"] = nvml_snapshot()
            record.update(timing)

            def synced():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
        else:
            benchmark.pedantic(fn, rounds=5 if bytes_moved is None or bytes_moved < 2**28 else 3, warmup_rounds=1)
            stats = benchmark.stats.stats
            record.update({"median_ms": stats.median * 1e3, "min_ms": stats.min * 1e3, "max_ms": stats.max * 1e3,
                           "stdev_ms": stats.stddev * 1e3, "reps": stats.rounds})
        record.update(extra or {})
        if "tokens" in record:
            record["tokens_per_s"] = record["tokens"] / (record["median_ms"] * 1e-3)
        if "weight_read_ms" in record:
            record["weight_read_ratio"] = record["median_ms"] / record["weight_read_ms"]
        if flops:
            record["flops"] = flops
            record["tflops"] = flops / (record["median_ms"] * 1e-3) / 1e12
        if bytes_moved:
            record_bandwidth(record, device, bytes_moved)
        benchmark.extra_info.update(record)
        _RESULTS[case][impl] = record

    return run


@pytest.fixture
def record_result():
    """record_result(case, impl, record): a result measured elsewhere (e.g. by spawned ranks,
    with median_ms in record), reported side by side like measure's."""

    def run(case: str, impl: str, record: dict) -> None:
        _RESULTS[case][impl] = record

    return run


def round_record(device: str, round_ms: list) -> dict:
    """A record_result record from interleaved_ms's per-round times."""
    return {"device": device, "median_ms": statistics.median(round_ms), "min_ms": min(round_ms),
            "max_ms": max(round_ms), "reps": len(round_ms), "round_ms": round_ms}


def _derived(impls: dict) -> dict:
    """Speedup of fused over reference, MoE++ over vanilla (with the ideal and the
    paper's), grouped GEMMs' efficiency against dense, parts' share of the layer."""
    out = {}
    ms = {k: v["median_ms"] for k, v in impls.items()}
    rounds = {k: v.get("round_ms") for k, v in impls.items()}
    if "fused" in ms and "torch_ops" in ms:  # against the plain op sequence a user would write
        out["speedup_vs_torch_ops"] = ms["torch_ops"] / ms["fused"]
        if rounds["fused"] and rounds["torch_ops"]:  # measured interleaved: the ratio round by round
            out["speedup_vs_torch_ops_rounds"] = [t / f for t, f in zip(rounds["torch_ops"], rounds["fused"])]
        if "residual_gemm" in ms:  # the product both run, each its own way: a bound, and the rest's ratio
            fused_gemm = ms.get("residual_gemm_fused", ms["residual_gemm"])  # absent where both run torch.addmm
            out["torch_ops_bound"] = ms["torch_ops"] / fused_gemm
            beyond = ms["fused"] - fused_gemm
            if beyond > BEYOND_GEMM_RESOLUTION * fused_gemm:  # else it is lost in the GEMM's spread
                out["speedup_vs_torch_ops_beyond_gemm"] = (ms["torch_ops"] - ms["residual_gemm"]) / beyond
    if "fused" in ms and "reference" in ms:
        out["speedup"] = ms["reference"] / ms["fused"]
        if "gemm_floor" in ms:  # the reference over the layer's GEMMs: the fused layer cannot beat that ratio
            out["speedup_bound"] = ms["reference"] / ms["gemm_floor"]
    for backend in ("triton", "cutlass"):
        if f"fused_{backend}" in ms and "reference" in ms:
            out[f"speedup_{backend}"] = ms["reference"] / ms[f"fused_{backend}"]
    if "moepp" in ms and "vanilla" in ms:
        moepp = impls["moepp"]
        out["speedup_vs_vanilla"] = ms["vanilla"] / ms["moepp"]
        out["ideal_speedup"] = moepp["ideal_speedup"]
        out["fraction_of_ideal"] = out["speedup_vs_vanilla"] / moepp["ideal_speedup"]
        out["paper_speedup"] = moepp["paper_speedup"]
        out["target_zc_share"] = moepp["target_zc_share"]
        out["measured_zc_share"] = moepp["measured_zc_share"]
    if "moepp_ep" in ms and "vanilla_ep" in ms:  # expert parallelism: wire bytes and step time
        moepp, vanilla = impls["moepp_ep"], impls["vanilla_ep"]
        out["speedup_vs_vanilla_ep"] = ms["vanilla_ep"] / ms["moepp_ep"]
        out["ideal_speedup"] = moepp["ideal_speedup"]
        out["fraction_of_ideal"] = out["speedup_vs_vanilla_ep"] / moepp["ideal_speedup"]
        out["bytes_vs_vanilla_ep"] = moepp["wire_bytes_per_token"] / vanilla["wire_bytes_per_token"]
        out["ffn_share"] = moepp["measured_ffn_share"]
        if "wire_bytes_vs_predicted" in moepp:  # 1.0: only remote FFN rows and the counts crossed the wire
            out["bytes_vs_predicted"] = {k: impls[k]["wire_bytes_vs_predicted"] for k in ("moepp_ep", "vanilla_ep")}
        if "remap_ep" in impls:
            out["bytes_vs_remap_ep"] = moepp["wire_bytes_per_token"] / impls["remap_ep"]["wire_bytes_per_token"]
    for peer in ("released_loop", "hf_longcat"):  # the layer against what users run without us
        if "fused" in ms and peer in ms:
            out["speedup_vs_peer"] = ms[peer] / ms["fused"]
            out["peer"] = peer
            if "gemm_floor" in ms:
                out["fraction_of_gemm_floor"] = ms["gemm_floor"] / ms["fused"]
            if rounds["fused"] and rounds[peer]:  # measured interleaved: the ratio round by round
                out["speedup_vs_peer_rounds"] = [p / f for p, f in zip(rounds[peer], rounds["fused"])]
                if rounds.get("gemm_floor"):
                    out["fraction_of_gemm_floor_rounds"] = [g / f for g, f in zip(rounds["gemm_floor"],
                                                                                   rounds["fused"])]
    if "original" in ms and "swapped" in ms:  # a whole model, its own MoE modules vs ours swapped in
        out["speedup_vs_original"] = ms["original"] / ms["swapped"]
        if rounds["original"] and rounds["swapped"]:  # measured interleaved: the ratio round by round
            out["speedup_vs_original_rounds"] = [o / s for o, s in zip(rounds["original"], rounds["swapped"])]
    if "dense" in ms:
        out["efficiency_vs_dense"] = {k: ms["dense"] / v for k, v in ms.items() if k != "dense"}
    if "layer" in impls:
        total = impls["layer"]["median_ms"]
        out["share_of_layer"] = {k: v["median_ms"] / total for k, v in impls.items() if k != "layer"}
        out["share_of_layer"]["router+plan+combine"] = sum(
            impls[k]["median_ms"] for k in ("router", "plan", "combine") if k in impls) / total
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("moepp_kernels: side by side (median ms)")
    tr.write_line(f"{'case':<46} {'impl':<19} {'median ms':>10} {'GB/s':>8} {'of copy':>8}  derived")
    env = environment()
    if HAS_GPU:
        env["nvml"] = nvml_snapshot(torch.cuda.current_device())
    summary = {"environment": env, "cases": {}}
    for case, impls in _RESULTS.items():
        derived = _derived(impls)
        summary["cases"][case] = {"impls": impls, **derived}
        for impl, r in impls.items():
            gbs = f"{r['achieved_gbs']:.1f}" if "achieved_gbs" in r else "-"
            frac = f"{100 * r['fraction_of_copy_bw']:.0f}%" if "fraction_of_copy_bw" in r else "-"
            note = ""
            if impl == "fused" and "speedup_vs_peer" in derived:
                note = f"{derived['speedup_vs_peer']:.2f}x {derived['peer']}"
                if "fraction_of_gemm_floor" in derived:
                    note += f", {derived['fraction_of_gemm_floor']:.2f} of the GEMMs-alone floor"
            elif impl == "fused" and "speedup" in derived:
                note = f"speedup {derived['speedup']:.2f}x over reference"
                if "speedup_vs_torch_ops" in derived:
                    note += f", {derived['speedup_vs_torch_ops']:.2f}x the plain torch ops"
                    if "speedup_vs_torch_ops_rounds" in derived:
                        by_round = derived["speedup_vs_torch_ops_rounds"]
                        note += f" ({min(by_round):.2f}-{max(by_round):.2f} by round)"
                if "torch_ops_bound" in derived:
                    beyond = derived.get("speedup_vs_torch_ops_beyond_gemm")
                    note += (f" (bound {derived['torch_ops_bound']:.2f}x by the fused router's residual GEMM; "
                             + (f"beyond each side's GEMM {beyond:.2f}x)" if beyond is not None
                                else "the rest too small to time beside it)"))
            elif impl.startswith("fused_") and f"speedup_{impl[6:]}" in derived:
                note = f"speedup {derived[f'speedup_{impl[6:]}']:.2f}x over reference"
            elif impl == "moepp" and "speedup_vs_vanilla" in derived:
                paper = derived["paper_speedup"]
                note = (f"{derived['speedup_vs_vanilla']:.2f}x vanilla (ideal {derived['ideal_speedup']:.2f}x, "
                        f"paper {'-' if paper is None else f'{paper:.2f}x'}; zc share "
                        f"{derived['measured_zc_share']:.3f} for {derived['target_zc_share']:.3f})")
            elif impl == "moepp_ep" and "speedup_vs_vanilla_ep" in derived:
                note = (f"{derived['speedup_vs_vanilla_ep']:.2f}x vanilla EP (ideal {derived['ideal_speedup']:.2f}x); "
                        f"wire bytes {derived['bytes_vs_vanilla_ep']:.3f}x vanilla EP's (FFN share "
                        f"{derived['ffn_share']:.3f})"
                        + (f", {derived['bytes_vs_remap_ep']:.3f}x remap-to-expert-0's"
                           if "bytes_vs_remap_ep" in derived else "")
                        + (f"; {derived['bytes_vs_predicted']['moepp_ep']:.4f}x its remote FFN rows + counts"
                           if "bytes_vs_predicted" in derived else ""))
            elif impl == "swapped" and "speedup_vs_original" in derived:
                note = f"{derived['speedup_vs_original']:.2f}x the model's own MoE modules"
                if "speedup_vs_original_rounds" in derived:
                    by_round = derived["speedup_vs_original_rounds"]
                    note += f" ({min(by_round):.2f}-{max(by_round):.2f} by round)"
            elif "share_of_layer" in derived and impl in derived["share_of_layer"]:
                note = f"{100 * derived['share_of_layer'][impl]:.1f}% of layer"
            elif "efficiency_vs_dense" in derived and impl in derived["efficiency_vs_dense"]:
                note = f"{derived['efficiency_vs_dense'][impl]:.2f}x dense"
            if "peak_memory_bytes" in r and case.startswith("layer ") and "backward" in case:
                note += f" peak {r['peak_memory_bytes'] / 2**20:.0f} MiB"
            if "tflops" in r:
                note += f" {r['tflops']:.1f} TFLOP/s"
            if "tokens_per_s" in r:
                note += f" {r['tokens_per_s']:,.0f} tokens/s"
            if "weight_read_ratio" in r:
                note += f" {r['weight_read_ratio']:.2f}x the weight-read time"
            if any((r.get(k) or {}).get("throttled") for k in ("nvml_before", "nvml_after")):
                note += " [THROTTLED]"
            tr.write_line(f"{case:<46} {impl:<19} {r['median_ms']:>10.4f} {gbs:>8} {frac:>8}  {note}")
        if "share_of_layer" in derived:
            tr.write_line(f"{case:<46} {'r+p+c':<19} {'':>10} {'':>8} {'':>8}  "
                          f"{100 * derived['share_of_layer']['router+plan+combine']:.1f}% of layer")
    path = config.getoption("--moepp-summary")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, default=str))
        tr.write_line(f"summary written to {path}")
