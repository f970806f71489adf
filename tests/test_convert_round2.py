"""Unit tests of conversion fixes for Dockerfiles Docker accepts: legacy KEY VALUE, base-image
variables, wildcards matching nothing, STOPSIGNAL (no Apptainer needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpcexp.convert import baseenv
from hpcexp.convert.recipe import BaseResolution, convert
from hpcexp.errors import ConvertError


def conv(tmp_path: Path, text: str, files: dict[str, str] | None = None, **kw):
    for rel, content in (files or {}).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    (tmp_path / "Dockerfile").write_text(text)
    return convert(tmp_path / "Dockerfile", source_label="Dockerfile", **kw)


def section(recipe: str, name: str) -> str:
    return recipe.split(f"%{name}\n", 1)[1].split("\n%", 1)[0] if f"%{name}\n" in recipe else ""


# -- legacy KEY VALUE form -------------------------------------------------------------

@pytest.mark.parametrize("line, key, value", [
    # the first word has no '=': key, then the whole rest of the line as one word (quotes removed)
    ('LABEL org.opencontainers.image.version = "2.0"', "org.opencontainers.image.version", "= 2.0"),
    ('LABEL maintainer "Jane Doe <jane@example.org>"', "maintainer", "Jane Doe <jane@example.org>"),
    ("LABEL description a plain sentence", "description", "a plain sentence"),
    ("LABEL\tversion\t\t1.2", "version", "1.2"),
])
def test_legacy_label(tmp_path: Path, line: str, key: str, value: str) -> None:
    c = conv(tmp_path, f"FROM alpine\n{line}\n")
    assert section(c.recipe, "labels").splitlines() == [f"{key} {value}"]
    assert any(n.construct == "LABEL KEY value (legacy form)" and n.code == "P10" for n in c.notes)


@pytest.mark.parametrize("line, value", [
    ('ENV MSG "hello   world"', "hello   world"),        # inner spaces kept, quotes removed
    ("ENV MSG hello   world", "hello   world"),          # unquoted: the raw rest, spaces kept
    ("ENV MSG a=b c", "a=b c"),                          # '=' in the value is fine
    ("ENV MSG $BASE/x", "/opt/x"),                      # expanded like any ENV value
    ("ENV MSG 'single $BASE'", "single $BASE"),          # single quotes: no expansion
])
def test_legacy_env(tmp_path: Path, line: str, value: str) -> None:
    c = conv(tmp_path, f"FROM alpine\nARG BASE=/opt\n{line}\nRUN echo \"$MSG\"\n")
    env = section(c.recipe, "environment")
    escaped = value.replace("$", "\\$")
    assert f'export MSG="{escaped}"' in env
    assert c.environment["MSG"] == value


def test_legacy_without_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"Dockerfile:2: LABEL: 'version' needs a value"):
        conv(tmp_path, "FROM alpine\nLABEL version\n")


def test_new_form_still_split_into_pairs(tmp_path: Path) -> None:
    c = conv(tmp_path, 'FROM alpine\nLABEL a=1 b="two words"\n')
    assert section(c.recipe, "labels").splitlines() == ["a 1", "b two words"]


# -- variables the base image defines --------------------------------------------------

def test_workdir_from_base_variable_left_to_the_shell(tmp_path: Path) -> None:
    c = conv(tmp_path, 'FROM python:3.11\nWORKDIR "${HOME}"\nWORKDIR app\nCOPY x.txt ./\n'
             'COPY x.txt $CONDA_DIR/etc/\nCMD ["python"]\n', files={"x.txt": "x"})
    post = section(c.recipe, "post")
    assert 'mkdir -p "${HOME}"' in post and 'mkdir -p "${HOME}/app"' in post
    assert '_hpcexp_cp /.hpcexp/ctx/1/0/x.txt "${HOME}/app" dir' in post
    assert '"${CONDA_DIR}/etc" dir' in post
    assert 'cd "${HOME}/app"' in section(c.recipe, "runscript")
    assert c.workdir is None            # not a literal path: the runscript's cd decides
    p33 = [n for n in c.notes if n.code == "P33"]
    assert p33 and all("\x00" not in n.reason + n.construct for n in c.notes)
    subprocess.run(["sh", "-n"], input=post, text=True, check=True)


def test_base_variable_with_default_and_special_characters(tmp_path: Path) -> None:
    c = conv(tmp_path, "FROM x\nWORKDIR \"${APP:-/srv/my app}/it's\"\n")
    assert 'mkdir -p "${APP:-/srv/my app}/it\'s"' in section(c.recipe, "post")


def test_base_environment_used_when_known(tmp_path: Path) -> None:
    env = (("HOME", "/home/base"), ("CONDA_DIR", "/opt/conda"), ("PATH", "/opt/conda/bin:/usr/bin"))

    def resolve(ref: str) -> BaseResolution | None:
        return BaseResolution("localimage", "base.sif", environment=env) if ref == "mybase" else None

    c = conv(tmp_path, 'FROM mybase\nWORKDIR "${HOME}"\nENV PATH=$CONDA_DIR/envs/x/bin:$PATH\n', resolve_base=resolve)
    post = section(c.recipe, "post")
    assert "mkdir -p /home/base" in post
    assert 'export PATH="/opt/conda/envs/x/bin:/opt/conda/bin:/usr/bin"' in post
    assert c.workdir == "/home/base"
    assert c.environment["CONDA_DIR"] == "/opt/conda"
    assert not [n for n in c.notes if n.action == "approximated"]


def test_parse_env_scripts() -> None:
    env = baseenv.parse_env_scripts([
        ("/.singularity.d/env/90-environment.sh", 'export CONDA_DIR="/opt/conda"\nexport PATH="$CONDA_DIR/bin:$PATH"\n'
         'if [ -n "$X" ]; then export SKIP=1; fi\nexport Q=\'lit $x\'\n'),
        ("/.singularity.d/env/10-docker2singularity.sh",
         'export PATH="${PATH:-/usr/local/bin:/usr/bin}"\nexport HOME="${HOME:-"/root"}"\nexport BAD="$(id)"\n'),
    ])
    assert env == {"PATH": "/opt/conda/bin:/usr/local/bin:/usr/bin", "HOME": "/root", "CONDA_DIR": "/opt/conda",
                   "Q": "lit $x"}


def test_sif_environment_from_sidecar_and_missing_file(tmp_path: Path) -> None:
    sif = tmp_path / "b.sif"
    sif.write_bytes(b"x" * 10)
    (tmp_path / "b.json").write_text('{"size": 10, "environment": {"HOME": "/h"}}')
    assert baseenv.sif_environment(sif) == {"HOME": "/h"}
    assert baseenv.sif_environment(tmp_path / "nope.sif") == {}


def test_sif_environment_inspected_once_then_cached_on_disk(tmp_path: Path, monkeypatch) -> None:
    sif = tmp_path / "base.sif"
    sif.write_bytes(b"sif")
    calls = []
    out = '{"data": {"attributes": {"environment": {"/.singularity.d/env/90-environment.sh": "export HOME=/h"}}}}'

    def fake_run(argv, **kw):
        calls.append(argv)
        return baseenv.process.Result(tuple(argv), 0, out, "")

    monkeypatch.setattr(baseenv.process, "run", fake_run)
    cache = tmp_path / "cache" / "env.json"
    assert baseenv.sif_environment(sif, cache) == {"HOME": "/h"}
    baseenv._CACHE.clear()  # a new process: only the file is left
    assert baseenv.sif_environment(sif, cache) == {"HOME": "/h"}
    assert len(calls) == 1 and calls[0][:3] == ["apptainer", "inspect", "--environment"]


# -- wildcards that match nothing ------------------------------------------------------

def test_wildcard_matching_nothing_copies_nothing(tmp_path: Path) -> None:
    c = conv(tmp_path, "FROM alpine\nWORKDIR /app\nCOPY cwallet.ss[o] ./\nCOPY *.whl req.txt /w/\n",
             files={"req.txt": "numpy"})
    assert "cwallet" not in c.recipe and ".whl" not in c.recipe
    assert "req.txt /.hpcexp/" in c.recipe
    assert [n.construct for n in c.notes if n.code == "P32"] == ["COPY cwallet.ss[o]", "COPY *.whl"]


def test_literal_missing_source_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"Dockerfile:2: COPY: source 'dist/app.whl' not found"):
        conv(tmp_path, "FROM alpine\nCOPY dist/app.whl /w/\n")


# -- STOPSIGNAL ------------------------------------------------------------------------

@pytest.mark.parametrize("value, name", [("SIGINT", "SIGINT"), ("int", "SIGINT"), ("9", "SIGKILL"),
                                         ("SIGUSR1", "SIGUSR1")])
def test_stopsignal_recorded(tmp_path: Path, value: str, name: str) -> None:
    c = conv(tmp_path, f"FROM alpine\nSTOPSIGNAL {value}\n")
    assert c.stopsignal == name and c.report()["stopsignal"] == name


def test_stopsignal_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match=r"Dockerfile:2: STOPSIGNAL: 'SIGNOPE' is not a signal"):
        conv(tmp_path, "FROM alpine\nSTOPSIGNAL SIGNOPE\n")


@pytest.mark.parametrize("recorded, sent", [("SIGINT", "SIGINT"), ("SIGUSR1", "SIGUSR1"), (None, "SIGTERM"),
                                            ("SIGKILL", "SIGTERM"), ("SIGNOPE", "SIGTERM"), (15, "SIGTERM")])
def test_local_stop_sends_the_recorded_stopsignal(recorded, sent) -> None:
    from hpcexp.execute.local.supervisor import _stop_signal

    assert _stop_signal(recorded).name == sent


def test_env_pairs_referring_to_base_values(tmp_path: Path) -> None:
    # PATH/A come from the base (unknown here): the shell must see their OLD values for B and C
    c = conv(tmp_path, "FROM x\nENV A=2 B=$A C=${B}x PATH=/opt/bin:$PATH\n")
    post = section(c.recipe, "post")
    assert 'export A="2" B="${A}" C="${B}x" PATH="/opt/bin:${PATH}"' in post
    env = [ln for ln in section(c.recipe, "environment").splitlines() if ln.startswith("export")]
    assert env.index('export C="${B}x"') < env.index('export B="${A}"') < env.index('export A="2"')
    script = "A=1; B=b; " + "; ".join(env) + '; echo "$A|$B|$C"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "2|1|bx\n"
