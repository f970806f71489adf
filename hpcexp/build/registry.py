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

import contextlib
import datetime as _dt
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from hpcexp.build import store

# The pieces, re-exported: callers and tests use ``registry.NAME`` as one face.
from hpcexp.build.lockfile import (  # noqa: F401
    LOCK_FORMAT,
    LOCK_NAME,
    LockFile,
    Pin,
    base_pin,
    lock_path,
    parse_lock,
    pinned_base_uri,
    read_lock,
    stale_pin_error,
    update_lock,
)
from hpcexp.build.ociclient import (  # noqa: F401
    HTTP_TIMEOUT,
    MANIFEST_TYPES,
    SIF_LAYER,
    Client,
    Manifest,
    _pipe,
    _WriteError,
    credentials,
)
from hpcexp.build.oras import CRED_ENV, TRANSFER_TIMEOUT, pull_argv, push_argv, run_apptainer  # noqa: F401
from hpcexp.build.refs import (  # noqa: F401
    DIGEST_RE,
    REPO_COMPONENT,
    TAG_RE,
    Ref,
    image_tag,
    insecure_for,
    names_registry_host,
    parse_ref,
    redact,
    repo_name,
    target_ref,
)
from hpcexp.build.signing import (  # noqa: F401
    Verdict,
    check_signature,
    enforce,
    pem_fingerprint,
    policy_digest,
    sign_in_place,
)
from hpcexp.core.config import Experiment, Project
from hpcexp.core.layout import Layout
from hpcexp.errors import HpcexpError, NotFound, PinMismatch, RegistryError, SignatureRefused, StalePin  # noqa: F401
from hpcexp.infra import atomic, hashing
from hpcexp.infra.lock import Lock, Owner

log = logging.getLogger(__name__)

Progress = Callable[[str, str], None]


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
        final, signed_by = sign_in_place(project, final, key_file, label, progress)
        side = store.read_sidecar(final) or {}
    elif side.get("signed_by"):
        signed_by = side["signed_by"]
    sha = side.get("sha256") or hashing.sha256_file(final)
    size = os.stat(final).st_size
    if progress is not None:
        progress("start", f"{label}: pushing to {redact(ref.uri())}")
    t0 = time.monotonic()
    run_apptainer(push_argv(final, ref, insecure=insecure), what=f"push of {label} to {redact(ref.uri())}")
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


# --------------------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------------------

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
            store.publish(tmp, final, sidecar)
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
    run_apptainer(pull_argv(tmp, ref, insecure=insecure), what=f"pull of {redact(pin.ref)}")
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
