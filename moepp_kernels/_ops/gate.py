"""The gate's product in fp32 (spec: the router runs in fp32) on tokens of any model dtype:

    moepp::gate_linear(x [T, D], weight [N, D] fp32) -> x·Wᵀ [T, N] fp32

and its backward, with no fp32 copy of x kept for the backward (autograd keeps x itself,
which the layer's other ops keep anyway): `F.linear(x.float(), W)` would keep one, an
activation twice x's size per layer in bf16. On the CPU, bf16 / fp16 rows are converted a
chunk at a time into one reused fp32 buffer (_tensors.fp32_row_chunks); elsewhere the fp32
copy is a transient of the op.
"""

from typing import Tuple

import torch
from torch import Tensor

from .. import _cpu_matmul
from .._tensors import converts_in_chunks, fp32_row_chunks, new_buffer
from . import custom_op


def _gate_linear(x: Tensor, weight: Tensor) -> Tensor:
    if not converts_in_chunks(x):
        return _cpu_matmul.mm(x.float(), weight.t())
    out = x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    for lo, hi, rows in fp32_row_chunks(x):
        _cpu_matmul.mm(rows, weight.t(), out=out[lo:hi])
    return out


gate_linear = custom_op("gate_linear", _gate_linear)


@gate_linear.register_fake
def _gate_linear_fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


# fp32 dx = grad·W on the CPU over at most this many experts (K) goes straight into a cached
# buffer (_cpu_matmul.mm_into: no fresh [T, D] product to fault in, 2048 faults a step at T 2048,
# D 1024, about 3 ms); over more, oneDNN's faster product (up to 2x MKL's on Zen 5) outweighs them.
_INTO_MAX_EXPERTS = 128


@torch.library.custom_op("moepp::gate_linear_backward", mutates_args=())
def gate_linear_backward(grad: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(dx = grad·W in x's dtype, dW = gradᵀ·x in fp32) for grad [T, N] fp32."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and weight.shape[0] <= _INTO_MAX_EXPERTS:
        return _cpu_matmul.mm_into(grad, weight, new_buffer(x, x.shape)), _cpu_matmul.mm(grad.t(), x)
    if not converts_in_chunks(x):
        return _cpu_matmul.mm(grad, weight).to(x.dtype), _cpu_matmul.mm(grad.t(), x.float())
    grad_x = new_buffer(x, x.shape)
    grad_weight = torch.zeros_like(weight)
    for lo, hi, rows in fp32_row_chunks(x):
        grad_weight = _cpu_matmul.add_mm(grad_weight, grad[lo:hi].t(), rows)
        grad_x[lo:hi].copy_(_cpu_matmul.mm(grad[lo:hi], weight, out=rows))  # rows is free again
    return grad_x, grad_weight


@gate_linear_backward.register_fake
def _gate_linear_backward_fake(grad, x, weight):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return torch.ops.moepp.gate_linear_backward(grad.contiguous(), *ctx.saved_tensors)


torch.library.register_autograd("moepp::gate_linear", _backward, setup_context=_setup_context)
