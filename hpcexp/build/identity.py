"""Image identity: the *input hash* that names an image and decides whether it is current.

The input hash is a sha256 over what determines an image's content:

* the recipe text, without its leading header comment (which names the Dockerfile and
  its hash, so a comment edit in the Dockerfile does not rebuild), and with the paths of
  mapped local bases replaced by placeholders (their identity is counted below instead);
* every file the recipe copies in from the build context (as listed by the converter,
  which honours ``.dockerignore``): relative path, executable bit and content hash. File
  hashes come from a stat cache (:mod:`hpcexp.infra.hashing`), so unchanged large files are
  not read again;
* each base's identity (:func:`hpcexp.build.bases.identity`); the architecture; the build
  arguments; a format version.

Split from the builder and the store because identity is pure (text and file hashes in,
a name out): ``hpcexp run`` of a cached image needs it and nothing of the builder, and
checks it from what the last build recorded (:mod:`hpcexp.build.inputs`) without
converting again.
"""

from __future__ import annotations

import json
import os
import re
import stat as _stat
from pathlib import Path
from typing import Iterable, Mapping

from hpcexp.core.config import Project
from hpcexp.core.layout import Layout
from hpcexp.infra import hashing

INPUT_FORMAT = 1


_caches: dict[Path, hashing.StatCache] = {}


def stat_cache(project: Project) -> hashing.StatCache:
    """The project's stat cache, loaded once per process."""
    path = Layout(project).stat_cache()
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = hashing.StatCache(path)
    return cache


def normalize_recipe(text: str, base_paths: Iterable[str] = ()) -> str:
    """The recipe text that counts for identity: no leading comment block, local base
    paths replaced by placeholders (their content identity is hashed separately)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines) and (lines[i].lstrip().startswith("#") or not lines[i].strip()):
        i += 1
    index = {p: n for n, p in enumerate(base_paths)}
    out = []
    for line in lines[i:]:
        m = re.match(r"^(\s*From:\s*)(\S+)\s*$", line)
        if m and m.group(2) in index:
            line = f"{m.group(1)}<base:{index[m.group(2)]}>"
        out.append(line)
    return "\n".join(out) + "\n"


def file_entries(cache: hashing.StatCache, files: Iterable[tuple[str, Path]]) -> list[list[str]]:
    """[rel, kind, hash] for each context file (directories expanded, symlinks by target)."""
    out: list[list[str]] = []
    for rel, absolute in files:
        p = Path(absolute)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out.append([rel, "missing", ""])
            continue
        if _stat.S_ISLNK(st.st_mode):
            out.append([rel, "link", os.readlink(p)])
        elif _stat.S_ISDIR(st.st_mode):
            children = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for n in sorted(names):
                    full = Path(root) / n
                    children.append((str(Path(rel) / full.relative_to(p)), full))
            out.extend(file_entries(cache, children))
        else:
            kind = "x" if st.st_mode & 0o111 else "f"
            out.append([rel, kind, cache.digest(p, os.stat(p))])
    return out


def recipe_digest(recipe_text: str, base_paths: Iterable[str] = ()) -> str:
    """The sha256 of the recipe as it counts for identity (:func:`normalize_recipe`)."""
    return hashing.sha256_text(normalize_recipe(recipe_text, base_paths))


def input_hash_of(recipe_sha: str, file_entries: list[list[str]], base_identities: Iterable[tuple[str, str]],
                  arch: str, build_args: Mapping[str, str]) -> str:
    """The image identity from the normalised recipe's digest (:func:`recipe_digest`) and the
    other inputs: what :func:`input_hash` computes, for a caller that recorded the digest
    instead of converting again (:mod:`hpcexp.build.inputs`)."""
    doc = {
        "format": INPUT_FORMAT,
        "arch": arch,
        "recipe": recipe_sha,
        "files": sorted(file_entries),
        "bases": [list(b) for b in base_identities],
        "build_args": sorted([k, v] for k, v in build_args.items()),
    }
    return hashing.sha256_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))


def input_hash(recipe_text: str, file_entries: list[list[str]], base_identities: Iterable[tuple[str, str]],
               arch: str, build_args: Mapping[str, str], base_paths: Iterable[str] = ()) -> str:
    """The image identity (pure): see the module docstring for what goes in and why."""
    return input_hash_of(recipe_digest(recipe_text, base_paths), file_entries, base_identities, arch, build_args)
