"""Large host buffers of the CPU twins go onto transparent huge pages (csrc/host_memory.h):
advice only, never a change of contents, a clear error for a bad range."""

import sys

import pytest
import torch

from moepp_kernels import _C
from moepp_kernels._tensors import FRESH_MAPPING_BYTES, new_buffer

HUGE_PAGE = 2 * 2**20


def test_advice_covers_only_whole_huge_pages_and_keeps_contents():
    t = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB, written before the advice
    advised = _C.advise_huge_pages(t.data_ptr(), t.nbytes)
    assert advised % HUGE_PAGE == 0 and 0 <= advised <= t.nbytes
    if sys.platform.startswith("linux"):
        assert advised >= t.nbytes - 2 * HUGE_PAGE
    assert torch.equal(t, torch.arange(16 * 2**20, dtype=torch.float32))


def test_ranges_without_a_whole_huge_page_get_no_advice():
    t = torch.zeros(1024)
    assert _C.advise_huge_pages(t.data_ptr(), t.nbytes) == 0
    assert _C.advise_huge_pages(0, 8 * HUGE_PAGE) == 0  # no buffer at all
    assert _C.advise_huge_pages(t.data_ptr(), 0) == 0


def test_negative_size_names_the_argument():
    with pytest.raises(ValueError, match="bytes"):
        _C.advise_huge_pages(0, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("elements", [0, 7, FRESH_MAPPING_BYTES // 2 + 1])  # empty, small, over the threshold
def test_new_buffer_is_new_empty(dtype, elements):
    like = torch.ones(3, dtype=dtype)
    t = new_buffer(like, (elements, 2))
    assert t.shape == (elements, 2) and t.dtype == dtype and t.device == like.device and t.is_contiguous()
    t.fill_(1.5)
    assert bool((t == 1.5).all())
