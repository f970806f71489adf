"""Services beside a local run: Apptainer instances started before the payload, checked
until ready, watched while it runs, and stopped after it (docs/services.md).

The supervisor (:mod:`hpcexp.execute.local.supervisor`) owns one :class:`ServiceGroup` per
run. What each service is comes from the run record (``extra.services``, written with the
``created`` record by :func:`describe`); what happened to it (ports, readiness, exit) is
written back there.

- **Ports.** Each port a service declares is a free TCP port on 127.0.0.1 chosen for this
  run (:func:`reserve_ports`): a random port in :data:`PORT_RANGE` (below Linux's
  ephemeral range, so outgoing connections do not take it meanwhile) that can be bound,
  reserved by an exclusive ``mkdir`` in :func:`hpcexp.core.layout.port_reservations` so two
  runs of this user on one machine never pick the same one even before either service
  binds it (the Slurm job script reserves in the same folder the same way). A reservation
  whose owner process is gone is taken over.
- **Instances.** ``apptainer instance start`` (name unique per run:
  :func:`hpcexp.runtime.instances.instance_name`), then the service's command through
  ``apptainer exec instance://NAME`` with its output in ``services/NAME.out|err``; the
  service is "up" while that process lives.
- **Cleanup.** :meth:`ServiceGroup.stop` stops every instance (``instance stop``, SIGKILL
  after a grace). A *guard* process (its own session, blocking on a pipe from the
  supervisor, like :class:`hpcexp.infra.process.Watchdog`) stops them if the supervisor
  dies without saying it is done (kill -9), since Apptainer's instances outlive their
  starter.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths, port_reservations
from hpcexp.core.model import Experiment, Service, expand_service_text
from hpcexp.errors import HpcexpError, UsageError
from hpcexp.infra import process
from hpcexp.runtime import apptainer, instances

HOST = "127.0.0.1"
#: ports are chosen from here: below the kernel's default ephemeral range (32768-60999)
PORT_RANGE = (20000, 32767)
STOP_GRACE = 5              # seconds `instance stop` waits before SIGKILL
_STALE_AFTER = 60.0         # a reservation folder without an owner file, older than this, is stale


class ServiceFailure(Exception):
    """A service could not be started or did not become ready; the message is one line."""


# --------------------------------------------------------------------------------------
# What the record holds
# --------------------------------------------------------------------------------------

def describe(exp: Experiment, images: Mapping[str, Path], run_id: str) -> list[dict[str, Any]]:
    """The ``extra.services`` of a new run: each service's image file, instance name and
    configuration (placeholders unexpanded: ports are chosen when the run starts)."""
    out = []
    for svc in exp.services:
        if svc.name not in images:
            raise UsageError(f"experiments.{exp.name}.services.{svc.name}: no image was found or built for it")
        out.append({
            "name": svc.name, "instance": instances.instance_name(run_id, svc.name),
            "image": str(images[svc.name]), "command": list(svc.command), "env": dict(svc.env),
            "ports": list(svc.ports), "ready": {"tcp": svc.ready.tcp, "command": list(svc.ready.command)},
            "timeout": svc.timeout, "optional": svc.optional,
        })
    return out


def env_prefix(name: str) -> str:
    """``HPCEXP_SERVICE_<NAME>_`` for a service name (upper case, '-' as '_')."""
    return f"HPCEXP_SERVICE_{Service(name=name).env_name}_"


def service_env(specs: Sequence[Mapping[str, Any]], ports: Mapping[str, Mapping[str, int]],
                host: str = HOST) -> dict[str, str]:
    """What the payload (and every service) is told: ``HPCEXP_SERVICE_<NAME>_HOST``,
    ``..._PORT`` (its first port) and ``..._PORT_<PORTNAME>`` for each port, plus
    ``HPCEXP_SERVICES`` (the names, space separated)."""
    env: dict[str, str] = {"HPCEXP_SERVICES": " ".join(s["name"] for s in specs)}
    for spec in specs:
        prefix = env_prefix(spec["name"])
        env[prefix + "HOST"] = host
        mine = ports.get(spec["name"], {})
        for i, pname in enumerate(spec["ports"]):
            if i == 0:
                env[prefix + "PORT"] = str(mine[pname])
            env[f"{prefix}PORT_{pname.upper()}"] = str(mine[pname])
    return env


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

def _bindable(port: int) -> bool:
    for addr in (HOST, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / "owner").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        try:
            return time.time() - folder.stat().st_mtime < _STALE_AFTER
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reservation_root() -> Path | None:
    """This user's reservation folder (made 0700), or None when it cannot be trusted (another
    user planted it): then the bind test alone chooses ports."""
    root = port_reservations(os.getuid())
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    try:
        st = os.lstat(root)
    except OSError:
        return None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    return root


def reserve_ports(count: int, *, owner_pid: int | None = None, rng: random.Random | None = None,
                  attempts: int = 4000) -> tuple[list[int], list[Path]]:
    """``count`` free ports and the reservation folders holding them (release them with
    :func:`release_ports`). ServiceFailure when no free port is found."""
    rng = rng or random.SystemRandom()
    root = _reservation_root()
    pid = os.getpid() if owner_pid is None else owner_pid
    ports: list[int] = []
    held: list[Path] = []
    for _ in range(attempts):
        if len(ports) == count:
            break
        port = rng.randint(*PORT_RANGE)
        if port in ports or not _bindable(port):
            continue
        if root is not None:
            folder = root / str(port)
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                if _owner_alive(folder):
                    continue
                shutil.rmtree(folder, ignore_errors=True)   # its owner is gone: take it over
                try:
                    os.mkdir(folder, 0o700)
                except OSError:
                    continue
            except OSError:
                root = None   # cannot reserve here: the bind test alone chooses
            if root is not None:
                tmp = folder / f".owner.{pid}"
                tmp.write_text(f"{pid}\n")
                os.replace(tmp, folder / "owner")
                held.append(folder)
        ports.append(port)
    if len(ports) < count:
        release_ports(held)
        raise ServiceFailure(f"services: no free TCP port found in {PORT_RANGE[0]}-{PORT_RANGE[1]}")
    return ports, held


def release_ports(held: Sequence[Path]) -> None:
    for folder in held:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The guard: stops the instances if the supervisor dies
# --------------------------------------------------------------------------------------

_GUARD = (
    "import json, os, shutil, signal, subprocess, sys\n"
    "for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1):\n"
    "    signal.signal(s, signal.SIG_IGN)\n"
    "todo = json.loads(sys.argv[1])\n"
    "while True:\n"
    "    try:\n"
    "        data = os.read(0, 1)\n"
    "        break\n"
    "    except InterruptedError:\n"
    "        continue\n"
    "if not data:\n"
    "    for argv in todo['stop']:\n"
    "        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL)\n"
    "    for folder in todo['remove']:\n"
    "        try:\n"
    "            mine = open(os.path.join(folder, 'owner')).read().split()[0] == str(todo['owner'])\n"
    "        except (OSError, IndexError):\n"
    "            mine = False\n"
    "        if mine:\n"
    "            shutil.rmtree(folder, ignore_errors=True)\n"
)


class _Guard:
    def __init__(self, stop_argvs: list[list[str]], remove: list[str], env: Mapping[str, str]) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        todo = json.dumps({"stop": stop_argvs, "remove": remove, "owner": os.getpid()})
        with contextlib.suppress(OSError):
            self.proc = process.spawn([sys.executable, "-I", "-S", "-c", _GUARD, todo], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(env),
                                      close_fds=True, start_new_session=True)

    def release(self) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"d")
            self.proc.stdin.flush()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------------------
# The group of one run's services
# --------------------------------------------------------------------------------------

@dataclass
class _Live:
    spec: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started: bool = False           # the instance exists (it must be stopped)
    exit_code: int | None = None
    noticed: bool = False           # its death was reported by poll()

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class ServiceGroup:
    """The services of one run, from its record's ``extra.services``."""

    def __init__(self, run_paths: RunPaths, specs: Sequence[Mapping[str, Any]], program: str) -> None:
        self.run_paths = run_paths
        self.program = program
        self.live = [_Live(dict(s)) for s in specs]
        self.held: list[Path] = []
        self.guard: _Guard | None = None
        self.env: dict[str, str] = {}

    # -- starting ------------------------------------------------------------------------
    def start(self, should_stop: Callable[[], bool]) -> dict[str, str]:
        """Start every service in order and wait until each is ready; return the payload's
        extra environment. ServiceFailure (one line, naming the service) on any failure,
        with everything started so far stopped again."""
        try:
            return self._start(should_stop)
        except BaseException:
            self.stop()
            raise

    def _start(self, should_stop: Callable[[], bool]) -> dict[str, str]:
        wanted = sum(len(s.spec["ports"]) for s in self.live)
        numbers, self.held = reserve_ports(wanted)
        it = iter(numbers)
        for svc in self.live:
            svc.ports = {p: next(it) for p in svc.spec["ports"]}
            svc.spec["host"] = HOST
            svc.spec["port_numbers"] = dict(svc.ports)
        self.env = service_env([s.spec for s in self.live], {s.name: s.ports for s in self.live})
        base_env = apptainer.clean_env()
        self.guard = _Guard([instances.instance_stop_argv(s.spec["instance"], program=self.program, force=True)
                             for s in self.live], [str(h) for h in self.held], base_env)
        self.run_paths.services.mkdir(exist_ok=True)
        for svc in self.live:
            if should_stop():
                raise ServiceFailure("services: the run was stopped while its services started")
            self._start_one(svc)
            self._wait_ready(svc, should_stop)
        return dict(self.env)

    def _expand(self, svc: _Live, text: str) -> str:
        return expand_service_text(text, HOST, svc.ports, svc.spec["ports"])

    def _start_one(self, svc: _Live) -> None:
        spec = svc.spec
        name = svc.name
        image = Path(spec["image"])
        if not image.is_file():
            raise ServiceFailure(f"service {name!r}: image {image} is gone (rebuild it with `hpcexp build`)")
        env = dict(self.env)
        env.update({k: self._expand(svc, v) for k, v in spec["env"].items()})
        out_path = self.run_paths.service_log(name, "out")
        err_path = self.run_paths.service_log(name, "err")
        proc_env = apptainer.payload_env(self.program, env)
        try:
            res = process.run(instances.instance_start_argv(image, spec["instance"], env=env, program=self.program),
                              env=proc_env, cwd=str(self.run_paths.dir), timeout=max(30.0, float(spec["timeout"])))
        except HpcexpError as exc:  # apptainer missing, or it did not answer
            svc.started = True      # it may exist all the same: stop() tries
            raise ServiceFailure(f"service {name!r}: its instance did not start: {exc}") from exc
        with open(err_path, "a", encoding="utf-8", errors="replace") as fh:
            fh.write(res.stdout + res.stderr)
        if not res.ok:
            raise ServiceFailure(f"service {name!r}: its instance did not start ({res.last_line()}); "
                                 f"see {err_path}")
        svc.started = True
        spec["state"] = "starting"
        command = [self._expand(svc, w) for w in spec["command"]] or ["/.singularity.d/runscript"]
        spec["argv"] = command
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            svc.proc = process.spawn(instances.instance_exec_argv(spec["instance"], command, program=self.program),
                                     stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd, env=proc_env,
                                     cwd=str(self.run_paths.dir), start_new_session=True, close_fds=True)
        except OSError as exc:
            raise ServiceFailure(f"service {name!r}: cannot start {self.program}: {exc.strerror}") from exc
        finally:
            os.close(out_fd)
            os.close(err_fd)

    def _ready_now(self, svc: _Live, remaining: float) -> bool:
        ready = svc.spec["ready"]
        if ready.get("tcp"):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(min(1.0, max(0.1, remaining)))
                try:
                    s.connect((HOST, svc.ports[ready["tcp"]]))
                    return True
                except OSError:
                    return False
        if ready.get("command"):
            argv = instances.instance_exec_argv(svc.spec["instance"], [self._expand(svc, w) for w in ready["command"]],
                                                program=self.program)
            try:
                res = process.run(argv, env=apptainer.payload_env(self.program, self.env),
                                  timeout=max(1.0, remaining))
            except Exception:  # noqa: BLE001 - a hanging check is "not ready yet"
                return False
            return res.ok
        return True

    def _wait_ready(self, svc: _Live, should_stop: Callable[[], bool]) -> None:
        timeout = float(svc.spec["timeout"])
        deadline = time.monotonic() + timeout
        assert svc.proc is not None
        while True:
            rc = svc.proc.poll()
            if rc is not None:
                svc.exit_code = rc
                svc.spec.update(state="exited", exit_code=rc)
                raise ServiceFailure(f"service {svc.name!r} exited with code {rc} before it was ready; see "
                                     f"{self.run_paths.service_log(svc.name, 'err')}")
            remaining = deadline - time.monotonic()
            if self._ready_now(svc, remaining):
                svc.spec.update(state="ready", ready_after=round(timeout - max(0.0, remaining), 3))
                return
            if should_stop():
                raise ServiceFailure("services: the run was stopped while its services started")
            if time.monotonic() >= deadline:
                ready = svc.spec["ready"]
                what = (f"port {svc.ports[ready['tcp']]} did not answer" if ready.get("tcp")
                        else f"`{' '.join(ready['command'])}` did not succeed")
                svc.spec.update(state="not ready")
                raise ServiceFailure(f"service {svc.name!r} was not ready after {timeout:g} s ({what}); see "
                                     f"{self.run_paths.service_log(svc.name, 'err')}")
            time.sleep(0.2)

    # -- while the payload runs ------------------------------------------------------
    def poll(self) -> list[tuple[str, int, bool]]:
        """Services that died since the last call: (name, exit code, optional)."""
        dead = []
        for svc in self.live:
            if svc.proc is None or svc.noticed:
                continue
            rc = svc.proc.poll()
            if rc is not None:
                svc.noticed = True
                svc.exit_code = rc
                svc.spec.update(state="exited", exit_code=rc, ended_at=_now())
                dead.append((svc.name, rc, bool(svc.spec.get("optional"))))
        return dead

    # -- stopping ------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every instance that was started (all at once, SIGKILL after STOP_GRACE s),
        reap the service processes, release the ports and the guard."""
        env = apptainer.clean_env()
        stoppers = []
        for svc in self.live:
            if svc.started:
                argv = instances.instance_stop_argv(svc.spec["instance"], program=self.program, timeout=STOP_GRACE)
                with contextlib.suppress(OSError):
                    stoppers.append((svc, process.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL, env=env, close_fds=True)))
        for svc, proc in stoppers:
            try:
                proc.wait(timeout=STOP_GRACE + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            svc.started = False
        for svc in self.live:
            if svc.proc is not None:
                try:
                    rc = svc.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(svc.proc.pid, 9)
                    rc = svc.proc.wait()
                if svc.spec.get("state") in ("ready", "starting"):
                    svc.spec.update(state="stopped", ended_at=_now())
                    svc.exit_code = rc
                svc.proc = None
        release_ports(self.held)
        self.held = []
        if self.guard is not None:
            self.guard.release()
            self.guard = None

    def record(self) -> list[dict[str, Any]]:
        """The services as the record keeps them (configuration, ports, what happened)."""
        return [dict(s.spec) for s in self.live]


def _now() -> str:
    return runs.utcnow()


def group_for(run_paths: RunPaths, rec: runs.RunRecord) -> ServiceGroup | None:
    """The services of the run ``rec`` (None when it has none)."""
    specs = rec.extra.get("services")
    if not specs or not rec.command:
        return None
    return ServiceGroup(run_paths, specs, rec.command[0])
