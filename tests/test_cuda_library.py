"""The CUDA library as built (no GPU needed: loading it and its host-side functions touch no device),
and the GEMM dispatch table it serves."""

from __future__ import annotations

import re

import pytest
import torch

from vllm_sparse24.kernels import UnsupportedDeviceError
from vllm_sparse24.kernels.cuda import build, lib
from vllm_sparse24.kernels.cuda.gemm_table import GEMM_TABLE, GemmPlan


def test_config_rows_parse_in_order():
    rows = build.config_rows()
    assert [i for i, _ in rows] == list(range(len(rows))) and len({n for _, n in rows}) == len(rows)
    for _, name in rows:  # names say what the row is: in_out_MxNxK_cMxN_schedule
        assert re.fullmatch(r"(i8|e4m3)_(bf16|f16)_\d+x\d+x\d+_c\dx\d_(ws|pp|coop|coopsk)", name), name
        tk = int(name.split("_")[2].split("x")[2])
        assert tk >= 128, f"{name}: tile K must stay >= 128 (one resident metadata layout)"


def test_dispatch_table_names_only_compiled_configs():
    """Every config the table names is a row a default build compiles, and every such row is named
    (a row only `gemm_bench.py --search` tries is an S24_SEARCH_CONFIG row, compiled on request)."""
    names = {n for _, n in build.config_rows(search_configs=False)}
    named = {choice.config for classes in GEMM_TABLE.values() for rows in classes.values() for _, choice in rows}
    assert named == names, (sorted(names - named), sorted(named - names))
    assert len(build.config_rows()) > len(names)
    for key, classes in GEMM_TABLE.items():
        for rows in classes.values():
            assert rows and rows[-1][0] is None, key
            bounds = [b for b, _ in rows[:-1]]
            assert bounds == sorted(set(bounds)), key
            for _, choice in rows:
                assert choice.config in names, (key, choice)
                assert choice.config.startswith({"int8": "i8_", "e4m3": "e4m3_"}[key[0]] + key[1] + "_"), choice


def test_plan_picks_the_bucket_of_m():
    ids = {n: i for i, n in build.config_rows()}
    plan = GemmPlan(4096, 4096, torch.int8, torch.bfloat16, ids)
    rows = GEMM_TABLE[("int8", "bf16")][plan.shape_class]
    for m in (1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, 8192, 100000):
        want = next(c for b, c in rows if b is None or m <= b)
        assert plan.pick(m) == (ids[want.config], want.splits, want.swizzle), m
    with pytest.raises(UnsupportedDeviceError, match="lacks configs"):
        GemmPlan(4096, 4096, torch.int8, torch.bfloat16, {})
    with pytest.raises(UnsupportedDeviceError, match="no sparse24 GEMM for torch.float32"):
        GemmPlan(4096, 4096, torch.float32, torch.bfloat16, ids)


def test_missing_library_error_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_SPARSE24_LIB", str(tmp_path / "nope.so"))
    lib.lib.cache_clear()
    try:
        with pytest.raises(lib.Sparse24LibraryError, match=r"nope.so does not exist\): run `python -m vllm_sparse24.build`"):
            lib.lib()
    finally:
        lib.lib.cache_clear()


@pytest.fixture
def built():
    if not lib.library_path().is_file():
        pytest.skip(f"library not built ({lib.library_path()}): `python -m vllm_sparse24.build` builds it")
    lib.lib.cache_clear()
    lib.config_ids.cache_clear()
    return lib.lib()


def test_built_library_matches_the_table(built):
    """The library holds the table's rows under their configs.inc ids, and the search-only rows all or
    none (--search-configs)."""
    everything = {n: i for i, n in build.config_rows()}
    default = {n: i for i, n in build.config_rows(search_configs=False)}
    assert lib.config_ids() in (default, everything)
    assert built.s24_config_name(-1) is None and built.s24_config_name(10_000) is None


def test_resident_bytes_are_five_eighths(built):
    for n, k in [(6144, 4096), (28672, 4096), (4096, 14336), (960, 576), (57344, 8192)]:
        values, meta = lib.compressed_bytes(n, k)
        assert values == n * k // 2, (n, k)
        # metadata: 4 bits per group of 4 (n*k/8 bytes), padded to 64-row x 128-column atoms
        assert meta == -(-n // 64) * 64 * -(-k // 128) * 128 // 8, (n, k)
        assert (values + meta) / (n * k) <= 0.63 or n % 64 or k % 128
    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 4"):
        lib.compressed_bytes(64, 66)


def test_decode_threshold_rule(monkeypatch):
    """Unset env var: decode GEMM off. ``auto``: it keeps every timed M up to the first where it loses; a count overrides
    (capped at what the kernel serves), 0 turns it off, garbage is refused; shapes and dtypes it
    cannot read get 0 without timing."""
    from vllm_sparse24.kernels.cuda.gemm_table import DECODE_ENV, decode_max_m

    never = lambda m: pytest.fail("timed although the threshold was decided")  # noqa: E731
    monkeypatch.delenv(DECODE_ENV, raising=False)  # default: decode GEMM off, nothing timed
    assert decode_max_m(4096, 4096, torch.int8, 32, never) == 0
    monkeypatch.setenv(DECODE_ENV, "auto")
    timed = []

    def measure(m):  # decode wins at 1..8, loses at 16, would win again at 32
        timed.append(m)
        return (1.0, 2.0) if m <= 8 or m == 32 else (2.0, 1.0)

    assert decode_max_m(4096, 4096, torch.int8, 32, measure) == 8 and timed == [1, 2, 4, 8, 16]
    assert decode_max_m(4096, 4096, torch.int8, 4, lambda m: (1.0, 2.0)) == 4
    assert decode_max_m(4096, 4096, torch.int8, 32, lambda m: (2.0, 1.0)) == 0
    assert decode_max_m(4096, 4096, torch.int8, 32, None) == 0
    assert decode_max_m(4096, 4000, torch.int8, 32, never) == 0
    assert decode_max_m(4096, 4096, torch.bfloat16, 32, never) == 0
    assert decode_max_m(4096, 4096, torch.float8_e4m3fn, 32, lambda m: (1.0, 2.0)) == 32
    monkeypatch.setenv(DECODE_ENV, "16")
    assert decode_max_m(4096, 4096, torch.int8, 32, never) == 16
    monkeypatch.setenv(DECODE_ENV, "64")
    assert decode_max_m(4096, 4096, torch.int8, 32, never) == 32
    monkeypatch.setenv(DECODE_ENV, "0")
    assert decode_max_m(4096, 4096, torch.int8, 32, never) == 0
    monkeypatch.setenv(DECODE_ENV, "eight")
    with pytest.raises(ValueError, match=f"{DECODE_ENV}='eight'"):
        decode_max_m(4096, 4096, torch.int8, 32, never)


def test_auto_picks_the_work_unit_that_was_faster_where_the_decode_gemm_serves():
    """decode_unit_blocks: the unit size with the least total time over the token counts the decode
    GEMM keeps (m <= its threshold; slower sizes at larger m do not count); ties keep the smaller
    unit; none kept or nothing timed: 0, the kernel's default."""
    from vllm_sparse24.kernels.cuda.gemm_table import DECODE_UNIT_BLOCKS, decode_unit_blocks

    assert DECODE_UNIT_BLOCKS == (4, 8)
    timed = {4: {1: 10.0, 8: 11.0, 16: 30.0}, 8: {1: 9.0, 8: 10.5, 16: 40.0}}
    assert decode_unit_blocks(timed, 8) == 8
    assert decode_unit_blocks(timed, 16) == 4
    assert decode_unit_blocks({4: {1: 1.0}, 8: {1: 1.0}}, 1) == 4
    assert decode_unit_blocks(timed, 0) == 0
    assert decode_unit_blocks({4: {}, 8: {}}, 8) == 0


def test_int4_decode_threshold_rule(monkeypatch):
    """w4a8 layers (int4 plans): unset means every M the kernel serves (their other path unpacks the
    weight first); a count, 0 and ``auto`` act as for 8-bit layers; K needs to be a multiple of 64
    only (the int4 layout pads a partial last block)."""
    from vllm_sparse24.kernels.cuda.gemm_table import DECODE_ENV, decode_max_m

    never = lambda m: pytest.fail("timed although the threshold was decided")  # noqa: E731
    monkeypatch.delenv(DECODE_ENV, raising=False)
    assert decode_max_m(4096, 4096, torch.int8, 64, never, int4=True) == 64
    assert decode_max_m(1536, 576, torch.int8, 64, never, int4=True) == 64
    assert decode_max_m(1536, 576, torch.int8, 64, never) == 0  # 8-bit weights: whole 128-column blocks
    assert decode_max_m(1536, 96, torch.int8, 64, never, int4=True) == 0
    monkeypatch.setenv(DECODE_ENV, "0")
    assert decode_max_m(4096, 4096, torch.int8, 64, never, int4=True) == 0
    monkeypatch.setenv(DECODE_ENV, "16")
    assert decode_max_m(4096, 4096, torch.int8, 64, never, int4=True) == 16
    monkeypatch.setenv(DECODE_ENV, "auto")
    assert decode_max_m(4096, 4096, torch.int8, 64, lambda m: (1.0, 2.0) if m <= 32 else (2.0, 1.0), int4=True) == 32
    assert not GemmPlan(4096, 4096, torch.int8, torch.bfloat16, {n: i for i, n in build.config_rows()}).int4


def test_int4_layout_sizes_agree_with_the_library(built):
    from vllm_sparse24.kernels.cuda import int4_layout

    for n, k in [(6144, 4096), (4096, 14336), (960, 576), (200, 2304), (8, 64)]:
        assert lib.decode_int4_bytes(n, k) == int4_layout.resident_bytes(n, k), (n, k)
    values, scales = lib.decode_int4_bytes(4096, 4096)
    assert (values + scales + lib.compressed_bytes(4096, 4096)[1]) / 4096**2 == 0.25 + 0.125 + 1 / 128
    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 64"):
        lib.decode_int4_bytes(64, 96)


def test_cutlass_pdl_switch(monkeypatch):
    """VLLM_SPARSE24_PDL: 1 launches the CUTLASS GEMMs with programmatic dependent launch, unset or 0
    without; anything else is refused with the variable's name. Read once per process (cached)."""
    from vllm_sparse24.kernels.cuda.gemm_table import PDL_ENV, cutlass_pdl

    for raw, want in ((None, False), ("1", True), ("0", False), (" 1 ", True)):
        cutlass_pdl.cache_clear()
        if raw is None:
            monkeypatch.delenv(PDL_ENV, raising=False)
        else:
            monkeypatch.setenv(PDL_ENV, raw)
        assert cutlass_pdl() is want, raw
    monkeypatch.setenv(PDL_ENV, "yes")
    cutlass_pdl.cache_clear()
    with pytest.raises(ValueError, match=f"{PDL_ENV}='yes'"):
        cutlass_pdl()
    monkeypatch.setenv(PDL_ENV, "1")
    cutlass_pdl.cache_clear()
    assert cutlass_pdl()
    monkeypatch.setenv(PDL_ENV, "0")
    assert cutlass_pdl()  # cached: the first read decides for the process
    cutlass_pdl.cache_clear()


def test_plan_uses_decode_up_to_its_threshold():
    plan = GemmPlan(4096, 4096, torch.int8, torch.bfloat16, {n: i for i, n in build.config_rows()})
    assert plan.decode_max_m == 0 and not plan.use_decode(1)
    plan.decode_max_m = 16
    assert plan.use_decode(1) and plan.use_decode(16) and not plan.use_decode(17)


def test_decode_abi_is_exported(built):
    """The decode GEMM's host-side entry points (no GPU touched): limits, the work partition and
    refusals."""
    assert lib.decode_max_m() == 64
    assert lib.decode_workspace_bytes(32, 256, 4096) > 0
    # units of 64 rows x 512 k, one persistent CTA per SM (132: H100 / H200 SXM), never more CTAs than units
    assert lib.decode_partition(4096, 4096, 132) == (64 * 8, 132, 8)
    assert lib.decode_partition(28672, 4096, 132) == (448 * 8, 132, 8)
    assert lib.decode_partition(4096, 14336, 132) == (64 * 28, 132, 28)
    assert lib.decode_partition(200, 384, 132) == (4, 4, 1)  # a partial tile in K and in rows
    # units of 64 rows x 1024 k
    assert lib.decode_partition(4096, 4096, 132, unit_blocks=8) == (64 * 4, 132, 4)
    assert lib.decode_partition(4096, 14336, 132, unit_blocks=8) == (64 * 14, 132, 14)
    assert lib.decode_partition(136, 1152, 132, unit_blocks=8) == (6, 6, 2)  # 9 blocks: a partial second unit
    with pytest.raises(lib.Sparse24LibraryError, match="unit_blocks=6"):
        lib.decode_partition(4096, 4096, 132, unit_blocks=6)
    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 128"):
        lib.decode_workspace_bytes(8, 64, 96)
    with pytest.raises(lib.Sparse24LibraryError, match="m=65 tokens"):
        lib.decode_workspace_bytes(65, 64, 128)


def test_a_machine_with_the_toolkit_has_built_the_library():
    """The test command builds the library first, skipping only where the toolkit is missing: with
    nvcc and the CUTLASS headers here (CI), a missing library is a failure, not a skip."""
    try:
        build.find_nvcc()
        build.find_cutlass()
    except build.BuildError as e:
        pytest.skip(f"no CUDA toolkit here: {e}")
    assert build.DEFAULT_LIB.is_file(), f"nvcc is here but {build.DEFAULT_LIB} is not built: run python -m vllm_sparse24.build"


def test_the_build_skips_with_a_message_without_the_toolkit(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(build.glob, "glob", lambda pattern: [])
    assert build.main(["--skip-without-toolkit", "--out", str(tmp_path / "lib.so")]) == 0
    assert "skipping the CUDA library build: no nvcc >= 12.2 found" in capsys.readouterr().err
    assert build.main(["--out", str(tmp_path / "lib.so")]) == 1
    assert not (tmp_path / "lib.so").exists()
