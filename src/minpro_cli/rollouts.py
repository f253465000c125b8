"""Rollout files: the parquet format stages exchange (DESIGN.md §4).

One row per sampled response. The file metadata holds `minpro.schema_version` and the
resolved config. Readers validate the version, the columns and the per-row list lengths,
and ignore columns they do not know.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from minpro_cli.errors import RolloutFileError
from minpro_cli.fileio import atomic_path

SCHEMA_VERSION = "1"
VERSION_KEY = b"minpro.schema_version"
CONFIG_KEY = b"minpro.config"

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("response_token_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())),
        ("reference_answer", pa.string()),
        ("reward", pa.float32()),
        ("verifier", pa.string()),
        ("verifier_details", pa.string()),
        ("finish_reason", pa.string()),
        ("policy_version", pa.int64()),
        ("model_fingerprint", pa.string()),
        ("tokenizer_fingerprint", pa.string()),
        ("sampler", pa.string()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("top_k", pa.int32()),
        ("seed", pa.int64()),
    ]
)


def write_rollouts(path: Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """Write rows atomically: the final path holds either nothing or a complete file."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.replace_schema_metadata(
        {VERSION_KEY: SCHEMA_VERSION.encode(), CONFIG_KEY: json.dumps(config).encode()}
    )
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


def rollout_files(spec: str | Path) -> list[Path]:
    """A parquet file, a directory of them, or a glob; sorted for a stable order."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise RolloutFileError(f"no .parquet files in directory {path}")
        return files
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(spec)))
    if not matches:
        raise RolloutFileError(f"rollout file not found: {spec} (run `minpro rollout` first or fix the path)")
    return matches


def read_rollout_file(path: Path) -> pa.Table:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise RolloutFileError(f"{path}: not a readable parquet file ({exc}); it may be truncated or corrupt") from None
    meta = parquet.schema_arrow.metadata or {}
    version = meta.get(VERSION_KEY)
    if version is None:
        raise RolloutFileError(
            f"{path}: no '{VERSION_KEY.decode()}' metadata: this parquet file was not written by minpro "
            "(a foreign file needs the DESIGN.md §4 columns and that metadata key)"
        )
    if version.decode() != SCHEMA_VERSION:
        raise RolloutFileError(
            f"{path}: rollout schema version {version.decode()} is not supported "
            f"(this minpro reads version {SCHEMA_VERSION}); upgrade minpro or regenerate the file"
        )
    names = set(parquet.schema_arrow.names)
    missing = [f.name for f in SCHEMA if f.name not in names]
    if missing:
        raise RolloutFileError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise RolloutFileError(f"{path}: cannot read ({exc}); it may be truncated or corrupt") from None
    for field in SCHEMA:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise RolloutFileError(f"{path}: column '{field.name}' has type {actual}, expected {field.type}")
    _check_lengths(path, table)
    return table


def _check_lengths(path: Path, table: pa.Table) -> None:
    n_tokens = pc.list_value_length(table["response_token_ids"])
    n_logprobs = pc.list_value_length(table["behavior_logprobs"])
    ragged = pc.not_equal(n_tokens, n_logprobs)
    if pc.any(ragged).as_py():
        row = pc.index(ragged, True).as_py()
        raise RolloutFileError(
            f"{path}: row {row} (prompt_id={table['prompt_id'][row].as_py()!r}, "
            f"sample_index={table['sample_index'][row].as_py()}) has {n_logprobs[row].as_py()} "
            f"behavior_logprobs for {n_tokens[row].as_py()} response tokens; the lists must match"
        )
    empty = pc.equal(n_tokens, 0)
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise RolloutFileError(f"{path}: row {row} has an empty response (at least one token, the EOS, is expected)")


def read_rollouts(spec: str | Path) -> pa.Table:
    """All rows of a rollout set, restricted to the known columns, in file order."""
    tables = [read_rollout_file(p).select(SCHEMA.names) for p in rollout_files(spec)]
    return pa.concat_tables(tables)
