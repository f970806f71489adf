"""Docker features research Dockerfiles rely on, converted and BUILT with the real Apptainer.

Offline (a busybox SIF stands in for Docker Hub through the base map). Every test checks
behaviour inside the image (file contents, modes, owners, environment, cwd, argv) against
what Docker does with the same Dockerfile; several features share one image so the whole
module builds five small images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
ARCH = "arm64" if os.uname().machine in ("aarch64", "arm64") else "amd64"
OTHER = "amd64" if ARCH == "arm64" else "arm64"

DOCKERFILES = {
    # platform ARGs, ARG before FROM and re-declared, ENV pairs, WORKDIR chaining, directives
    "platform": """\
        # syntax=docker/dockerfile:1.7
        # escape=`
        ARG BASE=busybox:latest
        ARG GLOBAL_ONLY=g
        FROM ${BASE}
        ARG TARGETARCH
        ARG TARGETOS
        ARG TARGETPLATFORM
        ARG BUILDPLATFORM
        ARG BASE
        RUN echo "$TARGETARCH|$TARGETOS|$TARGETPLATFORM|$BUILDPLATFORM|$BASE|${GLOBAL_ONLY:-unset}" > /platform.txt
        ENV A=one
        ENV A=two B=$A C=${A}-x
        RUN echo "$A|$B|$C" > /envpairs.txt
        WORKDIR /w
        WORKDIR a
        WORKDIR b/../c
        RUN pwd > /pwd.txt
        RUN echo one `
            two > /escape.txt
        CMD ["sh", "-c", "pwd; echo \\"$A|$B|$C\\""]
        """,
    # COPY/ADD flags, heredocs, .dockerignore (Dockerfile-specific), --from folders, wildcards
    "files": """\
        FROM busybox:latest AS build
        RUN mkdir -p /out/sub && echo a > /out/a.txt && echo s > /out/sub/s.txt && echo p > /out/skip.pyc
        FROM busybox:latest
        ARG GREETING=hi
        COPY --from=build /out /nos
        COPY --from=build /out/ /slash/
        COPY --from=build /out/sub /nested/sub
        COPY --from=build --exclude=*.pyc /out /ex
        COPY --chmod=0755 tool.sh /usr/local/bin/tool
        COPY --chmod=600 --chown=1000:1000 secret.cfg /etc/app/
        COPY --chown=1000:1000 data/ /data/
        RUN mkdir -p /keep && echo orig > /keep/orig.txt && chmod 700 /keep
        COPY --chmod=644 cfg.txt /keep/
        COPY maybe.ss[o] /opt/maybe/
        COPY --parents src/pkg/a.py src/pkg/b/c.py /app/
        COPY --parents ./src/./pkg/a.py /flat/
        COPY --exclude=*.tmp --exclude=cache logs/ /logs/
        COPY . /ctx/
        COPY <<EOF /etc/hello.conf
        greeting=$GREETING
        EOF
        COPY <<-'EOT' /etc/quoted.conf
        \tliteral $GREETING
        \tEOT
        """,
    # RUN mounts, SHELL, numeric USER, EXPOSE/HEALTHCHECK/ONBUILD, ENTRYPOINT exec + CMD
    "runs": """\
        FROM busybox:latest
        RUN mkdir -p /root/.cache && echo keep > /root/.cache/orig.txt
        RUN --mount=type=cache,target=/root/.cache echo j > /root/.cache/junk && ls /root/.cache > /cache.txt
        RUN --mount=type=secret,id=token cat /run/secrets/token > /secret.txt 2>/dev/null || echo absent > /secret.txt
        RUN --mount=type=bind,source=req.txt,target=/etc/req.txt cat /etc/req.txt > /bind.txt
        RUN mkdir -p /mnt/src && echo image > /mnt/src/own.txt
        RUN --mount=type=bind,source=srcdir,target=/mnt/src ls /mnt/src > /bind-dir.txt
        SHELL ["/bin/sh", "-eu", "-c"]
        RUN echo "shell=$0" > /shell.txt
        USER 1000:1000
        EXPOSE 8080/tcp
        HEALTHCHECK --interval=5s CMD wget -q -O- http://127.0.0.1:8080/ || exit 1
        ONBUILD RUN echo never
        ENTRYPOINT ["/bin/echo", "ep"]
        CMD ["default"]
        """,
    # shell-form ENTRYPOINT through SHELL: CMD and run arguments ignored; STOPSIGNAL
    "service": """\
        FROM busybox:latest
        SHELL ["/bin/ash", "-c"]
        STOPSIGNAL SIGINT
        ENTRYPOINT trap 'echo "got-int"; exit 0' INT; echo "ep0=$0 args=$#"; while :; do sleep 0.1; done
        CMD ["ignored"]
        """,
    # USER uid:gid and USER name: later RUN steps run as that user (a base with util-linux setpriv)
    "user": """\
        FROM withsetpriv:latest
        RUN mkdir -p /home/app && chown 1000:1000 /home/app
        USER 1000:1000
        RUN id -u > /home/app/ids.txt && id -g >> /home/app/ids.txt && echo "$HOME" >> /home/app/ids.txt
        USER app
        RUN touch /home/app/by-name
        USER root
        RUN id -u > /root-again.txt
        ENTRYPOINT ["id", "-u"]
        """,
    # the fixes of this round: legacy KEY VALUE, variables the base image defines, empty wildcard
    "legacy": """\
        FROM busybox:latest
        LABEL org.opencontainers.image.version = "2.0"
        ENV MSG "hello   world"
        WORKDIR "${HOME}"
        COPY cwallet.ss[o] ./
        COPY note.txt ${APP_DIR:-/opt/app}/
        RUN pwd > /build-cwd.txt
        CMD ["sh", "-c", "pwd; echo \\"$MSG\\"; cat /opt/app/note.txt"]
        """,
}


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _setpriv_base(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus the host's util-linux setpriv (and the libraries it loads), users app/root."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("util-linux setpriv is not installed")
    root = tmp_path_factory.mktemp("setpriv-rootfs") / "root"
    subprocess.run(["apptainer", "build", "--sandbox", "-F", str(root), str(busybox_sif)], check=True,
                   capture_output=True)
    libs = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", setpriv], capture_output=True, text=True,
                                                          check=True).stdout)
    for src in [setpriv, *libs]:
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dst)
    (root / "usr" / "bin" / "setpriv").chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    out = root.parent / "setpriv.sif"
    subprocess.run(["apptainer", "build", "-F", str(out), str(root)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def images(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    proj = tmp_path_factory.mktemp("features-e2e")
    setpriv_sif = _setpriv_base(busybox_sif, tmp_path_factory)
    (proj / "hpcexp.yaml").write_text(f"bases:\n  busybox:latest: {{sif: {json.dumps(str(busybox_sif))}}}\n"
                                      f"  withsetpriv:latest: {{sif: {json.dumps(str(setpriv_sif))}}}\n")
    for name, text in DOCKERFILES.items():
        exp = proj / "experiments" / name
        exp.mkdir(parents=True)
        (exp / "Dockerfile").write_text(textwrap.dedent(text))
    _tree(proj / "experiments" / "files", {
        "tool.sh": "#!/bin/sh\necho tool\n", "secret.cfg": "k=v\n", "data/d.txt": "d\n", "cfg.txt": "cfg\n",
        "src/pkg/a.py": "a\n", "src/pkg/b/c.py": "c\n", "src/other.py": "o\n",
        "logs/x.txt": "x\n", "logs/y.tmp": "y\n", "logs/cache/z.txt": "z\n",
        "deep/x/y.log": "no\n", "keep/z/k.log": "yes\n", "secret.txt": "no\n", "top.log": "no\n",
        # the Dockerfile-specific ignore file wins over .dockerignore (which would drop cfg.txt)
        "Dockerfile.dockerignore": "**/*.log\n!keep/**/*.log\nsecret*\n!secret.cfg\n",
        ".dockerignore": "cfg.txt\n",
    })
    _tree(proj / "experiments" / "runs", {"req.txt": "numpy\n", "srcdir/m1.txt": "1\n", "srcdir/m2.txt": "2\n"})
    _tree(proj / "experiments" / "legacy", {"note.txt": "note\n"})
    out: dict[str, Path] = {"_proj": proj}
    broken: dict[str, str] = {}
    for name in DOCKERFILES:  # one by one: an image that fails only fails its own tests
        proc = run_cli("convert", name, "--arch", ARCH, cwd=proj)
        if proc.returncode != 0:
            broken[name] = f"convert failed: {proc.stderr}"
            continue
        sif = proj / "images" / f"{name}.sif"
        sif.parent.mkdir(exist_ok=True)
        recipe = proj / "recipes" / f"{name}.{ARCH}.def"
        build = subprocess.run(["apptainer", "build", "--fakeroot", "-F", str(sif), str(recipe)],
                               cwd=proj / "experiments" / name, capture_output=True, text=True, timeout=300)
        if build.returncode != 0:
            broken[name] = f"build failed: {build.stdout[-3000:]} {build.stderr[-3000:]}"
            continue
        out[name] = sif
    out["_broken"] = broken  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def img(images):
    def get(name: str) -> Path:
        broken = images["_broken"]
        assert name not in broken, broken[name]
        return images[name]
    return get


def _exec(sif: Path, *argv: str, fakeroot: bool = False) -> str:
    cmd = ["apptainer", "exec", *(["--fakeroot"] if fakeroot else []), str(sif), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _run(sif: Path, *argv: str) -> str:
    proc = subprocess.run(["apptainer", "run", str(sif), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _report(images: dict[str, Path], name: str, arch: str = ARCH) -> dict:
    return json.loads((images["_proj"] / "recipes" / f"{name}.{arch}.report.json").read_text())


def _exists(sif: Path, path: str) -> bool:
    return subprocess.run(["apptainer", "exec", str(sif), "test", "-e", path], capture_output=True).returncode == 0


# -- platform / ARG / ENV / WORKDIR / directives ----------------------------------------

def test_platform_args_and_arg_scopes(images, img):
    # ARG before FROM is only seen in the stage when declared again; GLOBAL_ONLY is not
    want = f"{ARCH}|linux|linux/{ARCH}|linux/{ARCH}|busybox:latest|unset\n"
    assert _exec(img("platform"), "cat", "/platform.txt") == want


def test_platform_args_of_the_other_arch_recipe(images):
    proj = images["_proj"]
    exp = proj / "experiments" / "platform"
    (exp / f"Dockerfile.{OTHER}").write_text((exp / "Dockerfile").read_text())
    proc = run_cli("convert", "platform", "--arch", OTHER, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    recipe = (proj / "recipes" / f"platform.{OTHER}.def").read_text()
    for line in (f'export TARGETARCH="{OTHER}"', f'export TARGETPLATFORM="linux/{OTHER}"',
                 'export TARGETOS="linux"', f'export BUILDPLATFORM="linux/{OTHER}"'):
        assert line in recipe
    assert ARCH not in recipe.split("%post", 1)[1]


def test_env_pairs_refer_to_values_before_the_line(images, img):
    assert _exec(img("platform"), "cat", "/envpairs.txt") == "two|one|one-x\n"
    assert _run(img("platform")).splitlines()[1] == "two|one|one-x"


def test_workdir_relative_chaining(images, img):
    assert _exec(img("platform"), "cat", "/pwd.txt") == "/w/a/c\n"
    assert _run(img("platform")).splitlines()[0] == "/w/a/c"


def test_escape_and_syntax_directives(images, img):
    assert _exec(img("platform"), "cat", "/escape.txt") == "one two\n"
    constructs = {n["construct"] for n in _report(images, "platform")["notes"]}
    assert "# escape=`" in constructs


# -- COPY / ADD ------------------------------------------------------------------------

def test_copy_from_folder_with_and_without_trailing_slash(images, img):
    sif = img("files")
    for d in ("/nos", "/slash"):  # the folder's contents, not the folder, either way
        assert _exec(sif, "cat", f"{d}/a.txt", f"{d}/sub/s.txt") == "a\ns\n"
        assert not _exists(sif, f"{d}/out")
    assert _exec(sif, "cat", "/nested/sub/s.txt") == "s\n"


def test_copy_exclude(images, img):
    sif = img("files")
    assert _exec(sif, "cat", "/ex/a.txt") == "a\n" and not _exists(sif, "/ex/skip.pyc")
    assert _exec(sif, "cat", "/logs/x.txt") == "x\n"
    assert not _exists(sif, "/logs/y.tmp") and not _exists(sif, "/logs/cache")


def test_copy_parents(images, img):
    sif = img("files")
    assert _exec(sif, "cat", "/app/src/pkg/a.py", "/app/src/pkg/b/c.py") == "a\nc\n"
    assert not _exists(sif, "/app/a.py") and not _exists(sif, "/app/src/other.py")
    assert _exec(sif, "cat", "/flat/pkg/a.py") == "a\n"


def test_copy_chmod_and_chown(images, img):
    sif = img("files")
    assert _exec(sif, "stat", "-c", "%a", "/usr/local/bin/tool") == "755\n"
    assert _exec(sif, "tool") == "tool\n"
    # owners as the image stores them (seen under --fakeroot, where ids are mapped back)
    assert _exec(sif, "stat", "-c", "%a %u:%g", "/etc/app/secret.cfg", fakeroot=True) == "600 1000:1000\n"
    assert _exec(sif, "stat", "-c", "%u:%g", "/data/d.txt", fakeroot=True) == "1000:1000\n"
    # only the copied file changed: the destination folder keeps its own mode
    assert _exec(sif, "stat", "-c", "%a", "/keep", "/keep/cfg.txt", fakeroot=True) == "700\n644\n"
    assert _exec(sif, "cat", "/keep/orig.txt", fakeroot=True) == "orig\n"


def test_copy_heredocs(images, img):
    sif = img("files")
    assert _exec(sif, "cat", "/etc/hello.conf") == "greeting=hi\n"
    assert _exec(sif, "cat", "/etc/quoted.conf") == "literal $GREETING\n"
    assert _exec(sif, "stat", "-c", "%a", "/etc/hello.conf") == "644\n"


def test_dockerignore_double_star_exceptions_and_dockerfile_specific_file(images, img):
    sif = img("files")
    listing = _exec(sif, "find", "/ctx", "-type", "f").split()
    assert "/ctx/keep/z/k.log" in listing and "/ctx/secret.cfg" in listing
    assert "/ctx/cfg.txt" in listing  # .dockerignore is not read when Dockerfile.dockerignore exists
    for gone in ("/ctx/deep/x/y.log", "/ctx/top.log", "/ctx/secret.txt"):
        assert gone not in listing


def test_wildcard_matching_nothing(images, img):
    sif = img("files")
    assert not _exists(sif, "/opt/maybe/maybe.sso")
    notes = _report(images, "files")["notes"]
    assert any(n["code"] == "P32" and "maybe.ss[o]" in n["construct"] for n in notes)


# -- RUN mounts, SHELL, USER, ENTRYPOINT -------------------------------------------------

def test_run_mount_cache_is_empty_and_stays_out_of_the_image(images, img):
    sif = img("runs")
    assert _exec(sif, "cat", "/cache.txt") == "junk\n"
    assert _exec(sif, "ls", "/root/.cache") == "orig.txt\n"


def test_run_mount_secret_absent_and_bind(images, img):
    sif = img("runs")
    assert _exec(sif, "cat", "/secret.txt") == "absent\n"  # no secret given: Docker's step sees none either
    assert _exec(sif, "cat", "/bind.txt") == "numpy\n" and not _exists(sif, "/etc/req.txt")
    # a bind over a folder shows the source during the step; the image's own files come back
    assert _exec(sif, "cat", "/bind-dir.txt") == "m1.txt\nm2.txt\n"
    assert _exec(sif, "ls", "/mnt/src") == "own.txt\n"


def test_shell_instruction(images, img):
    assert _exec(img("runs"), "cat", "/shell.txt") == "shell=/bin/sh\n"


def test_numeric_user_exec_entrypoint_and_report(images, img):
    sif = img("runs")
    assert _run(sif) == "ep default\n"
    assert _run(sif, "a b") == "ep a b\n"
    # Apptainer runs as whoever starts it: the report says so for USER 1000:1000
    me = _exec(sif, "id", "-u").strip()
    assert me == str(os.getuid())
    by = {n["construct"].split()[0]: n for n in _report(images, "runs")["notes"]}
    assert by["USER"]["action"] == "approximated" and "1000:1000" in by["USER"]["construct"]
    assert "whoever starts it" in by["USER"]["reason"]
    for construct, code in (("EXPOSE", "P27"), ("HEALTHCHECK", "P24"), ("ONBUILD", "P25")):
        assert by[construct]["code"] == code and by[construct]["reason"]
        assert by[construct]["action"] == "dropped"


def test_shell_form_entrypoint_through_shell_ignores_cmd_and_args(images, img):
    proc = subprocess.Popen(["apptainer", "run", str(img("service")), "x", "y"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ep0=/bin/ash args=0\n"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_stopsignal_used_by_hpcexp_stop(images):
    proj = images["_proj"]
    proc = run_cli("run", "-d", "service", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    log = proj / "runs" / "service" / run_id / "stdout.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().startswith("ep0=")):
        assert time.monotonic() < deadline, "the service never started"
        time.sleep(0.1)
    proc = run_cli("stop", run_id, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((proj / "runs" / "service" / run_id / "run.json").read_text())
    assert rec["stop_signal"] == "SIGINT"
    assert rec["state"] == "cancelled" and rec["signal"] == 2
    assert "got-int" in log.read_text()  # the payload saw SIGINT (SIGTERM would have killed it silently)


def test_user_runs_later_steps_as_that_user(images, img):
    sif = img("user")
    assert _exec(sif, "cat", "/home/app/ids.txt") == "1000\n1000\n/home/app\n"
    assert _exec(sif, "stat", "-c", "%u:%g", "/home/app/ids.txt", "/home/app/by-name", fakeroot=True) == \
        "1000:1000\n1000:1000\n"
    assert _exec(sif, "cat", "/root-again.txt") == "0\n"
    assert _run(sif) == f"{os.getuid()}\n"  # the container runs as whoever starts it


# -- legacy KEY VALUE, base-image variables, empty wildcard -------------------------------

def test_legacy_forms_and_base_variables(images, img):
    sif = img("legacy")
    labels = subprocess.run(["apptainer", "inspect", "--json", "--labels", str(sif)], capture_output=True,
                            text=True, check=True).stdout
    assert json.loads(labels)["data"]["attributes"]["labels"]["org.opencontainers.image.version"] == "= 2.0"
    # WORKDIR "${HOME}": the build's HOME (Apptainer's, the base has none) and the runner's at run time
    assert _exec(sif, "cat", "/build-cwd.txt") == "/root\n"
    out = _run(sif).splitlines()
    assert out == [os.path.expanduser("~"), "hello   world", "note"]
    notes = _report(images, "legacy")["notes"]
    assert any(n["code"] == "P33" and n["construct"].startswith("WORKDIR") for n in notes)
