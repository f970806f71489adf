"""The supervisor of one local run: it starts the container, copies its output, and records how it ended.

One run has one *supervisor*: the process that starts ``apptainer`` (in its own session
and process group, so signals for hpcexp never hit the payload by accident), copies the
payload's stdout and stderr into the run folder (and to the terminal in the foreground)
from reader threads so the payload never blocks on a full pipe, and is the only writer
of ``run.json`` once the run has started. In the foreground the supervisor is the
``hpcexp run`` process itself (no extra interpreter start-up); with ``--detach`` it is
``python -m hpcexp.execute.local RUN_DIR`` in a new session, detached from the terminal
(:func:`main`).

Why a watchdog: Apptainer's runtime parent does not keep ``PR_SET_PDEATHSIG`` (checked
with 1.4.5), so a supervisor killed with SIGKILL would leave the container running. The
supervisor therefore starts a :class:`hpcexp.infra.process.Watchdog` (the same one
builds use: its own session, blocking on a pipe); when the pipe closes without the
"done" byte, the supervisor died and the watchdog kills the container's process group
and every process carrying the run's marker environment (``HPCEXP_RUN_ID``).
:func:`hpcexp.execute.local.control.reconcile` later finds the supervisor gone (pid and
its start time on the same host and boot) and records the run ``lost`` with that evidence.

A stop reaches the supervisor as a signal (Ctrl-C in the foreground; SIGTERM, SIGINT,
SIGHUP or SIGUSR1 with a stop request file when detached); it sends the image's
STOPSIGNAL to the container's group, then SIGKILL after the grace period.

Exit decoding (``--containall`` makes Apptainer the parent in the PID namespace):
payload exit N -> Apptainer exits N; a payload killed by signal S -> 128+S; Apptainer's
own failure before the payload ran -> 255 with a ``FATAL:`` line on stderr, recorded as
``launch_error`` (state ``failed``, no exit code), never as the payload's code.

This module is about 400 lines because supervision is one loop with its helpers (reader
threads, stop state, exit waiter); the run's creation and its control from other
processes are in :mod:`~hpcexp.execute.local.launcher` and :mod:`~hpcexp.execute.local.control`.
"""

from __future__ import annotations

import contextlib
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
from typing import IO, Any, Sequence

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.errors import HpcexpError, NotFound, UsageError
from hpcexp.execute import services as _services
from hpcexp.infra import host as hostinfo
from hpcexp.infra import process, safeio
from hpcexp.runtime import apptainer
from hpcexp.runtime.versions import finish_probe, remember_version, start_probe

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0
CHUNK = 65536
MARKER = "HPCEXP_RUN_ID"
_TERMINAL_QUEUE_CHUNKS = 256        # bounded: a stuck terminal drops output, never blocks the payload


mark = runs.mark  # the owner's way to record a transition


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


def _checkpoint_signal(name: Any) -> signal.Signals | None:
    """The checkpoint signal a ``stop --checkpoint`` request names (``USR1``), or None."""
    if not isinstance(name, str) or not name.isalnum():
        return None
    try:
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")]
    except KeyError:
        return None


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


def _send_stop_signal(pgid: int, sig: int, checkpoint: bool) -> None:
    """Send the stop or checkpoint signal to the container.

    The checkpoint signal goes to the ``apptainer`` process alone (the group's leader, whose
    pid is the group id), which passes it on to the payload, as the Slurm job script does and
    as ``docker kill -s`` does: sent to the whole group, it would also reach every helper of
    the payload (a ``sleep``, a data-loader worker) whose default action for USR1/USR2 is to
    die, and reach the payload twice (once directly, once forwarded), which let a shell's trap
    be cut short and the run end with 128 + the signal. The stop signal still goes to the whole
    group, so that a payload that ignores it does not keep its children alive until SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if checkpoint:
            os.kill(pgid, sig)
        else:
            os.killpg(pgid, sig)


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
        self.checkpoint: signal.Signals | None = None   # stop --checkpoint: sent first, then the stop signal


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
        return mark(run_paths, rec, "cancelled", reason="stopped before the container started",
                     started_at=None)

    group: list[int | None] = [None]  # the container's process group, once it exists
    stop_signal = _stop_signal(rec.extra.get("stop_signal"))

    def request_stop(by: str, grace: float | None = None, checkpoint: signal.Signals | None = None) -> None:
        if not stop.requested:
            stop.requested = True
            stop.requested_at = runs.utcnow()
            stop.by = by
            if grace is not None:
                stop.grace = grace
            stop.deadline = time.monotonic() + stop.grace
            stop.checkpoint = checkpoint
            stop.signal_sent = checkpoint or stop_signal
            if group[0] is not None:
                _send_stop_signal(group[0], stop.signal_sent, checkpoint is not None)
        else:
            stop.kill_now = True

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGUSR1:
            req = _read_stop_request(run_paths) or {}
            grace = req.get("grace")
            if stop.requested and req.get("kill"):
                stop.kill_now = True
            ckpt = _checkpoint_signal(req.get("checkpoint"))
            request_stop(f"hpcexp stop{' --checkpoint' if ckpt else ''} ({req.get('user', '?')}@"
                         f"{req.get('host', '?')} pid {req.get('pid', '?')})",
                         float(grace) if isinstance(grace, (int, float)) else None, ckpt)
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

    services = _services.group_for(run_paths, rec)  # started before the payload, stopped after it
    died: list[str] = []                              # a service that is not optional died
    if services is not None:
        failed = _start_services(run_paths, rec, services, stop)
        if failed is not None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            return failed
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
        if services is not None:
            services.stop()
            rec.extra["services"] = services.record()
        return mark(run_paths, rec, "failed", launch_error=f"cannot start {rec.command[0]}: {exc.strerror}")
    os.close(out_w)
    os.close(err_w)
    pgid = proc.pid
    group[0] = pgid
    apptainer_start = hostinfo.pid_start_ticks(proc.pid)
    if stop.requested:  # a signal arrived while the container was being started
        _send_stop_signal(pgid, stop.signal_sent or stop_signal,
                          stop.checkpoint is not None and stop.signal_sent == stop.checkpoint)
    probe = start_probe(rec.command[0]) if not rec.apptainer_version else None

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
            if rc is None and services is not None:
                _watch_services(rec, services, died, request_stop)
            if rc is None and stop.requested:
                if stop.kill_now or (stop.deadline is not None and time.monotonic() >= stop.deadline):
                    if stop.checkpoint is not None and stop.signal_sent == stop.checkpoint and not stop.kill_now:
                        # it had its grace to save and exit: now the ordinary stop
                        stop.signal_sent = stop_signal
                        stop.deadline = time.monotonic() + stop.grace
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pgid, stop_signal)
                    elif stop.signal_sent != signal.SIGKILL:
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
        if services is not None:
            services.stop()
            rec.extra["services"] = services.record()
        if died:  # the payload was stopped because a service it needs died
            outcome = {"state": "failed", "exit_code": rc if rc >= 0 else None, "reason": "; ".join(died)}
            rec.extra["service_failure"] = died[0]
        notes = [n for n in (readers[0].write_error, readers[1].write_error) if n]
        if leftovers:
            notes.append(f"{leftovers} leftover process(es) of the run were killed after apptainer exited")
        dropped = sum(r.dropped for r in readers)
        if dropped:
            notes.append(f"{dropped} bytes were not shown on the terminal (it did not keep up); the logs are complete")
        if stop.requested and not died:
            outcome["reason"] = f"stopped by {stop.by}" + (
                f"; SIGKILL after {stop.grace:g} s grace" if stop.signal_sent == signal.SIGKILL else "") + (
                f"; the payload exited after the checkpoint signal {_signame(stop.checkpoint)}"
                if stop.checkpoint is not None and stop.signal_sent == stop.checkpoint else "")
            rec.extra["stop_requested_at"] = stop.requested_at
        if notes:
            outcome["reason"] = "; ".join(([outcome["reason"]] if outcome.get("reason") else []) + notes)
        rec.ended_at = runs.utcnow()
        if probe is not None:
            rec.apptainer_version = finish_probe(probe)
            probe = None
            cache = rec.extra.get("version_cache")
            if rec.apptainer_version and cache:
                remember_version(rec.command[0], rec.apptainer_version, Path(cache))
        for key, value in outcome.items():
            setattr(rec, key, value)
        runs.write_record(run_paths, rec)
        return rec
    finally:
        if services is not None:
            services.stop()   # also when recording failed: never leave a service behind
        if probe is not None:
            finish_probe(probe)
        if watchdog is not None:
            watchdog.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_services(run_paths: RunPaths, rec: runs.RunRecord, services: _services.ServiceGroup,
                    stop: _StopState) -> runs.RunRecord | None:
    """Start the run's services (state stays ``created``); None when all are ready and the
    payload may start (its environment now says where they are), else the final record."""
    # who owns the run while its services start (`hpcexp stop` signals it, `status` sees it alive)
    rec.executor_ids.update({"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(),
                             "supervisor_pid": os.getpid(), "supervisor_start": hostinfo.pid_start_ticks(os.getpid())})
    runs.write_record(run_paths, rec)
    try:
        extra = services.start(lambda: stop.requested or _read_stop_request(run_paths) is not None)
    except _services.ServiceFailure as exc:
        rec.extra["services"] = services.record()
        if stop.requested or _read_stop_request(run_paths) is not None:
            return mark(run_paths, rec, "cancelled", reason=f"stopped by {stop.by or 'hpcexp stop'} while its "
                        "services started",
                        started_at=None)
        return mark(run_paths, rec, "failed", launch_error=str(exc), reason=str(exc))
    except BaseException:
        rec.extra["services"] = services.record()
        raise
    rec.extra["services"] = services.record()
    rec.extra["container_env"] = {**(rec.extra.get("container_env") or {}), **extra}
    runs.write_record(run_paths, rec)  # the payload's environment is recorded before it starts (I1)
    return None


def _watch_services(rec: runs.RunRecord, services: _services.ServiceGroup, died: list[str],
                    request_stop: Any) -> None:
    """A service that died: optional ones are noted, any other stops the payload (run failed)."""
    for name, code, optional in services.poll():
        text = f"service {name!r} exited with code {code} during the run"
        if optional:
            notes = rec.extra.setdefault("service_notes", [])
            notes.append(text + " (optional: the run went on)")
        else:
            died.append(text)
            request_stop(text)


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
                mark(run_paths, rec, "failed", launch_error=f"supervisor error: {type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the record itself is unwritable: say so where we still can
            _supervisor_log(run_paths, f"could not record the failure in {run_paths.record}:\n"
                            + traceback.format_exc())
        return 1
    return 0 if rec.state == "succeeded" else 1
