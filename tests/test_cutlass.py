"""The CUTLASS sm90 grouped GEMMs: the device-side argument filling checked on
the CPU (the same group_problem() the CUDA kernel runs), the build in CI, and
the three products against per-expert matmuls on an H100/H200."""

import os

import pytest
import torch
from conftest import HAS_CUDA, assert_forward_replays_in_cuda_graph, assert_layer_matches_reference, assert_norm_close

from moepp_kernels import _C, MoEPPConfig, MoEPPLayer, grouped_gemm
from moepp_kernels._tensors import view

FORWARD, GRAD_INPUT, GRAD_WEIGHT = 0, 1, 2
SIZES = {"ragged_with_empty": [5, 0, 17, 1, 0, 9], "one_group": [23], "all_in_one": [0, 0, 300, 0]}
HAS_CUTLASS_GPU = HAS_CUDA and _C.cutlass_family_for(*torch.cuda.get_device_capability(), _C.cutlass_archs()) > 0


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_argument_filling(sizes):
    """Each expert's (m, n, k) and operand offsets, as the device kernel writes them."""
    offsets = offsets_of(sizes)
    n, k = 24, 40
    for g, p in enumerate(_C.group_problems(FORWARD, view(offsets), int(offsets[-1]), n, k)):  # out rows = a rows · w_gᵀ
        first, rows = int(offsets[g]), sizes[g]
        assert (p.m, p.n, p.k, p.m_extent) == (rows, n, k, rows)
        assert (p.a_offset, p.b_offset, p.d_offset) == (first * k, g * n * k, first * n)
    for g, p in enumerate(_C.group_problems(GRAD_INPUT, view(offsets), int(offsets[-1]), k, n)):  # dx rows = dy rows · w_g
        first, rows = int(offsets[g]), sizes[g]
        assert (p.m, p.n, p.k, p.m_extent) == (rows, k, n, rows)
        assert (p.a_offset, p.b_offset, p.d_offset) == (first * n, g * n * k, first * k)
    for g, p in enumerate(_C.group_problems(GRAD_WEIGHT, view(offsets), int(offsets[-1]), n, k)):  # dw_g = dy_gᵀ · x_g
        first, rows = int(offsets[g]), sizes[g]
        # an expert without rows gets m = 0 (no tile scheduled; zero_empty_groups writes its zeros)
        assert (p.m, p.n, p.k, p.m_extent) == (n if rows else 0, k, rows, n)
        assert (p.a_offset, p.b_offset, p.d_offset) == (first * n, first * k, g * n * k)


@pytest.mark.parametrize("product", [FORWARD, GRAD_INPUT, GRAD_WEIGHT])
def test_argument_filling_stays_inside_the_operands_for_any_offsets(product):
    """Offsets with any values (decreasing, negative, past the buffer) give groups inside
    the buffer's rows: the device kernel never points CUTLASS outside the operands."""
    buffer_rows, n, k = 12, 24, 40
    offsets = torch.tensor([0, 6, 3, -5, 40, 2**31 - 1, 7], dtype=torch.int32)
    for p in _C.group_problems(product, view(offsets), buffer_rows, n, k):
        rows = p.k if product == GRAD_WEIGHT else p.m
        first = p.a_offset // (n if product == GRAD_WEIGHT else k)  # the group's first row
        assert rows >= 0 and 0 <= first and first + rows <= buffer_rows, (first, rows)


@pytest.mark.skipif(not os.environ.get("MOEPP_EXPECT_CUTLASS"), reason="set by .ci/run, where nvcc is present")
def test_ci_build_compiles_the_cutlass_kernels():
    expected = sorted(int(a) for a in os.environ["MOEPP_EXPECT_CUTLASS"].split(","))
    assert _C.built_with_cuda() and sorted(_C.cutlass_archs()) == expected


def test_backend_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="cutlass"):
        grouped_gemm.resolve_backend("cutlass", torch.device("cpu"), torch.bfloat16, (64, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUTLASS_GPU, reason="needs an sm90/sm80 GPU and the CUTLASS kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("n, k", [(256, 128), (136, 264)])  # not multiples of the 128-wide tiles
def test_products_match_per_expert_matmuls(dtype, sizes, n, k):
    offsets = offsets_of(sizes).cuda()
    rows = int(offsets[-1]) + 5  # rows past the total stay untouched
    a = torch.randn(rows, k, device="cuda", dtype=dtype)
    dy = torch.randn(rows, n, device="cuda", dtype=dtype)
    w = torch.randn(len(sizes), n, k, device="cuda", dtype=dtype) / k**0.5
    out = grouped_gemm.forward(a, w, offsets, "cutlass")
    gin = grouped_gemm.grad_input(dy, w, offsets, "cutlass")
    gw = grouped_gemm.grad_weight(dy, a, offsets, "cutlass")
    for e in range(len(sizes)):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        assert_norm_close(out[lo:hi], a[lo:hi].float() @ w[e].float().t(), dtype, f"forward e={e}")
        assert_norm_close(gin[lo:hi], dy[lo:hi].float() @ w[e].float(), dtype, f"grad_input e={e}")
        assert_norm_close(gw[e], dy[lo:hi].float().t() @ a[lo:hi].float(), dtype, f"grad_weight e={e}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUTLASS_GPU, reason="needs an sm90/sm80 GPU and the CUTLASS kernels")
def test_unaligned_extents_are_a_clear_error():
    offsets = offsets_of([3, 4]).cuda()
    with pytest.raises(ValueError, match="multiple of 8"):
        grouped_gemm.forward(torch.zeros(7, 100, device="cuda", dtype=torch.bfloat16),
                             torch.zeros(2, 64, 100, device="cuda", dtype=torch.bfloat16), offsets, "cutlass")
    shifted = torch.zeros(7 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(7, 64)  # 2 bytes off
    with pytest.raises(ValueError, match="16-byte aligned"):
        grouped_gemm.forward(shifted, torch.zeros(2, 32, 64, device="cuda", dtype=torch.bfloat16), offsets, "cutlass")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUTLASS_GPU, reason="needs an sm90/sm80 GPU and the CUTLASS kernels")
@pytest.mark.parametrize("tokens", [16, 4096])  # the small-M (decode) and large-M tile configurations
def test_layer_with_the_cutlass_backend(tokens):
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=256, ffn_size=384)
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.bfloat16, device="cuda", gemm_backend="cutlass")
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_layer_matches_reference(layer, x, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUTLASS_GPU, reason="needs an sm90/sm80 GPU and the CUTLASS kernels")
def test_layer_forward_with_cutlass_is_cuda_graph_capturable():
    """The CUTLASS arguments are written on the device from the plan: nothing waits for
    the host, so a CUDA graph captures the layer forward and replays it to the eager result."""
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=256, ffn_size=384)
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.bfloat16, device="cuda", gemm_backend="cutlass")
    x = torch.randn(512, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert_forward_replays_in_cuda_graph(layer, x)
