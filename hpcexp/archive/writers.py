"""Pass 2 of ``create``: the tar.gz and zip writers, the gzip compressor and the sink they write to.

The writers know nothing of runs or files on disk beyond a :class:`_Source` checked
against what pass 1 hashed, and they write into a :class:`_Sink` wrapping any raw binary
stream; the sink can be cut on failure so that nothing a stdlib stream still holds
reaches a closed file. They are apart from ``create`` so that anything holding a scanned
run can stream an archive with :func:`write_archive` (a web server into its response,
no temporary file); ``create`` only adds the temporary file and its rename.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import queue
import shutil
import stat
import tarfile
import threading
import time
import zipfile
from typing import IO, Any, Iterable, Iterator

from hpcexp.archive.base import CHUNK, GZIP_LEVEL, SMALL, TAR_RECORD, ZIP_MIN_TIME, fault, show
from hpcexp.archive.manifest import MANIFEST_NAME


class Changed(Exception):
    """A file differs between the hashing pass and the writing pass."""


class _Source:
    """A regular file reopened for pass 2, checked against what pass 1 saw."""

    def __init__(self, src: str, arcname: str, size: int, digest: str, ino: int) -> None:
        self.arcname, self.size, self.digest = arcname, size, digest
        try:
            self.fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise Changed(f"{show(arcname)} could not be reopened ({exc.strerror})") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or st.st_size != size:
            os.close(self.fd)
            raise Changed(f"{show(arcname)} changed while archiving (size {size} -> {st.st_size})")
        self.hash = hashlib.sha256()
        self.left = size

    def chunks(self, buf: bytearray) -> Iterator[memoryview]:
        view = memoryview(buf)
        while self.left > 0:
            n = os.readv(self.fd, [view[:min(self.left, len(buf))]])
            if n == 0:
                raise Changed(f"{show(self.arcname)} shrank while archiving")
            chunk = view[:n]
            self.hash.update(chunk)
            self.left -= n
            yield chunk
            fault("archive.member")

    def read_all(self) -> bytes:
        parts = []
        got = 0
        while got <= self.size:  # read one byte past the size: a file that grew is caught
            part = os.read(self.fd, self.size + 1 - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
        if len(data) != self.size:
            raise Changed(f"{show(self.arcname)} changed size while archiving")
        self.hash.update(data)
        self.left = 0
        return data

    def finish(self) -> None:
        os.close(self.fd)
        if self.hash.hexdigest() != self.digest:
            raise Changed(f"{show(self.arcname)} changed while archiving (sha256 differs)")


class _Sink:
    """The temporary archive file as the gzip and zip streams see it, until :meth:`cut`.

    A stdlib stream that is not closed writes its tail when it is finalised (GzipFile,
    its BufferedWriter, ZipFile and an open zip member all do), which after the file is
    closed is ``ValueError: write to closed file``: an "Exception ignored" traceback on
    Python 3.13, where IOBase finalisers report errors. Failing writers therefore cut
    the sink first and then close their streams: whatever they still write is counted
    and dropped, on every Python version, and only then is the file closed and removed.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw: IO[bytes] | None = raw
        self.pos = 0                       # the position once cut (zipfile asks for it)

    def cut(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                self.pos = raw.tell()
            except (OSError, ValueError):
                pass

    def write(self, data: bytes | memoryview) -> int:
        raw = self.raw
        if raw is None:
            self.pos += len(data)
            return len(data)
        return raw.write(data)

    def tell(self) -> int:
        raw = self.raw
        return self.pos if raw is None else raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        raw = self.raw
        if raw is not None:
            return raw.seek(offset, whence)
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        return self.pos

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        raw = self.raw
        if raw is not None:
            raw.flush()

    def close(self) -> None:
        """Nothing: the file belongs to atomic_open, which closes and renames or removes it."""


class _Compressor:
    """gzip in a second thread (zlib releases the GIL), as `tar czf` pipes into gzip."""

    def __init__(self, sink: _Sink) -> None:
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL,
                                mtime=0)
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.dropping = False              # aborting: compress nothing more
        self.thread = threading.Thread(target=self._work, name="hpcexp-gzip", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None and not self.dropping:
                try:
                    self.gz.write(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the writer thread
                    self.error = exc

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        """Finish the stream: the worker drains the queue, then the gzip trailer is written."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.gz.close()

    def abort(self) -> None:
        """Stop the worker and close the gzip stream (its sink is cut: nothing is written)."""
        self.dropping = True
        try:
            self.q.put(None)
            self.thread.join()
        finally:
            with contextlib.suppress(Exception):
                self.gz.close()


def _ustar_header(name: str, kind: bytes, size: int, mode: int, mtime: int, linkname: str) -> bytes | None:
    """The header tarfile would write for a short ASCII member (byte for byte), ~10x faster.

    tarfile's ``tobuf`` costs ~100 us per member in pure Python, which dominated archives of
    100,000 small files; anything unusual (long or non-ASCII names, huge sizes) returns None
    and goes through tarfile, which adds the pax records it needs.
    """
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if not (name.isascii() and linkname.isascii() and len(name) <= 100 and len(linkname) <= 100
            and 0 <= size < 8 ** 11 and 0 <= mtime < 8 ** 11) or "\x00" in name or "\x00" in linkname:
        return None
    buf = b"".join((
        name.encode("ascii").ljust(100, b"\0"),
        b"%07o\0" % (mode & 0o7777), b"0000000\0", b"0000000\0",
        b"%011o\0" % size, b"%011o\0" % mtime,
        b"        ", kind, linkname.encode("ascii").ljust(100, b"\0"),
        b"ustar\x0000", b"\0" * 247,  # uname, gname, devmajor, devminor, prefix: empty
    ))
    return buf[:148] + b"%06o\0 " % sum(buf) + buf[156:]


class _TarGzWriter:
    """A ustar/pax stream written member by member (no member list kept in memory)."""

    def __init__(self, sink: _Sink, mtime: int) -> None:
        self.out = _Compressor(sink)
        self.mtime = mtime
        self.buf = bytearray()
        self.offset = 0

    def _put(self, data: bytes | memoryview) -> None:
        self.buf += data
        self.offset += len(data)
        if len(self.buf) >= CHUNK:
            self.out.write(bytes(self.buf))
            self.buf.clear()

    def _pad(self, size: int) -> None:
        rem = size % tarfile.BLOCKSIZE
        if rem:
            self._put(tarfile.NUL * (tarfile.BLOCKSIZE - rem))

    def _header(self, name: str, kind: bytes, size: int = 0, mode: int = 0o644, linkname: str = "") -> None:
        fast = _ustar_header(name, kind, size, mode, self.mtime, linkname)
        if fast is not None:
            self._put(fast)
            return
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode, ti.mtime, ti.linkname = kind, size, mode, self.mtime, linkname
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        self._put(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_bytes_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        self._header(name, tarfile.REGTYPE, size)
        left = size
        while left:
            data = stream.read(min(CHUNK, left))
            if not data:
                raise Changed(f"{name} shrank while archiving")
            self._put(data)
            left -= len(data)
        self._pad(size)

    def add_file(self, source: _Source, mode: int, buf: bytearray) -> None:
        self._header(source.arcname, tarfile.REGTYPE, source.size, mode)
        if source.size <= SMALL:
            self._put(source.read_all())
        else:
            for chunk in source.chunks(buf):
                self._put(chunk)
        self._pad(source.size)

    def add_dir(self, name: str) -> None:
        self._header(name, tarfile.DIRTYPE, mode=0o755)

    def add_symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, mode=0o777, linkname=target)

    def close(self) -> None:
        self._put(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        rem = self.offset % TAR_RECORD
        if rem:
            self._put(tarfile.NUL * (TAR_RECORD - rem))
        if self.buf:
            self.out.write(bytes(self.buf))
            self.buf.clear()
        self.out.close()

    def abort(self) -> None:
        """After :meth:`_Sink.cut`: stop compressing; the original error is what matters."""
        with contextlib.suppress(Exception):
            self.out.abort()


class _ZipWriter:
    """zip with deflate level 6, zip64 where needed, fixed timestamps."""

    def __init__(self, sink: _Sink, mtime: int) -> None:
        self.zf = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=GZIP_LEVEL,
                                  allowZip64=True)
        self.date_time = time.gmtime(max(mtime, ZIP_MIN_TIME))[:6]

    def _info(self, name: str, mode: int, compress: bool = True) -> zipfile.ZipInfo:
        zi = zipfile.ZipInfo(name, date_time=self.date_time)
        zi.create_system = 3
        zi.external_attr = (mode & 0xFFFF) << 16
        zi.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        return zi

    def add_bytes_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        zi = self._info(name, stat.S_IFREG | 0o644)
        zi.file_size = size
        with self.zf.open(zi, "w") as dst:
            shutil.copyfileobj(stream, dst, CHUNK)

    def add_file(self, source: _Source, mode: int, buf: bytearray) -> None:
        zi = self._info(source.arcname, stat.S_IFREG | mode)
        if source.size <= SMALL:
            self.zf.writestr(zi, source.read_all())
            return
        zi.file_size = source.size
        # file_size is known, so zipfile switches to zip64 by itself when the member needs it
        with self.zf.open(zi, "w") as dst:
            for chunk in source.chunks(buf):
                dst.write(chunk)

    def add_dir(self, name: str) -> None:
        zi = self._info(name + "/", stat.S_IFDIR | 0o755, compress=False)
        zi.external_attr |= 0x10  # MS-DOS directory bit
        self.zf.writestr(zi, b"")

    def add_symlink(self, name: str, target: str) -> None:
        self.zf.writestr(self._info(name, stat.S_IFLNK | 0o777, compress=False), target.encode("utf-8"))

    def close(self) -> None:
        self.zf.close()

    def abort(self) -> None:
        """After :meth:`_Sink.cut`: close the zip (its central directory goes nowhere) so
        that neither it nor a member left open writes anything when finalised."""
        with contextlib.suppress(Exception):
            self.zf.close()


def write_archive(raw: IO[bytes], fmt: str, mtime: int, manifest: IO[bytes], manifest_size: int,
                  entries: Iterable[list[Any]]) -> None:
    """Write a whole archive into ``raw``: MANIFEST.json first, then every member pass 1 spooled.

    ``raw`` is any binary sink: the temporary file ``create`` renames into place, or a pipe
    or an HTTP response, which streams an archive without a temporary file (zip then writes
    data descriptors instead of seeking back). On any failure the sink is cut before the
    streams are closed, so nothing more reaches ``raw``; the caller owns and closes it.
    """
    buf = bytearray(CHUNK)
    sink = _Sink(raw)
    writer: _TarGzWriter | _ZipWriter = _TarGzWriter(sink, mtime) if fmt == "tar.gz" else _ZipWriter(sink, mtime)
    try:
        manifest.seek(0)
        writer.add_bytes_stream(MANIFEST_NAME, manifest_size, manifest)
        fault("archive.write")
        for entry in entries:
            kind, arcname = entry[0], entry[1]
            if kind == "dir":
                writer.add_dir(arcname)
            elif kind == "symlink":
                writer.add_symlink(arcname, entry[2])
            else:
                _, _, src, size, digest, perm, ino, _mt = entry
                source = _Source(src, arcname, size, digest, ino)
                try:
                    writer.add_file(source, perm, buf)
                except BaseException:
                    os.close(source.fd)
                    raise
                source.finish()
        fault("archive.close")
        writer.close()
        fault("archive.publish")
    except BaseException:
        # Streams before their file: cut the sink, close the streams into it, and only
        # then let the caller (atomic_open) close and remove the temporary file.
        fault("archive.abort")
        sink.cut()
        writer.abort()
        raise
