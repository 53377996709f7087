"""Split a checkpoint folder into sha256-checked parts of bounded size, and join them back on
another host (for copying a checkpoint to an offline GPU host through a channel that limits the
size of one transfer).

    # where the checkpoint is: part folders DEST/.checkpoint-part1, -part2, ... (each <= --max-part-bytes)
    python benchmarks/offline_host/checkpoint_parts.py split CHECKPOINT --dest DEST [--float32-to-bf16]
    # on the other host (standard library only): check every part, restore the folder
    python3 benchmarks/offline_host/checkpoint_parts.py join --root DEST --out models/my-sparse24
    cat DEST/.checkpoint-part*/part-* | python3 benchmarks/offline_host/checkpoint_parts.py join --stdin --out ...

split writes the folder as one deterministic tar.xz stream (sorted names, mtime 0) cut into equal
parts; ``manifest.json`` (copied into every part folder) holds the sha256 and size of the stream,
of every part and of every file. ``--float32-to-bf16`` stores every float32 tensor that is not a
``weight_scale`` (embeddings, norms) as bfloat16, which roughly halves an unquantized embedding:
the plugin loads such a checkpoint as it is (only the quantized linears' tensors have fixed
dtypes), and a bfloat16 engine rounds these tensors to bfloat16 anyway.

join never imports torch: it checks every part's size and sha256 against the manifest (naming a
missing or corrupt part), extracts the stream into a temporary folder beside ``--out``, checks the
stream's and every file's sha256, and only then renames it into place. Joining again with the
same parts does nothing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_sparse24.fsutil import atomic_output_dir, sha256_file  # noqa: E402  (standard library only)

FORMAT = "vllm-sparse24-checkpoint-parts/1"
MANIFEST = "manifest.json"
MARKER = "parts-manifest.json"  # written into the joined folder: which stream it came from
PREFIX = ".checkpoint-part"
MAX_PART_BYTES = 55_000_000
CHUNK = 1 << 20


class PartsError(RuntimeError):
    """A part is missing or corrupt, or the parts do not belong together."""


def _files_of(folder: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


# -- split (needs torch + safetensors only with --float32-to-bf16) ---------------------------------


def _convert_safetensors(src: Path, dst: Path) -> dict[str, int]:
    """Copy one safetensors file, float32 tensors other than weight_scale as bfloat16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, n_conv = {}, 0
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dtype == torch.float32 and not k.endswith("weight_scale"):
                t = t.to(torch.bfloat16)
                n_conv += 1
            out[k] = t.contiguous()
    save_file(out, str(dst), metadata=meta)
    return {"tensors": len(out), "to_bfloat16": n_conv}


def _nbytes(sl) -> int:
    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8}[sl.get_dtype()]
    n = 1
    for s in sl.get_shape():
        n *= s
    return n * size


def stage_checkpoint(src: Path, stage: Path, bf16: bool) -> dict:
    """The copy of ``src`` that is split, in ``stage``; returns what was converted."""
    conv = {}
    for p in sorted(src.iterdir()):
        if not p.is_file():
            continue
        if bf16 and p.suffix == ".safetensors":
            conv[p.name] = _convert_safetensors(p, stage / p.name)
        else:
            shutil.copy2(p, stage / p.name)
    idx = stage / "model.safetensors.index.json"
    if bf16 and idx.exists():  # keep total_size honest (vLLM does not read it)
        from safetensors import safe_open

        d = json.loads(idx.read_text())
        total = 0
        for f in sorted(stage.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                total += sum(_nbytes(fh.get_slice(k)) for k in fh.keys())
        d.setdefault("metadata", {})["total_size"] = total
        idx.write_text(json.dumps(d, indent=2))
    return conv


def _tar_xz(folder: Path, preset: int) -> bytes:
    buf = io.BytesIO()
    with lzma.open(buf, "wb", format=lzma.FORMAT_XZ, preset=preset) as xz:
        with tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for p in sorted(folder.iterdir()):
                info = tarfile.TarInfo(p.name)
                info.size, info.mtime, info.mode = p.stat().st_size, 0, 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    return buf.getvalue()


def split(src: str | os.PathLike, dest: str | os.PathLike = ".", prefix: str = PREFIX,
          max_part_bytes: int = MAX_PART_BYTES, bf16: bool = False, preset: int = 6) -> dict:
    """Write ``dest/<prefix>1 ...`` part folders for checkpoint folder ``src``; returns the manifest.
    Part numbers are zero-padded to one width, so a shell glob lists them in order."""
    src, dest = Path(src), Path(dest)
    if not (src / "config.json").exists():
        raise PartsError(f"{src}: no config.json (not a checkpoint folder)")
    if max_part_bytes <= 0:
        raise PartsError(f"--max-part-bytes must be positive, got {max_part_bytes}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="s24parts-") as tmp:
        stage = Path(tmp)
        conv = stage_checkpoint(src, stage, bf16=bf16)
        files = _files_of(stage)
        stream = _tar_xz(stage, preset)
    n = -(-len(stream) // max_part_bytes)
    step = -(-len(stream) // n)
    chunks = [stream[i * step:(i + 1) * step] for i in range(n)]
    width = len(str(n))
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(src.resolve()), "source_files": _files_of(src),
        "float32_to_bfloat16": conv if bf16 else {},
        "stream": {"compression": f"tar.xz (lzma preset {preset})", "bytes": len(stream),
                   "sha256": hashlib.sha256(stream).hexdigest()},
        "parts": [{"dir": f"{prefix}{i + 1:0{width}d}", "file": f"part-{i + 1:0{width}d}-of-{n}", "bytes": len(c),
                   "sha256": hashlib.sha256(c).hexdigest()} for i, c in enumerate(chunks)],
        "files": files,
    }
    for old in glob.glob(str(dest / f"{glob.escape(prefix)}[0-9]*")):
        shutil.rmtree(old)
    for part, c in zip(manifest["parts"], chunks, strict=True):
        d = dest / part["dir"]
        d.mkdir(parents=True)
        (d / part["file"]).write_bytes(c)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"split {src} -> {n} parts {[p['bytes'] for p in manifest['parts']]} bytes "
          f"(stream {len(stream)}, files {sum(f['bytes'] for f in files.values())}) in {time.time() - t0:.0f}s",
          flush=True)
    return manifest


# -- join (standard library only) -------------------------------------------------------------------


def find_manifest(root: Path, prefix: str) -> dict:
    dirs = sorted(glob.glob(str(root / f"{glob.escape(prefix)}[0-9]*")))
    mans = {}
    for d in dirs:
        p = Path(d) / MANIFEST
        if p.exists():
            try:
                mans[d] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise PartsError(f"{p}: not valid JSON ({e}); copy that part folder again") from e
    if not mans:
        raise PartsError(f"no {prefix}N/{MANIFEST} under {root.resolve()} (found folders: {dirs or 'none'}); "
                         f"copy the part folders that `checkpoint_parts.py split` made")
    shas = {m["stream"]["sha256"] for m in mans.values()}
    if len(shas) > 1:
        raise PartsError(f"part folders from different splits: {sorted(mans)} have stream sha256 {sorted(shas)}; "
                         f"keep one split's parts only")
    man = next(iter(mans.values()))
    if man.get("format") != FORMAT:
        raise PartsError(f"manifest format {man.get('format')!r}, expected {FORMAT!r}")
    return man


def check_parts(root: Path, man: dict) -> list[Path]:
    """Paths of the parts in order; raises naming every missing or corrupt part."""
    bad, paths = [], []
    n = len(man["parts"])
    for i, part in enumerate(man["parts"]):
        p = root / part["dir"] / part["file"]
        paths.append(p)
        what = f"part {i + 1} of {n} ({part['dir']}/{part['file']})"
        if not p.exists():
            bad.append(f"{what} is missing: copy {part['dir']} to {root.resolve()}")
        elif p.stat().st_size != part["bytes"]:
            bad.append(f"{what} is corrupt: {p.stat().st_size} bytes, expected {part['bytes']}")
        elif sha256_file(p) != part["sha256"]:
            bad.append(f"{what} is corrupt: sha256 differs from the manifest")
    if bad:
        raise PartsError("; ".join(bad))
    return paths


class _Hashing(io.RawIOBase):
    """Reads from a sequence of binary files (or one stream), hashing and counting what passes."""

    def __init__(self, sources):
        self.sources, self.cur = list(sources), None
        self.h, self.n = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            if self.cur is None:
                if not self.sources:
                    return 0
                s = self.sources.pop(0)
                self.cur = open(s, "rb") if isinstance(s, (str, Path)) else s  # noqa: SIM115
            data = self.cur.read(len(b))
            if data:
                b[: len(data)] = data
                self.h.update(data)
                self.n += len(data)
                return len(data)
            self.cur.close()
            self.cur = None

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def join(out: str | os.PathLike, root: str | os.PathLike = ".", prefix: str = PREFIX,
         stdin: bool = False) -> Path:
    """Restore the checkpoint folder ``out`` from the parts under ``root`` (or the concatenated
    stream on stdin); returns ``out``. Raises PartsError naming what is wrong."""
    root, out = Path(root), Path(out).resolve()
    man = find_manifest(root, prefix)
    sha = man["stream"]["sha256"]
    marker = out / MARKER
    if marker.exists():
        try:
            done = json.loads(marker.read_text())["stream"]["sha256"] == sha
        except (json.JSONDecodeError, KeyError):
            done = False
        if done and _files_of(out) == man["files"]:
            print(f"{out}: already joined from stream {sha[:12]}", flush=True)
            return out
    elif out.exists():
        raise PartsError(f"{out} exists and was not made by join (no {MARKER}); remove it or pick another --out")
    src = _Hashing([sys.stdin.buffer] if stdin else check_parts(root, man))
    with atomic_output_dir(out, overwrite=True) as tmp:  # an older join (marker checked above) is replaced
        try:
            with tarfile.open(fileobj=io.BufferedReader(src, CHUNK), mode="r|xz") as tar:
                for m in tar:
                    if not m.isfile() or "/" in m.name or m.name in ("", ".", "..", MARKER):
                        raise PartsError(f"unexpected member {m.name!r} in the stream")
                    tar.extract(m, tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            src.drain()
        except (lzma.LZMAError, tarfile.TarError, EOFError) as e:
            hint = (" (stdin: run without --stdin to name the bad part)" if stdin else "")
            raise PartsError(f"the stream does not decompress ({type(e).__name__}: {e}); a part is truncated, "
                             f"corrupt or out of order{hint}") from e
        if src.n != man["stream"]["bytes"] or src.h.hexdigest() != sha:
            hint = " (run without --stdin to name the bad part)" if stdin else ""
            raise PartsError(f"stream is {src.n} bytes with sha256 {src.h.hexdigest()[:12]}, manifest says "
                             f"{man['stream']['bytes']} bytes, {sha[:12]}: parts missing, corrupt or out of order{hint}")
        got = _files_of(tmp)
        if got != man["files"]:
            diff = sorted(set(got) ^ set(man["files"]) | {k for k in got if got[k] != man["files"].get(k)})
            raise PartsError(f"joined files differ from the manifest: {diff}")
        (tmp / MARKER).write_text(json.dumps(man, indent=1))
    print(f"joined {len(man['files'])} files ({sum(f['bytes'] for f in man['files'].values())} bytes) "
          f"-> {out}, stream sha256 {sha[:12]} verified", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="checkpoint folder -> part folders")
    s.add_argument("checkpoint", help="checkpoint folder to split")
    s.add_argument("--dest", default=".", help="where the part folders go (default: the current folder)")
    s.add_argument("--prefix", default=PREFIX, help=f"part folder name prefix (default {PREFIX})")
    s.add_argument("--max-part-bytes", type=int, default=MAX_PART_BYTES,
                   help=f"largest part file in bytes (default {MAX_PART_BYTES})")
    s.add_argument("--float32-to-bf16", action="store_true",
                   help="store float32 tensors other than weight_scale as bfloat16 (smaller)")
    s.add_argument("--preset", type=int, default=6, help="lzma preset 0-9 (default 6)")
    j = sub.add_parser("join", help="part folders -> checkpoint folder (standard library only)")
    j.add_argument("--out", required=True, help="checkpoint folder to restore")
    j.add_argument("--root", default=".", help="folder holding the part folders (default: the current folder)")
    j.add_argument("--prefix", default=PREFIX, help=f"part folder name prefix (default {PREFIX})")
    j.add_argument("--stdin", action="store_true", help="read the concatenated part files from stdin")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            split(args.checkpoint, args.dest, args.prefix, args.max_part_bytes, args.float32_to_bf16, args.preset)
        else:
            join(args.out, args.root, args.prefix, args.stdin)
    except PartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
