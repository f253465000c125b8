"""Experiment trackers a run reports to besides `metrics.jsonl` (`logging.report_to`).

Each tracker gets the resolved recipe once, every round's metrics and every held-out
evaluation, keyed by the optimizer step; numbers only. Both are optional extras
(`pip install 'minpro[tensorboard]'`, `'minpro[wandb]'`); a missing one is a one-line error
before the run starts (`check_installed`).
"""

from __future__ import annotations

import importlib
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.errors import ConfigError


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics record (strings, NaN and the step itself left out)."""
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and key != "step"
    }


class TensorBoard:
    """Event files in RUN_DIR/tensorboard, one scalar per metric."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "```yaml\n" + _yaml(recipe) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run in RUN_DIR/wandb (offline by default), with the recipe as its config."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb

        self.run = wandb.init(
            project=recipe.logging.wandb_project, name=run_dir.name, dir=str(run_dir), mode=recipe.logging.wandb_mode,
            config=dump_recipe(recipe), reinit="create_new",
        )  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(dump_recipe(recipe), sort_keys=False)


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def check_installed(recipe: Recipe) -> None:
    """Each tracker the recipe reports to can be imported (checked before a run writes anything)."""
    for name in recipe.logging.report_to:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise ConfigError(
                f"logging.report_to has {name}, which is not installed: pip install 'minpro[{name}]'"
            ) from None


class Trackers(AbstractContextManager["Trackers"]):
    """The recipe's trackers (none under ranks other than 0); closed however the run ends."""

    def __init__(self, recipe: Recipe, run_dir: Path, enabled: bool = True) -> None:
        check_installed(recipe)
        self.trackers: list[Tracker] = [TRACKERS[name](recipe, run_dir) for name in recipe.logging.report_to] if enabled else []

    def log(self, record: dict[str, Any]) -> None:
        """A round's metrics or an evaluation (which shares the step of the round before it)."""
        for tracker in self.trackers:
            tracker.log(numbers(record), int(record["step"]))

    def __exit__(self, *exc: object) -> None:
        for tracker in self.trackers:
            tracker.close()
