"""hpcexp.execute.logs: tail, and follow by name (tail -F semantics), without a real run."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

from hpcexp.execute import logs


def _follow_in_thread(paths, done: threading.Event, **kw):
    out = io.BytesIO()
    th = threading.Thread(target=logs.follow, args=(paths, done.is_set), kwargs={"out": out, "poll": 0.01, **kw})
    th.start()
    return th, out


def _wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_tail_lines_counts_from_the_end(tmp_path: Path) -> None:
    f = tmp_path / "a.log"
    f.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    assert logs.tail_lines(f, 3) == b"line 997\nline 998\nline 999\n"
    assert logs.tail_lines(f, 0) == b""
    assert logs.tail_lines(f, None) == f.read_bytes()
    assert logs.tail_lines(f, 5000) == f.read_bytes()
    f.write_bytes(b"a\nb\nno newline at end")
    assert logs.tail_lines(f, 2) == b"b\nno newline at end"
    assert logs.tail_lines(tmp_path / "missing.log", 3) == b""


def test_tail_lines_across_blocks(tmp_path: Path) -> None:
    f = tmp_path / "big.log"
    long_line = b"x" * (logs.TAIL_BLOCK * 2 + 17)
    f.write_bytes(b"first\n" + long_line + b"\nlast\n")
    assert logs.tail_lines(f, 2) == long_line + b"\nlast\n"


def test_show_prefixes_lines_and_replaces_invalid_utf8(tmp_path: Path) -> None:
    a, b = tmp_path / "out", tmp_path / "err"
    a.write_bytes(b"one\ntwo\xff\n")
    b.write_bytes("drei \u20ac\n".encode())
    out = io.BytesIO()
    logs.show([("out: ", a), ("err: ", b)], out=out)
    assert out.getvalue() == "out: one\nout: two\ufffd\nerr: drei \u20ac\n".encode()


def test_follow_reads_appends_until_done_then_drains(tmp_path: Path) -> None:
    f = tmp_path / "stdout.log"
    done = threading.Event()
    th, out = _follow_in_thread([("", f)], done)
    time.sleep(0.05)  # the file does not exist yet: follow waits for it
    with open(f, "ab") as fh:
        fh.write(b"first\n")
        fh.flush()
        assert _wait_for(lambda: b"first\n" in out.getvalue())
        fh.write(b"second\n")
    done.set()
    th.join(timeout=10)
    assert not th.is_alive()
    assert out.getvalue() == b"first\nsecond\n"


def test_follow_survives_rotation_and_truncation(tmp_path: Path) -> None:
    f = tmp_path / "stdout.log"
    f.write_bytes(b"a1\n")
    done = threading.Event()
    th, out = _follow_in_thread([("", f)], done)
    assert _wait_for(lambda: out.getvalue() == b"a1\n")
    # rotation: the name now points to a new file; what was appended to the old one comes first
    with open(f, "ab") as fh:
        fh.write(b"a2\n")
    os.rename(f, tmp_path / "stdout.log.1")
    f.write_bytes(b"b1\n")
    assert _wait_for(lambda: out.getvalue().endswith(b"b1\n")), out.getvalue()
    # truncation in place: start again from 0
    with open(f, "r+b") as fh:
        fh.truncate(0)
    time.sleep(0.1)
    with open(f, "ab") as fh:
        fh.write(b"c1\n")
    assert _wait_for(lambda: out.getvalue().endswith(b"c1\n")), out.getvalue()
    done.set()
    th.join(timeout=10)
    assert out.getvalue() == b"a1\na2\nb1\nc1\n"


def test_follow_last_n_lines_then_new_ones(tmp_path: Path) -> None:
    f = tmp_path / "stdout.log"
    f.write_bytes(b"".join(b"%d\n" % i for i in range(10)))
    done = threading.Event()
    th, out = _follow_in_thread([("", f)], done, lines=2)
    assert _wait_for(lambda: out.getvalue() == b"8\n9\n")
    with open(f, "ab") as fh:
        fh.write(b"10\n")
    done.set()
    th.join(timeout=10)
    assert out.getvalue() == b"8\n9\n10\n"


def test_follow_interleaves_prefixed_files_and_splits_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    done = threading.Event()
    th, out = _follow_in_thread([("[0] ", a), ("[1] ", b)], done)
    with open(a, "ab") as fa, open(b, "ab") as fb:
        fa.write(b"par")
        fa.flush()
        time.sleep(0.05)
        fb.write(b"B line\n")
        fb.flush()
        time.sleep(0.05)
        fa.write(b"tial\n")
        fa.write("euro \u20ac".encode()[:-1])  # a multi-byte character split between two reads
        fa.flush()
        time.sleep(0.05)
        fa.write("\u20ac".encode()[-1:] + b"\n")
    done.set()
    th.join(timeout=10)
    lines = out.getvalue().decode().splitlines()
    assert "[1] B line" in lines
    assert "euro \u20ac" in "".join(lines)
    assert all(line.startswith(("[0] ", "[1] ")) or not line.startswith("[") for line in lines)
    assert out.getvalue().count(b"[1] ") == 1


def test_follow_passes_huge_lines_in_bounded_pieces(tmp_path: Path) -> None:
    f = tmp_path / "huge"
    payload = b"y" * (logs.CHUNK * 5 + 3) + b"\n"
    f.write_bytes(payload)
    out = io.BytesIO()
    logs.show([("p: ", f)], out=out)
    assert out.getvalue() == b"p: " + payload
