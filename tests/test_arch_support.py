"""Which GPUs a build runs on (csrc/cuda/arch_support.h), decided on the CPU: the
architectures the module records, native code vs PTX JIT vs a clear error for each
compute capability, the CUTLASS family each GPU takes, and the error's wording."""

import os

import pytest

from moepp_kernels import _C

DEFAULT = ["80", "90a"]
CAPABILITIES = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5)]  # A100 A10 L40S H100 B200 RTX5090 T4

# Per built list, the verdict for each capability above.
EXPECTED = {
    "80;90a": ["native", "native", "native", "native", "ptx", "ptx", "none"],  # the default
    "90a": ["none", "none", "none", "native", "none", "none", "none"],
    "80": ["native", "native", "native", "ptx", "ptx", "ptx", "none"],
    "86": ["none", "native", "native", "ptx", "ptx", "ptx", "none"],
    "90a;100f": ["none", "none", "none", "native", "native", "none", "none"],
    "89;120": ["none", "none", "native", "ptx", "ptx", "native", "none"],
}


def test_module_records_what_it_compiled():
    archs = _C.cuda_archs()
    if not _C.built_with_cuda():
        assert archs == []
        return
    assert archs == os.environ.get("MOEPP_CUDA_ARCHS", ";".join(DEFAULT)).replace(",", ";").split(";")


@pytest.mark.parametrize("built", list(EXPECTED))
def test_where_each_build_runs(built):
    got = [_C.cuda_arch_support(major, minor, built.split(";")) for major, minor in CAPABILITIES]
    assert got == EXPECTED[built]


@pytest.mark.parametrize(("capability", "families", "family"), [
    ((9, 0), [90, 80], 90),  # H100 / H200: wgmma + TMA
    ((9, 0), [80], 80),  # an sm80-only build, by PTX JIT
    ((8, 0), [90, 80], 80),
    ((8, 6), [90, 80], 80),
    ((8, 9), [90, 80], 80),
    ((10, 0), [90, 80], 80),  # sm_90a code runs on 9.0 only
    ((12, 0), [90, 80], 80),
    ((8, 0), [90], 0),
    ((10, 0), [90], 0),
    ((7, 5), [90, 80], 0),
    ((9, 0), [], 0),
])
def test_cutlass_family_per_gpu(capability, families, family):
    assert _C.cutlass_family_for(*capability, families) == family


def test_error_names_device_capability_build_and_setting():
    msg = _C.unsupported_device_message("NVIDIA A10", 1, 8, 6, ["90a"])
    for part in ("NVIDIA A10", "cuda:1", "8.6", 'MOEPP_CUDA_ARCHS="90a"', 'MOEPP_CUDA_ARCHS="90a;86"', '"80;90a"'):
        assert part in msg, (part, msg)
    old = _C.unsupported_device_message("Tesla T4", 0, 7, 5, DEFAULT)
    assert "7.5" in old and "8.0 or newer" in old
    assert _C.unsupported_device_message("NVIDIA H200", 0, 9, 0, DEFAULT) == ""
    assert _C.unsupported_device_message("NVIDIA B200", 0, 10, 0, DEFAULT) == ""  # PTX JIT


@pytest.mark.parametrize("malformed", ["sm_90", "9", "1000", "90b", ""])
def test_malformed_architectures_run_nowhere(malformed):
    assert _C.cuda_arch_support(9, 0, [malformed]) == "none"
