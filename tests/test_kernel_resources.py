"""CI gate for what the CUDA kernels ask of a GPU, checked without one.

1. ptxas's resource report for every non-CUTLASS .cu, compiled here for sm_90a and
   sm_80 (device code only, the build's flags): no spills, the stack frame within
   the kernel's budget, registers x the launch's threads within one SM's register
   file, static + the largest dynamic shared memory its launcher asks for within the
   device's opt-in limit. A kernel missing from the table fails the gate.
2. cuobjdump's report for every kernel the installed module carries, CUTLASS's
   grouped GEMMs included: no stack and no local memory.
Skips (with the reason) where nvcc or cuobjdump is absent; CI has both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from moepp_kernels import _C

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/router/router_cuda.cu", "csrc/moe/plan_cuda.cu", "csrc/moe/ffn_pointwise_cuda.cu",
           "csrc/moe/combine_cuda.cu", "csrc/gemm/grouped_gemm_cuda.cu"]
ARCHS = ["sm_90a", "sm_80"]
OPTIN = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}  # cudaDevAttrMaxSharedMemoryPerBlockOptin
# nvcc 13 gives every sm_90a kernel a 1 KB shared section that ptxas does not report
# (cuobjdump: SHARED:1024 on kernels without __shared__ variables).
HIDDEN_STATIC = {"sm_90a": 1024, "sm_80": 0}
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM on sm_80 and sm_90
DEFAULT_SHARED = 48 * 1024  # a block's shared memory without the opt-in
ROUTER_DTYPE_BYTES = (4, 8)  # the router runs fp32 and fp64
MAX_EXPERTS = _C.ROUTER_MAX_EXPERTS


def router_largest(forward: bool) -> int:
    """The largest dynamic shared memory a router launch asks for without staging G
    (staging is chosen only where it fits the kernel's budget)."""
    return max(_C.router_shared_layout(forward, elem, n, True, False, 0)[0]
               for elem in ROUTER_DTYPE_BYTES for n in range(1, MAX_EXPERTS + 1))


@dataclass(frozen=True)
class Budget:
    threads: int  # the block size its launcher uses (and its __launch_bounds__)
    largest_dynamic: int = 0  # bytes; kernels launched with more than 0 go through allow_shared_memory
    stack: int = 0  # bytes of stack frame allowed; spills are never allowed


@cache
def budgets() -> dict[str, Budget]:
    """Per kernel (its name as the mangled symbol spells it)."""
    count, scatter = _C.plan_shared_bytes(_C.MAX_PLAN_EXPERTS)
    return {
        "forward_kernel": Budget(128, router_largest(True)),  # router
        "backward_kernel": Budget(128, router_largest(False)),
        "count_kernel": Budget(256, count),  # plan
        "scan_kernel": Budget(1024),
        "scatter_kernel": Budget(256, scatter),
        "gather_kernel": Budget(256),  # FFN pointwise
        "swiglu_kernel": Budget(256),
        "row_sum_kernel": Budget(256),
        "combine_kernel": Budget(128),
        "combine_backward_kernel": Budget(128),
        "zero_empty_groups": Budget(256),  # grouped GEMM dispatch
    }


@dataclass
class Usage:
    symbol: str
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    registers: int = 0
    static_shared: int = 0


def kernel_name(symbol: str) -> str:
    """The budget entry a mangled kernel symbol belongs to (its identifier, length-prefixed)."""
    found = [name for name in budgets() if f"{len(name)}{name}" in symbol]
    assert len(found) == 1, f"{symbol}: no budget entry in tests/test_kernel_resources.py (add the kernel)"
    return found[0]


def parse_ptxas(report: str) -> list[Usage]:
    usages: list[Usage] = []
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            usages.append(Usage(m.group(1)))
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            usages[-1].stack, usages[-1].spill_stores, usages[-1].spill_loads = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            usages[-1].registers = int(m.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            usages[-1].static_shared = int(shared.group(1)) if shared else 0
    return usages


def compile_report(source: str, arch: str) -> str:
    cmd = [shutil.which("nvcc"), "-cubin", f"-arch={arch}", "-std=c++17", "-O3", "-DNDEBUG",
           "--expt-relaxed-constexpr", "-lineinfo", "--resource-usage", "-I", str(ROOT / "csrc"),
           "-DMOEPP_WITH_CUTLASS_SM90", "-DMOEPP_WITH_CUTLASS_SM80", "-o", os.devnull, str(ROOT / source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"nvcc failed on {source} for {arch}:\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@cache
def ptxas_usage() -> dict[str, list[Usage]]:
    jobs = [(source, arch) for arch in ARCHS for source in SOURCES]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        reports = list(pool.map(lambda job: compile_report(*job), jobs))
    usage: dict[str, list[Usage]] = {arch: [] for arch in ARCHS}
    for (_source, arch), report in zip(jobs, reports):
        usage[arch] += parse_ptxas(report)
    return usage


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it) to compile the kernels")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_is_in_the_budget_table(arch):
    usages = ptxas_usage()[arch]
    names = {kernel_name(u.symbol) for u in usages}
    assert names == set(budgets()), f"kernels without instances on {arch}: {set(budgets()) - names}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_stack_within_budget(arch):
    over = [f"{u.symbol}: {u.stack} B stack, {u.spill_stores}/{u.spill_loads} B spilled"
            for u in ptxas_usage()[arch]
            if u.spill_stores or u.spill_loads or u.stack > budgets()[kernel_name(u.symbol)].stack]
    assert not over, "\n".join(over)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_registers_fit_the_launch(arch):
    over = [f"{u.symbol}: {u.registers} registers x {budgets()[kernel_name(u.symbol)].threads} threads"
            for u in ptxas_usage()[arch]
            if u.registers > 255 or u.registers * budgets()[kernel_name(u.symbol)].threads > REGISTER_FILE]
    assert not over, "\n".join(over)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_the_device(arch):
    """Static (with nvcc's hidden section) + the largest dynamic request <= the opt-in
    limit; a kernel launched without the opt-in stays within 48 KB."""
    over = []
    for u in ptxas_usage()[arch]:
        budget = budgets()[kernel_name(u.symbol)]
        static = u.static_shared + HIDDEN_STATIC[arch]
        limit = OPTIN[arch] if budget.largest_dynamic else DEFAULT_SHARED
        if static + budget.largest_dynamic > limit:
            over.append(f"{u.symbol}: {static} static + {budget.largest_dynamic} dynamic > {limit}")
    assert not over, "\n".join(over)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("elem", ROUTER_DTYPE_BYTES, ids=["fp32", "fp64"])
def test_router_stages_g_up_to_128_experts(arch, elem):
    """The residual's fast path (G in shared memory) is taken on both architectures at
    N = 128, the largest N it runs for, with the load-balance statistics."""
    for u in ptxas_usage()[arch]:
        name = kernel_name(u.symbol)
        if name in ("forward_kernel", "backward_kernel"):
            budget = OPTIN[arch] - u.static_shared - HIDDEN_STATIC[arch]
            assert _C.router_shared_layout(name == "forward_kernel", elem, 128, True, True, budget)[1], u.symbol


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = sorted(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/cu*/bin/cuobjdump"))
    return str(candidates[-1]) if candidates else None


@pytest.mark.skipif(not _C.built_with_cuda(), reason="the module was built without CUDA")
@pytest.mark.skipif(cuobjdump() is None, reason="needs cuobjdump (the nvidia-cuda-cuobjdump wheel, a test extra)")
def test_installed_kernels_use_no_local_memory():
    """Every kernel in the module as built (CUTLASS's grouped GEMMs and their
    argument kernels included): STACK and LOCAL are 0 for every architecture."""
    done = subprocess.run([cuobjdump(), "-res-usage", _C.__file__], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    functions = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", done.stdout)
    assert functions, "cuobjdump listed no kernels"
    if _C.cutlass_archs():
        assert any("cutlass" in f[0] for f in functions), "no CUTLASS kernel in a build with CUTLASS"
    over = [f"{name}: STACK {stack}, LOCAL {local}" for name, _reg, stack, _shared, local in functions
            if int(stack) or int(local)]
    assert not over, "\n".join(over)
