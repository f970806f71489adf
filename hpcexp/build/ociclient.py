"""The registry's HTTP API (OCI distribution spec), for digests, downloads and doctor.

Standard library only (urllib, ssl): hpcexp needs HEAD/GET of manifests and blobs with
bearer-token auth, and a streaming, hashing download; that does not justify a dependency.
Credentials come from the environment or Apptainer's own login, and are never logged."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from hpcexp.build.oras import TRANSFER_TIMEOUT
from hpcexp.build.refs import Ref, redact
from hpcexp.core.config import LOOPBACK_HOSTS
from hpcexp.errors import NotFound, PinMismatch, RegistryError
from hpcexp.infra import atomic

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
HTTP_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------
# The registry's HTTP API (distribution spec), for digests and doctor
# --------------------------------------------------------------------------------------

def credentials(host: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) from the environment or Apptainer's own registry login; never logged."""
    env = os.environ if env is None else env
    for prefix in ("APPTAINER", "SINGULARITY"):
        user, password = env.get(f"{prefix}_DOCKER_USERNAME"), env.get(f"{prefix}_DOCKER_PASSWORD")
        if user and password:
            return user, password
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    for cfg in (home / ".apptainer" / "docker-config.json", home / ".singularity" / "docker-config.json"):
        try:
            auths = json.loads(cfg.read_text(encoding="utf-8")).get("auths") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for name in (host, f"https://{host}", f"oras://{host}", f"docker://{host}"):
            entry = auths.get(name)
            if isinstance(entry, dict) and entry.get("auth"):
                with contextlib.suppress(ValueError):
                    user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
                    if user:
                        return user, password
    return None


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: dict[str, Any]

    def sif_layer(self) -> dict[str, Any] | None:
        for layer in self.body.get("layers") or ():
            if isinstance(layer, dict) and layer.get("mediaType") == SIF_LAYER:
                return layer
        return None


class _WriteError(Exception):
    """Writing the download failed (a full disk): not the registry's fault."""


class _Cancelled(Exception):
    """The download was abandoned (the inputs turned out not to match the pin)."""


def _pipe(src: Any, dst: Any, chunk: int = 1 << 20, cancel: Any = None) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` and hash it, in three overlapping stages (receive, hash, write).

    TLS decryption, sha256 and file writes all release the GIL, so on a machine with a free
    core a pull costs about the time of the transfer alone, as in Apptainer's own (Go) pull.
    """
    import queue
    import threading

    to_hash: "queue.Queue[bytes | BaseException | None]" = queue.Queue(maxsize=16)
    to_write: "queue.Queue[bytes | BaseException | None]" = queue.Queue(maxsize=16)
    h = hashlib.sha256()
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            while not failure:
                if cancel is not None and cancel.is_set():
                    failure.append(_Cancelled())
                    break
                data = src.read(chunk)
                if not data:
                    break
                to_hash.put(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.append(exc)
        finally:
            to_hash.put(None)

    def digest() -> None:
        while True:
            data = to_hash.get()
            if data is None:
                to_write.put(None)
                return
            if not failure:
                h.update(data)
            to_write.put(data)

    threads = [threading.Thread(target=receive, daemon=True), threading.Thread(target=digest, daemon=True)]
    for t in threads:
        t.start()
    n = 0
    try:
        while True:
            data = to_write.get()
            if data is None:
                break
            if failure:
                continue
            view = memoryview(data)   # type: ignore[arg-type]
            try:
                while view:
                    written = dst.write(view)
                    view = view[written:]
            except OSError as exc:
                raise _WriteError(exc) from exc
            n += len(data)  # type: ignore[arg-type]
    except BaseException as exc:
        failure.append(exc)
        while to_write.get() is not None:   # let the stages finish
            pass
        raise
    finally:
        for t in threads:
            t.join()
    if failure:
        raise failure[0]
    return h.hexdigest(), n


class _RedirectWithoutAuth(urllib.request.HTTPRedirectHandler):
    """Registries send blob downloads to storage elsewhere (a presigned URL): our token is for
    the registry only and must not travel to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class Client:
    """A minimal distribution-API client: GET/HEAD with anonymous, Basic or Bearer auth."""

    def __init__(self, host: str, *, insecure: bool = False, env: Mapping[str, str] | None = None) -> None:
        self.host = host
        self.insecure = insecure
        self.env = env
        self._token: str | None = None
        handlers: list[Any] = []
        bare = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if bare in LOOPBACK_HOSTS:
            handlers.append(urllib.request.ProxyHandler({}))   # never send loopback traffic to a proxy
        if not insecure:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context()))
        handlers.append(_RedirectWithoutAuth())
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def base(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.host}"

    def request(self, method: str, path: str, *, accept: tuple[str, ...] = (), timeout: float = HTTP_TIMEOUT,
                sink: Callable[[Any], None] | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One API call (authenticating once on 401). With ``sink``, a 200 response is handed
        to it to stream instead of being read into memory."""
        url = self.base + path
        for attempt in range(2):
            headers = {"User-Agent": "hpcexp"}
            if accept:
                headers["Accept"] = ", ".join(accept)
            if self._token:
                headers["Authorization"] = self._token
            req = urllib.request.Request(url, method=method, headers=headers)
            try:
                with self._opener.open(req, timeout=timeout) as resp:
                    if sink is not None:
                        sink(resp)
                        return resp.status, dict(resp.headers.items()), b""
                    return resp.status, dict(resp.headers.items()), resp.read()
            except urllib.error.HTTPError as exc:
                body = exc.read() if exc.fp is not None else b""
                if exc.code == 401 and attempt == 0 and self._authenticate(exc.headers.get("WWW-Authenticate", "")):
                    continue
                return exc.code, dict(exc.headers.items()), body
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise RegistryError(f"registry {self.host} does not answer at {self.base}/v2/: {reason}",
                                    hint=_tls_hint(reason, self.host)) from None
        raise RegistryError(f"registry {self.host} refused our credentials")  # pragma: no cover

    def _authenticate(self, challenge: str) -> bool:
        creds = credentials(self.host, self.env)
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if creds is None:
                return False
            self._token = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", None)
        if not realm:
            return False
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(fields)
        headers = {"User-Agent": "hpcexp"}
        if creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        try:
            with self._opener.open(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT) as resp:
                doc = json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError):
            return False
        token = doc.get("token") or doc.get("access_token")
        if not token:
            return False
        self._token = f"Bearer {token}"
        return True

    def manifest(self, ref: Ref) -> Manifest:
        status, headers, body = self.request("GET", f"/v2/{ref.repo}/manifests/{ref.reference}",
                                             accept=MANIFEST_TYPES)
        if status == 404:
            raise NotFound(f"{redact(ref.uri())} is not in the registry")
        if status in (401, 403):
            raise RegistryError(f"registry {self.host} refused access to {ref.repo} (HTTP {status})",
                                hint="log in with `apptainer registry login oras://HOST` or set "
                                     "APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD")
        if status != 200:
            raise RegistryError(f"registry {self.host} answered HTTP {status} for {redact(ref.uri())}")
        lower = {k.lower(): v for k, v in headers.items()}
        digest = lower.get("docker-content-digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise PinMismatch(f"registry {self.host} returned manifest {digest} for {redact(ref.uri())}")
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise PinMismatch(f"registry {self.host} sent a manifest whose bytes do not hash to {digest}")
        try:
            doc = json.loads(body.decode("utf-8"))
        except ValueError:
            doc = {}
        return Manifest(digest=digest, media_type=lower.get("content-type", ""), body=doc if isinstance(doc, dict)
                        else {})

    def fetch_blob(self, repo: str, digest: str, out: Path, *, cancel: Any = None) -> tuple[str, int]:
        """Stream blob ``digest`` of ``repo`` into ``out`` (created, never replaced), hashing as it
        arrives; returns (sha256 hex, bytes). One pass over the data: no second read to hash it."""
        state: dict[str, Any] = {}

        def sink(resp: Any) -> None:
            with open(out, "xb", buffering=0) as fh:
                state["sha"], state["n"] = _pipe(resp, fh, cancel=cancel)

        try:
            status, _, _ = self.request("GET", f"/v2/{repo}/blobs/{digest}", timeout=TRANSFER_TIMEOUT, sink=sink)
        except _WriteError as exc:
            raise atomic.storage_error(exc.args[0], out) from exc
        except OSError as exc:
            raise atomic.storage_error(exc, out) from exc
        if status in (401, 403):
            raise RegistryError(f"registry {self.host} refused access to {repo} (HTTP {status})",
                                hint="log in with `apptainer registry login oras://HOST` or set "
                                     "APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD")
        if status == 404:
            raise NotFound(f"blob {digest} of {self.host}/{repo} is not in the registry")
        if status != 200 or "sha" not in state:
            raise RegistryError(f"registry {self.host} answered HTTP {status} for blob {digest} of {repo}")
        return state["sha"], state["n"]

    def ping(self) -> tuple[bool, str]:
        """(ok, what) for doctor: the registry answers /v2/ and our credentials (if any) work."""
        status, headers, _ = self.request("GET", "/v2/")
        if status == 200:
            who = "with your credentials" if self._token else "anonymously"
            return True, f"answers {self.base}/v2/ {who}"
        if status == 401:
            if credentials(self.host, self.env) is None:
                return True, (f"answers {self.base}/v2/ and asks for credentials (none found: "
                              "`apptainer registry login`, or APPTAINER_DOCKER_USERNAME/PASSWORD)")
            return False, f"refused the credentials found for {self.host} (HTTP 401)"
        return False, f"answered HTTP {status} at {self.base}/v2/"


def _tls_hint(reason: Any, host: str) -> str | None:
    text = str(reason)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate" in text.lower():
        return ("the registry's TLS certificate is not trusted here: add its CA to the system CA store "
                "(update-ca-certificates); plain HTTP (`registry: {url: ..., insecure: true}`) is for "
                "127.0.0.1 only")
    if "refused" in text.lower():
        return f"is the registry running at {host}?"
    return None
