"""MoE++ layer benchmark: the fused layer vs the plain-PyTorch reference
(per-expert loop), forward and forward+backward, side by side, with the time of
the layer's GEMMs alone (the gate's and the experts': the floor under both, which
bounds any speedup); and
the router, permutation plan and combine epilogue as shares of the layer's
forward."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, HAS_GPU, step

from moepp_kernels import _C, MoEPPConfig, MoEPPLayer, _cpu_matmul, build_plan, fused_router, grouped_gemm
from moepp_kernels import reference as R
from moepp_kernels._ops.combine import layout_scalars
from moepp_kernels._ops.expert_ffn import uses_cpu_gemms, uses_weight_grad_kernel
from moepp_kernels._tensors import view

# (preset, tokens, devices it runs on): 0.6B at T = 4096 everywhere, 7B at T = 16384 on a GPU.
CASES = [("0.6b", 4096, ("cpu", "cuda")), ("7b", 16384, ("cuda",))]
QUICK_TOKENS = 256
PRESETS = {"0.6b": MoEPPConfig.moepp_0_6b, "7b": MoEPPConfig.moepp_7b}


def setup_layer(preset: str, tokens: int, device: str, dtype: torch.dtype | None = None):
    cfg = PRESETS[preset]()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=True, dtype=dtype, device=device)
    with torch.no_grad():
        layer.router.residual_weight.normal_(std=0.1)
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
    prev = torch.randn(tokens, cfg.n_experts, device=device)
    return cfg, layer, x, prev


def cases(with_dtypes: bool = False) -> list:
    out = []
    for preset, tokens, where in CASES:
        for device in where:
            marks = [pytest.mark.skipif(not HAS_GPU, reason="no GPU")] if device == "cuda" else []
            name = f"{preset}-T{tokens}-{device}"
            if not with_dtypes:
                out.append(pytest.param(preset, tokens, device, id=name, marks=marks))
                continue
            for dtype in DTYPES[device]:
                out.append(pytest.param(preset, tokens, device, dtype, id=f"{name}-{str(dtype)[6:]}", marks=marks))
    return out


def gate_gemms(layer: MoEPPLayer, x: torch.Tensor):
    """The gate's fp32 GEMMs (logits = x·Wᵀ, through the hidden layer of a two-layer gate) on
    preallocated operands, fp32 x included, through the layer's matmul (_cpu_matmul.mm):
    (forward, backward), the backward being each weight's and input's gradient."""
    r = layer.router
    weights = [r.gate_weight] if layer.config.gate_depth == 1 else [r.gate_w1, r.gate_w2]
    weights = [w.detach() for w in weights]
    acts = [x.detach().float()]
    for w in weights:
        acts.append(acts[-1].new_empty((acts[-1].shape[0], w.shape[0])))
    grad_w, grad_a = [torch.empty_like(w) for w in weights], [torch.empty_like(a) for a in acts[:-1]]

    def forward():
        for i, w in enumerate(weights):
            _cpu_matmul.mm(acts[i], w.t(), out=acts[i + 1])

    def backward():  # acts[i + 1] stands in for its own gradient (same shape)
        for i in reversed(range(len(weights))):
            _cpu_matmul.mm(acts[i + 1].t(), acts[i], out=grad_w[i])
            _cpu_matmul.mm(acts[i + 1], weights[i], out=grad_a[i])
    return forward, backward


def expert_gemms(layer: MoEPPLayer, x: torch.Tensor, prev: torch.Tensor, backward: bool):
    """Only the layer's GEMMs on preallocated operands: the gate's (gate_gemms) and the FFN
    experts' per-expert ones (2 per expert, 6 with the backward). Every implementation of the
    layer runs these same products (the reference, the authors' loop, transformers' module); they
    run here as the layer runs them, so their time is the floor under the layer (gemm_floor), and
    under the others wherever both run torch.mm: through _cpu_matmul.mm (oneDNN's fp32 matmul on
    the CPUs where the others' torch.mm runs MKL's AVX2 kernels, torch.mm otherwise), and where
    the layer runs its own CPU kernels (csrc/moe/expert_gemms_cpu.h) through those: the forward's
    two GEMMs with GEMM 1's SwiGLU epilogue, the backward's dA with its SwiGLU backward epilogue
    and dX, each over every expert, and the weight gradients per expert or, where the layer takes
    them from its own kernel too (expert_ffn.uses_weight_grad_kernel), through that.

    They run in the order autograd allows any of them: every forward GEMM before any backward one
    (the upstream gradient needs the whole forward), then the experts' backward in reverse, as
    autograd replays a per-expert loop, and the gate's last. Running each expert's backward right
    after its own forward, as this floor once did, kept that expert's weights in cache for its
    backward, which no layer can: at LongCat-Flash's 64 FFN experts of 3 MB each that made the
    floor about 10 ms faster than any real bf16 forward+backward step."""
    cfg = layer.config
    with torch.no_grad():
        route = fused_router(layer.router.gate_logits(x), cfg, prev_logits=prev,
                             residual_weight=layer.router.residual_weight if prev is not None else None)
        bounds = build_plan(route.topk_ids, cfg.n_ffn).offsets.tolist()
    experts = [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo]
    up, down = layer.up.detach(), layer.down.detach()
    rows, d, i = bounds[-1], cfg.hidden_size, cfg.ffn_size
    xg, h, y = x.new_empty(rows, d).normal_(), x.new_empty(rows, 2 * i), x.new_empty(rows, d)
    act = x.new_empty(rows, i)
    dx, dup, ddown, dh = torch.empty_like(xg), torch.empty_like(up), torch.empty_like(down), torch.empty_like(h)
    gate_forward, gate_backward = gate_gemms(layer, x)
    # the CPU's own kernels where the layer runs them, on xg's rows as they are
    own_gemms = uses_cpu_gemms(x, up, down)
    own_weight_grads = own_gemms and uses_weight_grad_kernel(x)
    offsets = torch.tensor(bounds, dtype=torch.int32)
    up_operands = (xg, torch.arange(rows, dtype=torch.int32), offsets, up)

    def run():
        gate_forward()
        if own_gemms:
            threads = torch.get_num_threads()
            _C.up_swiglu_cpu(*map(view, up_operands), 1, 1.0, view(act), view(h) if backward else None,
                             threads)  # h kept only for a backward, as the layer does
            _C.down_cpu(view(act), view(offsets), view(down), view(y), threads)
        else:
            for e, lo, hi in experts:
                _cpu_matmul.mm(xg[lo:hi], up[e].t(), out=h[lo:hi])
                _cpu_matmul.mm(act[lo:hi], down[e].t(), out=y[lo:hi])
        if not backward:
            return
        if own_gemms:  # y stands in for dy (same shape)
            threads = torch.get_num_threads()
            _C.swiglu_grad_cpu(view(y), view(offsets), view(down), view(h), view(dh), view(act), threads)
            _C.up_grad_input_cpu(view(dh), view(offsets), view(up), view(dx), threads)
            if own_weight_grads:
                _C.weight_grad_cpu(view(y), view(act), None, view(offsets), 1, 1.0, view(ddown), threads)
                _C.weight_grad_cpu(view(dh), view(xg), None, view(offsets), 1, 1.0, view(dup), threads)
            else:
                for e, lo, hi in experts:
                    _cpu_matmul.mm(y[lo:hi].t(), act[lo:hi], out=ddown[e])
                    _cpu_matmul.mm(dh[lo:hi].t(), xg[lo:hi], out=dup[e])
        else:
            for e, lo, hi in reversed(experts):  # y, act and h stand in for dy, da and dh (same shapes)
                _cpu_matmul.mm(y[lo:hi], down[e], out=act[lo:hi])
                _cpu_matmul.mm(y[lo:hi].t(), act[lo:hi], out=ddown[e])
                _cpu_matmul.mm(h[lo:hi].t(), xg[lo:hi], out=dup[e])
                _cpu_matmul.mm(h[lo:hi], up[e], out=dx[lo:hi])
        gate_backward()
    return run


@pytest.mark.parametrize("preset, tokens, device, dtype", cases(with_dtypes=True))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["fused", "fused_triton", "fused_cutlass", "reference", "gemm_floor"])
def bench_layer(measure, quick, preset, tokens, device, dtype, mode, impl):
    if impl == "gemm_floor":
        tokens = QUICK_TOKENS if quick else tokens
        _, layer, x, prev = setup_layer(preset, tokens, device, dtype)
        measure(f"layer {device} {preset} T={tokens} {str(dtype)[6:]} {mode}", impl, device,
                expert_gemms(layer, x, prev, backward=mode == "forward_backward"))
        return
    backend = {"fused_triton": "triton", "fused_cutlass": "cutlass"}.get(impl, "auto")
    try:
        grouped_gemm.resolve_backend(backend, torch.device(device), dtype)
    except ValueError as exc:
        pytest.skip(str(exc))
    tokens = QUICK_TOKENS if quick else tokens
    cfg, layer, x, prev = setup_layer(preset, tokens, device, dtype)
    params = layer.reference_params()
    layer.gemm_backend = backend
    run = (lambda: layer(x, prev)) if impl.startswith("fused") else (lambda: R.moepp_layer(x, params, cfg, prev))
    x.requires_grad_(mode != "forward")
    fn = step(run, mode, layer, inputs=(x,))  # the reference shares the layer's parameters
    measure(f"layer {device} {preset} T={tokens} {str(dtype)[6:]} {mode}", impl, device, fn)


@pytest.mark.parametrize("preset, tokens, device", cases())
@pytest.mark.parametrize("part", ["layer", "router", "plan", "combine"])
def bench_layer_parts(measure, quick, preset, tokens, device, part):
    tokens = QUICK_TOKENS if quick else tokens
    cfg, layer, x, prev = setup_layer(preset, tokens, device)
    with torch.no_grad():
        logits = layer.router.gate_logits(x)
        route = fused_router(logits, cfg, prev_logits=prev, residual_weight=layer.router.residual_weight)
        plan = build_plan(route.topk_ids, cfg.n_ffn)
        y = torch.randn(tokens * cfg.top_k, cfg.hidden_size, device=device, dtype=x.dtype)
        mix = torch.randn(tokens, 2 * cfg.n_constant, device=device)
    fns = {
        "layer": lambda: layer(x, prev),
        "router": lambda: fused_router(logits, cfg, prev_logits=prev, residual_weight=layer.router.residual_weight),
        "plan": lambda: build_plan(route.topk_ids, cfg.n_ffn),
        # the op the layer runs (the public combine also checks the indices on the CPU)
        "combine": lambda: torch.ops.moepp.combine(x, y, route.topk_ids, route.topk_weights, plan.slot_row, mix,
                                                   layer.const_value, *layout_scalars(cfg)),
    }
    e, k, n, d = x.element_size(), cfg.top_k, cfg.n_experts, cfg.hidden_size
    rows = int(plan.offsets[-1])
    moved = {
        "layer": None,
        "router": 4 * tokens * n * 3 + 4 * n * n + 8 * tokens * k,  # l, r, l' ; G ; ids, gates
        "plan": 16 * tokens * k,  # ids read twice, row_src and slot_row written
        "combine": e * (2 * tokens * d + rows * d) + 12 * tokens * k + 4 * tokens * 2 * cfg.n_constant,
    }
    with torch.no_grad():
        measure(f"layer parts {device} {preset} T={tokens}", part, device, fns[part], bytes_moved=moved[part])
