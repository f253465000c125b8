"""`logging.report_to`: TensorBoard event files, an offline wandb run, trackio's local database
and an MLflow SQLite store hold every round's metrics and the held-out evaluations (read back
with TensorBoard's, trackio's and MLflow's own readers and wandb's record format), and progress
reaches a redirected log while the run is going."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
ROUNDS = 4
RUN = [
    f"train.iterations={ROUNDS}", "train.prompts_per_iteration=4", "train.group_size=4",
    "sampler.options.max_new_tokens=24", "optim.lr=1e-3", "optim.warmup_steps=0", "train.eval_every=2",
    "eval.max_problems=4", "eval.n_samples=2", "eval.k=[1,2]", "logging.report_to=[tensorboard,wandb,trackio,mlflow]",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run with both trackers, its output redirected to a file as under nohup or a scheduler;
    returns the run directory and what the log held at moments while the run was going."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    log = run_dir.parent / "train.log"
    env = os.environ | {"WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(run_dir.parent / "trackio")}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "minpro_cli", "train", str(QUICKSTART), f"run_dir={run_dir}", *RUN],
                               stdout=out, stderr=subprocess.STDOUT, env=env)
        seen_while_running = []
        while job.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) == 2:  # round 0's line printed by now
                text = log.read_text()
                if job.poll() is None:
                    seen_while_running.append(text)
            time.sleep(0.05)
    assert job.returncode == 0, log.read_text()
    return run_dir, seen_while_running


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_progress_reaches_a_redirected_log_while_the_run_goes(run):
    _, seen = run
    assert seen, "the run ended before the log could be read mid-run"
    assert all("training 1/4" in text and "held-out after round 0 (step 0): pass@1" in text for text in seen)


def test_tensorboard_event_files_hold_every_round_and_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "reward_mean", "grad_norm", "ratios/token_ratio_mean", "ratios/kl_k3", "eval/pass@1"} <= scalars
    metrics = jsonl(run_dir / "metrics.jsonl")
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [m["step"] for m in metrics]
    assert [e.value for e in logged] == pytest.approx([m["loss"] for m in metrics], rel=1e-6, abs=1e-9)
    assert [e.step for e in events.Scalars("eval/pass@1")] == [e["step"] for e in jsonl(run_dir / "evals.jsonl")]
    assert "recipe/text_summary" in events.Tags()["tensors"]  # the resolved recipe, as text


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log framed records
    (32 KiB blocks; each chunk has a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, partial = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def test_an_offline_wandb_run_holds_the_metrics_evaluations_and_recipe(run):
    run_dir, _ = run
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    config = {}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
    metrics, evals = jsonl(run_dir / "metrics.jsonl"), jsonl(run_dir / "evals.jsonl")
    for m in metrics:
        assert history[m["step"]]["loss"] == pytest.approx(m["loss"])
        assert history[m["step"]]["ratios/token_ratio_mean"] == pytest.approx(m["ratios/token_ratio_mean"])
    for e in evals:
        assert history[e["step"]]["eval/pass@1"] == pytest.approx(e["eval/pass@1"])
    assert config["objective"]["name"] == "minpro" and config["train"]["iterations"] == ROUNDS


def test_trackio_s_database_holds_the_metrics_evaluations_and_recipe(run):
    run_dir, _ = run
    read = (  # trackio's own reader, in a process whose TRACKIO_DIR is the run's
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps([S.get_logs('minpro', 'run'), S.get_run_config('minpro', 'run')]))"
    )
    env = os.environ | {"TRACKIO_DIR": str(run_dir.parent / "trackio")}
    out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True).stdout
    logs, config = json.loads(out.splitlines()[-1])
    by_step: dict[int, dict] = {}
    for entry in logs:
        by_step.setdefault(entry["step"], {}).update(entry)
    for m in jsonl(run_dir / "metrics.jsonl"):
        assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"])
    for e in jsonl(run_dir / "evals.jsonl"):
        assert by_step[e["step"]]["eval/pass@1"] == pytest.approx(e["eval/pass@1"])
    assert config["objective"]["name"] == "minpro" and config["train"]["iterations"] == ROUNDS


def test_an_mlflow_store_in_the_run_directory_holds_the_metrics_evaluations_and_recipe(run):
    from mlflow.tracking import MlflowClient

    run_dir, _ = run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("minpro").experiment_id])
    loss = client.get_metric_history(mlflow_run.info.run_id, "loss")
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [(h.step, h.value) for h in loss] == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    held_out = client.get_metric_history(mlflow_run.info.run_id, "eval/pass_at_1")  # MLflow allows no '@'
    assert [(h.step, h.value) for h in held_out] == [(e["step"], e["eval/pass@1"]) for e in jsonl(run_dir / "evals.jsonl")]
    params = mlflow_run.data.params
    assert params["objective.name"] == "minpro" and params["train.iterations"] == str(ROUNDS)
    assert mlflow_run.info.status == "FINISHED"


def test_the_training_plot_shows_the_held_out_evaluations(run):
    from minpro_cli.plots import training_figure

    run_dir, _ = run
    figure = training_figure(jsonl(run_dir / "metrics.jsonl"), "t", jsonl(run_dir / "evals.jsonl"))
    reward = figure.axes[0]
    (held_out,) = [line for line in reward.get_lines() if line.get_label() == "held-out pass@1"]
    assert list(held_out.get_xdata()) == [e["step"] for e in jsonl(run_dir / "evals.jsonl")]


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path, monkeypatch):
    from minpro_cli.config import load_recipe
    from minpro_cli.errors import ConfigError
    from minpro_cli.trackers import Trackers
    from minpro_cli.train import run_train

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "logging.report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"report_to has wandb, which is not installed: pip install 'minpro\[wandb\]'"):
        Trackers(recipe, tmp_path)
    with pytest.raises(ConfigError, match="report_to has wandb, which is not installed"):
        run_train(recipe)  # before anything is loaded or written
    assert not (tmp_path / "run").exists()
