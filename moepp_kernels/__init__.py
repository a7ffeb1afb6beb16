"""moepp_kernels: fused kernels for MoE++ layers (zero, copy and constant experts)."""

from . import reference
from ._C import built_with_cuda
from .config import MoEPPConfig
from .router import MoEPPRouter, RouterOutput, fused_router

__version__ = "0.1.0"
__all__ = ["MoEPPConfig", "MoEPPRouter", "RouterOutput", "built_with_cuda", "fused_router", "reference"]
