"""Experiment trackers a run reports to besides `metrics.jsonl` (`logging.report_to`).

Each tracker gets the resolved recipe once, every round's metrics and every held-out
evaluation, keyed by the optimizer step; numbers only. Each is an optional extra
(`pip install 'minpro[tensorboard]'`, `'minpro[wandb]'`, `'minpro[trackio]'`, `'minpro[mlflow]'`);
a missing one is a one-line error before the run starts (`check_installed`). All of them work
offline: files in the run directory (TensorBoard, wandb offline, MLflow's SQLite store) or
trackio's local database.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from minpro_cli.config import Recipe, dump_recipe, flatten
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
            project=recipe.logging.project, name=run_dir.name, dir=str(run_dir), mode=recipe.logging.wandb_mode,
            config=dump_recipe(recipe), reinit="create_new",
        )  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run in project `logging.project`, in trackio's local database ($TRACKIO_DIR,
    by default ~/.cache/huggingface/trackio; `trackio show` opens its dashboard)."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import trackio

        self.run = trackio.init(project=recipe.logging.project, name=run_dir.name, config=dump_recipe(recipe))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment `logging.project`, at `logging.mlflow_tracking_uri`, else
    $MLFLOW_TRACKING_URI, else a SQLite store in RUN_DIR/mlflow.db; the recipe as its params."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = recipe.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name(recipe.logging.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(recipe.logging.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten(dump_recipe(recipe)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """MLflow's metric names allow letters, digits, `_ - . : /` and spaces: `pass@1` → `pass_at_1`."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(dump_recipe(recipe), sort_keys=False)


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio, "mlflow": MLflow}
MODULES = {  # what each tracker imports (MLflow's SQLite store: sqlalchemy and alembic)
    "tensorboard": ["torch.utils.tensorboard"],
    "wandb": ["wandb"],
    "trackio": ["trackio"],
    "mlflow": ["mlflow.tracking", "sqlalchemy", "alembic"],
}


def check_installed(recipe: Recipe) -> None:
    """Each tracker the recipe reports to can be imported (checked before a run writes anything)."""
    for name in recipe.logging.report_to:
        try:
            for module in MODULES[name]:
                importlib.import_module(module)
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
