"""`hpcexp serve` through a real uvicorn on 127.0.0.1 (and a unix socket): access control, escaping,
download safety, streamed archives, live logs across attempts, actions and their CSRF check.

The runs here are records written by hand (no container runs); tests/test_serve_browser.py
drives the whole path with real Apptainer runs and a real Chromium.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli
from servehelp import Server, sse_events, write_run

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

XSS = "<script>alert(1)</script>"
RUN_A = "20260101-000000.000-aaaaaa"
RUN_B = "20260101-000001.000-bbbbbb"
RUN_LIVE = "20260101-000002.000-cccccc"
SECRET = "TOP-SECRET-CONTENT-of-the-outside"
XSS_NAME = "<img src=x onerror=alert(1)>.txt"  # a file name cannot hold the "/" of </script>


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serveproj")
    (root / "hpcexp.yaml").write_text("experiments:\n  hello:\n    ref: https://example.org/paper\n"
                                      "    code: 'javascript:alert(1)'\n")
    for name in ("hello", "other"):
        d = root / "experiments" / name
        d.mkdir(parents=True)
        (d / "Dockerfile").write_text("FROM busybox:latest\n")
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text(SECRET)
    a = write_run(root, "hello", RUN_A, state="succeeded", exit_code=0, params={"x": XSS},
                  started_at="2026-01-01T00:00:00.000Z", ended_at="2026-01-01T00:00:05.000Z")
    (a / "stdout.log").write_text("hello\nworld\n")
    (a / "stderr.log").write_text("")
    res = a / "results"
    (res / "r.txt").write_text("result\n")
    (res / "sub").mkdir()
    (res / "sub" / "deep.csv").write_text("a,b\n1,2\n")
    (res / XSS_NAME).write_text("escaped name\n")
    (res / "inside-link").symlink_to("r.txt")
    (res / "outside-link").symlink_to(outside)
    (res / "up-link").symlink_to("../run.json")
    (res / "dir-out").symlink_to(outside.parent)
    os.mkfifo(res / "fifo")
    (res / "page.html").write_text("<script>alert(1)</script>")
    b = write_run(root, "other", RUN_B, state="failed", exit_code=3)
    (b / "stdout.log").write_text("other\n")
    live = write_run(root, "hello", RUN_LIVE, state="running", executor="test-noop", started_at="2026-01-01T00:00:02Z")
    (live / "stdout.log").write_text("")
    return root


@pytest.fixture(scope="module")
def server(project: Path):
    srv = Server(project)
    yield srv
    assert srv.stop() == 0


# --------------------------------------------------------------------------------------
# Access control
# --------------------------------------------------------------------------------------

GET_ROUTES = ["/", "/experiments", "/runs", f"/runs/{RUN_A}", f"/runs/{RUN_A}/results", f"/runs/{RUN_A}/results/r.txt",
              f"/runs/{RUN_A}/log/stdout", f"/runs/{RUN_A}/log/stdout/events", f"/runs/{RUN_A}/archive.zip",
              f"/runs/{RUN_A}/archive.tar.gz", "/images", "/jobs/0123", "/api", "/api/openapi.json",
              "/api/experiments", "/api/runs", f"/api/runs/{RUN_A}", "/api/images", "/api/jobs/0123",
              "/static/app.js", "/no/such/route"]
POST_ROUTES = ["/actions/build", "/actions/run", "/actions/submit", "/actions/stop", "/api/build", "/api/run",
               "/api/submit", "/api/stop"]


def _reveals_nothing(body: bytes) -> None:
    for word in (b"hello", b"other", RUN_A.encode(), b"serveproj", b"result", b"<html"):
        assert word not in body, (word, body)


@pytest.mark.parametrize("method,path", [("GET", p) for p in GET_ROUTES] + [("POST", p) for p in POST_ROUTES])
def test_every_route_needs_the_token(server: Server, project: Path, method: str, path: str) -> None:
    other = Server(project) if path == "/" else None  # another user's server, for its token
    try:
        status, _, body = server.request(method, path, token=None)
        assert status == 401, (path, status)
        _reveals_nothing(body)
        for bad in ["wrong", server.token[:-1], server.token + "x"] + ([other.token] if other else []):
            status, _, body = server.request(method, path, token=bad)
            assert status == 403, (path, bad, status)
            _reveals_nothing(body)
        sep = "&" if "?" in path else "?"
        status, _, body = server.request(method, f"{path}{sep}token=nope", token=None)
        assert status == 403, (path, status)
        _reveals_nothing(body)
        from hpcexp.server.security import cookie_name

        status, _, _ = server.request(method, path, token=None,
                                      headers={"Cookie": f"{cookie_name(server.token)}=forged"})
        assert status == 403
        if other is not None:  # the other server's own valid cookie opens nothing here
            status, _, _ = server.request(method, path, token=None,
                                          headers={"Cookie": f"{cookie_name(other.token)}={other.token}"})
            assert status == 401
    finally:
        if other is not None:
            other.stop()


def test_token_in_url_sets_a_strict_httponly_cookie_and_is_dropped_from_the_url(server: Server) -> None:
    status, headers, _ = server.request("GET", f"/runs?state=failed&token={server.token}", token=None)
    assert status == 303
    assert headers["location"] == "/runs?state=failed"
    cookie = headers["set-cookie"]
    assert cookie.startswith("hpcexp_") and f"={server.token};" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    jar = cookie.split(";", 1)[0]
    status, headers, body = server.request("GET", "/runs?state=failed", token=None, headers={"Cookie": jar})
    assert status == 200 and RUN_B.encode() in body and RUN_A.encode() not in body
    assert headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert server.token.encode() not in body  # the token never appears in a page


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil",
                                  ""])
def test_foreign_host_header_is_refused_on_loopback(server: Server, host: str) -> None:
    status, _, body = server.request("GET", "/api/runs", headers={"Host": host})
    assert status == 403
    _reveals_nothing(body)


@pytest.mark.parametrize("host", ["localhost:8888", "127.0.0.1:1", "[::1]:8080", "LOCALHOST"])
def test_loopback_names_on_any_port_are_accepted(server: Server, host: str) -> None:
    status, _, _ = server.request("GET", "/api/runs", headers={"Host": host})
    assert status == 200


def test_post_without_csrf_token_is_refused(server: Server, project: Path) -> None:
    status, headers, _ = server.request("GET", f"/?token={server.token}", token=None)
    jar = headers["set-cookie"].split(";", 1)[0]
    form = f"refs={RUN_A}"
    hdrs = {"Cookie": jar, "Content-Type": "application/x-www-form-urlencoded"}
    for extra in ("", "&csrf_token=", "&csrf_token=0000"):
        status, _, body = server.request("POST", "/actions/stop", token=None, headers=hdrs, body=form + extra)
        assert status == 403 and b"CSRF" in body
    # the page carries the right one; with it the (harmless: already ended) stop goes through
    _, _, page = server.request("GET", f"/runs/{RUN_A}", token=None, headers={"Cookie": jar})
    html = page.decode()
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html) or re.search(r'data-csrf="([0-9a-f]+)"', html)
    assert csrf
    status, headers, _ = server.request("POST", "/actions/stop", token=None, headers=hdrs,
                                        body=f"{form}&csrf_token={csrf.group(1)}")
    assert status == 303, status
    # cross-origin POST with the right token is still refused
    status, _, _ = server.request("POST", "/actions/stop", token=None,
                                  headers={**hdrs, "Origin": "http://evil.example"},
                                  body=f"{form}&csrf_token={csrf.group(1)}")
    assert status == 403


def test_read_only_refuses_every_action(project: Path) -> None:
    with Server(project, "--read-only") as srv:
        for path in POST_ROUTES:
            status, _, body = srv.request("POST", path, json_body={"experiment": "hello", "refs": [RUN_A]})
            assert status == 403 and b"read-only" in body, path
        _, _, page = srv.request("GET", "/experiments")
        assert b"/actions/build" not in page and b"read-only" in page


# --------------------------------------------------------------------------------------
# Pages and escaping
# --------------------------------------------------------------------------------------

def test_pages_show_experiments_runs_and_escape_user_text(server: Server) -> None:
    _, _, body = server.request("GET", "/experiments")
    html = body.decode()
    assert 'data-experiment="hello"' in html and 'data-experiment="other"' in html
    assert 'href="https://example.org/paper"' in html
    assert 'href="javascript:' not in html  # a non-web link is shown as text, never a link
    for path in ("/runs", f"/runs/{RUN_A}", "/runs?experiment=hello"):
        status, _, body = server.request("GET", path)
        assert status == 200
        assert XSS.encode() not in body, path
        assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body, path
    _, _, body = server.request("GET", f"/runs/{RUN_A}/results")
    assert XSS_NAME.encode() not in body and b"&lt;img src=x onerror=alert(1)&gt;.txt" in body
    assert b"outside the results" in body  # the link out is listed, not linked


def test_runs_filters(server: Server) -> None:
    assert {r["run_id"] for r in server.json("/api/runs?experiment=other")} == {RUN_B}
    assert {r["run_id"] for r in server.json("/api/runs?state=succeeded")} == {RUN_A}
    assert server.json("/api/runs?sweep=nope") == []
    status, _, body = server.request("GET", "/api/runs?experiment=nosuch")
    assert status == 404 and json.loads(body)["error"]


def test_api_matches_the_cli_json(server: Server, project: Path) -> None:
    cli_status = json.loads(run_cli("status", "--json", cwd=project).stdout)
    api = server.json("/api/runs")
    assert [r["run_id"] for r in api] == [r["run_id"] for r in cli_status]
    assert api[0].keys() == cli_status[0].keys()
    assert server.json("/api/experiments") == json.loads(run_cli("list", "--json", cwd=project).stdout)
    assert server.json(f"/api/runs/{RUN_A}") == json.loads(run_cli("status", RUN_A, "--json", cwd=project).stdout)
    doc = server.json("/api/openapi.json")
    assert doc["openapi"].startswith("3.") and "/api/runs/{ref}" in doc["paths"]


# --------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,expected", [
    ("r.txt", 200), ("sub/deep.csv", 200), ("inside-link", 200),
    ("../run.json", 400), ("sub/../r.txt", 400), ("./r.txt", 400), ("sub//deep.csv", 400),
    ("/etc/passwd", 400), ("%2Fetc%2Fpasswd", 400), ("sub%2Fdeep.csv", 400), ("sub%2fdeep.csv", 400),
    ("..%2Frun.json", 400), ("%2e%2e/run.json", 400), ("sub%5C..%5Cr.txt", 400), ("r.txt%00", 400),
    ("outside-link", 403), ("up-link", 403), ("dir-out/secret.txt", 403), ("fifo", 403), ("sub", 200),
    ("nosuch", 404),
])
def test_download_paths(server: Server, path: str, expected: int) -> None:
    status, headers, body = server.request("GET", f"/runs/{RUN_A}/results/{path}")
    assert status == expected, (path, status, body[:200])
    assert SECRET.encode() not in body
    if expected == 200 and path != "sub":
        assert headers["content-disposition"].startswith("attachment")
        assert headers["content-type"] == "application/octet-stream"


def test_absolute_and_dotdot_in_the_raw_request_line(server: Server) -> None:
    for raw in (f"/runs/{RUN_A}/results/../../../../etc/passwd", f"/runs/{RUN_A}/results//etc/passwd",
                f"/runs/{RUN_A}/results/%2e%2e/%2e%2e/run.json"):
        status, _, body = server.request("GET", raw)
        assert status in (400, 403, 404), raw
        assert b"root:" not in body and SECRET.encode() not in body


def test_results_files_never_render_as_html(server: Server) -> None:
    status, headers, body = server.request("GET", f"/runs/{RUN_A}/results/page.html?view=1")
    assert status == 200
    assert headers["content-type"] == "application/octet-stream" and headers["content-disposition"].startswith(
        "attachment")
    status, headers, body = server.request("GET", f"/runs/{RUN_A}/results/r.txt?view=1")
    assert headers["content-type"].startswith("text/plain") and "sandbox" in headers["content-security-policy"]
    assert body == b"result\n"


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_streamed_archive_verifies_and_matches_hpcexp_archive(server: Server, project: Path, tmp_path: Path,
                                                              fmt: str) -> None:
    from hpcexp import archive

    status, headers, body = server.request("GET", f"/runs/{RUN_A}/archive.{fmt}")
    assert status == 200, body[:300]
    assert "content-length" not in headers  # streamed, not built first
    got = tmp_path / f"served.{fmt}"
    got.write_bytes(body)
    report = archive.verify_archive(got)
    assert report.ok, report.problems
    proc = run_cli("archive", RUN_A, "-o", str(tmp_path / f"cli.{fmt}"), cwd=project)
    assert proc.returncode == 0, proc.stderr
    cli_report = archive.verify_archive(tmp_path / f"cli.{fmt}")
    assert cli_report.checked == report.checked and cli_report.runs == report.runs
    if fmt == "tar.gz":  # deterministic writer: the very same bytes
        assert (tmp_path / f"cli.{fmt}").read_bytes() == body
    assert SECRET.encode() not in body


def test_archive_of_an_experiment_and_errors(server: Server) -> None:
    status, _, body = server.request("GET", "/runs/other/archive.tar.gz")
    assert status == 200
    status, _, body = server.request("GET", "/runs/nosuch/archive.zip")
    assert status == 404
    status, _, body = server.request("GET", f"/runs/{RUN_A}/archive.rar")
    assert status == 404


# --------------------------------------------------------------------------------------
# Live logs
# --------------------------------------------------------------------------------------

def test_log_follows_live_across_attempts_and_ends_with_the_run(server: Server, project: Path) -> None:
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import read_record, write_record

    paths = RunPaths(project / "runs" / "hello" / RUN_LIVE)
    conn = server.connection()
    conn.request("GET", f"/runs/{RUN_LIVE}/log/stdout/events",
                 headers={"Host": "localhost", "Authorization": f"Bearer {server.token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    got: list[tuple[str, str, str | None]] = []
    done = threading.Event()

    def reader() -> None:
        for ev in sse_events(resp, timeout=60):
            got.append(ev)
        done.set()

    threading.Thread(target=reader, daemon=True).start()

    def text() -> str:
        return "".join(json.loads(d) for e, d, _ in got if e == "message")

    def wait_for(pred, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, (what, got)
            time.sleep(0.05)

    with open(paths.stdout, "a") as fh:
        fh.write("line one\n")
    wait_for(lambda: "line one\n" in text(), "first line")
    with open(paths.stdout, "a") as fh:
        fh.write(f"{XSS} ä€\n")
    wait_for(lambda: f"{XSS} ä€\n" in text(), "second line")
    # a requeue: attempt 2 writes stdout.2.log
    rec = read_record(paths)
    rec.attempt = 2
    paths.attempt_stdout(2).write_text("attempt two\n")
    write_record(paths, rec)
    wait_for(lambda: "attempt two\n" in text(), "the next attempt's file")
    assert [d for e, d, _ in got if e == "attempt"] == ["1", "2"]
    rec = read_record(paths)
    rec.attempts = [{"attempt": 1, "job_id": "77", "note": "requeued", "exit_code": None}]
    write_record(paths, rec)
    _, _, page = server.request("GET", f"/runs/{RUN_LIVE}")
    assert b'id="attempts"' in page and b"requeued" in page and b"2 (current)" in page
    assert b"/log/stdout?attempt=1" in page
    assert server.request("GET", f"/runs/{RUN_LIVE}/log/stdout?attempt=1")[2] == f"line one\n{XSS} ä€\n".encode()
    assert server.request("GET", f"/runs/{RUN_LIVE}/log/stdout")[2] == b"attempt two\n"
    rec.state = "succeeded"
    rec.exit_code = 0
    write_record(paths, rec)
    assert done.wait(10), got
    assert got[-1][0] == "end"
    assert text() == f"line one\n{XSS} ä€\nattempt two\n"
    ids = [i for e, _, i in got if e == "message"]
    assert ids[-1] == "2:12"  # attempt 2, 12 bytes of it
    conn.close()
    # resuming with Last-Event-ID sends only what is missing
    status, _, body = server.request("GET", f"/runs/{RUN_A}/log/stdout/events", headers={"Last-Event-ID": "1:6"})
    assert status == 200
    assert [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: \"")] == \
        ["world\n"]


def test_log_events_of_unknown_runs_and_streams(server: Server) -> None:
    assert server.request("GET", "/runs/nosuch/log/stdout/events")[0] == 404
    assert server.request("GET", f"/runs/{RUN_A}/log/passwd/events")[0] == 404
    assert server.request("GET", f"/runs/{RUN_A}/log/stdout?attempt=9")[0] == 400


def test_twenty_followers_at_once(server: Server, project: Path) -> None:
    run_id = "20260101-000003.000-dddddd"
    d = write_run(project, "hello", run_id, state="running", executor="test-noop")
    (d / "stdout.log").write_text("")

    def threads() -> int:
        return len(os.listdir(f"/proc/{server.proc.pid}/task"))

    before = threads()
    conns = []
    for _ in range(20):
        conn = server.connection()
        conn.request("GET", f"/runs/{run_id}/log/stdout/events",
                     headers={"Host": "localhost", "Authorization": f"Bearer {server.token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        conns.append((conn, resp))
    time.sleep(0.5)
    assert threads() >= before + 20  # one follower thread per client
    t0 = time.monotonic()
    with open(d / "stdout.log", "a") as fh:
        fh.write("to everyone\n")
    for conn, resp in conns:
        for event, data, _ in sse_events(resp, until_end=False, timeout=10):
            if event == "message" and "to everyone" in json.loads(data):
                break
        else:
            raise AssertionError("a follower did not get the line")
        conn.close()
    assert time.monotonic() - t0 < 5
    # none of the followers' threads is left once they went away; the server still answers
    deadline = time.monotonic() + 15
    while threads() > before + 2:
        assert time.monotonic() < deadline, (before, threads())
        time.sleep(0.1)
    assert server.request("GET", "/api/runs")[0] == 200


# --------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------

def test_action_errors_are_client_errors(server: Server) -> None:
    for path, body in (("/api/run", {"experiment": "nosuch"}), ("/api/run", {}), ("/api/build", {"experiment": 3}),
                       ("/api/run", {"experiment": "hello", "params": ["novalue"]}),
                       ("/api/run", {"experiment": "hello", "sweeps": ["a=1,2"]}),
                       ("/api/stop", {"refs": ["nosuch"]}), ("/api/stop", {}),
                       ("/api/build", {"experiment": "hello", "arch": "sparc"})):
        status, _, data = server.request("POST", path, json_body=body)
        assert status in (400, 404), (path, body, status, data)
        assert json.loads(data)["error"]
    status, _, data = server.request("POST", "/api/run", body="{not json", headers={"Content-Type": "application/json"})
    assert status == 400


def test_stop_through_the_api_has_the_cli_shape(server: Server) -> None:
    data = json.loads(server.request("POST", "/api/stop", json_body={"refs": [RUN_B]})[2])
    assert [r["run_id"] for r in data] == [RUN_B] and data[0]["state"] == "failed" and "dir" in data[0]


# --------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------

def test_unix_socket_is_0600_and_serves(project: Path, tmp_path: Path) -> None:
    sock = tmp_path / "dash.sock"
    with Server(project, "--socket", str(sock)) as srv:
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert srv.request("GET", "/api/runs", token=None)[0] == 401
        assert srv.json("/api/runs")
        assert srv.request("GET", "/api/runs", headers={"Host": "evil.example"})[0] == 403
    assert not sock.exists()


def test_socket_in_use_and_non_socket_paths_are_refused(project: Path, tmp_path: Path) -> None:
    sock = tmp_path / "busy.sock"
    plain = tmp_path / "plain"
    plain.write_text("x")
    with Server(project, "--socket", str(sock)):
        proc = run_cli("serve", "--socket", str(sock), cwd=project, timeout=30)
        assert_clean_error(proc, 2, "in use")
    proc = run_cli("serve", "--socket", str(plain), cwd=project, timeout=30)
    assert_clean_error(proc, 2, "not a socket")
    assert plain.read_text() == "x"


@pytest.mark.parametrize("args,needle", [
    (["--host", "0.0.0.0"], "not a loopback address"),
    (["--host", "192.0.2.1", "--allow-remote"], "needs TLS"),
    (["--certfile", "/nonexistent.pem", "--keyfile", "/nonexistent.key"], "does not exist"),
    (["--certfile", "/etc/hostname"], "go together"),
    (["--socket", "/nonexistent-dir/x.sock"], "does not exist"),
])
def test_unsafe_binds_exit_2(project: Path, args: list[str], needle: str) -> None:
    proc = run_cli("serve", *args, cwd=project, timeout=30)
    assert_clean_error(proc, 2, needle)


def test_ctrl_c_stops_cleanly_with_a_follower_attached(project: Path) -> None:
    srv = Server(project)
    conn = srv.connection()
    conn.request("GET", f"/runs/{RUN_LIVE}/log/stdout/events",
                 headers={"Host": "localhost", "Authorization": f"Bearer {srv.token}"})
    assert conn.getresponse().status == 200
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 10
    conn.close()


def test_serve_help_is_listed() -> None:
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0 and "--socket" in proc.stdout and "--read-only" in proc.stdout
    assert isinstance(http.client.HTTPConnection, type)


def test_tls_on_loopback_and_a_secure_cookie(project: Path, tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with Server(project, "--certfile", str(cert), "--keyfile", str(key)) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=30)
        conn.request("GET", f"/?token={srv.token}", headers={"Host": "localhost"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303 and "; Secure" in resp.getheader("set-cookie")
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)  # no clear-text fallback
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/", headers={"Host": "localhost"})
            plain.getresponse().read()
        plain.close()


def test_without_the_web_extra_it_says_how_to_get_it(project: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None; "
            "from hpcexp.cli.main import main; main(['serve'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_clean_error(proc, 3, "needs Starlette and uvicorn", "pip install 'hpcexp[web]'")


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_a_file_changing_mid_download_breaks_the_transfer(project: Path, fmt: str) -> None:
    """Never a short archive that looks complete: the connection ends without the last chunk."""
    run_id = f"20260101-000004.000-{'ee' if fmt == 'zip' else 'ff'}eeee"
    d = write_run(project, "hello", run_id, state="succeeded", exit_code=0)
    victim = d / "results" / "big.bin"
    victim.write_bytes(os.urandom(3 << 20))
    env = {"HPCEXP_TEST_FAULT": "archive.write:sleep", "HPCEXP_TEST_FAULT_SECONDS": "2"}
    with Server(project, env=env) as srv:
        timer = threading.Timer(0.7, lambda: victim.write_bytes(os.urandom(1 << 20)))
        timer.start()
        conn = srv.connection()
        conn.request("GET", f"/runs/{run_id}/archive.{fmt}",
                     headers={"Host": "localhost", "Authorization": f"Bearer {srv.token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        timer.join()
        conn.close()
        assert srv.request("GET", "/api/runs")[0] == 200  # still serving
    assert f"archive of {run_id} aborted" in srv.stderr_text and "changed" in srv.stderr_text
    assert "Traceback" not in srv.stderr_text, srv.stderr_text


def test_port_in_use_exits_2(project: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), cwd=project, timeout=30)
    assert_clean_error(proc, 2, f"port {port} on 127.0.0.1 is already in use")
