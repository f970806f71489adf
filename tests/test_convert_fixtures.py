"""Realistic ML-research Dockerfiles (tests/fixtures/dockerfiles) convert into recipes whose shell
sections parse: `sh -n` on every %post, %runscript and %environment, and `bash -n` on the
commands a bash SHELL runs."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from hpcexp.convert.recipe import convert
from tests.test_convert_golden import sections

FIXTURES = Path(__file__).parent / "fixtures" / "dockerfiles"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "Dockerfile").is_file())


def test_at_least_twenty_fixtures():
    assert len(NAMES) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_fixture_converts_and_scripts_parse(name: str) -> None:
    d = FIXTURES / name
    conv = convert(d / "Dockerfile", context=d, arch="amd64", source_label=f"{name}/Dockerfile")
    checked = 0
    for header, body in sections(conv.recipe):
        if header.startswith(("%post", "%runscript", "%environment")):
            proc = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
            assert proc.returncode == 0, (name, header, proc.stderr)
            checked += 1
        if header.startswith(("%post", "%runscript")):
            for line in body.splitlines():
                if line.startswith(("/bin/bash ", "exec /bin/bash ")) and " -c " in line:
                    script = shlex.split(line)[-1] if line.startswith("/bin/bash") else shlex.split(line)[-1]
                    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, line
    assert checked >= 1
    # what the build hashes exists, and nothing machine-specific leaks into the recipe
    assert all(p.is_file() for _, p in conv.context_files)
    assert str(FIXTURES) not in conv.recipe
    assert conv.base_refs and "${" not in " ".join(conv.base_refs)
    assert "--mount=" not in conv.recipe and "su - " not in conv.recipe
