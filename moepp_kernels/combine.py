"""The combine epilogue (spec: "Combine"), one pass per token:

    out[t] = Σ_FFN gate·y[row] + Σ_copy gate·x_e[t] + Σ_constant gate·(a1·x_e[t] + a2·v_c)

with [a1, a2] = softmax of the constant expert's two mixing logits, zero slots
contributing nothing (they never read x, y or v), fp32 accumulation and one
write in the model dtype. The backward gives dx (copy and constant paths), dy
rows for the FFN experts, the gates' gradients (to the router), the mixing
logits' gradients and dv. The custom ops are in _ops/combine.py; this is the
validating entry point.
"""

import torch
from torch import Tensor

from ._ops import call_op
from ._ops.combine import layout_scalars
from ._tensors import MODEL_DTYPES, check_backend, check_tensor
from .config import MoEPPConfig
from .permute import check_plan


def combine(x: Tensor, y: Tensor, route, plan, const_logits: Tensor, const_value: Tensor,
            config: MoEPPConfig) -> Tensor:
    """out [T, D] in x's dtype.

    Args:
        x: [T, D] the layer's input (float32, bfloat16 or float16); x_e = x * top_k
            when config.scale_input_by_topk.
        y: [T * k, D] the FFN experts' outputs by permuted row (expert_ffn), x's dtype.
        route: the RouterOutput of these tokens (topk_ids [T, k] int32, topk_weights
            [T, k] float32).
        plan: the PermutationPlan of route.topk_ids (build_plan).
        const_logits: [T, 2 * n_constant] float32 mixing logits of the constant experts (x_e · W_cᵀ).
        const_value: [n_constant, D] the constant experts' vectors, x's dtype.
        config: the layer's expert layout.
    Differentiable w.r.t. x, y, route.topk_weights, const_logits and const_value.
    The ids and the plan's indices are checked on the CPU (O(T * k)), raising
    ValueError. On CUDA a check would wait for the device: it runs only with
    MOEPP_CHECK_INDICES=1; otherwise the kernel skips slots whose id or row is out of
    range (they add nothing).
    """
    if not isinstance(config, MoEPPConfig):
        raise TypeError(f"config must be a MoEPPConfig, got {type(config).__name__}")
    check_tensor("x", x, dtypes=MODEL_DTYPES, shape=(None, config.hidden_size))
    tokens, k, c = x.shape[0], config.top_k, config.n_constant
    dev = x.device
    check_tensor("y", y, dtypes=(x.dtype,), shape=(tokens * k, config.hidden_size), device=dev)
    for name in ("topk_ids", "topk_weights"):
        if not hasattr(route, name):
            raise TypeError(f"route must be the router's output (with {name}), got {type(route).__name__}")
    ids = check_tensor("route.topk_ids", route.topk_ids, dtypes=(torch.int32,), shape=(tokens, k), device=dev)
    check_tensor("route.topk_weights", route.topk_weights, dtypes=(torch.float32,), shape=(tokens, k), device=dev)
    check_tensor("const_logits", const_logits, dtypes=(torch.float32,), shape=(tokens, 2 * c), device=dev)
    check_tensor("const_value", const_value, dtypes=(x.dtype,), shape=(c, config.hidden_size), device=dev)
    check_backend(dev)
    check_plan(plan, tokens, k, config.n_ffn, dev, topk_ids=ids, n_experts=config.n_experts)
    return call_op(torch.ops.moepp.combine, x, y, ids, route.topk_weights, plan.slot_row, const_logits, const_value,
                   *layout_scalars(config))
