"""The combine epilogue's custom ops (private: moepp_kernels.combine is the API).

moepp::combine(x, y, topk_ids, topk_weights, slot_row, const_logits, const_value,
n_ffn, copy_begin, zero_begin, n_experts, scale) -> out, and its fused backward; the
layout scalars are positional (see _ops/router.py), made by layout_scalars(config).
"""

from typing import Tuple

import torch
from torch import Tensor

from .. import _C, _cpu_matmul
from .._tensors import converts_in_chunks, fp32_row_chunks, new_buffer, stream_handle, view
from ..config import MoEPPConfig
from . import custom_op, per_config


@per_config
def layout_scalars(config: MoEPPConfig) -> Tuple[int, int, int, int, float]:
    """(n_ffn, copy_begin, zero_begin, n_experts, scale) of `config`, the combine ops'
    scalar arguments (scale: the x*k factor)."""
    return (config.n_ffn, config.copy_begin, config.zero_begin, config.n_experts,
            config.input_scale)


def _inputs(x, y, topk_ids, topk_weights, slot_row, const_logits, const_value):
    return _C.CombineViews(view(x), view(y), view(topk_ids), view(topk_weights), view(slot_row), view(const_logits),
                           view(const_value))


def _combine(x: Tensor, y: Tensor, topk_ids: Tensor, topk_weights: Tensor, slot_row: Tensor, const_logits: Tensor,
             const_value: Tensor, n_ffn: int, copy_begin: int, zero_begin: int, n_experts: int,
             scale: float) -> Tensor:
    out = new_buffer(x, x.shape)
    _C.combine_forward(_inputs(x, y, topk_ids, topk_weights, slot_row, const_logits, const_value),
                       _C.ExpertLayout(n_ffn, copy_begin, zero_begin, n_experts), scale, view(out),
                       torch.get_num_threads(), stream_handle(x.device))
    return out


combine = custom_op("combine", _combine)


@combine.register_fake
def _combine_fake(x, y, topk_ids, topk_weights, slot_row, const_logits, const_value, *_layout):
    return torch.empty_like(x)


@torch.library.custom_op("moepp::combine_backward", mutates_args=())
def combine_backward(grad_out: Tensor, x: Tensor, y: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                     slot_row: Tensor, const_logits: Tensor, const_value: Tensor, n_ffn: int, copy_begin: int,
                     zero_begin: int, n_experts: int, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, d topk_weights, d const_logits, d const_value)."""
    tokens, k = topk_ids.shape
    n_const = const_value.shape[0]
    grad_x = new_buffer(x, x.shape)
    grad_y = new_buffer(y, y.shape)
    if y.device.type != "cpu":  # rows no slot reads get their true gradient, 0 (the CPU op writes them)
        grad_y.zero_()
    grad_weights = topk_weights.new_empty((tokens, k))
    grad_logits = const_logits.new_empty((tokens, 2 * n_const))
    v_coef = const_logits.new_empty((tokens, n_const))
    _C.combine_backward(_inputs(x, y, topk_ids, topk_weights, slot_row, const_logits, const_value),
                        _C.ExpertLayout(n_ffn, copy_begin, zero_begin, n_experts), scale, view(grad_out),
                        view(grad_y), view(grad_x), view(grad_weights), view(grad_logits), view(v_coef),
                        torch.get_num_threads(), stream_handle(x.device))
    return grad_x, grad_y, grad_weights, grad_logits, _grad_const_value(v_coef, grad_out, const_value.dtype)


def _grad_const_value(v_coef: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """dv_c = Σ_t v_coef[t, c] · grad_out[t] in fp32 ([n_const, D] in `dtype`), v_coef [T, n_const] fp32
    (gate · a2 per token: spec "Experts", the constant expert). A bf16 / fp16 grad_out on the CPU
    is read a chunk of rows at a time (_tensors.fp32_row_chunks), not as a [T, D] fp32 copy."""
    if not converts_in_chunks(grad_out):
        return _cpu_matmul.mm(v_coef.t(), grad_out.float()).to(dtype)
    total = v_coef.new_zeros((v_coef.shape[1], grad_out.shape[1]))
    for lo, hi, rows in fp32_row_chunks(grad_out):
        total = _cpu_matmul.add_mm(total, v_coef[lo:hi].t(), rows)
    return total.to(dtype)


@combine_backward.register_fake
def _combine_backward_fake(grad_out, x, y, topk_ids, topk_weights, slot_row, const_logits, const_value, *_layout):
    tokens, k = topk_ids.shape
    return (torch.empty_like(x), torch.empty_like(y), topk_weights.new_empty((tokens, k)),
            torch.empty_like(const_logits), torch.empty_like(const_value))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:7])
    ctx.layout = inputs[7:]


def _backward(ctx, grad_out):
    """Gradients for (x, y, topk_ids, topk_weights, slot_row, const_logits, const_value, layout...)."""
    grad_x, grad_y, grad_weights, grad_logits, grad_value = torch.ops.moepp.combine_backward(
        grad_out.contiguous(), *ctx.saved_tensors, *ctx.layout)
    return grad_x, grad_y, None, grad_weights, None, grad_logits, grad_value, None, None, None, None, None


torch.library.register_autograd("moepp::combine", _backward, setup_context=_setup_context)
