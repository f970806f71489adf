"""What a container costs a benchmark suite: remote-call round trips, and CPU-bound work.

1. Round trip of one small call, ``objective(x=[0.1, 0.2])``, from the host:
   - hpcexp into a real Apptainer instance (``hpcexp instance start``, then the same
     client ``hpcexp.remote`` uses), JSON over the session's unix socket;
   - hpcexp's server run natively on the host (the same server file), for the cost of the
     container boundary itself;
   - Pyro5 (from PyPI, in a bench-only venv: never a dependency of hpcexp) serving the
     same class natively on the host, over a unix socket and over TCP 127.0.0.1.
   All clients run in one process of the bench venv's Python, in interleaved blocks, so
   machine noise hits each alike. Targets: hpcexp's median at most 1 ms, and at most Pyro5's.
2. The same CPU-bound payload (pure Python) natively (``/usr/bin/python3``) and in the
   container by ``hpcexp run`` (the image's python3: Debian's, as on the host), each timing
   its own loop, alternating. Target: container within 1.02x of native, judged on the best
   CPU time (``process_time``) of each side: on a shared machine a run's time only grows
   with what else runs, so the minimum is the payload's own cost; medians and wall times
   are printed beside it.

Run as an ordinary user (Apptainer fails as root here), with a venv holding Pyro5:

    python3 -m venv ~/.cache/hpcexp-bench-venv && ~/.cache/hpcexp-bench-venv/bin/pip install Pyro5
    python bench/bench_remote.py --pyro-python ~/.cache/hpcexp-bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BENCH = textwrap.dedent('''
    class Bench:
        def objective(self, x):
            return sum(v * v for v in x)

    def make(**params):
        return Bench()
''')

CPU = textwrap.dedent('''
    import json, sys, time
    def work(n):
        acc = 0
        for i in range(n):
            acc = (acc * 31 + i * i) % 1000003
        return acc
    n = int(sys.argv[1])
    c0, w0 = time.process_time(), time.perf_counter()
    r = work(n)
    print(json.dumps({"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0, "r": r}))
''')

PYRO_SERVER = textwrap.dedent('''
    import sys
    import Pyro5.api
    sys.path.insert(0, sys.argv[1])
    from bench import Bench
    Pyro5.api.expose(Bench)
    if sys.argv[2] == "unix":
        daemon = Pyro5.api.Daemon(unixsocket=sys.argv[3])
    else:
        daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(Bench(), "bench")
    print(uri, flush=True)
    daemon.requestLoop()
''')

CLIENT = textwrap.dedent('''
    import json, statistics, sys, time
    sys.path.insert(0, sys.argv[1])
    from hpcexp.runtime.remote_client import Connection
    import Pyro5.api
    targets = json.loads(sys.argv[2])
    calls, rounds = int(sys.argv[3]), int(sys.argv[4])
    clients = {}
    for label, (kind, where) in targets.items():
        if kind == "hpcexp":
            c = Connection(where, timeout=30)
            clients[label] = lambda c=c: c.call("objective", x=[0.1, 0.2])
        else:
            p = Pyro5.api.Proxy(where)
            p._pyroBind()
            clients[label] = lambda p=p: p.objective(x=[0.1, 0.2])
    for f in clients.values():          # warm up, and check the answer is right
        for _ in range(200):
            assert abs(f() - 0.05) < 1e-12
    times = {label: [] for label in clients}
    cpu = {label: 0.0 for label in clients}
    for _ in range(rounds):
        for label, f in clients.items():
            c0 = time.process_time()
            t = times[label]
            for _ in range(calls):
                s = time.perf_counter()
                f()
                t.append(time.perf_counter() - s)
            cpu[label] += time.process_time() - c0
    out = {label: {"median_us": statistics.median(t) * 1e6, "p90_us": sorted(t)[int(len(t) * 0.9)] * 1e6,
                   "client_cpu_us": cpu[label] / len(t) * 1e6, "n": len(t)} for label, t in times.items()}
    print(json.dumps(out))
''')


def cli(*args: str, cwd: Path, capture: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "hpcexp", *args], cwd=cwd, env=env, text=True,
                          capture_output=capture)
    if proc.returncode != 0:
        raise SystemExit(f"hpcexp {' '.join(args)} exited {proc.returncode}: {proc.stderr[-800:]}")
    return proc


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.02)


def round_trips(proj: Path, tmp: Path, pyro_python: str, calls: int, rounds: int) -> dict:
    exp = proj / "experiments" / "bench"
    row = json.loads(cli("instance", "start", "bench", "-q", "--json", cwd=proj).stdout)
    children: list[subprocess.Popen] = []
    try:
        native_sock = tmp / "native.sock"
        server = str(REPO / "hpcexp" / "runtime" / "remote_server.py")
        children.append(subprocess.Popen(["/usr/bin/python3", server, "--socket", str(native_sock), "--module",
                                          "bench", "--factory", "make", "--path", str(exp)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(native_sock, children[-1], "the native hpcexp server")
        pyro_sock = tmp / "pyro.sock"
        uris = {}
        for kind, arg in (("unix", str(pyro_sock)), ("tcp", "")):
            p = subprocess.Popen([pyro_python, "-c", PYRO_SERVER, str(exp), kind, arg], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            children.append(p)
            assert p.stdout is not None
            uris[kind] = p.stdout.readline().strip()
            if not uris[kind]:
                raise SystemExit(f"the Pyro5 {kind} server did not start")
        targets = {
            "hpcexp, into the container (unix socket)": ["hpcexp", row["socket"]],
            "hpcexp server on the host (unix socket)": ["hpcexp", str(native_sock)],
            "Pyro5 on the host (unix socket)": ["pyro", uris["unix"]],
            "Pyro5 on the host (TCP 127.0.0.1)": ["pyro", uris["tcp"]],
        }
        proc = subprocess.run([pyro_python, "-c", CLIENT, str(REPO), json.dumps(targets), str(calls), str(rounds)],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"the client failed: {proc.stderr[-1500:]}")
        return json.loads(proc.stdout)
    finally:
        for p in children:
            p.terminate()
            p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()
        cli("instance", "stop", row["run_id"], cwd=proj)


def cpu_bound(proj: Path, n: int, rounds: int) -> dict:
    script = proj / "experiments" / "bench" / "cpu.py"
    native, container = [], []
    for _ in range(rounds):
        out = subprocess.run(["/usr/bin/python3", str(script), str(n)], capture_output=True, text=True, check=True)
        native.append(json.loads(out.stdout))
        out = cli("run", "cpu", "-q", "--", str(n), cwd=proj)
        container.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert container[-1]["r"] == native[-1]["r"]
    sides = (("native", native), ("container", container))
    med = {k: {m: statistics.median(r[m] for r in rows) for m in ("cpu", "wall")} for k, rows in sides}
    best = {k: {m: min(r[m] for r in rows) for m in ("cpu", "wall")} for k, rows in sides}
    return {"median": med, "min": best, "rounds": rounds, "n": n,
            "cpu_ratio": best["container"]["cpu"] / best["native"]["cpu"],
            "cpu_ratio_median": med["container"]["cpu"] / med["native"]["cpu"],
            "wall_ratio": best["container"]["wall"] / best["native"]["wall"],
            "wall_ratio_median": med["container"]["wall"] / med["native"]["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pyro-python", required=True, help="a Python with Pyro5 installed (the bench venv)")
    ap.add_argument("--calls", type=int, default=2000, help="calls per block")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved blocks per client")
    ap.add_argument("--cpu-n", type=int, default=10_000_000, help="iterations of the CPU-bound loop")
    ap.add_argument("--cpu-rounds", type=int, default=9)
    args = ap.parse_args()
    if os.geteuid() == 0:
        raise SystemExit("run as an ordinary user (Apptainer fails as root here)")
    tmp = Path(tempfile.mkdtemp(prefix="hpcexp-bench-remote-"))
    try:
        proj = tmp / "proj"
        exp = proj / "experiments" / "bench"
        exp.mkdir(parents=True)
        (exp / "Dockerfile").write_text("FROM python:3.11-slim\n")
        (exp / "bench.py").write_text(BENCH)
        (exp / "cpu.py").write_text(CPU)
        (proj / "hpcexp.yaml").write_text(textwrap.dedent("""\
            experiments:
              bench:
                remote: {module: bench, factory: make}
              cpu:
                path: experiments/bench
                command: [python3, cpu.py]
        """))
        cli("build", "bench", "cpu", "-q", cwd=proj)
        load = os.getloadavg()[0]
        trips = round_trips(proj, tmp, args.pyro_python, args.calls, args.rounds)
        cpu = cpu_bound(proj, args.cpu_n, args.cpu_rounds)
        load = max(load, os.getloadavg()[0])
        print(f"load average up to {load:.1f}, {os.cpu_count()} cores")
        ours = trips["hpcexp, into the container (unix socket)"]["median_us"]
        pyro = min(v["median_us"] for k, v in trips.items() if k.startswith("Pyro5"))
        print(f"{'client':45} {'median':>9} {'p90':>9} {'client CPU':>11} {'ratio':>7}")
        for label, r in trips.items():
            print(f"{label:45} {r['median_us']:7.1f}us {r['p90_us']:7.1f}us {r['client_cpu_us']:9.1f}us "
                  f"{r['median_us'] / ours:6.2f}x")
        verdict = "PASS" if ours <= 1000 and ours <= pyro else "FAIL"
        print(f"round trip: hpcexp {ours:.1f} us, fastest Pyro5 {pyro:.1f} us ({pyro / ours:.2f}x hpcexp) -- {verdict}")
        for how in ("min", "median"):
            n_, c_ = cpu[how]["native"], cpu[how]["container"]
            print(f"CPU-bound payload ({cpu['n']} iterations, {how} of {cpu['rounds']}): native cpu {n_['cpu']:.3f} s "
                  f"wall {n_['wall']:.3f} s; container cpu {c_['cpu']:.3f} s wall {c_['wall']:.3f} s; "
                  f"ratio cpu {c_['cpu'] / n_['cpu']:.3f}x wall {c_['wall'] / n_['wall']:.3f}x")
        print(f"CPU-bound: container/native CPU time (best of each) {cpu['cpu_ratio']:.3f}x -- "
              f"{'PASS' if cpu['cpu_ratio'] <= 1.02 else 'FAIL'}")
        print(json.dumps({"round_trips": trips, "cpu_bound": cpu, "load": load}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
