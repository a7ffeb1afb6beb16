"""Proof that the build needs no torch: no torch header under csrc/, no torch in
the build requirements, and no torch library linked into the module."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moepp_kernels
from moepp_kernels import _C

ROOT = Path(__file__).resolve().parents[1]
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)


def test_no_torch_headers_in_csrc():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu"}]
    assert sources, "csrc/ has no sources"
    offenders = [str(p.relative_to(ROOT)) for p in sources if TORCH_INCLUDE.search(p.read_text())]
    assert offenders == [], f"torch/ATen/c10 headers included in {offenders}"


def test_build_requirements_name_no_torch():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        pytest.skip("tomllib needs Python 3.11")
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert not [r for r in build["requires"] if re.match(r"^\s*(torch|pytorch)\b", r, re.IGNORECASE)]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_module_links_no_torch_library():
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"Shared library: \[([^\]]+)\]", needed)
    assert libs, "readelf found no dependencies"
    assert not [lib for lib in libs if re.match(r"lib(torch|c10|cudart)", lib)], libs


def test_module_imports_without_torch():
    """The compiled module loads in a fresh interpreter that has never imported torch."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('moepp_kernels._C', {_C.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "print(m.built_with_cuda())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_package_version():
    assert moepp_kernels.__version__


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_cpu_kernels_share_torchs_openmp_runtime(tmp_path):
    """Where torch ships libgomp.so.1, the module binds to that copy (one thread pool for
    torch's ops and ours, csrc/parallel.h), not to a second OpenMP runtime."""
    import torch

    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True).stdout
    if not torch_gomp.exists() or "libgomp.so.1" not in needed:
        pytest.skip("this torch renames its libgomp, or the module was built without OpenMP")
    code = ("import moepp_kernels, re\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search(r'/libgomp[^/]*$', l)}))")
    package_root = str(Path(moepp_kernels.__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {package_root!r})\n" + code],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr([str(torch_gomp.resolve())]), result.stdout
