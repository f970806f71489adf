"""The environment a base image defines, when hpcexp can see it (a local SIF).

Docker expands ``$HOME``, ``$CONDA_DIR``... in WORKDIR/COPY/ENV from the base image's
environment. For a registry image the converter cannot know it (the recipe then leaves
the expansion to the shell); for a local SIF it can: hpcexp's own images record their
environment in the sidecar (``IMAGE.json``, key ``environment``), and any other SIF is
asked with ``apptainer inspect --environment``, whose ``export NAME="value"`` lines are
read here. Lines that are not a plain export (shell code, values referring to variables
not known yet) are skipped: such a variable stays a shell reference in the recipe.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from hpcexp.infra import process

log = logging.getLogger(__name__)

_EXPORT = re.compile(r"^\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=(.*?)\s*;?\s*$")
_DEFAULTED = re.compile(r'^\$\{([A-Za-z_][A-Za-z0-9_]*):?-(.*)\}$')   # ${NAME:-"value"} (docker-derived SIFs)
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}


def _unquote(text: str) -> str | None:
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        inner = text[1:-1]
        if re.search(r'(?<!\\)"|`|\$\(', inner):
            return None
        return re.sub(r'\\([\\"$`])', r"\1", inner) if "\\" in inner else inner
    if re.search(r"[\s'\"`\\;|&<>()]", text):
        return None
    return text


def parse_env_scripts(scripts: list[tuple[str, str]]) -> dict[str, str]:
    """``export NAME=value`` assignments of Apptainer env scripts ((name, text), applied in name order)."""
    env: dict[str, str] = {}
    for _name, text in sorted(scripts):
        for line in text.splitlines():
            m = _EXPORT.match(line)
            if not m:
                continue
            key, raw = m.group(1), m.group(2)
            d = _DEFAULTED.match(raw[1:-1] if raw[:1] == raw[-1:] == '"' and len(raw) > 1 else raw)
            if d and d.group(1) == key:  # NAME="${NAME:-"value"}": the base's value unless already set
                if key in env:
                    continue
                raw = d.group(2)
            value = _unquote(raw)
            if value is None:
                continue
            if raw.startswith("'"):
                env[key] = value
                continue
            unknown = False

            def sub(mm: re.Match[str]) -> str:
                nonlocal unknown
                name = mm.group(1) or mm.group(2)
                if name not in env:
                    unknown = True
                    return ""
                return env[name]

            value = _VAR.sub(sub, value)
            if unknown:
                env.pop(key, None)  # depends on something we cannot see: leave it to the shell
                continue
            env[key] = value
    return env


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None:
        return {}
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def sif_environment(sif: Path, cache_file: Path | None = None) -> dict[str, str]:
    """The environment of a local SIF; empty when it cannot be read (never an error).

    ``cache_file`` (JSON, keyed by the SIF's path, size, mtime and inode) keeps what
    ``apptainer inspect`` said, so converting again (every ``hpcexp build``) runs nothing.
    """
    try:
        st = os.stat(sif)
    except OSError:
        return {}
    key = (str(sif), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return dict(_CACHE[key])
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    disk = _read_cache(cache_file)
    hit = disk.get(str(sif))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("environment"), dict):
        env = {str(k): str(v) for k, v in hit["environment"].items()}
        _CACHE[key] = env
        return dict(env)
    env: dict[str, str] | None = None
    try:
        side = json.loads(sif.with_suffix(".json").read_text(encoding="utf-8"))
        if isinstance(side, dict) and isinstance(side.get("environment"), dict) \
                and side.get("size") == st.st_size:
            env = {str(k): str(v) for k, v in side["environment"].items()}
    except (OSError, ValueError):
        pass
    if env is None:
        env = {}
        try:
            res = process.run(["apptainer", "inspect", "--environment", "--json", str(sif)], timeout=60)
            if res.ok:
                data = json.loads(res.stdout).get("data", {}).get("attributes", {}).get("environment", {})
                if isinstance(data, dict):
                    env = parse_env_scripts([(str(k), str(v)) for k, v in data.items()])
                elif isinstance(data, str):
                    env = parse_env_scripts([("env", data)])
        except Exception as exc:  # noqa: BLE001 - no apptainer, odd output: the shell decides then
            log.debug("cannot read the environment of %s: %s", sif, exc)
            _CACHE[key] = {}
            return {}
        if cache_file is not None:
            disk[str(sif)] = {"stamp": stamp, "environment": env}
            try:
                from hpcexp.infra import atomic

                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_json(cache_file, disk)
            except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
                log.debug("cannot write %s: %s", cache_file, exc)
    _CACHE[key] = env
    return dict(env)
