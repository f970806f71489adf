"""Unit tests of the Dockerfile tokenizer, the converter and `hpcexp convert` (no Apptainer needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcexp.convert import dockerfile as dfm
from hpcexp.convert import words
from hpcexp.convert.recipe import BaseResolution, IgnoreRules, convert
from hpcexp.errors import ConvertError
from tests.conftest import HOSTILE_VALUES, assert_clean_error, run_cli


def write(tmp_path: Path, text: str, name: str = "Dockerfile", **files: str) -> Path:
    for rel, content in files.items():
        p = tmp_path / rel.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    path = tmp_path / name
    path.write_text(text)
    return path


def conv(tmp_path: Path, text: str, **kw):
    files = kw.pop("files", {})
    return convert(write(tmp_path, text, **files), source_label="Dockerfile", **kw)


def post(recipe: str) -> str:
    return recipe.split("%post", 1)[1].split("\n%", 1)[0] if "%post" in recipe else ""


# -- tokenizer ----------------------------------------------------------------------------

def test_tokenizer_joins_continuations_and_drops_comment_lines():
    df = dfm.parse("FROM a\nRUN one \\\n  # comment\n\n  two\n", Path("D"))
    run = df.instructions[1]
    assert run.keyword == "RUN" and run.line == 2 and run.end_line == 5
    assert run.args == "one   two"


def test_tokenizer_lowercase_keyword_and_flags():
    df = dfm.parse("from --platform=linux/arm64 x AS y\ncopy --from=y --chown=1:1 a b\n", Path("D"))
    f, c = df.instructions
    assert f.keyword == "FROM" and f.flag("platform") == "linux/arm64" and f.args == "x AS y"
    assert c.flags == (("from", "y"), ("chown", "1:1")) and c.args == "a b"


def test_tokenizer_escape_directive_and_json_form():
    df = dfm.parse("# escape=`\nFROM a\nRUN echo `\n two\nCMD [\"a\", \"b c\"]\nCMD [bad json\n", Path("D"))
    assert df.escape == "`"
    assert df.instructions[1].args == "echo  two"
    assert df.instructions[2].exec_form == ("a", "b c")
    assert df.instructions[3].exec_form is None


def test_tokenizer_directive_only_at_top():
    df = dfm.parse("FROM a\n# escape=`\nRUN x\n", Path("D"))
    assert df.escape == "\\"


def test_tokenizer_heredocs():
    text = "FROM a\nRUN <<EOF\nfrom x import y\nRUN not an instruction\nEOF\nRUN cat <<-'A' <<B\n\tone\n\tA\ntwo\nB\n"
    df = dfm.parse(text, Path("D"))
    assert [i.keyword for i in df.instructions] == ["FROM", "RUN", "RUN"]
    h = df.instructions[1].heredocs[0]
    assert h.body == "from x import y\nRUN not an instruction\n" and not h.quoted
    a, b = df.instructions[2].heredocs
    assert (a.body, a.strip_tabs, a.quoted) == ("one\n", True, True)
    assert b.body == "two\n"


@pytest.mark.parametrize("text,needle", [
    ("FROM a\nRUN <<EOF\nbody\n", "never terminated"),
    ("FROM a\nFROBNICATE x\n", "unknown instruction 'FROBNICATE'"),
    ("# escape=x\nFROM a\n", "invalid escape directive"),
])
def test_tokenizer_errors_name_the_line(text, needle):
    with pytest.raises(ConvertError) as exc:
        dfm.parse(text, Path("D"), "Dockerfile")
    assert needle in str(exc.value) and "Dockerfile:" in str(exc.value)


def test_word_processor_expansion_forms():
    wp = words.WordProcessor({"A": ("1",), "E": ("",)}, unset={"U"})
    assert words.literal(wp.word("${A:-x}${U:-d}${E:-e}${E-f}")) == "1de"
    assert words.literal(wp.word("${A:+alt}${U:+no}${E:+no}${E+yes}")) == "altyes"
    assert words.literal(wp.word("'$A' \"$A\" \\$A")) == "$A 1 $A"
    ref = wp.word("/x${PATH:+:$PATH}")
    assert words.render_shell(ref) == "/x${PATH:+:${PATH}}"
    assert [words.literal(w) for w in wp.words('a "b c"  d\\ e')] == ["a", "b c", "d e"]
    with pytest.raises(ValueError):
        wp.word('"unterminated')


def test_split_key_values():
    assert words.split_key_values('A=1 B="two words" C=\'x y\' D=a\\ b') == [
        ("A", "1"), ("B", '"two words"'), ("C", "'x y'"), ("D", "a\\ b")]


# -- .dockerignore ------------------------------------------------------------------------

def test_ignore_rules():
    rules = IgnoreRules([".git", "**/*.pyc", "data/*", "!data/keep.txt", "/checkpoints/", "# comment", ""])
    assert rules.ignored(".git/HEAD")
    assert rules.ignored("a/b/c.pyc") and rules.ignored("c.pyc")
    assert rules.ignored("data/big.bin") and not rules.ignored("data/keep.txt")
    assert rules.ignored("checkpoints/x.pt")
    assert not rules.ignored("main.py")


def test_context_files_respect_dockerignore(tmp_path):
    c = conv(tmp_path, "FROM a\nCOPY . /app\n",
             files={".dockerignore": "secret*\n*.log\n", "a.py": "", "secret.key": "", "x.log": "", "sub__b.py": ""})
    assert [rel for rel, _ in c.context_files] == [".dockerignore", "Dockerfile", "a.py", "sub/b.py"]
    assert all(p == tmp_path / rel for rel, p in c.context_files)
    assert "secret" not in c.recipe


# -- semantics ----------------------------------------------------------------------------

def test_build_args_precedence_and_report(tmp_path):
    text = "ARG TAG=3.10\nFROM python:${TAG}\nARG N=1\nRUN echo $N\n"
    assert conv(tmp_path, text).base_refs == ("python:3.10",)
    c = conv(tmp_path, text, build_args={"TAG": "3.12", "N": "7"})
    assert c.base_refs == ("python:3.12",)
    assert c.build_args == {"N": "7", "TAG": "3.12"}
    assert 'export N="7"' in post(c.recipe)


def test_base_resolution_hook(tmp_path):
    c = conv(tmp_path, "FROM python:3.11-slim\nFROM busybox AS b\nCOPY --from=0 /x /x\n",
             resolve_base=lambda ref: (BaseResolution("localimage", "bases/py.sif")
                                       if ref.startswith("python") else None))
    assert "Bootstrap: localimage\nFrom: bases/py.sif\nStage: stage0" in c.recipe
    assert "Bootstrap: docker\nFrom: busybox\nStage: b" in c.recipe
    assert c.base_refs == ("python:3.11-slim", "busybox")


def test_workdir_and_env_exported_at_their_position(tmp_path):
    c = conv(tmp_path, "FROM a\nRUN echo first\nENV X=1\nWORKDIR app\nWORKDIR sub\nRUN echo $X\n")
    p = post(c.recipe)
    assert p.index("echo first") < p.index('export X="1"') < p.index("cd /app/sub") < p.index("echo $X")
    assert c.workdir == "/app/sub"
    assert '%environment\nexport X="1"' in c.recipe


def test_header_names_dockerfile_sha_and_version(tmp_path):
    import hashlib

    from hpcexp import __version__

    path = write(tmp_path, "FROM a\n")
    c = convert(path, source_label="experiments/x/Dockerfile")
    first = c.recipe.splitlines()[0]
    assert "experiments/x/Dockerfile" in first and hashlib.sha256(b"FROM a\n").hexdigest() in first
    assert __version__ in first and str(tmp_path) not in c.recipe


def test_unused_stages_are_left_out(tmp_path):
    c = conv(tmp_path, "FROM a AS test\nRUN pytest\nFROM b AS base\nRUN echo base\nFROM base\nRUN echo final\n",
             files={})
    assert "pytest" not in c.recipe and "Stage:" not in c.recipe
    assert c.base_refs == ("b",)
    assert post(c.recipe).index("echo base") < post(c.recipe).index("echo final")
    assert {n.construct for n in c.notes} >= {"stage test", "stage base"}


def test_strict_flag_property(tmp_path):
    assert not conv(tmp_path, "FROM a\nRUN x\n").approximated
    assert conv(tmp_path, "FROM a\nUSER bob\n").approximated


def test_spython_crash_and_exit_become_convert_error(tmp_path, monkeypatch, capsys):
    from hpcexp.convert import recipe

    recipe._spython_mod()
    parser = recipe._SPY["parser"]

    def boom(_text):
        recipe._SPY["bot"].exit("spython gave up")

    monkeypatch.setattr(parser, "parse_env", boom)
    with pytest.raises(ConvertError) as exc:
        conv(tmp_path, "FROM a\n\nENV A=1\n")
    assert str(exc.value).startswith("Dockerfile:3: spython failed on ENV")
    assert "spython gave up" in str(exc.value)
    monkeypatch.setattr(parser, "parse_env", lambda t: [][0])
    with pytest.raises(ConvertError) as exc:
        conv(tmp_path, "FROM a\nLABEL a=b\n")
    assert "Dockerfile:2" in str(exc.value) and "IndexError" in str(exc.value)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_spython_is_in_the_pipeline(tmp_path, monkeypatch):
    from hpcexp.convert import recipe

    recipe._spython_mod()
    calls = []
    real = recipe._SPY["writer"].create_keyval_section
    monkeypatch.setattr(recipe._SPY["writer"], "create_keyval_section",
                        lambda *a: calls.append(a[1]) or real(*a))
    conv(tmp_path, "FROM a\nLABEL x=y\nCOPY f /f\n", files={"f": ""})
    assert sorted(calls) == ["files", "labels"]


@pytest.mark.parametrize("text,needle", [
    ("FROM a\nCOPY missing.txt /x\n", "source 'missing.txt' not found"),
    ("FROM a\nCOPY ../up /x\n", "outside the build context"),
    ("FROM a\nCOPY onlyone\n", "needs at least one source"),
    ("ARG B\nFROM ${B}\n", "expands to ''"),
    ("FROM a\nENV A=\"unterminated\n", "unterminated"),
    ("FROM a\nSHELL /bin/bash -c\n", "must be a JSON list"),
    ("FROM a\nCOPY --from=0 /x /y\n", "refers to the stage being built"),
    ("FROM a\nCOPY --chmod=rwx f /y\n", "is not a mode"),
    ("RUN x\n", "comes before the first FROM"),
    ("# just a comment\n", "no instructions"),
    ("ARG A=1\n", "no FROM instruction"),
])
def test_semantic_errors_are_one_line(tmp_path, text, needle):
    with pytest.raises(ConvertError) as exc:
        conv(tmp_path, text, files={"f": ""})
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


# -- hostile inputs through the CLI: one-line errors, never a traceback ---------------------

def test_hostile_inputs(tmp_path):
    (tmp_path / "empty").write_text("")
    (tmp_path / "nofrom").write_text("RUN echo hi\n")
    (tmp_path / "nul").write_bytes(b"FROM a\nRUN echo \x00\n")
    (tmp_path / "latin1").write_bytes(b"FROM a\nRUN echo \xe9\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "huge").write_text("".join(f"garbage line {i}\n" for i in range(10000)))
    os.mkfifo(tmp_path / "fifo")
    for name, needle in [("empty", "no instructions"), ("nofrom", "before the first FROM"), ("nul", "NUL byte"),
                         ("latin1", "not valid UTF-8"), ("dir", "is a directory"), ("huge", "unknown instruction"),
                         ("does-not-exist", "no such file"), ("fifo", "not a regular file")]:
        proc = run_cli("convert", "--dockerfile", str(tmp_path / name))
        assert_clean_error(proc, 2, needle)
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_ten_thousand_lines_convert(tmp_path):
    text = "FROM a\n" + "".join(f"RUN echo {i} \\\n  && true\n" for i in range(5000))
    path = write(tmp_path, text)
    assert len(text.splitlines()) > 10000
    c = convert(path)
    assert c.recipe.count("set +e") == 5000


# -- CLI -------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path):
    (tmp_path / "hpcexp.yaml").write_text(
        "build_args: {GREETING: yaml}\n"
        "bases:\n  busybox:latest: {sif: bases/busybox.sif}\n  python:3.11-slim: {image: 'docker://mirror.invalid/python:3.11-slim'}\n"
        "experiments:\n  hello:\n    build_args: {WHO: yaml}\n")
    exp = tmp_path / "experiments" / "hello"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nARG GREETING=df\nARG WHO=df\nENV G=$GREETING W=$WHO\n"
                                    "USER nobody\nCMD [\"echo\", \"hi\"]\n")
    (exp / "Dockerfile.aarch64").write_text("FROM python:3.11-slim\n")
    other = tmp_path / "experiments" / "other"
    other.mkdir()
    (other / "Containerfile").write_text("FROM python:3.11-slim\n")
    return tmp_path


def test_cli_convert_writes_recipe_and_report(project):
    proc = run_cli("convert", "hello", "--arch", "amd64", "--build-arg", "WHO=cli", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "hello.amd64.def: 3 notes (1 approximated)" in proc.stderr
    assert "USER nobody: approximated" in proc.stderr
    recipe = (project / "recipes" / "hello.amd64.def").read_text()
    assert "Bootstrap: localimage\nFrom: ../../bases/busybox.sif\n" in recipe
    assert 'export G="yaml"' in recipe and 'export W="cli"' in recipe
    assert "experiments/hello/Dockerfile" in recipe.splitlines()[0] and str(project) not in recipe
    report = json.loads((project / "recipes" / "hello.amd64.report.json").read_text())
    assert report["dockerfile"] == "experiments/hello/Dockerfile"
    assert report["counts"]["approximated"] == 1 and report["notes"][0]["line"] >= 0
    assert report["base_refs"] == ["busybox:latest"]


def test_cli_arch_variants_and_missing_arch(project):
    proc = run_cli("convert", "hello", "--arch", "arm64", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out[0]["recipe"] == "recipes/hello.arm64.def" and out[0]["arch"] == "arm64"
    assert "Bootstrap: docker\nFrom: mirror.invalid/python:3.11-slim" in (project / out[0]["recipe"]).read_text()
    proc = run_cli("convert", "other", "--arch", "arm64", cwd=project)
    assert_clean_error(proc, 2, "no Dockerfile for arm64", "Containerfile")
    proc = run_cli("convert", "other", "--arch", "amd64", cwd=project)
    assert proc.returncode == 0, proc.stderr


def test_cli_check_detects_stale(project):
    proc = run_cli("convert", "--all", "--arch", "amd64", "--check", cwd=project)
    assert proc.returncode == 1 and "stale" in proc.stderr
    assert not (project / "recipes" / "hello.amd64.def").exists()
    assert run_cli("convert", "--all", "--arch", "amd64", cwd=project).returncode == 0
    proc = run_cli("convert", "--all", "--arch", "amd64", "--check", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert [r["stale"] for r in json.loads(proc.stdout)] == [False, False]
    df = project / "experiments" / "hello" / "Dockerfile"
    df.write_text(df.read_text() + "RUN echo changed\n")
    proc = run_cli("convert", "hello", "--arch", "amd64", "--check", cwd=project)
    assert proc.returncode == 1 and "hello.amd64.def" in proc.stderr


def test_cli_strict(project):
    proc = run_cli("convert", "hello", "--arch", "amd64", "--strict", cwd=project)
    assert_clean_error(proc, 1, "--strict")
    assert not (project / "recipes" / "hello.amd64.def").exists()
    assert run_cli("convert", "other", "--arch", "amd64", "--strict", cwd=project).returncode == 0


def test_cli_dockerfile_mode(tmp_path):
    path = write(tmp_path, "FROM a\nCOPY f /f\n", f="x")
    proc = run_cli("convert", "--dockerfile", str(path), "--arch", "amd64", "-o", "-")
    assert proc.returncode == 0 and proc.stdout.startswith("# Generated by hpcexp")
    out = tmp_path / "out" / "x.def"
    out.parent.mkdir()
    proc = run_cli("convert", "--dockerfile", str(path), "--arch", "amd64", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["context_files"] == ["f"] and Path(data["report"]).is_file() and out.is_file()
    proc = run_cli("convert", "--dockerfile", str(path), "--build-arg", "bad")
    assert_clean_error(proc, 2, "--build-arg")


def test_cli_does_not_import_spython_at_startup():
    code = "import sys, hpcexp.cli.main, hpcexp.cli.convert_cmd; print('spython' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_base_map_kinds_through_the_converter(tmp_path):
    """The converter's FROM map is hpcexp.build.bases.resolution: one mapping for convert and build."""
    from hpcexp.build.bases import base_resolver
    from hpcexp.core.config import BaseSpec, load_project

    (tmp_path / "hpcexp.yaml").write_text("")
    proj = load_project(tmp_path)
    import dataclasses

    outside = tmp_path.parent / "shared-base.sif"
    proj = dataclasses.replace(proj, bases={
        "debian:bookworm": BaseSpec(ref="debian:bookworm", kind="debootstrap", suite="bookworm",
                                    mirror="http://deb.invalid/debian", include=("python3-minimal",)),
        "in:project": BaseSpec(ref="in:project", kind="sif", sif=tmp_path / "cache" / "deb.sif"),
        "outside:x": BaseSpec(ref="outside:x", kind="sif", sif=outside),
        "mirrored:y": BaseSpec(ref="mirrored:y", kind="image", image="oras://registry.invalid/y:1"),
    })
    # a base hpcexp builds: named the same for every user and clone
    res = base_resolver(proj)("debian:bookworm")
    assert res is not None and res.bootstrap == "localimage" and res.source.startswith("@hpcexp-cache/bases/")
    # a local SIF inside the project: relative to the build context (deterministic across clones)
    res = base_resolver(proj, None, tmp_path / "experiments" / "x")("in:project")
    assert res == BaseResolution("localimage", "../../cache/deb.sif")
    assert base_resolver(proj)("outside:x") == BaseResolution("localimage", str(outside))
    assert base_resolver(proj)("mirrored:y") == BaseResolution("oras", "registry.invalid/y:1")
    assert base_resolver(proj)("unmapped:z") is None
    c = conv(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, "FROM mirrored:y\n",
             resolve_base=base_resolver(proj))
    assert "Bootstrap: oras\nFrom: registry.invalid/y:1\n" in c.recipe


def test_mangled_dockerfiles_never_crash(tmp_path):
    """Random edits of the golden and fixture Dockerfiles: a conversion or a one-line ConvertError."""
    import random

    here = Path(__file__).parent
    srcs = sorted((here / "golden" / "convert").glob("*/Dockerfile")) + \
        sorted((here / "fixtures" / "dockerfiles").glob("*/Dockerfile"))
    rng = random.Random(20261122)
    pieces = list("\\`$'\"{}[]<>#-=:/ \t\nAz0_.*?!,;&|()") + ["<<EOF", "${", "--mount=", "--from=", "COPY ", "\r\n",
                                                              "é", '["', '"]', "ARG ", "FROM "]
    (tmp_path / "f").write_text("x")
    target = tmp_path / "Dockerfile"
    converted = 0
    for _ in range(600):
        text = rng.choice(srcs).read_text()
        for _ in range(rng.randint(1, 5)):
            pos = rng.randint(0, len(text))
            if rng.random() < 0.6:
                text = text[:pos] + rng.choice(pieces) + text[pos:]
            else:
                text = text[:pos] + text[pos + rng.randint(1, 12):]
        target.write_text(text)
        try:
            convert(target, context=tmp_path, source_label="Dockerfile")
            converted += 1
        except ConvertError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("Dockerfile"), str(exc)
    assert converted > 50  # the edits leave many files valid: the test exercises conversion too


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_values_round_trip_through_shell_quoting(tmp_path, value):
    """A build arg becomes an ENV value, a RUN's environment, a WORKDIR and a CMD argument unharmed."""
    from tests.test_convert_golden import sections

    c = conv(tmp_path, 'FROM a\nARG V\nENV E="$V" F=${V}\nWORKDIR "/w/$V"\nRUN printf %s "$V"\n'
             'CMD ["printf", "%s", "$V"]\n', build_args={"V": value})
    secs = dict(sections(c.recipe))
    env = secs["%environment"]
    out = subprocess.run(["sh", "-c", env + '\nprintf "%s|%s" "$E" "$F"'], capture_output=True, text=True)
    assert out.stdout == f"{value}|{value}", (env, out.stderr)
    post_body = secs["%post"].replace("mkdir -p", "true").replace("cd ", "true ")
    out = subprocess.run(["sh", "-c", post_body], capture_output=True, text=True)
    assert out.stdout == value, (post_body, out.stderr)
    assert c.workdir == "/w/" + value
    assert "printf %s '$V'" in secs["%runscript"]  # exec form: no expansion, as in Docker


def test_build_arg_cannot_inject_header_lines(tmp_path):
    with pytest.raises(ConvertError) as exc:
        conv(tmp_path, "ARG B=a\nFROM ${B}\n", build_args={"B": "x\nBootstrap: evil"})
    assert "control characters" in str(exc.value)


def test_hostile_file_names_are_staged_through_their_folder(tmp_path):
    files = {".dockerignore": "secret*\n", "secret.key": "", "ok.txt": ""}
    files.update({name: "" for name in ("$(touch pwned)", "a'; echo foo", "`id`", "a 0")})
    c = conv(tmp_path, "FROM a\nCOPY . /app/\n", files=files)
    assert ". /.hpcexp/ctx/1/0/_context\n" in c.recipe          # the folder, not the names
    assert "rm -rf /.hpcexp/ctx/1/0/_context/secret.key" in c.recipe
    assert "pwned" not in c.recipe.split("%post")[0]
    assert {"$(touch pwned)", "a 0", "ok.txt"} <= {rel for rel, _ in c.context_files}
    assert "secret.key" not in {rel for rel, _ in c.context_files}
    with pytest.raises(ConvertError) as exc:
        conv(tmp_path, "FROM a\nCOPY [\"$(touch pwned)\", \"/x\"]\n", files=files)
    assert "shell syntax" in str(exc.value)
    assert '"a 0" "/.hpcexp/ctx/1/0/a 0"' in conv(tmp_path, 'FROM a\nCOPY ["a 0", "/x"]\n', files=files).recipe
