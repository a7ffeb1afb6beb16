"""The Triton backend: every kernel run under TRITON_INTERPRET=1 against the
reference (in a subprocess: the interpreter is picked when the kernels are
decorated), every kernel and tile config compiled ahead of time for sm_90a and
sm_80, generically and as the launchers specialise them (so lowering errors
surface without a GPU), and bf16 on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, assert_forward_replays_in_cuda_graph, assert_layer_matches_reference

triton = pytest.importorskip("triton")

from moepp_kernels import MoEPPConfig, MoEPPLayer, triton_ffn  # noqa: E402

TESTS = Path(__file__).resolve().parent

if triton_ffn.triton_version() < triton_ffn.MIN_TRITON:
    pytest.skip(f"the Triton backend needs triton >= {triton_ffn.MIN_TRITON}, found {triton.__version__}",
                allow_module_level=True)


def _version(text: str) -> tuple:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])


@pytest.mark.skipif(_version(triton.__version__) < (3, 7) and _version(__import__("numpy").__version__) >= (2, 4),
                    reason="Triton < 3.7's interpreter fails on numpy >= 2.4 (scalar conversion)")
def test_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "triton_cases.py"],
                            cwd=TESTS, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def _variants():
    """(kernel, its constexprs, an example config) for every kernel variant the backend launches."""
    mm = triton_ffn.grouped_mm_kernel
    wgrad = triton_ffn.grouped_wgrad_kernel
    out = []
    for epilogue, gather, store_h in ((0, False, False), (1, True, True), (1, True, False), (2, False, False)):
        out.append((mm, {"GATHER": gather, "TOP_K": 2, "EPILOGUE": epilogue, "STORE_H": store_h,
                         "PRECISION": "tf32", "GROUPS_P2": 16, "GROUP_M": triton_ffn.GROUP_M}, epilogue))
    for gather in (False, True):
        out.append((wgrad, {"GATHER": gather, "TOP_K": 2, "PRECISION": "tf32"}, 0))
    return out


def _signature(kernel, constexprs, dtype="bf16"):
    ints = {"N", "K", "groups", "num_pid_m", "total_rows", "src_slots", "up_offset"} | {
        n for n in kernel.arg_names if n.startswith("stride")}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs or name.startswith("BLOCK_"):
            continue
        if name in ("offsets_ptr", "row_src_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in ints:
            sig[name] = "i32"
        else:
            raise AssertionError(f"unclassified kernel argument {name}")
    return sig


@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90a", "sm_80"])
def test_every_kernel_and_config_compiles_ahead_of_time(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch_name = {90: "sm90", 80: "sm80"}[arch]
    gemm_configs = [cfg for (a, _), cfg in triton_ffn.CONFIGS.items() if a == arch_name]
    compiled = 0
    for kernel, constexprs, epilogue in _variants():
        configs = [triton_ffn.WGRAD_CONFIGS[arch_name]] if kernel is triton_ffn.grouped_wgrad_kernel else gemm_configs
        for cfg in configs:
            if epilogue != triton_ffn.EPILOGUE_NONE:
                cfg = cfg._replace(block_n=min(cfg.block_n, 64))
            blocks = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
            src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs), constexprs={**constexprs, **blocks})
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            assert k.asm["cubin"], f"{kernel.fn.__name__} {constexprs} {cfg}"
            compiled += 1
    assert compiled >= 10


SHARED_MEMORY_OPT_IN = {90: 232448, 80: 166912}  # bytes per block: H100/H200, A100


class _CompileInsteadOfLaunch:
    """Stands in for a kernel's launcher: each launch is compiled for `arch` with the
    specialisation Triton's runtime would give it (16-divisible pointers and sizes,
    unit strides as constants, which turn on vectorised, pipelined loads), not run."""

    def __init__(self, kernel, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.kernel, self.arch = kernel, arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.compiled = {}

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, **kwargs):
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        k = self.kernel
        bound, specialization, options = create_function_from_signature(k.signature, k.params, self.backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = k._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (str(signature), str(constexprs), str(attrs), str(options))
        if key not in self.compiled:
            self.compiled[key] = triton.compile(ASTSource(k, signature, constexprs, attrs), target=self.target,
                                                options=options.__dict__)


@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90a", "sm_80"])
def test_kernels_compile_as_launched(arch, monkeypatch):
    """Every launch of the backend's entry points, for both shape buckets, aligned and
    odd sizes, compiled as the runtime would specialise it on a GPU; each fits the
    architecture's shared memory."""
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401

        triton_ffn.grouped_mm_kernel._pack_args  # noqa: B018
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"this Triton has no launch specialisation to reuse ({exc})")
    compilers = [_CompileInsteadOfLaunch(triton_ffn.grouped_mm_kernel, arch),
                 _CompileInsteadOfLaunch(triton_ffn.grouped_wgrad_kernel, arch)]
    monkeypatch.setattr(triton_ffn, "grouped_mm_kernel", compilers[0])
    monkeypatch.setattr(triton_ffn, "grouped_wgrad_kernel", compilers[1])
    monkeypatch.setattr(triton_ffn, "arch_of", lambda device: {90: "sm90", 80: "sm80"}[arch])
    groups, top_k, dt = 16, 2, torch.bfloat16
    for d, i in ((256, 384), (200, 136)):  # 16-divisible, and not
        for tokens in (256, 2048):  # small bucket (<= 64 rows per expert), large
            rows = tokens * top_k
            x, row_src = torch.empty(tokens, d, dtype=dt), torch.zeros(rows, dtype=torch.int32)
            up, down = torch.empty(groups, 2 * i, d, dtype=dt), torch.empty(groups, d, i, dtype=dt)
            offsets = torch.zeros(groups + 1, dtype=torch.int32)
            h, dy = torch.empty(rows, 2 * i, dtype=dt), torch.empty(rows, d, dtype=dt)
            for store_h in (True, False):
                triton_ffn.gate_up_swiglu(x, up, row_src, offsets, top_k, 2.0, store_h=store_h)
            triton_ffn.linear(torch.empty(rows, i, dtype=dt), down, offsets)
            triton_ffn.swiglu_grad_input(dy, down, h, offsets)
            triton_ffn.linear_grad_input(h, up, offsets)
            triton_ffn.weight_grad(dy, torch.empty(rows, i, dtype=dt), offsets)
            triton_ffn.weight_grad(h, x, offsets, row_src, top_k, 2.0)
    kernels = [k for c in compilers for k in c.compiled.values()]
    assert len(kernels) >= 20
    for k in kernels:
        assert k.asm["cubin"]
        assert k.metadata.shared <= SHARED_MEMORY_OPT_IN[arch], f"{k.metadata.name}: {k.metadata.shared} bytes"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name, tokens", [("7b", 512), ("7b", 4096), ("longcat", 512), ("odd", 3000)],
                         ids=["7b-small-bucket", "7b-large-bucket", "longcat", "odd-dims-large-bucket"])
def test_layer_bf16_on_the_gpu(name, tokens):
    cfg = {"7b": MoEPPConfig.moepp_7b().with_(hidden_size=256, ffn_size=384),
           "longcat": MoEPPConfig.longcat(hidden_size=256, ffn_size=128, n_ffn=64, n_identity=32, top_k=6),
           "odd": MoEPPConfig.moepp_0_6b().with_(hidden_size=200, ffn_size=136)}[name]  # N, K not block multiples
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=False, dtype=torch.bfloat16, device="cuda", gemm_backend="triton")
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert_layer_matches_reference(layer, x, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_layer_forward_is_cuda_graph_capturable():
    """With the Triton backend nothing in the layer waits for the host: a CUDA graph
    captures the forward and replays it to the eager result."""
    cfg = MoEPPConfig.moepp_7b().with_(hidden_size=256, ffn_size=384)
    torch.manual_seed(0)
    layer = MoEPPLayer(cfg, has_residual=True, dtype=torch.bfloat16, device="cuda", gemm_backend="triton")
    x = torch.randn(1024, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    prev = torch.randn(1024, cfg.n_experts, device="cuda")
    assert_forward_replays_in_cuda_graph(layer, x, prev)
