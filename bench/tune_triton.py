"""Retune the Triton backend's tile configurations on this GPU.

    python bench/tune_triton.py            # prints CONFIGS entries for moepp_kernels/triton_ffn.py

For each shape bucket (decode-like "small": few rows per expert; "large":
prefill/training) it times candidate tiles on the MoE++-7B FFN products
(GEMM 1 with the fused gather + SwiGLU, GEMM 2) with CUDA events and prints the
fastest as a CONFIGS line for this architecture. Paste the lines into
triton_ffn.CONFIGS and commit them with the measurement log.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import gpu_time_ms  # noqa: E402

from moepp_kernels import MoEPPConfig, triton_ffn  # noqa: E402

CANDIDATES = [triton_ffn.TileConfig(bm, bn, bk, w, s)
              for bm, bn, bk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4))]
BUCKET_TOKENS = {"small": 64, "large": 16384}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("tune_triton.py needs a GPU")
    cfg = MoEPPConfig.moepp_7b()
    arch = triton_ffn.arch_of(torch.device("cuda"))
    d, i, g, k = cfg.hidden_size, cfg.ffn_size, cfg.n_ffn, cfg.top_k
    up = torch.randn(g, 2 * i, d, device="cuda", dtype=torch.bfloat16) / d**0.5
    down = torch.randn(g, d, i, device="cuda", dtype=torch.bfloat16) / i**0.5
    for bucket, tokens in BUCKET_TOKENS.items():
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        rows = tokens * k
        counts = torch.bincount(torch.randint(0, g, (rows,)), minlength=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).cuda()
        row_src = torch.arange(rows, dtype=torch.int32, device="cuda")
        def ffn(x=x, row_src=row_src, offsets=offsets):
            act = triton_ffn.gate_up_swiglu(x, up, row_src, offsets, k, 1.0, store_h=False)[0]
            return triton_ffn.linear(act, down, offsets)

        best = None
        for cand in CANDIDATES:
            triton_ffn.CONFIGS[(arch, bucket)] = cand
            try:
                ms = gpu_time_ms(ffn, warmup=2, reps=10)["median_ms"]
            except Exception as exc:  # out of shared memory, ...
                print(f"{bucket} {cand}: {type(exc).__name__}", file=sys.stderr)
                continue
            print(f"{bucket} {cand}: {ms:.3f} ms", file=sys.stderr)
            if best is None or ms < best[0]:
                best = (ms, cand)
        print(f'    ("{arch}", "{bucket}"): triton_ffn.{best[1]!r},  # {best[0]:.3f} ms, T={tokens}')


if __name__ == "__main__":
    main()
