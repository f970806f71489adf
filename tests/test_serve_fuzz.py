"""A fuzzing pass over the dashboard's JSON API (and its pages): whatever the path, query or body,
the answer is never a 500 (an unhandled error) and never a traceback.

In-process, by calling the ASGI application directly (no socket at all), on a project
whose runs have all ended, so that every log stream ends too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servehelp import write_run

pytest.importorskip("starlette")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RUN = "20260101-000000.000-aaaaaa"


class Client:
    """Just enough of an HTTP client to drive an ASGI app in process."""

    def __init__(self, app, token: str) -> None:  # noqa: ANN001
        self.app = app
        self.token = token

    def request(self, method: str, path: str, *, params: dict[str, str] | None = None, content: bytes | str = b"",
                headers: dict[str, str] | None = None) -> "Resp":
        import asyncio
        from urllib.parse import urlencode

        body = content.encode() if isinstance(content, str) else content
        hdrs = {"host": "localhost", "authorization": f"Bearer {self.token}", **{k.lower(): v for k, v in
                                                                                 (headers or {}).items()}}
        raw_path = path.split("?", 1)[0]
        from urllib.parse import unquote

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": unquote(raw_path), "raw_path": raw_path.encode("utf-8"),
                 "query_string": urlencode(params or {}).encode(), "root_path": "",
                 "headers": [(k.encode(), v.encode("utf-8")) for k, v in hdrs.items()],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        out = {"status": None, "body": b""}

        async def run() -> None:
            done = asyncio.Event()
            sent = False

            async def receive() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await done.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    out["status"] = message["status"]
                elif message["type"] == "http.response.body":
                    out["body"] += message.get("body", b"")
                    if not message.get("more_body"):
                        done.set()

            await asyncio.wait_for(self.app(scope, receive, send), 60)

        asyncio.run(run())
        return Resp(out["status"], out["body"])

    def get(self, path: str, **kw) -> "Resp":  # noqa: ANN003
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> "Resp":  # noqa: ANN003
        return self.request("POST", path, **kw)


class Resp:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self.content = body
        self.text = body.decode("utf-8", "replace")

    def json(self):  # noqa: ANN201
        return json.loads(self.content)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from hpcexp.server.app import Settings, create_app

    root = tmp_path_factory.mktemp("fuzzproj")
    (root / "hpcexp.yaml").write_text("experiments:\n  exp-a:\n    ref: https://example.org\n")
    d = root / "experiments" / "exp-a"
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text("FROM nosuch-base:1\n")
    run = write_run(root, "exp-a", RUN, state="succeeded", exit_code=0, params={"k": "v"})
    (run / "stdout.log").write_text("out\n")
    (run / "results" / "f.txt").write_text("x")
    (run / "results" / "link").symlink_to("/etc/passwd")
    write_run(root, "exp-a", "20260101-000001.000-bbbbbb", state="failed", exit_code=1, sweep_id="sw-1",
              task_index=0)
    token = "fuzz-token"
    yield Client(create_app(Settings(project_root=root, token=token)), token)


segment = st.one_of(
    st.sampled_from([RUN, "exp-a", "@last", "sw-1", "2026", "..", ".", "", "%2F", "%2e%2e", "%00", "f.txt", "link",
                     "stdout", "stderr", "results", "archive.zip", "archive.tar.gz", "log", "events", "x" * 300]),
    st.text(min_size=0, max_size=20),
)
TEMPLATES = ["/api/experiments", "/api/runs", "/api/runs/{}", "/api/runs/{}/archive.{}", "/api/runs/{}/log/{}/events",
             "/api/images", "/api/jobs/{}", "/api/openapi.json", "/runs/{}", "/runs/{}/results/{}",
             "/runs/{}/log/{}", "/runs/{}/archive.{}", "/experiments", "/runs", "/jobs/{}", "/{}"]


def _quote(s: str) -> str:
    from urllib.parse import quote

    return s if s.startswith("%") else quote(s, safe="/@.")


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(TEMPLATES), parts=st.lists(segment, min_size=3, max_size=3),
       query=st.dictionaries(st.sampled_from(["experiment", "state", "sweep", "tail", "attempt", "view", "x"]),
                             st.text(max_size=12), max_size=3))
def test_get_never_500(client, template: str, parts: list[str], query: dict[str, str]) -> None:
    path = template.format(*[_quote(p) for p in parts[: template.count("{}")]])
    resp = client.get(path, params=query)
    assert resp.status_code < 500, (path, query, resp.status_code, resp.text[:500])
    assert "Traceback" not in resp.text


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=10)
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"experiment": st.one_of(st.sampled_from(["nosuch", "", "../x"]), json_values),
                                        "params": json_values, "sweeps": json_values, "arch": json_values,
                                        "refs": st.one_of(st.lists(st.sampled_from(["nosuch", "..", "", "@last"])),
                                                          json_values),
                                        "force": json_values}),
    json_values,
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/api/build", "/api/run", "/api/submit", "/api/stop"]), body=bodies)
def test_post_never_500(client, route: str, body: object) -> None:
    resp = client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status_code < 500, (route, body, resp.status_code, resp.text[:500])
    assert resp.status_code in (200, 202, 400, 403, 404, 409, 422), resp.status_code


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/api/run", "/actions/run", "/api/stop"]), raw=st.binary(max_size=200),
       ctype=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""]))
def test_raw_bodies_never_500(client, route: str, raw: bytes, ctype: str) -> None:
    resp = client.post(route, content=raw, headers={"Content-Type": ctype} if ctype else {})
    assert resp.status_code < 500, (route, raw, resp.status_code, resp.text[:500])


def test_openapi_lists_every_api_route(client) -> None:
    doc = client.get("/api/openapi.json").json()
    for path in ("/api/experiments", "/api/runs", "/api/runs/{ref}", "/api/images", "/api/jobs/{job}",
                 "/api/build", "/api/run", "/api/submit", "/api/stop", "/api/runs/{ref}/archive.{fmt}",
                 "/api/runs/{ref}/log/{stream}/events"):
        assert path in doc["paths"], path


def test_the_driver_reaches_the_real_routes(client, tmp_path: Path) -> None:
    """The fuzz above is only worth something if its requests get past the middleware."""
    from hpcexp import archive

    assert client.get(f"/api/runs/{RUN}").json()[0]["run_id"] == RUN
    assert client.get("/api/runs", params={"sweep": "sw-1"}).json()[0]["task_index"] == 0
    resp = client.get(f"/api/runs/{RUN}/archive.zip")
    assert resp.status_code == 200
    (tmp_path / "a.zip").write_bytes(resp.content)
    assert archive.verify_archive(tmp_path / "a.zip").ok
    events = client.get(f"/api/runs/{RUN}/log/stdout/events").text
    assert '"out\\n"' in events and "event: end" in events
    assert client.get(f"/runs/{RUN}/results/link").status_code == 403
    assert client.post("/api/stop", content=json.dumps({"refs": [RUN]}),
                       headers={"Content-Type": "application/json"}).json()[0]["state"] == "succeeded"
    nobody = Client(client.app, "not-the-token")
    assert nobody.get("/api/runs").status_code == 403
