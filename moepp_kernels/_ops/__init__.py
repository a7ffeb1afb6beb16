"""The flat torch.library custom ops (moepp::*), one module per op family: typed
keyword-only scalars, fake (meta) implementations for torch.compile, fused
backward ops registered as their autograd. Private: callers validate first. The
public, validating API is moepp_kernels.fused_router / build_plan / expert_ffn /
combine and the layer."""

from . import combine, expert_ffn, plan, router  # noqa: F401  (registers every moepp:: op)
