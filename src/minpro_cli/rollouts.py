"""Rollout files: the parquet format stages exchange (documented in docs/rollout-format.md).

One row per sampled response (a `RolloutRow` in memory). The file metadata holds
`minpro.schema_version` and the resolved config. Schema 2 adds `behavior_versions`, the policy
version that drew each response token (a response written by several policies); a schema-1
file reads as if every token had its row's `policy_version`. Readers validate the version, the
columns and the per-row contents, and ignore columns they do not know. A file written back by a
dataframe tool (pandas, polars, `datasets`) is read too: compatible column types (large strings
and lists, other integer and float widths) are cast, and a file whose minpro metadata such a
tool dropped is read as schema 2 (schema 1 without `behavior_versions`), with a warning.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from minpro_cli.console import warn
from minpro_cli.errors import RolloutFileError
from minpro_cli.fileio import atomic_path

SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
VERSION_KEY = b"minpro.schema_version"
CONFIG_KEY = b"minpro.config"


@dataclass(slots=True)
class RolloutRow:
    """One sampled response: a row of a rollout file, read by attribute. The fields are the
    file's columns, in order, each annotated with its parquet type (SCHEMA is made from them)."""

    prompt_id: Annotated[str, pa.string()]
    sample_index: Annotated[int, pa.int32()]  # 0 … group_size − 1 within the prompt's group
    prompt: Annotated[str, pa.string()]
    response: Annotated[str, pa.string()]
    prompt_token_ids: Annotated[list[int], pa.list_(pa.int32())]
    response_token_ids: Annotated[list[int], pa.list_(pa.int32())]
    behavior_logprobs: Annotated[list[float], pa.list_(pa.float32())]  # log μ of each response token
    reference_answer: Annotated[str, pa.string()]
    reward: Annotated[float, pa.float32()]
    verifier: Annotated[str, pa.string()]
    verifier_details: Annotated[str, pa.string()]  # JSON: what the verifier extracted, why it failed
    finish_reason: Annotated[str, pa.string()]  # "stop" or "length"
    policy_version: Annotated[int, pa.int64()]  # the optimizer step of the weights that sampled it
    model_fingerprint: Annotated[str, pa.string()]
    tokenizer_fingerprint: Annotated[str, pa.string()]
    sampler: Annotated[str, pa.string()]
    temperature: Annotated[float, pa.float32()]
    top_p: Annotated[float, pa.float32()]
    top_k: Annotated[int, pa.int32()]
    seed: Annotated[int, pa.int64()]
    # the policy version (optimizer step) of the weights that drew each response token; not given:
    # every token the row's `policy_version` (a response sampled by one policy, or a schema-1 file)
    behavior_versions: Annotated[list[int] | None, pa.list_(pa.int64())] = None
    # optional: log π_θ of each response token under a scoring policy; `inspect-ratios` without
    # --policy reads its target log-probs from here
    target_logprobs: Annotated[list[float] | None, pa.list_(pa.float32())] = None

    def __post_init__(self) -> None:
        if self.behavior_versions is None:
            self.behavior_versions = [self.policy_version] * len(self.response_token_ids)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RolloutRow:
        """From a dict with every column (extra keys are ignored, `target_logprobs` may be absent)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    @classmethod
    def from_table(cls, table: pa.Table) -> list[RolloutRow]:
        return [cls.from_record(record) for record in table.to_pylist()]

    def as_record(self) -> dict[str, Any]:
        """The row as a dict of its columns (`target_logprobs` only when set)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        if record[TARGET_LOGPROBS] is None:
            del record[TARGET_LOGPROBS]
        return record


TARGET_LOGPROBS = "target_logprobs"
BEHAVIOR_VERSIONS = "behavior_versions"
_ARROW = {name: pa.field(name, hint.__metadata__[0])
          for name, hint in get_type_hints(RolloutRow, include_extras=True).items()}
SCHEMA = pa.schema([column for name, column in _ARROW.items() if name != TARGET_LOGPROBS])
TARGET_LOGPROBS_FIELD = _ARROW[TARGET_LOGPROBS]
SCHEMA_1 = SCHEMA.remove(SCHEMA.get_field_index(BEHAVIOR_VERSIONS))  # what a version-1 file has
_warned_unversioned: set[Path] = set()  # once per file and process, however often it is opened


def write_rollouts(path: Path, rows: Sequence[RolloutRow | Mapping[str, Any]], config: dict[str, Any]) -> None:
    """Write rows (typed, or dicts of the columns) atomically: the final path holds either nothing
    or a complete file. The optional `target_logprobs` column is written when every row has it."""
    records = [r.as_record() if isinstance(r, RolloutRow) else with_row_versions(r) for r in rows]
    with_target = bool(records) and all(TARGET_LOGPROBS in r for r in records)
    table = pa.Table.from_pylist(records, schema=SCHEMA.append(TARGET_LOGPROBS_FIELD) if with_target else SCHEMA)
    table = table.replace_schema_metadata(
        {VERSION_KEY: SCHEMA_VERSION.encode(), CONFIG_KEY: json.dumps(config).encode()}
    )
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


def with_row_versions(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record of the columns with `behavior_versions` made, when not given, as a typed row makes it."""
    if record.get(BEHAVIOR_VERSIONS) is not None:
        return dict(record)
    return {**record, BEHAVIOR_VERSIONS: [record["policy_version"]] * len(record["response_token_ids"])}


RolloutSpec = str | Path | list[str] | list[Path]


def rollout_files(spec: RolloutSpec) -> list[Path]:
    """A parquet file, a directory of them, or a glob, sorted for a stable order; or a list of
    those (what an unquoted glob becomes in the shell), each expanded in turn."""
    if isinstance(spec, list):
        return list(dict.fromkeys(f for item in spec for f in rollout_files(item)))
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(
            p for p in path.rglob("*.parquet") if all(HIVE_PART.match(d) for d in p.relative_to(path).parent.parts)
        )  # a hive-partitioned folder: key=value/…/part-0.parquet
        if not files:
            raise RolloutFileError(f"no .parquet files in directory {path}")
        return files
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(spec)))
    if not matches:
        raise RolloutFileError(f"rollout file not found: {spec} (run `minpro rollout` first or fix the path)")
    return matches


def open_rollout_file(path: Path) -> pq.ParquetFile:
    """Open and check the metadata, columns and types of one rollout file (reads no rows)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise RolloutFileError(f"{path}: not a readable parquet file ({exc}); it may be truncated or corrupt") from None
    schema = parquet.schema_arrow
    version = (schema.metadata or {}).get(VERSION_KEY)
    partitions = partition_values(path)
    needed = SCHEMA.names if version == SCHEMA_VERSION.encode() else SCHEMA_1.names  # schema 1: versions from the row
    missing = [name for name in needed if name not in schema.names and name not in partitions]
    if version is None and missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise RolloutFileError(
            f"{path}: not written by minpro (no '{VERSION_KEY.decode()}' metadata, and no column(s) {shown}); "
            "docs/rollout-format.md lists the columns a rollout file needs"
        )
    if version is not None and version.decode() not in READABLE_VERSIONS:
        raise RolloutFileError(
            f"{path}: rollout schema version {version.decode()} is not supported "
            f"(this minpro reads versions {' and '.join(READABLE_VERSIONS)}); upgrade minpro or regenerate the file"
        )
    if missing:
        raise RolloutFileError(f"{path}: missing column(s) {', '.join(missing)}")
    for expected in [*SCHEMA, TARGET_LOGPROBS_FIELD]:
        if expected.name in schema.names and not castable(schema.field(expected.name).type, expected.type):
            actual = schema.field(expected.name).type
            raise RolloutFileError(f"{path}: column '{expected.name}' has type {actual}, expected {expected.type}")
    if parquet.metadata.num_rows == 0:
        raise RolloutFileError(f"{path}: the file has no rows; sample again (`minpro rollout`) or leave it out")
    if version is None and path not in _warned_unversioned:
        _warned_unversioned.add(path)
        warn(
            f"{path}: no '{VERSION_KEY.decode()}' metadata (dataframe writers drop it): reading it as schema "
            f"version {SCHEMA_VERSION if BEHAVIOR_VERSIONS in schema.names else 1}; which recipe sampled it cannot be "
            "checked"
        )
    return parquet


def recorded_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe a rollout file records in its metadata (None when a writer dropped it)."""
    raw = (open_rollout_file(path).schema_arrow.metadata or {}).get(CONFIG_KEY)
    try:
        recipe = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return recipe if isinstance(recipe, dict) else None


def castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Types a dataframe tool writes for one of ours: any string, integer or float width, and
    list kinds of those; `conform` casts them (checking the values fit)."""
    if pa.types.is_list(expected):
        lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
        return any(kind(actual) for kind in lists) and castable(actual.value_type, expected.value_type)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    return pa.types.is_floating(expected) and pa.types.is_floating(actual)


def conform(path: Path, table: pa.Table) -> pa.Table:
    """The table with every known column cast to the schema's type; a value that does not fit
    (a token id beyond int32) is an error naming the column."""
    for expected in [*SCHEMA, TARGET_LOGPROBS_FIELD]:
        if expected.name not in table.column_names or table.schema.field(expected.name).type == expected.type:
            continue
        try:
            column = table[expected.name].cast(expected.type)
        except pa.ArrowInvalid as exc:
            raise RolloutFileError(f"{path}: column '{expected.name}' does not fit {expected.type} ({exc})") from None
        table = table.set_column(table.column_names.index(expected.name), expected, column)
    return table


HIVE_PART = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$")


def partition_values(path: Path) -> dict[str, str]:
    """The key=value directories above a file of a hive-partitioned folder (pyarrow's
    `partitioning="hive"`): the columns the writer moved out of the file into its path."""
    found = (HIVE_PART.match(part) for part in Path(path).parent.parts)
    return {m.group(1): unquote(m.group(2)) for m in found if m}


def with_partition_columns(path: Path, table: pa.Table) -> pa.Table:
    """The schema's columns that live in the file's path (hive partitions) put back as columns."""
    for name, text in partition_values(path).items():
        if name in table.column_names or name not in SCHEMA.names:
            continue
        field = SCHEMA.field(name)
        value = None if text == "__HIVE_DEFAULT_PARTITION__" else text
        try:
            column = pa.array([value] * table.num_rows, pa.string()).cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise RolloutFileError(f"{path}: partition {name}={text} does not fit column type {field.type}") from None
        table = table.append_column(field, column)
    return table


def with_versions(table: pa.Table) -> pa.Table:
    """A schema-1 table (no `behavior_versions`) with the column made: each token the row's
    `policy_version`. Tables that have it, or lack what it is made from, are returned as they are."""
    if BEHAVIOR_VERSIONS in table.column_names or not {"policy_version", "response_token_ids"} <= set(table.column_names):
        return table
    lengths = pc.list_value_length(table["response_token_ids"]).to_numpy(zero_copy_only=False)
    values = np.repeat(table["policy_version"].to_numpy(), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))
    return table.append_column(_ARROW[BEHAVIOR_VERSIONS], column)


def read_rollout_file(path: Path) -> pa.Table:
    parquet = open_rollout_file(path)
    try:
        table = with_versions(conform(path, with_partition_columns(path, parquet.read())))
    except (pa.ArrowException, OSError) as exc:
        raise RolloutFileError(f"{path}: cannot read ({exc}); it may be truncated or corrupt") from None
    check_rows(path, table)
    return table


def iter_rollout_batches(
    spec: RolloutSpec, batch_size: int, columns: list[str], vocab_size: int | None = None
) -> Iterator[tuple[Path, pa.Table]]:
    """Stream a rollout set in batches of at most `batch_size` rows, each checked like a whole
    file would be (and its token ids against `vocab_size`, when given); `columns` that a file
    lacks (optional ones) are simply not read."""
    for path in rollout_files(spec):
        parquet = open_rollout_file(path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        if BEHAVIOR_VERSIONS in columns and BEHAVIOR_VERSIONS not in present:  # schema 1: made from these
            present = list(dict.fromkeys([*present, "policy_version", "response_token_ids"]))
        offset = 0
        try:
            for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                table = with_versions(conform(path, with_partition_columns(path, pa.Table.from_batches([batch]))))
                check_rows(path, table, offset)
                if vocab_size is not None:
                    check_token_ids(str(path), table, vocab_size, offset)
                offset += table.num_rows
                yield path, table
        except (pa.ArrowException, OSError) as exc:
            raise RolloutFileError(f"{path}: cannot read after row {offset} ({exc}); it may be truncated or corrupt") from None


def check_rows(path: Path, table: pa.Table, offset: int = 0) -> None:
    """Every row has every known column, a non-empty response and one log-prob per response
    token (behaviour and, when present, target); errors name the file and the row number
    within it."""
    for name in [f.name for f in SCHEMA if f.name in table.column_names]:
        if table[name].null_count:
            row = pc.index(pc.is_null(table[name]), True).as_py()
            raise RolloutFileError(f"{path}: row {offset + row} has no value in column '{name}'; drop the row")
    n_tokens = pc.list_value_length(table["response_token_ids"])
    for column in ("behavior_logprobs", BEHAVIOR_VERSIONS, TARGET_LOGPROBS_FIELD.name):
        if column not in table.column_names:
            continue
        n_logprobs = pc.list_value_length(table[column])
        ragged = pc.not_equal(n_tokens, n_logprobs)
        if pc.any(ragged).as_py():
            row = pc.index(ragged, True).as_py()
            raise RolloutFileError(
                f"{path}: row {offset + row} (prompt_id={table['prompt_id'][row].as_py()!r}, "
                f"sample_index={table['sample_index'][row].as_py()}) has {n_logprobs[row].as_py()} "
                f"{column} for {n_tokens[row].as_py()} response tokens; the lists must match"
            )
    if BEHAVIOR_VERSIONS in table.column_names and "policy_version" in table.column_names:
        check_versions(path, table, offset)
    empty = pc.equal(n_tokens, 0)
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise RolloutFileError(
            f"{path}: row {offset + row} has an empty response (at least one token, the EOS, is expected)"
        )
    no_prompt = pc.equal(pc.list_value_length(table["prompt_token_ids"]), 0) if "prompt_token_ids" in table.column_names \
        else pa.array([False])
    if pc.any(no_prompt).as_py():
        row = pc.index(no_prompt, True).as_py()
        raise RolloutFileError(f"{path}: row {offset + row} has no prompt_token_ids (an empty prompt); drop the row")
    for column in ("behavior_logprobs", TARGET_LOGPROBS_FIELD.name):
        if column in table.column_names:
            check_logprobs(path, table, column, offset)


def check_versions(path: Path, table: pa.Table, offset: int) -> None:
    """A response's versions never go back (weights only move forward while it is drawn), and its
    `policy_version` is its first token's: the oldest weights that wrote it."""
    lengths = pc.list_value_length(table[BEHAVIOR_VERSIONS]).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(table[BEHAVIOR_VERSIONS]).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    first = values[np.minimum(starts, max(len(values) - 1, 0))] if len(values) else np.zeros(0, np.int64)
    wrong_first = np.flatnonzero((lengths > 0) & (first != table["policy_version"].to_numpy()))
    going_back = np.flatnonzero(np.diff(values) < 0) + 1  # flat index of a token older than the one before it
    going_back = going_back[~np.isin(going_back, starts)]  # a new row may start older
    rows = sorted([*wrong_first.tolist(), *(np.searchsorted(starts, going_back, side="right") - 1).tolist()])
    if rows:
        row, versions = rows[0], table[BEHAVIOR_VERSIONS][rows[0]].as_py()
        shown = ", ".join(map(str, versions[:8])) + (", …" if len(versions) > 8 else "")
        raise RolloutFileError(
            f"{path}: row {offset + row} (prompt_id={table['prompt_id'][row].as_py()!r}) has behavior_versions "
            f"that {'do not start at its policy_version' if row in wrong_first else 'go back'} "
            f"([{shown}], policy_version {table['policy_version'][row].as_py()}); "
            "a response's versions start at its policy_version and never decrease: fix the writer or drop the row"
        )


def check_logprobs(path: Path, table: pa.Table, column: str, offset: int) -> None:
    """Log-probabilities are finite and at most 0: a NaN, an infinity or a positive value would
    become a NaN loss or a wrong ratio later, far from its cause."""
    values = pc.list_flatten(table[column])
    bad = pc.or_(pc.invert(pc.is_finite(values)), pc.greater(values, 0.0))
    if not pc.any(bad).as_py():
        return
    flat = pc.index(bad, True).as_py()
    ends = pc.cumulative_sum(pc.list_value_length(table[column])).to_pylist()
    row = next(i for i, end in enumerate(ends) if end > flat)
    token = flat - (ends[row - 1] if row else 0)
    raise RolloutFileError(
        f"{path}: row {offset + row} (prompt_id={table['prompt_id'][row].as_py()!r}) has {column}[{token}] = "
        f"{values[flat].as_py()}; log-probabilities must be finite and <= 0: regenerate the file or drop the row"
    )


def check_token_ids(where: str, rows: pa.Table, vocab_size: int, offset: int = 0) -> None:
    """Every prompt and response token id indexes the model's embedding (0 ≤ id < vocab_size);
    checked before any forward pass, where an id outside it is an IndexError deep in the model."""
    for column in ("prompt_token_ids", "response_token_ids"):
        ids = pc.list_flatten(rows[column])
        if len(ids) == 0:
            continue
        bad = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, vocab_size))
        if not pc.any(bad).as_py():
            continue
        flat = pc.index(bad, True).as_py()
        ends = pc.cumulative_sum(pc.list_value_length(rows[column])).to_pylist()
        row = next(i for i, end in enumerate(ends) if end > flat)
        raise RolloutFileError(
            f"{where}: row {offset + row} (prompt_id={rows['prompt_id'][row].as_py()!r}) has {column} id {ids[flat].as_py()}, "
            f"outside the model's vocabulary of {vocab_size}: these rollouts are from another model; "
            "use the model that sampled them (model.path / --policy)"
        )


def read_rollouts(spec: RolloutSpec) -> pa.Table:
    """All rows of a rollout set, restricted to the known columns, in file order."""
    tables = [read_rollout_file(p).select(SCHEMA.names) for p in rollout_files(spec)]
    return pa.concat_tables(tables)


def read_rollout_rows(spec: RolloutSpec) -> list[RolloutRow]:
    """`read_rollouts`, as typed rows."""
    return RolloutRow.from_table(read_rollouts(spec))
