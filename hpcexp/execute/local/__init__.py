"""The local executor: start a run's container here, supervise it, stop it, and notice when it is lost.

One run has one *supervisor*: the process that starts ``apptainer`` (in its own session
and process group, so signals for hpcexp never hit the payload by accident), copies the
payload's stdout and stderr into the run folder (and to the terminal in the foreground)
from reader threads so the payload never blocks on a full pipe, and is the only writer
of ``run.json`` once the run has started. In the foreground the supervisor is the
``hpcexp run`` process itself (no extra interpreter start-up); with ``--detach`` it is
``python -m hpcexp.execute.local RUN_DIR`` in a new session, detached from the terminal.

Why a watchdog: Apptainer's runtime parent does not keep ``PR_SET_PDEATHSIG`` (checked
with 1.4.5), so a supervisor killed with SIGKILL would leave the container running. The
supervisor therefore starts a :class:`hpcexp.infra.process.Watchdog` (the same one
builds use: its own session, blocking on a pipe); when the pipe closes without the
"done" byte, the supervisor died and the watchdog kills the container's process group
and every process carrying the run's marker environment (``HPCEXP_RUN_ID``).
:func:`reconcile` later finds the supervisor gone (pid and its start time on the same
host and boot) and records the run ``lost`` with that evidence.

Exit decoding (``--containall`` makes Apptainer the parent in the PID namespace):
payload exit N -> Apptainer exits N; a payload killed by signal S -> 128+S; Apptainer's
own failure before the payload ran -> 255 with a ``FATAL:`` line on stderr, recorded as
``launch_error`` (state ``failed``, no exit code), never as the payload's code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import hpcexp
from hpcexp.core import runs
from hpcexp.core.config import Experiment, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import HpcexpError, NotFound, PermissionProblem, UsageError
from hpcexp.execute.base import LaunchRequest, LogFile
from hpcexp.infra import atomic, process, safeio
from hpcexp.infra import host as hostinfo
from hpcexp.runtime import apptainer

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0
CREATED_PATIENCE = 60.0            # seconds a `created` run may wait for its supervisor to start
CHUNK = 65536
MARKER = "HPCEXP_RUN_ID"
_TERMINAL_QUEUE_CHUNKS = 256        # bounded: a stuck terminal drops output, never blocks the payload


# --------------------------------------------------------------------------------------
# Processes: identity, liveness, leftovers
# --------------------------------------------------------------------------------------

def trusted_pgid(ids: Mapping[str, Any]) -> int | None:
    """The run's process group, only while its leader is provably the run's apptainer.

    Once the supervisor is gone the pid may have been reused: signalling a stale group id
    could hit an unrelated job of the same user. Processes of the run that outlived the
    leader still carry the run's marker and are found by :func:`hpcexp.infra.host.pids_with_marker`.
    """
    pgid, pid, start = ids.get("pgid"), ids.get("apptainer_pid"), ids.get("apptainer_start")
    if not pgid or pgid != pid or start is None:
        return None
    return int(pgid) if hostinfo.pid_alive(pid, start) else None


# --------------------------------------------------------------------------------------
# Creating a run
# --------------------------------------------------------------------------------------

def _image_fields(image: Any) -> dict[str, Any]:
    """The provenance of an ImageInfo-like object (or a bare path)."""
    if isinstance(image, (str, os.PathLike)):
        return {"path": Path(image)}
    return {name: getattr(image, name, None)
            for name in ("path", "sha256", "input_hash", "recipe_sha256", "workdir", "apptainer_version",
                         "cmd", "entrypoint", "stopsignal", "source_ref")}


def prepare_run(project: Project, exp: Experiment, image: Any, *, params: Mapping[str, str] | None = None,
                args: Sequence[str] | None = None, arch: str | None = None, gpu: bool | None = None,
                writable: bool | None = None, allow_binds: bool = False, grace: float = DEFAULT_GRACE,
                cmdline: Sequence[str] | None = None,
                payload_env: Callable[[RunPaths], Mapping[str, str]] | None = None,
                ) -> tuple[RunPaths, runs.RunRecord]:
    """Allocate the run folder and write its ``created`` record (before anything starts).

    ``payload_env(run_paths)`` may add environment for the container once the run id is
    known (tracking creates the payload's MLflow run there)."""
    from hpcexp.core.config import host_arch
    from hpcexp.runtime import launch

    info = _image_fields(image)
    if info.get("path") is None:
        raise UsageError("no image to run")
    program = _runtime_path()
    layout = Layout(project)
    run_paths = runs.allocate_run(layout, exp.name)
    run_id = run_paths.dir.name
    try:
        run_paths.results.mkdir()
        extra = dict(payload_env(run_paths)) if payload_env is not None else None
        the_plan = launch.plan(project, exp, Path(info["path"]), run_paths, run_id=run_id, params=params,
                               args=args, image_workdir=info.get("workdir"), image_cmd=info.get("cmd"),
                               image_entrypoint=info.get("entrypoint"), gpu=gpu, writable=writable,
                               allow_binds=allow_binds, program=program, extra_env=extra)
    except BaseException:
        # nothing was started: leave no half-made run behind
        import shutil

        shutil.rmtree(run_paths.dir, ignore_errors=True)
        raise
    merged = dict(exp.params)
    merged.update(params or {})
    commit, dirty = runs.git_state(project.root)
    rec = runs.RunRecord(
        experiment=exp.name, run_id=run_id, state="created", executor="local",
        arch=arch or host_arch(), params=merged, args=list(args or exp.args),
        command=list(the_plan.argv), image=str(info["path"]), image_sha256=info.get("sha256"),
        input_hash=info.get("input_hash"), recipe_sha256=info.get("recipe_sha256"),
        apptainer_version=known_version(program, project.cache_dir), git_commit=commit, git_dirty=dirty,
        executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(), "launcher_pid": os.getpid(),
                      "launcher_start": hostinfo.pid_start_ticks(os.getpid())},
    )
    rec.extra = {"container_env": dict(the_plan.container_env), "grace": float(grace),
                 "stop_signal": info.get("stopsignal") or "SIGTERM",  # the Dockerfile's STOPSIGNAL
                 "hpcexp_argv": list(cmdline) if cmdline is not None else list(sys.argv),
                 "pwd": the_plan.pwd, "runtime": os.path.basename(program),
                 "version_cache": str(_version_cache(project.cache_dir))}
    if info.get("source_ref"):
        rec.extra["image_ref"] = info["source_ref"]   # the registry digest the image was pulled/pushed as
    runs.write_record(run_paths, rec)
    return run_paths, rec


def _runtime_path() -> str:
    """Where apptainer (or singularity) is. Its version is asked while the payload runs
    (see :func:`supervise`), so a run does not wait for ``apptainer --version`` first."""
    from hpcexp.infra import process

    found = process.which("apptainer") or process.which("singularity")
    if found is None:
        apptainer.require()  # raises EnvironmentProblem with the fix
        raise AssertionError("unreachable")
    return found


def _version_cache(cache_dir: Path) -> Path:
    return cache_dir / "runtime-versions.json"


def _binary_key(program: str) -> tuple[str, str] | None:
    """(real path, identity) of an installed binary: a new install changes the identity."""
    try:
        real = os.path.realpath(program)
        st = os.stat(real)
    except OSError:
        return None
    return real, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_versions(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def known_version(program: str, cache_dir: Path) -> str | None:
    """The runtime's version remembered from an earlier run of this very binary, or None.

    Saves one ``apptainer --version`` (a Go start-up, ~20 ms of CPU) per run; when it is
    not known, the supervisor asks while the payload runs and remembers the answer.
    """
    key = _binary_key(program)
    if key is None:
        return None
    entry = _read_versions(_version_cache(cache_dir)).get(key[0])
    if isinstance(entry, dict) and entry.get("id") == key[1] and isinstance(entry.get("version"), str):
        return str(entry["version"])
    return None


def _remember_version(program: str, version: str, cache: Path) -> None:
    key = _binary_key(program)
    if key is None:
        return
    data = _read_versions(cache)
    data[key[0]] = {"id": key[1], "version": version}
    with contextlib.suppress(Exception):  # a cache: never a reason to fail a run
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(cache, data)


def _start_version_probe(program: str) -> "subprocess.Popen[str] | None":
    try:
        return process.spawn([program, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, close_fds=True)
    except OSError:
        return None


def _finish_version_probe(probe: "subprocess.Popen[str] | None") -> str | None:
    import re

    if probe is None:
        return None
    try:
        out, _ = probe.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return None
    m = re.search(r"\d+\.\d+(?:\.\d+)?\S*", out or "")
    return m.group(0) if m else None


def start_run(project: Project, exp: Experiment, image: Any, *, params: Mapping[str, str] | None = None,
              args: Sequence[str] | None = None, arch: str | None = None, gpu: bool | None = None,
              writable: bool | None = None, allow_binds: bool = False, detach: bool = False,
              grace: float = DEFAULT_GRACE, tee: bool = True, interactive: bool = True,
              cmdline: Sequence[str] | None = None,
              on_created: Callable[[RunPaths, runs.RunRecord], None] | None = None,
              payload_env: Callable[[RunPaths], Mapping[str, str]] | None = None,
              ) -> tuple[RunPaths, runs.RunRecord]:
    """Run ``exp`` from ``image`` (an ImageInfo-like object with ``.path``, ``.sha256``...).

    Foreground: supervise here and return the final record (never raises for a payload
    failure: the caller decides what the state means). Detached: start the supervisor in
    a new session and return once it has started the container (state ``running``) or
    already finished.
    """
    run_paths, rec = prepare_run(project, exp, image, params=params, args=args, arch=arch, gpu=gpu,
                                 writable=writable, allow_binds=allow_binds, grace=grace, cmdline=cmdline,
                                 payload_env=payload_env)
    try:
        if on_created is not None:
            on_created(run_paths, rec)
        if not detach:
            return run_paths, supervise(run_paths, tee=tee, interactive=interactive)
        return run_paths, spawn_detached(run_paths)
    except BaseException as exc:
        # interrupted (or failed) before the container started: say so in the record
        with contextlib.suppress(Exception):
            current = runs.read_record(run_paths)
            if current.state == "created":
                if isinstance(exc, KeyboardInterrupt):
                    _mark(run_paths, current, "cancelled", reason="interrupted before the container started")
                else:
                    _mark(run_paths, current, "failed",
                          launch_error=f"hpcexp failed before the container started: {type(exc).__name__}: {exc}")
        raise


def spawn_detached(run_paths: RunPaths, *, wait: float = 60.0) -> runs.RunRecord:
    """Start ``python -m hpcexp.execute.local RUN_DIR`` in a new session; wait until it left ``created``."""
    env = apptainer.clean_env()
    pkg_root = str(Path(hpcexp.__file__).resolve().parents[1])  # the folder holding the hpcexp package
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = process.spawn(
        [sys.executable, "-m", "hpcexp.execute.local", str(run_paths.dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=str(run_paths.dir), env=env, start_new_session=True, close_fds=True,
    )
    deadline = time.monotonic() + wait
    while True:
        rec = runs.read_record(run_paths)
        if rec.state != "created":
            proc.returncode = 0  # do not reap later: it outlives us on purpose
            return rec
        code = proc.poll()
        if code is not None:
            rec = runs.read_record(run_paths)
            if rec.state != "created":
                return rec
            return _mark(run_paths, rec, "failed",
                         launch_error=f"the run's supervisor exited with code {code} before starting the container")
        if time.monotonic() > deadline:
            return rec
        time.sleep(0.01)


def _mark(run_paths: RunPaths, rec: runs.RunRecord, state: str, **changes: Any) -> runs.RunRecord:
    rec.state = state
    for key, value in changes.items():
        setattr(rec, key, value)
    if state in runs.TERMINAL and rec.ended_at is None:
        rec.ended_at = runs.utcnow()
    runs.write_record(run_paths, rec)
    return rec


# --------------------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------------------

class _Stream(threading.Thread):
    """Copies one pipe to a log file (and optionally the terminal) without ever blocking the payload."""

    def __init__(self, fd: int, log_path: Path, terminal: IO[bytes] | None, watch_fatal: bool) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.log_path = log_path
        self.terminal = terminal
        self.watch_fatal = watch_fatal
        self.fatal: str | None = None
        self.write_error: str | None = None
        self.dropped = 0
        self._carry = b""
        self._queue: queue.Queue[bytes | None] | None = None
        self._tee: threading.Thread | None = None
        if terminal is not None:
            self._queue = queue.Queue(maxsize=_TERMINAL_QUEUE_CHUNKS)
            self._tee = threading.Thread(target=self._tee_loop, daemon=True)

    def _tee_loop(self) -> None:
        assert self._queue is not None and self.terminal is not None
        broken = False
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if broken:
                continue
            try:
                self.terminal.write(chunk)
                self.terminal.flush()
            except (OSError, ValueError):
                broken = True

    def _scan(self, chunk: bytes) -> None:
        data = self._carry + chunk
        lines = data.split(b"\n")
        self._carry = lines.pop()[-4096:]
        for line in lines:
            if line.startswith(b"FATAL:"):
                self.fatal = line.decode("utf-8", "replace").strip()

    def run(self) -> None:
        if self._tee is not None:
            self._tee.start()
        try:
            out = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            out = -1
            self.write_error = f"cannot write {self.log_path}: {exc.strerror}"
        try:
            while True:
                try:
                    chunk = os.read(self.fd, CHUNK)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                if out >= 0:
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(out, view):]
                    except OSError as exc:  # disk full: keep draining the pipe, say so in the record
                        self.write_error = f"cannot write {self.log_path}: {exc.strerror}"
                        os.close(out)
                        out = -1
                if self.watch_fatal:
                    self._scan(chunk)
                if self._queue is not None:
                    try:
                        self._queue.put_nowait(chunk)
                    except queue.Full:
                        self.dropped += len(chunk)
        finally:
            if self.watch_fatal and self._carry.startswith(b"FATAL:"):
                self.fatal = self._carry.decode("utf-8", "replace").strip()
            if out >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(out)
                os.close(out)
            os.close(self.fd)
            if self._queue is not None:
                assert self._tee is not None
                try:  # a terminal that stopped reading must not hold the run's end hostage
                    self._queue.put(None, timeout=5)
                    self._tee.join(timeout=5)
                except queue.Full:
                    pass


def _stop_signal(name: Any) -> signal.Signals:
    """The signal a stop sends first: the image's STOPSIGNAL (as Docker), else SIGTERM."""
    if isinstance(name, str) and name.startswith("SIG") and name not in ("SIGKILL", "SIGSTOP"):
        sig = getattr(signal, name, None)
        if isinstance(sig, signal.Signals):
            return sig
    return signal.SIGTERM


def _decode_exit(rc: int, fatal: str | None, stop: "_StopState") -> dict[str, Any]:
    """Turn Apptainer's exit status into record fields (see the module docstring)."""
    if stop.requested:
        return {"state": "cancelled", "exit_code": rc if rc >= 0 else None,
                "signal": stop.signal_sent or (-rc if rc < 0 else None)}
    if rc == 0:
        return {"state": "succeeded", "exit_code": 0}
    if rc < 0:
        return {"state": "failed", "exit_code": None, "signal": -rc,
                "reason": f"apptainer was killed by signal {-rc} ({_signame(-rc)})"}
    if rc == 255 and fatal:
        return {"state": "failed", "exit_code": None, "launch_error": fatal}
    out: dict[str, Any] = {"state": "failed", "exit_code": rc}
    if 128 < rc < 128 + 65:
        out["signal"] = rc - 128
        out["reason"] = (f"exit code {rc} = 128 + {rc - 128}: the payload was most likely killed by "
                         f"{_signame(rc - 128)}")
    return out


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _StopState:
    """What the signal handlers decided; the supervisor's main loop acts on it."""

    def __init__(self, grace: float) -> None:
        self.requested = False
        self.requested_at: str | None = None
        self.by: str | None = None
        self.grace = grace
        self.deadline: float | None = None
        self.signal_sent: int | None = None
        self.kill_now = False


def _read_stop_request(run_paths: RunPaths) -> dict[str, Any] | None:
    try:
        data = safeio.load_json_file(run_paths.stop_request, what="stop request")
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class _ExitWaiter:
    """Wait for a child with a timeout, waking the moment it exits (pidfd + select where the
    kernel has it, else Popen's polling): short runs must not pay a polling delay."""

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self.proc = proc
        self.pidfd: int | None = None
        opener = getattr(os, "pidfd_open", None)
        if opener is not None:
            with contextlib.suppress(OSError):
                self.pidfd = opener(proc.pid)

    def wait(self, timeout: float) -> int | None:
        if self.pidfd is not None:
            import select

            try:
                select.select([self.pidfd], [], [], timeout)
            except InterruptedError:
                pass
            rc = self.proc.poll()
            if rc is not None:
                os.close(self.pidfd)
                self.pidfd = None
            return rc
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def supervise(run_paths: RunPaths, *, tee: bool = False, interactive: bool = False) -> runs.RunRecord:
    """Start the run's container, copy its output, wait, and record how it ended.

    ``interactive`` (foreground): Ctrl-C stops the run (a second one kills at once) and
    the payload's output is also copied to this process's stdout/stderr when ``tee``.
    Otherwise (detached): SIGTERM, SIGINT, SIGHUP and SIGUSR1 all mean "stop requested".
    """
    rec = runs.read_record(run_paths)
    if rec.state != "created":
        raise UsageError(f"run {rec.run_id} is already {rec.state}; a run is started once")
    stop = _StopState(float(rec.extra.get("grace", DEFAULT_GRACE)))
    request = _read_stop_request(run_paths)
    if request is not None:
        return _mark(run_paths, rec, "cancelled", reason="stopped before the container started",
                     started_at=None)

    group: list[int | None] = [None]  # the container's process group, once it exists
    stop_signal = _stop_signal(rec.extra.get("stop_signal"))

    def request_stop(by: str, grace: float | None = None) -> None:
        if not stop.requested:
            stop.requested = True
            stop.requested_at = runs.utcnow()
            stop.by = by
            if grace is not None:
                stop.grace = grace
            stop.deadline = time.monotonic() + stop.grace
            stop.signal_sent = stop_signal
            if group[0] is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group[0], stop_signal)
        else:
            stop.kill_now = True

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGUSR1:
            req = _read_stop_request(run_paths) or {}
            grace = req.get("grace")
            if stop.requested and req.get("kill"):
                stop.kill_now = True
            request_stop(f"hpcexp stop ({req.get('user', '?')}@{req.get('host', '?')} pid {req.get('pid', '?')})",
                         float(grace) if isinstance(grace, (int, float)) else None)
            return
        if signum == signal.SIGINT and interactive:
            if stop.requested:
                stop.kill_now = True
            else:
                with contextlib.suppress(Exception):  # a closed terminal must not break the stop
                    sys.stderr.write("\nhpcexp: stopping the run (Ctrl-C again to kill it at once)\n")
                    sys.stderr.flush()
            request_stop("Ctrl-C")
            return
        request_stop(f"signal {_signame(signum)} to the supervisor")

    handled = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in handled:
            previous[sig] = signal.signal(sig, on_signal)

    env = apptainer.payload_env(rec.command[0], rec.extra.get("container_env") or {})
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = process.spawn(
            rec.command, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, env=env,
            cwd=str(run_paths.dir), start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return _mark(run_paths, rec, "failed", launch_error=f"cannot start {rec.command[0]}: {exc.strerror}")
    os.close(out_w)
    os.close(err_w)
    pgid = proc.pid
    group[0] = pgid
    apptainer_start = hostinfo.pid_start_ticks(proc.pid)
    if stop.requested:  # a signal arrived while the container was being started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, stop_signal)
    probe = _start_version_probe(rec.command[0]) if not rec.apptainer_version else None

    watchdog = process.Watchdog.start(pgid, marker=rec.run_id)
    watchdog_pid = watchdog.pid if watchdog is not None else None

    term_out = getattr(sys.stdout, "buffer", None) if tee else None
    term_err = getattr(sys.stderr, "buffer", None) if tee else None
    readers = [_Stream(out_r, run_paths.stdout, term_out, False),
               _Stream(err_r, run_paths.stderr, term_err, True)]
    for reader in readers:
        reader.start()

    try:
        rec.state = "running"
        rec.started_at = runs.utcnow()
        rec.executor_ids.update({
            "host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(), "supervisor_pid": os.getpid(),
            "supervisor_start": hostinfo.pid_start_ticks(os.getpid()), "apptainer_pid": proc.pid, "pgid": pgid,
            "apptainer_start": apptainer_start,
            "watchdog_pid": watchdog_pid,
        })
        try:
            runs.write_record(run_paths, rec)
        except HpcexpError as exc:
            request_stop(f"the run record could not be written ({exc})")
        # a stop requested between `created` and now (the request file was there first)
        if _read_stop_request(run_paths) is not None and not stop.requested:
            on_signal(signal.SIGUSR1, None)

        rc: int | None = None
        waiter = _ExitWaiter(proc)
        while rc is None:
            rc = waiter.wait(0.2)
            if rc is None and stop.requested:
                if stop.kill_now or (stop.deadline is not None and time.monotonic() >= stop.deadline):
                    if stop.signal_sent != signal.SIGKILL:
                        stop.signal_sent = signal.SIGKILL
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pgid, signal.SIGKILL)
        # leftovers (helpers that left the group, or a payload whose parent died first)
        leftovers = process.kill_group(pgid, marker=rec.run_id, grace=1.0 if stop.requested else 0.5,
                                       exclude=(watchdog_pid,) if watchdog_pid else ())
        for reader in readers:
            reader.join(timeout=10)
        fatal = readers[1].fatal
        outcome = _decode_exit(rc, fatal, stop)
        notes = [n for n in (readers[0].write_error, readers[1].write_error) if n]
        if leftovers:
            notes.append(f"{leftovers} leftover process(es) of the run were killed after apptainer exited")
        dropped = sum(r.dropped for r in readers)
        if dropped:
            notes.append(f"{dropped} bytes were not shown on the terminal (it did not keep up); the logs are complete")
        if stop.requested:
            outcome["reason"] = f"stopped by {stop.by}" + (
                f"; SIGKILL after {stop.grace:g} s grace" if stop.signal_sent == signal.SIGKILL else "")
            rec.extra["stop_requested_at"] = stop.requested_at
        if notes:
            outcome["reason"] = "; ".join(([outcome["reason"]] if outcome.get("reason") else []) + notes)
        rec.ended_at = runs.utcnow()
        if probe is not None:
            rec.apptainer_version = _finish_version_probe(probe)
            probe = None
            cache = rec.extra.get("version_cache")
            if rec.apptainer_version and cache:
                _remember_version(rec.command[0], rec.apptainer_version, Path(cache))
        for key, value in outcome.items():
            setattr(rec, key, value)
        runs.write_record(run_paths, rec)
        return rec
    finally:
        if probe is not None:
            _finish_version_probe(probe)
        if watchdog is not None:
            watchdog.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------
# Stop and reconcile
# --------------------------------------------------------------------------------------

def stop(layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *, grace: float = DEFAULT_GRACE,
         wait: bool = True) -> list[tuple[RunPaths, runs.RunRecord]]:
    """Stop local runs: ask each supervisor (it sends SIGTERM, then SIGKILL after ``grace``)
    and wait until the record says how it ended. A run whose supervisor is gone has its
    leftover processes killed here and is recorded ``lost``."""
    here = hostinfo.hostname()
    results: list[tuple[RunPaths, runs.RunRecord]] = []
    pending: list[tuple[RunPaths, runs.RunRecord]] = []
    # Every run is checked before anything is written or signalled: a stop that cannot be
    # delivered (another host, another user's processes) is refused at once, for all of them.
    for run_paths, rec in items:
        if rec.terminal:
            continue
        host = rec.executor_ids.get("host", rec.host)
        if host != here:
            raise UsageError(f"run {rec.run_id} runs on host {host}, not here ({here})",
                             hint=f"run `hpcexp stop {rec.run_id}` on {host}")
        _check_may_signal(run_paths, rec)
    for run_paths, rec in items:
        if rec.terminal:
            results.append((run_paths, rec))
            continue
        atomic.write_json(run_paths.stop_request, {
            "requested_at": runs.utcnow(), "grace": grace, "user": hostinfo.user(), "host": here,
            "pid": os.getpid(),
        })
        sup = rec.executor_ids.get("supervisor_pid")
        if sup and hostinfo.pid_alive(sup, rec.executor_ids.get("supervisor_start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(sup), signal.SIGUSR1)
        pending.append((run_paths, rec))
    deadline = time.monotonic() + grace + 20
    for run_paths, rec in pending:
        while True:
            rec = runs.read_record(run_paths)
            if rec.terminal or not wait:
                break
            ids = rec.executor_ids
            owner = ids.get("supervisor_pid") or ids.get("launcher_pid")
            owner_start = ids.get("supervisor_start") if ids.get("supervisor_pid") else ids.get("launcher_start")
            if not hostinfo.pid_alive(owner, owner_start):
                time.sleep(0.2)
                rec = runs.read_record(run_paths)
                if not rec.terminal:
                    killed = process.kill_group(trusted_pgid(ids), marker=rec.run_id, grace=min(grace, 5.0))
                    rec = _lost(run_paths, rec, owner, killed)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        results.append((run_paths, rec))
    order = {p.dir: i for i, (p, _) in enumerate(items)}
    return sorted(results, key=lambda t: order[t[0].dir])


def _process_owner(pid: int) -> int | None:
    """The real uid of process ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{int(pid)}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _check_may_signal(run_paths: RunPaths, rec: runs.RunRecord) -> None:
    """PermissionProblem (exit 77, naming the owner) when this user may not signal the run's
    processes: another user's run on a group-shared project. Checked with signal 0, which
    delivers nothing. When none of its processes is left, a record owned by someone else
    is refused too: what remains to do (record it lost) is for its owner."""
    from hpcexp.infra.safeio import owner_name

    me = os.getuid()
    ids = rec.executor_ids
    for key, start_key in (("supervisor_pid", "supervisor_start"), ("launcher_pid", "launcher_start"),
                           ("pgid", None)):
        pid = ids.get(key)
        if not pid or not hostinfo.pid_alive(pid, ids.get(start_key) if start_key else None):
            continue
        try:
            os.kill(int(pid), 0)
        except PermissionError:
            uid = _process_owner(int(pid))
            owner = owner_name(uid) if uid is not None else rec.user
            raise PermissionProblem(f"cannot stop run {rec.run_id}: it belongs to {owner} (pid {pid}), "
                                    f"not to {hostinfo.user()}; nothing was changed",
                                    hint=f"ask {owner} to stop it") from None
        except ProcessLookupError:
            continue
        return
    try:
        uid = os.lstat(run_paths.record).st_uid
    except OSError:
        return
    if me != 0 and uid != me:
        owner = owner_name(uid)
        raise PermissionProblem(f"cannot stop run {rec.run_id}: its record belongs to {owner}, not to "
                                f"{hostinfo.user()}, and none of its processes is left; nothing was changed",
                                hint=f"`hpcexp status` shows how it ended; ask {owner} to clean it up")


def _lost(run_paths: RunPaths, rec: runs.RunRecord, owner: Any, killed: int) -> runs.RunRecord:
    host = rec.executor_ids.get("host", rec.host)
    role = "supervisor" if rec.executor_ids.get("supervisor_pid") else "launching hpcexp"
    reason = f"{role} pid {owner} on host {host} is gone and no exit was recorded"
    if killed:
        reason += f"; {killed} leftover process(es) of the run were killed"
    rec.state = "lost"
    rec.reason = reason
    rec.ended_at = rec.ended_at or runs.utcnow()
    rec.extra["lost_detected_at"] = runs.utcnow()
    try:
        runs.write_record(run_paths, rec)
    except HpcexpError as exc:  # another user's run: report, do not fail the listing
        log.debug("could not persist lost state of %s: %s", rec.run_id, exc)
    return rec


def reconcile(layout: Layout, items: Iterable[tuple[RunPaths, runs.RunRecord]]
              ) -> list[tuple[RunPaths, runs.RunRecord]]:
    """Mark non-terminal local runs whose owner process is gone (same host and boot) ``lost``.

    Runs of other hosts are left as they are: this host cannot see their processes.
    """
    here, boot = hostinfo.hostname(), hostinfo.boot_id()
    out: list[tuple[RunPaths, runs.RunRecord]] = []
    for run_paths, rec in items:
        if rec.terminal or rec.executor != "local":
            out.append((run_paths, rec))
            continue
        ids = rec.executor_ids
        host = ids.get("host", rec.host)
        if host != here:
            out.append((run_paths, rec))
            continue
        if ids.get("boot_id") and boot and ids["boot_id"] != boot:
            fresh = runs.read_record(run_paths)
            if fresh.terminal:
                out.append((run_paths, fresh))
                continue
            fresh.state = "lost"
            fresh.reason = f"host {host} rebooted since the run started (boot id changed); no exit was recorded"
            fresh.ended_at = fresh.ended_at or runs.utcnow()
            with contextlib.suppress(HpcexpError):
                runs.write_record(run_paths, fresh)
            out.append((run_paths, fresh))
            continue
        if ids.get("supervisor_pid"):
            owner, start = ids.get("supervisor_pid"), ids.get("supervisor_start")
        else:
            owner, start = ids.get("launcher_pid"), ids.get("launcher_start")
            created = runs.parse_time(rec.created_at)
            if created is not None and time.time() - created < CREATED_PATIENCE:
                # a detached supervisor may still be starting after its launcher exited
                out.append((run_paths, rec))
                continue
        if owner is None or hostinfo.pid_alive(owner, start):
            out.append((run_paths, rec))
            continue
        fresh = runs.read_record(run_paths)  # it may have finished between our two reads
        if fresh.terminal or fresh.executor_ids.get("supervisor_pid") != ids.get("supervisor_pid"):
            out.append((run_paths, fresh) if fresh.terminal else (run_paths, rec))
            continue
        killed = process.kill_group(trusted_pgid(ids), marker=fresh.run_id, grace=1.0)
        out.append((run_paths, _lost(run_paths, fresh, owner, killed)))
    return out



class LocalExecutor:
    """The local executor as an :class:`hpcexp.execute.base.Executor`: runs on this host."""

    name = "local"
    poll_interval = 2.0
    OPTIONS = frozenset({"detach", "gpu", "writable", "grace", "tee", "interactive", "on_created"})

    def launch(self, request: LaunchRequest) -> tuple[RunPaths, runs.RunRecord]:
        unknown = sorted(set(request.options) - self.OPTIONS)
        if unknown:
            raise UsageError(f"the local executor has no option {unknown[0]!r}")
        if len(request.param_sets) != 1:
            raise UsageError("a local run takes one parameter set; submit a sweep through Slurm "
                             "(`hpcexp submit --sweep`)")
        return start_run(request.project, request.experiment, request.image, params=request.param_sets[0],
                         args=request.args, arch=request.arch, allow_binds=request.allow_binds,
                         cmdline=request.cmdline, **request.options)

    def reconcile(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]]
                  ) -> list[tuple[RunPaths, runs.RunRecord]]:
        return reconcile(layout, items)

    def stop(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *,
             grace: float | None = None) -> list[tuple[RunPaths, runs.RunRecord]]:
        return stop(layout, items, grace=DEFAULT_GRACE if grace is None else grace)

    def log_files(self, paths: RunPaths, rec: runs.RunRecord) -> list[LogFile]:
        return [LogFile("stdout", paths.attempt_stdout(rec.attempt)),
                LogFile("stderr", paths.attempt_stderr(rec.attempt))]

    def doctor_checks(self) -> list[tuple[str, str, str, str]]:
        return []  # what a local run needs (apptainer, userns, squashfuse) is the machine's, checked by doctor


EXECUTOR = LocalExecutor()


def _supervisor_log(run_paths: RunPaths, text: str) -> None:
    """Append ``text`` to the run's supervisor.log; a failure here has nowhere else to go."""
    with contextlib.suppress(OSError):
        with open(run_paths.supervisor_log, "a", encoding="utf-8", errors="replace") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text.rstrip()}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpcexp.execute.local RUN_DIR``: the detached supervisor."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m hpcexp.execute.local RUN_DIR\n")
        return 2
    run_paths = RunPaths(Path(args[0]))
    try:
        rec = supervise(run_paths, tee=False, interactive=False)
    except NotFound:
        return 2
    except Exception as exc:  # noqa: BLE001 - record the supervisor's own failure, never leave `created`
        # A detached supervisor has no terminal: what went wrong goes to the run's folder,
        # first as a traceback in supervisor.log, then (if the record can still be written)
        # as the record's launch error.
        _supervisor_log(run_paths, traceback.format_exc())
        try:
            rec = runs.read_record(run_paths)
            if not rec.terminal:
                _mark(run_paths, rec, "failed", launch_error=f"supervisor error: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the record itself is unwritable: say so where we still can
            _supervisor_log(run_paths, f"could not record the failure in {run_paths.record}:\n"
                            + traceback.format_exc())
        return 1
    return 0 if rec.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
