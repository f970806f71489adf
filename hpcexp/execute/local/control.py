"""Stopping local runs and noticing lost ones, from any hpcexp process on the run's host.

:func:`stop` asks a run's supervisor to stop (a stop request file, then SIGUSR1) and waits
for the record to say how it ended; :func:`reconcile` records ``lost`` the runs whose
supervisor (or launching hpcexp) is provably gone: pid and start time on the same host
and boot, or a boot id that changed. Processes of a lost run are killed only through a
group whose leader is still the run's apptainer (:func:`trusted_pgid`) or by the run's
marker, never by a stale group id; another user's run is refused before anything is
written or signalled.

Split from the supervisor because it runs in other processes (``hpcexp stop``,
``hpcexp status``) and only reads what the supervisor wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any, Iterable, Mapping, Sequence

from hpcexp.core import runs
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import HpcexpError, PermissionProblem, UsageError
from hpcexp.execute.local.supervisor import DEFAULT_GRACE
from hpcexp.infra import atomic, process
from hpcexp.infra import host as hostinfo

log = logging.getLogger(__name__)

CREATED_PATIENCE = 60.0            # seconds a `created` run may wait for its supervisor to start


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


def stop(layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *, grace: float = DEFAULT_GRACE,
         wait: bool = True, checkpoint: bool = False) -> list[tuple[RunPaths, runs.RunRecord]]:
    """Stop local runs: ask each supervisor (it sends SIGTERM, then SIGKILL after ``grace``)
    and wait until the record says how it ended. A run whose supervisor is gone has its
    leftover processes killed here and is recorded ``lost``.

    ``checkpoint``: the supervisor first sends the run's checkpoint signal (``checkpoint:``
    in hpcexp.yaml, else SIGUSR1) and gives the payload ``grace`` seconds to save and exit,
    then SIGTERM, then SIGKILL after another ``grace``."""
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
            "pid": os.getpid(), **({"checkpoint": checkpoint_signal(rec)} if checkpoint else {}),
        })
        sup = rec.executor_ids.get("supervisor_pid")
        if sup and hostinfo.pid_alive(sup, rec.executor_ids.get("supervisor_start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(sup), signal.SIGUSR1)
        pending.append((run_paths, rec))
    deadline = time.monotonic() + grace * (2 if checkpoint else 1) + 20
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


def checkpoint_signal(rec: runs.RunRecord) -> str:
    """The run's checkpoint signal name (``USR1``...): its ``checkpoint:``, else USR1."""
    ck = rec.extra.get("checkpoint")
    sig = str(ck.get("signal")) if isinstance(ck, dict) and ck.get("signal") else "USR1"
    return sig if sig.isalnum() else "USR1"


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
