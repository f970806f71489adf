"""The application layer called directly, as the web dashboard will: no Click, no printing.

Each use case runs on a small project; builds and runs use a stand-in apptainer (the
build fake of tests/buildfakes plus a ``run`` that prints its parameter and exits with
the code it is given), so what is checked is the use case's own rules: validation
before anything is built or written, what a final state means, and the typed results.
"""

from __future__ import annotations

import getpass
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from hpcexp.app import archive as app_archive
from hpcexp.app import build as app_build
from hpcexp.app import convert as app_convert
from hpcexp.app import project as app_project
from hpcexp.app import runs as app_runs
from hpcexp.app import submit as app_submit
from hpcexp.build import identity, image
from hpcexp.convert import recipe
from hpcexp.core.config import SlurmResources, load_project
from hpcexp.errors import Failure, NotFound, PayloadFailed, UsageError
from tests.buildfakes import convert_fake

FAKES = Path(__file__).parent / "buildfakes"
APP = Path(__file__).resolve().parents[1] / "hpcexp" / "app"

# `run`: print the parameter `msg` and exit with the parameter `code` (default 0); the
# rest (--version, build) is the build fake's.
FAKE_RUN = f"""#!/bin/sh
if [ "$1" = run ] || [ "$1" = exec ]; then
  echo "payload says ${{APPTAINERENV_HPCEXP_PARAM_msg-none}}"
  echo "payload err" >&2
  exit "${{APPTAINERENV_HPCEXP_PARAM_code:-0}}"
fi
exec {FAKES / 'fake_apptainer'} "$@"
"""


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "apptainer"
    fake.write_text(FAKE_RUN)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(calls))
    subuid = tmp_path / "subuid"
    subuid.write_text(f"{getpass.getuser()}:100000:65536\n")
    monkeypatch.setenv("HPCEXP_SUBUID_FILE", str(subuid))
    monkeypatch.setenv("HPCEXP_SUBGID_FILE", str(subuid))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(recipe, "convert", convert_fake.convert)
    monkeypatch.setattr(identity, "_caches", {})
    return calls


def builds(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("build")] if log.exists() else []


def make_project(root: Path, base_sif: Path, experiments: dict[str, str]) -> Path:
    """One experiment per (name, RUN line); each takes params msg and code."""
    lines = [f'bases:\n  "busybox:latest": {{sif: {base_sif}}}', "experiments:"]
    for name, run in experiments.items():
        exp = root / "experiments" / name
        exp.mkdir(parents=True)
        (exp / "Dockerfile").write_text(f"FROM busybox:latest\nCOPY . /app\nRUN {run}\nWORKDIR /app\n")
        (exp / "main.sh").write_text("echo hi\n")
        lines.append(f"  {name}:\n    params: {{msg: default}}\n    params_as: env")
    (root / "hpcexp.yaml").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def project(tmp_path: Path, fake_env: Path):
    base = tmp_path / "base.sif"
    base.write_bytes(b"base image bytes")
    return load_project(make_project(tmp_path / "proj", base, {"hello": "echo hi", "broken": "FAILME"}))


def events() -> tuple[list[tuple[str, str]], object]:
    seen: list[tuple[str, str]] = []
    return seen, lambda kind, text: seen.append((kind, text))


# --------------------------------------------------------------------------------------
# project: init, list, doctor
# --------------------------------------------------------------------------------------

def test_init_then_list_then_refuse_overwrite(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = app_project.init(app_project.InitRequest(directory=tmp_path / "p"))
    assert "hpcexp.yaml" in result.created and (tmp_path / "p" / "experiments" / "hello" / "Dockerfile").is_file()
    listed = app_project.list_experiments(load_project(tmp_path / "p"), app_project.ListRequest())
    hello = next(e for e in listed.experiments if e.name == "hello")
    assert hello.recipe == {"amd64": "missing", "arm64": "missing"}
    with pytest.raises(UsageError, match="refusing to overwrite"):
        app_project.init(app_project.InitRequest(directory=tmp_path / "p"))
    assert capfd.readouterr() == ("", "")   # the application layer never prints


def test_doctor_inside_and_outside_a_project(tmp_path: Path) -> None:
    app_project.init(app_project.InitRequest(directory=tmp_path / "p"))
    inside = app_project.doctor(app_project.DoctorRequest(project_dir=str(tmp_path / "p")))
    assert inside.project == (tmp_path / "p").resolve() and inside.project_error is None
    assert any(c.name == "space: runs" for c in inside.checks)
    assert inside.ok == (not [c for c in inside.checks if c.failed_required])
    named = app_project.doctor(app_project.DoctorRequest(project_dir=str(tmp_path / "nowhere")))
    assert named.project is None and "does not exist" in (named.project_error or "")
    assert not any(c.name == "space: runs" for c in named.checks)  # machine checks only
    empty = tmp_path / "empty"
    empty.mkdir()
    # not named (found by walking up from a folder): no project is not an error
    walked = app_project.doctor(app_project.DoctorRequest(cwd=empty))
    assert walked.project is None and walked.project_error is None


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------

def test_convert_writes_then_check_finds_stale(project, capfd: pytest.CaptureFixture[str]) -> None:
    seen = []
    first = app_convert.convert(project, app_convert.ConvertRequest(names=("hello",), arch="amd64"),
                                on_converted=seen.append)
    assert first.failure is None and [i.experiment for i in seen] == ["hello"]
    item = first.items[0]
    assert item.written and item.stale and item.recipe == "recipes/hello.amd64.def"
    assert (project.root / item.recipe).is_file() and (project.root / item.report).is_file()
    assert item.to_json()["counts"] == item.conversion.counts()
    again = app_convert.convert(project, app_convert.ConvertRequest(names=("hello",), arch="amd64", check=True))
    assert again.failure is None and not again.items[0].stale and not again.items[0].written
    df = project.root / "experiments" / "hello" / "Dockerfile"
    df.write_text(df.read_text() + "RUN echo more\n")
    before = (project.root / item.recipe).read_text()
    stale = app_convert.convert(project, app_convert.ConvertRequest(names=("hello",), arch="amd64", check=True))
    assert isinstance(stale.failure, Failure) and "recipes/hello.amd64.def" in stale.failure.message
    assert (project.root / item.recipe).read_text() == before     # --check writes nothing
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("bad", ["NOEQUALS", "=v", "1A=v", "A-B=v", "A=x\ny", "A=x\x00"])
def test_convert_refuses_bad_build_args_before_converting(project, bad: str) -> None:
    with pytest.raises(UsageError, match="--build-arg"):
        app_convert.convert(project, app_convert.ConvertRequest(names=("hello",), build_args=(bad,)))
    assert not (project.root / "recipes").exists()


def test_convert_build_args_are_checked_when_the_request_is_made() -> None:
    """No project needed to refuse them (the CLI makes the request before loading one)."""
    with pytest.raises(UsageError, match="--build-arg"):
        app_convert.ConvertRequest(names=("hello",), build_args=("bad",))
    with pytest.raises(UsageError, match="--build-arg"):
        app_convert.ConvertFileRequest(dockerfile=Path("Dockerfile"), build_args={"A B": "1"})
    assert app_convert.ConvertRequest(build_args=("A=1",)).build_args == {"A": "1"}


def test_convert_build_args_from_a_mapping_and_option_rules(project) -> None:
    assert app_convert.parse_build_args({"A": "1", "B_2": "x y"}) == {"A": "1", "B_2": "x y"}
    with pytest.raises(UsageError, match="--dockerfile converts one file"):
        app_convert.check_convert_options(("hello",), False, False, Path("Dockerfile"), None, None)
    with pytest.raises(UsageError, match="go with --dockerfile"):
        app_convert.check_convert_options((), False, False, None, None, "out.def")


def test_convert_one_file_to_text_and_to_a_file(project, tmp_path: Path) -> None:
    df = project.root / "experiments" / "hello" / "Dockerfile"
    text = app_convert.convert_file(app_convert.ConvertFileRequest(dockerfile=df, arch="amd64"))
    assert text.recipe is None and text.recipe_text and "busybox" in text.recipe_text
    out = tmp_path / "out" / "x.def"
    out.parent.mkdir()
    written = app_convert.convert_file(app_convert.ConvertFileRequest(dockerfile=df, arch="amd64", output=str(out)))
    assert written.recipe == out and out.read_text() == text.recipe_text
    assert written.report == out.with_name("x.report.json") and written.report.is_file()


# --------------------------------------------------------------------------------------
# build, images, clean
# --------------------------------------------------------------------------------------

def test_build_then_cached_then_images_and_clean(project, fake_env: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    seen, progress = events()
    first = app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64"), progress=progress)
    assert first.failure is None and [o.experiment for o in first.outcomes] == ["hello"]
    assert first.images[0].built and first.images[0].path.is_file() and len(builds(fake_env)) == 1
    assert any(kind == "start" for kind, _ in seen)          # the builder's progress reached the caller
    second = app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64"))
    assert not second.images[0].built and len(builds(fake_env)) == 1   # cached: no apptainer call
    entries = app_build.images(project).entries
    assert [(e.experiment, e.state) for e in entries] == [("hello", "current")]
    dry = app_build.clean(project, app_build.CleanRequest(dry_run=True))
    assert dry.dry_run and dry.to_json()["removed"] == [] and first.images[0].path.is_file()
    assert capfd.readouterr() == ("", "")


def test_build_one_failure_among_several_goes_on(project, fake_env: Path) -> None:
    told = []
    result = app_build.build(project, app_build.BuildRequest(all=True, arch="amd64"), on_outcome=told.append)
    by_name = {o.experiment: o for o in result.outcomes}
    assert set(by_name) == {"broken", "hello"} and [o.experiment for o in told] == sorted(by_name)
    assert by_name["broken"].error is not None and by_name["broken"].image is None
    assert by_name["hello"].image is not None and by_name["hello"].image.path.is_file()
    assert result.failure is by_name["broken"].error


def test_build_of_one_experiment_raises_its_failure(project) -> None:
    with pytest.raises(image.ImageBuildFailed):
        app_build.build(project, app_build.BuildRequest(names=("broken",), arch="amd64"))


# --------------------------------------------------------------------------------------
# run, status, runs, logs, stop
# --------------------------------------------------------------------------------------

def run(project, **kw) -> app_runs.RunResult:
    kw.setdefault("arch", "amd64")
    return app_runs.run(project, app_runs.RunRequest(name="hello", **kw))


def test_run_succeeds_then_status_runs_logs(project, capfd: pytest.CaptureFixture[str]) -> None:
    seen, progress = events()
    result = app_runs.run(project, app_runs.RunRequest(name="hello", params={"msg": "hi there"}, arch="amd64"),
                          progress=progress)
    assert result.failure is None and result.record.state == "succeeded" and result.record.exit_code == 0
    assert result.record.params == {"msg": "hi there"}
    assert ("created", f"run {result.record.run_id} ({result.paths.dir})") in seen
    assert result.paths.dir.parent == project.root / "runs" / "hello"

    status = app_runs.status(project, app_runs.StatusRequest(ref=result.record.run_id))
    assert status.single and status.sweep_id is None and status.items[0][1].state == "succeeded"
    everything = app_runs.status(project)
    assert not everything.single and [r.run_id for _, r in everything.items] == [result.record.run_id]
    assert [r.run_id for _, r in app_runs.list_runs(project, app_runs.RunsRequest("hello")).items] == \
        [result.record.run_id]
    with pytest.raises(NotFound):
        app_runs.list_runs(project, app_runs.RunsRequest("nosuch"))

    out = io.BytesIO()
    app_runs.show_logs(project, app_runs.LogsRequest(ref="@last"), out)
    assert out.getvalue() == b"payload says hi there\n"
    both = io.BytesIO()
    app_runs.follow_logs(project, app_runs.LogsRequest(ref="hello", which="both"), both)  # ended: returns
    assert b"out: payload says hi there\n" in both.getvalue() and b"err: payload err\n" in both.getvalue()
    # the payload's own output went to the run folder only (tee off), nothing was printed
    assert capfd.readouterr() == ("", "")


def test_run_failure_is_a_result_with_the_payloads_code(project) -> None:
    result = run(project, params=("code=3",))
    assert result.record.state == "failed" and result.record.exit_code == 3
    assert isinstance(result.failure, PayloadFailed) and result.failure.exit_code == 5
    assert "exit code 3" in result.failure.message


@pytest.mark.parametrize("params, needle", [(("nokey",), "not KEY=VALUE"), (("1x=v",), "invalid parameter name"),
                                            ({"a-b": "v"}, "invalid parameter name"), (("x=\x00",), "NUL")])
def test_run_refuses_bad_parameters_before_building(project, fake_env: Path, params, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        run(project, params=params)
    assert builds(fake_env) == [] and not (project.root / "runs").exists()


def test_run_refuses_a_negative_grace_and_an_unknown_experiment(project, fake_env: Path) -> None:
    with pytest.raises(UsageError, match="grace"):
        run(project, grace=-1.0)
    with pytest.raises(UsageError, match="grace"):
        run(project, grace=float("nan"))
    with pytest.raises(NotFound):
        app_runs.run(project, app_runs.RunRequest(name="nosuch"))
    assert builds(fake_env) == []


def test_logs_and_stop_validate_their_requests(project) -> None:
    done = run(project)
    with pytest.raises(UsageError, match="stream"):
        app_runs.show_logs(project, app_runs.LogsRequest(ref="hello", which="stdin"), io.BytesIO())
    with pytest.raises(UsageError, match="line count"):
        app_runs.show_logs(project, app_runs.LogsRequest(ref="hello", lines=-1), io.BytesIO())
    with pytest.raises(UsageError, match="at least one"):
        app_runs.stop(project, app_runs.StopRequest(refs=()))
    stopped = app_runs.stop(project, app_runs.StopRequest(refs=(done.record.run_id, "hello"), grace=0))
    assert len(stopped.before) == 1                   # the same run named twice is stopped once
    assert stopped.before[0][1].terminal and stopped.after[0][1].state == "succeeded"  # ended: left alone


def test_summarize_orders_states() -> None:
    from hpcexp.core.runs import RunRecord

    recs = [RunRecord(experiment="e", run_id=str(i), state=s) for i, s in enumerate(
        ["pending", "failed", "succeeded", "failed", "weird"])]
    assert app_runs.summarize(recs) == "1 succeeded, 2 failed, 1 pending, 1 weird"
    assert app_runs.summarize([]) == "no runs"


# --------------------------------------------------------------------------------------
# submit, resubmit, wait
# --------------------------------------------------------------------------------------

def submit_req(**kw) -> app_submit.SubmitRequest:
    kw.setdefault("arch", "amd64")
    return app_submit.SubmitRequest(name="hello", **kw)


def test_requests_that_cannot_be_met_are_refused_when_made() -> None:
    with pytest.raises(UsageError, match="wait forever"):
        submit_req(wait=True, hold=True)
    for bad in ("../x", "", "a/b"):
        with pytest.raises(UsageError):
            app_submit.ResubmitRequest(sweep_id=bad)


@pytest.mark.parametrize("kw, needle", [
    ({"args": ("ok", "two\nlines")}, "control character"),
    ({"resources": SlurmResources(sbatch_args=("--comment=a\nb",))}, "control character"),
    ({"resources": SlurmResources(time="soon")}, "time"),
    ({"params": ("1x=v",)}, "invalid parameter name"),
    ({"sweeps": ("lr",)}, "lr"),
])
def test_submit_checks_everything_before_building(project, fake_env: Path, kw, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        app_submit.submit(project, submit_req(**kw))
    assert builds(fake_env) == [] and not (project.root / "runs").exists()


def test_submit_dry_run_renders_a_sweep_and_writes_nothing(project, fake_env: Path) -> None:
    result = app_submit.submit_and_wait(project, submit_req(params={"msg": "x"}, sweeps=("code=0,1",),
                                                            dry_run=True, wait=True))
    sub = result.submission
    assert result.waited is None and sub.dry_run and len(sub.runs) == 2 and sub.sweep_id
    assert [rec.params for _, rec in sub.runs] == [{"msg": "x", "code": "0"}, {"msg": "x", "code": "1"}]
    assert len(sub.texts) == 1 and "#SBATCH" in sub.texts[0]
    assert builds(fake_env) == [] and not (project.root / "runs").exists()


def test_wait_turns_final_states_into_an_outcome(project, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcexp.execute import slurm

    ok, bad = run(project), run(project, params={"code": "2"})
    monkeypatch.setattr(slurm, "wait", lambda layout, dirs, on_change=None: (
        on_change([bad.record, ok.record]) if on_change else None) or [bad.record, ok.record])
    lines: list[str] = []
    req = app_submit.WaitRequest((bad.paths.dir, ok.paths.dir), "sweep S1", "S1")
    waited = app_submit.wait(project, req, on_change=lines.append)
    assert lines == ["sweep S1: 1 succeeded, 1 failed"]
    assert [r.run_id for _, r in waited.items] == [bad.record.run_id, ok.record.run_id]
    assert isinstance(waited.failure, PayloadFailed) and "hpcexp status S1" in (waited.failure.hint or "")


def test_resubmit_refuses_bad_and_unknown_sweeps(project) -> None:
    with pytest.raises(NotFound):
        app_submit.resubmit(project, app_submit.ResubmitRequest(sweep_id="nosuchsweep"))
    with pytest.raises(UsageError, match="mem"):
        app_submit.resubmit(project, app_submit.ResubmitRequest(sweep_id="s", resources=SlurmResources(mem="lots")))


# --------------------------------------------------------------------------------------
# archive, verify, extract
# --------------------------------------------------------------------------------------

def test_archive_verify_extract_round_trip(project, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    done = run(project, params={"msg": "kept"})
    out = tmp_path / "a.tar.gz"
    made = app_archive.archive(project, app_archive.ArchiveRequest(refs=("hello",), output=str(out)))
    assert made.path == out and out.is_file() and [r for r in made.runs] and made.format == "tar.gz"
    verified = app_archive.verify(app_archive.VerifyRequest(path=str(out)))
    assert verified.failure is None and verified.to_json()["ok"] is True
    dest = tmp_path / "restored"
    restored = app_archive.extract(app_archive.ExtractRequest(archive=str(out), dest=str(dest)))
    assert restored.verified and restored.files > 0
    stdout = next(dest.rglob("stdout.log"))
    assert stdout.read_bytes() == done.paths.stdout.read_bytes()
    assert capfd.readouterr() == ("", "")


def test_verify_names_a_changed_member(project, tmp_path: Path) -> None:
    run(project)
    good = tmp_path / "a.tar.gz"
    app_archive.archive(project, app_archive.ArchiveRequest(refs=("hello",), output=str(good)))
    bad = tmp_path / "b.tar.gz"
    with tarfile.open(good) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("stdout.log"):
                data = b"tampered\n"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    result = app_archive.verify(app_archive.VerifyRequest(path=str(bad)))
    assert isinstance(result.failure, Failure) and "stdout.log" in result.failure.message
    assert not result.to_json()["ok"]


def test_archive_and_extract_option_rules(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--verify FILE"):
        app_archive.check_verify_options(("hello",), False, None, None)
    app_archive.check_verify_options((), False, None, None)
    for size in ("lots", -1):
        with pytest.raises(UsageError, match="size"):
            app_archive.extract(app_archive.ExtractRequest(archive=str(tmp_path / "x.tar.gz"),
                                                           dest=str(tmp_path / "d"), max_size=size))
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------
# usable from a long-running server
# --------------------------------------------------------------------------------------

def test_the_application_layer_never_prints_exits_or_changes_directory() -> None:
    """A server calls these functions in its own process: no output of their own, no exit,
    no working-directory change, no signal handlers, no module-level mutable state."""
    banned = re.compile(r"\b(print\(|sys\.exit|os\.chdir|click\.|signal\.signal|sys\.stdout|sys\.stderr)")
    for path in sorted(APP.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not banned.search(code), f"{path.name}:{n}: {line.strip()}"
            assert not re.match(r"^\s*global\s", code), f"{path.name}:{n}: {line.strip()}"
    assert shutil.which("true")  # the scan above ran over real files
    assert len(list(APP.glob("*.py"))) >= 9


def test_start_up_imports_only_the_application_module_it_needs(tmp_path: Path) -> None:
    """`hpcexp --help` imports no use case (nor command module) at all; `hpcexp list --json` only app.project
    (not the builder, the executors or the converter behind the other use cases)."""
    import json
    import subprocess
    import sys

    app_project.init(app_project.InitRequest(directory=tmp_path / "p"))
    code = ("import sys, io, contextlib, json\nfrom hpcexp.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hpcexp'))))")
    repo = str(APP.parents[1])

    def loaded(*args: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path / "p", capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": repo}, timeout=120)
        return set(json.loads(proc.stdout.strip().splitlines()[-1]))

    help_mods = loaded("--help")
    assert "hpcexp.cli.run_cmds" not in help_mods and not {m for m in help_mods if m.startswith("hpcexp.app")}
    assert "hpcexp.cli.tables" not in help_mods
    list_mods = loaded("list", "--json")
    assert {m for m in list_mods if m.startswith("hpcexp.app")} == {"hpcexp.app", "hpcexp.app.project"}
    assert not {m for m in list_mods if m.startswith(("hpcexp.execute", "hpcexp.convert", "hpcexp.runtime"))}
    assert "hpcexp.build.image" not in list_mods


# --------------------------------------------------------------------------------------
# features that live in the use cases: host network, pull on demand, registry state,
# tracking in status, and the dashboard's backend on top of them
# --------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a stand-in to end a use case once the value under test was seen."""


def _capture_ensure_image(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    seen: list[dict] = []

    def fake(project, exp, arch, **kw):  # noqa: ANN001, ANN202
        seen.append({"host_network": project.host_network, "experiment": exp.name, **kw})
        raise _Stop

    monkeypatch.setattr(image, "ensure_image", fake)
    return seen


@pytest.mark.parametrize("flag, expected", [(None, True), (False, False), (True, True)])
def test_build_host_network_request_overrides_the_config(project, monkeypatch: pytest.MonkeyPatch, flag,
                                                         expected: bool) -> None:
    seen = _capture_ensure_image(monkeypatch)
    with pytest.raises(_Stop):
        app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64", host_network=flag))
    assert [s["host_network"] for s in seen] == [expected]
    assert project.host_network is True          # the caller's project is not changed


def test_build_host_network_false_in_the_config_stays_off(project, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    seen = _capture_ensure_image(monkeypatch)
    with pytest.raises(_Stop):
        app_build.build(dataclasses.replace(project, host_network=False),
                        app_build.BuildRequest(names=("hello",), arch="amd64"))
    assert seen[0]["host_network"] is False


def test_run_and_submit_pull_a_pinned_image_on_demand(project, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_ensure_image(monkeypatch)
    with pytest.raises(_Stop):
        run(project)
    with pytest.raises(_Stop):
        app_submit.submit(project, app_submit.SubmitRequest(name="hello", arch="amd64"))
    assert [s["pull"] for s in seen] == [True, True]
    # build never pulls: it makes the image from its inputs
    with pytest.raises(_Stop):
        app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64"))
    assert seen[-1].get("pull", False) is False


def test_images_shows_registry_state_and_pins_not_here(project, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcexp.build import registry

    app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64"))
    plain = app_build.images(project)
    assert plain.registry == ["-"] and plain.missing == []
    rows = plain.to_json()
    assert [(r["experiment"], r["registry"]) for r in rows] == [("hello", "-")]
    pin = registry.Pin(experiment="broken", arch="amd64", input_hash="h" * 64, sha256="s" * 64,
                       ref="oras://user:secret@reg.example/ns/broken@sha256:" + "d" * 64, size=123,
                       signed_by="pgp:ABC")
    monkeypatch.setattr(registry, "pins_not_here", lambda project, present: [pin])
    monkeypatch.setattr(registry, "image_state", lambda *a: "pushed")
    result = app_build.images(project)
    assert result.registry == ["pushed"] and result.missing == [pin]
    rows = result.to_json()
    assert rows[0]["registry"] == "pushed"
    assert rows[1] == {"experiment": "broken", "arch": "amd64", "state": "not here", "input_hash": "h" * 64,
                       "size": 123, "registry": "pinned,signed", "ref": pin.ref}
    assert "secret" not in app_build.redact_ref(pin.ref)
    assert app_build.pin_registry_cell(registry.Pin("e", "amd64", "h", "s", "r", 1)) == "pinned"


def test_status_exports_in_the_background_and_says_where(project, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from hpcexp.app import tracking

    done = run(project)
    kicked: list[int] = []
    monkeypatch.setattr(tracking, "kick", lambda project, items: kicked.append(len(items)) or 1)
    monkeypatch.setattr(tracking, "describe", lambda project, paths, rec: {"tracker": "mlflow", "run": rec.run_id})
    off = app_runs.status(project)                   # no tracking: configured nowhere, nothing sent
    assert not off.tracked and off.tracking == [] and off.exporting == 0 and kicked == []
    tracked = dataclasses.replace(project, tracking=object())   # the stand-ins above never read it
    on = app_runs.status(tracked, app_runs.StatusRequest(ref=done.record.run_id))
    assert on.tracked and on.exporting == 1 and kicked == [1]
    assert on.tracking == [{"tracker": "mlflow", "run": done.record.run_id}]
    quiet = app_runs.status(tracked, app_runs.StatusRequest(export=False, describe=False))
    assert quiet.tracked and quiet.exporting == 0 and quiet.tracking == [] and kicked == [1]


def test_push_and_pull_choose_experiments_and_refuse_a_missing_key(project, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcexp.app import registry as app_registry
    from hpcexp.build import registry

    with pytest.raises(UsageError, match="--key"):
        app_registry.push(project, app_registry.PushRequest(names=("hello",), key_file=tmp_path / "nokey.pem"))
    pushed: list[str] = []
    monkeypatch.setattr(registry, "push", lambda project, exp, arch, info, **kw: pushed.append(exp.name) or
                        registry.Pin(exp.name, arch, "h", "s", "oras://u:p@r.example/x@sha256:1", 1))
    app_build.build(project, app_build.BuildRequest(names=("hello",), arch="amd64"))
    seen, progress = events()
    told: list[str] = []
    result = app_registry.push(project, app_registry.PushRequest(all=True, arch="amd64"), progress=progress,
                               on_outcome=lambda o: told.append(o.line))
    assert pushed == ["hello"] and told == ["hello amd64: oras://***@r.example/x@sha256:1"]
    assert ("warn", "broken amd64: no current image, not pushed (hpcexp build broken)") in seen
    assert [row["experiment"] for row in result.to_json()] == ["hello"]

    class Lock:
        def pin(self, name, arch):  # noqa: ANN001, ANN201
            return object() if name == "hello" else None

    monkeypatch.setattr(registry, "read_lock", lambda project: Lock())
    monkeypatch.setattr(registry, "pull", lambda project, exp, arch, **kw: {
        "_pulled": True, "path": f"/images/{exp.name}.sif", "sha256": "s", "pulled_from": "oras://r/x"})
    pulled = app_registry.pull(project, app_registry.PullRequest(all=True, arch="amd64"))
    assert pulled.to_json() == [{"experiment": "hello", "arch": "amd64", "path": "/images/hello.sif",
                                 "sha256": "s", "ref": "oras://r/x", "pulled": True}]
    assert pulled.outcomes[0].line == "hello amd64: pulled (/images/hello.sif)"


def test_dashboard_backend_calls_the_use_cases(project) -> None:
    from hpcexp.app import views
    from hpcexp.server import backend

    done = run(project, params={"msg": "x y"})
    items = backend.resolve(project, done.record.run_id)
    assert [r.run_id for _, r in items] == [done.record.run_id]
    row = backend.run_json(items[0])
    assert row == views.json_rows(items)[0] and row["error"] is None and row["dir"] == str(done.paths.dir)
    assert dict(backend.details(items[0]))["params"] == "msg='x y'"
    assert backend.summarize([done.record]) == "1 succeeded" and backend.state_order()[0] == "succeeded"
    assert backend.human_size(2048) == "2.0 KiB" and backend.human_age(61) == "1m01s"
    # a damaged record refuses the dashboard's stop as it refuses the CLI's (the use case's rule)
    done.paths.record.write_text("{not json")
    with pytest.raises(UsageError, match="damaged"):
        backend.stop(project, [done.record.run_id])
    assert backend.runs(project, "hello")[0][1].error
