"""Training checkpoints: `torch.distributed.checkpoint` model and optimizer state, an HF export.

A checkpoint directory is loadable by plain transformers (config, safetensors weights,
tokenizer: the HF export) and holds `dcp/`, the model and optimizer state in PyTorch's
distributed checkpoint format, which each rank writes its own shard of and which loads
into any number of ranks. Loop state and the stale-weight snapshots are JSON and
safetensors; nothing is pickled. Every rank writes into `.round_NNNNN.partial`; rank 0
renames it only after all of them finished, so a resumed run never sees a half-written one.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from minpro_cli.distributed import World, unwrap
from minpro_cli.errors import CheckpointError
from minpro_cli.fileio import directory_done_marker, publish_directory
from minpro_cli.modeling import Policy

StateDict = dict[str, torch.Tensor]
DCP_DIR = "dcp"
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
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial / DCP_DIR))
    whole = whole_weights(module)
    if world.is_main:
        export_hf(policy, module, whole, partial)
        for round_, weights in snapshots.items():
            save_file(weights, str(partial / f"snapshot_round_{round_:05d}.safetensors"))
        write_loop_state(partial, state)
        publish_directory(partial, target)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    world.barrier()
    return target


def whole_weights(module: torch.nn.Module) -> StateDict:
    """Collective: the unsharded weights, on rank 0 only (other ranks get {})."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(policy: Policy, module: torch.nn.Module, whole: StateDict, directory: Path) -> None:
    """`save_pretrained` layout with safetensors weights, loadable by plain transformers."""
    model = unwrap(module)
    # gathered weights no longer share storage, so save_pretrained cannot see the tie itself
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    whole = {k: v for k, v in whole.items() if k not in tied}
    model.save_pretrained(directory, state_dict=whole, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)


def write_loop_state(directory: Path, state: LoopState) -> None:
    """trainer_state.json: the loop state; in a weights-only directory (final/) it tells the step."""
    (directory / "trainer_state.json").write_text(json.dumps({"loop": asdict(state)}, indent=1))


def saved_policy_step(directory: Path) -> int | None:
    """The optimizer step of the weights in a checkpoint or final/ directory, if recorded."""
    path = directory / "trainer_state.json"
    return int(json.loads(path.read_text())["loop"]["step"]) if path.is_file() else None


def load_checkpoint_state(
    directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[LoopState, dict[int, StateDict]]:
    """Restore model and optimizer state in place (any number of ranks); return the loop state
    and the weight snapshots."""
    if not (directory / DCP_DIR).is_dir():
        raise CheckpointError(
            f"{directory} has no {DCP_DIR}/ (written by minpro before distributed checkpoints): its weights "
            "are an HF directory; start a new run with model.path pointing at it, or move checkpoints/ away"
        )
    model_state, optim_state = get_state_dict(module, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(directory / DCP_DIR))
    set_state_dict(module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    loop = json.loads((directory / "trainer_state.json").read_text())["loop"]
    state = LoopState(
        round=loop["round"],
        step=loop["step"],
        snapshot_steps={int(k): v for k, v in loop["snapshot_steps"].items()},
    )
    snapshots = {
        int(p.stem.rsplit("_", 1)[1]): load_file(str(p)) for p in sorted(directory.glob("snapshot_round_*.safetensors"))
    }
    return state, snapshots
