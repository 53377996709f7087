"""Files and folders written so that nothing half-written is left in place, and file hashes
(standard library only: ``benchmarks/offline_host/checkpoint_parts.py join`` uses it on a host
where nothing else is installed yet)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 20


def proc_status(field: str) -> str | None:
    """The value of ``field`` in /proc/self/status (Linux), e.g. "0022" for "Umask"; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def current_umask() -> int:
    """The process's file mode creation mask: from /proc on Linux, else by setting it and setting it
    straight back (which another thread could see for that instant)."""
    value = proc_status("Umask")
    if value is not None:
        return int(value, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path, umask: int) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have given
    under ``umask``: ``mkdtemp`` makes its folder 0700 and safetensors writes its files 0600, which
    would leave a checkpoint unreadable to other users (e.g. a server running as another user)."""
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        executable = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
        path.chmod((0o777 if executable else 0o666) & ~umask)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds,
    with the modes the process's umask gives (not the private ones of the temporary folder)."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp, current_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)
    return h.hexdigest()
