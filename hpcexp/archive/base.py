"""What every part of the archive package shares: sizes, the member-name printer, the fault hook.

Kept apart so that scanning, writing, reading and extracting depend on it and on nothing of
each other's.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tarfile
import time
from typing import Callable

CHUNK = 1 << 20                  # read/write granularity: large copies, bounded memory
SMALL = 1 << 20                  # files up to this size are read in one call
ZIP_MIN_TIME = 315532800         # 1980-01-01, the earliest time a zip entry can hold
GZIP_LEVEL = 6                   # what `tar czf` (gzip -6) and `zip` use; level 9 is ~3x slower
TAR_RECORD = tarfile.RECORDSIZE
FAULT_ENV = "HPCEXP_TEST_FAULT"


FORMATS = ("tar.gz", "zip")


Warn = Callable[[str], None]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def show(name: str) -> str:
    """A member name safe to print on one line (control characters escaped)."""
    if _CONTROL.search(name) or any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return repr(name.encode("utf-8", "surrogateescape"))[2:-1]
    return name


def fault(point: str) -> None:
    """Test hook: ``HPCEXP_TEST_FAULT=archive.write:sleep`` (or ``:enospc``, ``:sigterm``) at ``point``.

    Points, in order: ``archive.scan`` (first pass, nothing written yet), ``archive.write``
    (MANIFEST.json written), ``archive.member`` (inside a file larger than SMALL, after
    its first chunk), ``archive.close`` (every member written, the end of the stream
    not), ``archive.publish`` (the stream is complete, the file not renamed yet), and
    ``archive.abort`` (a failure is being cleaned up).
    ``sigterm`` sends this process SIGTERM there, as ``kill`` or ``scancel`` would.
    """
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.split(","):
        where, _, what = item.partition(":")
        if where != point:
            continue
        if what == "sleep":
            time.sleep(float(os.environ.get("HPCEXP_TEST_FAULT_SECONDS", "60")))
        elif what == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif what == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts this at once; without one the signal kills us


def is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
