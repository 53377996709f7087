"""Fuzzing config.json / quantization_config (hypothesis): values of every JSON type at every
place, unknown and missing keys, huge numbers, regex entries that do not compile or that
backtrack catastrophically, and config.json files that are not JSON objects at all.

Each case runs load_scheme + validate_checkpoint on a valid two-layer checkpoint and asks the
scheme for the kind of every layer. It must end in a project error naming config.json or a
key, or in a scheme that says exactly what the config says (checked against an independent
reading of the config); never another exception type or a hang.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import regex
from fuzz_support import (
    Layer,
    build_spec,
    fuzz_settings,
    names_something,
    record,
    run_case,
    write_folder,
)
from hypothesis import example, given
from hypothesis import strategies as st

from vllm_sparse24.checkpoint import load_scheme, validate_checkpoint
from vllm_sparse24.schema import SCHEME_ARGS

pytestmark = pytest.mark.timeout(600)

LAYERS = [Layer("model.layers.0.self_attn.q_proj", "sparse", 8, 64), Layer("model.layers.0.mlp.down_proj", "dense", 8, 64)]
PROBES = [la.prefix for la in LAYERS] + ["lm_head", "model.layers.1.mlp.up_proj", "model.embed_tokens", ""]
REGEXES = (
    # valid
    "re:.*down_proj$", r"re:model\.layers\.[0-9]+\.mlp\..*", "re:", "re:lm_head", r"re:(?i).*Q_PROJ",
    # do not compile
    "re:(", "re:[", "re:*", "re:a{2,1}", "re:(?P<x>a)(?P<x>b)", "re:\\", "re:(?<=a+)b", "re:" + "(" * 300 + ")" * 300,
    "re:a{99999999999999999999}",
    # backtrack catastrophically on a layer name (Python's re never returns on these)
    "re:(.|.)*(?!)", r"re:(.*.*)*\d$!", "re:^(([a-z.0-9_])+)+[A-Z]$", r"re:(\S+\S+)+\s", "re:(?:.|.)*(?=x)\\w$",
)
NUMBERS = st.sampled_from((0, 1, 2, 8, -1, True, False, 1.0, 8.0, 2**63, 10**400, 1e308, math.inf, -math.inf, math.nan))
STRINGS = st.sampled_from(("sparse24", "compressed-tensors", "sparse-24-bitmask", "2:4", "int", "float", "channel",
                           "token", "tensor", "Linear", "lm_head", "8", "", "\u0000", "é" * 3, *REGEXES)) | st.text(max_size=12)
JSON = st.recursive(st.none() | NUMBERS | STRINGS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(STRINGS, inner, max_size=3),
                    max_leaves=8)


def _paths(node, path=()):
    """Every (container path, key) in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path, i
            yield from _paths(v, (*path, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def mutate_config(data, cfg: dict) -> str:
    q = cfg["quantization_config"]
    op = data.draw(st.sampled_from(("set", "set", "delete", "add_key", "regex", "regex", "replace_config")))
    if not isinstance(q, dict):  # replaced by an earlier mutation
        op = "replace_config"
    paths = list(_paths(q))
    if op == "set" and paths:
        path, key = data.draw(st.sampled_from(paths))
        _get(q, path)[key] = data.draw(JSON)
    elif op == "delete" and paths:
        path, key = data.draw(st.sampled_from(paths))
        _get(q, path).pop(key)
    elif op == "add_key":
        dicts = [()] + [(*p, k) for p, k in paths if isinstance(_get(q, (*p, k)), dict)]
        _get(q, data.draw(st.sampled_from(dicts)))[data.draw(STRINGS)] = data.draw(JSON)
    elif op == "regex":
        lists = [(*p, k) for p, k in paths if isinstance(_get(q, (*p, k)), list)]
        target = _get(q, data.draw(st.sampled_from(lists))) if lists else q.setdefault("dense_layers", [])
        target.insert(data.draw(st.integers(0, len(target))), data.draw(st.sampled_from(REGEXES)))
    else:
        cfg["quantization_config"] = data.draw(JSON)
    return op


RAW_CONFIGS = (
    b"", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b'{"quantization_config": ' + b"[" * 50_000,
    b"\xef\xbb\xbf{}", b"null", b"[]", b'"sparse24"', b"NaN", b'{"quantization_config": null}',
    b'{"quantization_config": [1, 2]}', b'{"quantization_config": "sparse24"}', b"{" + b'"a": 1, ' * 10 + b"}",
)


def _regex_kind(scheme_cfg: dict, name: str, legacy: bool) -> str:
    """The layer kind the config asks for, read independently of schema.py (the regex module,
    which returns on the patterns Python's re backtracks on forever)."""

    def match(patterns) -> bool:
        return any(p == "Linear" or (p.startswith("re:") and regex.match(p[3:], name, timeout=5) is not None)
                   or p == name for p in patterns)

    if legacy:
        targets = [t for g in scheme_cfg["config_groups"].values() for t in g.get("targets", [])]
        sparsity = scheme_cfg["sparsity_config"]
        if match(scheme_cfg.get("ignore", [])) or not match(targets):
            return "unquantized"
        if match(sparsity.get("targets", ["Linear"])) and not match(sparsity.get("ignore", [])):
            return "sparse"
        return "dense"
    if match(scheme_cfg.get("ignore", ["lm_head"])):
        return "unquantized"
    return "dense" if match(scheme_cfg.get("dense_layers", [])) else "sparse"


def _check_accepted(q, scheme, kinds: dict[str, str]) -> None:
    """An accepted config says what the scheme does (the config read independently)."""
    if scheme.legacy:
        assert q["quant_method"] == "compressed-tensors"
        assert q["sparsity_config"]["format"] in ("sparse-24-bitmask", "dense")
        assert q["sparsity_config"].get("sparsity_structure", "2:4") == "2:4"
        weight_args, input_args = SCHEME_ARGS[scheme.quant]
        for group in (q.get("config_groups") or {}).values():
            # weight scales per channel or per tensor; everything else as the scheme's
            assert group["weights"].get("strategy") in ("channel", "tensor"), group["weights"]
            for key, want in (("weights", weight_args), ("input_activations", input_args)):
                got = group[key]
                assert all(_same(got.get(k), v) for k, v in want.items() if k in got and
                           (key, k) != ("weights", "strategy")), (key, got)
    else:
        assert q["quant_method"] == "sparse24" and type(q["format_version"]) is int and q["format_version"] == 1
        assert q.get("sparsity_structure", "2:4") == "2:4"
        assert scheme.ignore == tuple(q.get("ignore", ["lm_head"]))
        assert scheme.dense_layers == tuple(q.get("dense_layers", []))
        for key, want in zip(("weights", "input_activations"), SCHEME_ARGS[scheme.quant], strict=True):
            got = q[key]
            assert all(_same(got.get(k), v) for k, v in want.items() if k in got), (key, got)
    for name, kind in kinds.items():
        assert kind == _regex_kind(q, name, scheme.legacy), f"{name}: scheme says {kind}"


def _same(got, want) -> bool:
    # compressed-tensors' pydantic model coerces "8" and 8.0 to 8 and "CHANNEL" to "channel"
    if isinstance(want, bool):
        return got is want or str(got).lower() == str(want).lower()
    if isinstance(want, int):
        return type(got) is not bool and (got == want or str(got) == str(want))
    return str(got).lower() == want


def _run(folder: Path):
    scheme = load_scheme(folder)
    validate_checkpoint(folder, scheme)
    return scheme, {name: scheme.layer_kind(name) for name in PROBES}


def _check(folder: Path, cfg_obj, what: str) -> None:
    outcome, value = run_case(lambda: _run(folder))
    record("quantization_config", outcome)
    assert not outcome.startswith(("FOREIGN", "HANG")), f"{what}: {outcome}: {value!r}"
    if outcome != "ok":
        # a config the tensors contradict is reported with the tensor; a bad config with its key
        names = ["config.json", "quantization_config", "model.safetensors", *PROBES[:2]]
        assert names_something(str(value), names), f"{what}: error names no file, key or layer: {value}"
        return
    q = cfg_obj["quantization_config"]
    _check_accepted(q, *value)


@fuzz_settings(800)
@given(legacy=st.booleans(), data=st.data())
@example(legacy=False, data=None)
def test_fuzz_quantization_config(legacy, data):
    spec = build_spec(LAYERS, legacy, seed=0)
    cfg = copy.deepcopy(spec.config)
    ops = [mutate_config(data, cfg) for _ in range(data.draw(st.integers(1, 3)))] if data else []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, spec.files, json.dumps(cfg).encode())
        _check(folder, cfg, f"{ops} -> {json.dumps(cfg)[:400]}")


@pytest.mark.parametrize("raw", RAW_CONFIGS, ids=lambda r: repr(r[:12]))
def test_config_json_that_is_no_object(raw):
    spec = build_spec(LAYERS, False, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), spec.files, raw)
        outcome, value = run_case(lambda: _run(Path(tmp)))
    record("config.json raw", outcome)
    assert outcome == "CheckpointError", f"{outcome}: {value!r}"
    assert "config.json" in str(value)
