"""Conversion between the released MoE++ layer's state dict and MoEPPLayer
(spec: "Checkpoint layout"). Swapping such layers in a model:
integrations/released_moepp.py.

Keys, relative to a layer's `mlp.` prefix: `moe.gate.wg.weight` [N, D] (or
`moe.gate.wg.0.weight` [8N, D] and `moe.gate.wg.2.weight` [N, 8N]),
`moe.gate.gate_map.weight` [N, N], `moe.experts.experts.{e}.up_proj.weight`
[2I, D] and `...{e}.down_proj.weight` [D, I] for FFN experts e,
`...{c}.constant` [D] and `...{c}.wg.weight` [2, D] for constant experts c
(global expert ids). Copy and zero experts have no parameters.
"""


from typing import Optional

import torch
from torch import Tensor, nn

from .config import MoEPPConfig

EXPERTS = "moe.experts.experts"


def _gate_keys(config: MoEPPConfig) -> dict[str, str]:
    if config.gate_depth == 1:
        return {"moe.gate.wg.weight": "router.gate_weight"}
    return {"moe.gate.wg.0.weight": "router.gate_w1", "moe.gate.wg.2.weight": "router.gate_w2"}


RESIDUAL = "moe.gate.gate_map.weight"


def _layout(config: MoEPPConfig) -> list[tuple[str, str, Optional[int]]]:
    """(released key, MoEPPLayer parameter, expert slot in it or None) for every tensor
    of the layout but the optional residual weight."""
    entries = [(key, name, None) for key, name in _gate_keys(config).items()]
    for e in range(config.n_ffn):
        entries += [(f"{EXPERTS}.{e}.up_proj.weight", "up", e), (f"{EXPERTS}.{e}.down_proj.weight", "down", e)]
    for i, c in enumerate(range(config.constant_begin, config.copy_begin)):
        entries += [(f"{EXPERTS}.{c}.constant", "const_value", i), (f"{EXPERTS}.{c}.wg.weight", "const_gate", i)]
    return entries


def _tensor(layer: nn.Module, name: str, index: Optional[int]) -> Tensor:
    t = layer.get_parameter(name)
    return t if index is None else t[index]


def moepp_entries(state_dict: dict[str, Tensor], config: MoEPPConfig, prefix: str = "",
                  experts: Optional[tuple[int, int]] = None) -> tuple[dict[str, Tensor], list]:
    """(own, entries): the state dict's tensors under `prefix` (prefix stripped) and the
    (key, parameter, index) to copy from them: every tensor of the layout, but of the FFN
    experts only those in `experts` = [lo, hi) (default all; indices renumbered from lo,
    the others' keys may be absent). ValueError naming missing or unknown keys."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    layout = _layout(config)
    lo, hi = (0, config.n_ffn) if experts is None else experts
    entries = [(key, name, index - lo if name in ("up", "down") else index) for key, name, index in layout
               if name not in ("up", "down") or lo <= index < hi]
    missing = [prefix + key for key, _, _ in entries if key not in own]
    if missing:
        raise ValueError(f"state_dict: missing keys for this config: {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""))
    known = {key for key, _, _ in layout} | {RESIDUAL}
    unexpected = [prefix + k for k in own if k not in known]
    if unexpected:
        raise ValueError(f"state_dict: unexpected keys for this config: {unexpected[:5]}")
    return own, entries


def model_tensor(own: dict[str, Tensor], entries: list) -> Optional[Tensor]:
    """The first expert tensor of `entries` (its dtype is the model's; the gate may be fp32), if any."""
    return next((own[key] for key, name, _ in entries if not name.startswith("router.")), None)


def load_entries(target: nn.Module, own: dict[str, Tensor], entries: list, prefix: str = "") -> None:
    """Copy `entries` (from moepp_entries) into `target`, a MoEPPLayer or a module with its
    parameter names, and G when the state dict has it."""
    with torch.no_grad():
        for key, name, index in entries:
            _copy(_tensor(target, name, index), own[key], prefix + key)
        if RESIDUAL in own:
            _copy(target.router.residual_weight, own[RESIDUAL], prefix + RESIDUAL)


def layer_from_moepp_state_dict(state_dict: dict[str, Tensor], config: MoEPPConfig, prefix: str = "",
                                gemm_backend: str = "auto"):
    """A MoEPPLayer with the weights of `state_dict` (keys after `prefix`). Expert
    weights keep the checkpoint's dtype and device; gate weights become fp32.
    The layer has a residual weight exactly when `moe.gate.gate_map.weight` is there."""
    from .layer import MoEPPLayer

    own, entries = moepp_entries(state_dict, config, prefix)
    reference = model_tensor(own, entries)
    reference = own[entries[0][0]] if reference is None else reference
    layer = MoEPPLayer(config, has_residual=RESIDUAL in own, dtype=reference.dtype, device=reference.device,
                       gemm_backend=gemm_backend)
    load_entries(layer, own, entries, prefix)
    return layer


def _copy(dst: Tensor, src: Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"state_dict[{key!r}]: expected shape {list(dst.shape)}, got {list(src.shape)}")
    dst.copy_(src)


def moepp_state_dict_from_layer(layer, prefix: str = "") -> dict[str, Tensor]:
    """The released layout's state dict of a MoEPPLayer (the inverse of
    layer_from_moepp_state_dict)."""
    out = {prefix + key: _tensor(layer, name, index).detach().clone() for key, name, index in _layout(layer.config)}
    if layer.router.residual_weight is not None:
        out[prefix + RESIDUAL] = layer.router.residual_weight.detach().clone()
    return out
