"""The host block cache behind the CPU layer's large buffers (csrc/host_memory.h).

A buffer of over 4 MiB on the CPU (an expert FFN's y and h, the experts' weight
gradients, the slot-row and input gradients, the combine's output) is one mapping of whole 2 MiB pages.
glibc would often map such a buffer afresh (above its mmap threshold, which moves
between 128 KiB and 32 MiB) or give it back to the kernel from its heap's top, and
its pages would be faulted in, zeroed, on first write: every step, for every
expert weight gradient, however few tokens reached the expert. Freed, the block
goes to this cache instead, and the next buffer of its size (at most a quarter
smaller) takes its pages as they are, already faulted in. Like torch's CUDA
caching allocator, the cache keeps freed memory from the system: at most
`host_cache_limit()` bytes (2 GiB unless the environment sets MOEPP_HOST_CACHE_MB;
0 turns caching off).
"""

from __future__ import annotations

import os

from . import _C

__all__ = ["empty_host_cache", "host_cache_bytes", "host_cache_limit", "set_host_cache_limit"]


def set_host_cache_limit(nbytes: int) -> None:
    """Keeps at most `nbytes` (>= 0) in freed blocks; blocks beyond it are unmapped now."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _C.set_host_cache_limit(nbytes)


def host_cache_limit() -> int:
    """The most bytes the cache keeps in freed blocks."""
    return _C.host_cache_limit()


def host_cache_bytes() -> int:
    """The bytes the cache holds in freed blocks now."""
    return _C.host_cache_bytes()


def empty_host_cache() -> None:
    """Returns every freed block to the system (blocks in use are untouched)."""
    _C.empty_host_cache()


def _limit_from_environment() -> None:
    value = os.environ.get("MOEPP_HOST_CACHE_MB")
    if value is None:
        return
    try:
        megabytes = int(value)
    except ValueError:
        raise ValueError(f"MOEPP_HOST_CACHE_MB must be a whole number of MiB, got {value!r}") from None
    set_host_cache_limit(megabytes * 2**20)


_limit_from_environment()
