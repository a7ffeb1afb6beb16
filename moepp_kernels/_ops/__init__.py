"""The flat torch.library custom ops (moepp::*), one module per op family: typed
positional scalars, fake (meta) implementations for torch.compile, fused
backward ops registered as their autograd. Private: callers validate first. The
public, validating API is moepp_kernels.fused_router / build_plan / expert_ffn /
combine and the layer."""

from typing import Callable, TypeVar

import torch

R = TypeVar("R")
# Parameters are plain tensors to the dispatcher (their __torch_function__ is disabled).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# torch.ops.moepp.<name> -> its implementation, for call_op (filled by custom_op).
_IMPLEMENTATIONS: dict = {}


def custom_op(name: str, impl: Callable[..., R]):
    """Registers impl as the custom op moepp::<name> (mutating nothing) and returns its
    CustomOpDef; call_op may run impl directly in the op's place."""
    op = torch.library.custom_op(f"moepp::{name}", impl, mutates_args=())
    _IMPLEMENTATIONS[getattr(torch.ops.moepp, name)] = impl
    return op


def bypasses_dispatcher(args) -> bool:
    """Whether an op may run its implementation directly, past torch.ops: in plain eager
    mode (not traced by torch.compile, no dispatch or function mode such as make_fx's or
    FakeTensorMode's, no functorch transform, no tensor subclass) with no gradient to
    record. The dispatcher and the custom op's autograd wrapper cost about 20 us a call,
    which is most of a decode step's router, plan and combine on the CPU."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or (grad and a.requires_grad)):
            return False
    return True


def call_op(op: Callable[..., R], *args) -> R:
    """op(*args) for op = torch.ops.moepp.<name> (made by custom_op), or its implementation
    called directly where bypasses_dispatcher(args): the same kernels and results."""
    if bypasses_dispatcher(args):
        return _IMPLEMENTATIONS[op](*args)
    return op(*args)


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


from . import combine, expert_ffn, plan, residual, router  # noqa: E402, F401  (registers every moepp:: op)
