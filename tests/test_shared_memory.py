"""The CUDA launchers' dynamic shared-memory arithmetic (csrc/cuda/shared_memory.h,
csrc/router/router_launch.h, csrc/moe/plan.h), on the CPU with an H200's and an
A100's numbers: the opt-in must leave room for the kernel's static shared memory
(1 KB on every sm_90a kernel with nvcc 13), and so must the decision to stage G."""

import pytest

from moepp_kernels import _C

SM90_OPTIN, SM80_OPTIN = 227 * 1024, 163 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin
SM90_STATIC = 1024  # nvcc 13's shared section of an sm_90a kernel
KB48 = 48 * 1024
DEFAULT = KB48 - SM90_STATIC  # MaxDynamicSharedMemorySize before any opt-in


def plan(bytes_, static=SM90_STATIC, optin=SM90_OPTIN, current=DEFAULT):
    """(budget, fits, attribute to set or -1)."""
    return _C.plan_dynamic_shared(bytes_, static, optin, current)


def test_router_launch_sizes():
    budget = SM90_OPTIN - SM90_STATIC
    # N = 1024 with the load-balance statistics, fp32: 4 tokens of 32 lanes, 3 rows each, + counts
    assert _C.router_lanes_for(1024) == 32
    assert _C.router_shared_layout(True, 4, 1024, True, False, budget) == (53_248, False)
    # N = 128, fp32, statistics, G staged with row stride 129
    assert _C.router_shared_layout(True, 4, 128, True, True, budget) == (72_704, True)
    # the backward keeps two rows per token and no counts
    assert _C.router_shared_layout(False, 4, 128, False, True, budget) == (4 * 4 * 128 * 2 + 4 * 128 * 129, True)
    # fp64 G is staged up to N = 128 only
    assert _C.router_shared_layout(True, 8, 129, True, True, budget)[1] is False


@pytest.mark.parametrize("n", [1, 4, 5, 8, 9, 64, 65, 128, 129, 1024])
def test_lanes_cover_the_experts(n):
    lanes = _C.router_lanes_for(n)
    assert lanes in (1, 2, 4, 8, 16, 32)
    assert lanes == 32 or lanes * 4 >= n


def test_opt_in_counts_the_static_section():
    # above 48 KB in all: the attribute is raised to the whole budget, opt-in - static
    assert plan(53_248) == (SM90_OPTIN - SM90_STATIC, True, SM90_OPTIN - SM90_STATIC)
    assert plan(72_704)[2] == SM90_OPTIN - SM90_STATIC
    # exactly 48 KB with the static KB: no opt-in needed
    assert plan(DEFAULT) == (SM90_OPTIN - SM90_STATIC, True, -1)
    # one byte more needs it: a check of `bytes <= 48 KB` alone let this launch fail
    assert plan(DEFAULT + 1)[2] == SM90_OPTIN - SM90_STATIC
    assert plan(KB48)[2] == SM90_OPTIN - SM90_STATIC


def test_budget_is_the_opt_in_less_static():
    assert plan(SM90_OPTIN - SM90_STATIC)[1] is True
    assert plan(SM90_OPTIN - SM90_STATIC + 1) == (SM90_OPTIN - SM90_STATIC, False, -1)
    assert plan(SM90_OPTIN, static=0, current=KB48) == (SM90_OPTIN, True, SM90_OPTIN)
    # an A100: no hidden section; fp64 router at N = 1024 with statistics
    assert plan(102_400, static=0, optin=SM80_OPTIN, current=KB48) == (SM80_OPTIN, True, SM80_OPTIN)


def test_attribute_is_never_lowered():
    raised = SM90_OPTIN - SM90_STATIC
    assert plan(53_248, current=raised)[2] == -1
    assert plan(100, current=raised)[2] == -1
    # a driver that reports 48 KB (static not deducted) still gets the attribute set
    assert plan(DEFAULT + 512, current=KB48)[2] == raised


def test_staging_leaves_room_for_the_static_section():
    """A device whose opt-in only just holds the staged layout: with the static KB
    deducted, G is read through the cache instead, and the launch fits."""
    optin = 72_704 + 512
    assert _C.router_shared_layout(True, 4, 128, True, True, optin) == (72_704, True)
    staged_budget = optin - SM90_STATIC
    bytes_, staged = _C.router_shared_layout(True, 4, 128, True, True, staged_budget)
    assert (bytes_, staged) == (6_656, False)
    assert plan(bytes_, optin=optin)[1] is True


def test_plan_sizes():
    assert _C.plan_shared_bytes(1024) == (4096, 4096 * 9)  # histogram; running rows + 8 warps' counts
    assert _C.plan_shared_bytes(16) == (64, 64 * 9)
