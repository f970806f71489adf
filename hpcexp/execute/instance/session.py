"""Remote-call sessions: an experiment's image kept running as an Apptainer instance, with
hpcexp's server (:mod:`hpcexp.runtime.remote_server`) serving its ``remote:`` object on a
unix socket in the run folder.

Every session is a run (``runs/NAME/RUN_ID/``, executor ``local``, ``extra.kind`` =
``instance``). :func:`prepare` writes its ``created`` record with every argv before
anything starts (I1); :func:`spawn_keeper` starts the session's keeper,
``python -m hpcexp.execute.instance RUN_DIR``, in a new session; :func:`keep` is that
keeper: it starts the instance, then the server inside it, records ``running`` once the
socket answers, and stops the instance (``apptainer instance stop``, then whatever still
carries the run's marker) when the session ends:

- an *owned* session (``hpcexp.remote.connect``) ends when its client closes, or dies:
  the keeper's standard input is a pipe from the client; the byte ``x`` then end of file
  is a close, end of file alone a client that went away (kill -9 included);
- any session ends on a stop (``hpcexp instance stop``, ``hpcexp stop``: a stop request
  file and SIGUSR1, as a local run's supervisor), or when the server exits.

Should the keeper itself be killed, its :class:`hpcexp.infra.process.Watchdog` kills the
instance by the run's marker, and ``hpcexp status`` records the session ``lost``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import hpcexp
from hpcexp.core import runs
from hpcexp.core.config import Experiment, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import HpcexpError, UsageError
from hpcexp.infra import host as hostinfo
from hpcexp.infra import process
from hpcexp.runtime import apptainer, instances, launch, remote_server

KIND = "instance"
SERVER_IN_CONTAINER = "/.hpcexp/remote_server.py"
REMOTE_IN_CONTAINER = "/.hpcexp/remote"
SOCKET_IN_CONTAINER = f"{REMOTE_IN_CONTAINER}/call.sock"
READY_TIMEOUT = 300.0        # seconds from `instance start` until the server answers
STOP_TIMEOUT = 10            # seconds `apptainer instance stop` waits before SIGKILL


def is_session(rec: runs.RunRecord) -> bool:
    return rec.extra.get("kind") == KIND


def server_file() -> Path:
    """The server's source on this host (bound read-only into the instance)."""
    return Path(remote_server.__file__).resolve()


def prepare(project: Project, exp: Experiment, image: Any, *, params: Mapping[str, str] | None = None,
            owned: bool = False, arch: str | None = None, cmdline: Sequence[str] | None = None
            ) -> tuple[RunPaths, runs.RunRecord]:
    """Allocate the session's run folder (its ``remote/`` folder 0700) and write the
    ``created`` record holding the instance, server and stop argv."""
    from hpcexp.core.config import host_arch
    from hpcexp.execute.local.launcher import _image_fields, _runtime_path
    from hpcexp.runtime.versions import known_version

    spec = exp.remote
    if spec is None:
        raise UsageError(f"experiment {exp.name!r} serves nothing: hpcexp.yaml has no experiments.{exp.name}.remote",
                         hint=f"add `remote: {{module: MODULE, factory: FUNCTION}}` under experiments.{exp.name}")
    info = _image_fields(image)
    program = _runtime_path()
    layout = Layout(project)
    run_paths = runs.allocate_run(layout, exp.name)
    run_id = run_paths.dir.name
    try:
        # the socket's folder is the owner's only (the run folder keeps the project's modes,
        # so that a group sharing the project still reads the record)
        run_paths.remote_dir.mkdir(mode=0o700)
        os.chmod(run_paths.remote_dir, 0o700)
        run_paths.results.mkdir()
        plan = launch.plan(project, exp, Path(info["path"]), run_paths, run_id=run_id, params=params,
                           image_workdir=info.get("workdir"), program=program)
    except BaseException:
        import shutil

        shutil.rmtree(run_paths.dir, ignore_errors=True)
        raise
    name = instances.instance_name_for(f"hpcexp-{exp.name}", run_id)
    binds = [*plan.mounts,
             apptainer.Mount(str(server_file()), SERVER_IN_CONTAINER, readonly=True),
             apptainer.Mount(str(run_paths.remote_dir), REMOTE_IN_CONTAINER, readonly=False)]
    start = instances.instance_start_argv(info["path"], name, binds=binds, env=plan.container_env,
                                          program=program, nv=exp.gpu)
    search = [exp.mount] + ([plan.pwd] if plan.pwd != exp.mount else [])
    server = [spec.python, SERVER_IN_CONTAINER, "--socket", SOCKET_IN_CONTAINER, "--module", spec.module,
              "--factory", spec.factory, "--max-message", str(int(spec.max_message_mb * 1024 * 1024)),
              "--watch-stdin"]
    for folder in search:
        server += ["--path", folder]
    merged = dict(exp.params)
    merged.update(params or {})
    commit, dirty = runs.git_state(project.root)
    rec = runs.RunRecord(
        experiment=exp.name, run_id=run_id, state="created", executor="local", arch=arch or host_arch(),
        params=merged, command=start, image=str(info["path"]), image_sha256=info.get("sha256"),
        input_hash=info.get("input_hash"), recipe_sha256=info.get("recipe_sha256"),
        apptainer_version=known_version(program, project.cache_dir), git_commit=commit, git_dirty=dirty,
        executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(), "launcher_pid": os.getpid(),
                      "launcher_start": hostinfo.pid_start_ticks(os.getpid())},
    )
    rec.extra = {
        "kind": KIND, "instance": name, "owned": owned, "socket": str(run_paths.remote_socket),
        "server_argv": instances.instance_exec_argv(name, server, program=program, pwd=plan.pwd, cleanenv=False),
        "stop_argv": instances.instance_stop_argv(name, program=program, timeout=STOP_TIMEOUT),
        "remote": {"module": spec.module, "factory": spec.factory, "python": spec.python,
                   "timeout": spec.timeout, "max_message_mb": spec.max_message_mb},
        "container_env": dict(plan.container_env), "pwd": plan.pwd, "runtime": os.path.basename(program),
        "hpcexp_argv": list(cmdline) if cmdline is not None else list(sys.argv),
    }
    runs.write_record(run_paths, rec)
    return run_paths, rec


def spawn_keeper(run_paths: RunPaths, *, owned: bool) -> "subprocess.Popen[bytes]":
    """Start the session's keeper in a new session. Owned: its stdin is a pipe from us, and
    closing it (or dying) ends the session; otherwise it lives until stopped."""
    env = apptainer.clean_env()
    pkg_root = str(Path(hpcexp.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "hpcexp.execute.instance", str(run_paths.dir)] + (["--owned"] if owned else [])
    return process.spawn(argv, stdin=subprocess.PIPE if owned else subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(run_paths.dir), env=env,
                         start_new_session=True, close_fds=True)


def wait_ready(run_paths: RunPaths, keeper: "subprocess.Popen[bytes]", *, wait: float = READY_TIMEOUT
               ) -> runs.RunRecord:
    """The record once the session serves (``running``) or ended; the keeper is told to stop
    when it is not ready within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        rec = runs.read_record(run_paths)
        if rec.state != "created":
            return rec
        code = keeper.poll()
        if code is not None:
            rec = runs.read_record(run_paths)
            if rec.state == "created":
                rec = _mark(run_paths, rec, "failed",
                            launch_error=f"the session's keeper exited with code {code} before the server started")
            return rec
        if time.monotonic() > deadline:
            from hpcexp.infra import atomic

            with contextlib.suppress(OSError, HpcexpError):
                atomic.write_json(run_paths.stop_request, {
                    "requested_at": runs.utcnow(), "user": hostinfo.user(), "pid": os.getpid(),
                    "reason": f"the server did not listen within {wait:g} s"})
            # a keeper still starting finds the request file itself; one that recorded its
            # pid has its signal handlers in place
            if runs.read_record(run_paths).executor_ids.get("supervisor_pid") == keeper.pid:
                with contextlib.suppress(ProcessLookupError):
                    keeper.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                keeper.wait(timeout=60)
            rec = runs.read_record(run_paths)
            if not rec.terminal and keeper.poll() is not None:
                rec = _mark(run_paths, rec, "cancelled", reason=f"the server did not listen within {wait:g} s")
            return rec
        time.sleep(0.02)


_mark = runs.mark  # the owner's way to record a transition


def _tail(path: Path) -> str:
    """The last meaningful line a log ends with (a traceback's exception line, not its ^^^ marks)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().strip("^~ ")]
    return lines[-1][:500] if lines else ""


class _Ending:
    """Why the session ends (the first reason wins)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.why: tuple[str, str] | None = None

    def set(self, state: str, reason: str) -> None:
        if self.why is None:
            self.why = (state, reason)
        self.event.set()


def _watch_owner(ending: _Ending) -> None:
    closed = False
    try:
        while True:
            data = os.read(0, 64)
            if not data:
                break
            closed = closed or b"x" in data
    except OSError:
        pass
    if closed:
        ending.set("succeeded", "the client closed the session")
    else:
        ending.set("cancelled", "the client went away without closing the session (it died or was killed)")


def keep(run_paths: RunPaths, *, owned: bool) -> runs.RunRecord:
    """The keeper's whole life (see the module docstring). Returns the final record."""
    rec = runs.read_record(run_paths)
    if rec.state != "created" or not is_session(rec):
        raise UsageError(f"run {rec.run_id} is not a session waiting to start (state {rec.state})")
    ending = _Ending()

    def on_signal(signum: int, _frame: Any) -> None:
        req: Any = None
        with contextlib.suppress(OSError, ValueError):
            req = json.loads(run_paths.stop_request.read_text(encoding="utf-8"))
        req = req if isinstance(req, dict) else {}
        why = req.get("reason") if isinstance(req.get("reason"), str) else None
        who = f" by {req['user']}" if isinstance(req.get("user"), str) else ""
        if rec.state == "running":  # a session that served and was stopped ended as it should
            ending.set("succeeded", why or f"stopped on request{who}")
        else:
            ending.set("cancelled", why or f"stopped on request{who} before it served")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    me = os.getpid()
    rec.executor_ids.update({"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(), "supervisor_pid": me,
                             "supervisor_start": hostinfo.pid_start_ticks(me)})
    runs.write_record(run_paths, rec)
    if run_paths.stop_request.exists():
        on_signal(signal.SIGUSR1, None)
    if owned:
        threading.Thread(target=_watch_owner, args=(ending,), daemon=True).start()
    # Should this keeper be killed: the watchdog ends our group (the server's exec), the
    # guard stops the instance, which daemonised out of our group.
    watchdog = process.Watchdog.start(os.getpgid(0), marker=rec.run_id, grace=2.0)
    guard = _start_guard(rec)
    program = rec.command[0]
    env = apptainer.payload_env(program, rec.extra.get("container_env") or {})
    server: subprocess.Popen[bytes] | None = None
    started = False
    try:
        if ending.why is None:
            # input="": the instance's daemon never holds (or reads) the client's pipe
            started = True  # attempted: stopped on the way out even if this fails halfway
            res = process.run(rec.command, env=env, timeout=120, input="")
            if res.ok:
                _note_instance(rec, env)
            if not res.ok:
                detail = " | ".join(ln for ln in res.stderr.strip().splitlines()[-3:] if ln.strip())
                ending.set("failed", f"apptainer instance start exited with code {res.returncode}: {detail}")
                rec.launch_error = detail or f"exit code {res.returncode}"
        if ending.why is None:
            with open(run_paths.stdout, "ab") as out, open(run_paths.stderr, "ab") as err:
                server = process.spawn(rec.extra["server_argv"], env=env, stdin=subprocess.PIPE, stdout=out,
                                       stderr=err, close_fds=True)
            deadline = time.monotonic() + READY_TIMEOUT
            while ending.why is None:
                if run_paths.remote_socket.exists():
                    rec.state, rec.started_at = "running", runs.utcnow()
                    rec.executor_ids["server_pid"] = server.pid
                    rec.executor_ids["watchdog_pid"] = watchdog.pid if watchdog else None
                    runs.write_record(run_paths, rec)
                    break
                code = server.poll()
                if code is not None:
                    rec.exit_code = code
                    ending.set("failed", f"the server exited with code {code} before serving: "
                                         f"{_tail(run_paths.stderr) or 'no output'}")
                    break
                if time.monotonic() > deadline:
                    ending.set("failed", f"the server did not listen within {READY_TIMEOUT:g} s")
                    break
                ending.event.wait(0.02)
        while ending.why is None:
            if server is not None:
                code = server.poll()
                if code is not None:
                    rec.exit_code = code
                    ending.set("failed", f"the server exited with code {code}: "
                                         f"{_tail(run_paths.stderr) or 'no output'}")
                    break
            ending.event.wait(0.2)
    except HpcexpError as exc:
        ending.set("failed", str(exc))
    finally:
        _teardown(rec, server, started, env)
        if watchdog is not None:
            watchdog.release()
        if guard is not None:
            _release(guard)
    state, reason = ending.why or ("failed", "the keeper ended for no recorded reason")
    fresh = runs.read_record(run_paths)
    fresh.exit_code = rec.exit_code
    if rec.launch_error:
        fresh.launch_error = rec.launch_error
    with contextlib.suppress(OSError):
        run_paths.remote_socket.unlink()
    _collect_instance_logs(run_paths, rec)
    for key in ("instance_pid",):
        if key in rec.executor_ids:
            fresh.executor_ids[key] = rec.executor_ids[key]
    if "instance_logs" in rec.extra:
        fresh.extra["instance_logs"] = rec.extra["instance_logs"]
    return _mark(run_paths, fresh, state, reason=reason)


def _start_guard(rec: runs.RunRecord) -> "subprocess.Popen[bytes] | None":
    """The guard process (:mod:`hpcexp.infra.guard`): ``instance stop --force``
    should this keeper die. None (logged in the record) where it could not be started."""
    from hpcexp.infra import guard

    force = instances.instance_stop_argv(rec.extra["instance"], program=rec.command[0], force=True)
    root = str(Path(hpcexp.__file__).resolve().parents[1])
    try:
        return process.spawn([sys.executable, "-I", "-S", "-c", guard.PROGRAM, root, *force],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=apptainer.clean_env(), close_fds=True, start_new_session=True)
    except OSError as exc:
        rec.extra["guard_error"] = str(exc)
        return None


def _release(guard: "subprocess.Popen[bytes]") -> None:
    process.release_watcher(guard)


def _teardown(rec: runs.RunRecord, server: "subprocess.Popen[bytes] | None", started: bool,
              env: Mapping[str, str]) -> None:
    """Stop the server, the instance, then anything still carrying the run's marker."""
    if server is not None:
        with contextlib.suppress(OSError):
            if server.stdin is not None:
                server.stdin.close()
    if started:
        with contextlib.suppress(HpcexpError):
            process.run(rec.extra["stop_argv"], env=env, timeout=STOP_TIMEOUT + 20, input="")
    if server is not None:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    process.kill_group(None, marker=rec.run_id, grace=2.0)


def _note_instance(rec: runs.RunRecord, env: Mapping[str, str]) -> None:
    """The instance's host pid and Apptainer's log files of it, from ``instance list``."""
    with contextlib.suppress(HpcexpError, ValueError):
        res = process.run(instances.instance_list_argv(program=rec.command[0]), env=env, timeout=60, input="")
        for row in instances.parse_instance_list(res.stdout) if res.ok else ():
            if row.name == rec.extra["instance"]:
                rec.executor_ids["instance_pid"] = row.pid
                rec.extra["instance_logs"] = [p for p in (row.log_out, row.log_err) if p]


def _collect_instance_logs(run_paths: RunPaths, rec: runs.RunRecord) -> None:
    """Apptainer keeps an instance's own output in ~/.apptainer/instances/logs/ forever: what
    it holds goes into the run folder (``instance.log``), and the files are removed."""
    from hpcexp.infra import atomic

    parts = []
    for path in rec.extra.get("instance_logs") or ():
        if not isinstance(path, str) or not path.endswith((".out", ".err")):
            continue
        with contextlib.suppress(OSError):
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - (1 << 20)))
                data = fh.read()
            if data.strip():
                parts.append(f"== {os.path.basename(path)}\n".encode() + data)
            os.unlink(path)
    if parts:
        with contextlib.suppress(OSError, HpcexpError):
            atomic.write_bytes(run_paths.instance_log, b"\n".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    owned = "--owned" in args
    folders = [a for a in args if a != "--owned"]
    if len(folders) != 1:
        sys.stderr.write("usage: python -m hpcexp.execute.instance RUN_DIR [--owned]\n")
        return 2
    rec = keep(RunPaths(Path(folders[0])), owned=owned)
    return 0 if rec.state == "succeeded" else 1
