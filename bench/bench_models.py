"""Whole models, side by side: a small transformers LongCat-Flash (its own
LongcatFlashMoE modules vs replace_longcat_flash_moe) and a small MoE++ model
with the authors' released layer contract (tests/released_moepp.py, their
per-expert loop, vs replace_moepp_layers); prefill forward and forward+backward,
tokens/s and the ratio with its spread over interleaved rounds."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import device_dtypes, interleaved_ms, round_record, step
from telemetry import nvml_snapshot

from moepp_kernels import replace_moepp_layers
from moepp_kernels.integrations import replace_longcat_flash_moe

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
import released_moepp  # noqa: E402

# (batch, sequence) of the prefill and the model sizes, per device; --quick: the first row's tiny model.
SIZES = {
    "quick": {"tokens": (2, 32), "d": 64, "i": 32, "layers": 2, "n_routed": 8, "n_identity": 4, "top_k": 2},
    "cpu": {"tokens": (2, 512), "d": 512, "i": 256, "layers": 2, "n_routed": 16, "n_identity": 8, "top_k": 4},
    "cuda": {"tokens": (4, 2048), "d": 1024, "i": 512, "layers": 4, "n_routed": 64, "n_identity": 32, "top_k": 6},
}
VOCAB = 1024


def longcat_flash(size: dict):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "LongcatFlashConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no LongCat-Flash")
    heads = 8
    cfg = transformers.LongcatFlashConfig(
        vocab_size=VOCAB, hidden_size=size["d"], num_layers=size["layers"], num_attention_heads=heads,
        num_key_value_heads=heads, ffn_hidden_size=2 * size["d"], expert_ffn_hidden_size=size["i"],
        n_routed_experts=size["n_routed"], zero_expert_num=size["n_identity"], moe_topk=size["top_k"],
        q_lora_rank=size["d"] // 2, kv_lora_rank=size["d"] // 4, qk_nope_head_dim=size["d"] // heads // 2,
        qk_rope_head_dim=size["d"] // heads // 2, v_head_dim=size["d"] // heads, head_dim=size["d"] // heads // 2,
        max_position_embeddings=8192, routed_scaling_factor=6.0)
    return transformers.LongcatFlashForCausalLM(cfg), replace_longcat_flash_moe


def released_moepp_model(size: dict):
    # the paper's layout: FFN experts + 2 constant + 1 copy + 1 zero; the 7B's gating flags
    n = size["n_routed"] + 4
    model = released_moepp.MoeForCausalLM(vocab=VOCAB, d=size["d"], i=size["i"], n=n, layers=size["layers"],
                                          heads=8, logits_norm=True, no_mul_topk=True)
    return model, replace_moepp_layers


MODELS = {"longcat-flash": longcat_flash, "moepp-released": released_moepp_model}


@pytest.mark.parametrize("device, dtype", device_dtypes())
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def bench_model(record_result, quick, device, dtype, model_name, mode):
    """The model with its own MoE modules and with ours swapped in, timed in alternating rounds
    (interleaved_ms): on a VM whose speed drifts, separate runs would compare different machines."""
    size = SIZES["quick" if quick else device]
    torch.manual_seed(0)
    original, swap = MODELS[model_name](size)
    original = original.to(device=device, dtype=dtype)
    swapped = copy.deepcopy(original)
    swap(swapped)
    batch, seq = size["tokens"]
    ids = torch.randint(0, VOCAB, (batch, seq), device=device, generator=torch.Generator().manual_seed(1))
    fns = {}
    for impl, model in (("original", original), ("swapped", swapped)):
        def logits(model=model):
            out = model(ids)
            return out if isinstance(out, torch.Tensor) else out.logits

        model.train(mode != "forward")
        fns[impl] = step(logits, mode, model)
    clocks = {"nvml_before": nvml_snapshot()} if device == "cuda" else {}
    rounds = interleaved_ms(fns, device, rounds=2 if quick else 5, reps=3 if mode == "forward" else 2)
    if device == "cuda":
        clocks["nvml_after"] = nvml_snapshot()
    tokens = batch * seq
    for impl, round_ms in rounds.items():
        record = round_record(device, round_ms)
        record_result(f"model {device} {model_name} T={tokens} {str(dtype)[6:]} {mode}", impl,
                      {**record, **clocks, "tokens": tokens, "tokens_per_s": tokens / (record["median_ms"] * 1e-3)})
