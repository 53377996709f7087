"""The decode GEMM's timing probe without a GPU: `--decode-probe` builds the extra library only when
asked (nvcc faked), and benchmarks/decode_probe.py reads a synthetic stamp buffer as the kernel
writes it (csrc/decode/decode_gemm.cu, S24_DECODE_PROBE)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_sparse24.kernels.cuda import build

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import decode_probe as dp  # noqa: E402


@pytest.fixture
def fake_nvcc(monkeypatch):
    """nvcc that writes an empty file at -o; returns the commands it saw."""
    seen: list[list[str]] = []

    def run(cmd, **kw):
        seen.append(list(cmd))
        if "--version" in cmd:
            return subprocess.CompletedProcess(cmd, 0, stdout="Cuda compilation tools, release 12.8, V12.8.0", stderr="")
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(build, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(build, "find_cutlass", lambda: ["/cutlass/include"])
    monkeypatch.setattr(build.subprocess, "run", run)
    return seen


@pytest.mark.parametrize("probe", [False, True])
def test_the_probe_library_is_built_only_when_asked(fake_nvcc, tmp_path, probe):
    out = tmp_path / "lib" / build.LIB_NAME
    args = ["--out", str(out), "--build-dir", str(tmp_path / "objs"), "--jobs", "1"] + (["--decode-probe"] if probe else [])
    assert build.main(args) == 0
    assert out.is_file()
    assert build.probe_library_path(out).is_file() == probe
    probe_compiles = [c for c in fake_nvcc if "-DS24_DECODE_PROBE" in c]
    assert len(probe_compiles) == (1 if probe else 0)
    links = [c for c in fake_nvcc if "-shared" in c]
    main_link = next(c for c in links if Path(c[c.index("-o") + 1]).name.startswith(f".{build.LIB_NAME}"))
    # the plugin's library never holds the probe build's object
    assert not any("decode_probe_" in a for a in main_link)
    if probe:
        probe_link = next(c for c in links if c is not main_link)
        objs = [a for a in probe_link if a.endswith(".o")]
        assert len(objs) == 1 and Path(objs[0]).name.startswith("decode_probe_")


def test_stamp_layout_matches_the_kernel():
    """The script's slot names and counts are the kernel's (the library is checked again on load)."""
    src = (ROOT / "vllm_sparse24/kernels/cuda/csrc/decode/decode_gemm.cu").read_text()
    names = re.search(r"kProbeSlotNames\[kPrFixed\] = \{(.*?)\};", src, re.S).group(1)
    assert re.findall(r'"(\w+)"', names) == dp.FIXED
    assert f"constexpr int kProbeUnits = {dp.PROBE_UNITS};" in src
    assert f"kPrUnitIssue = {dp.UNIT_ISSUE}," in src


def test_omit_bits_match_the_kernel():
    """--omit's bit names are the kernel's ProbeOmit enum."""
    src = (ROOT / "vllm_sparse24/kernels/cuda/csrc/decode/decode_gemm.cu").read_text()
    enum = re.search(r"enum ProbeOmit : int \{(.*?)\};", src, re.S).group(1)
    bits = {int(v): name for name, v in re.findall(r"kOmit(\w+) = (\d+)", enum)}
    assert {b: n.lower() for b, n in bits.items()} == dp.OMIT_BITS
    assert dp.omit_label(14) == "act+meta+values" and dp.omit_label(0) == "nothing"
    with pytest.raises(SystemExit):
        dp.main(["--out", "unused", "--omit", "16"])


def synthetic(ctas: int = 3, base: int = 10**12, step: int = 32) -> np.ndarray:
    """ctas CTAs; CTA c enters c us after the first; phases 1 us apart; units 0..3 full / math."""
    rec = np.zeros((ctas, dp.SLOTS), dtype=np.uint64)
    order = ["entry", "init", "prod_start", "prod_pre_issued", "cons_lut", "prod_gdc", "cons_gdc", "first_full",
             "first_math", "prod_last", "prod_exit", "last_full", "last_math", "fin_first_in", "fin_first_out",
             "fin_last_in", "fin_last_out", "exit0", "exit1", "exit2", "exit3"]
    for c in range(ctas):
        t = base + c * 1000
        for i, name in enumerate(order):
            rec[c, dp.SLOT[name]] = t + i * 1000
        rec[c, dp.SLOT["smid"]] = 2 * c
        rec[c, dp.SLOT["count"]] = 4
        rec[c, dp.SLOT["finish_calls"]] = 1
        for u in range(4):
            rec[c, dp.UNIT_ISSUE + u] = t + 2000 + u * step
            rec[c, dp.UNIT_FULL + u] = t + 7000 + u * 500
            rec[c, dp.UNIT_MATH + u] = t + 7000 + u * 500 + 250
    rec[0, dp.SLOT["fixup_sum"]] = base + 16500
    return rec


def test_summary_is_relative_to_the_earliest_entry():
    rec = synthetic()
    s = dp.summarize(rec)
    assert s["entry"] == (1.0, 2.0, 3)  # CTAs enter at 0, 1, 2 us
    assert s["init"] == (2.0, 3.0, 3)
    assert s["fixup_sum"] == (16.5, 16.5, 1)  # only the CTA that summed stamps it
    assert "smid" not in s and "count" not in s
    rel = dp.relative_us(rec)
    d = dp.phase_durations(rec)
    assert d[dp.PHASES[3][0]] == (1.0, 1.0)  # cons_gdc -> first_full
    assert d["whole CTA (entry -> warp 0 exit)"] == (17.0, 17.0)
    assert np.isnan(rel[:, dp.SLOT["smid"]]).all() and np.isnan(rel[1, dp.SLOT["fixup_sum"]])
    u = dp.unit_stream(rec, units=4)
    assert u["full"] == [8.0, 8.5, 9.0, 9.5] and u["math"] == [8.25, 8.75, 9.25, 9.75]
    assert u["full_interval"] == [0.5]
    assert not np.isnan(u["issue"][0]) and u["issue"][1] == pytest.approx(3.032)


def test_gaps_and_timer_step():
    a = synthetic(base=10**12)
    b = synthetic(base=10**12 + 30_000)
    g = dp.gaps_us([a, b], (10**12 - 4000, 10**12 + 60_000))
    assert g["mark->entry0"] == 4.0
    # call a's last exit: CTA 2 enters at +2 us, exit3 is its 21st stamp (+20 us) -> 22 us
    assert g["exit0->entry1"] == pytest.approx(8.0) and g["period0"] == 30.0
    assert g["exit1->mark"] == pytest.approx(60.0 - 52.0)
    assert dp.timer_step_ns([a, b]) == 32
    coarse = synthetic(step=1000)
    assert dp.timer_step_ns([coarse]) == 250  # math stamps sit 250 ns after the full ones


def test_missing_entry_is_named():
    with pytest.raises(ValueError, match="probe buffer"):
        dp.call_origin(np.zeros((2, dp.SLOTS), dtype=np.uint64))


def test_report_and_timeline(tmp_path):
    recs = [synthetic(), synthetic(base=10**12 + 30_000)]
    marks = (10**12 - 4000, 10**12 + 60_000)
    text = dp.report("8b-o M=1 graph", recs, marks)
    assert "3 CTAs, units per CTA 4..4, timer step 32 ns" in text and "call 1" in text and "gaps (us)" in text
    pytest.importorskip("matplotlib")
    dp.plot(tmp_path / "t.png", "t", recs, marks)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
