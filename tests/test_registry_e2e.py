"""Images that travel, end to end: a real OCI registry (Debian's docker-registry, TLS from
the provisioned test CA) on 127.0.0.1, the real Apptainer, the ordinary user, the CLI.

Every project here is a tiny busybox experiment; the registry is started per module with
temporary storage and stopped after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import registry_server
from conftest import REQUIRED, assert_clean_error, run_cli

pytestmark = pytest.mark.e2e

RUN_SH = 'echo "hello from $HPCEXP_EXPERIMENT"; echo ok > "$HPCEXP_RESULTS/out.txt"\n'
DOCKERFILE = 'FROM busybox:latest\nCOPY run.sh /opt/run.sh\nENTRYPOINT ["sh", "/opt/run.sh"]\n'


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_server.Registry]:
    why = registry_server.missing()
    if why:
        pytest.fail(why, pytrace=False) if REQUIRED else pytest.skip(why)
    with registry_server.running(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_project(root: Path, busybox_sif: Path, registry: registry_server.Registry, *, extra_yaml: str = "",
                 namespace: str = "lab") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "hpcexp.yaml").write_text(
        f"registry: {registry.url(namespace)}\n"
        "bases:\n"
        f"  \"busybox:latest\": {{sif: {json.dumps(str(busybox_sif))}}}\n" + extra_yaml)
    d = root / "experiments" / "hello"
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(DOCKERFILE)
    (d / "run.sh").write_text(RUN_SH)
    return root


def clone(src: Path, dst: Path) -> Path:
    """What a colleague's checkout has: the committed files (hpcexp.lock included), no images, no runs."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("images", "runs"))
    return dst


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def lock(root: Path) -> dict:
    return json.loads((root / "hpcexp.lock").read_text())


def the_pin(root: Path) -> dict:
    pins = lock(root)["images"]
    assert list(pins) == ["hello/amd64"] or list(pins) == ["hello/arm64"], pins
    return next(iter(pins.values()))


def images(root: Path) -> list[Path]:
    return sorted((root / "images").glob("hello-*.sif")) if (root / "images").is_dir() else []


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs" / "hello").glob("*/run.json"))]


def manifest_digest(registry: registry_server.Registry, repo: str, reference: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"https://{registry.host}/v2/{repo}/manifests/{reference}", method="HEAD",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with opener.open(req, timeout=10) as resp:
        return resp.headers["Docker-Content-Digest"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, busybox_sif: Path,
           registry: registry_server.Registry) -> Path:
    """Project A: built here and pushed; its hpcexp.lock pins the image."""
    root = make_project(tmp_path_factory.mktemp("proj") / "a", busybox_sif, registry)
    ok(run_cli("build", "hello", cwd=root))
    push = ok(run_cli("push", "hello", cwd=root))
    assert "@sha256:" in push.stdout
    return root


def test_round_trip_build_push_delete_run_pulls_by_digest(pushed: Path, registry: registry_server.Registry) -> None:
    root = pushed
    pin = the_pin(root)
    (built,) = images(root)
    assert pin["sha256"] == sha256(built)
    assert pin["ref"].startswith(f"oras://{registry.host}/lab/hello@sha256:")
    assert pin["tag"] == f"{pin['arch']}-{pin['input_hash'][:16]}"
    # the pin names the manifest the registry serves for the pushed tag, and it is by digest
    assert pin["ref"].rpartition("@")[2] == manifest_digest(registry, "lab/hello", pin["tag"])
    # the lock is deterministic text: no host, user or time in it
    text = (root / "hpcexp.lock").read_text()
    assert os.uname().nodename not in text and "pushed_at" not in text

    listed = json.loads(ok(run_cli("images", "--json", cwd=root)).stdout)
    assert [e["registry"] for e in listed] == ["pinned"]

    for p in (root / "images").glob("hello-*"):
        p.unlink()
    gone = json.loads(ok(run_cli("images", "--json", cwd=root)).stdout)
    assert [(e["state"], e["registry"], e["ref"]) for e in gone] == [("not here", "pinned", pin["ref"])]
    shutil.rmtree(root / "images" / ".logs", ignore_errors=True)
    run = ok(run_cli("run", "hello", cwd=root))
    assert "pulling" in run.stderr and "building" not in run.stderr, run.stderr
    assert not list((root / "images" / ".logs").glob("*")) if (root / "images" / ".logs").exists() else True
    (pulled,) = images(root)
    assert sha256(pulled) == pin["sha256"]
    side = json.loads(pulled.with_suffix(".json").read_text())
    assert side["kind"] == "pulled" and side["pulled_from"] == pin["ref"]
    rec = records(root)[-1]
    assert rec["state"] == "succeeded"
    assert rec["image_ref"] == pin["ref"]
    assert rec["image_sha256"] == pin["sha256"]
    assert rec["input_hash"] == pin["input_hash"]

    listed = json.loads(ok(run_cli("images", "--json", cwd=root)).stdout)
    assert [(e["state"], e["registry"]) for e in listed] == [("current", "pulled,pinned")]
    # a second run uses the pulled image: no pull again
    again = ok(run_cli("run", "hello", cwd=root))
    assert "pulling" not in again.stderr


def test_second_project_runs_the_pin_without_building_and_refuses_a_stale_pin(
        pushed: Path, tmp_path: Path) -> None:
    b = clone(pushed, tmp_path / "colleague")
    pin = the_pin(b)
    run = ok(run_cli("run", "hello", cwd=b))
    assert "pulling" in run.stderr and "building" not in run.stderr, run.stderr
    assert not (b / "images" / ".logs").exists() or not list((b / "images" / ".logs").iterdir())
    (img,) = images(b)
    assert sha256(img) == pin["sha256"]
    assert records(b)[-1]["image_ref"] == pin["ref"]

    # The Dockerfile changes: the pin is for other inputs. Refused, nothing built, nothing run.
    c = clone(pushed, tmp_path / "changed")
    df = c / "experiments" / "hello" / "Dockerfile"
    df.write_text(df.read_text() + "ENV CHANGED=1\n")
    stale = run_cli("run", "hello", cwd=c)
    assert_clean_error(stale, 2, "hpcexp.lock pins hello", pin["input_hash"][:16], "hpcexp build hello",
                       "hpcexp push hello")
    assert not images(c) and not (c / "runs" / "hello").exists()
    pull = run_cli("pull", "hello", cwd=c)   # the download starts while the inputs are hashed: abandoned
    assert_clean_error(pull, 2, pin["input_hash"][:16], "hpcexp build hello")
    assert not images(c)
    assert not [p for p in (c / "images").rglob("*") if p.name.startswith(".hpcexp-tmp-") or p.suffix == ".lock"]


def test_a_moved_tag_does_not_change_what_hpcexp_pulls(pushed: Path, tmp_path: Path, busybox_sif: Path,
                                                       registry: registry_server.Registry) -> None:
    pin = the_pin(pushed)
    # Someone pushes another image under the same tag.
    moved = subprocess.run(["apptainer", "push", str(busybox_sif),
                            f"oras://{registry.host}/lab/hello:{pin['tag']}"], capture_output=True, text=True)
    assert moved.returncode == 0, moved.stderr
    assert manifest_digest(registry, "lab/hello", pin["tag"]) != pin["ref"].rpartition("@")[2]
    b = clone(pushed, tmp_path / "after-move")
    got = ok(run_cli("pull", "hello", cwd=b))
    assert "pulled" in got.stdout
    (img,) = images(b)
    assert sha256(img) == pin["sha256"] != sha256(busybox_sif)
    ok(run_cli("run", "hello", cwd=b))
    # put the tag back for the other tests' benefit (they pull by digest anyway)
    (built,) = images(pushed) or [None]
    if built is not None:
        subprocess.run(["apptainer", "push", str(built), f"oras://{registry.host}/lab/hello:{pin['tag']}"],
                       capture_output=True)


def test_ten_concurrent_runs_pull_once_and_never_show_a_partial_sif(pushed: Path, tmp_path: Path) -> None:
    b = clone(pushed, tmp_path / "ten")
    pin = the_pin(b)
    final = b / "images" / f"hello-{pin['arch']}-{pin['input_hash'][:16]}.sif"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "hpcexp", "run", "hello"], cwd=b, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    seen_sizes = set()
    while any(p.poll() is None for p in procs):
        try:
            seen_sizes.add(os.stat(final).st_size)
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out, err)
    pullers = [err for _, err in outs if "pulling" in err]
    assert len(pullers) == 1, [e for _, e in outs]
    assert seen_sizes <= {pin["size"]}, seen_sizes
    assert sha256(final) == pin["sha256"]
    recs = records(b)
    assert len(recs) == 10 and all(r["state"] == "succeeded" and r["image_ref"] == pin["ref"] for r in recs)
    leftovers = [p.name for p in (b / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]
    assert not leftovers, leftovers


# --------------------------------------------------------------------------------------
# Signatures and verify:
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEM key pairs made non-interactively: 'good' (allowed by verify:) and 'other'."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("good", "other"):
        priv, pub = d / f"{name}.pem", d / f"{name}.pub"
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", str(priv)], check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)
        out[name], out[f"{name}_pub"] = priv, pub
    return out


def der_fingerprint(pub: Path) -> str:
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(pub), "-outform", "DER"], check=True,
                         capture_output=True).stdout
    return "pem-sha256:" + hashlib.sha256(der).hexdigest()


def require_yaml(keys: dict[str, Path]) -> str:
    return f"verify: {{mode: require, key_files: [{json.dumps(str(keys['good_pub']))}]}}\n"


def _flip_byte_in_filesystem(sif: Path) -> None:
    """Alter one byte inside the image's squashfs partition (the data the signature covers)."""
    listing = subprocess.run(["apptainer", "sif", "list", str(sif)], capture_output=True, text=True, check=True)
    line = next(ln for ln in listing.stdout.splitlines() if "|FS" in ln)
    start, end = (int(x) for x in line.split("|")[3].strip().split("-"))
    with open(sif, "r+b") as f:
        f.seek((start + end) // 2)
        b = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def _republish_local(root: Path) -> None:
    """Make the local sidecar describe the (altered) SIF again, as if it had been built so."""
    (img,) = images(root)
    side_path = img.with_suffix(".json")
    side = json.loads(side_path.read_text())
    st = img.stat()
    side.update(sha256=sha256(img), size=st.st_size, sif_stat=[st.st_size, st.st_mtime_ns, st.st_ino])
    side_path.write_text(json.dumps(side))


def test_signed_push_passes_verify_require_and_is_verified_once(
        tmp_path: Path, busybox_sif: Path, registry: registry_server.Registry, keys: dict[str, Path]) -> None:
    a = make_project(tmp_path / "signer", busybox_sif, registry, extra_yaml=require_yaml(keys), namespace="signed")
    ok(run_cli("build", "hello", cwd=a))
    push = ok(run_cli("push", "hello", "--key", str(keys["good"]), cwd=a))
    assert "(signed)" in push.stdout
    pin = the_pin(a)
    assert pin["signed_by"] == der_fingerprint(keys["good_pub"])
    (local,) = images(a)
    assert sha256(local) == pin["sha256"]   # the local image is the signed bytes that were pushed
    assert subprocess.run(["apptainer", "verify", "--key", str(keys["good_pub"]), str(local)],
                          capture_output=True).returncode == 0

    b = clone(a, tmp_path / "runner")
    ok(run_cli("run", "hello", cwd=b))
    (img,) = images(b)
    side = json.loads(img.with_suffix(".json").read_text())
    assert side["verified"]["ok"] is True and side["verified"]["sha256"] == pin["sha256"]
    assert side["verified"]["signer"] == pin["signed_by"]
    assert records(b)[-1]["state"] == "succeeded"
    ok(run_cli("run", "hello", cwd=b))
    assert len(records(b)) == 2


@pytest.mark.parametrize("case", ["unsigned", "other-key", "altered"])
def test_verify_require_refuses_and_does_not_run(case: str, tmp_path: Path, busybox_sif: Path,
                                                 registry: registry_server.Registry, keys: dict[str, Path]) -> None:
    a = make_project(tmp_path / "pusher", busybox_sif, registry, namespace=case.replace("-", ""))
    ok(run_cli("build", "hello", cwd=a))
    if case == "unsigned":
        ok(run_cli("push", "hello", cwd=a))
        reason = "it is not signed"
    elif case == "other-key":
        ok(run_cli("push", "hello", "--key", str(keys["other"]), cwd=a))
        reason = "signed by a key that `verify:` does not allow"
    else:
        ok(run_cli("push", "hello", "--key", str(keys["good"]), cwd=a))   # signed with the allowed key...
        (img,) = images(a)
        _flip_byte_in_filesystem(img)                                        # ...then its bytes change
        _republish_local(a)
        ok(run_cli("push", "hello", cwd=a))
        reason = "altered after signing"
    b = clone(a, tmp_path / "runner")
    (b / "hpcexp.yaml").write_text((b / "hpcexp.yaml").read_text() + require_yaml(keys))
    res = run_cli("run", "hello", cwd=b)
    assert_clean_error(res, 1, "image hello", "refused", reason)
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("hpcexp: error:")]) == 1
    assert not images(b), "a refused image must not be published"
    assert not (b / "runs" / "hello").exists() or not records(b), "a refused image must not run"
    leftovers = [p.name for p in (b / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]
    assert not leftovers


def test_verify_applies_before_every_run_of_a_pulled_image(
        pushed: Path, tmp_path: Path, keys: dict[str, Path]) -> None:
    """An unsigned image pulled under `verify: off` runs; once the policy is `warn` it runs with a
    warning, and under `require` the same bytes are refused before the run (no new pull)."""
    b = clone(pushed, tmp_path / "policy")
    ok(run_cli("run", "hello", cwd=b))
    base_yaml = (b / "hpcexp.yaml").read_text()
    good = json.dumps(str(keys["good_pub"]))
    (b / "hpcexp.yaml").write_text(base_yaml + f"verify: {{mode: warn, key_files: [{good}]}}\n")
    warned = ok(run_cli("run", "hello", cwd=b))
    assert "not signed" in warned.stderr and "pulling" not in warned.stderr
    (b / "hpcexp.yaml").write_text(base_yaml + require_yaml(keys))
    refused = run_cli("run", "hello", cwd=b)
    assert_clean_error(refused, 1, "refused", "not signed")
    assert "pulling" not in refused.stderr
    assert len(records(b)) == 2


# --------------------------------------------------------------------------------------
# FROM bases from a site registry
# --------------------------------------------------------------------------------------

def _push_oci_base(busybox_rootfs: Path, work: Path, ref: str, version: str) -> None:
    """An OCI image made from the busybox root file system with umoci, copied into the registry with skopeo."""
    layout = work / f"oci-{version}"
    bundle = work / f"bundle-{version}"
    for argv in (["umoci", "init", "--layout", str(layout)],
                 ["umoci", "new", "--image", f"{layout}:base"],
                 ["umoci", "unpack", "--rootless", "--image", f"{layout}:base", str(bundle)]):
        subprocess.run(argv, check=True, capture_output=True)
    shutil.copytree(busybox_rootfs, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    (bundle / "rootfs" / "etc" / "base-version").write_text(version + "\n")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:base", str(bundle)], check=True, capture_output=True)
    res = subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}:base", ref], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_from_mapped_to_the_site_registry_builds_and_the_recipe_names_its_digest(
        tmp_path: Path, busybox_rootfs: Path, registry: registry_server.Registry) -> None:
    for tool in ("umoci", "skopeo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing (scripts/provision-test-env)") if REQUIRED else pytest.skip(tool)
    tagged = f"docker://{registry.host}/mirror/busybox:1.36"
    _push_oci_base(busybox_rootfs, tmp_path, tagged, "1")
    digest_v1 = manifest_digest(registry, "mirror/busybox", "1.36")
    root = tmp_path / "proj"
    d = root / "experiments" / "hello"
    d.mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f"bases:\n  \"busybox:latest\": {{image: \"{tagged}\"}}\n")
    (d / "Dockerfile").write_text('FROM busybox:latest\nENTRYPOINT ["cat", "/etc/base-version"]\n')
    ok(run_cli("build", "hello", cwd=root))
    recipe = next((root / "recipes").glob("hello.*.def")).read_text()
    assert f"From: {registry.host}/mirror/busybox@{digest_v1}" in recipe, recipe
    assert lock(root)["bases"] == {tagged: digest_v1}
    (img,) = images(root)
    side = json.loads(img.with_suffix(".json").read_text())
    assert side["bases"] == [{"ref": "busybox:latest", "digest": f"docker://{registry.host}/mirror/busybox@{digest_v1}"}]
    assert ok(run_cli("run", "hello", cwd=root)).stdout.strip().endswith("1")

    # The tag moves to another base: a rebuild (here and in a fresh checkout) still uses the pinned digest.
    _push_oci_base(busybox_rootfs, tmp_path, tagged, "2")
    assert manifest_digest(registry, "mirror/busybox", "1.36") != digest_v1
    fresh = clone(root, tmp_path / "fresh")
    ok(run_cli("build", "hello", "--force", cwd=fresh))
    assert f"@{digest_v1}" in next((fresh / "recipes").glob("hello.*.def")).read_text()
    assert ok(run_cli("run", "hello", cwd=fresh)).stdout.strip().endswith("1")
    # `hpcexp convert --check` agrees: the committed recipe is current with the pin
    ok(run_cli("convert", "--all", "--check", cwd=fresh))


def test_doctor_checks_the_registry_answers(pushed: Path, tmp_path: Path) -> None:
    good = ok(run_cli("doctor", cwd=pushed))
    line = next(ln for ln in good.stdout.splitlines() if "registry" in ln)
    assert "answers" in line and "anonymously" in line, good.stdout
    # a registry nobody runs: doctor says so on its registry line (with a hint), and does not crash
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "hpcexp.yaml").write_text(f"registry: oras://127.0.0.1:{port}/lab\n")
    bad = run_cli("doctor", cwd=dead)
    assert "Traceback" not in bad.stderr + bad.stdout
    line = next(ln for ln in bad.stdout.splitlines() if "registry" in ln)
    assert "does not answer" in line, bad.stdout


@pytest.mark.slurm
def test_submit_pulls_the_pinned_image_on_the_login_node_and_the_job_runs_it(pushed: Path, tmp_path: Path) -> None:
    b = clone(pushed, tmp_path / "cluster")
    pin = the_pin(b)
    res = ok(run_cli("submit", "hello", "--sweep", "n=1,2", "--wait", cwd=b, timeout=600))
    assert "pulling" in res.stderr, res.stderr
    (img,) = images(b)
    assert sha256(img) == pin["sha256"]
    recs = records(b)
    assert len(recs) == 2 and all(r["state"] == "succeeded" and r["image_ref"] == pin["ref"] for r in recs), recs


def test_a_pulled_sif_that_does_not_match_the_locks_sha256_is_not_kept(pushed: Path, tmp_path: Path) -> None:
    b = clone(pushed, tmp_path / "forged")
    doc = lock(b)
    entry = next(iter(doc["images"].values()))
    entry["sha256"] = "0" * 64
    (b / "hpcexp.lock").write_text(json.dumps(doc))
    res = run_cli("run", "hello", cwd=b)
    assert_clean_error(res, 1, "0" * 64, "hpcexp.lock pins", "nothing was kept")
    assert not images(b) and not (b / "runs" / "hello").exists()
    assert not [p for p in (b / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]


def test_registry_down_is_one_clear_line(pushed: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = clone(pushed, tmp_path / "offline")
    text = (b / "hpcexp.lock").read_text()
    host = the_pin(b)["ref"].split("/")[2]
    (b / "hpcexp.lock").write_text(text.replace(host, f"127.0.0.1:{port}"))
    res = run_cli("run", "hello", cwd=b)
    assert_clean_error(res, 3, "pull of oras://127.0.0.1:", "failed")
    assert not images(b)


def test_pgp_signed_push_and_fingerprint_policy(tmp_path: Path, busybox_sif: Path,
                                                registry: registry_server.Registry) -> None:
    """The keyring path: `push --sign` with Apptainer's PGP keyring, `verify: keys: [FINGERPRINT]`."""
    keysdir = tmp_path / "keyring"
    keysdir.mkdir()
    env = {"APPTAINER_KEYSDIR": str(keysdir)}
    made = subprocess.run(["apptainer", "key", "newpair", "--name", "lab signer", "--email", "signer@example.invalid",
                           "--comment", "test", "--password", "", "--push=false"], capture_output=True, text=True,
                          env=dict(os.environ, **env), stdin=subprocess.DEVNULL, timeout=120)
    assert made.returncode == 0, made.stderr
    listing = subprocess.run(["apptainer", "key", "list"], capture_output=True, text=True, env=dict(os.environ, **env))
    import re

    fp = re.search(r"Fingerprint:\s*([0-9A-Fa-f]{40})", listing.stdout).group(1).upper()
    a = make_project(tmp_path / "pgp", busybox_sif, registry, namespace="pgp",
                     extra_yaml=f"verify: {{mode: require, keys: [{fp}]}}\n")
    ok(run_cli("build", "hello", cwd=a))
    ok(run_cli("push", "hello", "--sign", cwd=a, env=env))
    assert the_pin(a)["signed_by"] == f"pgp:{fp}"
    b = clone(a, tmp_path / "pgp-runner")
    ok(run_cli("run", "hello", cwd=b, env=env))
    c = clone(a, tmp_path / "pgp-other")
    (c / "hpcexp.yaml").write_text((c / "hpcexp.yaml").read_text().replace(fp, "F" * 40))
    assert_clean_error(run_cli("run", "hello", cwd=c, env=env), 1, "refused", "does not allow")
    assert not images(c)


def test_plain_http_registry_on_loopback_with_insecure_true(tmp_path: Path, busybox_sif: Path) -> None:
    """`registry: {url: ..., insecure: true}` (Apptainer's --no-https), accepted for 127.0.0.1 only."""
    with registry_server.running(tmp_path, tls=False) as plain:
        a = tmp_path / "plain"
        make_project(a, busybox_sif, plain)
        (a / "hpcexp.yaml").write_text((a / "hpcexp.yaml").read_text().replace(
            f"registry: {plain.url()}", f"registry: {{url: '{plain.url()}', insecure: true}}"))
        ok(run_cli("build", "hello", cwd=a))
        ok(run_cli("push", "hello", cwd=a))
        b = clone(a, tmp_path / "plain-runner")
        ok(run_cli("run", "hello", cwd=b))
        assert sha256(images(b)[0]) == the_pin(b)["sha256"]


def test_bench_registry_script_runs(registry: registry_server.Registry) -> None:
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_registry.py"
    proc = subprocess.run([sys.executable, str(bench), "--rounds", "1", "--mb", "4"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "median of wall-time ratios" in proc.stdout and "median of CPU-time ratios" in proc.stdout
