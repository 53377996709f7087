"""Options of ``compress`` (and the flags of ``vllm-sparse24 compress`` / ``compare``: one field,
one flag). No torch import: the command line is built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .options import option
from .prune import METHODS

SCHEMES = ("int8", "fp8", "w4a8")  # vllm_sparse24.quant.SCHEME_GRIDS
EXPORTS = ("sparse24", "dense-w8a8")
DTYPES = ("float32", "bfloat16", "float16")
# Default calibration size (samples x tokens) per device. GPU: SparseGPT's 128 x 2048. CPU: a size
# a 2-core machine finishes in minutes: SparseGPT-joint on SmolLM2-135M (30 layers) with 32 x 512
# took 4.6 min on a 2-core CPU, 64 x 512 8.7 min, with no perplexity gain (docs/results.md).
DEFAULT_SIZE = {"cuda": (128, 2048), "cpu": (32, 512)}


class CompressError(ValueError):
    """The requested compression cannot be done (names the layer and the reason)."""


def _method_help() -> str:
    listed = " | ".join(f"{m.name}: {m.help} [" + (f"reads the {m.stats.value} of its inputs: needs --calib]"
                                                   if m.needs_calibration else "no calibration data]")
                        for m in METHODS.values())
    return f"2:4 pruning method. {listed}"


def calibration_size(device: str | None, nsamples: int | None = None, seqlen: int | None = None) -> tuple[int, int]:
    """(nsamples, seqlen): the given values, else the default for ``device``'s type."""
    default = DEFAULT_SIZE["cuda" if str(device).startswith("cuda") else "cpu"]
    return (default[0] if nsamples is None else nsamples), (default[1] if seqlen is None else seqlen)


@dataclass
class CompressOptions:
    method: str = option("sparsegpt", _method_help, choices=lambda: METHODS)
    scheme: str = option("int8", "quantization: int8 (int8 weights per channel, int8 activations per token), "
                         "fp8 (float8_e4m3fn weights per channel with scale absmax/448, e4m3 activations per "
                         "token; runs on Hopper GPUs in bfloat16 models) or w4a8 (2:4 weights int4 with a float "
                         "scale per channel and an integer scale per group of 128 along K, int8 activations per "
                         "token; dense layers int8)", choices=SCHEMES)
    joint: bool = option(True, "sparsegpt: round kept weights to the scheme's grid (int8, e4m3 or w4a8's int4) "
                         "inside the OBS loop")
    export: str = option("sparse24", "sparse24: the plugin's 2:4 + W8A8 checkpoint; dense-w8a8: no pruning, a "
                         "compressed-tensors W8A8 checkpoint (int8, or fp8 with --scheme fp8) that stock vLLM loads "
                         "(for comparison)", choices=EXPORTS)
    dense_layers: tuple[str, ...] = option(
        (), "linears kept dense W8A8 instead of 2:4: regexes matched (re.match) against HF module names, e.g. "
        "'model\\.layers\\.0\\.mlp\\..*'; or auto:P to keep the P% most sensitive linears dense (needs --calib). "
        "Fused groups (q/k/v, gate/up) must agree", metavar="REGEX")
    quantize_lm_head: bool = option(
        False, "also quantize lm_head, dense W8A8 on the scheme's grid (tied embeddings stay float for the gather; "
        "the plugin quantizes a copy for the logits): less weight to read per decode step, some accuracy cost "
        "(see the README)")
    calib: str | None = option(
        None, "calibration text: a .txt file, a folder of text files, or a Hugging Face data set name (needs the "
        "`datasets` package and network). Required by the methods that need input statistics and by "
        "--dense-layers auto:P; magnitude runs without it and then reports weight errors instead of output errors",
        metavar="SOURCE")
    nsamples: int | None = option(
        None, f"calibration windows (default {DEFAULT_SIZE['cuda'][0]} on CUDA, {DEFAULT_SIZE['cpu'][0]} on CPU: "
        "SparseGPT on a 135M model then takes about 5 minutes on a 2-core CPU)")
    seqlen: int | None = option(None, f"tokens per calibration window (default {DEFAULT_SIZE['cuda'][1]} on CUDA, "
                                f"{DEFAULT_SIZE['cpu'][1]} on CPU)")
    dampening: float = option(0.01, "sparsegpt: Hessian dampening, a fraction of its mean diagonal")
    block_size: int = option(128, "sparsegpt: columns per lazy-update block, a multiple of 4")
    ignore: tuple[str, ...] = option(("lm_head",), "linears left unquantized, by module name or regex", metavar="NAME")
    device: str | None = option(None, "where the layer being compressed and its calibration activations live "
                                "(default: cuda if available, else cpu); the rest of the model stays on CPU")
    dtype: str = option("float32", "dtype the model is loaded and calibrated in, and of the unquantized tensors "
                        "written", choices=DTYPES)
    seed: int = option(0, "seed of the calibration window choice")
    batch_size: int = option(8, "calibration windows per layer forward (lower it if memory runs out)")
    overwrite: bool = option(False, "replace --out if it exists")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        if self.calib is not None:  # a path given as a Path is kept as the report writes it
            self.calib = str(self.calib)
        self.dense_layers, self.ignore = tuple(self.dense_layers), tuple(self.ignore)

    @property
    def grid(self) -> Any:
        """The scheme's 8-bit grid (``vllm_sparse24.quant.Grid``): activations, dense layers (w4a8: int8)."""
        from vllm_sparse24.quant import grid_of

        return grid_of(self.scheme)

    @property
    def weight_grid(self) -> Any:
        """The grid of the 2:4 layers' weights: ``grid``, or w4a8's ``Int4GroupGrid``."""
        from vllm_sparse24.quant import weight_grid_of

        return weight_grid_of(self.scheme)

    def validate(self) -> None:
        """CompressError naming the option and its choices for a value compress cannot use."""
        for name, value, choices in (("--method", self.method, tuple(METHODS)), ("--scheme", self.scheme, SCHEMES),
                                     ("--export", self.export, EXPORTS), ("--dtype", self.dtype, DTYPES)):
            if value not in choices:
                raise CompressError(f"unknown {name} {value!r}; choose from {choices}")
        if self.scheme not in ("int8", "fp8") and self.export != "sparse24":
            raise CompressError(f"--export {self.export} writes 8-bit layers (compressed-tensors W8A8); --scheme "
                                f"{self.scheme} is for the sparse24 export: choose --scheme int8 or fp8")
        if self.quantize_lm_head and self.export != "sparse24":
            raise CompressError(f"--quantize-lm-head writes the sparse24 format; --export {self.export} leaves "
                                "lm_head float")


def comparison_runs() -> dict[str, dict[str, Any] | None]:
    """The runs of ``compare``: run name -> the options it changes (None: the dense model itself).
    Dense W8A8, every registered pruning method, sparsegpt without and with its joint rounding, and
    the latter with the 10% most sensitive linears dense."""
    runs: dict[str, dict[str, Any] | None] = {"dense": None, "dense-w8a8": {"export": "dense-w8a8", "method": "magnitude"}}
    runs |= {name: {"method": name} for name in METHODS}
    if "sparsegpt" in METHODS:
        runs |= {"sparsegpt": {"method": "sparsegpt", "joint": False},
                 "sparsegpt-joint": {"method": "sparsegpt", "joint": True},
                 "sparsegpt-joint-auto10": {"method": "sparsegpt", "joint": True, "dense_layers": ("auto:10",)}}
    return runs
