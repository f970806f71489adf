"""hpcexp.yaml validation: every bad input is a one-line error naming file, line and key path,
exit code 2, no traceback, nothing written (reliability test plan cases 1-4 and 10)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.core.config import check_name, load_project
from hpcexp.errors import ConfigError, NotFound, UsageError


def make_project(root: Path, yaml_text: str, experiments: tuple[str, ...] = ("hello",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "hpcexp.yaml").write_text(textwrap.dedent(yaml_text))
    for name in experiments:
        d = root / "experiments" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "Dockerfile").write_text("FROM busybox:latest\n")
    return root


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (yaml text, needles that must appear in the one-line error)
BAD_CONFIGS = {
    "alias_bomb": ("a: &a [x, x]\nb: [*a, *a]\n", ["hpcexp.yaml:1", "anchors are not allowed"]),
    "alias_only": ("images: *nope\n", ["hpcexp.yaml:1", "alias"]),
    "python_tag": ('images: !!python/object/apply:os.system ["touch /tmp/hpcexp-pwned"]\n',
                   ["hpcexp.yaml:1", "invalid YAML"]),
    "duplicate_key": ("images: a\nimages: b\n", ["hpcexp.yaml:2", "images", "duplicate key", "line 1"]),
    "unknown_top": ("imagse: x\n", ["imagse", "did you mean 'images'"]),
    "unknown_slurm": ("slurm: {partiton: low}\n", ["slurm.partiton", "did you mean 'partition'"]),
    "unknown_exp_key": ("experiments:\n  hello:\n    comand: [python3]\n",
                        ["hpcexp.yaml:3", "experiments.hello.comand", "did you mean 'command'"]),
    "cpus_type": ("slurm: {cpus: many}\n", ["slurm.cpus", "whole number"]),
    "cpus_huge": ("slurm: {cpus: 1000000000}\n", ["slurm.cpus", "from 1 to 4096"]),
    "cpus_float": ("slurm: {cpus: 1e9}\n", ["slurm.cpus"]),
    "bad_time": ("slurm: {time: forever}\n", ["slurm.time", "Slurm time"]),
    "bad_mem": ("slurm: {mem: lots}\n", ["slurm.mem", "4G"]),
    "max_parallel_negative": ("slurm: {max_parallel: -5}\n", ["slurm.max_parallel"]),
    "traversal_name": ("experiments:\n  ../../x: {}\n", ["experiments.../../x", "invalid experiment name"]),
    "slash_name": ("experiments:\n  a/b: {}\n", ["invalid experiment name"]),
    "dash_name": ("experiments:\n  -rf: {}\n", ["invalid experiment name"]),
    "dot_name": ("experiments:\n  .hidden: {}\n", ["invalid experiment name"]),
    "long_name": ("experiments:\n  " + "a" * 300 + ": {}\n", ["invalid experiment name"]),
    "newline_in_partition": ('slurm: {partition: "x\\n#SBATCH --mem=1T"}\n', ["slurm.partition", "control"]),
    "escape_runs": ("runs: ../elsewhere\n", ["runs", "escapes the project"]),
    "escape_artifacts": ("experiments:\n  hello: {artifacts: ../../etc}\n",
                         ["experiments.hello.artifacts", "inside the experiment"]),
    "absolute_artifacts": ("experiments:\n  hello: {artifacts: /etc}\n", ["experiments.hello.artifacts"]),
    "experiments_not_map": ("experiments: 3\n", ["experiments", "must be a mapping"]),
    "top_is_list": ("- a\n- b\n", ["must be a mapping"]),
    "bad_yaml": ("slurm: {cpus: 2\n", ["hpcexp.yaml", "invalid YAML"]),
    "bad_param_name": ("experiments:\n  hello:\n    params: {1x: 2}\n", ["experiments.hello.params.1x"]),
    "base_two_kinds": ('bases:\n  "python:3.11": {sif: a.sif, image: "docker://x/y"}\n',
                       ["bases.python:3.11", "exactly one"]),
    "base_bad_uri": ('bases:\n  "python:3.11": {image: "http://x/y"}\n', ["bases.python:3.11.image"]),
    "bind_bad_mode": ("experiments:\n  hello:\n    binds: [{src: /data, dst: /data, mode: rwx}]\n",
                      ["experiments.hello.binds[0].mode", "ro or rw"]),
    "writable_not_bool": ("experiments:\n  hello: {writable: yes please}\n", ["experiments.hello.writable"]),
    "list_form_missing_name": ("experiments:\n  - {ref: x}\n", ["experiments[0]", "needs a name"]),
    "list_form_dup": ("experiments:\n  - {name: a}\n  - {name: a}\n", ["experiments[1].name", "duplicate"]),
    "both_spellings": ("experiments:\n  hello: {command: [a], entrypoint: [b]}\n",
                       ["experiments.hello.entrypoint", "not both"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_error_exit_2(tmp_path: Path, case: str) -> None:
    text, needles = BAD_CONFIGS[case]
    root = tmp_path / "proj"
    root.mkdir()
    (root / "hpcexp.yaml").write_text(text)
    d = root / "experiments" / "hello"
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text("FROM busybox:latest\n")
    before = snapshot(root)
    proc = run_cli("list", cwd=root)
    assert_clean_error(proc, 2, "hpcexp.yaml", *needles)
    first = proc.stderr.splitlines()[0]
    assert first.startswith("hpcexp: error: hpcexp.yaml"), first
    assert snapshot(root) == before, "a bad config must not write anything"
    assert not os.path.exists("/tmp/hpcexp-pwned")


def test_all_problems_listed_at_once(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", """
        imagse: x
        slurm: {partiton: low, cpus: many}
        experiments:
          hello: {artifacts: ../x}
    """)
    with pytest.raises(ConfigError) as info:
        load_project(root)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any("imagse" in p for p in problems)
    assert any("slurm.partiton" in p for p in problems)
    assert any("slurm.cpus" in p for p in problems)
    assert any("experiments.hello.artifacts" in p for p in problems)
    proc = run_cli("list", cwd=root)
    assert_clean_error(proc, 2)
    assert len([ln for ln in proc.stderr.splitlines() if "hpcexp.yaml" in ln and "error" not in ln]) >= 3


def test_size_cap(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "")
    with open(root / "hpcexp.yaml", "w") as fh:
        fh.write("# " + "x" * (2 * 1024 * 1024) + "\n")
    proc = run_cli("list", cwd=root)
    assert_clean_error(proc, 2, "larger than")


def test_nul_byte_and_bad_utf8(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "")
    (root / "hpcexp.yaml").write_bytes(b"images: a\x00b\n")
    assert_clean_error(run_cli("list", cwd=root), 2, "NUL")
    (root / "hpcexp.yaml").write_bytes(b"images: \xff\xfe\n")
    assert_clean_error(run_cli("list", cwd=root), 2, "UTF-8")


def test_config_is_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "hpcexp.yaml").mkdir(parents=True)
    proc = run_cli("--project", str(root), "list")
    assert_clean_error(proc, 2)


def test_no_project_found(tmp_path: Path) -> None:
    proc = run_cli("list", cwd=tmp_path)
    assert_clean_error(proc, 2, "no hpcexp.yaml", "hpcexp init")


def test_found_by_walking_up_and_by_env(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "experiments:\n  hello: {ref: paper}\n")
    deep = root / "experiments" / "hello" / "sub"
    deep.mkdir()
    proc = run_cli("list", "--json", cwd=deep)
    assert proc.returncode == 0, proc.stderr
    assert '"hello"' in proc.stdout
    proc = run_cli("list", "--json", cwd=tmp_path, env={"HPCEXP_PROJECT": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert '"paper"' in proc.stdout


def test_discovery_and_overrides(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", """
        images: /scratch/$HPCEXP_TEST_USER/images
        slurm: {partition: debug, time: "01:00:00", cpus: 2, mem: 4G}
        env: {GLOBAL: "1"}
        experiments:
          hello:
            command: python3 train.py --epochs 3
            params: {lr: 0.1, seed: 1}
            env: {LOCAL: x}
            slurm: {time: "00:10:00", sbatch_args: ["--exclusive"]}
    """, experiments=("hello", "other"))
    os.environ["HPCEXP_TEST_USER"] = "alice"
    try:
        project = load_project(root)
    finally:
        del os.environ["HPCEXP_TEST_USER"]
    assert project.images_dir == Path("/scratch/alice/images")
    assert set(project.experiments) == {"hello", "other"}
    hello = project.experiments["hello"]
    assert hello.command == ("python3", "train.py", "--epochs", "3")
    assert hello.params == {"lr": "0.1", "seed": "1"}
    assert hello.env == {"GLOBAL": "1", "LOCAL": "x"}
    assert hello.slurm.partition == "debug" and hello.slurm.time == "00:10:00" and hello.slurm.cpus == 2
    assert hello.slurm.sbatch_args == ("--exclusive",)
    other = project.experiments["other"]
    assert other.declared is False and other.env == {"GLOBAL": "1"} and other.slurm.time == "01:00:00"


def test_list_form_maps_one_to_one(tmp_path: Path) -> None:
    """The list shape other experiment managers use: name, ref, code, entrypoint, artifacts_path."""
    as_list = make_project(tmp_path / "a", """
        experiments:
          - name: hello
            ref: https://arxiv.org/abs/0000.00000
            code: https://example.org/repo
            entrypoint: python3 main.py
            artifacts_path: out
    """)
    as_map = make_project(tmp_path / "b", """
        experiments:
          hello:
            ref: https://arxiv.org/abs/0000.00000
            code: https://example.org/repo
            command: [python3, main.py]
            artifacts: out
    """)
    a = load_project(as_list).experiments["hello"]
    b = load_project(as_map).experiments["hello"]
    for attr in ("ref", "code", "command", "artifacts"):
        assert getattr(a, attr) == getattr(b, attr), attr


def test_check_name_rules() -> None:
    for good in ("hello", "a.b_c-1", "X" * 64):
        assert check_name(good) == good
    for bad in ("../x", "/etc/x", "a/b", "-rf", ".hidden", "a\x00b", "a\nb", "x" * 65, "", "a b", "a;b"):
        with pytest.raises(UsageError):
            check_name(bad)


def test_unknown_experiment_suggests(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "")
    project = load_project(root)
    with pytest.raises(NotFound) as info:
        project.experiment("helo")
    assert "did you mean 'hello'" in " ".join(info.value.lines())


def test_missing_dockerfile_for_arch_lists_what_exists(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "")
    exp = load_project(root).experiments["hello"]
    with pytest.raises(NotFound) as info:
        exp.dockerfile("arm64")
    msg = " ".join(info.value.lines())
    assert "Dockerfile (amd64)" in msg and "--arch amd64" in msg and "Dockerfile.arm64" in msg


def test_dockerfile_variants_recognised(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "", experiments=())
    d = root / "experiments" / "x"
    d.mkdir(parents=True)
    (d / "Containerfile").write_text("FROM a\n")
    (d / "Dockerfile-aarch64").write_text("FROM a\n")
    exp = load_project(root).experiments["x"]
    assert exp.dockerfile("amd64").name == "Containerfile"
    assert exp.dockerfile("arm64").name == "Dockerfile-aarch64"
