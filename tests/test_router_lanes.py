"""The CUDA router's warp-slice execution, run on the CPU: LANES threads share each
token as the lanes of a warp slice do (csrc/router/router_lanes.cpp), so element
ownership (j % LANES), the butterfly sum / max / best and the barriers of
router_math.h execute here. Checked against the CPU twin (one member per token)
and the reference, forward and backward."""

import pytest
import torch
from conftest import TOLERANCES, assert_close

from moepp_kernels import _C, MoEPPConfig
from moepp_kernels import reference as R
from moepp_kernels._ops.router import router_options, router_scalars
from moepp_kernels._tensors import optional_view, view

LANES = [2, 4, 8, 16, 32]


def layout(n: int, top_k: int, **options) -> MoEPPConfig:
    """N = n experts: a few of each zero-computation kind where n allows."""
    n_zero, n_copy, n_constant = (1, 1, 1) if n >= 8 else (0, 0, 0)
    return MoEPPConfig(hidden_size=8, ffn_size=8, n_ffn=n - n_zero - n_copy - n_constant, n_constant=n_constant,
                       n_copy=n_copy, n_zero=n_zero, top_k=top_k, **options)


# (N, k, options): every N the issue names (1, 3, 20, 33, 257, 1024), k from 1 to 16,
# both gatings, normalisation, selection bias, no renormalisation, routed scaling.
CASES = {
    "n1_k1": (1, 1, {}),
    "n3_k3_normalized": (3, 3, {"normalize_logits": True, "logits_std": 0.8}),
    "n20_k2_moepp": (20, 2, {"normalize_logits": True}),
    "n20_k16_topk_softmax": (20, 16, {"gating": "topk_softmax"}),
    "n33_k4_bias": (33, 4, {"selection_bias": True, "routed_scaling_factor": 2.5}),
    "n33_k16_no_renorm": (33, 16, {"renormalize": False, "normalize_logits": True}),
    "n64_k8_tiles_largest": (64, 8, {"normalize_logits": True}),  # the CPU's token tiles' largest N
    "n65_k3_rows_smallest": (65, 3, {"selection_bias": True}),  # its row loops' smallest
    "n257_k16_normalized_bias": (257, 16, {"normalize_logits": True, "selection_bias": True}),
    "n1024_k12_longcat": (1024, 12, {"selection_bias": True, "routed_scaling_factor": 6.0,
                                     "scale_identity_weights": False}),
    "n1024_k16_topk_softmax": (1024, 16, {"gating": "topk_softmax", "normalize_logits": True}),
}


def special_rows(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows plus the rows with defined limits: ties, +inf, -inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, generator=g, dtype=dtype).mul_(2) for _ in range(3)]
    rows.append(torch.zeros(n, dtype=dtype))  # all tied: lowest ids win
    tied = torch.randn(n, generator=g, dtype=dtype)
    tied[n // 2:] = tied[0]
    rows.append(tied)  # half the row tied with its first element
    signed_zeros = torch.zeros(n, dtype=dtype)
    signed_zeros[1::2] = -0.0
    rows.append(signed_zeros)  # -0 and +0 tie: lowest ids win
    for value in (float("inf"), float("-inf"), float("nan")):
        row = torch.randn(n, generator=g, dtype=dtype)
        row[torch.randperm(n, generator=g)[: max(1, n // 3)]] = value
        rows.append(row)
    inf_row = torch.full((n,), float("-inf"), dtype=dtype)
    inf_row[n - 1] = float("inf")
    rows.append(inf_row)
    return torch.stack(rows)


def inputs(cfg: MoEPPConfig, residual: bool, dtype: torch.dtype, seed: int):
    n = cfg.n_experts
    g = torch.Generator().manual_seed(seed + 1)
    logits = special_rows(n, dtype, seed)
    tokens = logits.shape[0]
    prev = torch.randn(tokens, n, generator=g, dtype=dtype) if residual else None
    weight = torch.randn(n, n, generator=g, dtype=dtype) / n**0.5 if residual else None
    bias = 0.05 * torch.randn(n, generator=g, dtype=dtype) if cfg.selection_bias else None
    return logits, prev, weight, bias


def forward(cfg, logits, prev, weight, bias, lanes: int):
    """The forward op's outputs with `lanes` members per token (0: the CPU twin)."""
    tokens, n = logits.shape
    ids = torch.empty(tokens, cfg.top_k, dtype=torch.int32)
    weights = torch.empty(tokens, cfg.top_k, dtype=logits.dtype)
    logits_out = torch.empty_like(logits) if prev is not None else None
    counts = torch.zeros(n, dtype=torch.int32)
    prob_sum = torch.empty(1, n, dtype=logits.dtype)
    _C.router_forward(router_options(n, router_scalars(cfg)), view(logits), optional_view(prev),
                      optional_view(weight), optional_view(bias), view(ids), view(weights), optional_view(logits_out),
                      view(counts), view(prob_sum), 1, 0, cpu_lanes=lanes)
    return ids, weights, logits_out if prev is not None else logits, counts, prob_sum[0]


def backward(cfg, routed, ids, weight, grads, lanes: int):
    d_w, d_l, d_p = grads
    grad_logits = torch.empty_like(routed)
    grad_prev = torch.empty_like(routed) if weight is not None else None
    _C.router_backward(router_options(routed.shape[1], router_scalars(cfg)), view(routed), view(ids),
                       view(d_w), optional_view(d_l if weight is not None else None), view(d_p),
                       optional_view(weight), view(grad_logits), optional_view(grad_prev), 1, 0, cpu_lanes=lanes)
    return grad_logits, grad_prev


def assert_equal_nan(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("residual", [False, True], ids=["first_layer", "residual"])
@pytest.mark.parametrize("name", list(CASES))
def test_lanes_match_serial_and_reference(name, residual, dtype):
    n, k, options = CASES[name]
    cfg = layout(n, k, **options)
    logits, prev, weight, bias = inputs(cfg, residual, dtype, seed=n + k)
    serial = forward(cfg, logits, prev, weight, bias, lanes=0)
    ref = R.route(logits, cfg, prev, weight, bias)
    g = torch.Generator().manual_seed(7)
    grads = (torch.randn(logits.shape[0], k, generator=g, dtype=dtype),
             torch.randn(logits.shape, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype))
    serial_grads = backward(cfg, serial[2], serial[0], weight, grads, lanes=0)
    for lanes in LANES:
        ids, weights, routed, counts, prob_sum = forward(cfg, logits, prev, weight, bias, lanes)
        where = f"{lanes} lanes"
        assert torch.equal(ids, serial[0]), where
        assert torch.equal(ids.long(), ref.topk_ids), where
        assert torch.equal(counts, serial[3]), where
        assert_equal_nan(weights, serial[1], dtype, f"weights, {where}")
        assert_close(weights, ref.topk_weights, dtype, f"weights vs reference, {where}")
        assert_equal_nan(routed, serial[2], dtype, f"logits, {where}")
        assert_equal_nan(prob_sum, serial[4], dtype, f"probability sums, {where}")
        grad_logits, grad_prev = backward(cfg, routed, ids, weight, grads, lanes)
        assert_equal_nan(grad_logits, serial_grads[0], dtype, f"grad logits, {where}")
        if residual:
            assert_equal_nan(grad_prev, serial_grads[1], dtype, f"grad prev, {where}")


def test_lanes_reject_a_width_that_is_not_a_warp_slice():
    cfg = layout(20, 2)
    logits, prev, weight, bias = inputs(cfg, False, torch.float32, seed=0)
    for lanes in (3, 64):
        with pytest.raises(ValueError, match="lanes"):
            forward(cfg, logits, prev, weight, bias, lanes)
