"""safeio.read_regular and a file replaced by rename while it is opened (a record being
rewritten as a reader opens it) against one swapped for something else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcexp.infra import safeio


def _replace_on_open(monkeypatch: pytest.MonkeyPatch, path: Path, times: int, make) -> list[int]:
    """Make os.open, as safeio calls it, replace ``path`` (via ``make``) before opening it, ``times`` times."""
    real_open = os.open
    calls = [0]

    def opening(target, flags, *a):
        if calls[0] < times and Path(target) == path:
            calls[0] += 1
            make(calls[0])
        return real_open(target, flags, *a)

    monkeypatch.setattr(safeio.os, "open", opening)
    return calls


def test_a_file_renamed_over_while_opened_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tmp_path / "run.json"
    rec.write_text('{"state": "running"}')

    def rewrite(n: int) -> None:
        tmp = tmp_path / f".tmp-{n}"
        tmp.write_text('{"state": "succeeded"}')
        os.replace(tmp, rec)

    calls = _replace_on_open(monkeypatch, rec, 1, rewrite)
    assert safeio.read_regular(rec, max_bytes=1000, what="run record") == b'{"state": "succeeded"}'
    assert calls[0] == 1


def test_a_file_replaced_on_every_look_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tmp_path / "run.json"
    rec.write_text("{}")

    def rewrite(n: int) -> None:
        tmp = tmp_path / f".tmp-{n}"
        tmp.write_text("{}")
        os.replace(tmp, rec)

    _replace_on_open(monkeypatch, rec, 1000, rewrite)
    with pytest.raises(safeio.Unsafe, match="changed while being opened"):
        safeio.read_regular(rec, max_bytes=1000, what="run record")


def test_a_file_swapped_for_a_fifo_while_opened_is_refused_at_once(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tmp_path / "run.json"
    rec.write_text("{}")

    def fifo(n: int) -> None:
        rec.unlink()
        os.mkfifo(rec)

    calls = _replace_on_open(monkeypatch, rec, 1000, fifo)
    with pytest.raises(safeio.Unsafe, match="changed while being opened"):
        safeio.read_regular(rec, max_bytes=1000, what="run record")
    assert calls[0] == 1


def test_a_file_swapped_for_a_symlink_while_opened_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = tmp_path / "run.json"
    rec.write_text("{}")
    (tmp_path / "secret").write_text("s3cret")

    def link(n: int) -> None:
        rec.unlink()
        rec.symlink_to(tmp_path / "secret")

    _replace_on_open(monkeypatch, rec, 1000, link)
    with pytest.raises(safeio.Unsafe, match="symbolic link"):
        safeio.read_regular(rec, max_bytes=1000, what="run record")
