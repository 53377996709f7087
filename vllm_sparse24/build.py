"""``python -m vllm_sparse24.build``: compile the CUDA library (see kernels/cuda/build.py)."""

import sys

from .kernels.cuda.build import main

if __name__ == "__main__":
    sys.exit(main())
