"""hpcexp.runtime.launch.plan: the apptainer command of a run (pure, no container needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import HOSTILE_VALUES

from hpcexp.core.config import load_project
from hpcexp.core.layout import RunPaths
from hpcexp.errors import UsageError
from hpcexp.runtime import launch


def _project(root: Path, yaml: str = "{}\n"):
    (root / "hpcexp.yaml").write_text(yaml)
    d = root / "experiments" / "hello"
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text('FROM busybox:latest\nENTRYPOINT ["sh"]\n')
    return load_project(root)


def _plan(root: Path, yaml: str = "{}\n", **kw):
    project = _project(root, yaml)
    exp = project.experiment("hello")
    run = RunPaths(root / "runs" / "hello" / "R1")
    return launch.plan(project, exp, Path("/img/hello.sif"), run, run_id="R1", **kw), run


def test_default_plan_is_contained_unevaluated_and_binds_the_run_results(tmp_path: Path) -> None:
    plan, run = _plan(tmp_path, params={"lr": "0.1"})
    argv = list(plan.argv)
    assert argv[:2] == ["apptainer", "run"]
    for flag in ("--containall", "--no-eval", "--writable-tmpfs"):
        assert flag in argv
    assert "--nv" not in argv
    assert argv[argv.index("--pwd") + 1] == "/experiment"
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert f"{(tmp_path / 'experiments' / 'hello').resolve()}:/experiment:ro" in binds
    assert f"{run.results}:/experiment/results:rw" in binds
    assert argv.index("/img/hello.sif") < argv.index("--lr=0.1")
    assert plan.container_env["HPCEXP_RUN_ID"] == "R1"
    assert plan.container_env["HPCEXP_PARAM_lr"] == "0.1"
    assert json.loads(plan.container_env["HPCEXP_PARAMS"]) == {"lr": "0.1"}


def test_gpu_writable_and_params_as(tmp_path: Path) -> None:
    plan, _ = _plan(tmp_path, "experiments:\n  hello:\n    params_as: [env]\n", params={"a": "1"}, gpu=True,
                    writable=True)
    assert "--nv" in plan.argv
    assert not any(a.startswith("--a=") for a in plan.argv)
    assert plan.container_env["HPCEXP_PARAM_a"] == "1"
    assert any(a.endswith(":/experiment:rw") for a in plan.argv)


@pytest.mark.parametrize("value", HOSTILE_VALUES + ["line1\nline2", ""])
def test_hostile_values_stay_single_arguments_and_env_values(tmp_path: Path, value: str) -> None:
    plan, _ = _plan(tmp_path, params={"msg": value})
    assert plan.argv[-1] == f"--msg={value}"
    assert plan.container_env["HPCEXP_PARAM_msg"] == value
    assert "--no-eval" in plan.argv  # Apptainer would otherwise shell-evaluate the env value


def test_process_env_scrubs_callers_apptainer_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("APPTAINER_BIND", "/:/host")
    monkeypatch.setenv("SINGULARITY_BINDPATH", "/etc")
    monkeypatch.setenv("APPTAINERENV_SNEAKY", "1")
    monkeypatch.setenv("APPTAINER_TMPDIR", str(tmp_path))
    plan, _ = _plan(tmp_path)
    env = plan.process_env()
    assert "APPTAINER_BIND" not in env and "SINGULARITY_BINDPATH" not in env
    assert "APPTAINERENV_SNEAKY" not in env
    assert env["APPTAINER_TMPDIR"] == str(tmp_path)
    assert env["APPTAINERENV_HPCEXP_RUN_ID"] == "R1"


def test_binds_are_canonical_and_dangerous_ones_refused(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    proj = home / "proj"
    proj.mkdir()
    data = tmp_path / "da:ta,x"
    data.mkdir()
    link = tmp_path / "rootlink"
    link.symlink_to("/")
    plan, _ = _plan(proj, f"experiments:\n  hello:\n    binds: [{{src: {json.dumps(str(data))}, dst: /data}}]\n")
    mounts = [plan.argv[i + 1] for i, a in enumerate(plan.argv) if a == "--mount"]
    assert len(mounts) == 1 and "type=bind" in mounts[0] and "/data" in mounts[0]
    for src in ("/", str(home), str(link), "/etc"):
        with pytest.raises(UsageError, match="refusing"):
            _plan(proj, f"experiments:\n  hello:\n    binds: [{{src: {json.dumps(src)}, dst: /x}}]\n")
    plan, _ = _plan(proj, f"experiments:\n  hello:\n    binds: [{{src: {json.dumps(str(home))}, dst: /x}}]\n",
                    allow_binds=True)
    assert f"{os.path.realpath(home)}:/x:ro" in plan.argv


def test_parse_params_keeps_values_and_rejects_bad_names() -> None:
    assert launch.parse_params(["a=b=c", "x=", "y= sp "]) == {"a": "b=c", "x": "", "y": " sp "}
    for bad in ("noequals", "1x=2", "a-b=1", "=v"):
        with pytest.raises(UsageError):
            launch.parse_params([bad])


def test_cmd_only_image_runs_cmd_with_parameters_appended(tmp_path: Path) -> None:
    """`CMD ["python", "train.py"]` + `-p lr=0.1` must run `python train.py --lr=0.1`, not `--lr=0.1`."""
    cmd = ("python3", "train.py")
    plan, _ = _plan(tmp_path, params={"lr": "0.1"}, image_cmd=cmd, image_entrypoint=None)
    argv = list(plan.argv)
    assert argv[:2] == ["apptainer", "exec"]
    assert argv[argv.index("/img/hello.sif") + 1:] == ["python3", "train.py", "--lr=0.1"]
    # no parameters: the image's own runscript runs CMD as Docker would
    plan, _ = _plan(tmp_path, image_cmd=cmd, image_entrypoint=None)
    assert list(plan.argv)[1] == "run" and plan.argv[-1] == "/img/hello.sif"
    # explicit arguments replace CMD (Docker's rule), parameters follow them
    plan, _ = _plan(tmp_path, params={"lr": "0.1"}, args=["python3", "other.py"], image_cmd=cmd)
    assert list(plan.argv)[1] == "run" and list(plan.argv)[-3:] == ["python3", "other.py", "--lr=0.1"]
    # an ENTRYPOINT takes the parameters as its arguments
    plan, _ = _plan(tmp_path, params={"lr": "0.1"}, image_cmd=("--epochs=3",), image_entrypoint=("python3", "t.py"))
    assert list(plan.argv)[1] == "run" and list(plan.argv)[-1] == "--lr=0.1"
    # parameters only as environment: CMD is left to the runscript
    plan, _ = _plan(tmp_path, "experiments:\n  hello:\n    params_as: [env]\n", params={"lr": "0.1"},
                    image_cmd=cmd)
    assert list(plan.argv)[1] == "run" and plan.argv[-1] == "/img/hello.sif"
