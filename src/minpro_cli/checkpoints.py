"""Training checkpoints: `torch.distributed.checkpoint` model and optimizer state, an HF export.

A checkpoint directory is loadable by plain transformers (config, safetensors weights,
tokenizer: the HF export) and holds `dcp/`, the model and optimizer tensors written by
`torch.distributed.checkpoint` with its safetensors storage (each rank writes its own shard
file, whose header records the shard's offsets; it loads into any number of ranks). The
optimizer's non-tensor settings (lr, betas, …) are `optimizer_param_groups.json`, the loop
state `trainer_state.json`, the stale-weight snapshots safetensors. Nothing is pickled and
nothing is unpickled on load: torch's default DCP storage pickles its `.metadata` and the
non-tensor entries, so a checkpoint in that format is refused, not read. Every rank writes
into `.round_NNNNN.partial`; rank 0 renames it only after all of them finished, so a resumed
run never sees a half-written one.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from minpro_cli.distributed import World, unwrap, whole_state
from minpro_cli.errors import CheckpointError
from minpro_cli.fileio import directory_done_marker, disk_full_is_an_error, publish_directory, remove
from minpro_cli.lora import ADAPTER_DIR
from minpro_cli.modeling import Policy

StateDict = dict[str, torch.Tensor]
DCP_DIR = "dcp"
PARAM_GROUPS_FILE = "optimizer_param_groups.json"
# one process without a process group is a normal way to train, not a mistake to warn about
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class LoopState:
    round: int = 0  # rounds completed
    step: int = 0  # optimizer steps taken
    # optimizer step of the weights each kept snapshot holds, keyed by round
    snapshot_steps: dict[int, int] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_:05d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in sorted((run_dir / "checkpoints").glob("round_*")) if directory_done_marker(p).exists()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    policy: Policy,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    snapshots: dict[int, StateDict],
    keep: int,
    world: World,
) -> Path:
    """Collective: every rank calls it. `module` is what trains (the model, DDP or FSDP2)."""
    target = checkpoint_dir(run_dir, state.round)
    partial = target.with_name(f".{target.name}.partial")
    if world.is_main:  # a partial directory left by a killed run is garbage
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    world.barrier()
    try:
        with disk_full_is_an_error(target):
            write_checkpoint(partial, policy, module, optimizer, state, snapshots, world)
    except BaseException:  # Ctrl-C or a full disk: nothing half-written stays behind
        if world.is_main:
            remove(partial)
        raise
    if world.is_main:
        publish_directory(partial, target)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    world.barrier()
    return target


def write_checkpoint(
    directory: Path,
    policy: Policy,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    snapshots: dict[int, StateDict],
    world: World,
) -> None:
    model_state, optim_state = get_state_dict(module, optimizer)
    try:
        dcp.save(
            {"model": distinct_tensors(model_state), "optim": {"state": optimizer_tensors(optim_state)}},
            storage_writer=HuggingFaceStorageWriter(str(directory / DCP_DIR), save_distributed=True),
        )
    except CheckpointException as exc:  # DCP wraps what its writers raised: re-raise the cause
        raise next(iter(exc.failures.values()))[0] from None
    whole = whole_weights(module)
    kept = {round_: whole_state(weights) for round_, weights in snapshots.items()}  # FSDP2 shards gathered
    if world.is_main:
        (directory / PARAM_GROUPS_FILE).write_text(json.dumps(optim_state["param_groups"], indent=1))
        export_hf(policy, module, whole, directory)
        for round_, weights in kept.items():
            save_file(weights, str(directory / f"snapshot_round_{round_:05d}.safetensors"))
        write_loop_state(directory, state)


def distinct_tensors(state: StateDict) -> StateDict:
    """The state without entries that share storage with an earlier one (tied embeddings):
    safetensors stores each tensor once, and loading the kept entry fills the tied one."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for key, tensor in state.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP2: a DTensor
        storage = (local.data_ptr(), tuple(local.shape))
        if local.numel() == 0 or storage not in seen:
            out[key] = tensor
            seen.add(storage)
    return out


def optimizer_tensors(optim_state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The per-parameter optimizer state (AdamW: step, exp_avg, exp_avg_sq), which must be all
    tensors: anything else would need pickling."""
    state = optim_state["state"]
    for fqn, entries in state.items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{key} is a {type(value).__name__}, not a tensor")
    return state


def read_param_groups(path: Path) -> list[dict[str, Any]]:
    """The optimizer's param groups from JSON: numbers, booleans, null and lists of them or of
    parameter names; betas back to a tuple, as torch's optimizers write them."""
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); resume from an earlier checkpoint") from None
    scalar = (int, float, bool, str, type(None))

    def valid(value: Any) -> bool:
        return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))

    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and all(valid(v) for v in g.values()) and isinstance(g.get("params"), list)
        for g in groups
    ):
        raise CheckpointError(f"{path}: not a list of optimizer param groups; resume from an earlier checkpoint")
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]


def whole_weights(module: torch.nn.Module) -> StateDict:
    """Collective: the unsharded weights, on rank 0 only (other ranks get {})."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(policy: Policy, module: torch.nn.Module, whole: StateDict, directory: Path) -> None:
    """`save_pretrained` layout with safetensors weights, loadable by plain transformers; with
    LoRA, the merged weights, and the adapter alone in `adapter/`."""
    model = unwrap(module)
    if policy.adapters is not None:
        policy.adapters.save_adapter(directory / ADAPTER_DIR, whole)
        whole = policy.adapters.merged(whole)
    # gathered weights no longer share storage, so save_pretrained cannot see the tie itself
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    whole = {k: v for k, v in whole.items() if k not in tied}
    model.save_pretrained(directory, state_dict=whole, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)


def write_loop_state(directory: Path, state: LoopState) -> None:
    """trainer_state.json: the loop state; in a weights-only directory (final/) it tells the step."""
    (directory / "trainer_state.json").write_text(json.dumps({"loop": asdict(state)}, indent=1))


def read_loop_state(directory: Path) -> LoopState:
    """A checkpoint's trainer_state.json; a damaged one is a CheckpointError naming it."""
    path = directory / "trainer_state.json"
    try:
        loop = json.loads(path.read_text(encoding="utf-8"))["loop"]
        return LoopState(
            round=int(loop["round"]),
            step=int(loop["step"]),
            snapshot_steps={int(k): int(v) for k, v in loop["snapshot_steps"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable loop state ({exc!r}); delete {directory} to resume from the one before"
        ) from None


def saved_policy_step(directory: Path) -> int | None:
    """The optimizer step of the weights in a checkpoint or final/ directory, if recorded."""
    path = directory / "trainer_state.json"
    return int(json.loads(path.read_text())["loop"]["step"]) if path.is_file() else None


def load_checkpoint_state(
    directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[LoopState, dict[int, StateDict]]:
    """Restore model and optimizer state in place (any number of ranks); return the loop state
    and the weight snapshots."""
    tensors_dir, groups_path = directory / DCP_DIR, directory / PARAM_GROUPS_FILE
    if not groups_path.is_file() or not any(tensors_dir.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} is not a resumable minpro checkpoint (no {DCP_DIR}/*.safetensors and {PARAM_GROUPS_FILE}: "
            "an earlier minpro wrote optimizer state in torch's pickle-based format, which is not loaded because "
            "unpickling can run code); its weights are an HF directory: start a new run with model.path pointing "
            "at it, or move checkpoints/ away"
        )
    param_groups = read_param_groups(groups_path)
    for shard in sorted(tensors_dir.glob("*.safetensors")):  # DCP would log a traceback for a bad one
        try:
            with safe_open(str(shard), framework="pt") as opened:
                opened.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{shard}: unreadable ({exc}); the checkpoint is truncated or corrupt: delete {directory} to resume "
                "from the one before"
            ) from None
    model_state, optim_state = get_state_dict(module, optimizer)
    loaded = {"model": distinct_tensors(model_state), "optim": {"state": optimizer_tensors(optim_state)}}
    try:
        dcp.load(loaded, storage_reader=HuggingFaceStorageReader(str(tensors_dir)))
    except CheckpointException as exc:  # DCP wraps what its reader raised
        cause = next(iter(exc.failures.values()))[0]
        raise CheckpointError(
            f"{tensors_dir}: cannot restore the model and optimizer state ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0][:200]}); it may be truncated or from another model: delete "
            f"{directory} to resume from the one before"
        ) from None
    set_state_dict(
        module,
        optimizer,
        model_state_dict=model_state,  # tied entries were filled through the one `loaded` holds
        optim_state_dict={"state": loaded["optim"]["state"], "param_groups": param_groups},
    )
    state = read_loop_state(directory)
    snapshots = {
        int(p.stem.rsplit("_", 1)[1]): load_file(str(p)) for p in sorted(directory.glob("snapshot_round_*.safetensors"))
    }
    return state, snapshots
