"""The one place where stages write files: atomically, so a crash never leaves a
half-written file at a final path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; move it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def filter_jsonl_atomic(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Rewrite a JSON-lines file with only the rows `keep` accepts and return them ([] and no
    file when there is none): how a resumed run drops the lines of rounds it will redo."""
    if not path.exists():
        return []
    rows = [r for r in read_jsonl(path) if keep(r)]
    write_jsonl_atomic(path, rows)
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line; a crash can at worst lose this line, never corrupt earlier ones."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def directory_done_marker(path: Path) -> Path:
    return Path(path) / ".complete"


def write_directory_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary directory with `fill(tmp_dir)`, then rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        fill(tmp)
        publish_directory(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def publish_directory(tmp: Path, final: Path) -> None:
    """Mark a filled directory complete and rename it to `final`, replacing any earlier one."""
    directory_done_marker(tmp).write_text("ok\n")
    if final.exists():  # move the old one aside first: a crash here still leaves one complete copy
        retired = final.with_name(f".{final.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(tmp, final)
        shutil.rmtree(retired)
    else:
        os.replace(tmp, final)
