"""vllm-sparse24: serve 2:4 structured-sparse W8A8 models in vLLM.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in
every process it starts (API server, engine core, workers).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

try:  # the version is written once, in pyproject.toml
    __version__ = _distribution_version("vllm-sparse24")
except PackageNotFoundError:  # imported from a source tree that pip did not install
    __version__ = "0+unknown"

_registered = False


def register() -> None:
    """Register the ``sparse24`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from . import config  # noqa: F401  (the import registers Sparse24Config)

    _registered = True
