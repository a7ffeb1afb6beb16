"""Triton backend of the FFN experts: grouped GEMMs over the permutation plan's
expert-sorted rows, with

  * the gather fused into GEMM 1's prologue: rows of x are read through the
    plan (x[row_src // k] * scale), no gathered copy of x is ever made;
  * SwiGLU fused into GEMM 1's epilogue (two accumulators: gate and up
    columns), writing a = silu(gate) * up and, for the backward, h;
  * the SwiGLU backward fused into the epilogue of dA = dY · V_e, writing
    dh = [dgate | dup] and the recomputed a;
  * per-expert weight gradients dW_e = dY_eᵀ · X_e as a reduction over the
    expert's rows (the gather fused again for dU).

Group sizes are read on the device: each program loads the plan's offsets in
one vector, turns them into per-expert tile counts and their running sum in
registers, and finds its expert by counting the experts whose tiles end at or
before its own; nothing waits for the host and no helper kernel runs. Offsets and
row sources are read with any values in them: groups are clamped into the buffers'
rows and a slot naming no token reads zeros (as the CUDA kernels do, csrc/moe/indices.h). Programs
are ordered in groups of GROUP_M M tiles sweeping the N tiles, so a group's rows
and the expert's weights both stay in L2.

Tile configurations come from CONFIGS, keyed by architecture and a shape bucket
(average rows per expert); bench/tune_triton.py measures candidates on a GPU and
prints a table to paste here.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

EPILOGUE_NONE, EPILOGUE_SWIGLU, EPILOGUE_SWIGLU_BWD = 0, 1, 2
MIN_TRITON = (3, 6)  # the oldest Triton these kernels are tested with


def triton_version() -> tuple:
    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (arch, bucket) -> config; bucket "small" when the average rows per expert is <= 64 (decode).
# Starting points, not yet measured: bench/tune_triton.py on a GPU replaces them.
CONFIGS = {
    ("sm90", "small"): TileConfig(64, 128, 64, 4, 4),  # BLOCK_M >= 64 keeps Hopper's wgmma
    ("sm90", "large"): TileConfig(128, 128, 64, 8, 3),
    ("sm80", "small"): TileConfig(32, 128, 32, 4, 4),
    ("sm80", "large"): TileConfig(128, 128, 32, 8, 3),
    ("default", "small"): TileConfig(32, 64, 32, 4, 2),
    ("default", "large"): TileConfig(64, 64, 32, 4, 2),
}
# Weight gradients: BLOCK_M is the reduction depth (rows), BLOCK_N x BLOCK_K the output tile.
WGRAD_CONFIGS = {
    "sm90": TileConfig(64, 128, 128, 8, 3),
    "sm80": TileConfig(32, 128, 128, 8, 3),
    "default": TileConfig(32, 64, 64, 4, 2),
}
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 1, 1)  # TRITON_INTERPRET=1 (CPU): small and quick
GROUP_M = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def arch_of(device: torch.device) -> str:
    """sm90 (H100/H200), sm80 (A100: 163 KB of shared memory; sm_86/89 have less), else default."""
    if device.type != "cuda":
        return "default"
    return {(9, 0): "sm90", (8, 0): "sm80"}.get(torch.cuda.get_device_capability(device), "default")


def pick_config(device: torch.device, rows: int, groups: int, epilogue: int = EPILOGUE_NONE) -> TileConfig:
    if interpreting():
        return INTERPRETER_CONFIG
    bucket = "small" if rows <= 64 * max(groups, 1) else "large"
    cfg = CONFIGS[(arch_of(device), bucket)]
    if epilogue != EPILOGUE_NONE and cfg.block_n > 64:
        cfg = cfg._replace(block_n=64)  # two accumulators (SwiGLU) or five live tiles (its backward)
    return cfg


def pick_wgrad_config(device: torch.device) -> TileConfig:
    return INTERPRETER_CONFIG if interpreting() else WGRAD_CONFIGS[arch_of(device)]


@triton.jit
def _clamp_rows(lo, hi, rows):
    """An expert's [lo, hi) clamped into [0, rows), ending no earlier than it starts:
    offsets with any values in them never name rows outside the buffers."""
    lo = tl.minimum(tl.maximum(lo, 0), rows)
    return lo, tl.minimum(tl.maximum(hi, lo), rows)


@triton.jit
def _locate_tile(offsets_ptr, pid_m, groups, rows, BLOCK_M: tl.constexpr, GROUPS_P2: tl.constexpr):
    """(total M tiles, first row, end row) of M tile pid_m: expert e owns tiles
    [sum of earlier experts' cdiv(rows, BLOCK_M), + its own)."""
    idx = tl.arange(0, GROUPS_P2)
    ok = idx < groups
    lo, hi = _clamp_rows(tl.load(offsets_ptr + idx, mask=ok, other=0), tl.load(offsets_ptr + idx + 1, mask=ok, other=0),
                         rows)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    mine = idx == e
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), axis=0)
    row_begin = tl.sum(tl.where(mine, lo, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    return tl.sum(tiles, axis=0), row_begin, tl.sum(tl.where(mine, hi, 0), axis=0), e


@triton.jit
def _row_block(row_src_ptr, row_begin, row_end, src_slots, GATHER: tl.constexpr, TOP_K: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Rows [row_begin, row_begin + BLOCK_M) of the plan, which of them are the
    expert's, the row of A each reads (x's token, row_src // k, when gathering) and
    which of those reads are real: a slot outside [0, src_slots) names no token, and
    its row is read as zeros."""
    rows = row_begin + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if GATHER:
        slot = tl.load(row_src_ptr + rows, mask=row_ok, other=0)
        src_ok = row_ok & (slot >= 0) & (slot < src_slots)
        src = tl.where(src_ok, slot, 0) // TOP_K
    else:
        src = rows
        src_ok = row_ok
    return rows, row_ok, src, src_ok


@triton.jit
def grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, offsets_ptr, row_src_ptr, h_ptr, act_ptr,
    N, K, groups, num_pid_m, total_rows, src_slots, scale,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_hm, stride_actm, up_offset,
    GATHER: tl.constexpr, TOP_K: tl.constexpr, EPILOGUE: tl.constexpr, STORE_H: tl.constexpr,
    PRECISION: tl.constexpr, GROUPS_P2: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[r, n] = sum_k A[src(r), k] * B_e[k, n] over expert e's rows r, with B_e
    addressed by strides (W_eᵀ for the forward, W_e for the data gradient).
    EPILOGUE_SWIGLU: a second accumulator over B at +up_offset (the 'up'
    columns); C gets a = silu(gate) * up, h gets [gate | up] when STORE_H.
    EPILOGUE_SWIGLU_BWD: the accumulator is da; with h it writes dh = [dgate |
    dup] to C and the recomputed a to act."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    total_tiles, row_begin, row_end, e = _locate_tile(offsets_ptr, pid_m, groups, total_rows, BLOCK_M, GROUPS_P2)
    if pid_m >= total_tiles:
        return
    _, row_ok, src, src_ok = _row_block(row_src_ptr, row_begin, row_end, src_slots, GATHER, TOP_K, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if EPILOGUE == 1:
            b_up = tl.load(b_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if GATHER:
        acc = acc * scale
        acc_up = acc_up * scale
    mask = row_ok[:, None] & col_ok[None, :]
    # Output addresses: one int64 base per matrix at the tile's first row, int32 offsets within
    # the tile (full-tile int64 pointers cost registers the SwiGLU epilogues do not have).
    first_row = row_begin.to(tl.int64)
    tile_rows = tl.arange(0, BLOCK_M)[:, None]
    c_tile = c_ptr + first_row * stride_cm + tile_rows * stride_cm + cols[None, :]
    out_ty = c_ptr.dtype.element_ty
    if EPILOGUE == 0:
        tl.store(c_tile, acc.to(out_ty), mask=mask)
    elif EPILOGUE == 1:
        gate = acc
        up = acc_up
        if STORE_H:  # a from the rounded h, as the backward will see it
            gate = acc.to(out_ty).to(tl.float32)
            up = acc_up.to(out_ty).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up
        tl.store(c_tile, act.to(out_ty), mask=mask)
        if STORE_H:
            h_tile = h_ptr + first_row * stride_hm + tile_rows * stride_hm + cols[None, :]
            tl.store(h_tile, gate.to(out_ty), mask=mask)
            tl.store(h_tile + N, up.to(out_ty), mask=mask)
    else:
        h_tile = h_ptr + first_row * stride_hm + tile_rows * stride_hm + cols[None, :]
        gate = tl.load(h_tile, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_tile + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(c_tile, (acc * up * sig * (1.0 + gate * (1.0 - sig))).to(out_ty), mask=mask)
        tl.store(c_tile + N, (acc * silu).to(out_ty), mask=mask)
        act_tile = act_ptr + first_row * stride_actm + tile_rows * stride_actm + cols[None, :]
        tl.store(act_tile, (silu * up).to(out_ty), mask=mask)


@triton.jit
def grouped_wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr, offsets_ptr, row_src_ptr,
    N, K, total_rows, src_slots, scale,
    stride_dym, stride_xm, stride_dwe, stride_dwn,
    GATHER: tl.constexpr, TOP_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_e[n, k] = sum over expert e's rows r of dY[r, n] * X[src(r), k] (zeros
    for an expert without rows)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2)
    row_begin, row_end = _clamp_rows(tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1), total_rows)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows, row_ok, src, src_ok = _row_block(row_src_ptr, r0, row_end, src_slots, GATHER, TOP_K, BLOCK_M)
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + ns[None, :],
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    if GATHER:
        acc = acc * scale
    out = dw_ptr + e.to(tl.int64) * stride_dwe + ns[:, None] * stride_dwn + ks[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(groups: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(groups, 1))))


def _launch_mm(a: Tensor, b: Tensor, c: Tensor, offsets: Tensor, n: int, k: int, b_strides: tuple, *,
               row_src: Tensor | None = None, top_k: int = 1, scale: float = 1.0, epilogue: int = EPILOGUE_NONE,
               h: Tensor | None = None, act: Tensor | None = None, store_h: bool = False, up_offset: int = 0) -> None:
    groups = offsets.shape[0] - 1
    rows = c.shape[0]
    if rows == 0 or groups == 0 or n == 0:
        return
    cfg = pick_config(a.device, rows, groups, epilogue)
    num_pid_m = triton.cdiv(rows, cfg.block_m) + min(groups, rows)  # a partial tile per expert with rows
    grid = (num_pid_m * triton.cdiv(n, cfg.block_n),)
    dummy = c
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        grouped_mm_kernel[grid](
            a, b, c, offsets, row_src if row_src is not None else offsets,
            h if h is not None else dummy, act if act is not None else dummy,
            n, k, groups, num_pid_m, rows, a.shape[0] * top_k if row_src is not None else rows, scale,
            a.stride(0), a.stride(1), b_strides[0], b_strides[1], b_strides[2], c.stride(0),
            h.stride(0) if h is not None else 0, act.stride(0) if act is not None else 0, up_offset,
            GATHER=row_src is not None, TOP_K=top_k, EPILOGUE=epilogue, STORE_H=store_h,
            PRECISION=_precision(a.dtype), GROUPS_P2=_pow2(groups), GROUP_M=GROUP_M,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def gate_up_swiglu(x: Tensor, up: Tensor, row_src: Tensor, offsets: Tensor, top_k: int, scale: float,
                   store_h: bool = True) -> tuple[Tensor, Tensor | None]:
    """GEMM 1 with the gather and SwiGLU fused: a [T * k, I] and h [T * k, 2I] (rows
    of the plan; h only when store_h). x [T, D], up [G, 2I, D]."""
    rows, inner = row_src.shape[0], up.shape[1] // 2
    act = x.new_empty((rows, inner))
    h = x.new_empty((rows, 2 * inner)) if store_h else None
    # B_e[k, n] = up[e, n, k]: strides (expert, k, n) = (2I * D, 1, D); the up half starts I rows later.
    _launch_mm(x, up, act, offsets, inner, x.shape[1], (up.stride(0), up.stride(2), up.stride(1)), row_src=row_src,
               top_k=top_k, scale=scale, epilogue=EPILOGUE_SWIGLU, h=h, store_h=store_h,
               up_offset=inner * up.stride(1))
    return act, h


def linear(a: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """out_e = a_e · w_eᵀ: a [R, K], w [G, N, K] -> [R, N]."""
    out = a.new_empty((a.shape[0], w.shape[1]))
    _launch_mm(a, w, out, offsets, w.shape[1], w.shape[2], (w.stride(0), w.stride(2), w.stride(1)))
    return out


def linear_grad_input(dy: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """da_e = dy_e · w_e: dy [R, N], w [G, N, K] -> [R, K]."""
    out = dy.new_empty((dy.shape[0], w.shape[2]))
    _launch_mm(dy, w, out, offsets, w.shape[2], w.shape[1], (w.stride(0), w.stride(1), w.stride(2)))
    return out


def swiglu_grad_input(dy: Tensor, down: Tensor, h: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """da = dy_e · V_e with the SwiGLU backward in the epilogue: dh [R, 2I] and
    the recomputed a [R, I]. dy [R, D], down [G, D, I], h [R, 2I]."""
    inner = down.shape[2]
    dh = torch.empty_like(h)
    act = h.new_empty((h.shape[0], inner))
    _launch_mm(dy, down, dh, offsets, inner, down.shape[1], (down.stride(0), down.stride(1), down.stride(2)),
               epilogue=EPILOGUE_SWIGLU_BWD, h=h, act=act)
    return dh, act


def weight_grad(dy: Tensor, x: Tensor, offsets: Tensor, row_src: Tensor | None = None, top_k: int = 1,
                scale: float = 1.0) -> Tensor:
    """dW_e = dy_eᵀ · X_e [G, N, K]; X rows gathered through row_src when given."""
    groups, n, k = offsets.shape[0] - 1, dy.shape[1], x.shape[1]
    dw = dy.new_empty((groups, n, k))
    if groups == 0 or n == 0 or k == 0:
        return dw
    cfg = pick_wgrad_config(dy.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k), groups)
    with torch.cuda.device(dy.device) if dy.is_cuda else contextlib.nullcontext():
        grouped_wgrad_kernel[grid](
            dy, x, dw, offsets, row_src if row_src is not None else offsets, n, k, dy.shape[0],
            x.shape[0] * top_k if row_src is not None else dy.shape[0], scale,
            dy.stride(0), x.stride(0), dw.stride(0), dw.stride(1),
            GATHER=row_src is not None, TOP_K=top_k, PRECISION=_precision(dy.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dw
