"""``vllm-sparse24 compress``: load, calibrate, compress, write (orchestration only)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from vllm_sparse24.schema import Sparse24Scheme

from . import inputs
from .calib import check_source, token_samples
from .compress_options import CompressError, CompressOptions, calibration_size
from .driver import parse_dense_layers, pick_auto_dense, plan_kinds, sequential_compress
from .group import LinearResult, compress_group
from .lm_head import quantized_lm_head, without_lm_head
from .model_walk import fused_groups, load_model
from .provenance import machine_info, utc_now
from .prune import METHODS, method_named

log = logging.getLogger(__name__)

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
    opts: CompressOptions | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    sensitivity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Compress a dense model into ``out`` as ``opts`` say (:class:`CompressOptions`, the flags of
    ``vllm-sparse24 compress``); returns the report (also written as ``compress_report.json``).
    ``model``/``tokenizer`` may be passed pre-loaded (they are modified in place). ``sensitivity``
    (name -> relative output error of an all-sparse run with the same options, e.g. its report's
    ``rel_error_after``) lets ``auto:P`` skip its probe pass.

    Methods that need input statistics (``sparse24_tools.prune``) need ``opts.calib``; the others
    run without it (no calibration forwards; the report then holds relative weight errors and says
    that output errors were not measured), and with it also measure the output errors.
    ``nsamples`` / ``seqlen`` default by device (:func:`calibration_size`)."""
    from .export import write_dense_w8a8, write_sparse24

    t_start = time.perf_counter()
    opts = opts or CompressOptions()
    if opts.device is None:
        opts = replace(opts, device="cuda" if torch.cuda.is_available() else "cpu")
    opts.validate()
    grid, method = opts.grid, method_named(opts.method)
    out = Path(out)
    # every input path before the model loads
    inputs.new_output(out, "--out", opts.overwrite)
    if model is None:
        inputs.model_source(model_path, "--model")
    if opts.calib is not None:
        check_source(opts.calib)
    torch.manual_seed(opts.seed)
    tdtype = getattr(torch, opts.dtype)
    if model is None:
        model, tokenizer = load_model(model_path, tdtype)
    groups = fused_groups(model)
    ignore = _ignore_patterns(without_lm_head(opts.ignore) if opts.quantize_lm_head else opts.ignore)
    patterns, auto = parse_dense_layers(opts.dense_layers)
    uses_calib = opts.calib is not None and opts.export == "sparse24"
    if uses_calib:
        nsamples, seqlen = calibration_size(opts.device, opts.nsamples, opts.seqlen)
        opts = replace(opts, nsamples=nsamples, seqlen=seqlen)
    report: dict[str, Any] = {
        "model": str(model_path), **{k: v for k, v in asdict(opts).items() if k not in ("overwrite", "progress")},
        "ignore": list(ignore),
        "errors": OUTPUT_ERRORS if uses_calib else WEIGHT_ERRORS if opts.export == "sparse24" else RTN_ERRORS,
        "date": utc_now(), "machine": machine_info(),
    }
    if not uses_calib:
        report.update(calib=None, nsamples=None, seqlen=None)
    names = [n for g in groups for n in g]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}

    if opts.export == "dense-w8a8":
        results: dict[str, LinearResult] = {}
        everything_dense = Sparse24Scheme(ignore=ignore, dense_layers=("re:.*",))
        for n in names:
            if everything_dense.layer_kind(n) == "unquantized":
                continue
            w = model.get_submodule(n).weight
            (r,) = compress_group([(n, w)], None, kind="dense", grid=grid)  # round to nearest
            results[n] = r
        report["linears"] = {n: r.report() for n, r in results.items()}
        report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
        write_dense_w8a8(out, model, tokenizer, results, ignore, report, tdtype, opts.overwrite, grid=grid)
        return report

    plan = Sparse24Scheme(ignore=ignore, dense_layers=patterns, quant=opts.scheme,
                          quantize_lm_head=opts.quantize_lm_head)
    kinds = plan_kinds(groups, plan, shapes)
    if opts.calib is None:
        if method.needs_calibration:
            without = [m.name for m in METHODS.values() if not m.needs_calibration]
            raise CompressError(f"--method {method.name} needs calibration data ({method.stats.value} of each "
                                "linear's inputs): pass --calib (a text file, a folder of text files or a HF data "
                                f"set name); the methods that run without: {without}")
        if auto is not None:
            raise CompressError("--dense-layers auto:P ranks the linears by their output error on calibration "
                                "data: pass --calib, or name the dense layers")
        results = {}
        for group in groups:
            if kinds[group[0]] == "unquantized":
                continue
            weights = [(n, model.get_submodule(n).weight) for n in group]
            results.update((r.name, r) for r in compress_group(weights, None, kind=kinds[group[0]], grid=grid,
                                                                opts=opts, weight_grid=opts.weight_grid))
        report["linears"] = {n: r.report() for n, r in results.items()}
        report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
        results |= quantized_lm_head(model, plan, report)
        write_sparse24(out, model, tokenizer, results, plan, report, tdtype, opts.overwrite)
        log.info("compressed without calibration in %.1fs: %s", report["totals"]["seconds"], report["totals"])
        return report
    samples = token_samples(tokenizer, opts.calib, opts.nsamples, opts.seqlen, opts.seed)
    log.info("%d calibration samples x %d tokens from %s", len(samples), opts.seqlen, opts.calib)

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
        chosen = pick_auto_dense(sensitivity, groups, auto)
        report["auto_dense"] = {"percent": auto, "chosen": chosen, "source": source,
                                "probe_seconds": time.perf_counter() - t0,
                                "sensitivity": {n: sensitivity[n] for n in chosen}}
        log.info("auto:%g keeps %d linears dense: %s", auto, len(chosen), ", ".join(chosen))
        plan = Sparse24Scheme(ignore=ignore, dense_layers=patterns + tuple(chosen), quant=opts.scheme,
                              quantize_lm_head=opts.quantize_lm_head)
        kinds = plan_kinds(groups, plan, shapes)
    results = sequential_compress(model, samples, kinds, opts)
    report["linears"] = {n: r.report() for n, r in results.items()}
    report["totals"] = _totals(results) | {"seconds": time.perf_counter() - t_start}
    results |= quantized_lm_head(model, plan, report)
    write_sparse24(out, model, tokenizer, results, plan, report, tdtype, opts.overwrite)
    log.info("compressed in %.1fs: %s", report["totals"]["seconds"], report["totals"])
    return report
