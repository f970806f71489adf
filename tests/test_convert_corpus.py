"""A corpus of research-style Dockerfiles written for hpcexp's tests (tests/fixtures/corpus:
CUDA bases, conda/mamba/micromamba, pip requirements, multi-stage builds, notebooks,
bioinformatics, neuroimaging, serving, legacy syntax). Each converts with no refusal, every
shell section of its recipe parses (`sh -n`, `bash -n` for what a bash SHELL runs), and every
fidelity code it reports is defined in docs/conversion.md."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hpcexp.convert.recipe import convert
from tests.test_convert_golden import sections

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
NAMES = sorted(p.name for p in CORPUS.iterdir() if (p / "Dockerfile").is_file())
DOCS = Path(__file__).resolve().parent.parent / "docs" / "conversion.md"
DEFINED = set(re.findall(r"^### (P\d\d)\b", DOCS.read_text(), re.M))


def test_corpus_is_large_enough():
    assert len(NAMES) >= 30


def _bash_scripts(body: str) -> list[str]:
    """Commands run through a bash SHELL: `/bin/bash [opts] -c SCRIPT` lines of %post/%runscript."""
    out = []
    for line in body.splitlines():
        words = line.split(" ", 1)
        if words[0] in ("exec",) and len(words) > 1:
            line = words[1]
        if re.match(r"^(/usr)?(/bin/)?bash ", line) and " -c " in line:
            argv = shlex.split(line)
            out.append(argv[argv.index("-c") + 1])
    return out


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
@pytest.mark.parametrize("name", NAMES)
def test_corpus_converts_and_sections_parse(name: str, arch: str) -> None:
    d = CORPUS / name
    conv = convert(d / "Dockerfile", context=d, arch=arch, source_label=f"{name}/Dockerfile")
    checked = 0
    for header, body in sections(conv.recipe):
        if header.startswith(("%post", "%runscript", "%environment")):
            proc = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
            assert proc.returncode == 0, (name, header, proc.stderr)
            checked += 1
            for script in _bash_scripts(body):
                proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
                assert proc.returncode == 0, (name, script, proc.stderr)
    assert checked >= 1
    assert all(p.is_file() for _, p in conv.context_files)
    assert str(CORPUS) not in conv.recipe and "\x00" not in conv.recipe
    for note in conv.notes:
        assert note.code is None or note.code in DEFINED, (name, note)
        assert "\x00" not in note.reason + note.construct
