"""Data-parallel meta-training on ``torch.distributed`` (launched with ``torchrun``).

The meta-batch is embarrassingly parallel over tasks. Every rank draws the *same* full batch
from the same seeded generator (sampling is cheap) and keeps its contiguous share of the tasks,
so the union of the ranks' tasks is exactly the batch a single process would draw. Each rank
accumulates the meta-gradient of its share (a mean over its n_r tasks); one all-reduce of
Σ_r (n_r/n)·g_r gives every rank the gradient of the mean over all n tasks, and every rank then
takes the same optimizer step, so parameters stay identical without being broadcast. Rank 0
alone logs, validates, plots and writes checkpoints.

Devices: every process computes on the device :func:`resolve_device` gives it (under ``torchrun``
with CUDA, its local rank's GPU) and the process group uses NCCL for CUDA devices, gloo for the
CPU.

Failures: when a process of the job dies (killed, out of memory), the others' next collective
fails at once (its connection is reset) with :class:`PeerLostError`, and ``torchrun`` stops the
remaining processes; the run directory keeps its last complete checkpoint, from which
``--resume`` continues (with any number of processes). A process that hangs without dying is
noticed only when a collective times out (torch's default: 30 minutes; validation by rank 0
alone, while the others wait, may legitimately take minutes).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError, MetagradError


class PeerLostError(MetagradError):
    """A collective failed: another process of the job died or cannot be reached."""


def _collective(collective: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``collective(*args, **kwargs)`` (a ``torch.distributed`` one); its failure, which means a
    lost peer, as a :class:`PeerLostError` that says what to do."""
    try:
        collective(*args, **kwargs)
    except RuntimeError as exc:  # gloo: RuntimeError; NCCL and the store: DistError subclasses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(f"another process of this torchrun job died or cannot be reached "
                            f"({first[:200]}); the run directory keeps its last checkpoint: "
                            "continue with --resume") from None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device a setting names: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``,
    ``"cuda"`` (under ``torchrun``: the GPU of this process's ``LOCAL_RANK``) or ``"cuda:N"``;
    a clear error when it is not available here."""
    text = str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asks for CUDA, but CUDA is not available here "
                          f"(torch {torch.__version__}"
                          f"{' is a CPU build' if torch.version.cuda is None else ', no GPU seen'}"
                          "); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else int(
        os.environ.get("LOCAL_RANK", "0")) % count
    if index >= count:
        raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s), "
                          f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device | str = "cpu") -> Distributed:
        """Joins the process group that ``torchrun`` describes in the environment (NCCL when
        this process computes on a CUDA ``device``, gloo on the CPU); a plain single process
        otherwise."""
        device = torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # torch._dynamo, when first imported after the group exists (torch.func and the
            # optimizers import it lazily), keeps references to the default group; the group
            # then outlives destroy_process_group (close), so do its worker threads, and one of
            # them releasing its last work during interpreter teardown aborts the process
            importlib.import_module("torch._dynamo")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def part(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` tasks (sizes differ by at most one)."""
        if n < self.world_size:
            raise ConfigError(f"meta_batch={n} is smaller than the {self.world_size} processes; "
                              "give every process at least one task")
        return slice((n * self.rank) // self.world_size, (n * (self.rank + 1)) // self.world_size)

    def shard(self, batch: TaskBatch) -> TaskBatch:
        """This rank's share of the tasks of ``batch`` (:meth:`part`)."""
        return batch if self.world_size == 1 else batch[self.part(batch.num_tasks)]

    def share(self, batch: TaskBatch) -> float:
        """n_r / n: this rank's weight in the mean over all tasks."""
        return self.shard(batch).num_tasks / batch.num_tasks

    def all_reduce(self, modules: Iterable[nn.Module], weight: float, extras: Tensor) -> Tensor:
        """Replaces each gradient by Σ_r weight_r·grad_r (one all-reduce for all of them) and
        returns Σ_r weight_r·extras_r (e.g. losses) likewise."""
        if self.world_size == 1:
            return extras
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extras.reshape(-1).to(
            grads[0].dtype if grads else extras.dtype)]) * weight
        _collective(dist.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:].to(extras.dtype).view_as(extras)

    def reduce(self, tensor: Tensor, weight: float) -> Tensor:
        """Σ_r weight_r·tensor_r, the same on every rank (e.g. a mean over all tasks from each
        rank's mean over its n_r tasks, weight n_r/n)."""
        if self.world_size == 1:
            return tensor
        out = tensor.detach() * weight
        _collective(dist.all_reduce, out)
        return out

    def in_sync(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is identical on every rank (e.g. the parameters, which every rank
        updates by itself)."""
        if self.world_size == 1:
            return True
        high, low = tensor.detach().clone(), tensor.detach().clone()
        _collective(dist.all_reduce, high, op=dist.ReduceOp.MAX)
        _collective(dist.all_reduce, low, op=dist.ReduceOp.MIN)
        return bool(torch.equal(high, low))

    def maximum(self, value: float) -> float:
        """The largest ``value`` of all ranks, on every rank (e.g. a time measured by each, so
        that all decide alike on it)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (so that all ranks stop together)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            _collective(dist.barrier)

    def close(self) -> None:
        """Leaves the process group (every rank, after its last collective): its worker threads
        end here, while the interpreter is alive."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
