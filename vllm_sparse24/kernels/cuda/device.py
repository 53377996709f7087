"""What the CUDA kernels run on: Hopper GPUs (the library holds sm_90a code only), bf16 / fp16 models."""

from __future__ import annotations

import torch

HOPPER = (9, 0)
# model (activation and output) dtypes the CUDA kernels run
MODEL_DTYPES = (torch.bfloat16, torch.float16)


def hopper(device: torch.device) -> tuple[bool, str | None]:
    """(True, None) on a Hopper GPU, else (False, what the device is)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a Hopper GPU (sm90a: H100, H200, GH200), got {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap != HOPPER:
        return False, (f"built for Hopper GPUs (sm90a: H100, H200, GH200); {torch.cuda.get_device_name(device)} "
                       f"is {cap[0]}.{cap[1]}")
    return True, None
