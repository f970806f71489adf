"""Golden Dockerfile -> recipe pairs, one or more per fidelity code of docs/conversion.md (P01..P33).

Each folder of tests/golden/convert holds a Dockerfile (plus the context files it copies,
optionally build-args.json) and the reviewed expected output: expected.def and
expected.notes (the fidelity report, one note per line). Regenerate after a deliberate
change with ``HPCEXP_UPDATE_GOLDEN=1 pytest tests/test_convert_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcexp.convert.recipe import Conversion, convert

GOLDEN = Path(__file__).parent / "golden" / "convert"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "Dockerfile").is_file())
UPDATE = os.environ.get("HPCEXP_UPDATE_GOLDEN") == "1"


def notes_text(conv: Conversion) -> str:
    return "".join(f"{n.line}: {n.construct}: {n.action}: {n.reason}" + (f" [{n.code}]" if n.code else "") + "\n"
                   for n in conv.notes)


def run_case(name: str) -> Conversion:
    d = GOLDEN / name
    args_file = d / "build-args.json"
    args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    ctx = d / "context" if (d / "context").is_dir() else d
    return convert(d / "Dockerfile", context=ctx, arch="amd64", build_args=args, source_label="Dockerfile")


def sections(recipe: str) -> list[tuple[str, str]]:
    """(header line, body) of every %section of the recipe."""
    out: list[tuple[str, str]] = []
    current = None
    body: list[str] = []
    for line in recipe.splitlines():
        if line.startswith("%"):
            if current:
                out.append((current, "\n".join(body)))
            current, body = line, []
        elif re.match(r"^(Bootstrap|From|Stage):", line):
            if current:
                out.append((current, "\n".join(body)))
            current, body = None, []
        elif current:
            body.append(line)
    if current:
        out.append((current, "\n".join(body)))
    return out


def test_enough_cases_and_every_defect_code_covered():
    assert len(CASES) >= 40
    codes = {m for name in CASES for m in re.findall(r"^p(\d\d)", name)}
    assert {f"{i:02d}" for i in range(1, 32)} <= codes


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    conv = run_case(name)
    d = GOLDEN / name
    if UPDATE:
        (d / "expected.def").write_text(conv.recipe)
        (d / "expected.notes").write_text(notes_text(conv))
    assert conv.recipe == (d / "expected.def").read_text()
    assert notes_text(conv) == (d / "expected.notes").read_text()


@pytest.mark.parametrize("name", CASES)
def test_golden_scripts_parse_with_sh(name: str) -> None:
    recipe = (GOLDEN / name / "expected.def").read_text()
    for header, body in sections(recipe):
        if header.startswith(("%post", "%runscript", "%environment")):
            proc = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
            assert proc.returncode == 0, (header, proc.stderr, body)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
def test_bash_shell_steps_parse_with_bash() -> None:
    """Commands that SHELL sends to bash are valid bash."""
    recipe = (GOLDEN / "p19_shell_pipefail" / "expected.def").read_text()
    cmds = [line for line in recipe.splitlines() if line.startswith("/bin/bash -o pipefail -c ")]
    assert cmds
    for line in cmds:
        import shlex

        script = shlex.split(line)[-1]
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_deterministic() -> None:
    for name in CASES[:10]:
        assert run_case(name).recipe == run_case(name).recipe
