"""benchmarks/offline_host/checkpoint_parts.py: a checkpoint split into parts joins back
bit-exactly (bf16 where asked), loads, and a missing or corrupt part is named."""

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
TOOL = ROOT / "benchmarks" / "offline_host" / "checkpoint_parts.py"
sys.path.insert(0, str(TOOL.parent))
import checkpoint_parts as cp  # noqa: E402

from vllm_sparse24.checkpoint import load_scheme, validate_checkpoint  # noqa: E402

PREFIX = ".parts_t"


@pytest.fixture(scope="module")
def split_bf16(tmp_path_factory, request):
    tiny = request.getfixturevalue("tiny")
    dest = tmp_path_factory.mktemp("parts")
    man = cp.split(tiny.sparse24_dir, dest, PREFIX, max_part_bytes=150_000, bf16=True)
    return tiny, dest, man


def _copy_parts(man: dict, src: Path, dst: Path) -> Path:
    for p in man["parts"]:
        (dst / p["dir"]).mkdir(parents=True)
        for f in (p["file"], cp.MANIFEST):
            (dst / p["dir"] / f).write_bytes((src / p["dir"] / f).read_bytes())
    return dst


def test_round_trip_with_bf16_floats(split_bf16, tmp_path, capsys):
    tiny, dest, man = split_bf16
    n = len(man["parts"])
    assert n >= 2 and all(p["bytes"] <= 150_000 for p in man["parts"])
    assert sorted(x.name for x in dest.iterdir()) == [p["dir"] for p in man["parts"]]
    out = cp.join(tmp_path / "ckpt", dest, PREFIX)
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
    cp.join(out, dest, PREFIX)  # again: nothing to do
    assert "already joined" in capsys.readouterr().out


def test_byte_exact_by_default_and_many_parts_in_glob_order(tiny, tmp_path):
    man = cp.split(tiny.sparse24_dir, tmp_path / "parts", PREFIX, max_part_bytes=20_000)
    n = len(man["parts"])
    assert n >= 10  # two-digit part numbers: zero-padded so that a shell glob lists them in order
    assert [p["dir"] for p in man["parts"]] == sorted(p["dir"] for p in man["parts"])
    out = cp.join(tmp_path / "ckpt", tmp_path / "parts", PREFIX)
    for f in tiny.sparse24_dir.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_stdin_and_stdlib_only(split_bf16, tmp_path):
    _, dest, man = split_bf16
    stream = b"".join((dest / p["dir"] / p["file"]).read_bytes() for p in man["parts"])
    # the join runs where only the standard library is guaranteed: block torch/safetensors imports
    code = ("import sys; sys.modules['torch'] = sys.modules['safetensors'] = None; "
            f"sys.argv = ['checkpoint_parts.py', 'join', '--stdin', '--root', {str(dest)!r}, '--prefix', {PREFIX!r}, "
            f"'--out', {str(tmp_path / 'ckpt')!r}]; import runpy; "
            f"runpy.run_path({str(TOOL)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], input=stream, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert hashlib.sha256((tmp_path / "ckpt" / "model.safetensors").read_bytes()).hexdigest() == \
        man["files"]["model.safetensors"]["sha256"]


def test_corrupt_or_missing_part_is_named(split_bf16, tmp_path, monkeypatch):
    _, dest, man = split_bf16
    n = len(man["parts"])
    parts = _copy_parts(man, dest, tmp_path / "parts")
    second = man["parts"][1]
    p2 = parts / second["dir"] / second["file"]
    data = bytearray(p2.read_bytes())
    data[len(data) // 2] ^= 0x40
    p2.write_bytes(bytes(data))
    out = tmp_path / "ckpt"
    with pytest.raises(cp.PartsError, match=rf"part 2 of {n} \({second['dir']}/{second['file']}\) is corrupt"):
        cp.join(out, parts, PREFIX)
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))
    # the same stream on stdin: the stream check catches it (lzma's own check or the sha256)
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": io.BytesIO(b"".join(
        (parts / p["dir"] / p["file"]).read_bytes() for p in man["parts"]))})())
    with pytest.raises(cp.PartsError, match="run without --stdin to name the bad part"):
        cp.join(out, parts, PREFIX, stdin=True)
    assert not out.exists()
    # a missing part: named, and the CLI exits 1
    first = man["parts"][0]
    (parts / first["dir"] / first["file"]).unlink()
    with pytest.raises(cp.PartsError, match=rf"part 1 of {n} .* is missing: copy {first['dir']}"):
        cp.join(out, parts, PREFIX)
    assert cp.main(["join", "--root", str(parts), "--prefix", PREFIX, "--out", str(out)]) == 1
    with pytest.raises(cp.PartsError, match="no .parts_none"):
        cp.join(out, parts, ".parts_none")
