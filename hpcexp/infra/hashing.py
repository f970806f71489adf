"""Content hashes of files, with a stat cache so unchanged large files are not re-read.

An image's identity includes the sha256 of every file its recipe copies in; a no-op
``hpcexp build`` must not read a 1 GiB data file again. As git's index does, we remember
``(size, mtime_ns, inode)`` of each file we hashed and trust the stored digest while all
three are unchanged.

The "racily clean" problem (a file rewritten within the same mtime tick after we hashed
it, with the same size) is handled as git does: an entry whose mtime is not older than
the moment we stat'ed it by at least :data:`RACY_SECONDS` is never stored, so it is
simply hashed again next time.

The cache is a plain JSON file (``Layout.stat_cache()``), written atomically; a lost
update between two concurrent writers only costs a re-hash, never a wrong answer,
because every entry is checked against a fresh ``stat`` before use.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from hpcexp.infra import atomic
from hpcexp.infra.digest import sha256_hex

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RACY_SECONDS = 2.0
CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's content, read in large chunks into one reused buffer.

    hashlib's sha256 releases the GIL and uses OpenSSL's implementation, so this runs at
    about the speed of ``sha256sum``.
    """
    import hashlib  # OpenSSL's sha256, several times faster per byte; loaded for files only

    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return sha256_hex(text.encode("utf-8"))


def listing_digest(names: list[str]) -> str:
    """sha256 of a folder's entry names (folders with a trailing ``/``), in sorted order."""
    return sha256_hex("\0".join(sorted(names)).encode("utf-8", "surrogateescape"))


def folder_listing(path: str) -> list[str] | None:
    """The entry names of folder ``path`` as :func:`listing_digest` takes them; None when unreadable."""
    try:
        with os.scandir(path) as it:
            return [e.name + "/" if e.is_dir(follow_symlinks=False) else e.name for e in it]
    except OSError:
        return None


class StatCache:
    """Digest cache keyed by absolute path and validated by (size, mtime_ns, inode)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[int | str]] = {}
        self.dirty = False
        self.hits = 0
        self.misses = 0
        if path is not None:
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
            self.entries = data["files"]

    def digest(self, path: Path | str, st: os.stat_result | None = None) -> str:
        """sha256 of ``path``; from the cache when size, mtime and inode are unchanged."""
        key = os.path.abspath(path)
        if st is None:
            st = os.stat(key)
        entry = self.entries.get(key)
        if (isinstance(entry, list) and len(entry) == 4 and entry[0] == st.st_size
                and entry[1] == st.st_mtime_ns and entry[2] == st.st_ino):
            self.hits += 1
            return str(entry[3])
        self.misses += 1
        now = time.time()
        digest = sha256_file(key)
        if now - st.st_mtime_ns / 1e9 >= RACY_SECONDS:
            self.entries[key] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
            self.dirty = True
        elif key in self.entries:
            del self.entries[key]
            self.dirty = True
        return digest

    def save(self) -> None:
        """Write the cache if anything changed; failures are logged, never raised (it is a cache)."""
        if not self.dirty or self.path is None:
            return
        # Forget files that no longer exist so the cache does not grow forever.
        self.entries = {k: v for k, v in self.entries.items() if os.path.lexists(k)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path, json.dumps({"version": CACHE_VERSION, "files": self.entries},
                                                    sort_keys=True, separators=(",", ":")))
            self.dirty = False
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
            log.info("could not write hash cache %s: %s", self.path, exc)
