"""setup.py's drop_stale_cache: a CMake cache written by the same cmake and ninja is kept
(so a rebuild does not configure afresh), one from another cmake or ninja is dropped."""

import ast
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.fixture(scope="module")
def drop_stale_cache():
    """The function alone, from setup.py's source (importing setup.py would run setup())."""
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "drop_stale_cache")
    namespace = {"Path": Path}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace["drop_stale_cache"]


def write_cache(build_dir: Path, cmake: Path, ninja: str, ninja_type: str) -> Path:
    cache = build_dir / "CMakeCache.txt"
    cache.write_text(f"# comment: x=y\n//doc line: a=b\nCMAKE_COMMAND:INTERNAL={cmake}\n"
                     f"CMAKE_MAKE_PROGRAM:{ninja_type}={ninja}\nMOEPP_CUDA:STRING=0\n")
    return cache


@pytest.mark.parametrize("ninja_type", ["UNINITIALIZED", "FILEPATH"])  # passed with -D, or found by CMake
def test_a_cache_from_the_same_tools_is_kept(tmp_path, drop_stale_cache, ninja_type):
    cmake = tmp_path / "cmake"
    cmake.touch()
    cache = write_cache(tmp_path, cmake, "/usr/bin/ninja", ninja_type)
    drop_stale_cache(tmp_path, "/usr/bin/ninja")
    assert cache.exists()


def test_a_cache_from_other_tools_is_dropped(tmp_path, drop_stale_cache):
    cmake = tmp_path / "cmake"
    cmake.touch()
    cache = write_cache(tmp_path, cmake, "/old/ninja", "UNINITIALIZED")
    drop_stale_cache(tmp_path, "/usr/bin/ninja")
    assert not cache.exists()
    cache = write_cache(tmp_path, tmp_path / "gone-cmake", "/usr/bin/ninja", "UNINITIALIZED")
    drop_stale_cache(tmp_path, "/usr/bin/ninja")
    assert not cache.exists()
    drop_stale_cache(tmp_path, "/usr/bin/ninja")  # no cache at all: nothing to do
