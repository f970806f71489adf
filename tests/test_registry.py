"""Unit tests of hpcexp.build.registry and the registry:/verify: config (no registry needed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.build import registry
from hpcexp.core.config import load_project
from hpcexp.errors import ConfigError, UsageError

H = "a" * 64
S = "b" * 64
D = "sha256:" + "c" * 64


def pin(**over: object) -> registry.Pin:
    data = dict(experiment="hello", arch="amd64", input_hash=H, sha256=S,
                ref=f"oras://registry.your.site/lab/hello@{D}", size=123, tag="amd64-" + H[:16])
    data.update(over)
    return registry.Pin(**data)  # type: ignore[arg-type]


# -- references ------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, repo, tag, digest", [
    ("oras://127.0.0.1:5000/lab/hello:amd64-1", "127.0.0.1:5000", "lab/hello", "amd64-1", None),
    (f"oras://registry.your.site/lab/hello@{D}", "registry.your.site", "lab/hello", None, D),
    ("docker://registry.your.site/mirror/python:3.11-slim", "registry.your.site", "mirror/python",
     "3.11-slim", None),
    ("docker://localhost/a/b/c", "localhost", "a/b/c", None, None),
])
def test_parse_ref(text: str, host: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = registry.parse_ref(text)
    assert (ref.host, ref.repo, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert registry.parse_ref(ref.uri()) == ref


@pytest.mark.parametrize("text", [
    "registry.your.site/lab/hello",              # no scheme
    "https://registry.your.site/lab/hello",      # not oras/docker
    "oras://registry.your.site",                 # no repository
    "oras://registry.your.site/Lab/Hello",       # upper case
    "oras://registry.your.site/lab/hello@sha256:abc",   # short digest
    "oras://user:secret@registry.your.site/lab/hello",  # credentials in the URL
    "oras://registry.your.site/lab/hello:bad tag",
])
def test_parse_ref_rejects(text: str) -> None:
    with pytest.raises(UsageError) as err:
        registry.parse_ref(text)
    assert "secret" not in err.value.message


def test_redact_hides_userinfo() -> None:
    assert registry.redact("oras://bob:hunter2@registry.your.site/lab") == "oras://***@registry.your.site/lab"
    assert registry.redact("see https://t@h/x and oras://h/y") == "see https://***@h/x and oras://h/y"


def test_repo_name_and_tag() -> None:
    assert registry.repo_name("My_Exp.v2") == "my-exp-v2"
    assert registry.image_tag("arm64", H) == "arm64-" + H[:16]


def test_names_registry_host() -> None:
    assert registry.names_registry_host("docker://registry.your.site/mirror/python:3.11")
    assert registry.names_registry_host("docker://127.0.0.1:5000/x:1")
    assert not registry.names_registry_host("docker://python:3.11")
    assert not registry.names_registry_host("docker://library/python:3.11")


def test_pinned_base_uri() -> None:
    assert registry.pinned_base_uri("docker://registry.your.site:5000/mirror/python:3.11-slim", D) == \
        f"docker://registry.your.site:5000/mirror/python@{D}"
    assert registry.pinned_base_uri("docker://registry.your.site/mirror/python", D) == \
        f"docker://registry.your.site/mirror/python@{D}"


# -- the lock file ---------------------------------------------------------------------

def test_lock_text_is_deterministic_and_round_trips() -> None:
    a = registry.LockFile(images={"z/amd64": pin(experiment="z"), "hello/amd64": pin()},
                          bases={"docker://registry.your.site/m/p:1": D})
    b = registry.LockFile(images={"hello/amd64": pin(), "z/amd64": pin(experiment="z")},
                          bases={"docker://registry.your.site/m/p:1": D})
    assert a.to_text() == b.to_text()
    text = a.to_text()
    assert text.index('"hello/amd64"') < text.index('"z/amd64"')
    back = registry.parse_lock(text)
    assert back.images == a.images and back.bases == a.bases
    assert "signed_by" not in text    # unset fields are left out


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(format=99), "format"),
    (lambda d: d["images"]["hello/amd64"].update(ref="oras://registry.your.site/lab/hello:latest"), "by digest"),
    (lambda d: d["images"]["hello/amd64"].update(sha256="nothex"), "sha256"),
    (lambda d: d["images"]["hello/amd64"].pop("input_hash"), "input_hash"),
    (lambda d: d["images"].update({"other/amd64": d["images"]["hello/amd64"]}), "does not match"),
    (lambda d: d["bases"].update({"docker://x/y:1": "latest"}), "bases."),
])
def test_bad_lock_is_a_config_error_naming_the_field(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(registry.LockFile(images={"hello/amd64": pin()}).to_text())
    mutate(doc)
    with pytest.raises(ConfigError) as err:
        registry.parse_lock(json.dumps(doc))
    assert any(needle in p and "hpcexp.lock" in p for p in err.value.problems), err.value.problems


def test_lock_that_is_not_json() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        registry.parse_lock("{nope")


def test_update_lock_is_atomic_and_rereads(tmp_path: Path) -> None:
    (tmp_path / "hpcexp.yaml").write_text("{}\n")
    project = load_project(tmp_path)
    registry.update_lock(project, lambda lk: lk.images.__setitem__("hello/amd64", pin()))
    registry.update_lock(project, lambda lk: lk.bases.__setitem__("docker://registry.your.site/m/p:1", D))
    lock = registry.read_lock(project)
    assert set(lock.images) == {"hello/amd64"} and lock.bases
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hpcexp-tmp-")]


def test_stale_pin_message_names_both_hashes_and_the_fix() -> None:
    err = registry.stale_pin_error(pin(), "d" * 64)
    assert H[:16] in err.message and "d" * 16 in err.message and err.exit_code == 2
    assert "hpcexp build hello" in (err.hint or "") and "hpcexp push hello" in (err.hint or "")


# -- credentials -----------------------------------------------------------------------

def test_credentials_from_env_then_apptainer_login(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "APPTAINER_DOCKER_USERNAME": "u", "APPTAINER_DOCKER_PASSWORD": "p"}
    assert registry.credentials("registry.your.site", env) == ("u", "p")
    cfg = tmp_path / ".apptainer" / "docker-config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"auths": {"registry.your.site": {"auth": base64.b64encode(b"bob:pw").decode()}}}))
    assert registry.credentials("registry.your.site", {"HOME": str(tmp_path)}) == ("bob", "pw")
    assert registry.credentials("other.your.site", {"HOME": str(tmp_path)}) is None


def test_pem_fingerprint_is_of_the_der_bytes() -> None:
    der = b"\x30\x03\x02\x01\x05"
    pem = "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n-----END PUBLIC KEY-----\n"
    import hashlib

    assert registry.pem_fingerprint(pem) == "pem-sha256:" + hashlib.sha256(der).hexdigest()
    assert registry.pem_fingerprint("not a key") is None


# -- config ----------------------------------------------------------------------------

def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    (tmp_path / "hpcexp.yaml").write_text(text)
    return load_project(tmp_path)


def test_registry_config_forms(tmp_path: Path) -> None:
    p = _load(tmp_path, "registry: oras://registry.your.site/lab/team\n")
    assert p.registry is not None and (p.registry.host, p.registry.namespace, p.registry.insecure) == \
        ("registry.your.site", "lab/team", False)
    p = _load(tmp_path, "registry: {url: 'oras://127.0.0.1:5000/lab', insecure: true}\n")
    assert p.registry is not None and p.registry.insecure and p.registry.host == "127.0.0.1:5000"


@pytest.mark.parametrize("text, needle", [
    ("registry: https://registry.your.site/lab\n", "registry.url"),
    ("registry: oras://registry.your.site\n", "registry.url"),
    ("registry: oras://bob:pw@registry.your.site/lab\n", "credentials"),
    ("registry: {url: 'oras://registry.your.site/lab', insecure: true}\n", "plain HTTP"),
    ("registry: {url: 'oras://127.0.0.1/lab', tls: false}\n", "unknown key"),
    ("verify: {mode: sometimes}\n", "verify.mode"),
    ("verify: {mode: require}\n", "require needs"),
    ("verify: {mode: warn, keys: [ABC]}\n", "fingerprint"),
    ("verify: {mode: warn, key_files: /x.pem}\n", "list of paths"),
])
def test_bad_registry_or_verify_config(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert any(needle in p for p in err.value.problems), err.value.problems
    assert all("pw" not in p for p in err.value.problems)


def test_verify_config(tmp_path: Path) -> None:
    fp = "0123456789ABCDEF0123456789ABCDEF01234567"
    p = _load(tmp_path, f"verify: {{mode: require, keys: ['{fp.lower()}'], key_files: [keys/pub.pem]}}\n")
    assert p.verify.mode == "require" and p.verify.keys == (fp,)
    assert p.verify.key_files == (tmp_path / "keys" / "pub.pem",)
    assert _load(tmp_path, "{}\n").verify.mode == "off"


# -- CLI errors (no registry needed) ---------------------------------------------------

@pytest.fixture
def proj(tmp_path: Path) -> Path:
    d = tmp_path / "experiments" / "hello"
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text("FROM busybox:latest\n")
    (tmp_path / "hpcexp.yaml").write_text("{}\n")
    return tmp_path


def test_push_without_a_registry_or_a_built_image(proj: Path) -> None:
    assert_clean_error(run_cli("push", "hello", cwd=proj), 2, "no registry to push to", "registry:")
    res = run_cli("push", "hello", "--to", "oras://registry.your.site/lab", cwd=proj)
    assert_clean_error(res, 2, "no current image of hello", "hpcexp build hello")


def test_pull_without_a_pin(proj: Path) -> None:
    assert_clean_error(run_cli("pull", "hello", cwd=proj), 2, "hpcexp.lock pins no image of hello")


def test_broken_lock_file_is_reported_by_run(proj: Path) -> None:
    (proj / "hpcexp.lock").write_text("{broken")
    res = run_cli("pull", "hello", cwd=proj)
    assert_clean_error(res, 2, "hpcexp.lock", "not valid JSON")


def test_push_to_a_bad_url(proj: Path) -> None:
    res = run_cli("push", "hello", "--to", "oras://bob:pw@registry.your.site/lab", cwd=proj)
    assert_clean_error(res, 2, "--to", "oras://***@registry.your.site/lab", "no credentials")
    assert "pw" not in res.stderr


# -- the download pipeline -------------------------------------------------------------

def test_pipe_copies_and_hashes_in_order() -> None:
    import hashlib
    import io
    import os

    data = os.urandom(5 * (1 << 20) + 123)
    out = io.BytesIO()
    sha, n = registry._pipe(io.BytesIO(data), out, chunk=64 * 1024)
    assert n == len(data) and out.getvalue() == data and sha == hashlib.sha256(data).hexdigest()


def test_pipe_reports_a_failed_write_as_a_write_error() -> None:
    import errno
    import io

    class Full(io.RawIOBase):
        def write(self, b):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(registry._WriteError):
        registry._pipe(io.BytesIO(b"x" * (3 << 20)), Full(), chunk=1 << 16)


def test_pipe_passes_on_a_failed_read() -> None:
    import io

    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, n: int = -1) -> bytes:  # type: ignore[override]
            self.calls += 1
            if self.calls > 3:
                raise ConnectionResetError("reset by peer")
            return b"y" * n

    with pytest.raises(ConnectionResetError):
        registry._pipe(Broken(), io.BytesIO(), chunk=1 << 16)


# -- auth against a small fake registry API on 127.0.0.1 (plain HTTP, loopback only) ----------

class _FakeRegistry:
    """Serves /v2/ and one manifest behind Basic or Bearer auth; records what it was sent."""

    def __init__(self, scheme: str, user: str = "bob", password: str = "s3cret") -> None:
        import http.server
        import threading

        self.seen: list[str] = []
        outer = self
        good_basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.body = json.dumps({"schemaVersion": 2, "layers": []}).encode()
        import hashlib

        self.digest = "sha256:" + hashlib.sha256(self.body).hexdigest()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                auth = self.headers.get("Authorization", "")
                outer.seen.append(auth)
                if self.path.startswith("/token"):
                    if auth != good_basic:
                        self.send_response(401)
                        self.end_headers()
                        return
                    self._send(200, json.dumps({"token": "tok123"}).encode())
                    return
                ok = auth == (good_basic if scheme == "basic" else "Bearer tok123")
                if not ok:
                    self.send_response(401)
                    if scheme == "basic":
                        self.send_header("WWW-Authenticate", 'Basic realm="r"')
                    else:
                        port = self.server.server_address[1]
                        self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token",'
                                                             'service="reg",scope="repository:lab/hello:pull"')
                    self.end_headers()
                    return
                if self.path == "/v2/":
                    self._send(200, b"{}")
                else:
                    self._send(200, outer.body, digest=outer.digest)

            def _send(self, code: int, body: bytes, digest: str | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_client_authenticates_with_env_credentials(scheme: str, tmp_path: Path) -> None:
    fake = _FakeRegistry(scheme)
    try:
        env = {"HOME": str(tmp_path), "APPTAINER_DOCKER_USERNAME": "bob", "APPTAINER_DOCKER_PASSWORD": "s3cret"}
        client = registry.Client(fake.host, insecure=True, env=env)
        ok, detail = client.ping()
        assert ok and "with your credentials" in detail and "s3cret" not in detail
        m = client.manifest(registry.parse_ref(f"oras://{fake.host}/lab/hello:amd64-1"))
        assert m.digest == fake.digest
        # wrong password: doctor's ping says the credentials are refused
        bad = registry.Client(fake.host, insecure=True, env=dict(env, APPTAINER_DOCKER_PASSWORD="nope"))
        ok, detail = bad.ping()
        assert not ok and "refused the credentials" in detail
        # none at all: it answers and asks for them
        anon = registry.Client(fake.host, insecure=True, env={"HOME": str(tmp_path)})
        ok, detail = anon.ping()
        assert ok and "asks for credentials" in detail
        with pytest.raises(registry.RegistryError, match="refused access"):
            anon.manifest(registry.parse_ref(f"oras://{fake.host}/lab/hello:amd64-1"))
    finally:
        fake.close()


def test_manifest_with_a_lying_digest_is_refused(tmp_path: Path) -> None:
    fake = _FakeRegistry("basic")
    fake.digest = "sha256:" + "e" * 64   # the server claims another digest than its bytes have
    try:
        env = {"HOME": str(tmp_path), "APPTAINER_DOCKER_USERNAME": "bob", "APPTAINER_DOCKER_PASSWORD": "s3cret"}
        client = registry.Client(fake.host, insecure=True, env=env)
        with pytest.raises(registry.PinMismatch, match="do not hash"):
            client.manifest(registry.parse_ref(f"oras://{fake.host}/lab/hello:amd64-1"))
    finally:
        fake.close()
