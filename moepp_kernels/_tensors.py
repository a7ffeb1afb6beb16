"""Argument checks with clear errors, and torch tensor -> _C.TensorView."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C

# The dtypes of a layer's activations and expert weights.
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
}


# glibc maps a host buffer afresh above its mmap threshold (which moves between 128 KiB and
# 32 MiB) and hands freed memory at its heap's top back to the kernel: a host buffer of more than
# this comes from the host block cache instead, so its pages are faulted in once, not every step.
CACHED_BUFFER_BYTES = 4 * 2**20


def new_buffer(like: Tensor, shape: Sequence[int]) -> Tensor:
    """like.new_empty(shape). On the CPU, a buffer of over 4 MiB (an expert FFN's y and h, its
    weight gradients) is a block of the host cache (moepp_kernels.host_cache): pages a freed
    buffer of its size already faulted in, else a new mapping on transparent huge pages."""
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes <= CACHED_BUFFER_BYTES:
        return like.new_empty(shape)
    return torch.frombuffer(_C.host_block(nbytes), dtype=like.dtype, count=numel).view(shape)


# Rows of a bf16 / fp16 CPU tensor converted to fp32 at a time by fp32_row_chunks.
FP32_CHUNK_ROWS = 512


def converts_in_chunks(x: Tensor) -> bool:
    """Whether an fp32 product over x's rows should read them through fp32_row_chunks: a bf16 /
    fp16 CPU tensor of more than one chunk, whose whole fp32 copy would be a fresh buffer,
    faulted in on every call (on a GPU that copy is a cheap transient; fp32 needs none)."""
    return x.dtype != torch.float32 and x.device.type == "cpu" and x.shape[0] > FP32_CHUNK_ROWS


def fp32_row_chunks(x: Tensor):
    """(lo, hi, x[lo:hi] in fp32) over x's rows [T, D], FP32_CHUNK_ROWS at a time, every chunk
    in the same reused buffer (valid until the next one)."""
    buf = x.new_empty((FP32_CHUNK_ROWS, x.shape[1]), dtype=torch.float32)
    for lo in range(0, x.shape[0], FP32_CHUNK_ROWS):
        hi = min(lo + FP32_CHUNK_ROWS, x.shape[0])
        yield lo, hi, buf[:hi - lo].copy_(x[lo:hi])


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype], shape: Sequence[int | None] | None = None,
                 device: torch.device | None = None) -> Tensor:
    """Raises TypeError (not a tensor, wrong dtype) or ValueError (shape, device,
    layout) naming `name`. `None` in `shape` matches any extent."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(want is None or got == want for got, want in zip(t.shape, shape))
        if not ok:
            want_str = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want_str}, got {list(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; moepp_kernels supports cpu and cuda tensors")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other arguments are on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


# Read once: torch.compile cannot trace a call into the extension module.
BUILT_WITH_CUDA = _C.built_with_cuda()


def check_backend(device: torch.device) -> None:
    if device.type == "cuda" and not BUILT_WITH_CUDA:
        raise RuntimeError("moepp_kernels was built without CUDA; reinstall with nvcc available to use cuda tensors")


def view(t: Tensor) -> _C.TensorView:
    # Every op call makes several: t.is_cuda and t.get_device() instead of a torch.device
    # object, and the shape and strides passed as the tuples they are (about 3 us instead of 4.6).
    if t.is_cuda:
        return _C.TensorView(t.data_ptr(), t.shape, t.stride(), DTYPE_CODES[t.dtype], 1, t.get_device())
    return _C.TensorView(t.data_ptr(), t.shape, t.stride(), DTYPE_CODES[t.dtype], 0, -1)


def optional_view(t: Tensor | None) -> _C.TensorView | None:
    return None if t is None else view(t)


def stream_handle(device: torch.device) -> int:
    """The caller's current CUDA stream on `device` (0 for the CPU)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def device_code(device: torch.device) -> int:
    return 1 if device.type == "cuda" else 0
