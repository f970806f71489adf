"""The rootless builder: ``apptainer build --fakeroot`` of a recipe into the image store.

Building is atomic and safe under concurrency: a lock that records its owner
(:mod:`hpcexp.infra.lock`) makes two builders of the same image run Apptainer once; the image
is built to a temporary name in the images folder (named by :func:`atomic.tmp_name_for`
so ``hpcexp clean`` can tell whether its owner is gone), its sidecar is written, then it
is renamed into place. A failed, interrupted or killed build therefore never leaves an
image that looks built, and its full log stays at ``images/.logs/NAME-ARCH-HASH.log``.
Apptainer runs in its own process group under the :class:`hpcexp.infra.process.Watchdog`,
in a private scratch folder, with the host's network settings (:mod:`hpcexp.build.hostnet`).

Provenance: labels (``apptainer inspect --labels``) and a sidecar JSON. The SIF's own
sha256 is only in the sidecar: a label is inside the file it would describe, so it cannot
carry that file's hash.

The builder knows nothing of Dockerfiles or bases: it gets a recipe text ready to build
(bases already materialised) and a final path, so images and debootstrap bases are built
by the same code without importing each other.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from hpcexp import __version__
from hpcexp.build import hostnet
from hpcexp.build.store import SCRATCH_PREFIX, SIDECAR_SCHEMA, read_sidecar, valid_sif
from hpcexp.core.config import Project
from hpcexp.core.layout import Layout
from hpcexp.errors import BuildError, EnvironmentProblem, HpcexpError, Interrupted, StorageError
from hpcexp.infra import atomic, hashing, process
from hpcexp.infra import host as hostinfo
from hpcexp.infra.lock import Lock, Owner
from hpcexp.runtime import apptainer

log = logging.getLogger(__name__)

TAIL_LINES = 20

Progress = Callable[[str, str], None]
"""progress(kind, text): kind is one of start, step, wait, note, warn, done."""


class ImageBuildFailed(BuildError):
    """apptainer build exited non-zero (exit code 4). The message is one line naming the
    log; ``tail`` holds the log's last lines for the CLI to show above it."""

    def __init__(self, message: str, *, tail: list[str], log_path: Path, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.tail = tail
        self.log_path = log_path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _label_value(value: str) -> str:
    return re.sub(r"\s+", " ", str(value)).strip() or "-"


def labelled_recipe(text: str, labels: Mapping[str, str]) -> str:
    """The recipe with a trailing %labels section (Apptainer merges several %labels sections)."""
    body = text if text.endswith("\n") else text + "\n"
    lines = ["", "%labels"] + [f"    {k} {_label_value(v)}" for k, v in labels.items()]
    return body + "\n".join(lines) + "\n"


_warned_fakeroot = False


def _fakeroot_check(progress: Progress | None) -> str:
    """How --fakeroot will map ids here; warn once when there is no subuid range.

    Without a range Apptainer (>= 1.1) falls back to a root-mapped user namespace, running
    %post under the ``fakeroot`` command when the host has one and bare otherwise; both
    build most recipes, but package managers that chown to other ids may fail, so the
    user is told once per process.
    """
    global _warned_fakeroot
    mode = apptainer.fakeroot_mode()
    if mode != "subuid" and not _warned_fakeroot:
        _warned_fakeroot = True
        how = "the fakeroot command" if mode == "fakeroot-command" else "no fakeroot command (none installed)"
        msg = (f"no /etc/subuid range for user {hostinfo.user()}: --fakeroot cannot map ids, so Apptainer builds in a "
               f"root-mapped user namespace with {how}; some package installs may fail "
               "(ask your admins for a subuid range; `hpcexp doctor` shows details)")
        log.info(msg)
        if progress is not None:
            progress("warn", msg)
    return mode


FAKED_FAILURE = ("error while starting the `faked' daemon", "libs/faked: not found")


def _step_of(line: str) -> str | None:
    s = line.strip()
    if s.startswith("INFO:"):
        return s[5:].strip()
    if s.startswith("+ "):
        return s
    if s.startswith("I: "):  # debootstrap's own progress (Retrieving, Extracting, Installing...)
        return s[3:]
    return None


def _describe_net(net: hostnet.BuildNetwork) -> str:
    if not net.enabled:
        return "off (no host CA bundle, proxy variables removed)"
    ca = f"CA bundle {net.ca_bundle} ({net.ca_source})" if net.ca_bundle else "no CA bundle found"
    return f"{ca}; proxy variables: {', '.join(net.proxy_vars) or 'none'}"


def _log_end(log_path: Path, size: int = 1 << 18) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# What a build in the root-mapped fallback (no subuid range) says when it needs a file to
# be owned by another id: only one id exists there, so every such change fails.
OWNERSHIP_FAILURE = ("failed to change uid", "change uid and gid", "cannot change ownership", "chown",
                     "setgroups", "setgid", "setuid", "seteuid", "setegid", "invalid argument",
                     "operation not permitted")


def _no_subuid_failure(exc: ImageBuildFailed, label: str) -> ImageBuildFailed:
    """The build failure of the no-subuid fallback, with the cause and the fix in the one line."""
    user = hostinfo.user()
    fix = f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
    text = "\n".join(exc.tail).lower()
    if any(s in text for s in OWNERSHIP_FAILURE):
        why = (f"there is no /etc/subuid+/etc/subgid range for {user}, so Apptainer built in its fallback (a "
               "root-mapped namespace with a single id), which cannot give files other owners or switch users "
               "as this recipe needs")
    else:
        why = (f"there is no /etc/subuid+/etc/subgid range for {user}, so Apptainer built in its limited fallback "
               "(a root-mapped namespace with a single id); that may be the cause")
    own = exc.message.split(": ", 1)[-1].rsplit("; log: ", 1)[0]
    return ImageBuildFailed(f"build of {label} failed: {why}; ask an admin for a range (`{fix}`); "
                            f"log: {exc.log_path}", tail=exc.tail, log_path=exc.log_path,
                            hint=f"the build's own last line: {own}")


def _translate_failure(label: str, rc: int, tail: list[str], log_path: Path, tmpdir: str, out_dir: Path,
                       net: hostnet.BuildNetwork | None = None) -> HpcexpError:
    text = "\n".join(tail).lower()
    last = next((ln.strip() for ln in reversed(tail)
                 if ln.strip() and ("fatal" in ln.lower() or "error" in ln.lower())),
                next((ln.strip() for ln in reversed(tail) if ln.strip()), f"exit code {rc}"))
    if "failed to create container namespaces" in text or "create container process: no space left" in text \
            or "user namespace" in text and ("not allowed" in text or "permission denied" in text):
        return EnvironmentProblem(
            f"build of {label} failed: user namespaces are unavailable on this machine ({last}); log: {log_path}",
            hint="ask your admins to enable unprivileged user namespaces (sysctl user.max_user_namespaces > 0; "
                 "on Ubuntu 24.04 an AppArmor profile for apptainer); `hpcexp doctor` shows details")
    if "no space left on device" in text or "disk quota exceeded" in text:
        return StorageError(
            f"build of {label} failed: no space left on device (scratch {tmpdir}, output {out_dir}); log: {log_path}",
            hint="free space, or set APPTAINER_TMPDIR / `images:` in hpcexp.yaml to a larger file system")
    if hostnet.tls_failure(text) or hostnet.tls_failure(_log_end(log_path)):
        return ImageBuildFailed(f"build of {label} failed (exit {rc}): {last}; log: {log_path}",
                                tail=list(tail), log_path=log_path, hint=hostnet.failure_hint(net))
    return ImageBuildFailed(f"build of {label} failed (exit {rc}): {last}; log: {log_path}",
                            tail=list(tail), log_path=log_path,
                            hint=f"the last lines are above; the full log is {log_path}")


def build_sif(project: Project, recipe_text: str, final: Path, *, context: Path, label: str,
              labels: Mapping[str, str], sidecar_extra: Mapping[str, Any], progress: Progress | None = None,
              wait: bool = True, force: bool = False, arch: str | None = None,
              reuse_if: Callable[[dict[str, Any]], bool] | None = None, size_hint: int = 0) -> dict[str, Any]:
    """Build ``recipe_text`` into ``final`` atomically under the image's lock; return its sidecar.

    ``recipe_text`` is built as given: the caller materialises its bases first
    (:func:`hpcexp.build.bases.materialize`).

    If another process built ``final`` while we waited for the lock (and ``reuse_if``
    accepts its sidecar), that image is reused and the returned dict has ``_built`` False.
    """
    layout = Layout(project)
    inst = apptainer.require()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, final.parent) from exc
    lock = Lock(layout.build_lock(final), purpose=f"build {final.name}")

    def on_wait(owner: Owner) -> None:
        if progress is not None:
            where = (f"if {owner.host} is down for good, remove {lock.path}" if owner.host != hostinfo.hostname()
                     else f"lock {lock.path}")
            progress("wait", f"{label}: waiting for {owner.describe()} who is building it ({where})")

    started_at = time.time()
    with lock.hold(wait=wait, on_wait=on_wait, what=f"image {final.name}"):
        side = read_sidecar(final)
        # With --force, reuse only an image another builder finished while we waited.
        fresh = not force or (final.exists() and os.stat(final).st_mtime >= started_at)
        if side is not None and fresh and (reuse_if is None or reuse_if(side)) and valid_sif(final, side):
            side["_built"] = False
            return side
        mode = _fakeroot_check(progress)
        extra = ["--ignore-fakeroot-command"] if mode == "none" else []
        if mode != "subuid" and os.environ.get("HPCEXP_SUBUID_FILE"):
            # The override names the subuid database to trust (tests, odd sites): make
            # Apptainer take the same no-range path instead of reading /etc/subuid itself.
            extra.append("--ignore-subuid")
        try:
            try:
                return _run_build(project, inst, recipe_text, final, context=context, label=label,
                                  labels=labels, sidecar_extra=sidecar_extra, progress=progress, arch=arch,
                                  extra=extra, size_hint=size_hint)
            except BuildError as exc:
                tail = "\n".join(getattr(exc, "tail", []))
                if mode != "fakeroot-command" or not any(s in tail for s in FAKED_FAILURE):
                    raise
                # The fakeroot command is bound in from the host and cannot start in some bases
                # (a static busybox has no dynamic loader): the bare root-mapped namespace can.
                if progress is not None:
                    progress("warn", f"{label}: the fakeroot command cannot run inside this base; "
                                     "retrying in the root-mapped namespace without it")
                return _run_build(project, inst, recipe_text, final, context=context, label=label,
                                  labels=labels, sidecar_extra=sidecar_extra, progress=progress, arch=arch,
                                  extra=[*(e for e in extra if e != "--ignore-fakeroot-command"),
                                         "--ignore-fakeroot-command"])
        except ImageBuildFailed as exc:
            if mode == "subuid":
                raise
            raise _no_subuid_failure(exc, label) from exc


def _run_build(project: Project, inst: apptainer.Installation, recipe_text: str, final: Path, *,
               context: Path, label: str, labels: Mapping[str, str], sidecar_extra: Mapping[str, Any],
               progress: Progress | None, arch: str | None, extra: list[str] | None = None,
               size_hint: int = 0) -> dict[str, Any]:
    layout = Layout(project)
    log_path = layout.build_log(final)
    tmp = atomic.tmp_name_for(final)
    env = apptainer.clean_env()
    # Apptainer runs host tools for a build (debootstrap, and debootstrap runs chroot and the
    # base's dpkg): give it the folders distributions keep them in, after the user's own PATH.
    env["PATH"] = process.host_tool_path(env.get("PATH"))
    # A private folder for the build's recipe copy and the host's CA bundle (and Apptainer's
    # scratch space unless APPTAINER_TMPDIR is set); `hpcexp clean` knows its name.
    base_tmp = env.get("TMPDIR") or tempfile.gettempdir()
    try:
        own_tmpdir = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{hostinfo.short_hostname()}-{os.getpid()}-",
                                      dir=base_tmp)
    except OSError as exc:
        raise atomic.storage_error(exc, Path(base_tmp)) from exc
    if not env.get("APPTAINER_TMPDIR"):
        env["APPTAINER_TMPDIR"] = own_tmpdir
    scratch = env["APPTAINER_TMPDIR"]
    prefix = "SINGULARITYENV_" if inst.program == "singularity" else "APPTAINERENV_"
    try:
        net = hostnet.prepare(Path(own_tmpdir) / "host", project.host_network, env, prefix=prefix)
    except OSError as exc:
        shutil.rmtree(own_tmpdir, ignore_errors=True)
        raise atomic.storage_error(exc, Path(own_tmpdir)) from exc
    env = net.apply(env)
    extra = list(extra or ()) + net.bind_argv()
    all_labels = dict(labels)
    all_labels.update({"org.hpcexp.apptainer-version": f"{inst.program} {inst.version}",
                       "org.hpcexp.host": hostinfo.hostname(), "org.hpcexp.user": hostinfo.user(),
                       "org.hpcexp.built-at": _now(), "org.hpcexp.hpcexp-version": __version__})
    build_recipe = Path(own_tmpdir) / f"{final.stem}.{os.getpid()}.def"
    # --force: the temp output never exists, but without it Apptainer keeps a base image's
    # label over ours when both set the same key (org.hpcexp.built-at of a debootstrap base).
    argv = apptainer.build_argv(inst.path, build_recipe, tmp, fakeroot=True, force=True,
                                arch=arch if arch and arch != _host_arch() else None, extra=extra or ())
    if progress is not None:
        for where in dict.fromkeys((final.parent, Path(scratch))):
            low = _low_space(where, size_hint)
            if low:
                progress("warn", f"{label}: {low}")
        progress("start", f"{label}: building")
    t0 = time.monotonic()
    tail: list[str] = []
    try:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            text = labelled_recipe(recipe_text, all_labels)
            if net.folder is not None:
                text = hostnet.inject_mount_point(text)
            build_recipe.write_text(text, encoding="utf-8")
            logf = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as exc:
            raise atomic.storage_error(exc, log_path) from exc
        with logf:
            logf.write(f"# hpcexp {__version__} build of {label} at {_now()} on {hostinfo.hostname()}\n"
                       f"# cwd: {context}\n# argv: {hostnet.redact(' '.join(argv), net.secrets)}\n"
                       f"# APPTAINER_TMPDIR={scratch}\n# PATH={hostnet.redact(env['PATH'], net.secrets)}\n"
                       f"# host network: {_describe_net(net)}\n")
            logf.flush()
            rc = _stream(argv, env, context, logf, tail, progress, label, net.secrets)
        if rc != 0:
            raise _translate_failure(label, rc, tail, log_path, scratch, final.parent, net)
        if not tmp.exists():
            raise BuildError(f"build of {label} reported success but wrote no image; log: {log_path}")
        try:
            sha = hashing.sha256_file(tmp)
            st = os.stat(tmp)
            sidecar = dict(sidecar_extra)
            sidecar["host_network"] = net.describe()
            sidecar.update({
                "schema": SIDECAR_SCHEMA, "path": str(final), "sha256": sha, "size": st.st_size,
                "sif_stat": [st.st_size, st.st_mtime_ns, st.st_ino],
                "labels": all_labels, "apptainer_version": inst.version, "apptainer_program": inst.program,
                "host": hostinfo.hostname(), "user": hostinfo.user(), "built_at": all_labels["org.hpcexp.built-at"],
                "build_seconds": round(time.monotonic() - t0, 3), "hpcexp_version": __version__,
                "build_log": str(log_path),
                "note": "sha256 is the SIF's own hash; it cannot be a label inside the SIF it describes",
            })
            atomic.write_json(final.with_suffix(".json"), sidecar)
            os.replace(tmp, final)
            atomic.fsync_dir(final.parent)
        except OSError as exc:
            raise atomic.storage_error(exc, final) from exc
        sidecar["_built"] = True
        if progress is not None:
            progress("done", f"{label}: built in {time.monotonic() - t0:.1f} s")
        return sidecar
    except KeyboardInterrupt:
        raise Interrupted(f"build of {label} interrupted; no image was written; log: {log_path}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            build_recipe.unlink()
        shutil.rmtree(own_tmpdir, ignore_errors=True)


def _low_space(folder: Path, size_hint: int) -> str | None:
    """A warning when ``folder`` has less than twice the estimated image size free."""
    need = 2 * max(size_hint, 64 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= need:
        return None
    return (f"only {free >> 20} MiB free in {folder}; this build may need about {need >> 20} MiB "
            "(set APPTAINER_TMPDIR or `images:` in hpcexp.yaml to a larger file system)")


def _host_arch() -> str:
    from hpcexp.core.config import host_arch
    return host_arch()


def _stream(argv: list[str], env: dict[str, str], cwd: Path, logf: Any, tail: list[str],
            progress: Progress | None, label: str, secrets: list[str] | None = None) -> int:
    """Run apptainer in its own process group, copying its output to the log and
    reporting build steps.

    Apptainer's build is a tree of processes (fakeroot re-exec, the build engine, the
    container's %post) that outlives a killed parent: PR_SET_PDEATHSIG reaches only the
    first one. So the tree gets its own process group, and a watchdog (infra.process) kills
    that group if hpcexp dies (kill -9, OOM) before saying the build is over. A
    half-built temp file left behind is then recognisably orphaned (``hpcexp clean``).
    """
    try:
        proc = process.spawn(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise EnvironmentProblem(f"could not start {argv[0]}: {exc.strerror}") from exc
    watchdog = process.Watchdog.start(proc.pid)
    try:
        with proc:
            return _pump(proc, logf, tail, progress, label, secrets or [])
    finally:
        if watchdog is not None:
            watchdog.release()


def _signal_group(proc: "subprocess.Popen[bytes]", sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, sig)


def _pump(proc: "subprocess.Popen[bytes]", logf: Any, tail: list[str], progress: Progress | None,
          label: str, secrets: list[str] | None = None) -> int:
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            # A proxy URL's password never reaches the log, the tail or the terminal.
            line = hostnet.redact(raw.decode("utf-8", "replace").rstrip("\n"), secrets or [])
            try:
                logf.write(line + "\n")
                logf.flush()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    tail.append("no space left on device (writing the build log)")
                    _signal_group(proc, signal.SIGKILL)
                    break
                raise
            tail.append(line)
            del tail[:-TAIL_LINES]
            step = _step_of(line)
            if step and progress is not None:
                progress("step", f"{label}: {step}")
        return proc.wait()
    except BaseException:
        # Ctrl-C (or SIGTERM turned into an exception): apptainer is in its own group and
        # did not see it. Ask the whole tree to stop, then insist; the output is discarded.
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, None)):
            _signal_group(proc, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        raise

