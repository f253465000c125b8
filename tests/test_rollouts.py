"""Rollout parquet files: round trip, atomic writes and clear errors on bad files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minpro_cli.errors import RolloutFileError
from minpro_cli.rollouts import SCHEMA, SCHEMA_1, RolloutRow, read_rollout_rows, read_rollouts, write_rollouts


def make_row(prompt_id="p0", index=0, n=3):
    return {
        "prompt_id": prompt_id, "sample_index": index, "prompt": "Compute 1+1.\n", "response": "2",
        "prompt_token_ids": [5, 6, 7], "response_token_ids": list(range(10, 10 + n)),
        "behavior_logprobs": [-0.5] * n, "reference_answer": "2", "reward": 1.0, "verifier": "math",
        "verifier_details": "{}", "finish_reason": "stop", "policy_version": 0, "model_fingerprint": "m",
        "tokenizer_fingerprint": "t", "sampler": "hf", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1,
    }


def test_round_trip_keeps_every_design_column(tmp_path):
    path = tmp_path / "r.parquet"
    write_rollouts(path, [make_row(), make_row(index=1, n=5)], {"seed": 3})
    table = pq.read_table(path)  # plain pyarrow opens it
    assert table.schema.names == SCHEMA.names
    assert table.schema.metadata[b"minpro.schema_version"] == b"2"
    back = read_rollouts(path).to_pylist()
    assert back[1]["response_token_ids"] == [10, 11, 12, 13, 14]
    assert back[1]["behavior_logprobs"] == [-0.5] * 5


def test_directory_of_files_is_read_in_order_and_extra_columns_ignored(tmp_path):
    write_rollouts(tmp_path / "b.parquet", [make_row("pb")], {})
    table = pa.Table.from_pylist([make_row("pa")], schema=SCHEMA_1).append_column("critic_values", pa.array([[0.0]]))
    pq.write_table(table.replace_schema_metadata({b"minpro.schema_version": b"1"}), tmp_path / "a.parquet")
    rows = read_rollouts(tmp_path).to_pylist()
    assert [r["prompt_id"] for r in rows] == ["pa", "pb"]
    assert "critic_values" not in rows[0]


def test_failed_write_leaves_nothing_at_the_final_path(tmp_path):
    path = tmp_path / "r.parquet"
    bad = make_row()
    bad["reward"] = "not a number"
    with pytest.raises(ValueError):  # pyarrow.ArrowInvalid
        write_rollouts(path, [bad], {})
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RolloutFileError, match="not found.*nope.parquet"):
        read_rollouts(tmp_path / "nope.parquet")


def test_foreign_parquet_is_rejected(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(RolloutFileError, match="foreign.parquet.*not written by minpro"):
        read_rollouts(path)


def test_corrupt_file_is_rejected(tmp_path):
    path = tmp_path / "r.parquet"
    write_rollouts(path, [make_row()], {})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RolloutFileError, match="r.parquet.*corrupt"):
        read_rollouts(path)


def test_unknown_version_and_missing_column(tmp_path):
    table = pa.Table.from_pylist([make_row()], schema=SCHEMA_1)
    pq.write_table(table.replace_schema_metadata({b"minpro.schema_version": b"99"}), tmp_path / "v.parquet")
    with pytest.raises(RolloutFileError, match="version 99"):
        read_rollouts(tmp_path / "v.parquet")
    dropped = table.drop_columns(["behavior_logprobs"]).replace_schema_metadata({b"minpro.schema_version": b"1"})
    pq.write_table(dropped, tmp_path / "m.parquet")
    with pytest.raises(RolloutFileError, match="missing column.*behavior_logprobs"):
        read_rollouts(tmp_path / "m.parquet")


def test_ragged_logprobs_name_the_row(tmp_path):
    rows = [make_row(), make_row(index=1)]
    rows[1]["behavior_logprobs"] = [-0.1]
    table = pa.Table.from_pylist(rows, schema=SCHEMA_1).replace_schema_metadata({b"minpro.schema_version": b"1"})
    pq.write_table(table, tmp_path / "r.parquet")
    with pytest.raises(RolloutFileError, match=r"row 1 .*sample_index=1.* 1 behavior_logprobs for 3"):
        read_rollouts(tmp_path / "r.parquet")


def test_typed_rows_are_the_schema_and_round_trip(tmp_path):
    from dataclasses import fields

    assert [f.name for f in fields(RolloutRow)] == [*SCHEMA.names, "target_logprobs"]
    rows = [RolloutRow.from_record(make_row()), RolloutRow.from_record(make_row(index=1, n=5))]
    write_rollouts(tmp_path / "typed.parquet", rows, {})
    assert read_rollout_rows(tmp_path / "typed.parquet") == rows  # every value survives float32/int32
    assert "target_logprobs" not in pq.read_table(tmp_path / "typed.parquet").schema.names
    scored = [RolloutRow.from_record(make_row() | {"target_logprobs": [-0.25] * 3})]
    write_rollouts(tmp_path / "scored.parquet", scored, {})
    assert pq.read_table(tmp_path / "scored.parquet")["target_logprobs"].to_pylist() == [[-0.25] * 3]
    with pytest.raises(TypeError, match="reward"):  # a record without a column is not a row
        RolloutRow.from_record({k: v for k, v in make_row().items() if k != "reward"})


def test_schema_1_file_reads_with_every_token_of_its_row_version(tmp_path):
    table = pa.Table.from_pylist([make_row(n=3) | {"policy_version": 7}], schema=SCHEMA_1)
    pq.write_table(table.replace_schema_metadata({b"minpro.schema_version": b"1"}), tmp_path / "v1.parquet")
    assert read_rollout_rows(tmp_path / "v1.parquet")[0].behavior_versions == [7, 7, 7]
    assert read_rollouts(tmp_path / "v1.parquet")["behavior_versions"].to_pylist() == [[7, 7, 7]]


def test_switched_versions_round_trip_and_bad_ones_name_the_row(tmp_path):
    switched = make_row(n=4) | {"policy_version": 2, "behavior_versions": [2, 2, 5, 5]}
    write_rollouts(tmp_path / "s.parquet", [make_row(index=1), switched], {})
    back = read_rollout_rows(tmp_path / "s.parquet")
    assert [r.behavior_versions for r in back] == [[0, 0, 0], [2, 2, 5, 5]]
    for versions, message in (([2, 2, 5], r"row 1 .* 3 behavior_versions for 4 response tokens"),
                              ([2, 5, 3, 5], r"row 1 .*behavior_versions that go back \(\[2, 5, 3, 5\]"),
                              ([3, 3, 5, 5], r"row 1 .*do not start at its policy_version")):  # fmt: skip
        write_rollouts(tmp_path / "bad.parquet", [make_row(index=1), switched | {"behavior_versions": versions}], {})
        with pytest.raises(RolloutFileError, match=message) as caught:
            read_rollouts(tmp_path / "bad.parquet")
        assert "\n" not in str(caught.value)
