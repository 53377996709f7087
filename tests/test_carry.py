"""benchmarks/smollm2_carry.py: a checkpoint split into carry parts restores bit-exactly (bf16 where
converted), loads, and a missing or corrupt part is named; the SmolLM2 tolerance rule can fail."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import smollm2_carry as sc  # noqa: E402

from vllm_sparse24.checkpoint import load_scheme, validate_checkpoint  # noqa: E402

PREFIX = ".carry_t"


@pytest.fixture(scope="module")
def packed(tmp_path_factory, request):
    tiny = request.getfixturevalue("tiny")
    dest = tmp_path_factory.mktemp("carry")
    man = sc.pack(tiny.sparse24_dir, dest, PREFIX, max_part_bytes=150_000)
    return tiny, dest, man


def _copy_parts(man: dict, src: Path, dst: Path) -> Path:
    for p in man["parts"]:
        (dst / p["dir"]).mkdir(parents=True)
        for f in (p["file"], sc.MANIFEST):
            (dst / p["dir"] / f).write_bytes((src / p["dir"] / f).read_bytes())
    return dst


def test_round_trip(packed, tmp_path, capsys):
    tiny, dest, man = packed
    n = len(man["parts"])
    assert 2 <= n <= 9 and all(p["bytes"] <= 150_000 for p in man["parts"])
    assert sorted(x.name for x in dest.iterdir()) == [f"{PREFIX}{i + 1}" for i in range(n)]
    out = sc.unpack(tmp_path / "ckpt", dest, PREFIX)
    got, src = load_file(str(out / "model.safetensors")), load_file(str(tiny.sparse24_dir / "model.safetensors"))
    assert got.keys() == src.keys()
    for k, t in src.items():
        if t.dtype == torch.float32 and not k.endswith("weight_scale"):
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], t.to(torch.bfloat16)), k
        else:
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert any(t.dtype == torch.bfloat16 for t in got.values())
    for name, f in man["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == f["sha256"]
        if name != "model.safetensors":
            assert (out / name).read_bytes() == (tiny.sparse24_dir / name).read_bytes()
    validate_checkpoint(out, load_scheme(out))  # the plugin's header check accepts bf16 embeddings/norms
    capsys.readouterr()
    sc.unpack(out, dest, PREFIX)  # again: nothing to do
    assert "already unpacked" in capsys.readouterr().out


def test_stdin_and_stdlib_only(packed, tmp_path):
    _, dest, man = packed
    stream = b"".join((dest / p["dir"] / p["file"]).read_bytes() for p in man["parts"])
    # the unpack runs where only the standard library is guaranteed: block torch/safetensors imports
    code = ("import sys; sys.modules['torch'] = sys.modules['safetensors'] = None; "
            f"sys.argv = ['smollm2_carry.py', 'unpack', '--stdin', '--root', {str(dest)!r}, '--prefix', {PREFIX!r}, "
            f"'--out', {str(tmp_path / 'ckpt')!r}]; import runpy; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'smollm2_carry.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], input=stream, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert hashlib.sha256((tmp_path / "ckpt" / "model.safetensors").read_bytes()).hexdigest() == \
        man["files"]["model.safetensors"]["sha256"]


def test_corrupt_or_missing_part_is_named(packed, tmp_path, monkeypatch):
    _, dest, man = packed
    n = len(man["parts"])
    parts = _copy_parts(man, dest, tmp_path / "parts")
    p2 = parts / man["parts"][1]["dir"] / man["parts"][1]["file"]
    data = bytearray(p2.read_bytes())
    data[len(data) // 2] ^= 0x40
    p2.write_bytes(bytes(data))
    out = tmp_path / "ckpt"
    with pytest.raises(sc.CarryError, match=rf"part 2 of {n} \({PREFIX}2/part-2-of-{n}\) is corrupt"):
        sc.unpack(out, parts, PREFIX)
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))
    # the same stream on stdin: the stream check catches it (lzma's own check or the sha256)
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": io.BytesIO(b"".join(
        (parts / p["dir"] / p["file"]).read_bytes() for p in man["parts"]))})())
    with pytest.raises(sc.CarryError, match="run without --stdin to name the bad part"):
        sc.unpack(out, parts, PREFIX, stdin=True)
    assert not out.exists()
    # a missing part folder (not carried): named, and the CLI exits 1
    (parts / man["parts"][0]["dir"] / man["parts"][0]["file"]).unlink()
    with pytest.raises(sc.CarryError, match=rf"part 1 of {n} .* is missing: carry {PREFIX}1"):
        sc.unpack(out, parts, PREFIX)
    assert sc.main(["unpack", "--root", str(parts), "--prefix", PREFIX, "--out", str(out)]) == 1
    with pytest.raises(sc.CarryError, match="no .carry_none"):
        sc.unpack(out, parts, ".carry_none")


def test_tolerance_rule_can_fail():
    stats = {"bfloat16": {"mean_abs": 0.2, "p99_abs": 0.84, "ppl_rel": 0.0096, "se_mean_signed": 0.0032, "windows": 32}}
    tol = sc.tolerance_from(stats)["bfloat16"]
    ok = {"mean_abs": 0.21, "p99_abs": 0.9, "mean_signed": -0.01}
    assert sc.passes(ok, tol)[0]
    # what a layout bug in one layer of SmolLM2 did (reference "sensitivity" entries)
    assert not sc.passes({"mean_abs": 0.64, "p99_abs": 2.8, "mean_signed": -0.205}, tol)[0]
    assert sc.passes({"mean_abs": 0.2, "p99_abs": 0.8, "mean_signed": -0.05}, tol)[1] == \
        {"mean_abs": True, "p99_abs": True, "ppl_rel": False}
    assert sc.tolerance_for(tol, 8)["ppl_rel"] > tol["ppl_rel"] == sc.tolerance_for(tol, 32)["ppl_rel"]
