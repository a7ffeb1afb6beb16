"""moepp_kernels: fused kernels for MoE++ layers (zero, copy and constant experts)."""

import torch  # noqa: F401  (first: _C then binds to torch's OpenMP runtime, see csrc/parallel.h)

from . import host_cache, reference
from ._C import built_with_cuda
from .combine import combine
from .config import MoEPPConfig
from .expert_ffn import expert_ffn
from .integrations.released_moepp import replace_moepp_layers, restore_moepp_layers
from .layer import MoEPPLayer, load_balance_loss, moepp_layer
from .permute import PermutationPlan, build_plan
from .router import MoEPPRouter, RouterOutput, fused_router

__version__ = "0.1.0"
__all__ = [
    "MoEPPConfig",
    "MoEPPLayer",
    "MoEPPRouter",
    "PermutationPlan",
    "RouterOutput",
    "build_plan",
    "built_with_cuda",
    "combine",
    "expert_ffn",
    "fused_router",
    "host_cache",
    "load_balance_loss",
    "moepp_layer",
    "reference",
    "replace_moepp_layers",
    "restore_moepp_layers",
]
