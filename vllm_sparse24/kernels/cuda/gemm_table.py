"""Which CUTLASS GEMM config of the sparse24 library (csrc/configs.inc, by row name) serves which
token count M on which layer shape, and the token count below which the few-token decode GEMM
(csrc/decode/) serves instead: the data of the 2:4 GEMM dispatch, next to the kernel that runs it.

``GEMM_TABLE`` maps (input dtype, output dtype) and a layer shape class to token-count buckets.
Chosen by measurement on an H200 (``benchmarks/gemm_bench.py --search``; the searched table and its
timings are in benchmarks/results/ and docs/kernels.md). The e4m3 rows are derived from the int8
ones (same buckets, tiles and schedules), so a new int8 row gets its e4m3 twin from here.

Few tokens: the decode GEMM serves M <= ``GemmPlan.decode_max_m``: 0 (off) by default, a count set
by ``VLLM_SPARSE24_DECODE_MAX_M``, or with ``auto`` measured per layer shape when the plan is made at
load time (``decode_max_m`` below); the CUTLASS configs serve every larger M. w4a8 layers (int4
plans) differ in the default only: the int4 decode GEMM serves every M it can (64), because their
other path unpacks the whole weight before the CUTLASS GEMM reads it (see ``decode_max_m``).
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..base import UnsupportedDeviceError
from . import int4_layout


@dataclass(frozen=True)
class GemmChoice:
    config: str  # a csrc/configs.inc row
    splits: int = 1  # split-K factor (stream-K configs only; 1 = the scheduler's heuristic)
    swizzle: int = 1  # tile raster swizzle of persistent configs


# Shape classes: (name, predicate on (n, k)); the first that matches. At few tokens the output
# features N decide: up to 8192 rows (Llama-3-8B qkv/o/down, 70B o/down), 64-row non-persistent tiles
# already put >= 64 CTAs on the GPU and win; wider layers (8B gate_up, 70B qkv/gate_up) do better
# with 128-row tiles and stream-K spreading K over the SMs.
SHAPE_CLASSES: list[tuple[str, object]] = [
    ("narrow", lambda n, k: n <= 8192),
    ("wide", lambda n, k: True),
]

# Above 512 tokens one config serves both classes: 128 x 256 tiles, a 2 x 1 cluster (the two CTAs
# share the activation tile through TMA multicast: the kernel is L2-bandwidth bound), raster
# swizzle 4; within ~5% of the best searched config on every Llama-3 8B/70B shape.
_PREFILL = [
    (512, GemmChoice("i8_bf16_128x128x256_c1x2_coop")),
    (None, GemmChoice("i8_bf16_128x256x128_c2x1_coop", swizzle=4)),
]

# (input, output) dtype -> shape class -> [(largest M of the bucket, choice)], ascending; the last
# bucket's M bound is None (every larger M).
GEMM_TABLE: dict[tuple[str, str], dict[str, list[tuple[int | None, GemmChoice]]]] = {
    ("int8", "bf16"): {
        "narrow": [
            (16, GemmChoice("i8_bf16_64x16x256_c1x1_ws")),
            (32, GemmChoice("i8_bf16_64x32x256_c1x1_ws")),
            (64, GemmChoice("i8_bf16_64x64x256_c1x1_ws")),
            (256, GemmChoice("i8_bf16_64x128x256_c1x1_pp")),
            *_PREFILL,
        ],
        "wide": [
            (16, GemmChoice("i8_bf16_128x16x256_c1x1_coopsk")),
            (32, GemmChoice("i8_bf16_128x32x256_c1x1_coopsk")),
            (64, GemmChoice("i8_bf16_128x64x128_c1x1_coop")),
            (512, GemmChoice("i8_bf16_256x128x128_c2x1_coop")),
            _PREFILL[-1],
        ],
    },
    ("int8", "f16"): {
        "narrow": [
            (64, GemmChoice("i8_f16_64x32x256_c1x1_ws")),
            (None, GemmChoice("i8_f16_128x128x128_c1x2_coop")),
        ],
        "wide": [
            (64, GemmChoice("i8_f16_64x32x256_c1x1_ws")),
            (None, GemmChoice("i8_f16_128x128x128_c1x2_coop")),
        ],
    },
}


def _e4m3_rows(rows: list[tuple[int | None, GemmChoice]]) -> list[tuple[int | None, GemmChoice]]:
    """The same buckets, tiles and schedules with the e4m3 row of each config (configs.inc has one)."""
    return [(m, replace(c, config="e4m3_" + c.config.removeprefix("i8_"))) for m, c in rows]


# the fp8 scheme (bf16 models): the int8 table's tiles and schedules, e4m3 rows (measured within
# ~5% of the int8 GEMMs on an H200, docs/results.md)
GEMM_TABLE[("e4m3", "bf16")] = {cls: _e4m3_rows(rows) for cls, rows in GEMM_TABLE[("int8", "bf16")].items()}

DTYPE_NAMES = {torch.int8: "int8", torch.float8_e4m3fn: "e4m3", torch.bfloat16: "bf16", torch.float16: "f16"}

# scheme -> the input dtype of the GEMM table rows that serve its 2:4 layers. w4a8 (int4 values x
# uint8 group scale) runs the int8 rows on its int8 codes (int4 value x group scale, exactly),
# unpacked from the resident int4 values into a shared scratch right before the GEMM; at few tokens
# the decode GEMM's int4 variant streams the int4 values themselves.
GEMM_INPUT = {"int8": "int8", "fp8": "e4m3", "w4a8": "int8"}


def shape_class(n: int, k: int) -> str:
    return next(name for name, pred in SHAPE_CLASSES if pred(n, k))


class GemmPlan:
    """The GEMM choices of one layer shape, resolved to library config ids once at load time, so a
    call only bisects its M (capture-safe: no allocation, no search)."""

    def __init__(self, n: int, k: int, in_dtype: torch.dtype, out_dtype: torch.dtype, config_ids: dict[str, int]):
        key = (DTYPE_NAMES.get(in_dtype), DTYPE_NAMES.get(out_dtype))
        if key not in GEMM_TABLE:
            raise UnsupportedDeviceError(f"no sparse24 GEMM for {in_dtype} weights with {out_dtype} output; "
                                         f"supported: {sorted(GEMM_TABLE)}")
        self.n, self.k, self.in_dtype, self.out_dtype, self.shape_class = n, k, in_dtype, out_dtype, shape_class(n, k)
        rows = GEMM_TABLE[key][self.shape_class]
        self.bounds = [b for b, _ in rows[:-1]]
        self.choices = [c for _, c in rows]
        missing = [c.config for c in self.choices if c.config not in config_ids]
        if missing:
            raise UnsupportedDeviceError(f"the sparse24 library lacks configs {missing}: rebuild it with "
                                         "`python -m vllm_sparse24.build`")
        self.calls = [(config_ids[c.config], c.splits, c.swizzle) for c in self.choices]
        self.decode_max_m = 0  # set at load time by decode_max_m(); a plain int, fixed before graph capture
        # the decode GEMM's launch knobs (lib.DecodeTuning: the work unit decode_unit_blocks() picked), or
        # None for the kernel's defaults
        self.decode_tuning = None
        self.int4 = False  # a w4a8 layer: int4 values + group scales resident, unpacked for these configs

    def use_decode(self, m: int) -> bool:
        """Whether the decode GEMM (not a CUTLASS config) serves M tokens."""
        return m <= self.decode_max_m

    def pick(self, m: int) -> tuple[int, int, int]:
        """(config id, splits, swizzle) for M tokens."""
        return self.calls[bisect.bisect_left(self.bounds, m)]

    def buckets(self, largest_m: int) -> list[tuple[int, tuple[int, int, int]]]:
        """(largest M, call) of every bucket, the open one capped at ``largest_m`` (workspace sizing)."""
        return [(b if b is not None else largest_m, call) for b, call in zip([*self.bounds, None], self.calls, strict=True)]


# ---- programmatic dependent launch of the CUTLASS GEMMs ----------------------------------------

PDL_ENV = "VLLM_SPARSE24_PDL"


@functools.cache
def cutlass_pdl() -> bool:
    """Whether the CUTLASS GEMMs launch with programmatic dependent launch (``VLLM_SPARSE24_PDL``,
    read once per process: 0 (default) or 1); the result is the same bit for bit. Off by default: a
    GEMM gains from it only after a kernel that signals its dependents early, and the activation
    quantization before each GEMM (an Inductor kernel) does not, so end to end it measured no gain
    (docs/kernels.md)."""
    raw = os.environ.get(PDL_ENV, "0").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}={raw!r}: expected 0 (the default) or 1 (launch the CUTLASS GEMMs "
                         "with programmatic dependent launch)")
    return raw == "1"


# ---- the decode GEMM's token-count threshold ---------------------------------------------------

DECODE_ENV = "VLLM_SPARSE24_DECODE_MAX_M"
# Token counts timed at load time: the serving batch sizes where the weight stream dominates.
DECODE_CANDIDATE_MS = (1, 2, 4, 8, 16, 32, 64)
DECODE_BLOCK_K = 128  # the decode GEMM reads whole 128-column metadata blocks
DECODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
# The decode GEMM's work-unit sizes (128-k blocks) that ``auto`` times (S24DecodeTuning.unit_blocks)
DECODE_UNIT_BLOCKS = (4, 8)


def decode_forced_max_m(unset: int = 0) -> int | None:
    """``VLLM_SPARSE24_DECODE_MAX_M`` as a token count (0 = decode GEMM off), or None for ``auto``
    (measured per layer shape at load). Unset means ``unset``: 0 for 8-bit layers, where the decode
    GEMM is opt-in until its timings against the CUTLASS configs (docs/kernels.md) decide where it
    serves by default."""
    raw = os.environ.get(DECODE_ENV, "").strip().lower()
    if not raw:
        return unset
    if raw == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{DECODE_ENV}={raw!r}: expected 'auto' or a token count >= 0 "
                         "(0, the default, turns the decode GEMM off)")
    return value


def decode_max_m(n: int, k: int, in_dtype: torch.dtype, kernel_max_m: int,
                 measure: Callable[[int], tuple[float, float]] | None, int4: bool = False) -> int:
    """Largest token count the decode GEMM serves for one layer shape (0: none), decided once at load.

    ``VLLM_SPARSE24_DECODE_MAX_M`` decides (capped at what the kernel serves; unset: 0). With
    ``auto``, ``measure(m)`` -> (decode seconds, CUTLASS GEMM seconds) on this shape: the decode GEMM keeps
    every candidate M up to the first one where it is slower, so the threshold splits the token
    counts into one decode range and one GEMM range (a call between two candidates runs the kernel
    instance of the next candidate up, so it costs about what was measured there).

    ``int4`` (w4a8 layers): unset means every M the kernel serves. The other path unpacks the int4
    weight (read 0.39 bytes per weight, write 0.5) before the CUTLASS GEMM reads 0.625, ~1.5 bytes
    per weight against the decode GEMM's 0.39, and at few tokens a GEMM is its weight stream (on an
    H100 the decode GEMM won or tied on every Llama-3-8B shape at M = 1 and 8, docs/kernels.md;
    ``auto`` measures it per shape, as for 8-bit layers)."""
    if int4:
        if k % int4_layout.K_MULTIPLE:  # the int4 layout pads a partial last block (K = 576)
            return 0
        forced = decode_forced_max_m(unset=kernel_max_m)
    elif in_dtype not in DECODE_DTYPES or k % DECODE_BLOCK_K:
        return 0
    else:
        forced = decode_forced_max_m()
    if forced is not None:
        return min(forced, kernel_max_m)
    if measure is None:
        return 0
    best = 0
    for m in (c for c in DECODE_CANDIDATE_MS if c <= kernel_max_m):
        decode_s, gemm_s = measure(m)
        if decode_s > gemm_s:
            break
        best = m
    return best


def decode_unit_blocks(seconds: dict[int, dict[int, float]], max_m: int) -> int:
    """The decode GEMM's work unit for one layer shape, from ``auto``'s timings ``seconds[unit
    blocks][m]``: the size with the least total time over the token counts the decode GEMM serves
    (m <= max_m); 0 (the kernel's default) when it serves none or nothing was timed."""
    totals = {ub: sum(t for m, t in by_m.items() if m <= max_m) for ub, by_m in seconds.items()
              if any(m <= max_m for m in by_m)}
    return min(totals, key=lambda ub: (totals[ub], ub)) if max_m > 0 and totals else 0
