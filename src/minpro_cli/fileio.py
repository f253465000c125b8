"""How stages write files (atomically, so a crash never leaves a half-written file at a final
path; a full disk is an error naming the path) and read their own JSON-lines and YAML back
(a line cut short by a crash is dropped with a warning; YAML is bounded in size and aliases)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from minpro_cli.console import warn
from minpro_cli.errors import ConfigError, DiskFullError, InputFileError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: a file-size limit, same remedy
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after aliases are expanded: a few-line alias "bomb" expands to billions


@contextmanager
def disk_full_is_an_error(path: Path) -> Iterator[None]:
    """An error saying the disk (or a file-size limit) is full becomes a one-line error naming
    `path`: an OSError, or safetensors' error, which only quotes the OS error in its text."""
    try:
        yield
    except Exception as exc:
        quoted = re.search(r"os error (\d+)\)", str(exc))
        code = exc.errno if isinstance(exc, OSError) else int(quoted.group(1)) if quoted else None
        if code not in DISK_FULL:
            raise
        raise DiskFullError(
            f"cannot write {path}: {os.strerror(code)}; free space, then rerun the same command "
            "(finished outputs and checkpoints are intact)"
        ) from None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; move it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_is_an_error(final):
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


def write_json_output(path: Path, obj: Any) -> None:
    """A command's --json: the file (atomically), or stdout for `-` (tables go to stderr)."""
    if path == Path("-"):
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    else:
        write_json_atomic(path, obj)


def write_yaml_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def read_jsonl(path: Path, key: str | None = None, warn_incomplete: bool = True) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file minpro appends to, each with `key` when given. A last
    line cut short (a crash or a full disk during the append, or one being written now) is
    dropped, with a warning unless told not to; any other bad line is an error naming the file
    and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text (byte {exc.start}); move the file away") from None
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or (key is not None and key not in row):
            if number == len(lines):  # no newline after it: an append that did not finish
                if warn_incomplete:
                    warn(f"{path}: line {number} is incomplete (an interrupted write); ignoring it")
                break
            raise InputFileError(
                f"{path}: line {number} is not a JSON object" + (f" with '{key}'" if key else "")
                + "; this file was not written by minpro or was damaged: move it away"
            )
        rows.append(row)
    return rows


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def filter_jsonl_atomic(path: Path, key: str, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Rewrite a JSON-lines file with only the rows (each with `key`) that `keep` accepts and
    return them ([] and no file when there is none): how a resumed run drops the lines of
    rounds it will redo."""
    if not path.exists():
        return []
    rows = [r for r in read_jsonl(path, key) if keep(r)]
    write_jsonl_atomic(path, rows)
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line; a crash can at worst lose this line, never corrupt earlier ones."""
    with disk_full_is_an_error(path), open(path, "a", encoding="utf-8") as fh:
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
    usual_permissions(tmp)
    if final.exists() or final.is_symlink():  # move the old one aside first: a crash here still leaves one
        retired = final.with_name(f".{final.name}.old")
        if retired.exists() or retired.is_symlink():
            remove(retired)
        os.replace(final, retired)
        os.replace(tmp, final)
        remove(retired)  # a symlinked final/ is replaced; its target is left alone
    else:
        os.replace(tmp, final)


def usual_permissions(directory: Path) -> None:
    """Files 0666 and directories 0777 less the umask, as other tools write them: some writers
    (save_pretrained's temp files) make 0600, which other users of a shared disk cannot read."""
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def remove(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses documents whose alias-expanded size exceeds MAX_YAML_NODES."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            expanded_size(node, {}, set())
        return node


def expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes `node` stands for once every alias is expanded (memoised: linear in the document)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.YAMLError("a YAML alias refers to a node that contains it (a recursive structure)")
    open_.add(id(node))
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
        check_unique_keys(node)
    size = 1 + sum(expanded_size(child, sizes, open_) for child in children)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise yaml.YAMLError(f"aliases expand it to more than {MAX_YAML_NODES} nodes")
    sizes[id(node)] = size
    return size


def check_unique_keys(node: yaml.MappingNode) -> None:
    """A key given twice in one mapping is an error: YAML loaders keep the last one silently,
    so a second `optim:` section would replace the first whole."""
    lines: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
            continue
        if key.value in lines:
            raise yaml.YAMLError(
                f"key '{key.value}' is given twice (lines {lines[key.value]} and {key.start_mark.line + 1}); "
                "keep one (merge the two sections)"
            )
        lines[key.value] = key.start_mark.line + 1


def parse_yaml(text: str, where: str) -> Any:
    """YAML from text (safe: plain data only), bounded in alias expansion; errors name `where`."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply for a recipe)") from None


def read_yaml(path: Path) -> Any:
    """A YAML file of at most MAX_YAML_BYTES of UTF-8 text, parsed by `parse_yaml`."""
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    data = path.read_bytes()
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes, more than a recipe's {MAX_YAML_BYTES}; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a YAML text file") from None
    return parse_yaml(text, str(path))
