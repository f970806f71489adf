"""Signatures: ``verify:`` policies checked with ``apptainer verify``, and signing before a push.

A PGP key is named by its fingerprint, a PEM key by ``pem-sha256:`` of its DER bytes, so
the lock can say who signed an image without holding the key."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpcexp.build import store
from hpcexp.build.oras import apptainer_env, fatal_line, program, run_apptainer
from hpcexp.core.config import Project, VerifyPolicy
from hpcexp.core.layout import Layout
from hpcexp.errors import SignatureRefused, UsageError
from hpcexp.infra import atomic, hashing, process
from hpcexp.infra.lock import Lock

log = logging.getLogger(__name__)

Progress = Callable[[str, str], None]


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
    return fatal_line(res)


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
    return process.run([program(), *argv], env=apptainer_env(), timeout=600)


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


def sign_in_place(project: Project, sif: Path, key_file: Path | None, label: str,
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
            run_apptainer(argv + [str(work)], what=f"signing {label}", timeout=600)
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
            store.publish(work, sif, new_side)
        except OSError as exc:
            raise atomic.storage_error(exc, sif) from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return sif, signer
