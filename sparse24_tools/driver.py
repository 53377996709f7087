"""Sequential layer-by-layer calibration: the model walking around :mod:`sparse24_tools.group`.

Only the current decoder layer, its Hessians and the calibration activations live on
``device``; the rest of the model stays on CPU. Inside a layer the linears are compressed in
block order (q/k/v, o, gate/up, down), re-running the layer up to the next group's input so
every group is calibrated on the outputs of the already-compressed ones (and, with
on per-token fake-quantized inputs, as the plugin computes). The compressed
layer's outputs are the next layer's inputs.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_sparse24.quant import fake_quant_per_token
from vllm_sparse24.schema import K_MULTIPLE, Sparse24Scheme

from .architectures import architecture_of
from .compress_options import CompressError, CompressOptions
from .group import LinearResult, compress_group
from .model_walk import capture_layer0_inputs, decoder_layers, layer_forward
from .stats import HessianAccumulator

log = logging.getLogger(__name__)


def parse_dense_layers(values: Sequence[str]) -> tuple[tuple[str, ...], float | None]:
    """CLI values -> (regex patterns, auto percent or None). 'auto:P' with 0 <= P <= 100."""
    patterns: list[str] = []
    auto: float | None = None
    for v in values:
        for item in filter(None, (s.strip() for s in v.split(","))):
            if item.startswith("auto:"):
                try:
                    auto = float(item[5:])
                except ValueError as e:
                    raise CompressError(f"--dense-layers {item!r}: expected auto:P with P a number") from e
                if not 0 <= auto <= 100:
                    raise CompressError(f"--dense-layers {item!r}: P must be within 0..100")
            else:
                try:
                    re.compile(item.removeprefix("re:"))
                except re.error as e:
                    raise CompressError(f"--dense-layers {item!r} is not a valid regex: {e}") from e
                patterns.append(item if item.startswith("re:") else "re:" + item)
    return tuple(patterns), auto


def plan_kinds(groups: Sequence[tuple[str, ...]], scheme: Sparse24Scheme,
               shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """name -> 'sparse' | 'dense' | 'unquantized' for every linear of ``groups`` (the fused groups of
    the decoder layers); fused groups agree, and every sparse linear has K a multiple of K_MULTIPLE."""
    kinds: dict[str, str] = {}
    for group in groups:
        ks = {n: scheme.layer_kind(n) for n in group}
        if len(set(ks.values())) > 1:
            raise CompressError(
                f"fused group {', '.join(group)} would be split across kinds {ks}; vLLM fuses these "
                "linears, so --ignore / --dense-layers must select all of them or none"
            )
        kinds.update(ks)
    bad = [f"{n} (K={shapes[n][1]})" for n, k in kinds.items() if k == "sparse" and shapes[n][1] % K_MULTIPLE]
    if bad:
        raise CompressError(
            f"{len(bad)} linear(s) cannot be stored 2:4 (sparse24 needs K a multiple of {K_MULTIPLE}): "
            f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; keep them dense with --dense-layers"
        )
    return kinds


class _Stop(Exception):
    pass


@torch.no_grad()
def compress_layer(
    layer: nn.Module,
    prefix: str,
    groups: Sequence[tuple[str, ...]],
    inps: torch.Tensor,
    kwargs: dict[str, Any],
    kinds: dict[str, str],
    opts: CompressOptions,
    pbar: tqdm | None = None,
) -> tuple[torch.Tensor, list[LinearResult]]:
    """Compress one decoder layer in place (weights become dequantized int8 / fp8 values) and return
    (its outputs on the calibration inputs, per-linear results). ``groups``: its linears in block
    order, grouped by shared input (the architecture's ``linear_groups``); ``kwargs``: what the
    model passes this layer. ``layer`` must be on the device of ``inps``."""
    results: list[LinearResult] = []
    grid = opts.grid
    hooks = []
    try:
        for group in groups:
            full = [f"{prefix}.{n}" for n in group]
            kind = kinds[full[0]]
            if kind == "unquantized":
                continue
            if pbar is not None:
                pbar.set_postfix_str(f"{prefix} {'/'.join(n.rsplit('.', 1)[-1] for n in group)}")
            mods = [layer.get_submodule(n) for n in group]
            acc = HessianAccumulator(mods[0].in_features, device=inps.device)

            def stats_hook(_m, args, acc=acc):
                x = args[0]
                acc.add(fake_quant_per_token(x, grid))
                raise _Stop

            h = mods[0].register_forward_pre_hook(stats_hook)
            try:
                for b in range(0, inps.shape[0], opts.batch_size):
                    try:
                        layer_forward(layer, inps[b : b + opts.batch_size], kwargs)
                    except _Stop:
                        pass
            finally:
                h.remove()
            res = compress_group([(f, m.weight) for f, m in zip(full, mods, strict=True)], acc.h, kind=kind,
                                 grid=grid, opts=opts, weight_grid=opts.weight_grid)
            del acc
            for m, r in zip(mods, res, strict=True):
                m.weight.data.copy_(r.dequantized().to(m.weight.device, m.weight.dtype))
                hooks.append(m.register_forward_pre_hook(lambda _m, a: (fake_quant_per_token(a[0], grid),)))
            results += res
        outs = torch.empty_like(inps)
        for b in range(0, inps.shape[0], opts.batch_size):
            outs[b : b + opts.batch_size] = layer_forward(layer, inps[b : b + opts.batch_size], kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outs, results


@torch.no_grad()
def sequential_compress(
    model: nn.Module, samples: Sequence[torch.Tensor], kinds: dict[str, str], opts: CompressOptions
) -> dict[str, LinearResult]:
    """One pass over all decoder layers; the model's linears are replaced in place by their
    dequantized compressed values. Returns name -> result."""
    device = torch.device(opts.device)
    arch = architecture_of(model.config)
    layers = decoder_layers(model)
    t0 = time.perf_counter()
    inps, layer_kwargs = capture_layer0_inputs(model, samples, device)
    log.info("captured layer-0 inputs %s in %.1fs", tuple(inps.shape), time.perf_counter() - t0)
    results: dict[str, LinearResult] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pbar = tqdm(range(len(layers)), desc=f"{opts.method} {opts.scheme}", unit="layer", disable=not opts.progress)
    for i in pbar:
        layer = layers[i]
        layer.to(device)
        try:
            outs, res = compress_layer(layer, arch.layer_prefix(i), arch.linear_groups, inps, layer_kwargs[i], kinds,
                                       opts, pbar)
        finally:
            layer.to("cpu")
        for r in res:
            results[r.name] = r
        errs = [r.err_after for r in res]
        log.info("layer %d: %d linears, mean rel error %.4f", i, len(res), sum(errs) / max(len(errs), 1))
        inps = outs
        del outs
    if device.type == "cuda":
        log.info("peak device memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
    return results


def pick_auto_dense(sensitivity: dict[str, float], groups: Sequence[tuple[str, ...]], percent: float) -> list[str]:
    """The most sensitive whole fused groups (by the worst relative output error of their
    members, name -> error) until ``percent`` % of all quantized linears are dense."""
    groups = [g for g in groups if all(n in sensitivity for n in g)]
    total = sum(len(g) for g in groups)
    budget = int(math.floor(total * percent / 100 + 1e-9))
    ranked = sorted(groups, key=lambda g: max(sensitivity[n] for n in g), reverse=True)
    chosen: list[str] = []
    for g in ranked:
        if len(chosen) + len(g) <= budget:
            chosen += g
    return chosen
