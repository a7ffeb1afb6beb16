"""The grouped-GEMM interface of the FFN experts: three products over the
rows of a permutation plan (expert e owns rows [offsets[e], offsets[e+1])):

    forward       out_e = a_e · w_eᵀ      a [R, K], w [G, N, K] -> [R, N]
    grad_input    da_e  = dy_e · w_e      dy [R, N], w [G, N, K] -> [R, K]
    grad_weight   dw_e  = dy_eᵀ · a_e     dy [R, N], a [R, K]    -> [G, N, K] (zeros for empty experts)

Rows past offsets[G] are neither read nor written. Backends:
  "torch"       per-expert matmuls on slices; reads the offsets on the host
                (one device-to-host sync per call on a GPU); in fp32 on the CPUs
                where _cpu_matmul picks it, oneDNN's matmul, else torch.mm.
  "grouped_mm"  torch._grouped_mm (CUDA sm90 / sm100 in bf16, offsets stay on the device;
                also torch's CPU implementation, where the installed torch has one).
  "cutlass"     CUTLASS grouped GEMMs (csrc/gemm/): 3.x ptr-array kernels on sm90
                (TMA, warp-specialised, wgmma), 2.x device-scheduled ones on sm80;
                each expert's shape, pointers and strides are written by a device
                kernel from the offsets, so nothing syncs. bf16/fp16, 16-byte rows.
  "triton"      Triton kernels (triton_ffn.py; offsets stay on the device); in the
                FFN the gather and SwiGLU are fused into the GEMMs (expert_ffn.py).
                On the CPU only under TRITON_INTERPRET=1.
  "auto"        the measured choice for the device and shape (AUTO_TABLE), else "torch".
"""


import functools

import torch
from torch import Tensor

from . import _C, _cpu_matmul
from ._tensors import DTYPE_CODES, stream_handle, view

BACKENDS = ("auto", "torch", "grouped_mm", "cutlass", "triton")
_FORWARD, _GRAD_INPUT, _GRAD_WEIGHT = 0, 1, 2  # gemm::Product

# (GPU name, dtype) -> backend, from committed GPU measurements (bench/results/); empty until a
# GPU run has compared the backends, so "auto" stays on the torch backend.
AUTO_TABLE: dict = {}
CUTLASS_ARCHS = tuple(_C.cutlass_archs())  # read once: torch.compile cannot trace into the extension


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, dims: tuple = ()) -> str:
    """The backend to run for `backend` on `device` / `dtype`; `dims` are the
    GEMMs' row lengths (D, I), which grouped_mm needs 16-byte aligned."""
    if backend not in BACKENDS:
        raise ValueError(f"gemm_backend must be one of {BACKENDS}, got {backend!r}")
    aligned = all(d * dtype.itemsize % 16 == 0 for d in dims)
    if backend == "auto":
        name = _device_name(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else "cpu"
        chosen = AUTO_TABLE.get((name, dtype), "torch")
        return chosen if chosen != "grouped_mm" or aligned else "torch"
    if backend == "triton":
        try:
            from . import triton_ffn
        except ImportError as exc:
            raise ValueError(f"gemm_backend='triton' needs the triton package ({exc})") from exc
        if triton_ffn.triton_version() < triton_ffn.MIN_TRITON:
            raise ValueError(f"gemm_backend='triton' needs triton >= {'.'.join(map(str, triton_ffn.MIN_TRITON))}, "
                             f"found {triton_ffn.triton.__version__}")
        if device.type != "cuda" and not triton_ffn.interpreting():
            raise ValueError("gemm_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
        if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("gemm_backend='triton' runs bfloat16 or float16 on the GPU; use 'torch' for float32")
    if backend == "cutlass":
        archs = CUTLASS_ARCHS
        if not archs:
            raise ValueError("gemm_backend='cutlass' needs a build with the CUTLASS kernels (nvcc, the "
                             "nvidia-cutlass headers and 90a or 80 in MOEPP_CUDA_ARCHS)")
        if device.type != "cuda":
            raise ValueError("gemm_backend='cutlass' runs on CUDA tensors")
        capability = torch.cuda.get_device_capability(device)
        if not _C.cutlass_family_for(*capability, list(archs)):
            raise ValueError(f"gemm_backend='cutlass' was built for sm{list(archs)}: sm90 runs on compute capability "
                             f"9.0, sm80 on 8.0 and newer; this GPU is {capability[0]}.{capability[1]}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"gemm_backend='cutlass' runs bfloat16 or float16, got {dtype}")
        if not aligned:
            raise ValueError(f"gemm_backend='cutlass' needs hidden_size and ffn_size whose rows are multiples of "
                             f"16 bytes, got {dims} in {dtype}")
    if backend == "grouped_mm":
        # torch keeps the offsets on the device on sm90 / sm100 only; elsewhere it copies them to the host
        on_gpu_ok = (device.type == "cuda" and dtype == torch.bfloat16
                     and torch.cuda.get_device_capability(device)[0] in (9, 10))
        if not hasattr(torch, "_grouped_mm") or not (device.type == "cpu" or on_gpu_ok):
            raise ValueError("gemm_backend='grouped_mm' needs torch._grouped_mm, and on a GPU sm90 or sm100 with "
                             "bfloat16")
        if not aligned:
            raise ValueError(f"gemm_backend='grouped_mm' needs hidden_size and ffn_size whose rows are multiples of "
                             f"16 bytes, got {dims} in {dtype}")
    return backend


@functools.cache
def _cutlass_workspace_bytes(product: int, dtype: torch.dtype, groups: int, device_index: int) -> int:
    """Depends on neither the rows nor the data: worked out once per shape of call."""
    return _C.cutlass_workspace_bytes(product, DTYPE_CODES[dtype], groups, device_index) if groups else 0


def _cutlass(product: int, a: Tensor, b: Tensor, out: Tensor, offsets: Tensor) -> Tensor:
    dev = a.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    size = _cutlass_workspace_bytes(product, a.dtype, offsets.shape[0] - 1, index)
    workspace = torch.empty(size, dtype=torch.uint8, device=dev)
    _C.cutlass_grouped_gemm(product, view(a), view(b), view(out), view(offsets), view(workspace), stream_handle(dev))
    return out


def _per_expert(a: Tensor, out: Tensor, offsets: Tensor, weight) -> Tensor:
    """The torch backend: out rows of expert e = a rows of e @ weight(e)."""
    b = offsets.tolist()
    for e in range(len(b) - 1):
        if b[e + 1] > b[e]:
            _cpu_matmul.mm(a[b[e]:b[e + 1]], weight(e), out=out[b[e]:b[e + 1]])
    return out


def forward(a: Tensor, w: Tensor, offsets: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_ffn

        return triton_ffn.linear(a, w, offsets)
    if backend == "grouped_mm":
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offsets[1:])
    out = a.new_empty((a.shape[0], w.shape[1]))
    if backend == "cutlass":
        return _cutlass(_FORWARD, a, w, out, offsets)
    return _per_expert(a, out, offsets, lambda e: w[e].t())


def grad_input(dy: Tensor, w: Tensor, offsets: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_ffn

        return triton_ffn.linear_grad_input(dy, w, offsets)
    if backend == "grouped_mm":
        return torch._grouped_mm(dy, w, offs=offsets[1:])
    out = dy.new_empty((dy.shape[0], w.shape[2]))
    if backend == "cutlass":
        return _cutlass(_GRAD_INPUT, dy, w, out, offsets)
    return _per_expert(dy, out, offsets, lambda e: w[e])


def grad_weight(dy: Tensor, a: Tensor, offsets: Tensor, backend: str) -> Tensor:
    """Every backend writes zeros for experts without rows."""
    groups = offsets.shape[0] - 1
    if backend == "cutlass":
        return _cutlass(_GRAD_WEIGHT, dy, a, dy.new_empty((groups, dy.shape[1], a.shape[1])), offsets)
    if backend == "triton":
        from . import triton_ffn

        return triton_ffn.weight_grad(dy, a, offsets)
    if backend == "grouped_mm":
        return torch._grouped_mm(dy.t(), a, offs=offsets[1:])
    out = dy.new_empty((groups, dy.shape[1], a.shape[1]))
    b = offsets.tolist()
    for e in range(groups):
        if b[e + 1] > b[e]:
            _cpu_matmul.mm(dy[b[e]:b[e + 1]].t(), a[b[e]:b[e + 1]], out=out[e])
        else:
            out[e].zero_()
    return out
