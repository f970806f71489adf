"""Reading and following run logs, by name, as ``tail -F`` does.

Used by ``hpcexp logs`` for local runs and by the Slurm executor for jobs and sweeps
(several files interleaved, each line prefixed). What it guarantees:

- follow by *name*: when the file is replaced (rotation, a requeued job re-creating it)
  the old file is drained, then the new one is read from its start; when it shrinks
  (truncation) reading restarts at 0;
- a file that does not exist yet is waited for;
- invalid UTF-8 is replaced, never an exception; multi-byte characters split between
  two reads are decoded whole;
- bounded memory: files are read in chunks and a line longer than the chunk is passed on
  in pieces;
- ``until()`` is asked before each pass; once it says the run is over, every file is
  drained to its end and follow returns.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
import sys
import time
from pathlib import Path
from typing import IO, Callable, Sequence

CHUNK = 65536
TAIL_BLOCK = 65536


def tail_offset(fd: int, size: int, lines: int) -> int:
    """Offset in the first ``size`` bytes of ``fd`` where its last ``lines`` lines begin."""
    if lines <= 0:
        return size
    pos = size
    newlines = 0
    # a final newline ends the last line; it does not start another one
    end = size
    if size > 0 and os.pread(fd, 1, size - 1) == b"\n":
        end = size - 1
    pos = end
    while pos > 0:
        start = max(0, pos - TAIL_BLOCK)
        block = os.pread(fd, pos - start, start)
        idx = len(block)
        while True:
            idx = block.rfind(b"\n", 0, idx)
            if idx < 0:
                break
            newlines += 1
            if newlines == lines:
                return start + idx + 1
        pos = start
    return 0


def open_log(path: Path) -> int:
    """A descriptor of log file ``path``: never blocks on a FIFO or device, never follows a
    symlink (hpcexp writes logs itself, so neither is a log). OSError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; not followed", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def tail_lines(path: Path, lines: int | None) -> bytes:
    """The last ``lines`` lines of ``path`` (all of it when None); b"" when it does not exist."""
    try:
        fd = open_log(path)
    except FileNotFoundError:
        return b""
    try:
        size = os.fstat(fd).st_size
        start = 0 if lines is None else tail_offset(fd, size, lines)
        chunks = []
        pos = start
        while pos < size:
            data = os.pread(fd, min(CHUNK, size - pos), pos)
            if not data:
                break
            chunks.append(data)
            pos += len(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Followed:
    """One followed file: its name, the open file, where we are, and a pending partial line."""

    def __init__(self, prefix: str, path: Path, lines: int | None) -> None:
        self.prefix = prefix.encode("utf-8")
        self.path = Path(path)
        self.lines = lines
        self.fd: int | None = None
        self.ino: tuple[int, int] | None = None
        self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.mid_line = False
        self.carry = b""
        self.first_open = True

    def _open(self) -> bool:
        try:
            fd = open_log(self.path)
        except OSError:
            return False
        st = os.fstat(fd)
        self.fd, self.ino = fd, (st.st_dev, st.st_ino)
        self.decoder.reset()
        if self.first_open and self.lines is not None:
            self.pos = tail_offset(fd, st.st_size, self.lines)
        else:
            self.pos = 0
        self.first_open = False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def _emit(self, data: bytes, out: IO[bytes], final: bool = False) -> None:
        text = self.decoder.decode(data, final).encode("utf-8")
        if not self.prefix:
            if text:
                out.write(text)
            return
        # prefixed streams are interleaved with others: pass on whole lines only, except a
        # line longer than CHUNK, which goes on in pieces (bounded memory)
        data = self.carry + text
        parts = data.split(b"\n")
        self.carry = parts.pop()
        for part in parts:
            out.write((b"" if self.mid_line else self.prefix) + part + b"\n")
            self.mid_line = False
        if len(self.carry) >= CHUNK or (final and self.carry):
            out.write((b"" if self.mid_line else self.prefix) + self.carry)
            self.carry = b""
            self.mid_line = True

    def drain(self, out: IO[bytes], budget: int = 64) -> bool:
        """Read what is new (at most ``budget`` chunks); True when anything was read."""
        if self.fd is None and not self._open():
            return False
        assert self.fd is not None
        got = False
        size = os.fstat(self.fd).st_size
        if size < self.pos:  # truncated in place: start again from the top
            self.pos = 0
            self.decoder.reset()
        for _ in range(budget):
            data = os.pread(self.fd, CHUNK, self.pos)
            if not data:
                break
            self.pos += len(data)
            self._emit(data, out)
            got = True
        return got

    def rotated(self) -> bool:
        """True when the name now points to another file (renamed away, re-created)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # removed: keep the old one until a new file appears
        return (st.st_dev, st.st_ino) != self.ino

    def finish(self, out: IO[bytes]) -> None:
        self._emit(b"", out, final=True)
        if self.prefix and self.mid_line:
            out.write(b"\n")
            self.mid_line = False


def follow(paths: Sequence[tuple[str, Path]], until: Callable[[], bool], *, out: IO[bytes] | None = None,
           lines: int | None = None, poll: float = 0.2) -> None:
    """Follow several files by name until ``until()`` is true and everything is drained.

    ``paths`` are (prefix, path) pairs; each line of a file with a non-empty prefix is
    written with that prefix (use "" for a single raw stream). ``lines``: start with the
    last N lines of each file that exists when first opened (None: from the beginning).
    """
    sink: IO[bytes] = out if out is not None else sys.stdout.buffer
    files = [_Followed(prefix, Path(p), lines) for prefix, p in paths]
    try:
        while True:
            done = until()
            progressed = False
            for f in files:
                if f.drain(sink):
                    progressed = True
                if f.fd is not None and f.rotated():
                    f.drain(sink, budget=1 << 30)  # what was written to the old file first
                    f.finish(sink)
                    f.close()
                    f.first_open = False
                    progressed = True
            if progressed:
                sink.flush()
            if done and not progressed:
                for f in files:
                    while f.drain(sink):
                        pass
                    f.finish(sink)
                sink.flush()
                return
            if not progressed:
                time.sleep(poll)
    finally:
        for f in files:
            f.close()


def show(paths: Sequence[tuple[str, Path]], *, out: IO[bytes] | None = None, lines: int | None = None) -> None:
    """Print the files once (the last ``lines`` lines of each), with their prefixes."""
    follow(paths, lambda: True, out=out, lines=lines, poll=0)
