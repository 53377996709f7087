"""Low-overhead launches of Triton kernels.

``kernel[grid](...)`` costs ~15-30 us of host time per call in Triton 3.x (binding, specialization
key, cache lookup). ``FastLauncher`` compiles through the normal path once per key and then calls
the compiled kernel's launcher directly with the same positional arguments (Triton >= 3.3 passes
every bound argument, constexprs included, to ``CompiledKernel.run``). The key must capture all
that the compiled code depends on: the caller passes constexprs and the alignment of pointers
that may be views (``aligned16``); integer arguments the kernel should not specialize on are
declared ``do_not_specialize`` in ``@triton.jit``.
"""

from __future__ import annotations

import torch


def _get_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


# CPU-only torch builds lack this binding; the fallback above is slower but equivalent
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _get_stream)  # noqa: F811


class FastLauncher:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict = {}
        self.enabled = True

    def __call__(self, key, grid, args: tuple, constexprs: dict, options: dict, device_index: int) -> None:
        ent = self.cache.get(key) if self.enabled else None
        if ent is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            if not self.enabled or not hasattr(kernel, "run") or not hasattr(kernel, "packed_metadata"):
                return
            # all arguments in signature order, as JITFunction.run passes them
            names = self.fn.arg_names
            tail = tuple(constexprs[n] for n in names[len(args):])
            self.cache[key] = (kernel, tail)
            return
        kernel, tail = ent
        kernel.run(grid[0], grid[1], grid[2], _get_stream(device_index), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)


def aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0
