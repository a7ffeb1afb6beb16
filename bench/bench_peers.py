"""The layer against what CPU and GPU users run without us, same weights, side by
side: the authors' released MoE++ layer (its per-expert Python loop, as the test
double tests/released_moepp.py reproduces it from the spec) at the paper's 0.6B
layout, and transformers' LongcatFlashMoE; forward and forward+backward, with the
layer's GEMMs alone (the gate's and the experts': gemm_floor, bench_layer.expert_gemms) as the
bound under ours, and under theirs wherever both run the same matmul (not in fp32 where ours runs
oneDNN's and theirs MKL's AVX2 kernels: _cpu_matmul)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from bench_layer import expert_gemms
from conftest import device_dtypes, interleaved_ms, round_record, step
from telemetry import nvml_snapshot

from moepp_kernels.integrations import replace_longcat_flash_moe
from moepp_kernels.integrations.released_moepp import replace_moepp_layers

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
import released_moepp  # noqa: E402

QUICK_TOKENS = 128


def released_block(device, dtype, quick: bool):
    """The 0.6B layout (8 FFN + 2 constant + 1 copy + 1 zero, top-2, D 768, I 2048; --quick: D 64,
    I 128) with logits normalisation, as the released layer; and ours, swapped in from the same module."""
    d, i = (64, 128) if quick else (768, 2048)
    torch.manual_seed(0)
    block = released_moepp.MoEBlock(d, i, 12, two_layer=False, logits_norm=True).to(device=device, dtype=dtype)
    holder = torch.nn.Module()
    holder.mlp = copy.deepcopy(block)
    replace_moepp_layers(holder)
    return block, holder.mlp, d


def longcat_block(device, dtype, quick: bool):
    """transformers' LongcatFlashMoE at D 1024 with 64 FFN (I 512) + 32 identity experts, k 6 (--quick:
    D 64, I 32, 16 + 8 experts); and ours."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "LongcatFlashConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no LongCat-Flash")
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    d, i, n = (64, 32, 16) if quick else (1024, 512, 64)
    cfg = transformers.LongcatFlashConfig(hidden_size=d, expert_ffn_hidden_size=i, n_routed_experts=n,
                                          zero_expert_num=n // 2, moe_topk=6, routed_scaling_factor=6.0)
    torch.manual_seed(0)
    block = LongcatFlashMoE(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block = block.to(device=device, dtype=dtype)
    holder = torch.nn.Module()
    holder.mlp = copy.deepcopy(block)
    replace_longcat_flash_moe(holder)
    return block, holder.mlp, d


PEERS = {"moepp-0.6b": (released_block, 4096, "released_loop"), "longcat": (longcat_block, 2048, "hf_longcat")}


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def bench_peers(record_result, quick, device, dtype, peer, mode):
    """fused, the peer and gemm_floor timed in alternating rounds (interleaved_ms): on a VM whose
    speed drifts by tens of percent over minutes, separate runs would compare different machines."""
    build, tokens, peer_name = PEERS[peer]
    tokens = QUICK_TOKENS if quick else tokens
    theirs, ours, d = build(device, dtype, quick)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    fns = {"gemm_floor": expert_gemms(ours.moepp, x, None, backward=mode == "forward_backward")}
    x.requires_grad_(mode != "forward")
    for impl, module in (("fused", ours), (peer_name, theirs)):
        def run(module=module):
            out = module(x)
            return out[0] if isinstance(out, tuple) else out

        fns[impl] = step(run, mode, module, inputs=(x,))
    # forward + backward runs seconds a call on the CPU (transformers' LongCat far longer): fewer rounds, one call each
    clocks = {"nvml_before": nvml_snapshot()} if device == "cuda" else {}
    rounds = interleaved_ms(fns, device, rounds=2 if quick else (5 if mode == "forward" else 3),
                            reps=2 if mode == "forward" else 1)
    if device == "cuda":
        clocks["nvml_after"] = nvml_snapshot()
    case = f"peers {device} {peer} T={tokens} {str(dtype)[6:]} {mode}"
    for impl, round_ms in rounds.items():
        record_result(case, impl, {**round_record(device, round_ms), **clocks})
