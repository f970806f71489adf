"""Stand-in bases: what an unmapped ``FROM python:*`` or ``FROM debian:*`` becomes.

Clusters rarely reach an image registry, but they nearly always reach a Debian package
mirror. So when a Dockerfile starts from one of the two official image families research
code uses most and hpcexp.yaml has no ``bases:`` entry for it, hpcexp builds a *stand-in*
with debootstrap that keeps the image's contract where researchers depend on it (see
``docs/bases.md``):

* ``python:TAG``: Debian with ``python3``, ``pip``, ``venv`` and ``ca-certificates``;
  ``python``, ``python3``, ``pip`` and ``pip3`` on PATH (links in ``/usr/local/bin``, where
  the official image has them); pip installs system-wide, because the official image has no
  PEP 668 ``EXTERNALLY-MANAGED`` marker and the stand-in removes Debian's. The Debian suite
  is the one whose python3 is the tag's version; a ``-bookworm``/``-bullseye``/``-trixie``
  suffix chooses it outright.
* ``debian:TAG``: the Debian suite the tag names (``bookworm``, ``12``, ``12.5``,
  ``bookworm-slim``, ``stable``, ``latest`` ...).

Whatever the stand-in cannot match (another Python minor version, Debian in place of
Alpine, no compilers in place of the non-slim image's) is returned as a list of
differences, which the fidelity report records line by line.

Pure: the mapping depends on the reference alone, never on the network or the machine,
so a recipe is the same everywhere. No registry host is known here: a reference naming a
registry explicitly (``host/...``) is the user's choice of registry and is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpcexp.core.config import BaseSpec

# Debian suites whose python3 is known, oldest first: (suite, Debian version, python3 minor).
PYTHON_SUITES: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("bullseye", "11", (3, 9)),
    ("bookworm", "12", (3, 11)),
    ("trixie", "13", (3, 13)),
)
DEBIAN_VERSIONS = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}
DEBIAN_ALIASES = ("stable", "oldstable", "oldoldstable", "testing", "unstable", "sid")
PYTHON_INCLUDE = ("ca-certificates", "python3", "python3-pip", "python3-venv")
# Docker Hub's per-architecture namespaces of the official images (arm64v8/python:3.11 ...).
ARCH_NAMESPACES = ("amd64", "arm64v8", "arm32v7", "arm32v6", "arm32v5", "i386", "ppc64le", "s390x",
                   "riscv64", "mips64le")


@dataclass(frozen=True)
class StandIn:
    """A stand-in base for one FROM reference."""

    spec: BaseSpec
    family: str                          # "python" | "debian"
    summary: str                         # what the base is, for the report and build's output
    differences: tuple[str, ...] = ()    # what differs from the official image, one sentence each


def split_ref(ref: str) -> tuple[str | None, str, str | None, str | None]:
    """(registry host or None, repository path, tag or None, digest or None) of a reference."""
    rest, _, digest = ref.partition("@")
    first, sep, after = rest.partition("/")
    host = None
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, rest = first, after
    repo, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:
        repo, _, tag = rest.rpartition(":")
    return host, repo, tag or None, digest or None


def official_name(ref: str) -> tuple[str, str | None, str | None] | None:
    """(image name, tag, digest) when ``ref`` names an official image without a registry host
    (``python:3.11``, ``library/python``, ``arm64v8/debian:12``), else None."""
    host, repo, tag, digest = split_ref(ref)
    if host is not None:
        return None
    parts = repo.split("/")
    if len(parts) == 2 and (parts[0] == "library" or parts[0] in ARCH_NAMESPACES):
        parts = parts[1:]
    if len(parts) != 1:
        return None
    return parts[0].lower(), tag, digest


def _suite_of_codename(words: list[str]) -> str | None:
    for w in words:
        if w in DEBIAN_VERSIONS:
            return w
    return None


def _python_suite(version: tuple[int, ...]) -> tuple[str, tuple[int, int]]:
    """The suite whose python3 is ``version``, else the oldest newer one, else the newest."""
    if len(version) >= 2:
        want = (version[0], version[1])
        for suite, _, have in PYTHON_SUITES:
            if have >= want:
                return suite, have
    suite, _, have = PYTHON_SUITES[-1]
    return suite, have


def python_stand_in(ref: str, tag: str | None, digest: str | None) -> StandIn:
    tag = tag or "latest"
    m = re.match(r"^(\d+(?:\.\d+)*)(?:-(.*))?$", tag)
    if m:
        version = tuple(int(x) for x in m.group(1).split("."))
        words = m.group(2).split("-") if m.group(2) else []
    else:
        version, words = (), tag.split("-")
    words = [w for w in words if w and w != "latest"]
    diffs: list[str] = []
    named = _suite_of_codename(words)
    known = {s: py for s, _, py in PYTHON_SUITES}
    if named is not None and named in known:
        suite, have = named, known[named]
    else:
        suite, have = _python_suite(version)
        if named is not None:
            diffs.append(f"Debian {named} is not a suite hpcexp knows the Python of; the stand-in uses "
                         f"Debian {suite}")
    have_s = f"{have[0]}.{have[1]}"
    if len(version) >= 2 and tuple(version[:2]) != have:
        diffs.append(f"Python {have_s} (Debian {suite}'s python3) instead of {'.'.join(map(str, version))}")
    elif len(version) >= 3:
        diffs.append(f"Python {have_s} as Debian {suite} packages it, not exactly {'.'.join(map(str, version))}")
    elif len(version) < 2:
        want = f"Python {version[0]}" if version else "Python"
        diffs.append(f"the official image has the newest {want} release; the stand-in has Python {have_s} "
                     f"(Debian {suite})")
    rest = [w for w in words if w not in DEBIAN_VERSIONS and w != "slim"]
    if any(w.startswith("alpine") for w in rest):
        diffs.append("Debian (glibc, apt-get) instead of Alpine (musl, apk): `apk` commands in RUN do not work")
        rest = [w for w in rest if not w.startswith("alpine")]
    if rest:
        diffs.append(f"tag variant {'-'.join(rest)!r} is not reproduced; the stand-in is a plain Debian base")
    if "slim" not in words and not any(w.startswith("alpine") for w in words):
        diffs.append("the official non-slim image also carries compilers, git and -dev libraries "
                     "(buildpack-deps); the stand-in is like -slim: install them in RUN, or map the "
                     "image under `bases:` with an `include:` list")
    if digest:
        diffs.append(f"the digest {digest} cannot be honoured: the stand-in is built from the Debian mirror")
    spec = BaseSpec(ref=ref, kind="debootstrap", suite=suite, include=PYTHON_INCLUDE, contract="python")
    return StandIn(spec=spec, family="python", summary=f"Debian {suite} with Python {have_s}", differences=tuple(diffs))


def debian_stand_in(ref: str, tag: str | None, digest: str | None) -> StandIn | None:
    tag = (tag or "latest").lower()
    words = tag.split("-")
    diffs: list[str] = []
    suite: str | None = None
    if words[0] == "latest":
        suite = "stable"
    elif words[0] in DEBIAN_VERSIONS or words[0] in DEBIAN_ALIASES:
        suite = words[0]
    elif re.match(r"^\d+(\.\d+)*$", words[0]):
        major = words[0].split(".")[0]
        suite = next((s for s, v in DEBIAN_VERSIONS.items() if v == major), None)
        if suite is None:
            return None
        if "." in words[0]:
            diffs.append(f"Debian {suite} as the mirror serves it today (its latest point release), "
                         f"not exactly {words[0]}")
    else:
        return None
    rest = [w for w in words[1:] if w != "slim"]
    if rest and re.fullmatch(r"\d{8}", rest[0]):
        diffs.append(f"the snapshot of {rest[0]} is not reproduced: packages are today's from the mirror")
        rest = rest[1:]
    if rest:
        diffs.append(f"tag variant {'-'.join(rest)!r} is not reproduced; the stand-in is a plain Debian base")
    if digest:
        diffs.append(f"the digest {digest} cannot be honoured: the stand-in is built from the Debian mirror")
    spec = BaseSpec(ref=ref, kind="debootstrap", suite=suite, include=())
    return StandIn(spec=spec, family="debian", summary=f"Debian {suite} (minbase)", differences=tuple(diffs))


def stand_in(ref: str) -> StandIn | None:
    """The stand-in for FROM ``ref``, or None when hpcexp has none for it."""
    name = official_name(ref)
    if name is None:
        return None
    image, tag, digest = name
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        return None
    if image == "python":
        return python_stand_in(ref, tag, digest)
    if image == "debian":
        return debian_stand_in(ref, tag, digest)
    return None


def mapping_hint(ref: str) -> str:
    """One line saying how to map an image hpcexp has no stand-in for."""
    return (f"FROM {ref} has no `bases:` entry, so Apptainer will pull it from a registry; where none is "
            f"reachable, map it in hpcexp.yaml, e.g. `bases: {{\"{ref}\": {{sif: /path/to/base.sif}}}}` "
            f"(or {{image: \"docker://<your registry mirror>/...\"}}, or {{debootstrap: SUITE, include: [...]}})")
