"""Images that travel: push, pull by digest, the lock file, signatures.

A built image is pushed to an OCI registry with ``apptainer push`` (ORAS: the SIF is the
one layer of an OCI artifact) and pinned in ``hpcexp.lock`` by the registry's manifest
**digest**, together with the experiment, architecture, input hash and the SIF's own
sha256. Tags are for people; hpcexp only ever pulls ``...@sha256:`` references, so a tag
moved in the registry never changes what a project runs.

A pull goes to a temporary name in the images folder under the image's lock (the same
lock a build of that image takes, so ten runs needing one image pull it once), its sha256
is checked against the lock, its signature against ``verify:``, and only then is it
renamed to ``images/NAME-ARCH-HASH.sif``: no partial or unverified SIF is ever visible
under the final name.

``hpcexp.lock`` is JSON, sorted and indented, with no timestamps, hosts or users in it,
so the same push gives the same file and it diffs well in review. It also pins the
digests of ``FROM`` bases taken from a registry (``bases: {image: docker://...:TAG}``):
the first build resolves the tag to a digest, and every later conversion names
``...@sha256:`` in the recipe, so a rebuild is reproducible.

Credentials are never read from hpcexp.yaml and never written anywhere: Apptainer's own
``apptainer registry login`` (its docker-config.json) or ``APPTAINER_DOCKER_USERNAME`` /
``APPTAINER_DOCKER_PASSWORD`` in the environment provide them, and URLs hpcexp prints have
any user information redacted.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from hpcexp.build import store
from hpcexp.core.config import LOOPBACK_HOSTS, Experiment, Project, RegistrySpec, VerifyPolicy
from hpcexp.core.layout import Layout
from hpcexp.errors import ConfigError, EnvironmentProblem, Failure, HpcexpError, NotFound, UsageError
from hpcexp.infra import atomic, hashing, process
from hpcexp.infra.lock import Lock, Owner

log = logging.getLogger(__name__)

LOCK_FORMAT = 1
LOCK_NAME = "hpcexp.lock"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
# Kept in Apptainer's otherwise scrubbed environment: registry credentials, and the PGP
# keyring folder that sign/verify use.
CRED_ENV = ("APPTAINER_DOCKER_USERNAME", "APPTAINER_DOCKER_PASSWORD",
            "SINGULARITY_DOCKER_USERNAME", "SINGULARITY_DOCKER_PASSWORD", "APPTAINER_KEYSDIR", "SINGULARITY_KEYSDIR")
HTTP_TIMEOUT = 30.0
TRANSFER_TIMEOUT = 3600.0

Progress = Callable[[str, str], None]


class RegistryError(EnvironmentProblem):
    """The registry did not answer, refused us, or TLS/credentials failed (exit code 3)."""


class PinMismatch(Failure):
    """What we got is not what the lock pins (sha256 or digest differs): exit code 1."""


class SignatureRefused(Failure):
    """The image's signature does not satisfy ``verify:`` (exit code 1); it is not published or run."""


class StalePin(UsageError):
    """The lock pins another input hash than the current inputs give (exit code 2)."""


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------

REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Ref:
    """``scheme://host/repo[:tag][@digest]`` (scheme: oras or docker)."""

    scheme: str
    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    def uri(self) -> str:
        text = f"{self.scheme}://{self.host}/{self.repo}"
        if self.digest:
            return f"{text}@{self.digest}"
        return f"{text}:{self.tag}" if self.tag else text

    def by_digest(self, digest: str) -> "Ref":
        return replace(self, tag=None, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after /manifests/ in the registry API."""
        return self.digest or self.tag or "latest"

    @property
    def bare_host(self) -> str:
        return self.host.split("]")[0] + "]" if self.host.startswith("[") else self.host.rsplit(":", 1)[0]


def parse_ref(text: str, *, what: str = "image reference") -> Ref:
    """Parse an ``oras://`` or ``docker://`` reference that names a registry host."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("oras", "docker"):
        raise UsageError(f"invalid {what} {redact(text)!r}: expected oras://HOST/REPO:TAG or ...@sha256:DIGEST")
    digest = None
    if "@" in rest:
        rest, _, digest = rest.rpartition("@")
        if not DIGEST_RE.match(digest):
            raise UsageError(f"invalid {what} {redact(text)!r}: the digest must be sha256: and 64 hex digits")
    host, slash, path = rest.partition("/")
    if not slash or not path or "@" in host:
        raise UsageError(f"invalid {what} {redact(text)!r}: expected HOST/REPO (and no user information)")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not TAG_RE.match(tag):
            raise UsageError(f"invalid {what} {redact(text)!r}: bad tag {tag!r}")
    if not all(REPO_COMPONENT.match(c) for c in path.split("/")):
        raise UsageError(f"invalid {what} {redact(text)!r}: repository names are lower-case letters, digits "
                         "and . _ - separators")
    return Ref(scheme=scheme, host=host, repo=path, tag=tag, digest=digest)


def names_registry_host(text: str) -> bool:
    """Whether a docker:// or oras:// reference starts with a registry host (has a '.' or ':' or is
    localhost) rather than a Docker Hub short name, which hpcexp leaves to Apptainer."""
    rest = text.partition("://")[2]
    first = rest.split("/", 1)[0]
    return "/" in rest and ("." in first or ":" in first or first == "localhost")


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` in a URL replaced by ``***@``."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))


def repo_name(experiment: str) -> str:
    """An OCI repository component for an experiment name (lower case, valid separators)."""
    name = re.sub(r"[^a-z0-9]+", "-", experiment.lower()).strip("-")
    return name or "image"


def image_tag(arch: str, input_hash: str) -> str:
    """The human-readable tag a push adds (the lock pins the digest, never this)."""
    return f"{arch}-{input_hash[:16]}"


def target_ref(project: Project, exp: Experiment, arch: str, input_hash: str,
               to: str | None = None) -> tuple[Ref, bool]:
    """Where ``hpcexp push`` sends an image, and whether plain HTTP is allowed for it."""
    spec = project.registry
    if to is not None:
        spec = _spec_from_cli(to, project.registry)
    if spec is None:
        raise UsageError("no registry to push to: set `registry: oras://HOST/NAMESPACE` in hpcexp.yaml or pass "
                         "--to oras://HOST/NAMESPACE")
    return Ref("oras", spec.host, f"{spec.namespace}/{repo_name(exp.name)}", tag=image_tag(arch, input_hash)), \
        spec.insecure


def _spec_from_cli(to: str, configured: RegistrySpec | None) -> RegistrySpec:
    from hpcexp.core.config import REGISTRY_URL_RE

    m = REGISTRY_URL_RE.match(to)
    if not m or "@" in to.partition("://")[2].split("/")[0]:
        raise UsageError(f"--to {redact(to)!r}: expected oras://HOST[:PORT]/NAMESPACE (lower case, no credentials)")
    host = m.group("host")
    insecure = bool(configured and configured.insecure and configured.host == host)
    return RegistrySpec(url=to.rstrip("/"), host=host, namespace=m.group("ns"), insecure=insecure)


def insecure_for(project: Project, host: str) -> bool:
    spec = project.registry
    return bool(spec is not None and spec.insecure and spec.host == host)


# --------------------------------------------------------------------------------------
# The lock file
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pin:
    """One image pinned in hpcexp.lock."""

    experiment: str
    arch: str
    input_hash: str
    sha256: str              # the SIF's own sha256 (hex)
    ref: str                 # oras://HOST/REPO@sha256:MANIFEST-DIGEST
    size: int
    tag: str | None = None   # the tag pushed alongside (informational)
    signed_by: str | None = None   # fingerprint of the signing key (pgp:... or pem-sha256:...)

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.arch}"

    @property
    def digest(self) -> str:
        return self.ref.rpartition("@")[2]


@dataclass
class LockFile:
    images: dict[str, Pin] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)    # base URI (with tag) -> sha256:DIGEST

    def pin(self, experiment: str, arch: str) -> Pin | None:
        return self.images.get(f"{experiment}/{arch}")

    def to_text(self) -> str:
        doc = {
            "comment": "written by `hpcexp push` and `hpcexp build`; commit it. Images are pinned by digest.",
            "format": LOCK_FORMAT,
            "images": {k: {f: v for f, v in asdict(p).items() if v is not None}
                       for k, p in sorted(self.images.items())},
            "bases": dict(sorted(self.bases.items())),
        }
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


_lock_cache: dict[Path, tuple[tuple[int, int, int], LockFile]] = {}


def lock_path(project: Project) -> Path:
    return Layout(project).lock_file()


def read_lock(project: Project) -> LockFile:
    """hpcexp.lock of ``project`` (empty when there is none); strict: a bad entry is a ConfigError."""
    path = lock_path(project)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return LockFile()
    except OSError as exc:
        raise atomic.storage_error(exc, path) from exc
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _lock_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise atomic.storage_error(exc, path) from exc
    lock = parse_lock(text, label=LOCK_NAME)
    _lock_cache[path] = (key, lock)
    return lock


def parse_lock(text: str, *, label: str = LOCK_NAME) -> LockFile:
    """Parse and validate a lock file's text; every problem is listed at once."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{label}: not valid JSON ({exc})", hint="restore it from version control") from None
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: must be a JSON object")
    if doc.get("format") != LOCK_FORMAT:
        problems.append(f"{label}: format: expected {LOCK_FORMAT}, got {doc.get('format')!r} "
                        "(written by another hpcexp version?)")
    images: dict[str, Pin] = {}
    raw_images = doc.get("images") or {}
    if not isinstance(raw_images, dict):
        problems.append(f"{label}: images: must be an object")
        raw_images = {}
    for key, entry in raw_images.items():
        where = f"{label}: images.{key}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        try:
            pin = Pin(experiment=entry["experiment"], arch=entry["arch"], input_hash=entry["input_hash"],
                      sha256=entry["sha256"], ref=entry["ref"], size=int(entry["size"]), tag=entry.get("tag"),
                      signed_by=entry.get("signed_by"))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{where}: missing or invalid field {exc}")
            continue
        if pin.key != key:
            problems.append(f"{where}: key does not match experiment/arch {pin.key!r}")
        if not re.match(r"^[0-9a-f]{64}$", str(pin.input_hash)):
            problems.append(f"{where}.input_hash: not a sha256 hex digest")
        if not re.match(r"^[0-9a-f]{64}$", str(pin.sha256)):
            problems.append(f"{where}.sha256: not a sha256 hex digest")
        try:
            ref = parse_ref(str(pin.ref), what=f"{where}.ref")
        except UsageError as exc:
            problems.append(exc.message)
            continue
        if ref.scheme != "oras" or ref.digest is None:
            problems.append(f"{where}.ref: must be oras://...@sha256:DIGEST (a pin is by digest), got "
                            f"{redact(pin.ref)!r}")
            continue
        images[key] = pin
    bases: dict[str, str] = {}
    raw_bases = doc.get("bases") or {}
    if not isinstance(raw_bases, dict):
        problems.append(f"{label}: bases: must be an object")
        raw_bases = {}
    for uri, digest in raw_bases.items():
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            problems.append(f"{label}: bases.{uri}: must be sha256: and 64 hex digits")
        else:
            bases[uri] = digest
    if problems:
        raise ConfigError(problems, hint=f"fix {label} (or restore it from version control)")
    return LockFile(images=images, bases=bases)


def update_lock(project: Project, change: Callable[[LockFile], None]) -> LockFile:
    """Apply ``change`` to hpcexp.lock under a lock and publish it atomically (temp name, rename)."""
    path = lock_path(project)
    guard = Lock(project.images_dir / ".locks" / "hpcexp.lock.lock", purpose="update hpcexp.lock")
    try:
        guard.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, guard.path.parent) from exc
    with guard.hold(what=str(path)):
        _lock_cache.pop(path, None)
        lock = read_lock(project)
        lock = LockFile(images=dict(lock.images), bases=dict(lock.bases))
        change(lock)
        atomic.write_text(path, lock.to_text())
        _lock_cache.pop(path, None)
    return lock


def base_pin(project: Project, uri: str) -> str | None:
    """The digest hpcexp.lock pins for a registry base URI (with its tag), if any."""
    try:
        return read_lock(project).bases.get(uri)
    except HpcexpError as exc:
        log.info("ignoring base pins: %s", exc)
        return None


def pinned_base_uri(uri: str, digest: str) -> str:
    """``docker://HOST/REPO:TAG`` pinned to ``docker://HOST/REPO@sha256:...``."""
    scheme, _, rest = uri.partition("://")
    rest = rest.split("@", 1)[0]
    last = rest.rsplit("/", 1)
    if ":" in last[-1]:
        rest = rest[: rest.rfind(":")]
    return f"{scheme}://{rest}@{digest}"


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


# --------------------------------------------------------------------------------------
# Apptainer push / pull / sign / verify
# --------------------------------------------------------------------------------------

def _apptainer_env() -> dict[str, str]:
    """Apptainer's environment: the usual scrubbed one, plus registry credentials if the user set them."""
    from hpcexp.runtime import apptainer

    env = apptainer.clean_env()
    for key in CRED_ENV:
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _program() -> str:
    """apptainer (or singularity) on PATH. No version probe: push, pull, sign and verify need
    no rootless build support, and a pull should not wait for ``apptainer --version``."""
    path = process.which("apptainer") or process.which("singularity")
    if path is None:
        raise EnvironmentProblem("apptainer not found on PATH (nor singularity)",
                                 hint=process.INSTALL_HINTS["apptainer"])
    return path


def _run_apptainer(argv: list[str], *, what: str, timeout: float = TRANSFER_TIMEOUT) -> process.Result:
    res = process.run([_program(), *argv], env=_apptainer_env(), timeout=timeout)
    if not res.ok:
        reason = redact(_fatal_line(res))
        if any(s in reason.lower() for s in ("unauthorized", "denied", "authentication required", "401", "403")):
            raise RegistryError(f"{what} failed: {reason}",
                                hint="log in with `apptainer registry login oras://HOST` or set "
                                     "APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD")
        if any(s in reason.lower() for s in ("connection refused", "no such host", "certificate", "timeout",
                                              "i/o timeout", "tls")):
            raise RegistryError(f"{what} failed: {reason}")
        if "no space left" in reason.lower() or "quota exceeded" in reason.lower():
            from hpcexp.errors import StorageError

            raise StorageError(f"{what} failed: {reason}; nothing was kept",
                               hint="free space, or point `images:` in hpcexp.yaml at a larger file system")
        raise Failure(f"{what} failed: {reason}")
    return res


def _fatal_line(res: process.Result) -> str:
    for stream in (res.stderr, res.stdout):
        for line in reversed(stream.splitlines()):
            if line.strip().startswith(("FATAL", "ERROR")):
                return re.sub(r"^(FATAL|ERROR):\s*", "", line.strip())
    return res.last_line()


def push_argv(sif: Path, ref: Ref, *, insecure: bool) -> list[str]:
    return ["push", *(["--no-https"] if insecure else []), str(sif), ref.uri()]


def pull_argv(out: Path, ref: Ref, *, insecure: bool) -> list[str]:
    # --disable-cache: the images folder is the cache; Apptainer's own would keep a second
    # copy of every image in $HOME (small quotas on clusters).
    return ["pull", "--disable-cache", *(["--no-https"] if insecure else []), str(out), ref.uri()]


def pem_fingerprint(pem_text: str) -> str | None:
    """``pem-sha256:HEX`` of a PEM public key (sha256 of its DER bytes), or None."""
    m = re.search(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", pem_text, re.S)
    if not m:
        return None
    try:
        der = base64.b64decode("".join(m.group(1).split()))
    except ValueError:
        return None
    return "pem-sha256:" + hashlib.sha256(der).hexdigest()


def _public_from_private(key_file: Path) -> str | None:
    """The PEM public key of a private key file (openssl), to name the signer in the lock."""
    if process.which("openssl") is None:
        return None
    res = process.run(["openssl", "pkey", "-in", str(key_file), "-pubout"], timeout=30)
    return res.stdout if res.ok else None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    signer: str | None
    reason: str


def policy_digest(policy: VerifyPolicy) -> str:
    doc = {"mode": policy.mode, "keys": sorted(policy.keys), "key_files": []}
    for f in sorted(policy.key_files):
        try:
            doc["key_files"].append(hashlib.sha256(Path(f).read_bytes()).hexdigest())
        except OSError:
            doc["key_files"].append(f"missing:{f}")
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _why_not(res: process.Result) -> str:
    text = (res.stdout + "\n" + res.stderr).lower()
    try:
        doc = json.loads(res.stdout[res.stdout.find("{"):]) if "{" in res.stdout else {}
    except ValueError:
        doc = {}
    if doc.get("Signatures") == 0 or "signature not found" in text:
        return "it is not signed"
    if "integrity compromised" in text or any(
            not (k.get("Signer") or {}).get("DataCheck", True) for k in doc.get("SignerKeys") or ()):
        return "its bytes were altered after signing (the signature does not match the data)"
    if "threshold" in text or "no valid signatures" in text or "key" in text:
        return "it is signed by a key that `verify:` does not allow"
    return _fatal_line(res)


def check_signature(sif: Path, policy: VerifyPolicy) -> Verdict:
    """Verify ``sif`` against the policy's allowed keys with ``apptainer verify``."""
    reasons: list[str] = []
    for key_file in policy.key_files:
        try:
            pub = Path(key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"verify.key_files: cannot read {key_file}: {exc.strerror}") from None
        res = _verify(["verify", "--json", "--key", str(key_file), str(sif)])
        if res.ok:
            return Verdict(True, pem_fingerprint(pub), "signature verified")
        reasons.append(_why_not(res))
    if policy.keys:
        res = _verify(["verify", "--json", "--local", str(sif)])
        if res.ok:
            fps = _fingerprints(res.stdout)
            allowed = set(policy.keys)
            if fps and fps <= allowed:
                return Verdict(True, "pgp:" + sorted(fps)[0], "signature verified")
            reasons.append("it is signed by a key that `verify:` does not allow ("
                           + ", ".join(sorted(fps)) + ")" if fps else "it is signed by an unknown key")
        else:
            reasons.append(_why_not(res))
    if not policy.keys and not policy.key_files:
        reasons.append("`verify:` names no allowed keys")
    # The most telling reason: altered beats wrong key beats unsigned.
    for needle in ("altered", "does not allow", "not signed"):
        for r in reasons:
            if needle in r:
                return Verdict(False, None, r)
    return Verdict(False, None, reasons[0] if reasons else "verification failed")


def _verify(argv: list[str]) -> process.Result:
    return process.run([_program(), *argv], env=_apptainer_env(), timeout=600)


def _fingerprints(stdout: str) -> set[str]:
    try:
        doc = json.loads(stdout[stdout.find("{"):])
    except ValueError:
        return set()
    out = set()
    for k in doc.get("SignerKeys") or ():
        fp = (k.get("Signer") or {}).get("Fingerprint")
        if fp:
            out.add(str(fp).replace(" ", "").upper())
    return out


def enforce(policy: VerifyPolicy, sif: Path, label: str, progress: Progress | None) -> Verdict | None:
    """Apply ``verify:`` to ``sif``: None when off; a Verdict (warned) under warn; SignatureRefused under require."""
    if policy.mode == "off":
        return None
    verdict = check_signature(sif, policy)
    if verdict.ok:
        return verdict
    if policy.mode == "require":
        raise SignatureRefused(f"image {label} refused: {verdict.reason} (verify: require in hpcexp.yaml)",
                               hint="push a build signed with an allowed key (`hpcexp push --sign`), or add its "
                                    "key to `verify: keys/key_files`")
    if progress is not None:
        progress("warn", f"image {label}: {verdict.reason} (verify: warn)")
    log.warning("image %s: %s", label, verdict.reason)
    return verdict


# --------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------

def push(project: Project, exp: Experiment, arch: str, info: Any, *, to: str | None = None, sign: bool = False,
         key_file: Path | None = None, progress: Progress | None = None) -> Pin:
    """Push ``info``, the current image of ``exp``/``arch`` (``image.current_image``, None when
    there is none), and pin it by digest in hpcexp.lock. The caller looks the image up: the
    image layer calls this one (to pull on demand), never the other way round."""
    target_ref(project, exp, arch, "0" * 64, to)   # a bad or missing registry fails before any work
    if info is None:
        raise NotFound(f"no current image of {exp.name} {arch} to push (its inputs changed or it was never built)",
                       hint=f"hpcexp build {exp.name}" + (f" --arch {arch}" if arch else ""))
    if key_file is not None and not sign:
        sign = True
    ref, insecure = target_ref(project, exp, arch, info.input_hash, to)
    label = f"{exp.name} {arch}"
    final = info.path
    signed_by = None
    side = store.read_sidecar(final) or {}
    if sign:
        final, signed_by = _sign_in_place(project, final, key_file, label, progress)
        side = store.read_sidecar(final) or {}
    elif side.get("signed_by"):
        signed_by = side["signed_by"]
    sha = side.get("sha256") or hashing.sha256_file(final)
    size = os.stat(final).st_size
    if progress is not None:
        progress("start", f"{label}: pushing to {redact(ref.uri())}")
    t0 = time.monotonic()
    _run_apptainer(push_argv(final, ref, insecure=insecure), what=f"push of {label} to {redact(ref.uri())}")
    manifest = Client(ref.host, insecure=insecure).manifest(ref)
    layer = manifest.sif_layer()
    # The tag may have moved between our push and our look-up (someone else pushed): the
    # manifest we pin must be the one whose layer is exactly our SIF.
    if layer is None or layer.get("digest") != f"sha256:{sha}":
        raise PinMismatch(f"after pushing {label}, {redact(ref.uri())} names another image "
                          f"(layer {layer.get('digest') if layer else 'none'}, ours sha256:{sha}); "
                          "someone pushed the same tag at the same time", hint="push again")
    pin = Pin(experiment=exp.name, arch=arch, input_hash=info.input_hash, sha256=sha,
              ref=ref.by_digest(manifest.digest).uri(), size=size, tag=ref.tag, signed_by=signed_by)
    update_lock(project, lambda lock: lock.images.__setitem__(pin.key, pin))
    with contextlib.suppress(HpcexpError, OSError):
        atomic.write_json(final.with_suffix(".json"), dict(side, pushed_as=pin.ref))
    if progress is not None:
        progress("done", f"{label}: pushed in {time.monotonic() - t0:.1f} s, pinned {pin.ref}")
    return pin


def _sign_in_place(project: Project, sif: Path, key_file: Path | None, label: str,
                   progress: Progress | None) -> tuple[Path, str | None]:
    """Sign the local image (a signed copy replaces it under its lock; its sidecar follows)."""

    lock = Lock(Layout(project).build_lock(sif), purpose=f"sign {sif.name}")
    with lock.hold(what=f"image {sif.name}"):
        side = store.read_sidecar(sif) or {}
        tmpdir = Path(atomic.tmp_name_for(sif.parent / "sign"))
        try:
            tmpdir.mkdir()
            work = tmpdir / sif.name
            shutil.copyfile(sif, work)
            argv = ["sign"]
            if key_file is not None:
                argv += ["--key", str(key_file)]
            if progress is not None:
                progress("step", f"{label}: signing" + (f" with {key_file}" if key_file else " (PGP keyring)"))
            _run_apptainer(argv + [str(work)], what=f"signing {label}", timeout=600)
            signer: str | None = None
            if key_file is not None:
                pub = _public_from_private(Path(key_file))
                signer = pem_fingerprint(pub) if pub else None
            else:
                res = _verify(["verify", "--json", "--local", str(work)])
                fps = _fingerprints(res.stdout)
                signer = "pgp:" + sorted(fps)[0] if fps else None
            sha = hashing.sha256_file(work)
            os.chmod(work, os.stat(sif).st_mode & 0o777)
            st = os.stat(work)
            new_side = dict(side, sha256=sha, size=st.st_size, sif_stat=[st.st_size, st.st_mtime_ns, st.st_ino],
                            signed_by=signer, unsigned_sha256=side.get("unsigned_sha256") or side.get("sha256"))
            atomic.write_json(sif.with_suffix(".json"), new_side)
            os.replace(work, sif)
            atomic.fsync_dir(sif.parent)
        except OSError as exc:
            raise atomic.storage_error(exc, sif) from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return sif, signer


# --------------------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------------------

def stale_pin_error(pin: Pin, current_hash: str) -> StalePin:
    name = pin.experiment
    return StalePin(
        f"{LOCK_NAME} pins {name} {pin.arch} at input hash {pin.input_hash[:16]} but its inputs now hash to "
        f"{current_hash[:16]} (the Dockerfile or its files changed since the push); refusing the stale pin",
        hint=f"build it here with `hpcexp build {name}` (or `hpcexp run --rebuild`), then `hpcexp push {name}` "
             f"to update the pin")


def pull(project: Project, exp: Experiment, arch: str, *, input_hash: str | None = None,
         current_hash: Callable[[], str] | None = None, progress: Progress | None = None,
         wait: bool = True) -> dict[str, Any]:
    """Pull the image hpcexp.lock pins for ``exp``/``arch`` (once, under the image's lock);
    returns its sidecar. A pin for other inputs than ``input_hash`` (or what
    ``current_hash()`` computes, while the download already runs) is refused."""
    pin = read_lock(project).pin(exp.name, arch)
    if pin is None:
        raise NotFound(f"{LOCK_NAME} pins no image of {exp.name} {arch}",
                       hint=f"push one with `hpcexp push {exp.name}` where it is built")
    if input_hash is not None and pin.input_hash != input_hash:
        raise stale_pin_error(pin, input_hash)

    def check() -> None:
        if current_hash is not None:
            now = current_hash()
            if now != pin.input_hash:
                raise stale_pin_error(pin, now)

    return pull_pin(project, pin, progress=progress, wait=wait, check=check)


def pull_pin(project: Project, pin: Pin, *, progress: Progress | None = None, wait: bool = True,
             reuse: bool = True, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Pull ``pin`` into the images folder (see the module docstring). ``check`` runs while
    the download does (computing the current input hash takes as long as a small pull);
    if it raises, the download is abandoned and nothing is kept."""
    import threading

    ref = parse_ref(pin.ref)
    insecure = insecure_for(project, ref.host)
    layout = Layout(project)
    final = layout.image(pin.experiment, pin.arch, pin.input_hash)
    label = f"{pin.experiment} {pin.arch}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        (final.parent / ".locks").mkdir(exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, final.parent) from exc
    lock = Lock(layout.build_lock(final), purpose=f"pull {final.name}")

    def on_wait(owner: Owner) -> None:
        if progress is not None:
            progress("wait", f"{label}: waiting for {owner.describe()} who is fetching it (lock {lock.path})")

    with lock.hold(wait=wait, on_wait=on_wait, what=f"image {final.name}"):
        if final.exists():   # only then is there something to reuse (checking it needs the image module)

            side = store.read_sidecar(final)
            if reuse and side is not None and side.get("sha256") == pin.sha256 and store.valid_sif(final, side):
                if check is not None:
                    check()
                side["_pulled"] = False
                return side
        tmp = atomic.tmp_name_for(final)
        if progress is not None:
            progress("start", f"{label}: pulling {redact(pin.ref)}")
        t0 = time.monotonic()
        cancel = threading.Event()
        box: dict[str, Any] = {}

        def download() -> None:
            try:
                box["sha"] = _fetch(project, ref, pin, tmp, insecure=insecure, cancel=cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc

        worker = threading.Thread(target=download, name="hpcexp-pull", daemon=True)
        try:
            worker.start()
            try:
                if check is not None:
                    check()
                while worker.is_alive():
                    worker.join(0.2)
            except BaseException:
                cancel.set()
                worker.join()
                raise
            if "error" in box:
                raise box["error"]
            sha = box["sha"]

            if sha != pin.sha256:
                raise PinMismatch(f"pulled {redact(pin.ref)} but its sha256 is {sha}, not {pin.sha256} as "
                                  f"{LOCK_NAME} pins; nothing was kept")
            verdict = enforce(project.verify, tmp, f"{label} ({redact(pin.ref)})", progress)
            st = os.stat(tmp)
            sidecar: dict[str, Any] = {
                "schema": store.SIDECAR_SCHEMA, "kind": "pulled", "path": str(final),
                "experiment": pin.experiment, "arch": pin.arch, "input_hash": pin.input_hash,
                "sha256": sha, "size": st.st_size, "sif_stat": [st.st_size, st.st_mtime_ns, st.st_ino],
                "pulled_from": pin.ref, "signed_by": pin.signed_by,
                "pulled_at": _now(), "pull_seconds": round(time.monotonic() - t0, 3),
            }
            if verdict is not None:
                sidecar["verified"] = {"sha256": sha, "policy": policy_digest(project.verify), "ok": verdict.ok,
                                       "signer": verdict.signer, "reason": verdict.reason}
            atomic.write_json(final.with_suffix(".json"), sidecar)
            os.replace(tmp, final)
            atomic.fsync_dir(final.parent)
        except OSError as exc:
            raise atomic.storage_error(exc, final) from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if progress is not None:
            progress("done", f"{label}: pulled in {time.monotonic() - t0:.1f} s")
        sidecar["_pulled"] = True
        return sidecar


def _fetch(project: Project, ref: Ref, pin: Pin, tmp: Path, *, insecure: bool, cancel: Any = None) -> str:
    """Download the pinned SIF to ``tmp``; its sha256.

    An ORAS SIF artifact is a manifest (fetched by the pinned digest, its bytes checked
    against it) whose one layer is the SIF itself, content-addressed by the SIF's sha256.
    That chain is checked link by link and the blob streamed straight into ``tmp``, hashed
    on the way in. Anything else at the pinned digest goes through ``apptainer pull``.
    """
    client = Client(ref.host, insecure=insecure)
    try:
        manifest = client.manifest(ref)
    except RegistryError:
        manifest = None   # let apptainer try: it may know a way in that we do not (and say why not)
    layer = manifest.sif_layer() if manifest is not None else None
    if manifest is not None and layer is not None:
        if layer.get("digest") != f"sha256:{pin.sha256}":
            raise PinMismatch(f"{redact(pin.ref)} holds SIF layer {layer.get('digest')}, not sha256:{pin.sha256} "
                              f"as {LOCK_NAME} pins; nothing was kept")
        sha, _ = client.fetch_blob(ref.repo, str(layer["digest"]), tmp, cancel=cancel)
        return sha
    _run_apptainer(pull_argv(tmp, ref, insecure=insecure), what=f"pull of {redact(pin.ref)}")
    return hashing.sha256_file(tmp)


def check_before_run(project: Project, image: Path, sidecar: dict[str, Any], label: str,
                     progress: Progress | None = None) -> bool:
    """Before running a pulled image: is it still what the lock pins, and does it satisfy
    ``verify:``? False means "pull it again" (the pin moved); SignatureRefused under require.

    The verification is cached in the sidecar by the SIF's sha256 and the policy, so an
    unchanged image is not verified again; the caller has just checked (``valid_sif``)
    that the SIF still is the bytes the sidecar names.
    """
    try:
        pin = read_lock(project).pin(str(sidecar.get("experiment")), str(sidecar.get("arch")))
    except HpcexpError:
        pin = None
    if pin is not None and pin.input_hash == sidecar.get("input_hash") and pin.sha256 != sidecar.get("sha256"):
        return False
    policy = project.verify
    if policy.mode == "off":
        return True
    cached = sidecar.get("verified") or {}
    digest = policy_digest(policy)
    if cached.get("sha256") == sidecar.get("sha256") and cached.get("policy") == digest and cached.get("ok"):
        return True
    verdict = enforce(policy, image, label, progress)
    if verdict is not None:
        with contextlib.suppress(HpcexpError, OSError):
            atomic.write_json(image.with_suffix(".json"), dict(
                sidecar, verified={"sha256": sidecar.get("sha256"), "policy": digest, "ok": verdict.ok,
                                   "signer": verdict.signer, "reason": verdict.reason}))
    return True


def pull_for_run(project: Project, exp: Experiment, arch: str, input_hash: str, *,
                 progress: Progress | None = None, wait: bool = True) -> dict[str, Any] | None:
    """The on-demand hook of run/submit: the image is not built here. Pull the pinned one
    for these inputs, refuse a stale pin, or return None (no pin: build as usual)."""
    pin = read_lock(project).pin(exp.name, arch)
    if pin is None:
        return None
    if pin.input_hash != input_hash:
        raise stale_pin_error(pin, input_hash)
    return pull_pin(project, pin, progress=progress, wait=wait)


# --------------------------------------------------------------------------------------
# Bases from a registry
# --------------------------------------------------------------------------------------

def pin_bases(project: Project, specs: Any, progress: Progress | None = None) -> bool:
    """Resolve every registry base among ``specs`` (the bases an image is built FROM) given by
    tag and not yet pinned to its digest, and record it in hpcexp.lock. True when a pin was
    added (the recipe changes)."""
    todo = []
    lock = read_lock(project)
    for spec in specs:
        if spec is None or spec.kind != "image" or not spec.image or "@" in spec.image \
                or not names_registry_host(spec.image):
            continue
        if spec.image in lock.bases:
            continue
        todo.append(spec.image)
    if not todo:
        return False
    resolved: dict[str, str] = {}
    for uri in sorted(set(todo)):
        ref = parse_ref(uri, what="base image")
        if ref.scheme == "docker" and not ref.tag:
            ref = replace(ref, tag="latest")
        manifest = Client(ref.host, insecure=insecure_for(project, ref.host)).manifest(ref)
        resolved[uri] = manifest.digest
        if progress is not None:
            progress("step", f"base {redact(uri)}: pinned {manifest.digest}")
    update_lock(project, lambda lk: lk.bases.update(resolved))
    return True


# --------------------------------------------------------------------------------------
# What `hpcexp images` shows
# --------------------------------------------------------------------------------------

def image_state(project: Project, path: Path, experiment: str, arch: str, input_hash: str | None) -> str:
    """pushed / pinned / signed / pulled state of one local image, for ``hpcexp images``."""

    side = store.read_sidecar(path) or {}
    try:
        pin = read_lock(project).pin(experiment, arch)
    except HpcexpError:
        pin = None
    words = []
    if side.get("kind") == "pulled":
        words.append("pulled")
    if pin is not None and pin.input_hash == input_hash:
        words.append("pinned" if pin.sha256 == side.get("sha256") else "differs-from-pin")
        if pin.signed_by and pin.sha256 == side.get("sha256"):
            words.append("signed")
    elif side.get("pushed_as"):
        words.append("pushed")
    if side.get("signed_by") and "signed" not in words:
        words.append("signed")
    return ",".join(words) or "-"


def pins_not_here(project: Project, present: set[tuple[str, str, str | None]]) -> list[Pin]:
    """Pins of hpcexp.lock with no local image (they would be pulled on demand)."""
    try:
        pins = read_lock(project).images.values()
    except HpcexpError:
        return []
    return [p for p in sorted(pins, key=lambda p: p.key) if (p.experiment, p.arch, p.input_hash) not in present]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
