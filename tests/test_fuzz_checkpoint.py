"""Fuzzing the checkpoint reader (hypothesis): mutated safetensors headers and files, 2:4
bitmasks with 0-4 bits set in a group, and benign rewrites.

Every case must end in a load equal to what an independent reference reader (safetensors spec
+ numpy) decodes from the same bytes, or in one of the project's errors naming a file, tensor
or layer; never another exception type, a hang or a different result. Derandomized with a
bounded number of examples, so CI runs the same cases every time (SPARSE24_FUZZ_SCALE=10 runs
ten times as many, with other draws). Outcome counts are printed at the end of the pytest run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_support import (
    ITEMSIZE,
    Entry,
    Layer,
    RefInvalid,
    StFile,
    build_spec,
    fuzz_settings,
    load_like_vllm,
    names_something,
    record,
    ref_decode_24,
    ref_load,
    ref_tensors,
    run_case,
    same_load,
    write_folder,
)
from hypothesis import example, given
from hypothesis import strategies as st

from vllm_sparse24.format import GROUP

pytestmark = pytest.mark.timeout(600)

PREFIXES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj")
SUFFIXES = ("weight", "weight_packed", "weight_bitmask", "weight_scale", "bias", "weight_zero_point",
            "compressed", "bitmask", "shape", "input_scale")
DTYPES = (*ITEMSIZE, "Q4", "", "i8", "INT8", "F4", "F6_E2M3")


@st.composite
def layer_lists(draw) -> list[Layer]:
    n_layers = draw(st.integers(1, len(PREFIXES)))
    layers = []
    for prefix in PREFIXES[:n_layers]:
        kind = draw(st.sampled_from(("sparse", "sparse", "dense")))
        layers.append(Layer(prefix, kind, draw(st.sampled_from((8, 16))), draw(st.sampled_from((64, 128)))))
    return layers


def _shape_variants(shape: list[int]) -> st.SearchStrategy:
    numel = int(np.prod(shape)) if shape else 1
    variants = [[], [0], [numel], [1, numel], [*shape, 1], list(reversed(shape)), [2**32, 2**32], [-1, 8],
                [numel * 2], [2**64 - 1]]
    if len(shape) == 2 and shape[0] % 2 == 0:
        variants.append([shape[0] // 2, shape[1] * 2])
    return st.sampled_from(variants) | st.lists(st.integers(0, 300), max_size=3)


def mutate(data, files: list[StFile]) -> str:
    """Apply one drawn mutation in place; returns its description."""
    f = files[data.draw(st.integers(0, len(files) - 1))]  # an index: failure reports stay short
    entries = f.entries
    op = data.draw(st.sampled_from((
        "dtype", "shape", "offsets", "swap_offsets", "duplicate", "drop", "drop_keep_bytes", "rename",
        "add", "truncate", "append", "header_len", "flip", "metadata", "split", "cross_file_duplicate",
    )))
    if not entries and op not in ("add", "truncate", "append", "header_len", "flip", "metadata"):
        op = "add"
    i = data.draw(st.integers(0, max(len(entries) - 1, 0)))
    if op == "dtype":
        entries[i].dtype = data.draw(st.sampled_from(DTYPES))
    elif op == "shape":
        entries[i].shape = data.draw(_shape_variants(entries[i].shape))
    elif op == "offsets":
        size = sum(len(e.data) for e in entries if e.data is not None)
        entries[i].offsets_from = data.draw(st.lists(st.integers(-4, size + 8), min_size=0, max_size=3))
    elif op == "swap_offsets":
        j = data.draw(st.integers(0, len(entries) - 1))
        entries[i].offsets_from, entries[j].offsets_from = entries[j], entries[i]
    elif op == "duplicate":  # a second header entry of the same name over the same bytes
        e = entries[i]
        dup = Entry(e.name, data.draw(st.sampled_from((e.dtype, "U8", "I8", "F32"))), list(e.shape), None,
                    offsets_from=e)
        entries.insert(data.draw(st.integers(0, len(entries))), dup)
    elif op == "drop":
        entries.pop(i)
    elif op == "drop_keep_bytes":  # the bytes stay: a hole in the data buffer
        entries[i].in_header = False
    elif op == "rename":
        entries[i].name = data.draw(_names())
    elif op == "add":
        dtype = data.draw(st.sampled_from(("I8", "U8", "F32", "F16", "I64")))
        shape = data.draw(st.sampled_from(([8, 1], [8, 32], [8, 64], [16, 8], [2], [0], [])))
        nbytes = int(np.prod(shape)) * ITEMSIZE[dtype] if shape else ITEMSIZE[dtype]
        raw = data.draw(st.binary(min_size=nbytes, max_size=nbytes))
        entries.insert(data.draw(st.integers(0, len(entries))), Entry(data.draw(_names()), dtype, shape, raw))
    elif op in ("truncate", "header_len"):
        f.byte_ops.append((op, data.draw(st.integers(0, 2**64 - 1) | st.integers(0, 4096))))
    elif op == "append":
        f.byte_ops.append((op, data.draw(st.binary(min_size=1, max_size=16))))
    elif op == "flip":
        f.byte_ops.append((op, (data.draw(st.integers(0, 4096)), data.draw(st.integers(1, 255)))))
    elif op == "metadata":
        f.metadata = data.draw(st.sampled_from((None, {}, {"format": "pt", "note": "x"}, {"format": 1},
                                                [1, 2], "pt", {"a": None})))
    elif op == "split":  # move some entries into a second shard
        moved = [e for e in entries if data.draw(st.booleans())]
        f.entries = [e for e in entries if e not in moved]
        files.append(StFile(f"model-extra-{len(files)}.safetensors", moved))
    elif op == "cross_file_duplicate":  # the same tensor name, with bytes, in a second file
        e = entries[i]
        files.append(StFile(f"model-dup-{len(files)}.safetensors", [Entry(e.name, e.dtype, list(e.shape), e.data)]))
    return f"{op} on {f.name}"


def _names() -> st.SearchStrategy:
    return (st.builds(lambda p, s: f"{p}.{s}", st.sampled_from((*PREFIXES, "lm_head", "model.layers.9.mlp.up_proj")),
                      st.sampled_from(SUFFIXES))
            | st.sampled_from(("lm_head.weight", "model.norm.weight", "", ".weight_packed", "__metadata__"))
            | st.text(max_size=12))


def _check_error(err: Exception, folder: Path, files: list[StFile]) -> None:
    tensors = [e.name for f in files for e in f.entries]
    names = ["config.json", *(f.name for f in files), *tensors, *(t.rpartition(".")[0] for t in tensors), *PREFIXES]
    assert names_something(str(err), names), f"{type(err).__name__} names no file, tensor or layer: {err}"


@fuzz_settings(1000)
@given(layers=layer_lists(), legacy=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_fuzz_mutated_safetensors(layers, legacy, seed, data):
    spec = build_spec(layers, legacy, seed)
    files = spec.files
    n_ops = data.draw(st.integers(1, 3))
    ops = [mutate(data, files) for _ in range(n_ops)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, files, json.dumps(spec.config).encode())
        outcome, value = run_case(lambda: load_like_vllm(folder))
        record("safetensors headers/files", outcome)
        assert not outcome.startswith(("FOREIGN", "HANG")), f"{ops}: {outcome}: {value!r}"
        if outcome != "ok":
            _check_error(value, folder, files)
            return
        try:
            names = ref_tensors(folder)
            ref = ref_load(folder, spec, only=set(value) & {la.prefix for la in spec.layers})
        except RefInvalid as e:
            pytest.fail(f"{ops}: the project loaded a checkpoint the reference refuses ({e})")
        for layer in spec.layers:
            # a layer left out entirely is vLLM's to report (it requires every parameter of a
            # quantized model); one with its weight_scale still there must not be skipped
            assert layer.prefix in value or f"{layer.prefix}.weight_scale" not in names, (
                f"{ops}: silent wrong load: {layer.prefix} skipped though its weight_scale is there")
        diff = same_load(value, ref)
        assert diff is None, f"{ops}: silent wrong load: {diff}"


@fuzz_settings(100)
@given(layers=layer_lists(), legacy=st.booleans(), seed=st.integers(0, 2**16),
       scale_dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)), data=st.data())
def test_fuzz_benign_rewrites_load_identically(layers, legacy, seed, scale_dtype, data):
    """Header order, data order, metadata and sharding do not change what loads."""
    spec = build_spec(layers, legacy, seed, scale_dtype)
    entries = spec.files[0].entries
    order = data.draw(st.permutations(range(len(entries))))
    shuffled = [entries[i] for i in order]
    n_files = data.draw(st.integers(1, 3))
    files = [StFile(f"model-{j + 1:05d}-of-{n_files:05d}.safetensors", shuffled[j::n_files],
                    metadata=data.draw(st.sampled_from((None, {"format": "pt"}, {"format": "pt", "x": "y"}))))
             for j in range(n_files)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, files, json.dumps(spec.config).encode())
        outcome, value = run_case(lambda: load_like_vllm(folder))
        record("benign rewrites", outcome)
        assert outcome == "ok", f"{outcome}: {value}"
        assert same_load(value, ref_load(folder, spec)) is None


def _bitmask_with_counts(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 bitmask [N, K/8] whose group (r, g) has counts[r, g] bits set, at random places."""
    n, groups = counts.shape
    bits = np.zeros((n, groups, GROUP), dtype=np.uint8)
    for r in range(n):
        for g in range(groups):
            bits[r, g, rng.permutation(GROUP)[: counts[r, g]]] = 1
    return np.packbits(bits.reshape(n, -1), axis=1, bitorder="little")


def _single_layer_checkpoint(folder: Path, values: np.ndarray, bitmask: np.ndarray) -> str:
    spec = build_spec([Layer(PREFIXES[0], "sparse", values.shape[0], bitmask.shape[1] * 8)], False, 0)
    for e in spec.files[0].entries:
        if e.name.endswith(".weight_packed"):
            e.data, e.shape = values.tobytes(), list(values.shape)
        elif e.name.endswith(".weight_bitmask"):
            e.data, e.shape = bitmask.tobytes(), list(bitmask.shape)
    write_folder(folder, spec.files, json.dumps(spec.config).encode())
    return PREFIXES[0]


def _check_bitmask_case(values: np.ndarray, bitmask: np.ndarray, suite: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = _single_layer_checkpoint(Path(tmp), values, bitmask)
        outcome, value = run_case(lambda: load_like_vllm(Path(tmp)))
    record(suite, outcome)
    try:
        want = ref_decode_24(values, bitmask)
    except RefInvalid:
        want = None
    if want is not None:
        assert outcome == "ok", f"a valid 2:4 bitmask was refused: {value}"
        assert np.array_equal(value[prefix][1].numpy(), want)
        return
    assert outcome == "Sparse24FormatError", f"{outcome}: {value!r}"
    counts = np.unpackbits(bitmask, axis=1, bitorder="little").reshape(values.shape[0], -1, GROUP).sum(-1)
    r, g = np.argwhere(counts != 2)[0]
    assert f"{prefix}: bitmask row {r}, columns {g * GROUP}..{g * GROUP + 3} has {counts[r, g]} bits set" in str(value)


@pytest.mark.parametrize("pattern", range(16))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_every_4bit_group_pattern(pattern, where):
    """Each of the 16 bit patterns of a group, at the first, a middle and the last group of a
    valid [8, 64] layer: the 6 with two bits load, 0, 1, 3 or 4 bits are refused by row and columns."""
    n, k = 8, 64
    rng = np.random.default_rng(pattern)
    counts = np.full((n, k // GROUP), 2)
    bitmask = _bitmask_with_counts(counts, rng)
    r, g = {"first": (0, 0), "middle": (3, 7), "last": (n - 1, k // GROUP - 1)}[where]
    bits = np.unpackbits(bitmask, axis=1, bitorder="little").reshape(n, -1, GROUP)
    bits[r, g] = [(pattern >> b) & 1 for b in range(GROUP)]
    bitmask = np.packbits(bits.reshape(n, -1), axis=1, bitorder="little")
    values = rng.integers(-127, 128, (n, k // 2), dtype=np.int8)
    _check_bitmask_case(values, bitmask, "bitmask group patterns")


@fuzz_settings(300)
@given(n=st.sampled_from((1, 8, 24)), k=st.sampled_from((64, 128, 192)),
       weights=st.sampled_from(((0, 0, 1, 0, 0), (1, 1, 40, 1, 1), (1, 2, 4, 2, 1), (0, 1, 10, 1, 0))),
       seed=st.integers(0, 2**32 - 1))
@example(n=1, k=64, weights=(0, 1, 10, 1, 0), seed=1)
def test_fuzz_bitmask_groups(n, k, weights, seed):
    """Groups with 0, 1, 2, 3 or 4 bits set (drawn with the given weights), values a full [N, K/2]
    so a 3 and a 1 in one row still add up: a valid mask loads as the reference decodes it, an
    invalid one is refused naming the first bad group."""
    rng = np.random.default_rng(seed)
    p = np.array(weights, dtype=float) / sum(weights)
    counts = rng.choice(5, size=(n, k // GROUP), p=p)
    bitmask = _bitmask_with_counts(counts, rng)
    values = rng.integers(-127, 128, (n, k // 2), dtype=np.int8)
    _check_bitmask_case(values, bitmask, "bitmask groups")
