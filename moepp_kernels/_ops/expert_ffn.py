"""The FFN experts' custom ops on permuted rows (private: moepp_kernels.expert_ffn
is the API; spec: "Experts"):

    xg = scale * x[token(row)]          fused gather (x*k folded in), never a copy of x_e
    h  = grouped GEMM 1: xg_e · U_eᵀ    [rows, 2I]
    a  = silu(h[:, :I]) * h[:, I:]      fused SwiGLU
    y  = grouped GEMM 2: a_e · V_eᵀ     [rows, D]

moepp::expert_ffn(x, up, down, row_src, slot_row, offsets, top_k, scale, backend)
-> (y, h) saves h only: a is recomputed by the fused SwiGLU backward and xg by the
gather, so no gathered copy of x outlives the forward. dx reaches tokens through a
deterministic per-token row sum (no atomics). Without autograd (inference)
moepp::expert_ffn_inference keeps no h at all: the Triton backend skips writing it.
`backend` is a resolved grouped_gemm backend.

The torch backend runs one expert at a time (it reads the offsets on the host
anyway): each expert's gathered rows, SwiGLU output and gradients live in
expert-sized buffers reused from expert to expert, so only y, h (when kept),
the row gradients and the weight gradients span all rows, and on the CPU those
come from the host block cache (moepp_kernels.host_cache) when large. That
spares the page faults of fresh temporaries, which cost as much as the
pointwise kernels themselves. On an AVX-512 CPU it runs kernels of our own over
every expert instead (csrc/moe/expert_gemms_cpu.h; uses_cpu_gemms says where):
the forward's gather, GEMM 1 and SwiGLU in one pass (x*k applied to the fp32
product) into an all-rows SwiGLU output, then GEMM 2; the backward's dA with the
SwiGLU backward as its epilogue, and dX; the weight gradients too in bf16 on CPUs
without AVX512-BF16 (uses_weight_grad_kernel), else per-expert products.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C, _cpu_matmul, grouped_gemm
from .._tensors import new_buffer, stream_handle, view
from . import call_op, custom_op


def _gather(x: Tensor, row_src: Tensor, offsets: Tensor, top_k: int, scale: float,
            out: Optional[Tensor] = None) -> Tensor:
    """out[r] = scale * x[row_src[r] // top_k] for r < offsets[-1]."""
    out = x.new_empty((row_src.shape[0], x.shape[1])) if out is None else out
    _C.gather_rows(view(x), view(row_src), view(offsets), top_k, scale, view(out), torch.get_num_threads(),
                   stream_handle(x.device))
    return out


def _swiglu(h: Tensor, offsets: Tensor, out: Tensor) -> Tensor:
    _C.swiglu_forward(view(h), view(offsets), view(out), torch.get_num_threads(), stream_handle(h.device))
    return out


class _ExpertRows:
    """The experts with rows (hi > lo) of a plan, in order, and per-expert views made in bulk:
    one split or unbind per tensor instead of a Python slice per expert and tensor (a decode
    step's few rows touch few experts, so empty ones are left out).

    experts: ids e; bounds: (lo, hi) of each; counts: one-element device tensors holding
    hi - lo (a one-expert plan for the pointwise kernels); widest: the largest hi - lo."""

    def __init__(self, offsets: Tensor):
        bounds = offsets.tolist()
        self._sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        self.experts = [e for e, n in enumerate(self._sizes) if n > 0]
        self.bounds = [(bounds[e], bounds[e + 1]) for e in self.experts]
        self.rows = bounds[-1]
        self.widest = max((hi - lo for lo, hi in self.bounds), default=0)
        all_counts = (offsets[1:] - offsets[:-1]).split(1)
        self.counts = [all_counts[e] for e in self.experts]

    def rows_of(self, t: Tensor) -> list:
        """t[lo:hi] of each expert."""
        parts = t[:self.rows].split(self._sizes)
        return [parts[e] for e in self.experts]

    def first_rows(self, buffer: Tensor) -> list:
        """buffer[:hi - lo] of each expert (a buffer reused from expert to expert)."""
        return [buffer[:hi - lo] for lo, hi in self.bounds]

    def weights(self, w: Tensor) -> list:
        """w[e] of each expert."""
        parts = w.unbind(0)
        return [parts[e] for e in self.experts]


# Whether this build and CPU run the CPU's own expert GEMMs (csrc/moe/expert_gemms_cpu.h).
CPU_GEMMS = _C.expert_gemms_cpu_supported()


def uses_cpu_gemms(x: Tensor, up: Tensor, down: Tensor) -> bool:
    """Whether the torch backend runs the CPU's own kernels over every expert instead of a product
    per expert: in the forward gather, GEMM 1 and SwiGLU in one and GEMM 2 in the other, in the
    backward dA with the SwiGLU backward in one and dX in the other (the weight gradients:
    uses_weight_grad_kernel). CPU tensors of one dtype (bf16 with D even, or fp32), I a multiple
    of 32, on an AVX-512 CPU. Measured (2 threads), the forward op at LongCat-Flash's layout (64
    experts, D 1024, I 512, T 2048) took on Zen 4 131 ms in fp32 and 72 ms in bf16 through them,
    145 and 76 ms through oneDNN's per-expert GEMMs with the gather and SwiGLU passes around
    them; on a Xeon whose AVX-512 has no BF16 (where torch's bf16 products run at a quarter of
    its fp32 speed) the whole layer's fp32 forward 124 vs 147 ms through MKL's, its backward
    223 vs 226 ms, and in bf16 forward and backward 351 vs 1383 ms through torch's products."""
    if not (CPU_GEMMS and x.device.type == "cpu" and up.dtype == x.dtype and down.dtype == x.dtype
            and up.shape[1] % 64 == 0):
        return False
    if x.dtype == torch.bfloat16:
        return x.shape[1] % 2 == 0
    return x.dtype == torch.float32


def uses_weight_grad_kernel(x: Tensor) -> bool:
    """Whether a backward through the own kernels also takes the weight gradients from one
    (weight_grad_cpu, fp32 FMAs over every expert): bf16 on a CPU without AVX512-BF16, where
    torch's bf16 products have no native instructions (at LongCat-Flash's layout d V and d U
    took 33 and 61 ms through it, 147 and 293 ms as torch's per-expert products). Elsewhere
    torch's products (MKL, oneDNN with AVX512-BF16) are at least as fast."""
    return x.dtype == torch.bfloat16 and not _C.expert_gemms_cpu_bf16_pairs()


def _torch_forward(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, offsets: Tensor, top_k: int, scale: float,
                   keep_h: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The torch backend's forward, one expert at a time or the CPU's own kernels: (y, h or None)."""
    rows, inner = row_src.shape[0], down.shape[2]
    y = new_buffer(x, (rows, x.shape[1]))
    h = new_buffer(x, (rows, 2 * inner)) if keep_h else None
    if uses_cpu_gemms(x, up, down):
        threads = torch.get_num_threads()
        a = new_buffer(x, (rows, inner))
        _C.up_swiglu_cpu(view(x), view(row_src), view(offsets), view(up), top_k, scale, view(a),
                         None if h is None else view(h), threads)
        _C.down_cpu(view(a), view(offsets), view(down), view(y), threads)
        return y, h
    ex = _ExpertRows(offsets)
    h_parts = ex.rows_of(h) if keep_h else ex.first_rows(x.new_empty((ex.widest, 2 * inner)))
    for src, count, xg, up_t, he, a, down_t, ye in zip(
            ex.rows_of(row_src), ex.counts, ex.first_rows(x.new_empty((ex.widest, x.shape[1]))),
            ex.weights(up.transpose(1, 2)), h_parts, ex.first_rows(x.new_empty((ex.widest, inner))),
            ex.weights(down.transpose(1, 2)), ex.rows_of(y)):
        _cpu_matmul.mm(_gather(x, src, count, top_k, scale, out=xg), up_t, out=he)
        _cpu_matmul.mm(_swiglu(he, count, a), down_t, out=ye)
    return y, h


# Measured (MKL 2024.2, one thread, fp32): dy [n, D] · V_e [D, I] runs at half speed for n < 192
# rows when V_e's rows are a multiple of 8 KiB apart (I = 2048, 4096: cache-set aliasing in the
# kernel MKL picks for few rows), e.g. 41 vs 87 GFLOP/s at n = 152, D = 768; two threads, 192 rows
# or other widths do not show it. Such an expert's product runs over a window of 192 valid rows of
# dy around its own (rows of a product are independent), which costs less from 96 rows on.
_FEW_ROWS, _FEW_ROWS_FLOOR, _ALIASED_ROW_BYTES = 192, 96, 8192


def _windowed_rows(dy_all: Tensor, down: Tensor, valid_rows: int) -> bool:
    """Whether grad_a's products for experts of 96 to 191 rows run over a 192-row window (MKL's
    products only, not oneDNN's where _cpu_matmul picks those)."""
    return (dy_all.dtype == torch.float32 and dy_all.device.type == "cpu" and torch.get_num_threads() == 1
            and torch.backends.mkl.is_available() and not _cpu_matmul.uses_onednn(dy_all)
            and valid_rows >= _FEW_ROWS
            and (down.shape[2] * down.element_size()) % _ALIASED_ROW_BYTES == 0)


def _windowed_grad_a(dy_all: Tensor, down_e: Tensor, lo: int, hi: int, valid_rows: int, out: Tensor) -> Tensor:
    """dy_all[lo:hi] · down_e, [hi - lo, I], written into rows of `out` (at least 192 rows),
    over a 192-row window of dy for experts of 96 to 191 rows."""
    n = hi - lo
    if not _FEW_ROWS_FLOOR <= n < _FEW_ROWS:
        return torch.mm(dy_all[lo:hi], down_e, out=out[:n])
    start = min(lo, valid_rows - _FEW_ROWS)
    torch.mm(dy_all[start:start + _FEW_ROWS], down_e, out=out[:_FEW_ROWS])
    return out[lo - start:hi - start]


def _weight_grads(up: Tensor, down: Tensor, ex: _ExpertRows) -> Tuple[Tensor, Tensor]:
    """Buffers for d up and d down, zero for the experts without rows (the others are written
    per expert)."""
    grad_up, grad_down = new_buffer(up, up.shape), new_buffer(down, down.shape)
    for e in sorted(set(range(up.shape[0])) - set(ex.experts)):
        grad_up[e].zero_()
        grad_down[e].zero_()
    return grad_up, grad_down


def _cpu_gemms_backward(grad_y: Tensor, x: Tensor, up: Tensor, down: Tensor, h: Tensor, row_src: Tensor,
                        slot_row: Tensor, offsets: Tensor, top_k: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The torch backend's backward through the CPU's own kernels (where uses_cpu_gemms), each over
    every expert: dh and a (da = dy·V_e with the SwiGLU backward as its epilogue) and the slot
    rows' dx (dh·U_e); then d V (dyᵀ·a) and d U (scale * dhᵀ·x, x's rows read through row_src)
    in one more each where uses_weight_grad_kernel, else per expert with torch's products, each
    expert's rows of x gathered into a buffer reused from expert to expert."""
    threads = torch.get_num_threads()
    rows, dim, inner = row_src.shape[0], x.shape[1], down.shape[2]
    dh, a, dxg = new_buffer(h, h.shape), new_buffer(x, (rows, inner)), new_buffer(x, (rows, dim))
    _C.swiglu_grad_cpu(view(grad_y), view(offsets), view(down), view(h), view(dh), view(a), threads)
    _C.up_grad_input_cpu(view(dh), view(offsets), view(up), view(dxg), threads)
    if uses_weight_grad_kernel(x):
        grad_up, grad_down = new_buffer(up, up.shape), new_buffer(down, down.shape)
        _C.weight_grad_cpu(view(grad_y), view(a), None, view(offsets), 1, 1.0, view(grad_down), threads)
        _C.weight_grad_cpu(view(dh), view(x), view(row_src), view(offsets), top_k, scale, view(grad_up), threads)
    else:
        ex = _ExpertRows(offsets)
        grad_up, grad_down = _weight_grads(up, down, ex)
        for dy, a_e, dh_e, src, count, xg, grad_up_e, grad_down_e in zip(
                ex.rows_of(grad_y), ex.rows_of(a), ex.rows_of(dh), ex.rows_of(row_src), ex.counts,
                ex.first_rows(x.new_empty((ex.widest, dim))), ex.weights(grad_up), ex.weights(grad_down)):
            _cpu_matmul.mm(dy.t(), a_e, out=grad_down_e)
            _cpu_matmul.mm(dh_e.t(), _gather(x, src, count, top_k, scale, out=xg), out=grad_up_e)
    grad_x = new_buffer(x, x.shape)
    _C.row_sum(view(dxg), view(slot_row), scale, view(grad_x), threads, 0)
    return grad_x, grad_up, grad_down


def _torch_backward(grad_y: Tensor, x: Tensor, up: Tensor, down: Tensor, h: Tensor, row_src: Tensor,
                    slot_row: Tensor, offsets: Tensor, top_k: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The torch backend's backward, one expert at a time (or _cpu_gemms_backward)."""
    if uses_cpu_gemms(x, up, down):
        return _cpu_gemms_backward(grad_y, x, up, down, h, row_src, slot_row, offsets, top_k, scale)
    threads, stream = torch.get_num_threads(), stream_handle(x.device)
    ex = _ExpertRows(offsets)
    inner = down.shape[2]
    windowed = _windowed_rows(grad_y, down, ex.rows)
    grad_up, grad_down = _weight_grads(up, down, ex)
    dxg = new_buffer(x, (row_src.shape[0], x.shape[1]))
    da_buf = x.new_empty((max(ex.widest, _FEW_ROWS) if windowed else ex.widest, inner))
    for (lo, hi), count, dy, he, down_e, da, a, dh, src, xg, up_e, dxg_e, grad_up_e, grad_down_e in zip(
            ex.bounds, ex.counts, ex.rows_of(grad_y), ex.rows_of(h), ex.weights(down), ex.first_rows(da_buf),
            ex.first_rows(x.new_empty((ex.widest, inner))), ex.first_rows(x.new_empty((ex.widest, 2 * inner))),
            ex.rows_of(row_src), ex.first_rows(x.new_empty((ex.widest, x.shape[1]))), ex.weights(up),
            ex.rows_of(dxg), ex.weights(grad_up), ex.weights(grad_down)):
        da = (_windowed_grad_a(grad_y, down_e, lo, hi, ex.rows, da_buf) if windowed
              else _cpu_matmul.mm(dy, down_e, out=da))
        _C.swiglu_backward(view(he), view(da), view(count), view(dh), view(a), threads, stream)
        _cpu_matmul.mm(dy.t(), a, out=grad_down_e)
        _cpu_matmul.mm(dh.t(), _gather(x, src, count, top_k, scale, out=xg), out=grad_up_e)
        _cpu_matmul.mm(dh, up_e, out=dxg_e)
    grad_x = new_buffer(x, x.shape)
    _C.row_sum(view(dxg), view(slot_row), scale, view(grad_x), threads, stream)
    return grad_x, grad_up, grad_down


def _forward_keeping_h(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, offsets: Tensor, top_k: int,
                       scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "torch":
        return _torch_forward(x, up, down, row_src, offsets, top_k, scale, keep_h=True)
    if backend == "triton":  # gather and SwiGLU fused into GEMM 1
        from .. import triton_ffn

        a, h = triton_ffn.gate_up_swiglu(x, up, row_src, offsets, top_k, scale)
        return triton_ffn.linear(a, down, offsets), h
    h = grouped_gemm.forward(_gather(x, row_src, offsets, top_k, scale), up, offsets, backend)
    a = _swiglu(h, offsets, h.new_empty((h.shape[0], h.shape[1] // 2)))
    return grouped_gemm.forward(a, down, offsets, backend), h


@torch.library.custom_op("moepp::expert_ffn", mutates_args=())
def expert_ffn(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, slot_row: Tensor, offsets: Tensor, top_k: int,
               scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """(y [R, D], h [R, 2I]) for the plan's R = T * k row slots."""
    return _forward_keeping_h(x, up, down, row_src, offsets, top_k, scale, backend)


@expert_ffn.register_fake
def _expert_ffn_fake(x, up, down, row_src, slot_row, offsets, *_scalars):
    rows = row_src.shape[0]
    return x.new_empty((rows, down.shape[1])), x.new_empty((rows, up.shape[1]))


def _expert_ffn_inference(x: Tensor, up: Tensor, down: Tensor, row_src: Tensor, offsets: Tensor, top_k: int,
                          scale: float, backend: str) -> Tensor:
    """y [R, D] without keeping h (no autograd)."""
    if backend == "triton":
        from .. import triton_ffn

        a, _ = triton_ffn.gate_up_swiglu(x, up, row_src, offsets, top_k, scale, store_h=False)
        return triton_ffn.linear(a, down, offsets)
    if backend == "torch":
        return _torch_forward(x, up, down, row_src, offsets, top_k, scale, keep_h=False)[0]
    return _forward_keeping_h(x, up, down, row_src, offsets, top_k, scale, backend)[0]


expert_ffn_inference = custom_op("expert_ffn_inference", _expert_ffn_inference)


@expert_ffn_inference.register_fake
def _expert_ffn_inference_fake(x, up, down, row_src, offsets, *_scalars):
    return x.new_empty((row_src.shape[0], down.shape[1]))


@torch.library.custom_op("moepp::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_y: Tensor, x: Tensor, up: Tensor, down: Tensor, h: Tensor, row_src: Tensor,
                        slot_row: Tensor, offsets: Tensor, top_k: int, scale: float,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx [T, D], d up, d down)."""
    if backend == "torch":
        return _torch_backward(grad_y, x, up, down, h, row_src, slot_row, offsets, top_k, scale)
    threads, stream = torch.get_num_threads(), stream_handle(x.device)
    grad_x = torch.empty_like(x)
    if backend == "triton":  # SwiGLU backward in dA's epilogue, gather in dU's prologue
        from .. import triton_ffn

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


@expert_ffn_backward.register_fake
def _expert_ffn_backward_fake(grad_y, x, up, down, h, row_src, slot_row, offsets, *_scalars):
    return torch.empty_like(x), torch.empty_like(up), torch.empty_like(down)


def _setup_context(ctx, inputs, output) -> None:
    x, up, down, row_src, slot_row, offsets, *scalars = inputs
    ctx.save_for_backward(x, up, down, output[1], row_src, slot_row, offsets)
    ctx.scalars = scalars  # top_k, scale, backend
    ctx.set_materialize_grads(False)  # h is never used downstream: no zero-filled gradient for it


def _backward(ctx, grad_y, _grad_h):
    """Gradients for (x, up, down, row_src, slot_row, offsets, top_k, scale, backend)."""
    if grad_y is None:
        return (None,) * 9
    x, up, down, h, row_src, slot_row, offsets = ctx.saved_tensors
    grad_x, grad_up, grad_down = torch.ops.moepp.expert_ffn_backward(
        grad_y.contiguous(), x, up, down, h, row_src, slot_row, offsets, *ctx.scalars)
    return grad_x, grad_up, grad_down, None, None, None, None, None, None


torch.library.register_autograd("moepp::expert_ffn", _backward, setup_context=_setup_context)


def apply_expert_ffn(x: Tensor, up: Tensor, down: Tensor, plan, top_k: int, scale: float, backend: str) -> Tensor:
    """y [T * k, D] through the op that keeps h when autograd needs it, else the
    inference op (arguments already validated)."""
    if torch.is_grad_enabled() and (x.requires_grad or up.requires_grad or down.requires_grad):
        return torch.ops.moepp.expert_ffn(x, up, down, plan.row_src, plan.slot_row, plan.offsets, top_k, scale,
                                          backend)[0]
    return call_op(torch.ops.moepp.expert_ffn_inference, x, up, down, plan.row_src, plan.offsets, top_k, scale,
                   backend)
