"""ctypes binding of libsparse24 (csrc/sparse24.h): no torch ABI coupling, the library is built once
by ``python -m vllm_sparse24.build`` and only loaded here (never compiled in a serving process)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from .build import DEFAULT_LIB

ABI_VERSION = 5
# S24Dtype in csrc/sparse24.h
INT8, E4M3, BF16, F16 = 0, 1, 2, 3
# the decode GEMM's int4 weight (w4a8 2:4: int4 values + group scales, int8 activations; csrc/decode/decode_gemm.h)
INT4 = 4

_c_int, _c_i64, _vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


class DecodeTuning(ctypes.Structure):
    """S24DecodeTuning (csrc/decode/decode_gemm.h): pipeline stages and persistent CTAs (0 = the
    kernel's choice), programmatic dependent launch on/off, and the 128-k blocks per work unit (4 or
    8; 0 = 4)."""

    _fields_ = [("stages", _c_int), ("ctas", _c_int), ("pdl", _c_int), ("unit_blocks", _c_int)]


class Sparse24LibraryError(RuntimeError):
    """libsparse24 is missing, stale, or a call into it failed."""


def library_path() -> Path:
    return Path(os.environ.get("VLLM_SPARSE24_LIB") or DEFAULT_LIB)


@functools.cache
def lib() -> ctypes.CDLL:
    """Load the library once per process and declare its functions."""
    path = library_path()
    if not path.is_file():
        raise Sparse24LibraryError(
            f"the sparse24 CUDA library is not built ({path} does not exist): run "
            "`python -m vllm_sparse24.build` once (needs nvcc >= 12.2 and `pip install -e '.[cuda]'` "
            "for the CUTLASS headers), or point VLLM_SPARSE24_LIB at a built libsparse24_sm90a.so"
        )
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        raise Sparse24LibraryError(f"cannot load {path}: {e}") from e
    so.s24_abi_version.restype = _c_int
    if so.s24_abi_version() != ABI_VERSION:
        raise Sparse24LibraryError(
            f"{path} has ABI {so.s24_abi_version()}, this plugin needs {ABI_VERSION}: rebuild it with "
            "`python -m vllm_sparse24.build`"
        )
    so.s24_num_configs.restype = _c_int
    so.s24_config_name.restype = ctypes.c_char_p
    so.s24_config_name.argtypes = [_c_int]
    so.s24_last_error.restype = ctypes.c_char_p
    so.s24_compressed_bytes.argtypes = [_c_int, _c_int, ctypes.POINTER(_c_i64), ctypes.POINTER(_c_i64)]
    so.s24_compress.argtypes = [_c_int, _vp, _vp, _vp, _c_int, _c_int, _vp]
    so.s24_workspace_bytes.argtypes = [_c_int, _c_int, _c_int, _c_int, _c_int, ctypes.POINTER(_c_i64)]
    so.s24_gemm.argtypes = [_c_int, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _c_int, _c_int, _c_int, _c_int, _c_int,
                            _vp, _c_i64, _c_int, _vp]
    so.s24_quant_int8.argtypes = [_c_int, _vp, _c_i64, _c_int, _c_int, _vp, _vp, _vp]
    for fn in (so.s24_compressed_bytes, so.s24_compress, so.s24_workspace_bytes, so.s24_gemm, so.s24_quant_int8):
        fn.restype = _c_int
    # the few-token decode GEMM (csrc/decode/decode_gemm.h)
    if not hasattr(so, "s24_decode_gemm"):
        raise Sparse24LibraryError(f"{path} predates the decode GEMM (no s24_decode_gemm): rebuild it with "
                                   "`python -m vllm_sparse24.build`")
    declare_decode(so)
    return so


def declare_decode(so: ctypes.CDLL) -> None:
    """Declare the decode GEMM's functions (csrc/decode/decode_gemm.h) on a loaded library: this
    one, or the decode GEMM's timing-probe build (``python -m vllm_sparse24.build --decode-probe``)."""
    so.s24_decode_max_m.restype = _c_int
    so.s24_decode_last_error.restype = ctypes.c_char_p
    so.s24_decode_workspace_bytes.argtypes = [_c_int, _c_int, _c_int, ctypes.POINTER(_c_i64)]
    so.s24_decode_partition.argtypes = [_c_int, _c_int, _c_int, _c_int] + [ctypes.POINTER(_c_int)] * 3
    so.s24_decode_gemm.argtypes = [_c_int, _c_int, _vp, _vp, _vp, _vp, _c_i64, _vp, _vp, _vp, _vp, _c_int, _c_int,
                                   _c_int, _vp, _c_i64, ctypes.POINTER(DecodeTuning), _vp]
    so.s24_decode_int4_bytes.argtypes = [_c_int, _c_int, ctypes.POINTER(_c_i64), ctypes.POINTER(_c_i64)]
    so.s24_decode_unpack_int4.argtypes = [_vp, _vp, _vp, _c_int, _c_int, _vp]
    for fn in (so.s24_decode_workspace_bytes, so.s24_decode_partition, so.s24_decode_gemm, so.s24_decode_int4_bytes,
               so.s24_decode_unpack_int4):
        fn.restype = _c_int


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise Sparse24LibraryError(f"{what}: {lib().s24_last_error().decode(errors='replace')} (code {rc})")


def check_decode(rc: int, what: str) -> None:
    if rc < 0:
        raise Sparse24LibraryError(f"{what}: {lib().s24_decode_last_error().decode(errors='replace')} (code {rc})")


def decode_max_m() -> int:
    """Largest token count the decode GEMM serves (csrc/decode/)."""
    return lib().s24_decode_max_m()


def decode_workspace_bytes(m: int, n: int, k: int) -> int:
    """Zero-initialized workspace that lets the decode GEMM split K across CTAs for [n, k] at <= m tokens."""
    b = _c_i64()
    check_decode(lib().s24_decode_workspace_bytes(m, n, k, ctypes.byref(b)), f"decode workspace of [{n}, {k}]")
    return b.value


def decode_int4_bytes(n: int, k: int) -> tuple[int, int]:
    """(values bytes, group scale bytes) of the decode GEMM's int4 layout of an [n, k] w4a8 2:4 weight
    (csrc/decode/layout.h; ``int4_layout.resident_bytes`` computes the same in Python)."""
    values, scales = _c_i64(), _c_i64()
    check_decode(lib().s24_decode_int4_bytes(n, k, ctypes.byref(values), ctypes.byref(scales)),
                 f"int4 layout of [{n}, {k}]")
    return values.value, scales.value


def decode_partition(n: int, k: int, sms: int = 0, unit_blocks: int = 0) -> tuple[int, int, int]:
    """(work units, persistent CTAs, units per 64-row tile) of the decode GEMM on an [n, k] layer with
    ``sms`` SMs (0: this GPU's) and units of ``unit_blocks`` 128-k blocks (0: the default, 4)."""
    units, ctas, per_tile = _c_int(), _c_int(), _c_int()
    check_decode(lib().s24_decode_partition(n, k, sms, unit_blocks, ctypes.byref(units), ctypes.byref(ctas),
                                            ctypes.byref(per_tile)),
                 f"decode partition of [{n}, {k}]")
    return units.value, ctas.value, per_tile.value


@functools.cache
def config_ids() -> dict[str, int]:
    """Config name -> id of the rows the loaded library holds (csrc/configs.inc; search-only rows only
    in a library built with --search-configs)."""
    so = lib()
    names = (so.s24_config_name(i) for i in range(so.s24_num_configs()))
    return {name.decode(): i for i, name in enumerate(names) if name is not None}


def compressed_bytes(n: int, k: int) -> tuple[int, int]:
    """(values bytes, metadata bytes) of the resident form of an [n, k] 2:4 weight."""
    v, m = _c_i64(), _c_i64()
    check(lib().s24_compressed_bytes(n, k, ctypes.byref(v), ctypes.byref(m)), f"compressed size of [{n}, {k}]")
    return v.value, m.value


def workspace_bytes(config: int, m: int, n: int, k: int, splits: int) -> int:
    b = _c_i64()
    check(lib().s24_workspace_bytes(config, m, n, k, splits, ctypes.byref(b)), f"workspace of config {config}")
    return b.value
