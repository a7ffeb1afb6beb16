"""The flat torch.library custom ops (moepp::*), one module per op family: typed
positional scalars, fake (meta) implementations for torch.compile, fused
backward ops registered as their autograd. Private: callers validate first. The
public, validating API is moepp_kernels.fused_router / build_plan / expert_ffn /
combine and the layer."""

from typing import Callable, TypeVar

R = TypeVar("R")


def per_config(fn: Callable[..., R]) -> Callable[..., R]:
    """Caches fn(config) by the config object's identity: a dict lookup per call instead of
    hashing the frozen dataclass's fields (the ops' scalars are made on every layer call).
    The entry keeps its config alive, so an id is never reused while it is cached."""
    cache: dict = {}

    def cached(config):
        hit = cache.get(id(config))
        if hit is None or hit[0] is not config:
            if len(cache) >= 1024:
                cache.clear()
            hit = cache[id(config)] = (config, fn(config))
        return hit[1]

    cached.__doc__, cached.__name__ = fn.__doc__, fn.__name__
    return cached


from . import combine, expert_ffn, plan, router  # noqa: E402, F401  (registers every moepp:: op)
