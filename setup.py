"""Build moepp_kernels._C with CMake + Ninja (no torch needed at build time).

Environment knobs: MOEPP_CUDA (auto|0|1), MOEPP_CUDA_ARCHS (default "80;90a"),
MOEPP_SANITIZE (e.g. address,undefined: a sanitized CPU-only build, in a build
directory of its own), MOEPP_EMULATE_BF16_PAIRS (1: the CPU experts' bf16 pairs
route emulates AVX512-BF16, for tests on CPUs without it; a build directory of its
own too), MOEPP_CUTLASS_DIR (CUTLASS source root; default: the
nvidia-cutlass wheel's),
MAX_JOBS (default: from cores and free memory), CMAKE_BUILD_TYPE. ccache is
used when it is on PATH.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
GB_PER_COMPILE_JOB = 3.2  # a CUTLASS translation unit's peak, the largest we build


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_memory = int(pages / (GB_PER_COMPILE_JOB * 2**30))
    except (ValueError, OSError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def drop_stale_cache(build_dir: Path, ninja: str) -> None:
    """Forget a CMake cache whose cmake or ninja is gone or differs (each isolated
    pip build has its own, deleted afterwards); the objects stay for ninja/ccache."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    entries = {}  # NAME:TYPE=VALUE; a -D entry's type is UNINITIALIZED, a found program's FILEPATH
    for line in cache.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and ":" in key and not key.startswith(("#", "//")):
            entries[key.split(":", 1)[0]] = value
    if not Path(entries.get("CMAKE_COMMAND", "")).exists() or entries.get("CMAKE_MAKE_PROGRAM") != ninja:
        cache.unlink()


def cutlass_dir() -> str:
    """MOEPP_CUTLASS_DIR, else the headers the pinned nvidia-cutlass wheel ships, else ''."""
    if os.environ.get("MOEPP_CUTLASS_DIR"):
        return os.environ["MOEPP_CUTLASS_DIR"]
    try:
        import cutlass_library
    except ImportError:
        print("moepp_kernels: nvidia-cutlass not found: building without the CUTLASS kernels", flush=True)
        return ""
    return str(Path(cutlass_library.__file__).resolve().parent / "source")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        sanitize = os.environ.get("MOEPP_SANITIZE", "")
        emulate_pairs = os.environ.get("MOEPP_EMULATE_BF16_PAIRS", "0") not in ("", "0")
        variant = ("-sanitize-" + sanitize.replace(",", "-") if sanitize else "") + (
            "-emulate-bf16-pairs" if emulate_pairs else "")
        build_dir = Path(self.build_temp).resolve() / (ext.name + variant)
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(default_max_jobs())
        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("moepp_kernels needs cmake and ninja on PATH to build")
        drop_stale_cache(build_dir, ninja)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DMOEPP_CUDA={os.environ.get('MOEPP_CUDA', 'auto')}",
            f"-DMOEPP_CUDA_ARCHS={os.environ.get('MOEPP_CUDA_ARCHS', '80;90a')}",
            f"-DMOEPP_CUTLASS_DIR={cutlass_dir() if not sanitize else ''}",
            f"-DMOEPP_SANITIZE={sanitize}",
            f"-DMOEPP_EMULATE_BF16_PAIRS={'ON' if emulate_pairs else 'OFF'}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-G",
            "Ninja",
        ]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        print(f"moepp_kernels: cmake build with MAX_JOBS={jobs}", flush=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("moepp_kernels._C")], cmdclass={"build_ext": CMakeBuild})
