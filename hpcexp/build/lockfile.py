"""``hpcexp.lock``: the images and bases a project pins by digest.

JSON, sorted and indented, with no timestamps, hosts or users in it, so the same push gives
the same file and it diffs well in review. Written under a lock, by temp name then rename;
read strictly (a bad entry is a ConfigError naming it)."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from hpcexp.build.refs import DIGEST_RE, parse_ref, redact
from hpcexp.core.config import Project
from hpcexp.core.layout import Layout
from hpcexp.errors import ConfigError, HpcexpError, StalePin, UsageError
from hpcexp.infra import atomic
from hpcexp.infra.lock import Lock

log = logging.getLogger(__name__)

LOCK_FORMAT = 1
LOCK_NAME = "hpcexp.lock"


# --------------------------------------------------------------------------------------
# The lock file
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pin:
    """One image pinned in hpcexp.lock."""

    experiment: str
    arch: str
    input_hash: str
    sha256: str              # the SIF's own sha256 (hex)
    ref: str                 # oras://HOST/REPO@sha256:MANIFEST-DIGEST
    size: int
    tag: str | None = None   # the tag pushed alongside (informational)
    signed_by: str | None = None   # fingerprint of the signing key (pgp:... or pem-sha256:...)

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.arch}"

    @property
    def digest(self) -> str:
        return self.ref.rpartition("@")[2]


@dataclass
class LockFile:
    images: dict[str, Pin] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)    # base URI (with tag) -> sha256:DIGEST

    def pin(self, experiment: str, arch: str) -> Pin | None:
        return self.images.get(f"{experiment}/{arch}")

    def to_text(self) -> str:
        doc = {
            "comment": "written by `hpcexp push` and `hpcexp build`; commit it. Images are pinned by digest.",
            "format": LOCK_FORMAT,
            "images": {k: {f: v for f, v in asdict(p).items() if v is not None}
                       for k, p in sorted(self.images.items())},
            "bases": dict(sorted(self.bases.items())),
        }
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_lock_cache: dict[Path, tuple[tuple[int, int, int], LockFile]] = {}


def lock_path(project: Project) -> Path:
    return Layout(project).lock_file()


def read_lock(project: Project) -> LockFile:
    """hpcexp.lock of ``project`` (empty when there is none); strict: a bad entry is a ConfigError."""
    path = lock_path(project)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return LockFile()
    except OSError as exc:
        raise atomic.storage_error(exc, path) from exc
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _lock_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise atomic.storage_error(exc, path) from exc
    lock = parse_lock(text, label=LOCK_NAME)
    _lock_cache[path] = (key, lock)
    return lock


def parse_lock(text: str, *, label: str = LOCK_NAME) -> LockFile:
    """Parse and validate a lock file's text; every problem is listed at once."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{label}: not valid JSON ({exc})", hint="restore it from version control") from None
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: must be a JSON object")
    if doc.get("format") != LOCK_FORMAT:
        problems.append(f"{label}: format: expected {LOCK_FORMAT}, got {doc.get('format')!r} "
                        "(written by another hpcexp version?)")
    images: dict[str, Pin] = {}
    raw_images = doc.get("images") or {}
    if not isinstance(raw_images, dict):
        problems.append(f"{label}: images: must be an object")
        raw_images = {}
    for key, entry in raw_images.items():
        where = f"{label}: images.{key}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        try:
            pin = Pin(experiment=entry["experiment"], arch=entry["arch"], input_hash=entry["input_hash"],
                      sha256=entry["sha256"], ref=entry["ref"], size=int(entry["size"]), tag=entry.get("tag"),
                      signed_by=entry.get("signed_by"))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{where}: missing or invalid field {exc}")
            continue
        if pin.key != key:
            problems.append(f"{where}: key does not match experiment/arch {pin.key!r}")
        if not re.match(r"^[0-9a-f]{64}$", str(pin.input_hash)):
            problems.append(f"{where}.input_hash: not a sha256 hex digest")
        if not re.match(r"^[0-9a-f]{64}$", str(pin.sha256)):
            problems.append(f"{where}.sha256: not a sha256 hex digest")
        try:
            ref = parse_ref(str(pin.ref), what=f"{where}.ref")
        except UsageError as exc:
            problems.append(exc.message)
            continue
        if ref.scheme != "oras" or ref.digest is None:
            problems.append(f"{where}.ref: must be oras://...@sha256:DIGEST (a pin is by digest), got "
                            f"{redact(pin.ref)!r}")
            continue
        images[key] = pin
    bases: dict[str, str] = {}
    raw_bases = doc.get("bases") or {}
    if not isinstance(raw_bases, dict):
        problems.append(f"{label}: bases: must be an object")
        raw_bases = {}
    for uri, digest in raw_bases.items():
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            problems.append(f"{label}: bases.{uri}: must be sha256: and 64 hex digits")
        else:
            bases[uri] = digest
    if problems:
        raise ConfigError(problems, hint=f"fix {label} (or restore it from version control)")
    return LockFile(images=images, bases=bases)


def update_lock(project: Project, change: Callable[[LockFile], None]) -> LockFile:
    """Apply ``change`` to hpcexp.lock under a lock and publish it atomically (temp name, rename)."""
    path = lock_path(project)
    guard = Lock(project.images_dir / ".locks" / "hpcexp.lock.lock", purpose="update hpcexp.lock")
    try:
        guard.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, guard.path.parent) from exc
    with guard.hold(what=str(path)):
        _lock_cache.pop(path, None)
        lock = read_lock(project)
        lock = LockFile(images=dict(lock.images), bases=dict(lock.bases))
        change(lock)
        atomic.write_text(path, lock.to_text())
        _lock_cache.pop(path, None)
    return lock


def base_pin(project: Project, uri: str) -> str | None:
    """The digest hpcexp.lock pins for a registry base URI (with its tag), if any."""
    try:
        return read_lock(project).bases.get(uri)
    except HpcexpError as exc:
        log.info("ignoring base pins: %s", exc)
        return None


def pinned_base_uri(uri: str, digest: str) -> str:
    """``docker://HOST/REPO:TAG`` pinned to ``docker://HOST/REPO@sha256:...``."""
    scheme, _, rest = uri.partition("://")
    rest = rest.split("@", 1)[0]
    last = rest.rsplit("/", 1)
    if ":" in last[-1]:
        rest = rest[: rest.rfind(":")]
    return f"{scheme}://{rest}@{digest}"


def stale_pin_error(pin: Pin, current_hash: str) -> StalePin:
    name = pin.experiment
    return StalePin(
        f"{LOCK_NAME} pins {name} {pin.arch} at input hash {pin.input_hash[:16]} but its inputs now hash to "
        f"{current_hash[:16]} (the Dockerfile or its files changed since the push); refusing the stale pin",
        hint=f"build it here with `hpcexp build {name}` (or `hpcexp run --rebuild`), then `hpcexp push {name}` "
             f"to update the pin")
