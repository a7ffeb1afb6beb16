"""Hugging Face transformers' LongCat-Flash: swap each `LongcatFlashMoE` of a model
for our LongCat-mode layer (identity experts as copy experts, selection bias,
routed scaling factor on every weight: spec "LongCat-Flash style"), and back.

The layouts transformers has shipped are read, without importing transformers:
5.x, `experts.gate_up_proj` [n_routed, 2I, D] (later releases, 5.25 among them) or
[n_routed + zero_expert_num, 2I, D] (earlier ones; only the first n_routed rows are
ever used) and `experts.down_proj` [n_routed, D, I]; 4.57,
`experts` a ModuleList of n_routed `LongcatFlashMLP` (`gate_proj`, `up_proj`,
`down_proj`) followed by `nn.Identity` experts. The router is an fp32
`classifier` [N, D], the buffer `e_score_correction_bias` [N] (selection only),
`top_k` and `routed_scaling_factor`.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import MoEPPConfig
from ..layer import MoEPPLayer
from ._swap import meta_skeleton, rebuild, swap_modules

SUPPORTED = "transformers 4.57 (experts as a ModuleList) and 5.x (stacked gate_up_proj / down_proj)"


def is_longcat_flash_moe(module: nn.Module) -> bool:
    """Whether `module` is transformers' LongcatFlashMoE (by class name and parts)."""
    return (type(module).__name__ == "LongcatFlashMoE" and isinstance(getattr(module, "router", None), nn.Module)
            and isinstance(getattr(module, "experts", None), nn.Module))


def _stacked_layout(experts: nn.Module) -> bool:
    """True for 5.x's stacked experts, False for 4.57's ModuleList; ValueError otherwise."""
    if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        return True
    if isinstance(experts, nn.ModuleList):
        return False
    raise ValueError(f"LongcatFlashMoE.experts: {type(experts).__name__} is neither layout this swap reads "
                     f"({SUPPORTED}); please report your transformers version")


def _expert_weights(experts: nn.Module, n_routed: int, name: str) -> tuple[Tensor, Tensor]:
    """up [n_routed, 2I, D] (gate rows first) and down [n_routed, D, I], as views or stacks."""
    if _stacked_layout(experts):
        return experts.gate_up_proj[:n_routed], experts.down_proj
    mlps, rest = list(experts)[:n_routed], list(experts)[n_routed:]
    for i, m in enumerate(mlps):
        if not all(isinstance(getattr(m, p, None), nn.Linear) and getattr(m, p).bias is None
                   for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"{name}.experts.{i}: expected an MLP with bias-free gate_proj / up_proj / down_proj")
    for i, m in enumerate(rest, n_routed):
        if not isinstance(m, nn.Identity):
            raise ValueError(f"{name}.experts.{i}: expected nn.Identity after the routed experts, got "
                             f"{type(m).__name__}")
    up = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mlps])
    return up, torch.stack([m.down_proj.weight for m in mlps])


def _activation(module: nn.Module, experts: nn.Module) -> Optional[str]:
    """None when the experts' activation is SiLU, else what it is. From the module's config where
    it keeps one (4.57, earlier 5.x), else from the experts' act_fn (later 5.x), checked by value."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "hidden_act"):
        return None if config.hidden_act in ("silu", "swish") else repr(config.hidden_act)
    holder = experts if _stacked_layout(experts) else next(iter(experts), None)
    act_fn = getattr(holder, "act_fn", None)
    if not callable(act_fn):
        return "unknown (neither the module's config.hidden_act nor the experts' act_fn is there)"
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.75, 4.0])
    with torch.no_grad():
        out = act_fn(probe)
    if isinstance(out, Tensor) and torch.allclose(out, torch.nn.functional.silu(probe), rtol=1e-6, atol=1e-7):
        return None
    return type(act_fn).__name__


def config_from_longcat_flash_moe(module: nn.Module, name: str = "module") -> MoEPPConfig:
    """The MoEPPConfig of one LongcatFlashMoE: LongCat mode with its n_routed FFN experts,
    zero_expert_num identity (copy) experts, top_k and routed_scaling_factor."""
    if not is_longcat_flash_moe(module):
        raise ValueError(f"{name}: {type(module).__name__} is not transformers' LongcatFlashMoE")
    router = module.router
    classifier = getattr(router, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"{name}.router: expected an nn.Linear classifier ({SUPPORTED})")
    if classifier.bias is not None:
        raise ValueError(f"{name}.router.classifier has a bias (config.router_bias=True), which transformers' "
                         "router does not apply and this swap does not carry; load the model with "
                         "router_bias=False")
    n, d = classifier.weight.shape
    experts = module.experts
    act = _activation(module, experts)
    if act is not None:
        raise ValueError(f"{name}: the experts' activation is {act}; our FFN experts are SwiGLU (silu) only")
    if _stacked_layout(experts):
        n_routed = experts.down_proj.shape[0] if experts.down_proj is not None else 0
        ffn_size = experts.down_proj.shape[2] if n_routed else 1
        up_shape, down_shape = tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)
        if (up_shape not in ((n_routed, 2 * ffn_size, d), (n, 2 * ffn_size, d))
                or down_shape != (n_routed, d, ffn_size)):
            raise ValueError(f"{name}.experts: expected gate_up_proj [{n_routed} or {n}, {2 * ffn_size}, {d}] and "
                             f"down_proj [{n_routed}, {d}, {ffn_size}], got {list(up_shape)} and "
                             f"{list(down_shape)} ({SUPPORTED})")
    else:
        n_routed = sum(not isinstance(m, nn.Identity) for m in experts)
        if len(experts) != n:
            raise ValueError(f"{name}: the router scores {n} experts but experts holds {len(experts)}")
        ffn_size = experts[0].down_proj.weight.shape[1] if n_routed else 1
    if n_routed == 0:
        raise ValueError(f"{name}: no routed experts (n_routed_experts = 0): nothing for our kernels to do")
    return MoEPPConfig.longcat(hidden_size=d, ffn_size=ffn_size, n_ffn=n_routed, n_identity=n - n_routed,
                               top_k=int(router.top_k), routed_scaling_factor=float(router.routed_scaling_factor))


class LongcatFlashMoEPP(nn.Module):
    """Our LongCat-mode MoEPPLayer (`self.moepp`) with LongcatFlashMoE's contract:
    forward(hidden_states [..., D]) -> [..., D]. The router stays float32 through
    model casts; transformers' `output_router_logits` does not record it."""

    def __init__(self, layer: MoEPPLayer, skeleton: Optional[nn.Module] = None, stacked_rows: Optional[int] = None):
        """stacked_rows: the rows of the 5.x module's gate_up_proj (n_routed, or n_routed +
        zero_expert_num), None for 4.57's ModuleList; hf_state_dict writes that layout."""
        super().__init__()
        self.moepp = layer
        # The original module without storage, for restore_longcat_flash_moe; not a submodule.
        self.__dict__["_hf_skeleton"] = skeleton
        self.__dict__["_hf_dtype"] = layer.up.dtype
        self.__dict__["_hf_stacked_rows"] = stacked_rows

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.moepp(hidden_states)[0]

    def hf_state_dict(self) -> dict[str, Tensor]:
        """This layer's weights under LongcatFlashMoE's keys, for the layout it was swapped from
        (earlier 5.x: the identity experts' gate_up_proj rows, never read by transformers, are zeros)."""
        layer, cfg = self.moepp, self.moepp.config
        up, down = layer.up.detach(), layer.down.detach()
        out = {"router.classifier.weight": layer.router.gate_weight.detach().clone(),
               "router.e_score_correction_bias": layer.router.selection_bias.detach().clone()}
        if self._hf_stacked_rows is not None:
            unused = up.new_zeros(self._hf_stacked_rows - cfg.n_ffn, *up.shape[1:])
            out["experts.gate_up_proj"] = torch.cat([up, unused])
            out["experts.down_proj"] = down.clone()
            return out
        i = cfg.ffn_size
        for e in range(cfg.n_ffn):
            out[f"experts.{e}.gate_proj.weight"] = up[e, :i].clone()
            out[f"experts.{e}.up_proj.weight"] = up[e, i:].clone()
            out[f"experts.{e}.down_proj.weight"] = down[e].clone()
        return out

    def to_hf_module(self) -> nn.Module:
        """transformers' LongcatFlashMoE again, with this layer's current weights."""
        if self._hf_skeleton is None:
            raise ValueError("this layer was not made by replace_longcat_flash_moe: there is no module to rebuild")
        return rebuild(self._hf_skeleton, self.hf_state_dict(), self, self._hf_dtype, self.moepp.up.dtype)


def layer_from_longcat_flash_moe(module: nn.Module, name: str = "module", gemm_backend: str = "auto") -> MoEPPLayer:
    """A LongCat-mode MoEPPLayer holding one LongcatFlashMoE's weights (experts in their dtype
    and device, router float32)."""
    cfg = config_from_longcat_flash_moe(module, name)
    up, down = _expert_weights(module.experts, cfg.n_ffn, name)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=up.dtype, device=up.device, gemm_backend=gemm_backend)
    with torch.no_grad():
        layer.up.copy_(up)
        layer.down.copy_(down)
        layer.router.gate_weight.copy_(module.router.classifier.weight)
        layer.router.selection_bias.copy_(module.router.e_score_correction_bias)
    return layer


def replace_longcat_flash_moe(model: nn.Module, gemm_backend: str = "auto") -> list[str]:
    """Swap every LongcatFlashMoE of a transformers LongCat-Flash model (each decoder
    layer's `mlp`) for a LongcatFlashMoEPP holding its weights; the old module is
    dropped, its structure kept on the meta device for restore_longcat_flash_moe.
    Returns the swapped module names; ValueError when there are none."""

    def build(name: str, module: nn.Module) -> nn.Module:
        layer = layer_from_longcat_flash_moe(module, name, gemm_backend)
        experts = module.experts
        rows = experts.gate_up_proj.shape[0] if _stacked_layout(experts) else None
        return LongcatFlashMoEPP(layer, meta_skeleton(module), stacked_rows=rows)

    names = swap_modules(model, is_longcat_flash_moe, build)
    if not names:
        raise ValueError(f"{type(model).__name__} holds no LongcatFlashMoE module to swap ({SUPPORTED})")
    return names


def restore_longcat_flash_moe(model: nn.Module) -> list[str]:
    """The inverse of replace_longcat_flash_moe: each LongcatFlashMoEPP becomes transformers'
    LongcatFlashMoE again with the current weights (e.g. before `save_pretrained`).
    Returns the restored names."""
    return swap_modules(model, lambda m: isinstance(m, LongcatFlashMoEPP), lambda name, m: m.to_hf_module())
