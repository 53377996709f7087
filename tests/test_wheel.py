"""The wheel a GPU user installs: built after the CUDA library (the test command builds it first),
it holds the library and every CUDA source the build compiles, and installed into a fresh
virtualenv whose PATH has no nvcc, the library loads and vLLM finds the plugin. The fresh
virtualenv borrows its dependencies (torch, vLLM) from the one running the tests instead of
downloading them; the package itself comes from the wheel only."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vllm_sparse24.kernels.cuda import build, lib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "vllm_sparse24", "sparse24_tools")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not build.DEFAULT_LIB.is_file():
        pytest.skip(f"the CUDA library is not built ({build.DEFAULT_LIB}); `python -m vllm_sparse24.build` builds it")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_holds_the_library_and_every_cuda_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = Path("vllm_sparse24/kernels/cuda")
    assert str(package / "lib" / build.LIB_NAME) in names
    sources = {str(package / "csrc" / p.relative_to(build.CSRC)) for p in build.CSRC.rglob("*") if p.is_file()}
    assert sources and any("/decode/" in s for s in sources) and sources <= names, sorted(sources - names)
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name  # platform-specific, any Python 3


def test_the_wheel_installs_and_loads_without_nvcc(wheel, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "VLLM_SPARSE24_LIB", "PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert Path(purelib, "vllm_sparse24", "kernels", "cuda", "lib", build.LIB_NAME).is_file()
    # dependencies from the test environment, after the venv's own site-packages (the wheel's package wins)
    Path(purelib, "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    code = (
        "import json, shutil; assert shutil.which('nvcc') is None, shutil.which('nvcc')\n"
        "import vllm_sparse24\n"
        "from vllm_sparse24.kernels.cuda import lib\n"
        "lib.lib()\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "print(json.dumps({'package': vllm_sparse24.__file__, 'library': str(lib.library_path()),\n"
        "                  'configs': len(lib.config_ids()), 'registered': 'sparse24' in QUANTIZATION_METHODS,\n"
        "                  'config': get_quantization_config('sparse24').__module__}))\n"
    )
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(purelib) and got["library"].startswith(purelib), got
    assert got["configs"] == len(lib.config_ids()) and got["registered"], got
    assert got["config"] == "vllm_sparse24.config", got
