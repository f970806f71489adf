"""MANIFEST.json: written (streamed, one member per line) and read back (line by line).

The manifest is the archive's first member and its contract (invariant I7): path, size
and sha256 of every member, each run's provenance and hpcexp's version. Writing and
reading it are kept together so the layout the reader relies on is the one written.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from hpcexp import __version__
from hpcexp.archive.reader import Member
from hpcexp.archive.scan import ScannedRun, Scanner
from hpcexp.errors import Failure

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "hpcexp-archive"
MANIFEST_SCHEMA = 1


def write_manifest(runs: list[ScannedRun], scanner: Scanner, spool_out: IO[bytes]) -> int:
    """Write MANIFEST.json (one member per line, so it is streamed, never held whole)."""
    images: dict[tuple[str | None, str], None] = {}
    for run in runs:
        if run.info.get("image_sha256"):
            images[(run.info.get("image"), str(run.info["image_sha256"]))] = None
    head = {
        "format": MANIFEST_FORMAT,
        "schema": MANIFEST_SCHEMA,
        "hpcexp_version": __version__,
        "images": [{"image": i, "sha256": s} for i, s in images],
    }
    image_sha = sorted({s for _, s in images})
    head["image_sha256"] = image_sha[0] if len(image_sha) == 1 else None

    def dump(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogateescape")

    out = spool_out
    out.write(b"{\n")
    for key, value in head.items():
        out.write(b'  "' + key.encode() + b'": ' + dump(value) + b",\n")
    out.write(b'  "runs": [\n')
    out.write(b",\n".join(b"    " + dump(r.info) for r in runs))
    out.write(b'\n  ],\n  "files": [\n')
    first = True
    for entry in scanner.entries_iter():
        kind, arcname = entry[0], entry[1]
        if kind == "file":
            item: dict[str, Any] = {"path": arcname, "type": "file", "size": entry[3], "sha256": entry[4]}
        elif kind == "symlink":
            target = entry[2]
            item = {"path": arcname, "type": "symlink", "target": target,
                    "size": len(target.encode("utf-8")),
                    "sha256": hashlib.sha256(target.encode("utf-8")).hexdigest()}
        else:
            item = {"path": arcname, "type": "dir"}
        out.write((b"" if first else b",\n") + b"    " + dump(item))
        first = False
    out.write(b'\n  ],\n  "skipped": [\n')
    out.write(b",\n".join(b"    " + dump(s) for s in scanner.skipped))
    totals = {"runs": len(runs), "files": scanner.files, "links": scanner.links, "bytes": scanner.bytes}
    out.write(b'\n  ],\n  "totals": ' + dump(totals) + b"\n}\n")
    out.flush()
    return out.tell()


def _compact(item: Any) -> tuple[str, tuple[str, int | None, bytes | str | None]] | None:
    """(path, compact entry) of one manifest entry: 100,000 entries must fit in a few MiB."""
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return None
    kind = sys.intern(str(item.get("type")))
    if kind == "file":
        try:
            digest: bytes | str | None = bytes.fromhex(str(item.get("sha256")))
        except ValueError:
            digest = None
        size = item.get("size") if isinstance(item.get("size"), int) else None
        return item["path"], (kind, size, digest)
    if kind == "symlink":
        return item["path"], (kind, None, str(item.get("target")))
    return item["path"], (kind, None, None)


def load_manifest(m: Member, archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest without its file list, {path: compact entry}).

    hpcexp writes one file entry per line, so the list is parsed line by line and never
    held as JSON objects (a manifest of 100,000 files would take ~100 MiB that way); any
    other valid layout falls back to parsing the whole document.
    """
    assert m.open is not None
    expected: dict[str, Any] = {}
    rest: list[str] = []
    in_files = False
    line_mode = True
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as copy:
        with m.open() as fh:
            for raw in fh:
                copy.write(raw)
                if not line_mode:
                    continue
                line = raw.decode("utf-8", "surrogateescape").strip()
                if in_files:
                    if line in ("]", "],"):
                        in_files = False
                        rest.append(line)
                        continue
                    try:
                        got = _compact(json.loads(line[:-1] if line.endswith(",") else line))
                    except ValueError:
                        got = None
                    if got is None:
                        line_mode = False
                        continue
                    expected[got[0]] = got[1]
                else:
                    if line == '"files": [':
                        in_files = True
                    rest.append(line)
        head: Any = None
        if line_mode:
            try:
                head = json.loads("\n".join(rest))
            except ValueError:
                head = None
        if not isinstance(head, dict) or not isinstance(head.get("files"), list):
            copy.seek(0)
            try:
                head = json.loads(copy.read().decode("utf-8", "surrogateescape"))
            except ValueError as exc:
                raise Failure(f"{archive}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
            if isinstance(head, dict) and isinstance(head.get("files"), list):
                expected = dict(e for e in map(_compact, head.pop("files")) if e is not None)
                head["files"] = []
    if not isinstance(head, dict) or head.get("format") != MANIFEST_FORMAT or not isinstance(head.get("files"), list):
        raise Failure(f"{archive}: {MANIFEST_NAME} is not an hpcexp manifest")
    return head, expected
