"""Loading a sparse24 checkpoint back into a trainable float model (model walking and file
reading only): int8 / fp8 / w4a8 values dequantized, every sparse linear's 2:4 mask read from its
bitmask (w4a8: and its group scales), and checks that a teacher and a student can be distilled into
one another."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_sparse24 import checkpoint as ckpt
from vllm_sparse24.schema import Sparse24Scheme

from .model_walk import decoder_layers, dequantized_model
from .qat import QATLinear
from .recover_options import RecoverError

log = logging.getLogger(__name__)

# config fields that must agree between teacher and student
_ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")


@dataclass
class Student:
    path: Path
    model: nn.Module  # float32 HF model, quantized linears dequantized
    tokenizer: Any
    scheme: Sparse24Scheme
    kinds: dict[str, str]  # quantized linear prefix -> "sparse" | "dense"
    masks: dict[str, torch.Tensor]  # sparse prefix -> bool [N, K], as read from the bitmask
    scales: dict[str, torch.Tensor]  # quantized prefix -> float32 [N, 1] weight_scale
    float_dtype: torch.dtype  # dtype of the checkpoint's float tensors (re-export uses it)
    compress_report: dict[str, Any] | None = None
    qat: dict[str, QATLinear] = field(default_factory=dict)  # filled by wrap_quantized
    # w4a8 only: sparse prefix -> uint8 [N, ceil(K/128)] weight_group_scale, kept through training
    group_scales: dict[str, torch.Tensor] = field(default_factory=dict)


def load_student(path: str | os.PathLike) -> Student:
    """A sparse24 checkpoint (``vllm-sparse24 compress`` output) as a float model."""
    from transformers import AutoTokenizer

    p = Path(path)
    cfg_path = p / "config.json"
    if not p.is_dir() or not cfg_path.exists():
        raise RecoverError(f"student {p}: not a checkpoint folder (no config.json); pass the output "
                           "of `vllm-sparse24 compress`")
    cfg = json.loads(cfg_path.read_text())
    q = cfg.get("quantization_config")
    if not q:
        raise RecoverError(f"student {cfg_path}: no quantization_config: a dense model, not a 2:4 sparse24 "
                           "checkpoint (make one with `vllm-sparse24 compress`)")
    if Sparse24Scheme.is_legacy_config(q):
        raise RecoverError(f"student {cfg_path}: a legacy compressed-tensors sparse-24-bitmask checkpoint; "
                           "recover reads and writes the sparse24 format (vllm-sparse24 compress)")
    if q.get("quant_method") != "sparse24":
        raise RecoverError(f"student {cfg_path}: quant_method {q.get('quant_method')!r} is not 2:4 sparse24 "
                           f"(format {q.get('format')!r}); recover needs a sparse24 checkpoint")
    try:
        tensors = ckpt.read_checkpoint(p)
    except ckpt.CheckpointError as e:
        raise RecoverError(f"student {p}: {e}") from e
    scheme, linears = tensors.scheme, tensors.linears
    kinds = {prefix: q.kind for prefix, q in linears.items()}
    if "sparse" not in kinds.values():
        raise RecoverError(f"student {p}: no 2:4 sparse linear (all {len(kinds)} quantized linears are dense)")

    cfg.pop("quantization_config")
    model = dequantized_model(p, cfg, tensors)
    floats = [t.dtype for t in tensors.other.values() if t.is_floating_point()]
    float_dtype = floats[-1] if floats else torch.float32
    masks = {prefix: q.mask for prefix, q in linears.items() if q.mask is not None}
    scales = {prefix: q.scale for prefix, q in linears.items()}
    group_scales = {prefix: q.group_scale for prefix, q in linears.items() if q.group_scale is not None}
    if scheme.int4 and set(group_scales) != set(masks):
        missing = sorted(set(masks) - set(group_scales))[:3]
        raise RecoverError(f"student {p}: a w4a8 checkpoint whose 2:4 linears {missing} have no weight_group_scale")
    tok = AutoTokenizer.from_pretrained(str(p))
    report = None
    if (p / "compress_report.json").exists():
        try:
            report = json.loads((p / "compress_report.json").read_text())
        except json.JSONDecodeError:
            log.warning("%s: compress_report.json is not valid JSON; not carried over", p)
    log.info("student %s: %d sparse + %d dense %s linears", p,
             sum(k == "sparse" for k in kinds.values()), sum(k == "dense" for k in kinds.values()), scheme.quant)
    return Student(p, model, tok, scheme, kinds, masks, scales, float_dtype, report, group_scales=group_scales)


def check_compatible(teacher: nn.Module, teacher_tok: Any, teacher_path: str | os.PathLike,
                     student: Student) -> None:
    """Same architecture and vocabulary, or a RecoverError naming both files and the field."""
    tc, sc = teacher.config, student.model.config
    diffs = [f"{f} {getattr(tc, f, None)!r} vs {getattr(sc, f, None)!r}" for f in _ARCH_FIELDS
             if getattr(tc, f, None) != getattr(sc, f, None)]
    if diffs:
        raise RecoverError(f"teacher {teacher_path} and student {student.path} differ in architecture: "
                           + ", ".join(diffs))
    tv, sv = teacher_tok.get_vocab(), student.tokenizer.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv.items()) - set(sv.items()))[:3]
        only_s = sorted(set(sv.items()) - set(tv.items()))[:3]
        raise RecoverError(
            f"teacher {teacher_path} and student {student.path} have different vocabularies "
            f"({len(tv)} vs {len(sv)} tokens; e.g. teacher {only_t} vs student {only_s})"
        )
    for name in ("lm_head",):
        for who, m in (("teacher", teacher), ("student", student.model)):
            if getattr(m.get_submodule(name), "bias", None) is not None:
                raise RecoverError(f"{who}: {name} has a bias; recovery supports bias-free output layers")


def wrap_quantized(student: Student) -> dict[str, QATLinear]:
    """Replace every quantized linear of the student by a :class:`QATLinear` (in place): on the
    scheme's 8-bit grid, and a w4a8 student's 2:4 linears on the int4 grid of their own scales."""
    decoder_layers(student.model)
    out: dict[str, QATLinear] = {}
    for prefix, kind in student.kinds.items():
        parent_name, _, child = prefix.rpartition(".")
        parent = student.model.get_submodule(parent_name)
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise RecoverError(f"student {student.path}: {prefix} is a {type(lin).__name__}, expected nn.Linear")
        mask = student.masks.get(prefix) if kind == "sparse" else None
        group_scale = student.group_scales.get(prefix) if kind == "sparse" else None
        q = QATLinear(lin.weight, mask, lin.bias, prefix, scale_floor=student.scales[prefix],
                      grid=student.scheme.grid, group_scale=group_scale)
        setattr(parent, child, q)
        out[prefix] = q
    student.qat = out
    return out
