"""``python -m sparse24_tools compress``: load, calibrate, compress, write (orchestration only)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from vllm_sparse24.quant import GRIDS
from vllm_sparse24.schema import Sparse24Scheme

from .calib import calibration_size, token_samples
from .driver import (
    CompressError,
    CompressOptions,
    parse_dense_layers,
    pick_auto_dense,
    plan_kinds,
    sequential_compress,
)
from .group import LinearResult, compress_group
from .lm_head import quantized_lm_head, without_lm_head
from .model_walk import decoder_layers, fused_groups, linear_names, load_model
from .provenance import machine_info, utc_now

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORTS = ("sparse24", "dense-w8a8")
OUTPUT_ERRORS = "relative output error ||WX - W'X|| / ||WX|| on the calibration inputs"
WEIGHT_ERRORS = ("relative weight error ||W - W'|| / ||W|| (no calibration data, so the output errors "
                 "were not measured; pass --calib to measure them)")
RTN_ERRORS = "relative weight error ||W - W'|| / ||W|| (dense W8A8 is round-to-nearest: no calibration data)"


def _ignore_patterns(values: tuple[str, ...]) -> tuple[str, ...]:
    # exact names stay exact ("lm_head"); anything with regex characters becomes "re:"
    return tuple(v if v.startswith("re:") or v.replace("_", "").replace(".", "").isalnum() else "re:" + v
                 for v in values)


def _totals(results: dict[str, LinearResult]) -> dict[str, Any]:
    n = max(len(results), 1)
    return {
        "linears": len(results),
        "sparse": sum(r.kind == "sparse" for r in results.values()),
        "dense": sum(r.kind == "dense" for r in results.values()),
        "mean_rel_error_before": sum(r.err_before for r in results.values()) / n,
        "mean_rel_error_after": sum(r.err_after for r in results.values()) / n,
        "algorithm_seconds": sum(r.seconds for r in results.values()),
    }


def compress(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "sparsegpt",
    scheme: str = "int8",
    joint: bool = True,
    calib: str | os.PathLike | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    dampening: float = 0.01,
    block_size: int = 128,
    ignore: tuple[str, ...] = ("lm_head",),
    dense_layers: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    export: str = "sparse24",
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    sensitivity: dict[str, float] | None = None,
    quantize_lm_head: bool = False,
) -> dict[str, Any]:
    """Compress a dense model into ``out``; returns the report (also written as
    ``compress_report.json``). ``model``/``tokenizer`` may be passed pre-loaded (they are
    modified in place). ``sensitivity`` (name -> relative output error of an all-sparse run with
    the same options, e.g. its report's ``rel_error_after``) lets ``auto:P`` skip its probe pass.

    ``scheme``: "int8" (int8 weights and activations) or "fp8" (float8_e4m3fn weights, e4m3
    activations); weights per output channel, activations dynamic per token, in both.
    ``quantize_lm_head``: lm_head too, dense on the scheme's grid (sparse24 export only).

    Wanda and SparseGPT need ``calib``. Magnitude runs without it (no calibration forwards; the
    report then holds relative weight errors and says that output errors were not measured); with
    it, magnitude also measures the output errors. ``nsamples`` / ``seqlen`` default by device
    (:func:`sparse24_tools.calib.calibration_size`)."""
    from .export import write_dense_w8a8, write_sparse24

    t_start = time.perf_counter()
    if export not in EXPORTS:
        raise CompressError(f"unknown --export {export!r}; choose from {EXPORTS}")
    if dtype not in DTYPES:
        raise CompressError(f"unknown --dtype {dtype!r}; choose from {tuple(DTYPES)}")
    if scheme not in GRIDS:
        raise CompressError(f"unknown --scheme {scheme!r}; choose from {tuple(GRIDS)}")
    if quantize_lm_head and export != "sparse24":
        raise CompressError(f"--quantize-lm-head writes the sparse24 format; --export {export} leaves lm_head float")
    grid = GRIDS[scheme]
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    torch.manual_seed(seed)
    tdtype = DTYPES[dtype]
    if model is None:
        model, tokenizer = load_model(model_path, tdtype)
    layers = decoder_layers(model)
    num_layers = len(layers)
    ignore = _ignore_patterns(without_lm_head(tuple(ignore)) if quantize_lm_head else tuple(ignore))
    patterns, auto = parse_dense_layers(dense_layers)
    uses_calib = calib is not None and export == "sparse24"
    if uses_calib:
        nsamples, seqlen = calibration_size(device, nsamples, seqlen)
    report: dict[str, Any] = {
        "model": str(model_path), "method": method, "scheme": scheme, "joint": joint, "export": export,
        "calib": str(calib) if uses_calib else None, "nsamples": nsamples if uses_calib else None,
        "seqlen": seqlen if uses_calib else None,
        "errors": OUTPUT_ERRORS if uses_calib else WEIGHT_ERRORS if export == "sparse24" else RTN_ERRORS,
        "dampening": dampening, "block_size": block_size, "ignore": list(ignore),
        "dense_layers": list(dense_layers), "device": device, "dtype": dtype, "seed": seed,
        "date": utc_now(), "machine": machine_info(),
    }
    names = linear_names(num_layers)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}

    if export == "dense-w8a8":
        results: dict[str, LinearResult] = {}
        everything_dense = Sparse24Scheme(ignore=ignore, dense_layers=("re:.*",))
        for n in names:
            if everything_dense.layer_kind(n) == "unquantized":
                continue
            w = model.get_submodule(n).weight
            (r,) = compress_group([(n, w)], None, kind="dense", method="magnitude", grid=grid)  # RTN
            results[n] = r
        report["linears"] = {n: r.report() for n, r in results.items()}
        report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
        write_dense_w8a8(out, model, tokenizer, results, ignore, report, tdtype, overwrite, grid=grid)
        return report

    plan = Sparse24Scheme(ignore=ignore, dense_layers=patterns, quant=scheme, quantize_lm_head=quantize_lm_head)
    kinds = plan_kinds(num_layers, plan, shapes)
    if calib is None:
        if method != "magnitude":
            raise CompressError(f"--method {method} needs calibration data: pass --calib (a text file, a folder "
                                "of text files or a HF data set name); only --method magnitude runs without")
        if auto is not None:
            raise CompressError("--dense-layers auto:P ranks the linears by their output error on calibration "
                                "data: pass --calib, or name the dense layers")
        results = {}
        for group in fused_groups(num_layers):
            if kinds[group[0]] == "unquantized":
                continue
            weights = [(n, model.get_submodule(n).weight) for n in group]
            results.update((r.name, r) for r in compress_group(weights, None, kind=kinds[group[0]], method=method,
                                                                grid=grid))
        report["linears"] = {n: r.report() for n, r in results.items()}
        report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
        results |= quantized_lm_head(model, plan, report)
        write_sparse24(out, model, tokenizer, results, plan, report, tdtype, overwrite)
        log.info("compressed without calibration in %.1fs: %s", report["totals"]["seconds"], report["totals"])
        return report
    opts = CompressOptions(method=method, joint=joint, dampening=dampening, block_size=block_size,
                           ignore=ignore, dense_layers=patterns, dense_auto_percent=auto,
                           device=device, batch_size=batch_size, progress=progress, grid=grid)
    samples = token_samples(tokenizer, calib, nsamples, seqlen, seed)
    log.info("%d calibration samples x %d tokens from %s", len(samples), seqlen, calib)

    if auto:
        t0 = time.perf_counter()
        if sensitivity is None:
            original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
            probe = sequential_compress(model, samples, kinds, opts)
            sensitivity = {n: r.err_after for n, r in probe.items()}
            with torch.no_grad():
                for n, w in original.items():
                    model.get_submodule(n).weight.copy_(w)
            del original, probe
            source = "probe pass (all sparse, same options)"
        else:
            source = "given (all-sparse run with the same options)"
        chosen = pick_auto_dense(sensitivity, num_layers, auto)
        report["auto_dense"] = {"percent": auto, "chosen": chosen, "source": source,
                                "probe_seconds": time.perf_counter() - t0,
                                "sensitivity": {n: sensitivity[n] for n in chosen}}
        log.info("auto:%g keeps %d linears dense: %s", auto, len(chosen), ", ".join(chosen))
        plan = Sparse24Scheme(ignore=ignore, dense_layers=patterns + tuple(chosen), quant=scheme,
                              quantize_lm_head=quantize_lm_head)
        kinds = plan_kinds(num_layers, plan, shapes)
    results = sequential_compress(model, samples, kinds, opts)
    report["linears"] = {n: r.report() for n, r in results.items()}
    report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
    results |= quantized_lm_head(model, plan, report)
    write_sparse24(out, model, tokenizer, results, plan, report, tdtype, overwrite)
    log.info("compressed in %.1fs: %s", report["totals"]["seconds"], report["totals"])
    return report
