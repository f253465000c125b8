"""Where `minpro train` starts: the checkpoint it resumes from (`--resume auto|never|PATH`), and
the check that a resumed run keeps the recipe its weights were trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minpro_cli.checkpoints import DCP_DIR, complete_checkpoints, latest_checkpoint, read_loop_state
from minpro_cli.config import Recipe, dump_recipe, flatten, recipe_from_data
from minpro_cli.errors import CheckpointError, RunDirError
from minpro_cli.fileio import directory_done_marker, read_yaml, remove
from minpro_cli.rundir import LOCK, MARKER, ROLLOUTS_DIR

# what a resumed run may change: how long it runs and how often it saves and evaluates, how it
# is laid out over devices and memory (the update is the same), and the sections train ignores
RESUMABLE_CHANGES = (
    "run_dir", "train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "train.micro_batch_tokens", "train.activation_checkpointing", "train.compile", "train.pipeline",
    "model.device", "distributed.", "eval.", "data.eval", "rollout.", "sweep.", "logging.",
)  # fmt: skip


def recipe_changes(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs and that a resumed run may not change."""
    return changed_keys(flatten(stored), flatten(now))


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`recipe_changes` of two flattened recipes."""
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A run with weights (a checkpoint or final/) continues only with the recipe that trained them."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    before = flatten(dump_recipe(recipe_from_data(read_yaml(path), str(path))))  # today's defaults filled in
    now = flatten(dump_recipe(recipe))
    changed = changed_keys(before, now)
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise RunDirError(
            f"{run_dir} was trained with another recipe ({shown}{more}): resuming would mix them; give a new "
            f"run_dir, or rerun with the recipe in {path}"
        )


def has_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in (MARKER, LOCK) for p in run_dir.iterdir())


def starting_checkpoint(run_dir: Path, resume: str, recipe: Recipe) -> Path | None:
    """The checkpoint `minpro train` resumes from: `auto` the run directory's latest (its recipe
    checked), `never` none (the directory must hold no run), or the checkpoint directory given."""
    if resume == "never":
        if has_run(run_dir):
            raise RunDirError(
                f"{run_dir} already holds a run and --resume never starts only in a new or empty directory; "
                "give another run_dir, or --resume auto to continue it"
            )
        return None
    if resume == "auto":
        if latest_checkpoint(run_dir) is not None or directory_done_marker(run_dir / "final").exists():
            check_same_recipe(run_dir, recipe)
        return latest_checkpoint(run_dir)
    checkpoint = Path(resume)
    if not directory_done_marker(checkpoint).exists() or not (checkpoint / DCP_DIR).is_dir():
        raise CheckpointError(
            f"--resume {resume}: not a complete training checkpoint (a RUN_DIR/checkpoints/round_NNNNN directory)"
        )
    if not is_own_checkpoint(run_dir, checkpoint) and has_run(run_dir):
        raise RunDirError(
            f"--resume {resume} is another run's checkpoint and {run_dir} already holds a run: continue from it "
            "in a new run_dir"
        )
    return checkpoint


def is_own_checkpoint(run_dir: Path, checkpoint: Path) -> bool:
    return checkpoint.resolve().parent == (run_dir / "checkpoints").resolve()


def forget_after(run_dir: Path, checkpoint: Path) -> None:
    """Resuming from an earlier checkpoint: the run's later checkpoints, rollout files and final
    weights belong to the timeline being replaced (an interruption must not resume from them)."""
    round_ = read_loop_state(checkpoint).round
    later = [c for c in complete_checkpoints(run_dir) if int(c.name.split("_")[1]) > round_]
    later += [p for p in (run_dir / ROLLOUTS_DIR).glob("round_*.parquet") if int(p.stem.split("_")[1]) >= round_]
    for path in [*later, run_dir / "final"]:
        if path.exists() or path.is_symlink():
            remove(path)
