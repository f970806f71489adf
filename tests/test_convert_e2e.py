"""Converted recipes BUILT with the real Apptainer (offline, busybox base through the base map).

Each image packs several behaviours so the whole file stays fast; every test checks one
behaviour inside a real image, against what Docker would do with the same Dockerfile.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import HOSTILE_VALUES, run_cli

pytestmark = pytest.mark.e2e
NAMES = [v for v in HOSTILE_VALUES if "/" not in v] + ["$(touch pwned)"]

DOCKERFILES = {
    # ENV/ARG at build and run time, WORKDIR, COPY after RUN, heredoc, .dockerignore, pipefail SHELL,
    # --chmod, ENTRYPOINT + CMD (exec forms)
    "behave": """\
        FROM busybox:latest
        ARG GREETING=hello
        ENV FOO=bar DEEP="two words"
        RUN sh -c 'echo "$FOO|$DEEP|$GREETING"' > /build-env.txt
        WORKDIR /app
        RUN pwd > /build-pwd.txt
        RUN mkdir -p /app/data && echo from-run > /app/data/x.txt
        COPY cfg.txt data/
        RUN cat /app/data/cfg.txt /app/data/x.txt > /after-copy.txt
        RUN <<EOF
        echo heredoc-ran > /heredoc.txt
        EOF
        COPY . /ctx/
        SHELL ["/bin/sh", "-o", "pipefail", "-c"]
        RUN false | true; echo "rc=$?" > /pipefail.txt
        COPY --chmod=0755 tool.sh /usr/local/bin/tool
        USER nobody
        ENTRYPOINT ["/bin/echo", "ep"]
        CMD ["default arg", "it's"]
        """,
    # multi-stage: COPY --from by name and by index; CMD only (exec form)
    "multi": """\
        FROM busybox:latest AS builder
        RUN mkdir -p /out/sub && echo built > /out/artifact.txt && echo deep > /out/sub/d.txt
        FROM busybox:latest
        COPY --from=builder /out/artifact.txt /opt/
        COPY --from=0 /out /opt/all
        CMD ["sh", "-c", "echo cmd-only"]
        """,
    # FROM <earlier stage> (merged), shell-form ENTRYPOINT (arguments ignored)
    "merged": """\
        FROM busybox:latest AS base
        ENV BASEVAR=fromparent
        RUN echo parent > /parent.txt
        FROM base
        RUN cat /parent.txt > /child-saw-parent.txt
        ENTRYPOINT echo shell-ep $BASEVAR
        """,
    # ENTRYPOINT only (exec form): run arguments are appended
    "eponly": """\
        FROM busybox:latest
        ENTRYPOINT ["/bin/echo", "only"]
        """,
    # CMD shell form: run arguments replace it
    "cmdshell": """\
        FROM busybox:latest
        WORKDIR /srv
        CMD echo shell-cmd "$(pwd)" && echo second
        """,
    # ADD of a local archive, RUN --mount=type=bind, COPY --from=<image> (through the base map),
    # exec-form RUN, VOLUME, USER (no setpriv: root), lowercase keywords, ARG with ${X:-default}
    "extras": """\
        ARG TAG
        FROM busybox:${TAG:-latest}
        add data.tar.gz /opt/data
        RUN --mount=type=bind,source=req.txt,target=/tmp/req.txt cp /tmp/req.txt /req-copy.txt
        RUN test ! -e /tmp/req.txt && echo gone > /bind-removed.txt
        COPY --from=busybox:latest /bin/busybox /opt/ext/busybox
        RUN ["/bin/sh", "-c", "echo exec-form > /exec.txt"]
        VOLUME /data/out
        USER 1000
        run id -u > /uid-during-build.txt
        ENV WHO=heredoc
        COPY <<EOT /etc/motd
        hello $WHO
        EOT
        RUN <<EOF
        #!/bin/sh
        echo "shebang $0" > /shebang.txt
        EOF
        """,
    # no CMD/ENTRYPOINT: the base image's runscript is kept
    "plain": """\
        FROM busybox:latest
        RUN echo plain > /plain.txt
        """,
}


@pytest.fixture(scope="module")
def images(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    proj = tmp_path_factory.mktemp("convert-e2e")
    (proj / "hpcexp.yaml").write_text(f"bases:\n  busybox:latest: {{sif: {busybox_sif}}}\n")
    for name, text in DOCKERFILES.items():
        exp = proj / "experiments" / name
        exp.mkdir(parents=True)
        (exp / "Dockerfile").write_text(textwrap.dedent(text))
    b = proj / "experiments" / "behave"
    (b / "cfg.txt").write_text("from-copy\n")
    (b / "secret.txt").write_text("do not ship\n")
    (b / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (b / ".dockerignore").write_text("secret.txt\n")
    for hostile in NAMES:  # file names Apptainer's %files would read as shell syntax
        (b / hostile).write_text("hostile\n")
    x = proj / "experiments" / "extras"
    (x / "req.txt").write_text("numpy\n")
    with tarfile.open(x / "data.tar.gz", "w:gz") as tf:
        payload = b"from-archive\n"
        info = tarfile.TarInfo("inner/file.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    arch = "arm64" if os.uname().machine in ("aarch64", "arm64") else "amd64"
    proc = run_cli("convert", "--all", "--arch", arch, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for name in DOCKERFILES:
        sif = proj / "images" / f"{name}.sif"
        sif.parent.mkdir(exist_ok=True)
        recipe = proj / "recipes" / f"{name}.{arch}.def"
        build = subprocess.run(["apptainer", "build", "--fakeroot", "-F", str(sif), str(recipe)],
                               cwd=proj / "experiments" / name, capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, (name, build.stdout[-3000:], build.stderr[-3000:])
        out[name] = sif
    out["_base"] = busybox_sif
    out["_recipes"] = proj / "recipes"  # type: ignore[assignment]
    return out


def _exec(sif: Path, *argv: str) -> str:
    proc = subprocess.run(["apptainer", "exec", str(sif), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _run(sif: Path, *argv: str) -> str:
    proc = subprocess.run(["apptainer", "run", str(sif), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_env_and_arg_seen_by_child_process_during_build(images):
    assert _exec(images["behave"], "cat", "/build-env.txt") == "bar|two words|hello\n"


def test_env_seen_at_run_time_but_not_arg(images):
    assert _exec(images["behave"], "sh", "-c", 'echo "$FOO|$DEEP|${GREETING:-unset}"') == "bar|two words|unset\n"


def test_workdir_during_build(images):
    assert _exec(images["behave"], "cat", "/build-pwd.txt") == "/app\n"


def test_copy_after_run_keeps_order(images):
    # Docker: the RUN made /app/data first, the COPY added cfg.txt into it, the next RUN saw both
    assert _exec(images["behave"], "cat", "/after-copy.txt") == "from-copy\nfrom-run\n"


def test_heredoc_body_runs(images):
    assert _exec(images["behave"], "cat", "/heredoc.txt") == "heredoc-ran\n"


def test_dockerignored_file_is_absent(images):
    listing = _exec(images["behave"], "ls", "/ctx")
    assert "cfg.txt" in listing and "tool.sh" in listing
    assert "secret.txt" not in listing
    assert "Dockerfile" in listing
    # (busybox ls shows non-ASCII as '?': list through the shell instead)
    names = _exec(images["behave"], "sh", "-c", 'for f in /ctx/*; do printf "%s\\n" "${f#/ctx/}"; done').splitlines()
    assert set(NAMES) <= set(names)
    assert not (Path(images["_recipes"]).parent / "experiments" / "behave" / "pwned").exists()


def test_shell_with_pipefail(images):
    assert _exec(images["behave"], "cat", "/pipefail.txt") == "rc=1\n"


def test_copy_chmod_applied(images):
    assert _exec(images["behave"], "tool") == "tool\n"


def test_entrypoint_and_cmd_without_arguments(images):
    assert _run(images["behave"]) == "ep default arg it's\n"


def test_entrypoint_and_cmd_arguments_replace_cmd(images):
    assert _run(images["behave"], "x y", "z") == "ep x y z\n"


def test_runscript_starts_in_workdir(images, tmp_path):
    proc = subprocess.run(["apptainer", "exec", "--pwd", "/", str(images["cmdshell"]), "/.singularity.d/runscript"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "shell-cmd /srv\nsecond\n"


def test_file_copied_from_earlier_stage(images):
    assert _exec(images["multi"], "cat", "/opt/artifact.txt") == "built\n"
    assert _exec(images["multi"], "cat", "/opt/all/artifact.txt", "/opt/all/sub/d.txt") == "built\ndeep\n"


def test_cmd_only_without_and_with_arguments(images):
    assert _run(images["multi"]) == "cmd-only\n"
    assert _run(images["multi"], "echo", "replaced") == "replaced\n"


def test_from_earlier_stage_is_merged(images):
    assert _exec(images["merged"], "cat", "/child-saw-parent.txt") == "parent\n"


def test_shell_form_entrypoint_ignores_arguments(images):
    assert _run(images["merged"]) == "shell-ep fromparent\n"
    assert _run(images["merged"], "ignored", "args") == "shell-ep fromparent\n"


def test_entrypoint_only_appends_arguments(images):
    assert _run(images["eponly"]) == "only\n"
    assert _run(images["eponly"], "a", "b c") == "only a b c\n"


def test_shell_form_cmd_replaced_by_arguments(images):
    assert _run(images["cmdshell"], "echo", "args win") == "args win\n"


def test_no_cmd_keeps_base_runscript(images):
    arch = "arm64" if os.uname().machine in ("aarch64", "arm64") else "amd64"
    assert "%runscript" not in (images["_recipes"] / f"plain.{arch}.def").read_text()
    base = subprocess.run(["apptainer", "inspect", "--runscript", str(images["_base"])], capture_output=True, text=True)
    mine = subprocess.run(["apptainer", "inspect", "--runscript", str(images["plain"])], capture_output=True, text=True)
    assert base.returncode == 0 and mine.returncode == 0
    assert mine.stdout == base.stdout
    assert _exec(images["plain"], "cat", "/plain.txt") == "plain\n"


def test_staging_folder_removed(images):
    proc = subprocess.run(["apptainer", "exec", str(images["behave"]), "test", "-e", "/.hpcexp"], capture_output=True)
    assert proc.returncode == 1


def test_add_extracts_local_archive(images):
    assert _exec(images["extras"], "cat", "/opt/data/inner/file.txt") == "from-archive\n"


def test_run_mount_bind_is_there_for_the_step_only(images):
    assert _exec(images["extras"], "cat", "/req-copy.txt", "/bind-removed.txt") == "numpy\ngone\n"


def test_copy_from_image_through_base_map(images):
    assert _exec(images["extras"], "/opt/ext/busybox", "echo", "ext-ok") == "ext-ok\n"


def test_exec_form_run_volume_and_user(images):
    assert _exec(images["extras"], "cat", "/exec.txt") == "exec-form\n"
    assert _exec(images["extras"], "sh", "-c", "test -d /data/out && echo dir") == "dir\n"
    # busybox has no setpriv --reuid: later RUN steps ran as (fake)root, as the build log warns
    assert _exec(images["extras"], "cat", "/uid-during-build.txt") == "0\n"


def test_copy_heredoc_and_shebang_heredoc(images):
    assert _exec(images["extras"], "cat", "/etc/motd") == "hello heredoc\n"
    assert _exec(images["extras"], "cat", "/shebang.txt").startswith("shebang /.hpcexp/run/")
