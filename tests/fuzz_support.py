"""Shared pieces of the fuzz tests: a raw safetensors writer whose header can be mutated, an
independent reference reader (spec + numpy, no safetensors/torch), the project's load path as
vLLM runs it, and the outcome counter that conftest prints at the end of the run."""

from __future__ import annotations

import _thread
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from safetensors import safe_open

from vllm_sparse24.checkpoint import CheckpointError, load_scheme, validate_checkpoint
from vllm_sparse24.format import Sparse24FormatError, pack_24, unpack_24
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme

PROJECT_ERRORS = (CheckpointError, Sparse24ConfigError, Sparse24FormatError)
# Examples per fuzz test are multiplied by this (the CI default 1 keeps the suite to about a minute).
FUZZ_SCALE = float(os.environ.get("SPARSE24_FUZZ_SCALE", "1"))
# A case still running after this many seconds is a hang (each case takes milliseconds).
HANG_S = 30.0

# suite -> Counter(outcome -> cases); printed by conftest.pytest_terminal_summary
OUTCOMES: dict[str, Counter] = {}


def record(suite: str, outcome: str) -> None:
    OUTCOMES.setdefault(suite, Counter())[outcome] += 1


def fuzz_settings(max_examples: int) -> settings:
    """Derandomized (the same cases every run), no example database, a deadline far above the
    milliseconds a case takes, and max_examples scaled by SPARSE24_FUZZ_SCALE."""
    return settings(
        max_examples=max(1, int(max_examples * FUZZ_SCALE)), derandomize=True, database=None,
        deadline=timedelta(seconds=10), print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class FuzzHang(Exception):
    """A fuzz case ran past HANG_S."""


@contextmanager
def hang_guard(seconds: float = HANG_S) -> Iterator[None]:
    """Interrupt the main thread if the block runs too long (Python's re, for one, checks for
    interrupts while it backtracks), and report it as FuzzHang instead of stalling the suite."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            raise FuzzHang(f"still running after {seconds:.0f} s") from None
        raise
    finally:
        timer.cancel()


# -- safetensors written byte by byte --------------------------------------------------------

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
    "U64": 8, "F64": 8, "C64": 8,
}
SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
TORCH_TO_ST = {
    torch.int8: "I8", torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.float32: "F32",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
}


@dataclass(eq=False)
class Entry:
    """One header entry; ``data`` is None for an entry that owns no bytes (a duplicate name)."""

    name: str
    dtype: str
    shape: list
    data: bytes | None
    in_header: bool = True
    # where the offsets come from: None = its own bytes, an Entry = that entry's, a list = as given
    offsets_from: Any = None

    def __repr__(self) -> str:  # hypothesis prints failing cases: bytes as a length
        size = "no bytes" if self.data is None else f"{len(self.data)} bytes"
        src = self.offsets_from.name if isinstance(self.offsets_from, Entry) else self.offsets_from
        hidden = "" if self.in_header else ", not in header"
        return f"Entry({self.name!r}, {self.dtype!r}, {self.shape}, {size}, offsets_from={src!r}{hidden})"


@dataclass
class StFile:
    name: str
    entries: list[Entry]
    metadata: Any = field(default_factory=lambda: {"format": "pt"})
    # byte-level edits after serialization: (op, arg) with op in truncate/append/header_len/flip
    byte_ops: list[tuple[str, Any]] = field(default_factory=list)

    def serialize(self) -> bytes:
        pos, own = 0, {}
        for e in self.entries:
            if e.data is not None:
                own[id(e)] = [pos, pos + len(e.data)]
                pos += len(e.data)
        items = []
        if self.metadata is not None:
            items.append(json.dumps("__metadata__") + ":" + json.dumps(self.metadata))
        for e in self.entries:
            if not e.in_header:
                continue
            if isinstance(e.offsets_from, Entry):
                offsets = own.get(id(e.offsets_from), [0, 0])
            elif isinstance(e.offsets_from, list):
                offsets = e.offsets_from
            else:
                offsets = own.get(id(e), [0, 0])
            info = {"dtype": e.dtype, "shape": e.shape, "data_offsets": offsets}
            items.append(json.dumps(e.name) + ":" + json.dumps(info))
        header = ("{" + ",".join(items) + "}").encode()
        header += b" " * (-len(header) % 8)  # safetensors pads to 8 bytes with spaces
        blob = bytearray(len(header).to_bytes(8, "little") + header)
        for e in self.entries:
            if e.data is not None:
                blob += e.data
        for op, arg in self.byte_ops:
            if op == "truncate":
                del blob[arg % max(len(blob), 1):]
            elif op == "append":
                blob += arg
            elif op == "header_len":
                blob[:8] = (arg % 2**64).to_bytes(8, "little")
            elif op == "flip":
                i = 8 + arg[0] % max(len(header), 1)
                if i < len(blob):
                    blob[i] ^= arg[1]
        return bytes(blob)


def tensor_entry(name: str, t: torch.Tensor) -> Entry:
    t = t.contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Entry(name, TORCH_TO_ST[t.dtype], list(t.shape), raw)


# -- a small synthetic checkpoint -------------------------------------------------------------


@dataclass
class Layer:
    prefix: str
    kind: str  # sparse | dense
    n: int
    k: int


@dataclass
class Spec:
    """What a fuzzed checkpoint was built from (before any mutation)."""

    legacy: bool
    layers: list[Layer]
    files: list[StFile]
    config: dict

    @property
    def packed_key(self) -> str:
        return "compressed" if self.legacy else "weight_packed"

    @property
    def mask_key(self) -> str:
        return "bitmask" if self.legacy else "weight_bitmask"


def random_24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return torch.where(mask, w, torch.zeros_like(w))


def native_config(dense: list[str]) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "quantization_config": Sparse24Scheme(dense_layers=tuple(dense)).to_dict()}


def legacy_config(dense: list[str]) -> dict:
    from tiny_llama import legacy_quantization_config

    q = legacy_quantization_config()
    q["sparsity_config"]["ignore"] = ["lm_head", *dense]
    return {"architectures": ["LlamaForCausalLM"], "quantization_config": q}


def build_spec(layers: list[Layer], legacy: bool, seed: int, scale_dtype: torch.dtype = torch.float32) -> Spec:
    gen = torch.Generator().manual_seed(seed)
    entries: list[Entry] = []
    hidden = layers[0].k
    entries.append(tensor_entry("model.norm.weight", torch.rand(hidden, generator=gen)))
    entries.append(tensor_entry("lm_head.weight", torch.randn(8, hidden, generator=gen)))
    for layer in layers:
        w = random_24(layer.n, layer.k, gen)
        scale = (torch.rand(layer.n, 1, generator=gen) * 0.01 + 1e-4).to(scale_dtype)
        if layer.kind == "sparse":
            values, bitmask = pack_24(w, name=layer.prefix)
            entries.append(tensor_entry(f"{layer.prefix}.{'compressed' if legacy else 'weight_packed'}", values))
            entries.append(tensor_entry(f"{layer.prefix}.{'bitmask' if legacy else 'weight_bitmask'}", bitmask))
            if legacy:
                entries.append(tensor_entry(f"{layer.prefix}.shape", torch.tensor([layer.n, layer.k])))
        else:
            entries.append(tensor_entry(f"{layer.prefix}.weight", w))
        entries.append(tensor_entry(f"{layer.prefix}.weight_scale", scale))
    dense = [la.prefix for la in layers if la.kind == "dense"]
    config = legacy_config(dense) if legacy else native_config(dense)
    return Spec(legacy, layers, [StFile("model.safetensors", entries)], config)


def write_folder(folder: Path, files: list[StFile], config_bytes: bytes | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).write_bytes(f.serialize())
    if config_bytes is not None:
        (folder / "config.json").write_bytes(config_bytes)


# -- the project's load path ------------------------------------------------------------------


def load_like_vllm(folder: Path) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """prefix -> (kind, dense int8 weight [N, K], weight_scale), read the way the plugin does
    inside vLLM: the config and header checks (Sparse24Config.maybe_update_config), every
    tensor of every file (vLLM's safetensors iterator), then the 2:4 unpack of each sparse
    layer (Sparse24LinearMethod.process_weights_after_loading)."""
    scheme = load_scheme(folder)
    kinds = validate_checkpoint(folder, scheme)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    packed, mask = ("compressed", "bitmask") if scheme.legacy else ("weight_packed", "weight_bitmask")
    out = {}
    for prefix, kind in kinds.items():
        if kind == "sparse":
            w = unpack_24(tensors[f"{prefix}.{packed}"], tensors[f"{prefix}.{mask}"], name=prefix)
        else:
            w = tensors[f"{prefix}.weight"]
        out[prefix] = (kind, w, tensors[f"{prefix}.weight_scale"])
    return out


def run_case(fn: Callable[[], Any]) -> tuple[str, Any]:
    """(outcome, value or exception): the outcome is 'ok', a project error class name, or
    'FOREIGN <type>' / 'HANG' (both test failures)."""
    try:
        with hang_guard():
            return "ok", fn()
    except PROJECT_ERRORS as e:
        return type(e).__name__, e
    except FuzzHang as e:
        return "HANG", e
    except Exception as e:  # noqa: BLE001  (what the fuzz tests look for)
        return f"FOREIGN {type(e).__module__}.{type(e).__name__}", e


# -- the reference reader ----------------------------------------------------------------------


class RefInvalid(Exception):
    """The reference reader refuses the file (safetensors spec or sparse24 rules)."""


NP_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise RefInvalid(f"duplicate keys {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


def _u64_list(xs: Any) -> bool:
    return isinstance(xs, list) and all(type(x) is int and 0 <= x < 2**64 for x in xs)


def ref_parse(blob: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), following the safetensors format description: an
    8-byte little-endian header size, a UTF-8 JSON object header starting with '{', tensors
    whose byte ranges match dtype x shape and tile the data buffer with no gap or overlap."""
    if len(blob) < 8:
        raise RefInvalid("shorter than the 8-byte header size")
    n = int.from_bytes(blob[:8], "little")
    if n > 100 << 20 or 8 + n > len(blob):
        raise RefInvalid("header size past the end of the file")
    try:
        text = blob[8 : 8 + n].decode("utf-8")
        if not text.startswith("{"):
            raise RefInvalid("header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates,
                            parse_constant=lambda c: (_ for _ in ()).throw(RefInvalid(c)))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RefInvalid(f"header: {e}") from e
    if not isinstance(header, dict):
        raise RefInvalid("header is not an object")
    data = blob[8 + n :]
    spans = []
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise RefInvalid("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise RefInvalid(f"{name}: incomplete entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        bits = 8 * ITEMSIZE[dtype] if dtype in ITEMSIZE else SUB_BYTE_BITS.get(dtype)
        if bits is None:
            raise RefInvalid(f"{name}: unknown dtype {dtype!r}")
        if not _u64_list(shape) or not _u64_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise RefInvalid(f"{name}: bad shape or offsets")
        nbits = int(np.prod(shape, dtype=object)) * bits
        if nbits % 8 or nbits // 8 != offsets[1] - offsets[0]:
            raise RefInvalid(f"{name}: offsets do not match dtype and shape")
        spans.append((offsets[0], offsets[1]))
        out[name] = (dtype, list(shape), data[offsets[0] : offsets[1]])
    end = 0
    for b, e in sorted(spans):
        if b != end:
            raise RefInvalid("data buffer has a gap or an overlap")
        end = e
    if end != len(data):
        raise RefInvalid("data buffer not fully covered")
    return out


def ref_array(entry: tuple[str, list[int], bytes]) -> np.ndarray:
    dtype, shape, raw = entry
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in NP_DTYPES:
        raise RefInvalid(f"dtype {dtype} is not read by the reference")
    return np.frombuffer(raw, dtype=NP_DTYPES[dtype]).reshape(shape)


def ref_decode_24(values: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Dense int8 [N, K] from values [N, K/2] and a little-bit-order bitmask [N, K/8], or
    RefInvalid if a group of 4 does not keep exactly 2 (numpy only, independent of format.py)."""
    n, k = bitmask.shape[0], bitmask.shape[1] * 8
    if values.dtype != np.int8 or bitmask.dtype != np.uint8 or values.shape != (n, k // 2) or k % 64:
        raise RefInvalid("values / bitmask dtype or shape")
    bits = np.unpackbits(bitmask, axis=1, bitorder="little").astype(bool)
    per_group = bits.reshape(n, k // 4, 4).sum(-1)
    if (per_group != 2).any():
        r, g = np.argwhere(per_group != 2)[0]
        raise RefInvalid(f"row {r} group {g} keeps {per_group[r, g]}")
    dense = np.zeros((n, k), dtype=np.int8)
    for r in range(n):
        dense[r, bits[r]] = values[r]
    return dense


def ref_tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, entry in ref_parse(f.read_bytes()).items():
            if name in tensors:
                raise RefInvalid(f"{name} in two files")
            tensors[name] = entry
    return tensors


def ref_load(folder: Path, spec: Spec, only: set[str] | None = None) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """The spec's layers (those in ``only``, if given) as the reference reads them from the
    (mutated) files."""
    layers = {la.prefix: la.kind for la in spec.layers if only is None or la.prefix in only}
    return ref_load_layers(folder, layers, spec.legacy)


def ref_load_layers(folder: Path, layers: dict[str, str], legacy: bool) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """prefix -> (kind, dense int8 weight, float32 scale) for the given layers, read by the reference."""
    tensors = ref_tensors(folder)
    packed_key, mask_key = ("compressed", "bitmask") if legacy else ("weight_packed", "weight_bitmask")
    out = {}
    for p, kind in layers.items():
        try:
            if kind == "sparse":
                w = ref_decode_24(ref_array(tensors[f"{p}.{packed_key}"]), ref_array(tensors[f"{p}.{mask_key}"]))
            else:
                w = ref_array(tensors[f"{p}.weight"])
                if w.dtype != np.int8 or w.ndim != 2:
                    raise RefInvalid(f"{p}.weight is not int8 2-D")
            scale = ref_array(tensors[f"{p}.weight_scale"])
        except KeyError as e:
            raise RefInvalid(f"missing {e}") from e
        if scale.shape != (w.shape[0], 1) or scale.dtype.kind != "f":
            raise RefInvalid(f"{p}.weight_scale shape {scale.shape}")
        out[p] = (kind, w, scale.astype(np.float32))
    return out


def same_load(got: dict[str, tuple[str, torch.Tensor, torch.Tensor]],
              ref: dict[str, tuple[str, np.ndarray, np.ndarray]]) -> str | None:
    """None when the project's load equals the reference's, else what differs."""
    if set(got) != set(ref):
        return f"layers {sorted(got)} != reference {sorted(ref)}"
    for p, (kind, w, scale) in got.items():
        rkind, rw, rscale = ref[p]
        if kind != rkind:
            return f"{p}: kind {kind} != reference {rkind}"
        if w.dtype != torch.int8 or not np.array_equal(w.numpy(), rw):
            return f"{p}: weight differs from the reference"
        if not np.array_equal(scale.float().numpy(), rscale, equal_nan=True):
            return f"{p}: weight_scale differs from the reference"
    return None


def names_something(message: str, names: list[str]) -> bool:
    return any(n and n in message for n in names)
