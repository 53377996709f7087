"""Functions that ``LLM.apply_model`` runs inside vLLM's worker processes for the benchmarks' results.

vLLM pickles them by reference (module and name), so they live in this importable module, and the
benchmarks put its folder on PYTHONPATH for the engine's processes."""

from __future__ import annotations


def attention_backends(model) -> list[str]:
    """The attention implementations a model runs."""
    return sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl") and hasattr(m, "attn_backend")})


def linear_kernels(model) -> list[str]:
    """The linear layers' quantization methods and, where they have one, the kernel they chose."""
    names = set()
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if method is not None and hasattr(m, "input_size_per_partition"):
            kernel = getattr(method, "kernel", None)
            names.add(type(method).__name__ + (f"/{type(kernel).__name__}" if kernel is not None else ""))
    return sorted(names)
