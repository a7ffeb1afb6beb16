"""Large host buffers of the CPU twins (csrc/host_memory.h): transparent huge page advice
(advice only, never a change of contents), and the host block cache (a freed block's pages go
to the next buffer of its size, never to two live buffers, within the cache's limit); clear
errors for bad sizes and limits."""

import gc
import os
import subprocess
import sys

import pytest
import torch

from moepp_kernels import _C, host_cache
from moepp_kernels._tensors import CACHED_BUFFER_BYTES, new_buffer

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
@pytest.mark.parametrize("elements", [0, 7, CACHED_BUFFER_BYTES // 2 + 1])  # empty, small, over the threshold
def test_new_buffer_is_new_empty(dtype, elements):
    like = torch.ones(3, dtype=dtype)
    t = new_buffer(like, (elements, 2))
    assert t.shape == (elements, 2) and t.dtype == dtype and t.device == like.device and t.is_contiguous()
    t.fill_(1.5)
    assert bool((t == 1.5).all())


LARGE = (CACHED_BUFFER_BYTES // 4 + 1, 1)  # fp32 elements just over the threshold: a cached block


@pytest.fixture
def empty_cache():
    """A cache with nothing freed in it and the default limit, before and after the test."""
    limit = host_cache.host_cache_limit()
    gc.collect()
    host_cache.empty_host_cache()
    yield
    host_cache.set_host_cache_limit(limit)
    gc.collect()
    host_cache.empty_host_cache()


def test_a_freed_block_goes_to_the_next_buffer_of_its_size(empty_cache):
    like = torch.ones(1)
    t = new_buffer(like, LARGE)
    address, nbytes = t.data_ptr(), t.nbytes
    t.fill_(3.0)
    del t
    assert host_cache.host_cache_bytes() >= nbytes
    again = new_buffer(like, LARGE)
    assert again.data_ptr() == address and host_cache.host_cache_bytes() == 0
    half = new_buffer(torch.ones(1, dtype=torch.bfloat16), LARGE)  # another dtype, whole pages of its own
    assert half.data_ptr() != address


def test_live_buffers_and_their_views_never_share_a_block(empty_cache):
    like = torch.ones(1)
    a, b = new_buffer(like, LARGE), new_buffer(like, LARGE)
    assert a.data_ptr() != b.data_ptr()
    a_address, view = a.data_ptr(), a[1:]  # the view keeps a's block alive after a is gone
    del a
    c = new_buffer(like, LARGE)
    assert c.data_ptr() not in (a_address, b.data_ptr())
    view.fill_(1.0)
    c.fill_(2.0)
    assert bool((view == 1.0).all()) and bool((c == 2.0).all())


def test_a_much_smaller_buffer_does_not_take_a_large_block(empty_cache):
    like = torch.ones(1)
    big = new_buffer(like, (4 * LARGE[0], 1))
    address = big.data_ptr()
    del big
    small = new_buffer(like, LARGE)  # a quarter of the freed block's size: a block of its own
    assert small.data_ptr() != address


def test_the_limit_bounds_what_the_cache_keeps(empty_cache):
    like = torch.ones(1)
    host_cache.set_host_cache_limit(0)
    t = new_buffer(like, LARGE)
    del t
    assert host_cache.host_cache_bytes() == 0
    host_cache.set_host_cache_limit(2**30)
    t = new_buffer(like, LARGE)
    del t
    assert host_cache.host_cache_bytes() > 0
    host_cache.set_host_cache_limit(0)  # lowering it frees the blocks now
    assert host_cache.host_cache_bytes() == 0 and host_cache.host_cache_limit() == 0


def test_weight_gradients_from_cached_blocks_accumulate(empty_cache):
    """Two backward passes into one .grad (the first one's grad is a cached block): twice the one pass."""
    from moepp_kernels import MoEPPConfig, MoEPPLayer

    cfg = MoEPPConfig.moepp_0_6b().with_(hidden_size=512, ffn_size=2048)  # up's gradient: 64 MiB
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.float32)
    x = torch.randn(64, 512)
    layer(x)[0].square().sum().backward()
    once = layer.up.grad.clone()
    layer(x)[0].square().sum().backward()
    torch.testing.assert_close(layer.up.grad, 2 * once)
    layer.zero_grad(set_to_none=True)
    layer(x)[0].square().sum().backward()  # a fresh step takes the freed gradient's block
    torch.testing.assert_close(layer.up.grad, once)


def test_layer_output_and_input_gradient_from_cached_blocks(empty_cache):
    """[T, D] fp32 over the threshold: the combine's output and input gradient and the gate's input
    gradient are cached blocks. Against the reference; an output kept across the next call stays as
    it was; x's gradient over two passes is twice one pass."""
    from conftest import assert_norm_close

    from moepp_kernels import MoEPPConfig, MoEPPLayer
    from moepp_kernels import reference as R

    cfg = MoEPPConfig(hidden_size=64, ffn_size=32, n_ffn=4, n_constant=1, n_copy=1, n_zero=1, top_k=2)
    tokens = CACHED_BUFFER_BYTES // (4 * cfg.hidden_size) + 1
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.float32)
    x = torch.randn(tokens, cfg.hidden_size).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, _ = layer(x)
    kept = out.detach().clone()
    want, _ = R.moepp_layer(x_ref, layer.reference_params(), cfg)
    assert_norm_close(out, want, torch.float32, "out")
    out.square().sum().backward()
    want.square().sum().backward()
    assert_norm_close(x.grad, x_ref.grad, torch.float32, "grad x")
    once = x.grad.clone()
    again, _ = layer(x)
    assert torch.equal(out, kept)
    again.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * once)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_limit_names_the_argument(bad, error):
    with pytest.raises(error, match="nbytes"):
        host_cache.set_host_cache_limit(bad)


def test_a_block_needs_a_positive_size():
    with pytest.raises(ValueError, match="bytes"):
        _C.host_block(0)


def test_the_limit_comes_from_the_environment(tmp_path):
    """In a fresh interpreter, run outside the source tree (whose moepp_kernels/ has no built _C
    after a non-editable install)."""
    code = "from moepp_kernels import host_cache; print(host_cache.host_cache_limit())"
    env = {**os.environ, "MOEPP_HOST_CACHE_MB": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 3 * 2**20
    env["MOEPP_HOST_CACHE_MB"] = "lots"
    bad = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOEPP_HOST_CACHE_MB" in bad.stderr
