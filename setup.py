"""A wheel built after ``python -m vllm_sparse24.build`` holds the compiled CUDA library (package
data ``lib/*.so``, pyproject.toml) and is platform-specific (py3-none-<platform>: the library is
loaded through ctypes, so any Python 3 runs it); without the library the wheel is pure Python
(the CPU path, or a source install that builds the library itself). Everything else is in
pyproject.toml."""

from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel

LIB_DIR = Path(__file__).parent / "vllm_sparse24" / "kernels" / "cuda" / "lib"


def has_library() -> bool:
    return any(LIB_DIR.glob("*.so"))


class WithLibrary(Distribution):
    def has_ext_modules(self) -> bool:  # a prebuilt shared library: the wheel is not pure
        return has_library()


class bdist_wheel_any_python(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        python, abi, platform = super().get_tag()
        return ("py3", "none", platform) if has_library() else (python, abi, platform)


setup(distclass=WithLibrary, cmdclass={"bdist_wheel": bdist_wheel_any_python})
