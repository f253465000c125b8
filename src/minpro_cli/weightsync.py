"""Weights to a sampler in another process through shared memory, not through the disk.

    trainer: segment.write(named_weights(model, dtype), version, planned_bytes(model, dtype))
    sampler: version, weights = read_weights(segment.table)   # (name, tensor) views, no copy

A segment is one file under /dev/shm holding the whole plain model in the sampler's dtype, and
a JSON table beside it, {"format", "version", "bytes", "tensors": [{name, dtype, shape,
offset, nbytes}]}, replaced atomically once every byte is written. No pickle: the reader maps
the file and views each tensor's bytes. Tensors are written one at a time — under FSDP2 one
`full_tensor()` per parameter, LoRA merged layer by layer, a tied output head written as
`lm_head.weight` too (an engine that reloads in place keeps its own head otherwise) — so no
whole float32 copy ever exists beside the segment. The segment is rewritten in place for each
weights version (the sampler loads it before the next is written).

The segment belongs to the run that made it: unlinked on close or when the run exits, and a
killed run's segments (named after a process that is gone) are removed by the next one made
in that directory. Space is reserved before the first byte is written, so a full /dev/shm is
one error naming the sizes, never a SIGBUS halfway through. At the top this module imports
only torch and the standard library: a sampler's worker in another environment (vLLM's) loads
it by path.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "minpro-weights/1"
PREFIX = "minpro-weights-"
ALIGN = 64  # every tensor starts on a cache line
Weights = Iterator[tuple[str, torch.Tensor]]


def shm_directory() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter whole: FSDP2's DTensor shards gathered (a collective every rank joins)."""
    full_tensor: Callable[[], torch.Tensor] | None = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def named_weights(model: torch.nn.Module, dtype: torch.dtype, adapters: Any = None) -> Weights:
    """The plain model's weights one at a time, in `dtype`, on the CPU, in `state_dict` order:
    a tied head appears under both names, LoRA adapters (`lora.LoraAdapters`) come merged
    into their layers. Under FSDP2 every rank must iterate (each tensor is gathered)."""
    state = model.state_dict()  # references to the parameters (DTensors under FSDP2), no copies
    items = adapters.merged_items(state, whole) if adapters is not None else ((k, whole(v)) for k, v in state.items())
    for name, tensor in items:
        yield name, tensor.detach().to(device="cpu", dtype=dtype)


def planned_bytes(weights: torch.nn.Module | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes `named_weights(model, dtype)` (or a state dict's tensors) take in a segment in
    `dtype` (None: each tensor's own), alignment included, from shapes alone."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return sum(aligned(t.numel() * (dtype or t.dtype).itemsize) for k, t in state.items() if ".lora_" not in k)


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class WeightSegment:
    """The run's segment: `write` a version, hand `table` to the sampler, `close` when done."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or shm_directory()
        remove_stale(self.directory)
        self.data = self.directory / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.table = self.data.with_name(self.data.name + ".json")
        self._close = weakref.finalize(self, unlink, self.data, self.table)

    def write(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, reserve: int) -> dict[str, Any]:
        """Every tensor of `weights` into the segment, then its table (`version` on it)."""
        with open(os.open(self.data, os.O_RDWR | os.O_CREAT, 0o600), "r+b", buffering=0) as file:
            self.reserve(file.fileno(), reserve)
            entries, offset = [], 0
            for name, tensor in weights:
                raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                if offset + raw.nbytes > reserve:
                    raise ValueError(f"weight {name} does not fit the {reserve} bytes reserved")
                os.pwrite(file.fileno(), memoryview(raw), offset)
                dtype = str(tensor.dtype).removeprefix("torch.")
                entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "offset": offset,
                                "nbytes": raw.nbytes})  # fmt: skip
                offset += aligned(raw.nbytes)
        table = {"format": FORMAT, "version": version, "bytes": offset, "tensors": entries}
        scratch = self.table.with_name(f"{self.table.name}.{secrets.token_hex(4)}.tmp")  # stale-cleanable
        scratch.write_text(json.dumps(table))
        os.replace(scratch, self.table)  # the sampler never sees a half-written table
        return table

    def reserve(self, fd: int, nbytes: int) -> None:
        """Allocate the segment's pages now: a too-small /dev/shm fails here, with the sizes."""
        held = os.fstat(fd).st_size
        free = shutil.disk_usage(self.directory).free
        try:
            if nbytes > held + free:
                raise OSError(errno.ENOSPC, "no space")
            if nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            from minpro_cli.errors import MinproError

            raise MinproError(
                f"the sampler's weights need {nbytes / 2**30:.2f} GiB of shared memory in {self.directory}, which "
                f"has {(held + free) / 2**30:.2f} GiB free: give the container more (docker run --shm-size=…, "
                "or --ipc=host)"
            ) from None
        if held > nbytes:
            os.ftruncate(fd, nbytes)

    def close(self) -> None:
        self._close()


def read_weights(table: Path | str) -> tuple[int, Weights]:
    """The version a segment holds and its tensors, viewed in the mapped file (no copy)."""
    meta = json.loads(Path(table).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{table}: not a {FORMAT} table")
    data = Path(table).with_suffix("")
    with open(data, "rb") as file:  # a private mapping: writable views, nothing written back
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if meta["bytes"] else b""

    def tensors() -> Weights:
        for entry in meta["tensors"]:
            dtype = getattr(torch, entry["dtype"])  # written as str(tensor.dtype) minus "torch."
            count = entry["nbytes"] // dtype.itemsize
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=entry["offset"]) if count else \
                torch.empty(0, dtype=dtype)  # fmt: skip
            yield entry["name"], flat.view(entry["shape"])

    return int(meta["version"]), tensors()


def unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def remove_stale(directory: Path) -> list[Path]:
    """Segments (and tables) whose owner process is gone: what a killed run left behind."""
    removed = []
    for path in directory.glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).split("-")[0]
        if owner.isdigit() and not alive(int(owner)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
