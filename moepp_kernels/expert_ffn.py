"""FFN experts on permuted rows (spec: "Experts"):

    xg = scale * x[token(row)]          fused gather (x*k folded in), never a copy of x_e
    h  = grouped GEMM 1: xg_e · U_eᵀ    [rows, 2I]
    a  = silu(h[:, :I]) * h[:, I:]      fused SwiGLU
    y  = grouped GEMM 2: a_e · V_eᵀ     [rows, D]

Backward saves h only: a is recomputed by the fused SwiGLU backward and xg by
the gather, so no gathered copy of x outlives the forward. dx reaches tokens
through a deterministic per-token row sum (no atomics). Without autograd
(inference) a second op keeps no h at all: the Triton backend skips writing it,
and the torch backend runs each expert's GEMM 1 -> SwiGLU -> GEMM 2 on
expert-sized temporaries.
"""

from typing import Tuple

import torch
from torch import Tensor

from . import _C, grouped_gemm
from ._tensors import stream_handle, view


def _gather(x: Tensor, row_src: Tensor, offsets: Tensor, top_k: int, scale: float) -> Tensor:
    xg = x.new_empty((row_src.shape[0], x.shape[1]))
    _C.gather_rows(view(x), view(row_src), view(offsets), top_k, scale, view(xg), torch.get_num_threads(),
                   stream_handle(x.device))
    return xg


def _forward_keeping_h(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, offsets: Tensor, top_k: int,
                       scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "triton":  # gather and SwiGLU fused into GEMM 1
        from . import triton_ffn

        a, h = triton_ffn.gate_up_swiglu(x, up, row_src, offsets, top_k, scale)
        return triton_ffn.linear(a, down, offsets), h
    xg = _gather(x, row_src, offsets, top_k, scale)
    h = grouped_gemm.forward(xg, up, offsets, backend)
    a = h.new_empty((h.shape[0], h.shape[1] // 2))
    _C.swiglu_forward(view(h), view(offsets), view(a), torch.get_num_threads(), stream_handle(x.device))
    return grouped_gemm.forward(a, down, offsets, backend), h


@torch.library.custom_op("moepp::expert_ffn", mutates_args=())
def _expert_ffn(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, slot_row: Tensor, offsets: Tensor, top_k: int,
                scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    return _forward_keeping_h(x, up, down, row_src, offsets, top_k, scale, backend)


@_expert_ffn.register_fake
def _expert_ffn_fake(x, up, down, row_src, slot_row, offsets, top_k, scale, backend):
    rows = row_src.shape[0]
    return x.new_empty((rows, down.shape[1])), x.new_empty((rows, up.shape[1]))


@torch.library.custom_op("moepp::expert_ffn_inference", mutates_args=())
def _expert_ffn_inference(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, offsets: Tensor, top_k: int,
                          scale: float, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_ffn

        a, _ = triton_ffn.gate_up_swiglu(x, up, row_src, offsets, top_k, scale, store_h=False)
        return triton_ffn.linear(a, down, offsets)
    if backend != "torch":
        return _forward_keeping_h(x, up, down, row_src, offsets, top_k, scale, backend)[0]
    threads, stream = torch.get_num_threads(), stream_handle(x.device)
    xg = _gather(x, row_src, offsets, top_k, scale)
    y = x.new_empty((row_src.shape[0], down.shape[1]))
    rows = offsets[1:] - offsets[:-1]  # rows[e:e+1] is a one-expert plan for the SwiGLU kernel
    bounds = offsets.tolist()
    for e in range(up.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            h = torch.matmul(xg[lo:hi], up[e].t())
            a = h.new_empty((hi - lo, h.shape[1] // 2))
            _C.swiglu_forward(view(h), view(rows[e:e + 1]), view(a), threads, stream)
            torch.matmul(a, down[e].t(), out=y[lo:hi])
    return y


@_expert_ffn_inference.register_fake
def _expert_ffn_inference_fake(x, up, down, row_src, offsets, top_k, scale, backend):
    return x.new_empty((row_src.shape[0], down.shape[1]))


@torch.library.custom_op("moepp::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(grad_y: Tensor, x: Tensor, up: Tensor, down: Tensor, h: Tensor, row_src: Tensor,
                         slot_row: Tensor, offsets: Tensor, top_k: int, scale: float,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dev = x.device
    threads, stream = torch.get_num_threads(), stream_handle(dev)
    grad_x = torch.empty_like(x)
    if backend == "triton":  # SwiGLU backward in dA's epilogue, gather in dU's prologue
        from . import triton_ffn

        dh, a = triton_ffn.swiglu_grad_input(grad_y, down, h, offsets)
        grad_down = triton_ffn.weight_grad(grad_y, a, offsets)
        grad_up = triton_ffn.weight_grad(dh, x, offsets, row_src, top_k, scale)
        dxg = triton_ffn.linear_grad_input(dh, up, offsets)
        _C.row_sum(view(dxg), view(slot_row), scale, view(grad_x), threads, stream)
        return grad_x, grad_up, grad_down
    da = grouped_gemm.grad_input(grad_y, down, offsets, backend)
    a = h.new_empty((h.shape[0], h.shape[1] // 2))
    dh = torch.empty_like(h)
    _C.swiglu_backward(view(h), view(da), view(offsets), view(dh), view(a), threads, stream)
    grad_down = grouped_gemm.grad_weight(grad_y, a, offsets, backend)
    xg = _gather(x, row_src, offsets, top_k, scale)
    grad_up = grouped_gemm.grad_weight(dh, xg, offsets, backend)
    dxg = grouped_gemm.grad_input(dh, up, offsets, backend)
    _C.row_sum(view(dxg), view(slot_row), scale, view(grad_x), threads, stream)
    return grad_x, grad_up, grad_down


@_expert_ffn_backward.register_fake
def _expert_ffn_backward_fake(grad_y, x, up, down, h, row_src, slot_row, offsets, top_k, scale, backend):
    return torch.empty_like(x), torch.empty_like(up), torch.empty_like(down)


def _setup_context(ctx, inputs, output) -> None:
    x, up, down, row_src, slot_row, offsets, top_k, scale, backend = inputs
    ctx.save_for_backward(x, up, down, output[1], row_src, slot_row, offsets)
    ctx.top_k, ctx.scale, ctx.backend = top_k, scale, backend


def _backward(ctx, grad_y, _grad_h):
    x, up, down, h, row_src, slot_row, offsets = ctx.saved_tensors
    grad_x, grad_up, grad_down = torch.ops.moepp.expert_ffn_backward(
        grad_y.contiguous(), x, up, down, h, row_src, slot_row, offsets, ctx.top_k, ctx.scale, ctx.backend)
    return grad_x, grad_up, grad_down, None, None, None, None, None, None


torch.library.register_autograd("moepp::expert_ffn", _backward, setup_context=_setup_context)


def expert_ffn(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, slot_row: Tensor, offsets: Tensor, top_k: int,
               scale: float, backend: str) -> Tensor:
    """y [T * k, D]: FFN outputs by permuted row (rows past offsets[-1] unused).

    x [T, D], up [n_ffn, 2I, D], down [n_ffn, D, I] in one dtype; the plan's
    row_src / slot_row / offsets; scale multiplies x (the x*k flag). Callers
    validate (see layer.py); backend is a resolved grouped_gemm backend.
    """
    if torch.is_grad_enabled() and (x.requires_grad or up.requires_grad or down.requires_grad):
        return torch.ops.moepp.expert_ffn(x, up, down, row_src, slot_row, offsets, top_k, scale, backend)[0]
    return torch.ops.moepp.expert_ffn_inference(x, up, down, row_src, offsets, top_k, scale, backend)
