"""Build libsparse24 (the CUTLASS sm90 2:4 GEMMs, csrc/) ahead of time: ``python -m vllm_sparse24.build``.

Needs nvcc >= 12.2 (CUDA_HOME, PATH or /usr/local/cuda*) and the CUTLASS headers of the
``nvidia-cutlass`` wheel (the ``cuda`` extra installs it); no GPU and no torch. Each row of
csrc/configs.inc that the dispatch table uses (all rows with ``--search-configs``) is one translation unit (a CUTLASS sparse GEMM takes ~100 s and ~5 GB to compile),
built ``--jobs`` at a time, plus the C ABI (api.cu) and the few-token decode GEMM (csrc/decode/);
objects are cached under ``--build-dir`` by a hash of their sources and flags, so a rebuild after an
edit recompiles only what changed. The library is linked into a
temporary file and renamed into place, so a failed build never leaves a half-written library.

``--decode-probe`` also builds ``libsparse24_decode_probe.so`` beside it: the decode GEMM alone,
compiled with -DS24_DECODE_PROBE (per-CTA %globaltimer stamps, csrc/decode/decode_gemm.cu), for
``benchmarks/decode_probe.py``. Off by default; the plugin never loads it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("vllm_sparse24.build")

CSRC = Path(__file__).parent / "csrc"
LIB_NAME = "libsparse24_sm90a.so"
DEFAULT_LIB = Path(__file__).parent / "lib" / LIB_NAME
PROBE_LIB_NAME = "libsparse24_decode_probe.so"


def probe_library_path(lib: Path = DEFAULT_LIB) -> Path:
    """Where ``--decode-probe`` puts the timing-probe build of the decode GEMM: beside ``lib``."""
    return Path(lib).with_name(PROBE_LIB_NAME)
MIN_NVCC = (12, 2)
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
    # sm_90a: wgmma.sp and setmaxnreg exist only on the arch-specific target
    "-gencode=arch=compute_90a,code=sm_90a",
    # CUTLASS's sm90 kernels wait on the previous grid (griddepcontrol.wait) before their first global
    # load, so a GEMM launched with programmatic dependent launch (S24GemmArgs.pdl) is correct
    "-DCUTLASS_ENABLE_GDC_FOR_SM90",
]
# The stream-K scheduler of the CUTLASS 4.2 headers does not compile with CUTLASS_ENABLE_GDC_FOR_SM90
# (its const is_last_tile binds a member to a non-const reference): those rows turn on only the
# waits (CUTLASS_GDC_ENABLED) and leave out the early launch_dependents hint behind that macro.
STREAM_K_GDC_FLAGS = ["-UCUTLASS_ENABLE_GDC_FOR_SM90", "-DCUTLASS_GDC_ENABLED"]
_ROW = re.compile(r"^(S24_CONFIG|S24_SEARCH_CONFIG)\(\s*(\d+)\s*,\s*(\w+)", re.M)


class BuildError(RuntimeError):
    """The CUDA library could not be built (missing toolkit or headers, compiler error)."""


def config_rows(search_configs: bool = True) -> list[tuple[int, str]]:
    """(id, name) of the rows of csrc/configs.inc, in order: every row, or (``search_configs=False``)
    those a default build compiles, the S24_CONFIG rows the dispatch table uses."""
    found = _ROW.findall((CSRC / "configs.inc").read_text())
    if [int(i) for _, i, _ in found] != list(range(len(found))):
        raise BuildError(f"{CSRC / 'configs.inc'}: config ids must be 0, 1, 2, ... in row order")
    return [(int(i), name) for macro, i, name in found if search_configs or macro == "S24_CONFIG"]


def find_nvcc() -> str:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    for nvcc in candidates:
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"release (\d+)\.(\d+)", out)
            if m and (int(m[1]), int(m[2])) >= MIN_NVCC:
                return nvcc
            log.info("skipping %s (release %s; need >= %d.%d)", nvcc, m and m.group(0), *MIN_NVCC)
    raise BuildError(
        f"no nvcc >= {MIN_NVCC[0]}.{MIN_NVCC[1]} found (looked at $CUDA_HOME/bin, PATH, /usr/local/cuda*); "
        "install the CUDA toolkit or set CUDA_HOME"
    )


def find_cutlass() -> list[str]:
    """Include folders of the CUTLASS headers: $CUTLASS_DIR (a CUTLASS checkout) or the nvidia-cutlass wheel."""
    roots = []
    if os.environ.get("CUTLASS_DIR"):
        roots.append(Path(os.environ["CUTLASS_DIR"]))
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "source")
    for root in roots:
        inc, util = root / "include", root / "tools" / "util" / "include"
        if (inc / "cutlass" / "gemm" / "collective" / "builders" / "sm90_sparse_gmma_builder.inl").is_file():
            return [str(inc), str(util)]
    raise BuildError(
        "CUTLASS headers not found: pip install 'nvidia-cutlass==4.2.0.0' (the cuda extra does) "
        "or set CUTLASS_DIR to a CUTLASS >= 4.2 checkout"
    )


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:16]


def build(out: Path = DEFAULT_LIB, build_dir: Path | None = None, jobs: int = 2, search_configs: bool = False,
          decode_probe: bool = False) -> Path:
    """Compile the configs (the table's rows, or with ``search_configs`` every row) + the C ABI and the
    decode GEMM, and link ``out``; returns its path. ``decode_probe``: also link the decode GEMM's
    timing-probe build into ``probe_library_path(out)``."""
    nvcc = find_nvcc()
    includes = find_cutlass()
    build_dir = Path(build_dir or Path(tempfile.gettempdir()) / "vllm_sparse24_build")
    build_dir.mkdir(parents=True, exist_ok=True)
    # a config's object depends on the shared headers, its own table row and its id, not on the
    # other rows: appending a row to configs.inc recompiles only that row (and api.cu)
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")))
    table = (CSRC / "configs.inc").read_text()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = NVCC_FLAGS + [f"-I{p}" for p in includes] + [f"-I{CSRC}"]
    # the digests see the flags with this checkout's csrc path left out: two checkouts of the same
    # sources (worktrees, clones) share one object cache instead of each recompiling every config
    key_flags = [f for f in flags if f != f"-I{CSRC}"]
    units: list[tuple[str, list[str], Path]] = []  # (label, command, object)
    src = CSRC / "gemm_config.cu"
    for cid, name in config_rows(search_configs):
        row = re.search(rf"^S24_(SEARCH_)?CONFIG\(\s*{cid}\s*,.*$", table, re.M).group(0)
        row_flags = STREAM_K_GDC_FLAGS if row.rstrip().endswith("CoopSk)") else []
        obj = build_dir / (f"cfg{cid:02d}_{name}_"
                           f"{_digest(headers, src.read_bytes(), row, version, *key_flags, *row_flags)}.o")
        units.append((name, [nvcc, *flags, *row_flags, f"-DS24_CONFIG_ID={cid}", "-c", str(src), "-o", str(obj)],
                      obj))
    # the few-token decode GEMM (csrc/decode/): its own sources and the C ABI header only, so
    # editing it never invalidates the CUTLASS config objects (their digest reads csrc/*.h, *.cuh)
    decode = CSRC / "decode" / "decode_gemm.cu"
    decode_src = b"".join(p.read_bytes() for p in sorted((CSRC / "decode").glob("*")) if p.is_file())
    decode_inputs = (decode_src, (CSRC / "sparse24.h").read_bytes(), version, *key_flags)
    decode_obj = build_dir / f"decode_{_digest(*decode_inputs)}.o"
    units.append(("decode", [nvcc, *flags, "-c", str(decode), "-o", str(decode_obj)], decode_obj))
    probe_units = []
    if decode_probe:
        probe_flags = ["-DS24_DECODE_PROBE"]
        probe_obj = build_dir / f"decode_probe_{_digest(*decode_inputs, *probe_flags)}.o"
        probe_units.append(("decode-probe", [nvcc, *flags, *probe_flags, "-c", str(decode), "-o", str(probe_obj)],
                            probe_obj))
    api = CSRC / "api.cu"
    api_flags = ["-DS24_WITH_SEARCH_CONFIGS"] if search_configs else []  # which rows the library holds
    api_obj = build_dir / f"api_{_digest(headers, table, api.read_bytes(), version, *key_flags, *api_flags)}.o"
    units.append(("api", [nvcc, *flags, *api_flags, "-c", str(api), "-o", str(api_obj)], api_obj))

    todo = [u for u in units + probe_units if not u[2].is_file()]
    log.info("nvcc %s, CUTLASS %s; %d of %d units to compile, %d at a time, objects in %s",
             nvcc, includes[0], len(todo), len(units) + len(probe_units), jobs, build_dir)
    t0 = time.time()

    def compile_unit(label: str, cmd: list[str], obj: Path) -> str:
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        cmd = [*cmd[:-1], str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"nvcc failed on {label}:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(tmp, obj)
        return label

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, tqdm(total=len(todo), desc="nvcc", unit="unit") as bar:
        futures = [pool.submit(compile_unit, *u) for u in todo]
        for fut in as_completed(futures):
            bar.set_postfix_str(fut.result())
            bar.update()
    out = Path(out)
    _link(nvcc, [u[2] for u in units], out)
    log.info("built %s (%.1f MB) in %.0f s", out, out.stat().st_size / 1e6, time.time() - t0)
    if probe_units:
        probe = probe_library_path(out)
        _link(nvcc, [u[2] for u in probe_units], probe)
        log.info("built %s (%.1f MB), the decode GEMM's timing probe", probe, probe.stat().st_size / 1e6)
    return out


def _link(nvcc: str, objects: list[Path], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_lib = out.with_name(f".{out.name}.tmp{os.getpid()}")
    link = [nvcc, "-shared", "-gencode=arch=compute_90a,code=sm_90a", "-o", str(tmp_lib), *map(str, objects)]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode:
        tmp_lib.unlink(missing_ok=True)
        raise BuildError(f"link failed:\n{' '.join(link)}\n{proc.stderr[-6000:]}")
    os.replace(tmp_lib, out)


def main(argv: list[str] | None = None, prog: str = "python -m vllm_sparse24.build") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Compile the sparse24 CUDA library (CUTLASS sm90 2:4 GEMMs) for Hopper GPUs.")
    ap.add_argument("--out", type=Path, default=DEFAULT_LIB,
                    help=f"library path (default: {DEFAULT_LIB}; the plugin loads it from there, "
                         "or from $VLLM_SPARSE24_LIB)")
    ap.add_argument("--build-dir", type=Path, default=None,
                    help="object cache (default: <tmp>/vllm_sparse24_build); reruns compile only what changed")
    ap.add_argument("--jobs", type=int, default=2,
                    help="translation units compiled at once; each needs ~5 GB of memory (default: 2)")
    ap.add_argument("--search-configs", action="store_true",
                    help="also compile the configs.inc rows the dispatch table does not use (S24_SEARCH_CONFIG), "
                         "the candidates of `benchmarks/gemm_bench.py --search`")
    ap.add_argument("--decode-probe", action="store_true",
                    help=f"also build {PROBE_LIB_NAME} beside the library: the decode GEMM with per-CTA "
                         "%%globaltimer stamps, for benchmarks/decode_probe.py (the plugin never loads it)")
    ap.add_argument("--skip-without-toolkit", action="store_true",
                    help="exit 0 with a message, instead of failing, where nvcc >= 12.2 or the CUTLASS headers are "
                         "missing (the test command on a machine without the CUDA toolkit: the CPU tests run, the "
                         "library's tests skip)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.skip_without_toolkit:
        try:
            find_nvcc()
            find_cutlass()
        except BuildError as e:
            print(f"skipping the CUDA library build: {e}", file=sys.stderr)
            return 0
    try:
        build(args.out, args.build_dir, args.jobs, args.search_configs, args.decode_probe)
    except BuildError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
