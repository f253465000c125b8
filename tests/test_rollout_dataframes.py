"""A rollout file filtered in pandas, polars or `datasets` and written back is still a rollout
file: those writers drop minpro's metadata and write large strings and lists (pandas and
polars) or other widths, and minpro reads, trains on and inspects the result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minpro_cli.config import load_recipe
from minpro_cli.errors import RolloutFileError
from minpro_cli.inspect_ratios import inspect_ratios
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import SCHEMA, read_rollout_rows, read_rollouts, recorded_recipe, write_rollouts
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = ["rollout.num_prompts=6", "rollout.group_size=4", "sampler.options.max_new_tokens=24"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    """A schema-2 file with switches: every odd response's tokens from the third on are stamped
    with a newer version (an in-flight weight switch), so the versions must survive the tools."""
    path = run_rollout(load_recipe(QUICKSTART, [f"run_dir={tmp_path_factory.mktemp('sampled')}", *SMALL]))
    rows = read_rollout_rows(path)
    for row in rows[1::2]:
        row.behavior_versions = [0, 0] + [3] * (len(row.response_token_ids) - 2)
    write_rollouts(path, rows, recorded_recipe(path) or {})
    assert any(len(set(r.behavior_versions)) == 2 for r in read_rollout_rows(path))
    return path


def keep_first_samples(source: Path, target: Path, tool: str) -> None:
    """Drop every response but the first two of each prompt, the way a user of `tool` would."""
    if tool == "pandas":
        import pandas as pd

        frame = pd.read_parquet(source)
        frame[frame["sample_index"] < 2].to_parquet(target)
    elif tool == "polars":
        import polars as pl

        pl.read_parquet(source).filter(pl.col("sample_index") < 2).write_parquet(target)
    else:
        import datasets

        datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_parquet(str(source), cache_dir=str(target.parent / "hf-cache"))
        dataset.filter(lambda row: row["sample_index"] < 2).to_parquet(str(target))


@pytest.mark.parametrize("tool", ["pandas", "polars", "datasets"])
def test_a_file_filtered_in_a_dataframe_tool_is_read_trained_on_and_inspected(tmp_path, sampled, tool, policy, capsys):
    filtered = tmp_path / f"{tool}.parquet"
    keep_first_samples(sampled, filtered, tool)
    written = pq.ParquetFile(filtered).schema_arrow
    assert b"minpro.schema_version" not in (written.metadata or {})  # what the tool dropped
    if tool != "datasets":  # pandas and polars write 64-bit offsets
        assert pa.types.is_large_string(written.field("prompt").type)

    table = read_rollouts(filtered)
    assert "no 'minpro.schema_version' metadata" in capsys.readouterr().err
    assert table.schema == SCHEMA  # cast back to minpro's types
    expected = [r for r in read_rollouts(sampled).to_pylist() if r["sample_index"] < 2]
    assert table.to_pylist() == expected

    report = inspect_ratios(str(filtered), policy)
    assert report["n_sequences"] == len(expected)
    assert report["n_tokens"] == sum(len(r["response_token_ids"]) for r in expected)
    assert report["token_ratio"]["max"] == pytest.approx(1.0, abs=2e-3)  # scored by the policy that sampled them

    run_dir = tmp_path / "run"
    run_train(load_recipe(QUICKSTART, [f"run_dir={run_dir}", *SMALL, f"train.rollouts={filtered}",
                                       "train.iterations=1", "train.prompts_per_iteration=6"]))
    assert (run_dir / "final" / "model.safetensors").is_file()


def rewrite(source: Path, target: Path, change: Callable[[pa.Table], pa.Table]) -> Path:
    pq.write_table(change(pq.read_table(source)), target)
    return target


def test_values_that_do_not_fit_and_missing_values_name_the_column_and_row(tmp_path, sampled):
    def huge_id(table: pa.Table) -> pa.Table:
        ids = table["response_token_ids"].to_pylist()
        ids[1][0] = 2**40
        return table.set_column(table.column_names.index("response_token_ids"), "response_token_ids",
                                pa.array(ids, pa.large_list(pa.int64())))

    with pytest.raises(RolloutFileError, match="column 'response_token_ids' does not fit list<item: int32>"):
        read_rollouts(rewrite(sampled, tmp_path / "huge.parquet", huge_id))

    def missing_reward(table: pa.Table) -> pa.Table:
        rewards = table["reward"].to_pylist()
        rewards[3] = None
        return table.set_column(table.column_names.index("reward"), "reward", pa.array(rewards, pa.float64()))

    with pytest.raises(RolloutFileError, match="row 3 has no value in column 'reward'"):
        read_rollouts(rewrite(sampled, tmp_path / "null.parquet", missing_reward))

    def text_rewards(table: pa.Table) -> pa.Table:
        return table.set_column(table.column_names.index("reward"), "reward", table["reward"].cast(pa.string()))

    with pytest.raises(RolloutFileError, match="column 'reward' has type string, expected float"):
        read_rollouts(rewrite(sampled, tmp_path / "text.parquet", text_rewards))


def test_a_file_without_metadata_or_columns_is_still_refused(tmp_path):
    pq.write_table(pa.table({"question": ["1+1"], "answer": ["2"]}), tmp_path / "tasks.parquet")
    with pytest.raises(RolloutFileError, match="tasks.parquet: not written by minpro .*docs/rollout-format.md"):
        read_rollouts(tmp_path / "tasks.parquet")
