"""The routing-score residual as a GEMM, for layouts too wide for the router kernel's own
(spec: "Router", l' = l + r·Gᵀ; moepp_kernels.router.RESIDUAL_IN_KERNEL_MAX_EXPERTS):

    moepp::residual_logits(logits [T, N], prev_logits [T, N], weight [N, N]) -> logits + prev_logits·Wᵀ

and its backward, moepp::residual_logits_backward(grad [T, N], prev_logits, weight) ->
(d prev_logits = grad·W, dW = gradᵀ·prev_logits); d logits is grad itself. All fp32. The
products run through _cpu_matmul: on the CPUs where it picks oneDNN, the sum is the
product's epilogue rather than a second pass over [T, N].
"""

from typing import Tuple

import torch
from torch import Tensor

from .. import _cpu_matmul
from . import custom_op


def _residual_logits(logits: Tensor, prev_logits: Tensor, weight: Tensor) -> Tensor:
    return _cpu_matmul.add_mm(logits, prev_logits, weight.t())


residual_logits = custom_op("residual_logits", _residual_logits)


@residual_logits.register_fake
def _residual_logits_fake(logits, prev_logits, weight):
    return torch.empty_like(logits)


@torch.library.custom_op("moepp::residual_logits_backward", mutates_args=())
def residual_logits_backward(grad: Tensor, prev_logits: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad·W [T, N], gradᵀ·prev_logits [N, N]) for grad [T, N]."""
    return _cpu_matmul.mm(grad, weight), _cpu_matmul.mm(grad.t(), prev_logits)


@residual_logits_backward.register_fake
def _residual_logits_backward_fake(grad, prev_logits, weight):
    return torch.empty_like(prev_logits), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad):
    prev_logits, weight = ctx.saved_tensors
    grad_prev, grad_weight = torch.ops.moepp.residual_logits_backward(grad.contiguous(), prev_logits, weight)
    return grad, grad_prev, grad_weight


torch.library.register_autograd("moepp::residual_logits", _backward, setup_context=_setup_context)
