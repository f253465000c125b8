"""Atomic writes: a failed write leaves the previous complete copy in place."""

from __future__ import annotations

import os
import stat

import pytest

from minpro_cli.fileio import directory_done_marker, write_directory_atomic, write_text_atomic


def test_rewrite_replaces_and_failure_keeps_the_old_copy(tmp_path):
    final = tmp_path / "final"
    write_directory_atomic(final, lambda d: (d / "w.txt").write_text("one"))
    write_directory_atomic(final, lambda d: (d / "w.txt").write_text("two"))
    assert (final / "w.txt").read_text() == "two" and directory_done_marker(final).exists()

    def crash(d):
        (d / "w.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_directory_atomic(final, crash)
    assert (final / "w.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary leftovers


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
