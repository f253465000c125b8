"""Training checkpoints: HF `save_pretrained` weights plus optimizer and loop state.

Everything is safetensors or JSON (never pickle), and each checkpoint directory appears
atomically with a `.complete` marker, so a resumed run never loads a half-written one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minpro_cli.fileio import directory_done_marker, write_directory_atomic
from minpro_cli.modeling import Policy, save_policy

StateDict = dict[str, torch.Tensor]


@dataclass
class LoopState:
    round: int = 0  # rounds completed
    step: int = 0  # optimizer steps taken
    # optimizer step of the weights each kept snapshot holds, keyed by round
    snapshot_steps: dict[int, int] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_:05d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in sorted((run_dir / "checkpoints").glob("round_*")) if directory_done_marker(p).exists()]
    return done[-1] if done else None


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[StateDict, dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{key}": value.contiguous()
        for idx, per_param in state["state"].items()
        for key, value in per_param.items()
        if torch.is_tensor(value)
    }
    scalars = {
        f"{idx}.{key}": value
        for idx, per_param in state["state"].items()
        for key, value in per_param.items()
        if not torch.is_tensor(value)
    }
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: StateDict, meta: dict) -> None:
    per_param: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    snapshots: dict[int, StateDict],
    keep: int,
) -> Path:
    target = checkpoint_dir(run_dir, state.round)

    def fill(tmp: Path) -> None:
        save_policy(policy, tmp)
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        for round_, weights in snapshots.items():
            save_file(weights, str(tmp / f"snapshot_round_{round_:05d}.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"loop": asdict(state), "optimizer": meta}, indent=1))

    write_directory_atomic(target, fill)
    complete = [p for p in sorted((run_dir / "checkpoints").glob("round_*")) if directory_done_marker(p).exists()]
    for old in complete[:-keep]:
        shutil.rmtree(old)
    return target


def write_loop_state(directory: Path, state: LoopState) -> None:
    """trainer_state.json for a weights-only directory (final/): tells readers its step."""
    (directory / "trainer_state.json").write_text(json.dumps({"loop": asdict(state)}, indent=1))


def saved_policy_step(directory: Path) -> int | None:
    """The optimizer step of the weights in a checkpoint or final/ directory, if recorded."""
    path = directory / "trainer_state.json"
    return int(json.loads(path.read_text())["loop"]["step"]) if path.is_file() else None


def load_checkpoint_state(
    directory: Path, optimizer: torch.optim.Optimizer
) -> tuple[LoopState, dict[int, StateDict]]:
    """Restore optimizer state in place; return the loop state and the weight snapshots."""
    saved = json.loads((directory / "trainer_state.json").read_text())
    optimizer_from_tensors(optimizer, load_file(str(directory / "optimizer.safetensors")), saved["optimizer"])
    loop = saved["loop"]
    state = LoopState(
        round=loop["round"],
        step=loop["step"],
        snapshot_steps={int(k): v for k, v in loop["snapshot_steps"].items()},
    )
    snapshots = {
        int(p.stem.rsplit("_", 1)[1]): load_file(str(p)) for p in sorted(directory.glob("snapshot_round_*.safetensors"))
    }
    return state, snapshots
