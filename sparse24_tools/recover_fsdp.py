"""``recover --fsdp``: global-mode recovery across the processes ``torchrun`` starts, with PyTorch
FSDP2 (``torch.distributed.fsdp.fully_shard``). The training loop is ``recover_global``'s; this
module supplies what differs when the work is spread (:class:`Sharded`, in place of
``recover_run.OneProcess``).

* **Sharding**: both models are sharded per decoder layer, the rest (embeddings, final norm,
  output layer) at the root; each process holds 1/W of every tensor, a layer is gathered whole
  only while it computes. The teacher only runs forwards, without gradients.
* **Activation checkpointing**: the student's decoder layers keep only their inputs for the
  backward, which recomputes them (``checkpoint_wrapper``).
* **Precision**: the student is gathered in float32 and computes in bf16 through autocast, as on
  one GPU: its fake-quant must round the float32 master weight to the int8 grid (a bf16 gather
  would round it to 8 significant bits first and move codes at a row's absmax); gradients are
  reduced in float32. On GPUs the frozen teacher is gathered in bf16
  (``MixedPrecisionPolicy(param_dtype=bf16)``): half its traffic and working memory.
* **The 2:4 mask** becomes a frozen parameter sharded like its weight: inside FSDP's unshard the
  fake-quant sees the full weight and mask (the int8 grid is computed per full row), and after
  each optimizer step the mask multiplies the weight's local shard (two DTensors of one layout).
  A w4a8 layer's frozen channel and group scales are buffers, whole in every process.
* **Data**: a step's ``--batch-size`` sequences are split over the processes (process r takes
  r, r + W, ...). The KL is a mean over equal token counts and FSDP averages the gradients;
  SquareHead divides by the batch's ||t||^2 summed over the processes; so a step is the
  one-process step of the same batch. Values for the curve are averaged over the processes;
  decisions that depend on the clock (time budget) are rank 0's, broadcast.
* **State**: ``torch.distributed.checkpoint`` writes the trained parameters and the AdamW state
  sharded (``state_dir/sharded-<step>``), rank 0 writes ``state.pt`` (step, curves, generated
  data) naming that folder last, so an interrupted save leaves the previous state in force.
* **Output**: the trained parameters are gathered on rank 0, loaded into a fresh copy of the
  student, and written by the one-process export (atomically).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .model_walk import decoder_layers
from .recover_options import RecoverError, RecoverOptions
from .recover_run import OneProcess
from .student import Student

log = logging.getLogger(__name__)

# the trained parameters only; loading them back leaves the frozen ones as they are (dcp.load has
# checked that the checkpoint holds every trained one)
_TRAINED = StateDictOptions(ignore_frozen_params=True)
_INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)
_SHARDED_PREFIX = "sharded-"


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


class Sharded(OneProcess):
    """One of the W processes of an FSDP run (see the module docstring)."""

    sharded = True

    def __init__(self, opts: RecoverOptions) -> None:
        if not launched_by_torchrun():
            raise RecoverError("--fsdp: start the run with torchrun (e.g. torchrun --nproc-per-node 2 -m "
                               "sparse24_tools recover --fsdp ...); LOCAL_RANK / WORLD_SIZE are not set")
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        use_cuda = torch.cuda.is_available() and (opts.device is None or opts.device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if opts.batch_size % self.world:
            raise RecoverError(f"--fsdp: --batch-size {opts.batch_size} must be a multiple of the {self.world} "
                               "processes (each takes an equal share of every step)")
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        if self.rank != 0:  # one process speaks: the others log only warnings and show no progress
            logging.getLogger().setLevel(logging.WARNING)
        log.info("FSDP: %d processes, backend %s, %s", self.world, dist.get_backend(), self.device)

    # -- loading and sharding ---------------------------------------------------------------------
    def in_turn(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in one process of this machine at a time (loading the full models on the CPU
        before sharding them: the host holds one full copy at a time, not W)."""
        out = None
        for turn in range(self.local_world):
            if turn == self.local_rank:
                out = fn()
            dist.barrier()
        return out

    def shard(self, student: Student, teacher: nn.Module, bf16_teacher: bool) -> list[nn.Parameter]:
        """Shard both models in place onto this process's device; returns the student's trainable
        (now sharded) parameters."""
        for q in student.qat.values():
            if q.mask is not None:  # sharded like its weight, so the mask multiplies the local shard
                mask = q.mask
                del q._buffers["mask"]
                q.mask = nn.Parameter(mask, requires_grad=False)
        model = student.model
        layers = list(decoder_layers(model))
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda m: any(m is layer for layer in layers))
        exact = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=exact)
        fully_shard(model, mesh=self.mesh, mp_policy=exact)
        frozen = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16_teacher else exact
        for layer in decoder_layers(teacher):
            fully_shard(layer, mesh=self.mesh, mp_policy=frozen)
        fully_shard(teacher, mesh=self.mesh, mp_policy=frozen)
        return [p for p in model.parameters() if p.requires_grad]

    # -- one step's data and its values -------------------------------------------------------------
    def local(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank :: self.world]

    def mean_tensor(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.device, torch.float64, copy=True)
        dist.all_reduce(out)
        return (out / self.world).to(t.device, t.dtype)

    def mean(self, values: list[float]) -> list[float]:
        return self.mean_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def agree(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def gather(self, items: list[Any]) -> list[Any]:
        every: list[list[Any] | None] = [None] * self.world
        dist.all_gather_object(every, items)
        return [item for part in every for item in (part or [])]

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def barrier(self) -> None:
        dist.barrier()

    # -- state ---------------------------------------------------------------------------------------
    def save_state(self, state_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                   write_meta: Callable[[str], None]) -> None:
        """The trained parameters and optimizer state by DCP (every process its shards), then
        ``write_meta(folder name)`` on rank 0 (state.pt, atomically); older folders are removed."""
        name = f"{_SHARDED_PREFIX}{step}"
        dcp.save({"model": get_model_state_dict(model, options=_TRAINED),
                  "optim": get_optimizer_state_dict(model, optimizer, options=_TRAINED)},
                 checkpoint_id=str(state_dir / name))
        dist.barrier()
        if self.rank == 0:
            write_meta(name)
            for old in state_dir.glob(f"{_SHARDED_PREFIX}*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load_params(self, folder: Path, model: nn.Module) -> None:
        sd = {"model": get_model_state_dict(model, options=_TRAINED)}
        dcp.load(sd, checkpoint_id=str(folder))
        set_model_state_dict(model, sd["model"], options=_INTO_TRAINED)

    def load_optimizer(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        sd = {"optim": get_optimizer_state_dict(model, optimizer, options=_TRAINED)}
        dcp.load(sd, checkpoint_id=str(folder))
        set_optimizer_state_dict(model, optimizer, sd["optim"], options=_INTO_TRAINED)

    # -- output ---------------------------------------------------------------------------------------
    def trained_on_rank0(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained parameters, whole, on rank 0's CPU (empty elsewhere)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=opts)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
