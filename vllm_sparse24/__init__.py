"""vllm-sparse24: serve 2:4 structured-sparse W8A8 models in vLLM.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in
every process it starts (API server, engine core, workers).
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``sparse24`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from . import config  # noqa: F401  (the import registers Sparse24Config)

    _registered = True
