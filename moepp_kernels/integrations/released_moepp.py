"""The MoE++ authors' released model (`MoeForCausalLM`, remote code shipped with
MoE++-7B): swap each of its MoE++ layer modules for our kernels, and back.

The released layer module (each decoder layer's `mlp`) is `forward(hidden_states,
used_token=None, gate_residual=None) -> (out, logits)` around `moe.gate` (`wg`, a
Linear or Linear-Tanh-Linear; `gate_map`, G) and `moe.experts.experts` (FFN
experts with `up_proj` / `down_proj`, constant experts with `constant` / `wg`,
then a copy and a zero expert). Its gating flags are attributes of the module and
its top-k is the `MOE_TOP_K` constant of the Python module that defines it.
Everything else is read from the weights (spec: "Checkpoint layout").
"""

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from ..checkpoint import layer_from_moepp_state_dict, moepp_state_dict_from_layer
from ..config import MoEPPConfig
from ..layer import MoEPPLayer
from ._swap import meta_skeleton, rebuild, swap_modules

FLAGS = ("moe_use_mixtral_gating", "moe_use_logits_norm", "moe_gate_norm_std", "moe_feature_no_mul_topk",
         "moe_2layer_gate")
KIND_ORDER = ("ffn", "constant", "copy", "zero")


def is_released_moepp_module(module: nn.Module) -> bool:
    """Whether `module` has the released layer's structure (`moe.gate.wg`, `moe.experts.experts`)."""
    moe = getattr(module, "moe", None)
    return (isinstance(moe, nn.Module) and isinstance(getattr(getattr(moe, "gate", None), "wg", None), nn.Module)
            and isinstance(getattr(getattr(moe, "experts", None), "experts", None), nn.ModuleList))


def _linear_weight(module: object, where: str, shape: Optional[tuple] = None) -> Tensor:
    if not isinstance(module, nn.Linear) or module.bias is not None:
        raise ValueError(f"{where}: expected a bias-free nn.Linear, got {type(module).__name__}"
                         + (" with a bias" if isinstance(module, nn.Linear) else ""))
    if shape is not None and tuple(module.weight.shape) != shape:
        raise ValueError(f"{where}: expected weight shape {list(shape)}, got {list(module.weight.shape)}")
    return module.weight


def _gate_shape(wg: nn.Module, where: str) -> tuple[int, int, int]:
    """(gate_depth, N, D) of the gate `wg`."""
    if isinstance(wg, nn.Linear):
        n, d = _linear_weight(wg, where).shape
        return 1, n, d
    if isinstance(wg, nn.Sequential) and len(wg) == 3 and isinstance(wg[1], nn.Tanh):
        w1 = _linear_weight(wg[0], f"{where}.0")
        n = _linear_weight(wg[2], f"{where}.2").shape[0]
        if tuple(w1.shape) != (8 * n, w1.shape[1]) or tuple(wg[2].weight.shape) != (n, 8 * n):
            raise ValueError(f"{where}: a 2-layer gate is [8N, D] then [N, 8N], got {list(w1.shape)} and "
                             f"{list(wg[2].weight.shape)}")
        return 2, n, w1.shape[1]
    raise ValueError(f"{where}: expected nn.Linear or Sequential(Linear, Tanh, Linear), got {type(wg).__name__}")


def _expert_kind(expert: nn.Module, d: int, where: str) -> tuple[str, Optional[int]]:
    """("ffn", I), ("constant", None), ("copy", None) or ("zero", None) for one released expert;
    a parameter-free expert is told copy from zero by what it returns for a probe row
    (of both signs, so that e.g. a ReLU is neither)."""
    if hasattr(expert, "up_proj") and hasattr(expert, "down_proj"):
        two_i = _linear_weight(expert.up_proj, f"{where}.up_proj").shape[0]
        if two_i % 2 or tuple(expert.up_proj.weight.shape) != (two_i, d):
            raise ValueError(f"{where}.up_proj: expected weight shape [2I, {d}], got "
                             f"{list(expert.up_proj.weight.shape)}")
        _linear_weight(expert.down_proj, f"{where}.down_proj", (d, two_i // 2))
        return "ffn", two_i // 2
    if isinstance(getattr(expert, "constant", None), nn.Parameter) and hasattr(expert, "wg"):
        _linear_weight(expert.wg, f"{where}.wg", (2, d))
        if tuple(expert.constant.shape) != (d,):
            raise ValueError(f"{where}.constant: expected shape [{d}], got {list(expert.constant.shape)}")
        return "constant", None
    if next(iter(expert.parameters()), None) is None:
        probe = (torch.arange(d, dtype=torch.float32) - (d - 1) / 2).reshape(1, d)  # both signs
        with torch.no_grad():
            out = expert(probe)
        if isinstance(out, Tensor) and torch.equal(out, probe):
            return "copy", None
        if isinstance(out, Tensor) and out.shape == probe.shape and not out.any():
            return "zero", None
    raise ValueError(f"{where}: {type(expert).__name__} is none of the released expert kinds (an FFN expert with "
                     "up_proj / down_proj, a constant expert with constant / wg, a copy or a zero expert)")


def _flag(module: nn.Module, name: str, where: str):
    for owner in (module, getattr(module, "moe", None), getattr(getattr(module, "moe", None), "gate", None)):
        if owner is not None and hasattr(owner, name):
            return getattr(owner, name)
    raise ValueError(f"{where}: has no attribute {name!r}; pass config= for a module that does not carry the "
                     "released layer's gating flags")


def _released_top_k(module: nn.Module, where: str) -> int:
    for cls in (type(module.moe), type(module)):
        top_k = getattr(sys.modules.get(cls.__module__), "MOE_TOP_K", None)
        if isinstance(top_k, int) and not isinstance(top_k, bool):
            return top_k
    raise ValueError(f"{where}: the module defining {type(module).__name__} has no integer MOE_TOP_K; pass top_k=")


def config_from_released_module(module: nn.Module, top_k: Optional[int] = None, name: str = "module") -> MoEPPConfig:
    """The MoEPPConfig of one released MoE++ layer module, read from its experts and
    weights (layout, D, I, gate depth), its attributes (the gating flags) and its
    defining module's MOE_TOP_K (unless `top_k` is given). ValueError, naming the
    part, when the module does not look like a released layer."""
    if not is_released_moepp_module(module):
        raise ValueError(f"{name}: {type(module).__name__} is not a released MoE++ layer (no moe.gate.wg and "
                         "moe.experts.experts)")
    gate = module.moe.gate
    depth, n, d = _gate_shape(gate.wg, f"{name}.moe.gate.wg")
    if bool(_flag(module, "moe_2layer_gate", name)) != (depth == 2):
        raise ValueError(f"{name}: moe_2layer_gate={_flag(module, 'moe_2layer_gate', name)} but moe.gate.wg is a "
                         f"{depth}-layer gate")
    if hasattr(gate, "gate_map"):
        _linear_weight(gate.gate_map, f"{name}.moe.gate.gate_map", (n, n))
    experts = module.moe.experts.experts
    if len(experts) != n:
        raise ValueError(f"{name}: the gate scores {n} experts but moe.experts.experts holds {len(experts)}")
    kinds = [_expert_kind(e, d, f"{name}.moe.experts.experts.{i}") for i, e in enumerate(experts)]
    order = [KIND_ORDER.index(kind) for kind, _ in kinds]
    if order != sorted(order):
        raise ValueError(f"{name}: experts must come as FFN, constant, copy, zero; got {[k for k, _ in kinds]}")
    widths = {i for kind, i in kinds if kind == "ffn"}
    if len(widths) > 1:
        raise ValueError(f"{name}: the FFN experts have different widths {sorted(widths)}")
    count = {kind: sum(k == kind for k, _ in kinds) for kind in KIND_ORDER}
    mixtral = bool(_flag(module, "moe_use_mixtral_gating", name))
    if not mixtral and count["zero"] != 1:
        raise ValueError(f"{name}: the released softmax gating masks exactly one zero expert (the last); this layer "
                         f"has {count['zero']}")
    return MoEPPConfig(
        hidden_size=d, ffn_size=widths.pop() if widths else 1, n_ffn=count["ffn"], n_constant=count["constant"],
        n_copy=count["copy"], n_zero=count["zero"],
        top_k=_released_top_k(module, name) if top_k is None else top_k,
        gating="topk_softmax" if mixtral else "softmax_topk", gate_depth=depth,
        normalize_logits=bool(_flag(module, "moe_use_logits_norm", name)),
        logits_std=float(_flag(module, "moe_gate_norm_std", name)),
        scale_input_by_topk=not (mixtral or bool(_flag(module, "moe_feature_no_mul_topk", name))))


class ReleasedMoEPPLayer(nn.Module):
    """A MoEPPLayer (`self.moepp`) behind the released layer module's call contract:
    forward(hidden_states [..., D], used_token=None, gate_residual=None [T, N])
    -> (out [..., D], logits [T, N] fp32), positionally or by keyword. `used_token`
    is accepted and ignored, as the released layer does; gate_residual (the previous
    layer's logits) is read as float32. Unlike the released layer, hidden_states is
    never modified in place."""

    def __init__(self, layer: MoEPPLayer, skeleton: Optional[nn.Module] = None):
        super().__init__()
        self.moepp = layer
        # The original module without storage, for restore_moepp_layers; not a submodule (no parameters).
        self.__dict__["_released_skeleton"] = skeleton
        self.__dict__["_released_dtype"] = layer.up.dtype

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None,
                gate_residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if isinstance(gate_residual, Tensor) and gate_residual.dtype != torch.float32:
            gate_residual = gate_residual.float()
        return self.moepp(hidden_states, gate_residual)

    def to_released_module(self) -> nn.Module:
        """The released module again, holding this layer's current weights (device and
        expert dtype as they are now; a gate that was float32 beside low-precision
        experts when swapped stays float32)."""
        if self._released_skeleton is None:
            raise ValueError("this layer was not made by replace_moepp_layers: there is no released module to rebuild")
        layer = self.moepp
        return rebuild(self._released_skeleton, moepp_state_dict_from_layer(layer), self, self._released_dtype,
                       layer.up.dtype)


def replace_moepp_layers(model: nn.Module, config: Optional[MoEPPConfig] = None, gemm_backend: str = "auto",
                         top_k: Optional[int] = None) -> list[str]:
    """Swap every released MoE++ layer module of `model` (the authors' `MOE`, each decoder
    layer's `mlp`) for a ReleasedMoEPPLayer holding its weights (stacked; the old module is
    dropped, its structure kept on the meta device for restore_moepp_layers). The config is
    read from each module unless `config` is given; `top_k` overrides MOE_TOP_K. Expert
    weights keep their dtype and device; the gate is float32. Returns the swapped names;
    ValueError when the model holds no such module."""
    if config is not None and not isinstance(config, MoEPPConfig):
        raise TypeError(f"config must be a MoEPPConfig or None, got {type(config).__name__}")

    def build(name: str, module: nn.Module) -> nn.Module:
        if next(iter(module.buffers()), None) is not None:
            raise ValueError(f"{name}: a released MoE++ layer holds no buffers; this one does")
        cfg = config_from_released_module(module, top_k, name) if config is None else config
        layer = layer_from_moepp_state_dict(module.state_dict(), cfg, gemm_backend=gemm_backend)
        return ReleasedMoEPPLayer(layer, meta_skeleton(module))

    names = swap_modules(model, is_released_moepp_module, build)
    if not names:
        raise ValueError(f"{type(model).__name__} holds no released MoE++ layer module (one with moe.gate.wg and "
                         "moe.experts.experts) to swap")
    return names


def restore_moepp_layers(model: nn.Module) -> list[str]:
    """The inverse of replace_moepp_layers: every ReleasedMoEPPLayer of `model` becomes the
    released module again with the current weights (so `model.save_pretrained` writes the
    released checkpoint layout). Returns the restored names."""
    return swap_modules(model, lambda m: isinstance(m, ReleasedMoEPPLayer),
                        lambda name, m: m.to_released_module())
