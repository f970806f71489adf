"""What an export needs that is not specific to one tracker (standard library only).

Export state (one file per tracker in the run folder, ``tracking.mlflow.json``)
    ``uri``/``experiment``   the target it was sent to (the URI without credentials)
    ``run_id``               the tracker's run id (also findable by the ``hpcexp.run_id``
                             tag, the idempotency key, if this file was lost)
    ``params``/``artifacts`` whether they were sent
    ``metrics_offset``       bytes of the metrics file already sent (later lines only)
    ``exported_state``       the hpcexp state last exported (terminal); the run counts as
                             exported while it equals the record's state
    ``last_error``           why the last attempt did not finish (shown by ``status RUN``)

The run's ``run.json`` is never written by an export. A per-run lock file
(``.tracking.mlflow.lock``) makes a second exporter skip a run the first is sending.

Metrics file (docs/tracking.md): ``results/metrics.jsonl``, one JSON object per line,
``{"name": "loss", "value": 0.25, "step": 3}`` with an optional ``timestamp`` (ms since
the epoch). Lines that are not such an object are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpcexp.core.config import MlflowTracking, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import TERMINAL, RunRecord
from hpcexp.errors import TrackingError
from hpcexp.infra import atomic

METRICS_FILE = "metrics.jsonl"
METRIC_NAME_RE = re.compile(r"^[/\w.\- ]{1,250}$")
MANIFEST_NAME = "hpcexp-manifest.json"
BACKOFF_SECONDS = 60.0


# --------------------------------------------------------------------------------------
# URIs and the server probe
# --------------------------------------------------------------------------------------

def redact(uri: str) -> str:
    """``uri`` with any user:password@ replaced by ``***@`` (safe to print or record)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def strip_userinfo(uri: str) -> str:
    """``uri`` without user:password@ (what a payload's environment and a record may hold)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query,
                                    parts.fragment))


def host_port(uri: str) -> tuple[str, int]:
    """(host, port) of an http(s) URI, the port defaulted by scheme."""
    parts = urllib.parse.urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def auth_headers() -> dict[str, str]:
    """Credentials from MLflow's own environment variables (never from hpcexp.yaml)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        import base64

        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _ssl_context() -> Any:
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it, as MLflow's client does
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def probe(uri: str, experiment: str | None = None, *, timeout: float = 5.0) -> str:
    """Ask the server one authenticated question; return a short description, or raise
    TrackingError with one line saying what is wrong (unreachable, credentials refused,
    not an MLflow server). Costs one HTTP request and no MLflow import."""
    shown = redact(uri)
    query = urllib.parse.urlencode({"experiment_name": experiment or "Default"})
    url = f"{strip_userinfo(uri).rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    req = urllib.request.Request(url, headers={**auth_headers(), "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_ssl_context()) as resp:  # noqa: S310 - http(s) only
            resp.read(1 << 16)
            return f"MLflow tracking server at {shown} answers"
    except urllib.error.HTTPError as exc:
        body = b""
        try:
            body = exc.read(4096)
        except Exception:  # noqa: BLE001
            pass
        if exc.code in (401, 403):
            how = "no credentials were given" if not auth_headers() else "the credentials were refused"
            raise TrackingError(f"tracking server {shown} answered HTTP {exc.code}: {how}",
                                hint="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                                     "(or MLFLOW_TRACKING_TOKEN) in the environment") from None
        if exc.code == 404 and b"RESOURCE_DOES_NOT_EXIST" in body:
            return f"MLflow tracking server at {shown} answers (experiment {experiment!r} is created on export)"
        raise TrackingError(f"tracking server {shown} answered HTTP {exc.code} to an MLflow API request: "
                            "is this the URL of an MLflow tracking server?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise TrackingError(f"tracking server {shown} does not answer: {text}",
                            hint="check tracking.mlflow.uri in hpcexp.yaml; the export waits in the run "
                                 "folder until `hpcexp export mlflow` can send it") from None


def reachable(uri: str, experiment: str | None = None, *, timeout: float = 3.0) -> bool:
    try:
        probe(uri, experiment, timeout=timeout)
    except TrackingError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Export state in the run folder
# --------------------------------------------------------------------------------------

def state_file(paths: RunPaths, tracker: str = "mlflow") -> Path:
    return paths.tracking_state(tracker)


def read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, data: dict[str, Any]) -> None:
    atomic.write_json(path, data)


def same_target(state: dict[str, Any], settings: MlflowTracking, experiment: str) -> bool:
    return state.get("uri") == redact(settings.uri) and state.get("experiment") == experiment


def is_exported(state: dict[str, Any], rec: RunRecord, settings: MlflowTracking, experiment: str) -> bool:
    return (rec.state in TERMINAL and same_target(state, settings, experiment)
            and state.get("exported_state") == rec.state and bool(state.get("run_id")))


def target_experiment(settings: MlflowTracking, hpcexp_experiment: str) -> str:
    return settings.experiment or hpcexp_experiment


def settings_for(project: Project, experiment: str) -> MlflowTracking | None:
    """The tracking settings of an experiment (None: not tracked). A run of an experiment
    no longer in the project uses the project's settings."""
    exp = project.experiments.get(experiment)
    return exp.tracking if exp is not None else project.tracking


def tracking_configured(project: Project) -> bool:
    """Whether any tracking is configured: an attribute check, no import, no I/O."""
    return project.tracking is not None or any(e.tracking is not None for e in project.experiments.values())


def waiting(project: Project, items: Iterable[tuple[RunPaths, RunRecord]]) -> list[tuple[RunPaths, RunRecord]]:
    """Finished runs whose export has not been sent (one small file read per finished run)."""
    out = []
    for paths, rec in items:
        if rec.state not in TERMINAL:
            continue
        settings = settings_for(project, rec.experiment)
        if settings is None:
            continue
        state = read_state(state_file(paths))
        if not is_exported(state, rec, settings, target_experiment(settings, rec.experiment)):
            out.append((paths, rec))
    return out


# --------------------------------------------------------------------------------------
# Background export (status)
# --------------------------------------------------------------------------------------

def kick(layout: Layout, items: Sequence[tuple[RunPaths, RunRecord]]) -> int:
    """Start ``hpcexp export mlflow --pending`` in the background when finished runs wait.

    Never blocks ``status``: no network here, one detached process at most (it holds a
    project-wide lock), and none for a minute after one found the server unreachable.
    Returns how many runs wait.
    """
    project = layout.project
    pending = waiting(project, items)
    if not pending:
        return 0
    folder = layout.tracking_dir()
    backoff = folder / "unreachable"
    try:
        if time.time() - backoff.stat().st_mtime < BACKOFF_SECONDS:
            return len(pending)
    except OSError:
        pass
    from hpcexp.infra.lock import read_owner

    owner = read_owner(folder / "export.lock")
    if owner is not None and not owner.is_dead():
        return len(pending)
    import subprocess
    import sys

    import hpcexp

    try:
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "export.log", "ab")  # noqa: SIM115 - handed to the child
    except OSError:
        return len(pending)
    env = dict(os.environ)
    pkg_root = str(Path(hpcexp.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-m", "hpcexp", "--project", str(project.root), "export", "mlflow", "--pending",
             "--background"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(project.root), env=env,
            start_new_session=True, close_fds=True)
    except OSError:
        pass
    finally:
        log.close()
    return len(pending)


# --------------------------------------------------------------------------------------
# Metrics file
# --------------------------------------------------------------------------------------

@dataclass
class MetricsRead:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)   # name, value, timestamp ms, step
    offset: int = 0                        # bytes consumed (complete lines only)
    skipped: list[tuple[int, str]] = field(default_factory=list)               # (line number, why)
    first_line: int = 1                    # line number of the first line read


def _metric(obj: Any, default_ts: int) -> tuple[str, float, int, int] | str:
    if not isinstance(obj, dict):
        return "not a JSON object"
    name, value = obj.get("name", obj.get("key")), obj.get("value")
    if not isinstance(name, str) or not METRIC_NAME_RE.match(name) or ".." in name.split("/"):
        return f"bad metric name {name!r} (letters, digits, _ - . / and space, up to 250)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"value of {name!r} is not a number"
    step = obj.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step of {name!r} is not a whole number"
    ts = obj.get("timestamp", default_ts)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        return f"timestamp of {name!r} is not milliseconds since the epoch"
    val = float(value)
    return name, val if not math.isinf(val) else math.copysign(1.7976931348623157e308, val), int(ts), step


def read_metrics(path: Path, *, offset: int = 0, first_line: int = 1, default_ts: int,
                 final: bool = True) -> MetricsRead:
    """Metrics from ``path`` after byte ``offset``. A last line without a newline counts
    only when ``final`` (the run has ended, so it will not grow)."""
    out = MetricsRead(offset=offset, first_line=first_line)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.skipped.append((first_line, f"cannot read {path.name}: {exc.strerror}"))
        return out
    pos = 0
    lineno = first_line
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            if not final:
                break
            nl = len(data)
        raw = data[pos:nl]
        pos = nl + 1
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                out.skipped.append((lineno, "not JSON"))
            else:
                m = _metric(obj, default_ts)
                if isinstance(m, str):
                    out.skipped.append((lineno, m))
                else:
                    out.metrics.append(m)
        lineno += 1
    out.offset = offset + min(pos, len(data))
    out.first_line = lineno
    return out


def skipped_note(path: Path, skipped: Sequence[tuple[int, str]]) -> str:
    first = "; ".join(f"line {n}: {why}" for n, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"{path}: {len(skipped)} line(s) skipped ({first}{more})"


# --------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------

@dataclass
class Artifacts:
    files: list[tuple[Path, str]]          # local file, artifact folder ("" for the top)
    manifest: dict[str, Any]


def select_artifacts(paths: RunPaths, rec: RunRecord, cap_bytes: int) -> Artifacts:
    """The results folder (and the run's logs under ``logs/``), within ``cap_bytes`` in
    total; what does not fit is listed in the manifest's ``skipped`` with its size."""
    import hashlib

    candidates: list[tuple[Path, str]] = []
    if paths.results.is_dir():
        for dirpath, dirnames, filenames in os.walk(paths.results, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(paths.results).as_posix()
                candidates.append((full, "results/" + rel))
    for log in (paths.attempt_stdout(rec.attempt), paths.attempt_stderr(rec.attempt)):
        candidates.append((log, "logs/" + log.name))
    files: list[tuple[Path, str]] = []
    listed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    budget = cap_bytes
    for full, rel in candidates:
        try:
            st = full.lstat()
        except OSError:
            continue
        import stat as _stat

        if not _stat.S_ISREG(st.st_mode):
            skipped.append({"path": rel, "size": None, "reason": "not a regular file (link or device)"})
            continue
        if st.st_size > budget:
            skipped.append({"path": rel, "size": st.st_size,
                            "reason": f"over the artifact cap ({cap_bytes} bytes in total)"})
            continue
        digest = hashlib.sha256()
        try:
            with open(full, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            skipped.append({"path": rel, "size": st.st_size, "reason": f"unreadable: {exc.strerror}"})
            continue
        budget -= st.st_size
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        files.append((full, folder))
        listed.append({"path": rel, "size": st.st_size, "sha256": digest.hexdigest()})
    manifest = {"run_id": rec.run_id, "experiment": rec.experiment, "cap_bytes": cap_bytes,
                "files": listed, "skipped": skipped}
    return Artifacts(files=files, manifest=manifest)
