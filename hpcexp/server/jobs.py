"""Background actions started from the dashboard (build, run, submit) and their progress.

A POST starts a job in a thread and answers at once with the job's page; the page polls
``/api/jobs/ID`` for the progress lines and, once done, links to the resulting run(s).
Jobs live in memory only (the run records are the durable truth); the newest
``KEEP`` are kept.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

KEEP = 200
LINES = 200


@dataclass
class Job:
    id: str
    kind: str                     # build | run | submit
    experiment: str
    state: str = "running"        # running | succeeded | failed
    started: float = field(default_factory=time.time)
    ended: float | None = None
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LINES))
    error: str | None = None
    hint: str | None = None
    result: Any = None
    run_ids: list[str] = field(default_factory=list)

    def progress(self, kind: str, text: str) -> None:
        self.lines.append(f"{kind}: {text}" if kind == "warn" else text)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "experiment": self.experiment, "state": self.state,
                "started": self.started, "ended": self.ended, "lines": list(self.lines), "error": self.error,
                "hint": self.hint, "result": self.result, "run_ids": list(self.run_ids)}


class Jobs:
    def __init__(self) -> None:
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def start(self, kind: str, experiment: str, work: Callable[[Job], Any]) -> Job:
        job = Job(id=secrets.token_hex(8), kind=kind, experiment=experiment)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP:
                self._jobs.popitem(last=False)

        def main() -> None:
            from hpcexp.errors import HpcexpError

            try:
                job.result = work(job)
                job.state = "succeeded"
            except HpcexpError as exc:
                job.state = "failed"
                job.error, job.hint = exc.message, exc.hint
                for line in getattr(exc, "tail", None) or ():
                    job.lines.append(f"| {line}")
            except Exception as exc:  # noqa: BLE001 - shown on the job's page, the server keeps serving
                job.state = "failed"
                job.error = f"internal error: {type(exc).__name__}: {exc}"
            finally:
                job.ended = time.time()

        threading.Thread(target=main, name=f"hpcexp-serve-{kind}", daemon=True).start()
        return job
