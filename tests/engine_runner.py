"""Start a vLLM engine on a checkpoint, write prompt logprobs + a greedy completion as JSON.

Run as a script (vLLM may spawn its workers, so the engine must not start at import time):
    python tests/engine_runner.py MODEL_DIR OUT.json --ids 1,2,3 [--quantization sparse24]
        [--break unpack|kernel] [--compiled]
By default the engine runs as the README's CPU commands run it (eager, no torch.compile) and in this
process: a load and a few tokens then take ~25 s instead of ~2 min. ``--compiled`` runs vLLM's
default (engine core and worker processes, the model under torch.compile), the path a GPU serves.
``--break`` injects a fault, to show the logprob check fails.
"""

from __future__ import annotations

import argparse
import json
import os


def _inject(fault: str) -> None:
    import torch

    from vllm_sparse24 import format as fmt
    from vllm_sparse24.kernels import torch_ref

    if fault == "unpack":  # read the bitmask bits in big instead of little order
        good = fmt.unpack_24

        def bad_unpack(values, bitmask, k, name="weight"):
            shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
            flipped = (((bitmask.unsqueeze(-1) >> shifts) & 1) << (7 - shifts)).sum(-1).to(torch.uint8)
            return good(values, flipped, k, name)

        fmt.unpack_24 = bad_unpack
    elif fault == "kernel":  # one activation scale per tensor instead of per token
        def per_tensor(x, grid):
            scale = (x.abs().amax() / grid.qmax).clamp_min(1e-12).float()
            return grid.codes(x, scale), scale.expand(x.shape[0], 1)

        torch_ref.quantize_per_token = per_tensor
    else:
        raise ValueError(f"unknown fault {fault!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--break", dest="fault", default=None, choices=["unpack", "kernel"])
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--compiled", action="store_true", help="vLLM's default processes and torch.compile")
    args = ap.parse_args()
    if args.compiled and args.fault:
        ap.error("--break injects its fault into this process: it runs without --compiled")
    extra = {}
    if not args.compiled:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra = {"distributed_executor_backend": "uni", "enforce_eager": True}
    if args.fault:
        _inject(args.fault)
    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model, quantization=args.quantization, dtype="float32", max_model_len=512,
        gpu_memory_utilization=0.3, seed=0, **extra,
    )
    ids = [int(i) for i in args.ids.split(",")]
    out = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(max_tokens=args.max_tokens, prompt_logprobs=0, temperature=0.0),
    )[0]
    logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    result = {
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "prompt_logprobs": logprobs,
        "completion_ids": list(out.outputs[0].token_ids),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
