"""The container runtime's version, remembered per installed binary.

A run records the Apptainer version it ran with. Asking (``apptainer --version``) is a Go
start-up, ~20 ms of CPU, so it is not asked before a run starts: the launcher takes the
version remembered for this very binary (:func:`known_version`), and when there is none
the supervisor starts a probe while the payload runs and remembers the answer.

Its own module because several sides use it: the local launcher reads the cache and its
supervisor fills it; ``submit`` reads it too and asks (then remembers) only when the binary
is new, so a sweep's submission makes no Go start-up either.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from hpcexp.infra import atomic, process


def version_cache(cache_dir: Path) -> Path:
    """The file of remembered versions in the user's cache (its path goes into each run's record)."""
    return cache_dir / "runtime-versions.json"


def _binary_key(program: str) -> tuple[str, str] | None:
    """(real path, identity) of an installed binary: a new install changes the identity."""
    try:
        real = os.path.realpath(program)
        st = os.stat(real)
    except OSError:
        return None
    return real, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_versions(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def known_version(program: str, cache_dir: Path) -> str | None:
    """The runtime's version remembered from an earlier run of this very binary, or None.

    Saves one ``apptainer --version`` (a Go start-up, ~20 ms of CPU) per run; when it is
    not known, the supervisor asks while the payload runs and remembers the answer.
    """
    key = _binary_key(program)
    if key is None:
        return None
    entry = _read_versions(version_cache(cache_dir)).get(key[0])
    if isinstance(entry, dict) and entry.get("id") == key[1] and isinstance(entry.get("version"), str):
        return str(entry["version"])
    return None


def remember_version(program: str, version: str, cache: Path) -> None:
    key = _binary_key(program)
    if key is None:
        return
    data = _read_versions(cache)
    data[key[0]] = {"id": key[1], "version": version}
    with contextlib.suppress(Exception):  # a cache: never a reason to fail a run
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text_nosync(cache, json.dumps(data, indent=2, sort_keys=True) + "\n")  # a cache: no fsync


def start_probe(program: str) -> "subprocess.Popen[str] | None":
    try:
        return process.spawn([program, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, close_fds=True)
    except OSError:
        return None


def finish_probe(probe: "subprocess.Popen[str] | None") -> str | None:
    import re

    if probe is None:
        return None
    try:
        out, _ = probe.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return None
    m = re.search(r"\d+\.\d+(?:\.\d+)?\S*", out or "")
    return m.group(0) if m else None
