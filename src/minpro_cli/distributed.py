"""Training across processes under torchrun: one code path for 1 and N ranks.

Every rank holds the whole round's rollouts (group advantages need whole groups) and trains
on its contiguous share of each minibatch. Every micro-batch's loss, on every rank, is
normalised by the counts of the whole minibatch (`objectives.minibatch_counts`), so the
losses of all ranks sum to the loss one process computes on the whole minibatch. DDP and
FSDP2 average gradients over ranks, so each rank's loss is multiplied by the world size
before backward: N ranks take the optimizer step one process takes, up to float summation
order. On one rank nothing is wrapped and every factor is exactly 1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import chain
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from minpro_cli.modeling import decoder_blocks
from minpro_cli.weightsync import whole

T = TypeVar("T")
Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes (size 1: no process group)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def shard(self, items: list[T]) -> list[T]:
        """This rank's contiguous share; shares differ in length by at most one."""
        return self.shard_of(items, self.rank)

    def shard_of(self, items: list[T], rank: int) -> list[T]:
        """Rank `rank`'s share: every rank can tell how much work every other rank has."""
        n = len(items)
        return items[rank * n // self.size : (rank + 1) * n // self.size]

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's JSON-serialisable list, concatenated in rank order, on every rank.

        JSON, not `all_gather_object`: that pickles, and rows carry user data."""
        if self.size == 1:
            return items
        payload = torch.frombuffer(bytearray(json.dumps(items).encode()), dtype=torch.uint8).to(self.device)
        lengths = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([payload.numel()], device=self.device))
        width = int(max(n.item() for n in lengths))
        buffers = [torch.zeros(width, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
        dist.all_gather(buffers, torch.nn.functional.pad(payload, (0, width - payload.numel())))
        parts = [json.loads(bytes(b[: int(n.item())].tolist())) for b, n in zip(buffers, lengths)]
        return list(chain(*parts))

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()


def init_world(backend: str, timeout_s: float) -> World:
    """The process group torchrun asked for (WORLD_SIZE > 1), or the single-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        # free finished collectives' tensors while the interpreter is whole: Gloo work objects that
        # outlive it can abort the process at exit (pytorch/pytorch#179291; seen once in CI)
        gc.collect()
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, strategy: Strategy, world: World) -> torch.nn.Module:
    """The module forward and backward go through: the model itself on one rank; on N, DDP,
    or FSDP2 with each transformer block (the model's `_no_split_modules`) its own unit."""
    if world.size == 1:
        return model
    if strategy == "ddp":
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def is_sharded(module: torch.nn.Module, world: World) -> bool:
    """FSDP2: no rank holds whole parameters, so a rank alone cannot run the model."""
    return world.size > 1 and not isinstance(module, torch.nn.parallel.DistributedDataParallel)


def full_state_dict(module: torch.nn.Module, world: World, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Whole, detached CPU copies of every weight (in `dtype`, cast as each is copied), on every
    rank (collective under FSDP2)."""
    if not is_sharded(module, world):
        return {k: v.detach().to("cpu", dtype, copy=True) for k, v in unwrap(module).state_dict().items()}
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().to("cpu", dtype, copy=True) for k, v in weights.items()}


@dataclass(frozen=True)
class HeldShard:
    """One rank's shard of an FSDP2 parameter, copied to the CPU and kept (a staleness
    snapshot): `full_tensor()` gathers the whole tensor again, a collective every rank joins."""

    local: torch.Tensor
    mesh: Any  # the DeviceMesh
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def full_tensor(self) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        device = self.mesh.device_type
        shard = DTensor.from_local(self.local.to(device), self.mesh, self.placements, shape=self.shape, stride=self.stride)
        return shard.full_tensor().cpu()


def snapshot_state(module: torch.nn.Module, world: World, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A copy of the weights to keep, in `dtype`: under FSDP2 only this rank's shards
    (`HeldShard`s, 1/N of the whole), else whole CPU copies. `whole_state` makes it whole."""
    if not is_sharded(module, world):
        return full_state_dict(module, world, dtype)
    held: dict[str, Any] = {}
    for name, tensor in module.state_dict().items():
        local = tensor.to_local().detach().to("cpu", dtype, copy=True)
        held[name] = HeldShard(local, tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride())
    return held


def whole_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a state whole (shards gathered: under FSDP2 every rank calls it alike)."""
    return {name: whole(tensor) for name, tensor in state.items()}


def gradient_sync(module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP: all-reduce gradients only on the last micro-batch of a step (`no_sync` before it).
    Wrap forward and backward: DDP decides at forward time."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def combine_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """(metrics, weight) pairs → one set: the extremes (`extreme`) by their minimum or maximum,
    the rest the weighted mean; NaN values and zero weights are left out."""
    out: dict[str, float] = {}
    for key in sorted({k for m, _ in parts for k in m}):
        pairs = [(m[key], w) for m, w in parts if key in m and m[key] == m[key] and w > 0]  # skip NaN
        if not pairs:
            out[key] = float("nan")
        elif pick := extreme(key):
            out[key] = pick(v for v, _ in pairs)
        else:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return out


def extreme(key: str) -> Callable[[Iterable[float]], float] | None:
    """How a metric combines over micro-batches, ranks and steps when not by its mean: `*_min`
    and `staleness/newest` by their minimum, `*_max` and `staleness/oldest` by their maximum."""
    if key.endswith(("_min", "/newest")):
        return min
    if key.endswith(("_max", "/oldest")):
        return max
    return None


def reduce_step_metrics(metrics: dict[str, float], weight: float, world: World) -> dict[str, float]:
    """Per-rank step metrics → one set (`combine_metrics` weighted by each rank's trained
    tokens: exact for means; quantiles are approximate)."""
    if world.size == 1:
        return metrics
    return combine_metrics([(m, w) for m, w in world.gather([[metrics, weight]])])


