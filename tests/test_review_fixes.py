"""Defects a code review found, each pinned by a test: shell text built from config values,
here-document markers a body can collide with, a supervisor failure that went nowhere, and
an scancel whose result was ignored."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.build import bases
from hpcexp.convert.recipe import convert, heredoc_marker
from hpcexp.core import runs
from hpcexp.core.config import BaseSpec
from hpcexp.core.layout import RunPaths
from hpcexp.errors import ConfigError, SchedulerError
from hpcexp.execute import local, slurm
from hpcexp.execute.local import supervisor
from hpcexp.infra import process

# -- Debian components in the base recipe -------------------------------------------------

@pytest.mark.parametrize("bad", ["main'; touch /tmp/pwned; '", "contrib non-free", "$(id)", "Main", "a/b"])
def test_a_component_that_is_not_a_word_is_refused_at_load(tmp_path: Path, bad: str) -> None:
    (tmp_path / "hpcexp.yaml").write_text(
        'bases:\n  "debian:12": {debootstrap: bookworm, components: [main, %s]}\n' % _yaml_str(bad))
    proc = run_cli("list", cwd=tmp_path)
    assert_clean_error(proc, 2, "hpcexp.yaml", "bases.debian:12.components[1]", "invalid archive component")


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_the_base_recipe_quotes_the_sed_program_and_refuses_a_bad_spec() -> None:
    good = BaseSpec(ref="debian:12", kind="debootstrap", suite="bookworm",
                    components=("main", "contrib", "non-free-firmware"))
    text = bases.debootstrap_recipe(good, "http://mirror.invalid/debian")
    line = next(ln for ln in text.splitlines() if "sed -i" in ln)
    assert line.strip() == "sed -i 's/ main$/ main contrib non-free-firmware/' /etc/apt/sources.list"
    assert subprocess.run(["sh", "-n", "-c", line]).returncode == 0
    evil = BaseSpec(ref="debian:12", kind="debootstrap", suite="bookworm", components=("main", "x'; id; '"))
    with pytest.raises(ConfigError, match="invalid archive component"):
        bases.debootstrap_recipe(evil, "http://mirror.invalid/debian")


# -- here-document markers ----------------------------------------------------------------

def test_heredoc_marker_never_equals_a_body_line() -> None:
    assert heredoc_marker("echo hi\n") == "HPCEXP_EOF"
    body = "echo one\nHPCEXP_EOF\nHPCEXP_EOF_\necho two\n"
    marker = heredoc_marker(body)
    assert marker not in body.split("\n") and marker.startswith("HPCEXP_EOF")


@pytest.mark.parametrize("form", ["RUN", "COPY"])
def test_a_heredoc_body_holding_the_marker_survives_whole(tmp_path: Path, form: str) -> None:
    body = "#!/bin/sh\necho first\nHPCEXP_EOF\necho last\n"
    if form == "RUN":
        text = f"FROM busybox:latest\nRUN <<SCRIPT\n{body}SCRIPT\n"
    else:
        text = f"FROM busybox:latest\nCOPY <<SCRIPT /opt/s.sh\n{body}SCRIPT\n"
    (tmp_path / "Dockerfile").write_text(text)
    recipe = convert(tmp_path / "Dockerfile", source_label="Dockerfile").recipe
    post = recipe.split("%post", 1)[1].split("\n%", 1)[0]
    start = post.index("<<'") + 3
    marker = post[start:post.index("'", start)]
    assert marker != "HPCEXP_EOF"
    inside = post.split(f"<<'{marker}'\n", 1)[1].split(f"\n    {marker}\n", 1)[0] if f"\n    {marker}\n" in post \
        else post.split(f"<<'{marker}'\n", 1)[1].split(f"\n{marker}\n", 1)[0]
    assert "echo last" in inside and "HPCEXP_EOF" in inside
    assert subprocess.run(["sh", "-n"], input=post, text=True).returncode == 0


# -- the detached supervisor's own failures -----------------------------------------------

def test_a_supervisor_failure_is_logged_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = RunPaths(tmp_path / "e" / "run")   # runs/EXPERIMENT/RUN_ID, as the record says
    paths.dir.mkdir(parents=True)
    runs.write_record(paths, runs.RunRecord(experiment="e", run_id="run", state="created"))

    def boom(*_a, **_k):
        raise RuntimeError("the supervisor broke")

    monkeypatch.setattr(supervisor, "supervise", boom)  # where main() looks it up
    assert local.main([str(paths.dir)]) == 1
    log = paths.supervisor_log.read_text()
    assert "RuntimeError: the supervisor broke" in log and "Traceback" in log
    rec = runs.read_record(paths)
    assert rec.state == "failed" and "the supervisor broke" in (rec.launch_error or "")


# -- scancel results ----------------------------------------------------------------------

def _result(rc: int, stderr: str) -> process.Result:
    return process.Result(argv=["scancel"], returncode=rc, stdout="", stderr=stderr)


def test_scancel_failures_are_errors_unless_the_job_already_ended() -> None:
    slurm._check_scancel(_result(0, ""))
    slurm._check_scancel(_result(1, "scancel: error: Kill job error on job id 5: "
                                    "Job/step already completing or completed"))
    slurm._check_scancel(_result(1, "scancel: error: Invalid job id 7"))
    with pytest.raises(SchedulerError, match="scancel failed: .*Access/permission denied"):
        slurm._check_scancel(_result(1, "scancel: error: Kill job error on job id 5: Access/permission denied"))
