"""Job script rendering: golden files, bash -n, quoting, placeholders, and the script's own
state markers (run here with bash and a stand-in command instead of apptainer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcexp.core.layout import RunPaths
from hpcexp.errors import UsageError
from hpcexp.execute.slurm import sbatch
from tests.conftest import HOSTILE_VALUES

GOLDEN = Path(__file__).parent / "golden" / "sbatch"
UPDATE = os.environ.get("HPCEXP_UPDATE_GOLDEN") == "1"


def _task(run_dir: Path, run_id: str = "20260101-000000-aaaaaa", argv: tuple[str, ...] | None = None,
          env: dict[str, str] | None = None, attempt: int = 1) -> sbatch.TaskSpec:
    return sbatch.TaskSpec(run_id=run_id, run_dir=run_dir,
                           argv=argv or ("apptainer", "exec", "--containall", "/p/images/x.sif", "/bin/sh", "-c",
                                         "echo hi"),
                           container_env=env if env is not None else {"HPCEXP_RUN_ID": run_id}, attempt=attempt)


def _spec(tasks: list[sbatch.TaskSpec], *, array: bool = False, image: Path = Path("/p/images/x.sif"),
          options: dict[str, str | None] | None = None, extra: tuple[str, ...] = ()) -> sbatch.JobSpec:
    opts = {"job-name": "hpcexp-test", "output": "/p/runs/x/slurm-%j.out", "open-mode": "append", "chdir": "/p",
            "time": "10", "mem": "1G"}
    if array:
        opts["array"] = f"0-{len(tasks) - 1}%2"
    opts.update(options or {})
    return sbatch.JobSpec(experiment="hello", project_root=Path("/p"), image=image, tasks=tuple(tasks),
                          options=opts, extra_args=extra, sweep_id="sweep-x" if array else None, array=array)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if not UPDATE:
        # A missing golden is a failure, not a golden: writing it here would pass any output
        assert path.exists(), f"no golden file {path} (HPCEXP_UPDATE_GOLDEN=1 to create it, then review it)"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path} (HPCEXP_UPDATE_GOLDEN=1 to accept)"


def _bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sbatch"
    script.write_text(text)
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_single_run_script_matches_golden_and_parses(tmp_path: Path) -> None:
    env = {"HPCEXP_RUN_ID": "r1", "HPCEXP_PARAMS": json.dumps({"msg": HOSTILE_VALUES[1]}),
           "HPCEXP_PARAM_msg": "$(touch /tmp/hpcexp-pwned) `id` a\\b"}
    argv = ("apptainer", "exec", "/p/images/x.sif", "/bin/sh", "/app/run.sh", *[f"--v={v}" for v in HOSTILE_VALUES])
    text = sbatch.render(sbatch.default_template(), _spec([_task(Path("/p/runs/hello/r1"), "r1", argv, env)]))
    _golden("single.sbatch", text)
    _bash_n(text, tmp_path)
    assert "set -euo pipefail" in text
    assert text.startswith("#!/bin/bash\n#SBATCH --chdir=/p\n#SBATCH --job-name=hpcexp-test\n")


def test_array_script_matches_golden_and_parses(tmp_path: Path) -> None:
    tasks = [_task(Path(f"/p/runs/hello/r{i}"), f"r{i}", env={"HPCEXP_PARAM_seed": str(i)}) for i in range(3)]
    text = sbatch.render(sbatch.default_template(), _spec(tasks, array=True,
                                                          extra=("--constraint=a b", "--exclusive")))
    _golden("array.sbatch", text)
    _bash_n(text, tmp_path)
    assert "#SBATCH --array=0-2%2" in text
    assert '#SBATCH --constraint="a b"' in text and "#SBATCH --exclusive" in text
    assert text.count("HPCEXP_RUN_DIR=/p/runs/hello/r") == 3


def test_shell_and_slurm_syntax_in_templates_is_left_alone() -> None:
    tpl = ("#!/bin/bash\n{{ sbatch_header }}\necho $HOME ${USER:-x} $((1+2)) %A %a %j {x} {{run_id}}\n"
           "{{ record_start }}\n{{launch}}\n{{ record_end }}\n")
    text = sbatch.render(tpl, _spec([_task(Path("/p/runs/a b/r1"), "r1")]))
    assert "echo $HOME ${USER:-x} $((1+2)) %A %a %j {x} r1\n" in text


def test_values_are_inserted_already_quoted() -> None:
    tpl = ("#!/bin/bash\n{{ sbatch_header }}\ncd {{ run_dir }}\necho {{ experiment }} {{ project }}\n"
           "{{ record_start }}\n{{ launch }}\n{{ record_end }}\n")
    spec = _spec([_task(Path("/tmp/ä b/it's:here/r1"), "r1")])
    spec = sbatch.JobSpec(**{**spec.__dict__, "project_root": Path("/tmp/$(x) b")})
    text = sbatch.render(tpl, spec)
    assert "cd '/tmp/ä b/it'\"'\"'s:here/r1'\n" in text
    assert "echo hello '/tmp/$(x) b'\n" in text


@pytest.mark.parametrize("placeholder", ["{{ nope }}", "{{ cfg.cmd }}", "{{ }}", "{{ run_id | upper }}"])
def test_unknown_placeholder_names_template_and_line(placeholder: str) -> None:
    tpl = f"#!/bin/bash\n{{{{ sbatch_header }}}}\n\necho {placeholder}\n{{{{ record_start }}}}\n{{{{ launch }}}}\n" \
          "{{ record_end }}\n"
    with pytest.raises(UsageError) as err:
        sbatch.render_template(tpl, sbatch.placeholder_values(_spec([_task(Path("/p/r"))])),
                               label="slurm/default.sbatch")
    assert str(err.value) == f"slurm/default.sbatch:4: unknown placeholder {placeholder}"


def test_required_placeholders_must_appear_once() -> None:
    values = sbatch.placeholder_values(_spec([_task(Path("/p/r"))]))
    with pytest.raises(UsageError, match=r"slurm/x.sbatch: placeholder \{\{ record_end \}\} is missing"):
        sbatch.render_template("#!/bin/bash\n{{ sbatch_header }}\n{{ record_start }}\n{{ launch }}\n", values,
                               label="slurm/x.sbatch")
    with pytest.raises(UsageError, match="appears 2 times"):
        sbatch.render_template("#!/bin/bash\n{{ sbatch_header }}\n{{ record_start }}\n{{ launch }}\n{{ launch }}\n"
                               "{{ record_end }}\n", values, label="t")
    with pytest.raises(UsageError, match="unbalanced"):
        sbatch.render_template("#!/bin/bash\n{{ sbatch_header }} {{ oops\n", values, label="t")


@pytest.mark.parametrize("bad", ["x\n#SBATCH --mem=1T", "a\rb", "tab\there", "nul\x00", "esc\x1b[0m"])
def test_control_characters_are_refused_everywhere(bad: str) -> None:
    with pytest.raises(UsageError, match="control character"):
        sbatch.render(sbatch.default_template(), _spec([_task(Path("/p/r"), env={"HPCEXP_PARAM_x": bad})]))
    with pytest.raises(UsageError, match="control character"):
        sbatch.render(sbatch.default_template(), _spec([_task(Path("/p/r"), argv=("apptainer", f"--x={bad}"))]))
    with pytest.raises(UsageError, match="control character"):
        sbatch.render(sbatch.default_template(), _spec([_task(Path("/p/r"))], options={"comment": bad}))
    with pytest.raises(UsageError, match="control character"):
        sbatch.render(sbatch.default_template(), _spec([_task(Path("/p/r"))], extra=(f"--comment={bad}",)))


def test_header_quoting_follows_sbatch_rules() -> None:
    assert sbatch.header_quote("debug") == "debug"
    assert sbatch.header_quote("/p/x-%j.out") == "/p/x-%j.out"
    assert sbatch.header_quote('a b "q" #x') == '"a b \\"q\\" #x"'
    assert sbatch.header_quote("back\\slash") == '"back\\\\slash"'
    assert sbatch.slurm_path("/p/100%/x") == "/p/100%%/x"
    with pytest.raises(UsageError):
        sbatch.header_lines({}, ["notanoption"])
    with pytest.raises(UsageError):
        sbatch.header_lines({}, ["--bad option=1"])


def test_container_env_values_are_escaped_unless_no_eval(tmp_path: Path) -> None:
    env = {"HPCEXP_PARAM_x": "$(id) `id`"}
    plain = sbatch.render(sbatch.default_template(), _spec([_task(tmp_path, argv=("apptainer", "exec"), env=env)]))
    assert "'APPTAINERENV_HPCEXP_PARAM_x=\\$(id) \\`id\\`'" in plain
    no_eval = sbatch.render(sbatch.default_template(),
                            _spec([_task(tmp_path, argv=("apptainer", "exec", "--no-eval"), env=env)]))
    assert "'APPTAINERENV_HPCEXP_PARAM_x=$(id) `id`'" in no_eval


def test_container_env_value_escaping() -> None:
    # Apptainer expands $(...), `...` and $VAR inside APPTAINERENV_ values; escaped, they arrive verbatim.
    assert sbatch.container_env_value("a $(id) `id` ${HOME} \\z") == "a \\$(id) \\`id\\` \\${HOME} \\\\z"
    assert sbatch.container_env_value("plain") == "plain"


def test_default_template_is_packaged() -> None:
    text = sbatch.default_template()
    for name in sbatch.REQUIRED:
        assert "{{ %s }}" % name in text


# ---------------------------------------------------------------------------------------------
# Running the generated shell (no Slurm): markers, exit codes, attempts, verbatim arguments
# ---------------------------------------------------------------------------------------------

def _run_script(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.sh"
    script.write_text(text)
    full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, timeout=60)


def _markers(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "events").iterdir())
            if not p.name.startswith(".")}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.sif"
    img.write_text("not really an image")
    return img


def test_script_records_start_and_exit_and_passes_values_verbatim(tmp_path: Path, image: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    printer = shutil.which("printf") or "/usr/bin/printf"
    argv = (printer, "%s\\n", *HOSTILE_VALUES)
    env = {"HPCEXP_PARAM_x": "$(touch pwned) `touch pwned2`"}
    text = sbatch.render(sbatch.default_template(), _spec([_task(run_dir, argv=argv, env=env)], image=image))
    res = _run_script(text, tmp_path, {"SLURM_JOB_ID": "77"})
    assert res.returncode == 0, res.stderr
    assert (run_dir / "stdout.log").read_text().splitlines() == HOSTILE_VALUES
    assert not (tmp_path / "pwned").exists() and not (run_dir / "pwned").exists()
    m = _markers(run_dir)
    assert set(m) == {"attempt-1.started", "attempt-1.exit"}
    assert m["attempt-1.exit"]["exit_code"] == 0 and m["attempt-1.exit"]["launch_error"] is None
    assert m["attempt-1.started"]["job_id"] == "77"
    assert not [p for p in (run_dir / "events").iterdir() if p.name.startswith(".hpcexp-tmp-")]


def test_script_keeps_payload_exit_code_and_attempt_logs(tmp_path: Path, image: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ("bash", "-c", "echo out; echo err >&2; false | cat; exit 7")
    text = sbatch.render(sbatch.default_template(), _spec([_task(run_dir, argv=argv)], image=image))
    res = _run_script(text, tmp_path, {"SLURM_RESTART_COUNT": "1"})
    assert res.returncode == 7
    paths = RunPaths(run_dir)
    assert paths.attempt_stdout(2).read_text() == "out\n"     # same names as paths.py
    assert paths.attempt_stderr(2).read_text() == "err\n"
    assert not paths.stdout.exists()
    m = _markers(run_dir)
    assert m["attempt-2.exit"]["exit_code"] == 7 and m["attempt-2.exit"]["attempt"] == 2


def test_script_fails_fast_when_the_image_vanished(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = sbatch.render(sbatch.default_template(), _spec([_task(run_dir, argv=("true",))],
                                                          image=tmp_path / "gone.sif"))
    res = _run_script(text, tmp_path)
    assert res.returncode == 127
    assert "gone.sif is gone" in res.stderr
    m = _markers(run_dir)
    assert m["attempt-1.exit"]["exit_code"] == 127 and "gone.sif" in m["attempt-1.exit"]["launch_error"]
    assert "attempt-1.started" not in m


def test_script_error_before_payload_leaves_an_exit_marker(tmp_path: Path, image: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tpl = sbatch.default_template().replace("{{ launch }}", "false\n{{ launch }}")
    text = sbatch.render(tpl, _spec([_task(run_dir, argv=("true",))], image=image))
    res = _run_script(text, tmp_path)
    assert res.returncode == 1
    m = _markers(run_dir)
    assert m["attempt-1.exit"]["exit_code"] == 1 and "stopped" in m["attempt-1.exit"]["launch_error"]


def test_array_task_selects_its_run(tmp_path: Path, image: Path) -> None:
    tasks = []
    for i in range(3):
        d = tmp_path / f"r{i}"
        d.mkdir()
        tasks.append(_task(d, f"r{i}", argv=("bash", "-c", f"echo task{i}")))
    text = sbatch.render(sbatch.default_template(), _spec(tasks, array=True, image=image))
    assert _run_script(text, tmp_path, {"SLURM_ARRAY_TASK_ID": "1"}).returncode == 0
    assert (tmp_path / "r1" / "stdout.log").read_text() == "task1\n"
    assert not (tmp_path / "r0" / "stdout.log").exists()
    assert _run_script(text, tmp_path, {"SLURM_ARRAY_TASK_ID": "9"}).returncode == 2


def test_job_drops_apptainer_settings_exported_from_the_login_shell(tmp_path: Path, image: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ("bash", "-c", "env | grep -E '^(APPTAINER|SINGULARITY)' | sort")
    text = sbatch.render(sbatch.default_template(), _spec([_task(run_dir, argv=argv, env={"A": "1"})], image=image))
    res = _run_script(text, tmp_path, {"APPTAINER_BIND": "/:/host", "SINGULARITYENV_X": "1",
                                       "APPTAINER_CACHEDIR": "/c", "APPTAINERENV_SECRET": "s"})
    assert res.returncode == 0, res.stderr
    assert (run_dir / "stdout.log").read_text() == "APPTAINERENV_A=1\nAPPTAINER_CACHEDIR=/c\n"


def test_template_must_be_a_bash_script() -> None:
    values = sbatch.placeholder_values(_spec([_task(Path("/p/r"))]))
    with pytest.raises(UsageError, match=r"t:1: a job script must start with #!/bin/bash"):
        sbatch.render_template("#!/bin/sh\n{{ sbatch_header }}\n{{ record_start }}\n{{ launch }}\n"
                               "{{ record_end }}\n", values, label="t")
