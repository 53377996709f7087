"""Checking a checkpoint folder against its scheme from the safetensors headers alone, so a wrong
name, dtype or shape is reported with the file and tensor before anything is allocated (the plugin
does it before vLLM loads a weight; the reader and the writer do it too)."""

from __future__ import annotations

import json
import os
from math import prod
from pathlib import Path

import torch
from safetensors import safe_open

from ..quant import GRIDS, GROUP_SIZE, group_count
from ..schema import K_MULTIPLE, LM_HEAD, Sparse24Scheme
from .names import DENSE_SUFFIXES, SCALE, SCALE_DTYPES, WEIGHT, CheckpointError, sparse_names

INDEX_NAME = "model.safetensors.index.json"
# the float dtypes (of scales, and of the weights the plugin quantizes at load)
FLOAT_DTYPES = SCALE_DTYPES


def _read_index(folder: Path) -> dict[str, str] | None:
    """The index's tensor name -> shard file name, or None without an index."""
    path = folder / INDEX_NAME
    if not path.exists():
        return None
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a safetensors index with a 'weight_map' ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to file names")
    return weight_map


def _shard_files(folder: Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The shards the index names (each must exist), or every *.safetensors file without one."""
    if weight_map is None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files (sparse24 checkpoints never use pickle)")
        return files
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(fname, []).append(key)
    for fname, keys in sorted(by_file.items()):
        if not (folder / fname).is_file():
            raise CheckpointError(
                f"{folder / INDEX_NAME}: shard {fname} is missing from the folder ({len(keys)} tensors, "
                f"e.g. {sorted(keys)[0]!r}); download it again"
            )
    return [folder / fname for fname in sorted(by_file)]


def read_headers(folder: str | os.PathLike) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """tensor name -> (file name, dtype, shape) over the shards that model.safetensors.index.json
    lists (each must exist and hold the tensors the index puts in it), or every *.safetensors file
    in folder without an index.

    Refuses what safetensors would read ambiguously or vLLM could not load: a name given twice
    in one header or in two files (one copy would silently win), a dtype torch cannot load.
    """
    folder = Path(folder)
    weight_map = _read_index(folder)
    files = _shard_files(folder, weight_map)
    out: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                entries = [(key, fh.get_slice(key)) for key in fh.keys()]
                entries = [(key, sl.get_dtype(), tuple(sl.get_shape())) for key, sl in entries]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: cannot read safetensors header ({e}); the file is corrupt or truncated") from e
        _check_unique_names(f)
        for key, dtype_name, shape in entries:
            if key in out:
                raise CheckpointError(
                    f"{f.name}: tensor {key!r} is also in {out[key][0]}; each tensor must be in one file only"
                )
            if dtype_name not in _DTYPES:
                raise CheckpointError(
                    f"{f.name}: tensor {key!r} has dtype {dtype_name}, which torch cannot load "
                    f"(loadable: {', '.join(sorted(_DTYPES))})"
                )
            out[key] = (f.name, _DTYPES[dtype_name], shape)
    for key, fname in (weight_map or {}).items():
        if out.get(key, (fname,))[0] != fname or key not in out:
            where = f"it is in {out[key][0]}" if key in out else "no shard holds it"
            raise CheckpointError(f"{folder / INDEX_NAME}: puts tensor {key!r} in {fname}, but {where}")
    return out


def _check_unique_names(path: Path) -> None:
    # JSON parsers, safetensors' included, keep the last of a repeated key without a word;
    # called after safe_open accepted the header, so its size and JSON are sound
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
    try:
        pairs = json.loads(raw, object_pairs_hook=lambda kv: kv)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from e
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise CheckpointError(f"{path.name}: tensor {key!r} appears twice in the safetensors header")
        seen.add(key)


# safetensors dtype names torch loads (sub-byte F4/F6 are left out: no sparse24 checkpoint
# holds them, and torch cannot load every shape of them)
_DTYPES = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
        "U16": getattr(torch, "uint16", None), "I32": torch.int32, "U32": getattr(torch, "uint32", None),
        "I64": torch.int64, "U64": getattr(torch, "uint64", None), "F16": torch.float16,
        "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}


def _files_of(headers, prefix: str) -> str:
    """'; the other tensors of PREFIX are in FILES' (or '' when it has none)."""
    files = sorted({f for key, (f, _, _) in headers.items() if key.rpartition(".")[0] == prefix})
    return f"; the other tensors of {prefix} are in {', '.join(files)}" if files else ""


def _expect(headers, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None) -> None:
    if name not in headers:
        where = _files_of(headers, name.rpartition(".")[0])
        raise CheckpointError(f"missing tensor {name!r} (expected dtype {dtypes[0]}, shape {shape}){where}")
    fname, dtype, got = headers[name]
    if dtype not in dtypes:
        raise CheckpointError(f"{fname}: tensor {name!r} has dtype {dtype}, expected {' or '.join(map(str, dtypes))}")
    if shape is not None and got != shape:
        raise CheckpointError(f"{fname}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def expected_linear_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Linear layer name suffix -> its [N, K] by config.json, for the Llama-family layers (q/k/v/o,
    gate/up/down); {} when config.json does not say (another architecture)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        hidden, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, RecursionError):
        return {}
    if not all(isinstance(v, int) for v in (hidden, inter, heads, kv_heads, head_dim)):
        return {}
    return {
        "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }


def _expected_nk(shapes: dict[str, tuple[int, int]], prefix: str) -> tuple[int, int] | None:
    parts = prefix.split(".")
    return shapes.get(".".join(parts[-2:])) if len(parts) >= 2 else None


def validate_checkpoint(folder: str | os.PathLike, scheme: Sparse24Scheme) -> dict[str, str]:
    """Check every quantized or 2:4 linear's tensors by name, dtype and shape (against
    config.json for Llama-family layers); returns prefix -> kind.

    Layers are found from the tensor names; each must be of the kind the scheme assigns.
    """
    headers = read_headers(folder)
    shapes = expected_linear_shapes(folder)
    bitmask_layout = scheme.layout == "bitmask"
    names = sparse_names(bitmask_layout, scheme.int4)
    packed_key, mask_key = names.packed, names.bitmask
    # kept values per stored element of packed_key: w4a8 packs two int4 values into a byte
    per_element = 2 if scheme.int4 else 1
    code_dtype = scheme.grid.dtype
    code_dtypes = {g.dtype: name for name, g in GRIDS.items()}
    # the dtype of the stored weights: the scheme's codes, or float when quantized at load
    value_dtypes = (code_dtype,) if scheme.quantized else FLOAT_DTYPES
    _check_one_scheme(headers, scheme, packed_key)

    def expect_scale(prefix: str, n: int) -> None:
        name = f"{prefix}.{SCALE}"
        if not scheme.quantized:
            if name in headers:
                raise CheckpointError(
                    f"{headers[name][0]}: {name!r}: the quantization_config says the weights are not "
                    "quantized, but the layer has a scale"
                )
            return
        tensor_wise = scheme.weight_strategy == "tensor"
        _expect(headers, name, SCALE_DTYPES, None if tensor_wise else (n, 1))
        if tensor_wise and prod(headers[name][2]) != 1:
            raise CheckpointError(
                f"{headers[name][0]}: tensor {name!r} has shape {list(headers[name][2])}, expected [1] "
                "(weights: strategy 'tensor')"
            )

    def expect_nk(prefix: str, key: str, n: int, k: int, per: int) -> None:
        want = _expected_nk(shapes, prefix)
        if want is not None and (n, k) != want:
            fname, _, got = headers[key]
            raise CheckpointError(
                f"{fname}: tensor {key!r} has shape {list(got)}, expected {[want[0], want[1] // per]} "
                f"({prefix} is [N, K] = {list(want)} by config.json)"
            )

    def expect_sparse_k(prefix: str, k: int) -> None:
        if k % K_MULTIPLE:
            raise CheckpointError(
                f"{prefix}: K={k} is not a multiple of {K_MULTIPLE} (sparse24 needs K per tensor-parallel "
                f"rank to be a multiple of {K_MULTIPLE}); keep this layer dense (dense_layers)"
            )

    sparse = {k[: -len(packed_key) - 1] for k in headers if k.endswith("." + packed_key)}
    sparse |= {k[: -len(mask_key) - 1] for k in headers if k.endswith("." + mask_key)}
    kinds: dict[str, str] = {}
    if sparse and scheme.layout == "dense":
        raise CheckpointError(
            f"{sorted(sparse)[0]}: has sparse tensors ({packed_key}/{mask_key}) but sparsity_config.format "
            "is 'dense' (the weights stored [N, K])"
        )
    for prefix in sorted(sparse):
        kind = scheme.layer_kind(prefix)
        if kind != "sparse":
            raise CheckpointError(
                f"{prefix}: has sparse tensors ({packed_key}/{mask_key}) but the quantization_config "
                f"makes it {kind} (check ignore / dense_layers)"
            )
        pk = f"{prefix}.{packed_key}"
        if scheme.int4 and pk in headers and headers[pk][1] != torch.uint8:
            raise CheckpointError(
                f"{headers[pk][0]}: tensor {pk!r} has dtype {headers[pk][1]}, expected torch.uint8 (the w4a8 scheme "
                "stores two int4 values per byte; an 8-bit checkpoint says its scheme in quantization_config.weights)"
            )
        _expect(headers, pk, (torch.uint8,) if scheme.int4 else value_dtypes, None)
        n, stored_k = headers[pk][2] if len(headers[pk][2]) == 2 else (None, None)
        per = 2 * per_element  # dense columns per stored element
        if n is None:
            raise CheckpointError(f"{headers[pk][0]}: tensor {pk!r} must be 2-D [N, K/{per}], got {list(headers[pk][2])}")
        k = per * stored_k
        expect_sparse_k(prefix, k)
        expect_nk(prefix, pk, n, k, per)
        _expect(headers, f"{prefix}.{mask_key}", (torch.uint8,), (n, k // 8))
        expect_scale(prefix, n)
        if names.group_scale:
            gk = f"{prefix}.{names.group_scale}"
            if gk not in headers:
                raise CheckpointError(
                    f"missing tensor {gk!r} (expected dtype torch.uint8, shape {[n, group_count(k)]}: the w4a8 "
                    f"scale of every row and group of {GROUP_SIZE} columns){_files_of(headers, prefix)}"
                )
            _expect(headers, gk, (torch.uint8,), (n, group_count(k)))
        if names.shape:
            _expect(headers, f"{prefix}.{names.shape}", (torch.int64, torch.int32), None)
        stray = f"{prefix}.{WEIGHT}"
        if stray in headers:
            raise CheckpointError(f"{headers[stray][0]}: {prefix} has both sparse tensors and a dense {stray!r}")
        kinds[prefix] = "sparse"
    for key, (fname, dtype, shape) in headers.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix != WEIGHT or prefix in kinds:
            continue
        kind = scheme.layer_kind(prefix)
        # float weights are linears only where config.json names them (else embeddings, norms...)
        if dtype not in code_dtypes and (kind == "unquantized" or _expected_nk(shapes, prefix) is None):
            continue
        if kind == "unquantized":
            # vLLM would cast the codes into the layer's float weight, unscaled
            raise CheckpointError(
                f"{fname}: {key!r} is {code_dtypes[dtype]} but the quantization_config leaves {prefix} unquantized "
                "(ignore); store it in float or quantize it"
            )
        if kind == "sparse" and scheme.layout != "dense":
            raise CheckpointError(
                f"{fname}: {prefix} is a sparse24 layer but is stored dense ({key!r}); expected "
                f"{prefix}.{packed_key} and {prefix}.{mask_key}"
            )
        _expect(headers, key, value_dtypes if kind == "sparse" else (code_dtype,), None)
        if len(shape) != 2:
            raise CheckpointError(f"{fname}: tensor {key!r} must be 2-D, got {list(shape)}")
        if kind == "sparse":
            expect_sparse_k(prefix, shape[1])
        expect_nk(prefix, key, shape[0], shape[1], 1)
        expect_scale(prefix, shape[0])
        kinds[prefix] = kind
    allowed = {"sparse": DENSE_SUFFIXES if scheme.layout == "dense" else names.suffixes(), "dense": DENSE_SUFFIXES}
    for key, (fname, _, shape) in headers.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix in kinds and suffix not in allowed[kinds[prefix]]:
            raise CheckpointError(
                f"{fname}: unexpected tensor {key!r}: a {kinds[prefix]} sparse24 layer holds only "
                f"{sorted(allowed[kinds[prefix]])}"
            )
        if suffix == SCALE and prefix not in kinds:
            # a scale without a quantized weight: the weight is missing or has another dtype, which
            # vLLM would cast into the layer's quantized parameter
            weight = headers.get(f"{prefix}.{WEIGHT}")
            found = f"{prefix}.{WEIGHT} has dtype {weight[1]}" if weight else f"no {prefix}.{WEIGHT}"
            raise CheckpointError(
                f"{fname}: {key!r} belongs to a quantized layer, but {found}; expected a {code_dtype} "
                f"{prefix}.{WEIGHT} (dense) or {prefix}.{packed_key} + {prefix}.{mask_key} (sparse)"
            )
        if suffix == names.shape and prefix in kinds and prod(shape) != 2:
            raise CheckpointError(f"{fname}: tensor {key!r} must hold the 2 values [N, K], got shape {list(shape)}")
    lm_head = headers.get(f"{LM_HEAD}.{WEIGHT}")
    if scheme.quantize_lm_head and lm_head is not None and LM_HEAD not in kinds:
        raise CheckpointError(
            f"{lm_head[0]}: tensor '{LM_HEAD}.{WEIGHT}' has dtype {lm_head[1]}, but quantization_config."
            f"quantize_lm_head asks for {code_dtype} codes + {LM_HEAD}.{SCALE} (a tied {LM_HEAD} stores none)"
        )
    return kinds


def _check_one_scheme(headers, scheme: Sparse24Scheme, packed_key: str) -> None:
    """One checkpoint, one scheme: every quantized linear's codes (``packed_key`` of sparse layers,
    ``weight`` of dense ones) must have the dtype of the quantization_config's scheme. Names the
    layers of each dtype when the scheme's dtype is not the only one."""
    code_dtypes = {g.dtype: name for name, g in GRIDS.items()}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, (_, dtype, _) in headers.items():
        prefix, _, suffix = key.rpartition(".")
        if dtype in code_dtypes and suffix in (packed_key, WEIGHT):
            by_dtype.setdefault(dtype, []).append(prefix)
    want = scheme.grid.dtype
    wrong = {d: sorted(p) for d, p in by_dtype.items() if d != want}
    if not wrong:
        return

    def some(layers: list[str]) -> str:
        return ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")

    found = "; ".join(f"{code_dtypes[d]} ({d}) in {some(p)}" for d, p in sorted(wrong.items(), key=str))
    right = by_dtype.get(want)
    mixed = f" while {some(sorted(right))} hold {want}" if right else ""
    raise CheckpointError(
        f"quantization_config says scheme {scheme.quant} ({want} weights), but the tensors hold {found}{mixed}; "
        "one checkpoint holds one scheme (int8 and fp8 layers cannot be mixed): re-compress the model "
        "with one --scheme"
    )
