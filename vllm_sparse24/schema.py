"""``config.json["quantization_config"]`` of sparse24 checkpoints, and of the legacy
compressed-tensors ``sparse-24-bitmask`` checkpoints the plugin also loads.

Pure Python + compressed-tensors (no vLLM import; the grids of ``quant.py`` name the torch dtypes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import regex
from compressed_tensors.quantization import QuantizationArgs

from .quant import GROUP_SIZE, SCHEME_GRIDS, WEIGHT_GRIDS, Grid, Int4GroupGrid

QUANT_METHOD = "sparse24"
FORMAT_VERSION = 1
SPARSITY_STRUCTURE = "2:4"
# K of a sparse layer, per tensor-parallel rank, must be a multiple of this: whole bitmask
# bytes need 8, and the CUTLASS kernel needs 16-byte rows of the compressed values (K/2 bytes).
K_MULTIPLE = 64
LEGACY_SPARSITY_FORMAT = "sparse-24-bitmask"
# compressed-tensors sparsity formats the plugin reads: values + bitmask, or the weight stored
# dense with the zeros in place (the 2:4 pattern is then checked at load)
CT_SPARSITY_LAYOUTS = {LEGACY_SPARSITY_FORMAT: "bitmask", "dense": "dense"}
# how the weights of a 2:4 layer are stored: sparse24 values + bitmask, compressed-tensors
# values + bitmask + shape, or dense [N, K] with the zeros in place
Layout = Literal["sparse24", "bitmask", "dense"]
# weight scales the plugin reads: one per output channel, or one per tensor (expanded at load)
WEIGHT_STRATEGIES = ("channel", "tensor")

WEIGHT_ARGS: dict[str, Any] = {
    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
}
INPUT_ARGS: dict[str, Any] = {
    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
}
FP8_WEIGHT_ARGS: dict[str, Any] = {**WEIGHT_ARGS, "type": "float"}
FP8_INPUT_ARGS: dict[str, Any] = {**INPUT_ARGS, "type": "float"}
# w4a8: the 2:4 layers' weights are int4 with a uint8 scale per group of 128 along K on top of the
# float32 per-channel weight_scale (two levels, which QuantizationArgs cannot say: docs/format.md);
# dense layers and activations are int8 as in the int8 scheme
W4A8_WEIGHT_ARGS: dict[str, Any] = {**WEIGHT_ARGS, "num_bits": 4, "strategy": "group", "group_size": GROUP_SIZE}
# scheme name (vllm_sparse24.quant.SCHEME_GRIDS) -> (weights args, input_activations args)
SCHEME_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "int8": (WEIGHT_ARGS, INPUT_ARGS),
    "fp8": (FP8_WEIGHT_ARGS, FP8_INPUT_ARGS),
    "w4a8": (W4A8_WEIGHT_ARGS, INPUT_ARGS),
}
# the schemes whose weights are one 8-bit code per weight: compressed-tensors checkpoints, and float
# 2:4 weights quantized at load, take one of these
EIGHT_BIT_SCHEMES = ("int8", "fp8")
_KEYS = {
    "quant_method", "format_version", "sparsity_structure", "weights", "input_activations",
    "ignore", "dense_layers", "quantize_lm_head",
}
# the output projection's name in Hugging Face checkpoints (and vLLM's ParallelLMHead prefix)
LM_HEAD = "lm_head"

LayerKind = Literal["sparse", "dense", "unquantized"]
# A layer name is matched against a "re:" pattern in microseconds; a pattern that takes longer
# than this backtracks catastrophically (Python's re has no time limit and would hang the load).
REGEX_TIMEOUT_S = 0.2


class Sparse24ConfigError(ValueError):
    """The quantization_config of a checkpoint is not one the plugin can load."""


def _parse_quant_args(args: Mapping[str, Any] | None, what: str) -> QuantizationArgs:
    if args is None:
        raise Sparse24ConfigError(f"quantization_config: missing '{what}'")
    if not isinstance(args, Mapping):
        raise Sparse24ConfigError(f"quantization_config['{what}'] must be a JSON object, got {type(args).__name__}")
    try:
        return QuantizationArgs.model_validate(dict(args))
    except Exception as e:  # pydantic's error already names the field
        raise Sparse24ConfigError(f"quantization_config['{what}'] is not valid QuantizationArgs: {e}") from e


def scheme_of_args(args: Mapping[str, Any] | None, what: str, schemes: Iterable[str] = EIGHT_BIT_SCHEMES,
                   *, activations: bool = False) -> str:
    """The scheme of ``schemes`` that ``args`` ask for: by the type (int / float) and, of weights,
    num_bits (8, or 4: w4a8); ``activations``: input_activations args (8-bit in every scheme)."""
    parsed = _parse_quant_args(args, what)
    got = getattr(parsed.type, "value", parsed.type)
    for name in schemes:
        want = SCHEME_ARGS[name][1 if activations else 0]
        if want["type"] == got and want["num_bits"] == parsed.num_bits:
            return name
    offered = {(SCHEME_ARGS[n][1 if activations else 0]["type"], SCHEME_ARGS[n][1 if activations else 0]["num_bits"]): n
               for n in reversed(tuple(schemes))}
    raise Sparse24ConfigError(
        f"quantization_config['{what}']: num_bits={parsed.num_bits} is not supported with type={got!r}; sparse24 runs "
        + " or ".join(f"type={t!r} num_bits={b} ({n})" for (t, b), n in reversed(offered.items()))
    )


def check_quant_args(args: Mapping[str, Any] | None, expected: Mapping[str, Any], what: str,
                     scheme: str | None = None) -> None:
    """Validate with compressed-tensors' schema, then require the one scheme we run (``scheme``:
    its name, for the message)."""
    parsed = _parse_quant_args(args, what)
    for key, want in expected.items():
        got = getattr(parsed, key)
        got = getattr(got, "value", got)
        if got != want:
            whose = f"{what} of the {scheme} scheme (num_bits={expected['num_bits']})" if scheme else what
            raise Sparse24ConfigError(
                f"quantization_config['{what}']: {key}={got!r} is not supported; "
                f"sparse24 runs {key}={want!r} ({whose} must be {dict(expected)})"
            )


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> regex.Pattern:
    # re decides what is valid (compressed-tensors and vLLM match with re); the regex module
    # matches, because it can stop a match that runs too long
    try:
        re.compile(pattern)
        return regex.compile(pattern)
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as e:
        raise Sparse24ConfigError(f"'re:{pattern}' is not a valid regular expression ({e})") from e


def _match_one(name: str, target: str) -> bool:
    """compressed_tensors.utils.match_name (re.match for "re:" targets, else equality), bounded in time."""
    if not target.startswith("re:"):
        return target == name
    pattern = target[3:]
    try:
        return _compile(pattern).match(name, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError as e:
        raise Sparse24ConfigError(
            f"quantization_config: regex {target!r} takes over {REGEX_TIMEOUT_S} s to match layer "
            f"{name!r} (catastrophic backtracking); simplify it"
        ) from e


def _match(name: str, patterns: Iterable[str]) -> bool:
    # "Linear" is compressed-tensors' class target: every layer we are asked about is linear
    return any(p == "Linear" or _match_one(name, p) for p in patterns)


@dataclass(frozen=True)
class Sparse24Scheme:
    """Which linear layers are sparse W8A8, dense W8A8 or left unquantized, and how the
    checkpoint stores them."""

    ignore: tuple[str, ...] = ("lm_head",)
    dense_layers: tuple[str, ...] = ()
    # lm_head as a dense W8A8 layer on the scheme's grid (vLLM's ParallelLMHead, not a linear
    # layer); with tied embeddings the plugin quantizes a copy of the embedding for the logits
    quantize_lm_head: bool = False
    # compressed-tensors checkpoints only: which layers the quantization / sparsity configs target
    quant_targets: tuple[str, ...] = ("Linear",)
    sparse_targets: tuple[str, ...] = ("Linear",)
    sparse_ignore: tuple[str, ...] = ()
    # a compressed-tensors checkpoint, or one without quantization_config (read only)
    legacy: bool = False
    # "int8", "fp8" or "w4a8" (vllm_sparse24.quant.SCHEME_GRIDS): the grid of every quantized layer's
    # activations and weights (w4a8: int4 2:4 weights, dense layers int8); one checkpoint holds one scheme
    quant: str = "int8"
    layout: Layout = "sparse24"
    # False: the checkpoint holds float weights, quantized on ``quant``'s grid at load
    quantized: bool = True
    weight_strategy: str = "channel"

    def __post_init__(self) -> None:
        if self.quant not in SCHEME_ARGS:
            raise Sparse24ConfigError(f"unknown quantization scheme {self.quant!r}; choose from {sorted(SCHEME_ARGS)}")
        if self.legacy and self.quant not in EIGHT_BIT_SCHEMES:
            raise Sparse24ConfigError(f"scheme {self.quant!r} has no compressed-tensors layout; choose from "
                                      f"{EIGHT_BIT_SCHEMES}")
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            raise Sparse24ConfigError(f"unknown weight strategy {self.weight_strategy!r}; choose from {WEIGHT_STRATEGIES}")
        if self.quantize_lm_head and _match(LM_HEAD, self.ignore):
            raise Sparse24ConfigError(
                f"quantization_config.quantize_lm_head is true but ignore {list(self.ignore)} leaves "
                f"{LM_HEAD} unquantized; drop it from ignore or set quantize_lm_head false"
            )

    @property
    def grid(self) -> Grid:
        """The 8-bit grid of the activations, the dense layers and the GEMM (w4a8: int8)."""
        return SCHEME_GRIDS[self.quant]

    @property
    def sparse_weight_grid(self) -> Grid | Int4GroupGrid:
        """The grid of the 2:4 layers' weights: ``grid``, or w4a8's two-level int4 grid."""
        return WEIGHT_GRIDS[self.quant]

    @property
    def int4(self) -> bool:
        """Whether the 2:4 layers store int4 values with group scales (w4a8)."""
        return isinstance(self.sparse_weight_grid, Int4GroupGrid)

    def layer_kind(self, name: str) -> LayerKind:
        if name == LM_HEAD and self.quantize_lm_head:  # never 2:4: it runs the dense W8A8 path
            return "dense"
        if _match(name, self.ignore) or not _match(name, self.quant_targets):
            return "unquantized"
        if _match(name, self.dense_layers):
            return "dense"
        if _match(name, self.sparse_targets) and not _match(name, self.sparse_ignore):
            return "sparse"
        return "dense"

    # -- native format ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Sparse24Scheme:
        _require_mapping(cfg, "quantization_config")
        if cfg.get("quant_method") != QUANT_METHOD:
            raise Sparse24ConfigError(
                f"quantization_config.quant_method={cfg.get('quant_method')!r}, expected {QUANT_METHOD!r}"
            )
        unknown = sorted(set(cfg) - _KEYS)
        if unknown:
            raise Sparse24ConfigError(
                f"quantization_config has unknown keys {unknown}; sparse24 format_version "
                f"{FORMAT_VERSION} allows {sorted(_KEYS)}"
            )
        version = cfg.get("format_version")
        # type check first: JSON true and 1.0 compare equal to 1 in Python
        if type(version) is not int or version != FORMAT_VERSION:
            raise Sparse24ConfigError(
                f"quantization_config.format_version={version!r} is not supported; this plugin "
                f"reads format_version {FORMAT_VERSION} (upgrade vllm-sparse24 for newer checkpoints)"
            )
        structure = cfg.get("sparsity_structure", SPARSITY_STRUCTURE)
        if structure != SPARSITY_STRUCTURE:
            raise Sparse24ConfigError(
                f"quantization_config.sparsity_structure={structure!r}; only {SPARSITY_STRUCTURE!r} is supported"
            )
        quant = scheme_of_args(cfg.get("weights"), "weights", SCHEME_ARGS)
        act_quant = scheme_of_args(cfg.get("input_activations"), "input_activations", activations=True)
        if SCHEME_GRIDS[act_quant] != SCHEME_GRIDS[quant]:
            raise Sparse24ConfigError(
                f"quantization_config mixes schemes: weights are {quant} (type "
                f"{SCHEME_ARGS[quant][0]['type']!r}) but input_activations are {act_quant} (type "
                f"{SCHEME_ARGS[act_quant][1]['type']!r}); sparse24 runs int8 or int4 (w4a8) weights with int8 "
                "activations, or fp8 weights with fp8 activations"
            )
        weights, inputs = SCHEME_ARGS[quant]
        check_quant_args(cfg.get("weights"), weights, "weights", quant)
        check_quant_args(cfg.get("input_activations"), inputs, "input_activations")
        ignore = _str_list(cfg.get("ignore", ["lm_head"]), "ignore")
        dense = _str_list(cfg.get("dense_layers", []), "dense_layers")
        lm_head = cfg.get("quantize_lm_head", False)
        if type(lm_head) is not bool:
            raise Sparse24ConfigError(f"quantization_config.quantize_lm_head={lm_head!r} must be true or false")
        return cls(ignore=tuple(ignore), dense_layers=tuple(dense), quant=quant, quantize_lm_head=lm_head)

    def to_dict(self) -> dict[str, Any]:
        if self.legacy:
            raise Sparse24ConfigError("a legacy scheme is read-only; write the sparse24 format instead")
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "sparsity_structure": SPARSITY_STRUCTURE,
            "weights": dict(SCHEME_ARGS[self.quant][0]),
            "input_activations": dict(SCHEME_ARGS[self.quant][1]),
            "ignore": list(self.ignore),
            "dense_layers": list(self.dense_layers),
            # written only when set: checkpoints without a quantized lm_head stay as they were
            **({"quantize_lm_head": True} if self.quantize_lm_head else {}),
        }

    # -- compressed-tensors 2:4 checkpoints (llm-compressor), and plain ones -----------
    @staticmethod
    def is_legacy_config(cfg: Mapping[str, Any] | None) -> bool:
        """A compressed-tensors quantization_config whose sparsity_config promises 2:4."""
        if not isinstance(cfg, Mapping) or cfg.get("quant_method") != "compressed-tensors":
            return False
        sparsity = cfg.get("sparsity_config")
        return isinstance(sparsity, Mapping) and (
            sparsity.get("format") == LEGACY_SPARSITY_FORMAT
            or sparsity.get("sparsity_structure") == SPARSITY_STRUCTURE
        )

    @classmethod
    def unquantized_24(cls, quant: str = "int8") -> Sparse24Scheme:
        """A checkpoint without quantization_config served with ``--quantization sparse24``: float
        weights with the zeros in place; every linear but lm_head is 2:4 (checked at load) and
        quantized on ``quant``'s grid at load."""
        return cls(ignore=("lm_head",), legacy=True, quant=quant, layout="dense", quantized=False)

    @classmethod
    def from_compressed_tensors(cls, cfg: Mapping[str, Any], load_quant: str = "int8") -> Sparse24Scheme:
        """The scheme of a compressed-tensors 2:4 checkpoint; ``load_quant`` is the grid an
        unquantized one is quantized on at load."""
        if not cls.is_legacy_config(cfg):
            raise Sparse24ConfigError("not a compressed-tensors 2:4 config (sparsity_config with sparsity_structure '2:4')")
        sparsity = cfg["sparsity_config"]
        if sparsity.get("sparsity_structure", SPARSITY_STRUCTURE) != SPARSITY_STRUCTURE:
            raise Sparse24ConfigError(
                f"sparsity_config.sparsity_structure={sparsity.get('sparsity_structure')!r}; only '2:4' is supported"
            )
        layout = CT_SPARSITY_LAYOUTS.get(fmt) if isinstance(fmt := sparsity.get("format"), str) else None
        if layout is None:
            raise Sparse24ConfigError(
                f"sparsity_config.format={sparsity.get('format')!r} is not supported; sparse24 reads "
                + " or ".join(repr(f) for f in CT_SPARSITY_LAYOUTS)
            )
        sparse_targets = tuple(_str_list(sparsity.get("targets", ["Linear"]), "sparsity_config.targets"))
        sparse_ignore = tuple(_str_list(sparsity.get("ignore", []), "sparsity_config.ignore"))
        ignore = tuple(_str_list(cfg.get("ignore", []), "ignore"))
        groups = cfg.get("config_groups") or {}
        _require_mapping(groups, "quantization_config.config_groups")
        if not groups:  # 2:4 only: quantized at load
            return cls(
                ignore=ignore + sparse_ignore, quant_targets=sparse_targets, sparse_targets=sparse_targets,
                sparse_ignore=sparse_ignore, legacy=True, quant=load_quant, layout=layout, quantized=False,
            )
        _refuse_4bit_format(cfg, groups)
        targets: list[str] = []
        quants: dict[str, str] = {}
        strategies: dict[str, str] = {}
        for gname, group in groups.items():
            _require_mapping(group, f"quantization_config.config_groups.{gname}")
            what = f"config_groups.{gname}"
            quant = scheme_of_args(group.get("weights"), f"{what}.weights")
            weights, inputs = SCHEME_ARGS[quant]
            check_quant_args(group.get("weights"), {k: v for k, v in weights.items() if k != "strategy"},
                             f"{what}.weights")
            strategies[gname] = _weight_strategy(group["weights"], f"{what}.weights")
            check_quant_args(group.get("input_activations"), inputs, f"{what}.input_activations")
            quants[gname] = quant
            targets += _str_list(group.get("targets", []), f"{what}.targets")
        for name, values in (("schemes", quants), ("weight strategies", strategies)):
            if len(set(values.values())) > 1:
                raise Sparse24ConfigError(
                    f"quantization_config.config_groups mix {name} {values}; sparse24 loads one per checkpoint"
                )
        return cls(
            ignore=ignore, quant_targets=tuple(targets), sparse_targets=sparse_targets, sparse_ignore=sparse_ignore,
            legacy=True, quant=next(iter(quants.values())), layout=layout,
            weight_strategy=next(iter(strategies.values())),
        )


def _weight_strategy(args: Mapping[str, Any], what: str) -> str:
    got = _parse_quant_args(args, what).strategy
    got = getattr(got, "value", got)
    if got not in WEIGHT_STRATEGIES:
        raise Sparse24ConfigError(
            f"quantization_config['{what}']: strategy={got!r} is not supported; sparse24 loads weight "
            f"scales per {' or '.join(repr(s) for s in WEIGHT_STRATEGIES)}"
        )
    return got


def _refuse_4bit_format(cfg: Mapping[str, Any], groups: Mapping[str, Any]) -> None:
    formats = [cfg.get("format")] + [g.get("format") for g in groups.values() if isinstance(g, Mapping)]
    if "marlin-24" in formats:
        raise Sparse24ConfigError(
            "quantization_config.format='marlin-24' (4-bit weights with 16-bit activations, W4A16, "
            "packed for the Marlin 2:4 kernel) is not supported: sparse24 runs int8 or fp8 W8A8 and its own "
            "w4a8 (int4 weights with int8 activations), no W4A16 scheme; serve the unquantized 2:4 model "
            "with --quantization sparse24 instead"
        )


def _require_mapping(value: Any, what: str) -> None:
    if not isinstance(value, Mapping):
        raise Sparse24ConfigError(f"{what} must be a JSON object, got {type(value).__name__}")


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise Sparse24ConfigError(f"quantization_config.{what} must be a list of module names or 're:' regexes")
    for i, v in enumerate(value):
        if v.startswith("re:"):
            try:
                _compile(v[3:])
            except Sparse24ConfigError as e:
                raise Sparse24ConfigError(f"quantization_config.{what}[{i}]: {e}") from e
    return list(value)
