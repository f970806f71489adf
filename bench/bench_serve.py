"""The dashboard's speed and memory (`hpcexp serve`), each against its CLI baseline.

Targets (issue 12):
  1. the runs page with 1,000 runs answers within 1.5x of `hpcexp status --json` over the
     same runs (both end to end: the CLI's wall time against one page request);
  2. a line written to a run's stdout reaches a following client within 1 s (median),
     with 1 and with 20 clients following at once (Server-Sent Events, as the page uses);
  3. streaming a large log and a large results download keeps the server's peak RSS under
     100 MiB, and the download takes at most 1.2x of `hpcexp archive` of the same run.

Everything runs on 127.0.0.1 with a real uvicorn (`python -m hpcexp serve`).
Usage: python bench/bench_serve.py [--runs 1000] [--log-mib 1024] [--results-mib 2048] [--repeat 7]
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_project(root: Path, n_runs: int) -> None:
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord, write_records

    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text("")
    (root / "experiments" / "bench" / "Dockerfile").write_text("FROM busybox:latest\n")
    items = []
    for i in range(n_runs):
        run_id = f"20260101-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}.000-{i:06x}"
        d = root / "runs" / "bench" / run_id
        (d / "results").mkdir(parents=True)
        state = ("succeeded", "failed", "cancelled")[i % 3]
        items.append((RunPaths(d), RunRecord(experiment="bench", run_id=run_id, state=state, exit_code=i % 3,
                                             params={"seed": str(i), "lr": "0.01"},
                                             created_at="2026-01-01T00:00:00.000Z",
                                             started_at="2026-01-01T00:00:00.000Z",
                                             ended_at="2026-01-01T00:00:09.000Z")))
    write_records(items, durable=False)


def add_live_run(root: Path, run_id: str) -> Path:
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord, write_record

    d = root / "runs" / "live" / run_id
    (d / "results").mkdir(parents=True)
    # an executor hpcexp does not know: nothing reconciles it, it stays "running"
    write_record(RunPaths(d), RunRecord(experiment="live", run_id=run_id, state="running", executor="bench"))
    (d / "stdout.log").write_bytes(b"")
    return d


class Server:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hpcexp", "serve"], cwd=root, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().strip() if ready else ""  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"server did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.token = line.split("token=", 1)[1]
        self.port = int(line.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Host": f"127.0.0.1:{self.port}"}

    def get(self, path: str, sink=None) -> tuple[int, int]:  # noqa: ANN001
        c = self.conn()
        c.request("GET", path, headers=self.headers())
        r = c.getresponse()
        n = 0
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
            if sink is not None:
                sink.write(chunk)
        c.close()
        return r.status, n

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return -1

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)


def cli(root: Path, *args: str, stdout=subprocess.DEVNULL) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpcexp", *args], cwd=root, env=ENV, stdout=stdout, check=True)
    return time.perf_counter() - t0


def children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_runs_page(root: Path, srv: Server, repeat: int) -> None:
    cli_t, page_t, api_t = [], [], []
    srv.get("/runs")
    for _ in range(repeat):  # interleaved, so load bursts hit both sides alike
        cli_t.append(cli(root, "status", "--json"))
        t0 = time.perf_counter()
        status, _ = srv.get("/runs")
        page_t.append(time.perf_counter() - t0)
        assert status == 200
        t0 = time.perf_counter()
        srv.get("/api/runs")
        api_t.append(time.perf_counter() - t0)
    c, p, a = statistics.median(cli_t), statistics.median(page_t), statistics.median(api_t)
    print(f"runs page: hpcexp status --json {c * 1000:.0f} ms, GET /runs {p * 1000:.0f} ms ({p / c:.2f}x), "
          f"GET /api/runs {a * 1000:.0f} ms ({a / c:.2f}x)  [median of {repeat}]")


def follow_latency(srv: Server, live: Path, clients: int, lines: int) -> list[float]:
    """Append `lines` lines, one at a time; each follower records when each arrives."""
    run_id = live.name
    arrivals: list[dict[int, float]] = [{} for _ in range(clients)]
    conns = []
    for _ in range(clients):
        c = srv.conn()
        c.request("GET", f"/runs/{run_id}/log/stdout/events?tail=0", headers=srv.headers())
        r = c.getresponse()
        assert r.status == 200
        conns.append((c, r))

    def reader(i: int, r: http.client.HTTPResponse) -> None:
        try:
            for raw in iter(r.readline, b""):
                if raw.startswith(b"data: \""):
                    now = time.perf_counter()
                    for part in json.loads(raw[6:]).splitlines():
                        if part.startswith("line "):
                            arrivals[i][int(part.split()[1])] = now
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return  # the connection was shut down at the end

    threads = [threading.Thread(target=reader, args=(i, r), daemon=True) for i, (_, r) in enumerate(conns)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    written: dict[int, float] = {}
    base = int(time.time() * 1000) % 1_000_000 * 1000
    with open(live / "stdout.log", "a") as fh:
        for k in range(lines):
            n = base + k
            written[n] = time.perf_counter()
            fh.write(f"line {n}\n")
            fh.flush()
            time.sleep(0.25)
    time.sleep(2.0)
    for c, _ in conns:
        c.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread; close() alone would wait for it
        c.close()
    lat = [arr[n] - t for arr in arrivals for n, t in written.items() if n in arr]
    missing = clients * lines - len(lat)
    if missing:
        print(f"  warning: {missing} lines never arrived")
    return lat


def bench_latency(srv: Server, root: Path, lines: int) -> None:
    for clients in (1, 20):
        live = add_live_run(root, f"20260102-0000{clients:02d}.000-11{clients:04d}")
        lat = sorted(follow_latency(srv, live, clients, lines))
        p95 = lat[int(len(lat) * 0.95) - 1] if lat else float("nan")
        print(f"live log, {clients:2d} client(s): median {statistics.median(lat) * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms over {len(lat)} lines")


def bench_big(root: Path, log_mib: int, results_mib: int) -> None:
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord, write_record

    run_id = "20260103-000000.000-b16b16"
    d = root / "runs" / "big" / run_id
    (d / "results").mkdir(parents=True)
    write_record(RunPaths(d), RunRecord(experiment="big", run_id=run_id, state="succeeded", exit_code=0))
    line = b"step 000123 loss 0.123456 acc 0.987654 lr 0.001000 " + b"x" * 60 + b"\n"
    with open(d / "stdout.log", "wb") as fh:
        block = line * ((1 << 20) // len(line) + 1)
        for _ in range(log_mib):
            fh.write(block[: 1 << 20])
    (d / "stderr.log").write_bytes(b"")
    # results: half text-like (compressible), half random (model weights)
    half = results_mib // 2
    with open(d / "results" / "metrics.csv", "wb") as fh:
        for _ in range(half):
            fh.write(block[: 1 << 20])
    with open(d / "results" / "weights.bin", "wb") as fh:
        for _ in range(results_mib - half):
            fh.write(os.urandom(1 << 20))
    files = [str(d / "stdout.log"), str(d / "results" / "metrics.csv"), str(d / "results" / "weights.bin")]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for both sides
    out = Path(tempfile.mkdtemp(prefix="hpcexp-bench-out-"))
    try:
        srv = Server(root)
        try:
            base_rss = srv.rss_peak_kib()
            t0 = time.perf_counter()
            with open(out / "log.out", "wb") as fh:
                status, n = srv.get(f"/runs/{run_id}/log/stdout", sink=fh)
            t_log = time.perf_counter() - t0
            assert status == 200 and n == log_mib << 20, (status, n)
            rss_log = srv.rss_peak_kib()
            t0 = time.perf_counter()
            c0 = srv.cpu_seconds()
            with open(out / "served.tar.gz", "wb") as fh:
                status, n = srv.get(f"/runs/{run_id}/archive.tar.gz", sink=fh)
            t_srv = time.perf_counter() - t0
            c_srv = srv.cpu_seconds() - c0
            assert status == 200
            rss_arch = srv.rss_peak_kib()
        finally:
            srv.stop()
        c0 = children_cpu()
        t_cli = cli(root, "archive", run_id, "-o", str(out / "cli.tar.gz"), stdout=subprocess.DEVNULL)
        c_cli = children_cpu() - c0
        same = (out / "cli.tar.gz").read_bytes() == (out / "served.tar.gz").read_bytes() \
            if results_mib <= 4096 else None
        ok = subprocess.run([sys.executable, "-m", "hpcexp", "archive", "--verify", str(out / "served.tar.gz")],
                            cwd=root, env=ENV, capture_output=True, text=True)
        print(f"log download {log_mib} MiB: {t_log:.1f} s ({log_mib / t_log:.0f} MiB/s)")
        print(f"results download {results_mib} MiB + log as tar.gz: served {t_srv:.1f} s (server CPU {c_srv:.1f} s), "
              f"hpcexp archive {t_cli:.1f} s (CPU {c_cli:.1f} s) -> {t_srv / t_cli:.2f}x wall, "
              f"{c_srv / c_cli:.2f}x CPU; identical bytes: {same}; "
              f"verify: {ok.stdout.strip() or ok.stderr.strip()}")
        print(f"server peak RSS: {base_rss / 1024:.0f} MiB idle, {rss_log / 1024:.0f} MiB after the log, "
              f"{rss_arch / 1024:.0f} MiB after the archive")
    finally:
        subprocess.run(["rm", "-rf", str(out)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--lines", type=int, default=20)
    ap.add_argument("--log-mib", type=int, default=1024)
    ap.add_argument("--results-mib", type=int, default=2048)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--only-big", action="store_true")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="hpcexp-bench-serve-") as tmp:
        root = Path(tmp)
        make_project(root, 10 if a.only_big else a.runs)
        if not a.only_big:
            srv = Server(root)
            try:
                bench_runs_page(root, srv, a.repeat)
                bench_latency(srv, root, a.lines)
            finally:
                srv.stop()
        if not a.skip_big:
            bench_big(root, a.log_mib, a.results_mib)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
