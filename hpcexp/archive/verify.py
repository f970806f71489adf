"""``verify_archive``: every member checked against MANIFEST.json, every mismatch reported.

Files that differ, are missing, are not in the manifest or appear twice are all listed; a
damaged archive is reported at the member being read. It reads only, through ``reader``
and ``manifest``, which ``extract`` shares; neither of the two depends on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcexp.archive.base import show
from hpcexp.archive.manifest import MANIFEST_NAME, load_manifest
from hpcexp.archive.reader import READ_ERRORS, Corrupt, detect_format, hash_member, iter_members
from hpcexp.errors import Failure


@dataclass(frozen=True)
class Problem:
    """One member that does not match the manifest."""

    member: str
    kind: str                     # differs | missing | extra | duplicate | corrupt | manifest
    detail: str

    def line(self) -> str:
        return f"{show(self.member)}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    format: str
    ok: bool
    checked: int
    runs: list[str]
    problems: list[Problem]


def verify_archive(path: Path | str) -> VerifyReport:
    """Re-check every member against MANIFEST.json; the report lists every mismatch.

    Files that differ (size or sha256), are missing, are not in the manifest or appear
    twice are all listed; a damaged archive is reported at the member being read.
    """
    path = Path(path)
    fmt = detect_format(path)
    problems: list[Problem] = []
    expected: dict[str, Any] = {}   # path -> compact entry, or SEEN once checked
    runs: list[str] = []
    checked = 0
    have_manifest = False
    try:
        for i, m in enumerate(iter_members(path, fmt)):
            if m.name == MANIFEST_NAME and not have_manifest:
                if i != 0:
                    problems.append(Problem(m.name, "manifest", "not the first member"))
                head, expected = load_manifest(m, path)
                have_manifest = True
                runs = [str(r.get("path")) for r in head.get("runs", []) if isinstance(r, dict)]
                continue
            if not have_manifest:
                raise Failure(f"{path}: {MANIFEST_NAME} is not the first member (found {show(m.name)})",
                              hint="this is not an hpcexp archive, or it was re-packed")
            want = expected.get(m.name)
            if want is _SEEN:
                problems.append(Problem(m.name, "duplicate", "member appears twice"))
                continue
            if want is None:
                problems.append(Problem(m.name, "extra", "not in the manifest"))
                continue
            expected[m.name] = _SEEN
            kind, want_size, want_value = want
            if kind != m.kind:
                problems.append(Problem(m.name, "differs", f"is a {m.kind}, manifest says {kind}"))
                continue
            checked += 1
            if m.kind == "file":
                try:
                    size, digest = hash_member(m)
                except READ_ERRORS as exc:
                    problems.append(Problem(m.name, "corrupt", f"{type(exc).__name__}: {exc}"))
                    if fmt != "zip":
                        break  # a broken compressed stream cannot be read past this point
                    continue
                if size != want_size or bytes.fromhex(digest) != want_value:
                    shown = want_value.hex()[:12] if isinstance(want_value, bytes) else "?"
                    problems.append(Problem(m.name, "differs", f"size {size}, sha256 {digest[:12]}...; "
                                            f"manifest: size {want_size}, sha256 {shown}..."))
            elif m.kind == "symlink" and m.target != want_value:
                problems.append(Problem(m.name, "differs", f"link to {show(m.target)}, manifest says "
                                        f"{show(str(want_value))}"))
    except Corrupt as exc:
        problems.append(Problem(exc.member, "corrupt", exc.detail))
    if not have_manifest and not problems:
        raise Failure(f"{path}: no {MANIFEST_NAME} in the archive", hint="this is not an hpcexp archive")
    if have_manifest and not any(p.kind == "corrupt" for p in problems):
        for name, value in expected.items():
            if value is not _SEEN:
                problems.append(Problem(name, "missing", "listed in the manifest, not in the archive"))
    return VerifyReport(path=path, format=fmt, ok=not problems, checked=checked, runs=runs, problems=problems)


_SEEN = ("seen", None, None)
