"""What both model swaps share: finding the modules to swap, replacing them in
their parents, and the meta-device skeleton of each original module that lets a
swap be undone (for saving in the original layout) without keeping its weights."""

import copy
from typing import Callable

import torch
from torch import Tensor, nn


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers live on the meta device (no
    storage): the class, attributes and structure to rebuild it from a state dict.
    The original is not touched and no weight is copied. ValueError when it holds
    non-persistent buffers (no state dict could fill them back)."""
    transient = [f"{name}.{b}" if name else b for name, m in module.named_modules()
                 for b in m._non_persistent_buffers_set]
    if transient:
        raise ValueError(f"{type(module).__name__} holds non-persistent buffers {transient}: it cannot be rebuilt "
                         "from a state dict, so it is not swapped")
    memo: dict[int, object] = {}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def rebuild(skeleton: nn.Module, state_dict: dict[str, Tensor], like: nn.Module, dtype_from: torch.dtype,
            dtype_to: torch.dtype) -> nn.Module:
    """A real module from a skeleton: storage on `like`'s device, tensors that had the
    expert dtype `dtype_from` when swapped now in `dtype_to` (the model may have been
    cast since; tensors kept in another dtype, such as an fp32 router, stay as they
    were), then `state_dict` loaded strictly; train/eval mode and requires_grad as
    `like` (the swapped layer) has them now."""
    device = next(like.parameters()).device
    module = copy.deepcopy(skeleton).to_empty(device=device)
    for t in (*module.parameters(), *module.buffers()):
        if t.dtype == dtype_from:
            t.data = t.data.to(dtype_to)
    module.load_state_dict(state_dict, strict=True)
    module.train(like.training)
    module.requires_grad_(any(p.requires_grad for p in like.parameters()))
    return module


def swap_modules(model: nn.Module, matches: Callable[[nn.Module], bool],
                 build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule of `model` for which `matches` holds by `build(name, module)`;
    the names of the replaced modules, in model order. `model` itself is never replaced."""
    names = [name for name, module in model.named_modules() if name and matches(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, build(name, getattr(parent, child)))
    return names
