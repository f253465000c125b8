"""Where problems come from, as (where, record) pairs: the embedded tasks, a file, a directory
of files, a `datasets` folder (`save_to_disk` of a Dataset or a DatasetDict), or a hub dataset
already in the local `datasets` cache. `where` names the file and line or row for errors.

Files: `.jsonl` (also gzipped), `.json` (a list, `{"data": [...]}`, or JSON Lines under a
`.json` name as `Dataset.to_json` writes), `.parquet`, `.csv`, `.arrow`. A directory whose
files are named by split (verl's `train.parquet` + `test.parquet`, the hub's
`train-00000-of-00001.parquet`) gives the requested split's files only. Nothing is
downloaded.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import stat
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from minpro_cli.errors import MinproError

EMBEDDED_PREFIX = "embedded:"
FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".jsonl.gz", ".json.gz")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
DATASETS_FOLDER = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def embedded_tasks_dir() -> Path:
    return Path(str(resources.files("minpro_cli") / "assets" / "tasks"))


def file_format(path: Path) -> str:
    """'.jsonl.gz' for a gzipped JSON Lines file, else the suffix."""
    double = "".join(path.suffixes[-2:])
    return double if double in FORMATS else path.suffix


def resolve_task_path(spec: str) -> Path:
    """`embedded:arith-train` names a file shipped in the package; anything else is a path."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        path = embedded_tasks_dir() / f"{name}.jsonl"
        if not path.is_file():
            known = sorted(p.stem for p in embedded_tasks_dir().glob("*.jsonl"))
            raise MinproError(f"unknown embedded task '{name}'; known: {', '.join(known)}")
        return path
    path = Path(spec)
    if not path.exists():
        raise MinproError(
            f"task file not found: {path} (give a {'/'.join(FORMATS)} file, a directory of them, a `datasets` "
            "save_to_disk folder, embedded:<name>, or a Hugging Face dataset id org/name in the local datasets cache)"
        )
    if not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):  # a named pipe would block the read forever
        raise MinproError(f"{path}: not a regular file (a pipe or a device?); save the problems to a file")
    if path.is_file() and file_format(path) not in FORMATS:
        raise MinproError(f"{path}: unknown task format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    return path


def task_records(spec: str, split: str, subset: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs of a task spec: a file, a directory of files (in name order, the
    requested split's when the files are named by split), a `datasets` folder, or a hub id."""
    if HUB_ID.match(spec) and file_format(Path(spec)) not in FORMATS and not Path(spec).exists():
        yield from hub_records(spec, split, subset)
        return
    path = resolve_task_path(spec)
    if path.is_dir() and any((path / name).is_file() for name in DATASETS_FOLDER):
        yield from disk_dataset_records(path, split)
        return
    files = split_files(path, split) if path.is_dir() else [path]
    for file in files:
        yield from read_records(file)


def split_files(directory: Path, split: str) -> list[Path]:
    """The directory's task files; when they are named by split (train.parquet, test.parquet,
    train-00000-of-00002.parquet), only the requested split's."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and file_format(p) in FORMATS)
    if not files:
        raise MinproError(f"{directory}: no {'/'.join(FORMATS)} files in this directory")
    by_split: dict[str, list[Path]] = {}
    for file in files:
        name = file.name[: -len(file_format(file))].split("-")[0]
        if name in SPLIT_NAMES:
            by_split.setdefault(name, []).append(file)
    if not by_split:
        return files
    if split not in by_split:
        raise MinproError(
            f"{directory}: its files are named by split ({', '.join(sorted(by_split))}) and none is '{split}'; "
            "set data.train_split / data.eval_split to one of them"
        )
    return by_split[split]


def hub_records(spec: str, split: str, subset: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """A hub dataset's split from the local `datasets` cache only: minpro never downloads."""
    export = (
        f"python -c \"import datasets; datasets.load_dataset('{spec}'{f', {subset!r}' if subset else ''}, "
        f"split='{split}').to_parquet('{spec.split('/')[-1]}-{split}.parquet')\""
    )
    remedy = f"where there is network, run {export} and point the data key at that file"
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets

        datasets.disable_progress_bars()
        dataset = datasets.load_dataset(spec, subset, split=split)
    except ImportError:
        raise MinproError(f"'{spec}' is not a local path; reading a hub dataset id needs `datasets`; {remedy}") from None
    except Exception as exc:  # noqa: BLE001 — datasets raises many kinds when offline and not cached
        raise MinproError(
            f"'{spec}' is not a local path, and the hub dataset of that id (split '{split}') is not in the local "
            f"cache ({type(exc).__name__}); minpro never downloads at run time: {remedy}"
        ) from None
    for i, record in enumerate(dataset):
        yield f"{spec}[{split}] row {i}", record


def disk_dataset_records(path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A `save_to_disk` folder, read by `datasets.load_from_disk`; a DatasetDict gives `split`."""
    try:
        import datasets
    except ImportError:
        raise MinproError(f"{path} is a `datasets` save_to_disk folder; reading it needs `pip install datasets`") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 — datasets' errors for a damaged folder vary
        raise MinproError(f"{path}: cannot read this `datasets` folder ({type(exc).__name__}: {exc})"[:400]) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MinproError(
                f"{path}: a DatasetDict with splits {', '.join(loaded)}, none of them '{split}'; set data.train_split "
                "/ data.eval_split to one of them"
            )
        loaded, path = loaded[split], path / split
    for i, record in enumerate(loaded):
        yield f"{path} row {i}", record


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` is 'file:line' or 'file row N' for error messages."""
    form = file_format(path)
    try:
        if form in (".jsonl", ".jsonl.gz", ".json.gz") or (form == ".json" and is_json_lines(path)):
            with open_text(path) as fh:
                for line_no, line in enumerate(fh, start=1):
                    if line.strip():
                        yield f"{path}:{line_no}", _object(json.loads(line), f"{path}:{line_no}")
        elif form == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            records = data.get("data", data.get("rows")) if isinstance(data, dict) else data
            if not isinstance(records, list):
                raise MinproError(f"{path}: expected a list of problems (or {{'data': [...]}})")
            for i, record in enumerate(records):
                yield f"{path} item {i}", _object(record, f"{path} item {i}")
        elif form in (".parquet", ".arrow"):
            table = pq.read_table(path) if form == ".parquet" else read_arrow(path)
            for i, record in enumerate(table.to_pylist()):
                yield f"{path} row {i}", record
        else:
            with open(path, encoding="utf-8", newline="") as fh:
                for i, record in enumerate(csv.DictReader(fh), start=2):
                    yield f"{path}:{i}", record
    except json.JSONDecodeError as exc:
        raise MinproError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise MinproError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); re-save it as UTF-8") from None
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise MinproError(f"{path}: cannot read ({exc})") from None


def open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def is_json_lines(path: Path) -> bool:
    """A `.json` file holding one object per line (`Dataset.to_json`'s default): its first
    non-blank line is a whole JSON object and more text follows."""
    with open(path, encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
        rest = next((line for line in fh if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict) and bool(rest)
    except json.JSONDecodeError:
        return False


def read_arrow(path: Path) -> pa.Table:
    """An Arrow file: the IPC stream `datasets` writes, or the IPC file format."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MinproError(f"{where}: expected an object with the problem's fields, got {type(record).__name__}")
    return record
