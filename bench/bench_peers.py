"""The layer against what CPU and GPU users run without us, same weights, side by
side: the authors' released MoE++ layer (its per-expert Python loop, as the test
double tests/released_moepp.py reproduces it from the spec) at the paper's 0.6B
layout, and transformers' LongcatFlashMoE; forward and forward+backward, with the
experts' GEMMs alone (gemm_floor) as the bound under all of them."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from bench_layer import expert_gemms
from conftest import device_dtypes, step

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
@pytest.mark.parametrize("impl", ["fused", "peer", "gemm_floor"])
def bench_peers(measure, quick, device, dtype, peer, mode, impl):
    build, tokens, peer_name = PEERS[peer]
    tokens = QUICK_TOKENS if quick else tokens
    theirs, ours, d = build(device, dtype, quick)
    layer = ours.moepp
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    case = f"peers {device} {peer} T={tokens} {str(dtype)[6:]} {mode}"
    if impl == "gemm_floor":
        measure(case, impl, device, expert_gemms(layer, x, None, backward=mode == "forward_backward"))
        return
    module = ours if impl == "fused" else theirs

    def run():
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    x.requires_grad_(mode != "forward")
    fn = step(run, mode, lambda out: out.float().square().mean(), module)
    measure(case, "fused" if impl == "fused" else peer_name, device, fn)
