"""Stand-in bases (hpcexp.build.standins) and the host's network settings in builds (hpcexp.build.hostnet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcexp.build import bases, hostnet, standins
from hpcexp.build.bases import base_resolver
from hpcexp.convert.recipe import convert
from hpcexp.core.config import load_project


@pytest.mark.parametrize(("ref", "suite", "python", "differs"), [
    ("python:3.11", "bookworm", "3.11", ["buildpack-deps"]),
    ("python:3.11-slim", "bookworm", "3.11", []),
    ("python:3.11-slim-bookworm", "bookworm", "3.11", []),
    ("arm64v8/python:3.11-slim", "bookworm", "3.11", []),
    ("library/python:3.9-slim", "bullseye", "3.9", []),
    ("python:3.13-slim", "trixie", "3.13", []),
    ("python:3-slim", "trixie", "3.13", ["newest Python 3 release"]),
    ("python:latest", "trixie", "3.13", ["newest Python release", "buildpack-deps"]),
    ("python", "trixie", "3.13", ["newest Python release", "buildpack-deps"]),
    ("python:slim", "trixie", "3.13", ["newest Python release"]),
    ("python:3.12-slim", "trixie", "3.13", ["Python 3.13 (Debian trixie's python3) instead of 3.12"]),
    ("python:3.10-slim", "bookworm", "3.11", ["Python 3.11 (Debian bookworm's python3) instead of 3.10"]),
    ("python:3.12-slim-bookworm", "bookworm", "3.11", ["Python 3.11 (Debian bookworm's python3) instead of 3.12"]),
    ("python:3-bullseye", "bullseye", "3.9", ["newest Python 3 release", "buildpack-deps"]),
    ("python:3.11.4-slim", "bookworm", "3.11", ["not exactly 3.11.4"]),
    ("python:3.12-alpine", "trixie", "3.13", ["instead of Alpine", "instead of 3.12"]),
    ("python:3.11-slim@sha256:" + "a" * 64, "bookworm", "3.11", ["digest"]),
])
def test_python_stand_ins(ref: str, suite: str, python: str, differs: list[str]) -> None:
    found = standins.stand_in(ref)
    assert found is not None
    assert found.family == "python" and found.spec.suite == suite and found.spec.contract == "python"
    assert found.summary == f"Debian {suite} with Python {python}"
    assert {"python3", "python3-pip", "python3-venv", "ca-certificates"} <= set(found.spec.include)
    text = " | ".join(found.differences)
    for needle in differs:
        assert needle in text, (needle, text)
    if "buildpack-deps" not in differs:
        assert "buildpack-deps" not in text
    if not any("instead of 3." in d for d in differs):
        assert "instead of 3." not in text


@pytest.mark.parametrize(("ref", "suite", "differs"), [
    ("debian:bookworm", "bookworm", None), ("debian:12", "bookworm", None),
    ("debian:bookworm-slim", "bookworm", None), ("debian:12.5", "bookworm", "12.5"),
    ("debian:trixie", "trixie", None), ("debian:13-slim", "trixie", None), ("debian:bullseye", "bullseye", None),
    ("debian:11", "bullseye", None), ("debian:stable", "stable", None), ("debian:latest", "stable", None),
    ("debian", "stable", None), ("debian:sid", "sid", None),
    ("debian:bookworm-20240101-slim", "bookworm", "20240101"),
])
def test_debian_stand_ins(ref: str, suite: str, differs: str | None) -> None:
    found = standins.stand_in(ref)
    assert found is not None and found.family == "debian" and found.spec.suite == suite
    assert found.spec.contract is None and found.spec.include == ()
    if differs is None:
        assert found.differences == ()
    else:
        assert any(differs in d for d in found.differences)


@pytest.mark.parametrize("ref", ["nvidia/cuda:12.4.1-runtime-ubuntu22.04", "ubuntu:22.04", "busybox",
                                 "myregistry.site/python:3.11", "localhost:5000/python:3.11",
                                 "someone/python:3.11", "debian:99", "debian:experimental-thing"])
def test_no_stand_in(ref: str) -> None:
    assert standins.stand_in(ref) is None


def test_mapping_hint_names_the_exact_reference() -> None:
    hint = standins.mapping_hint("nvidia/cuda:12.4.1-runtime-ubuntu22.04")
    assert '`bases: {"nvidia/cuda:12.4.1-runtime-ubuntu22.04": {sif: /path/to/base.sif}}`' in hint
    assert "\n" not in hint


def test_one_base_per_suite_whatever_the_tag() -> None:
    names = {bases.base_sif_name(standins.stand_in(r).spec)  # type: ignore[union-attr]
             for r in ("python:3.11", "python:3.11-slim", "python:3.11-slim-bookworm", "python:3.10")}
    assert len(names) == 1 and next(iter(names)).startswith("python-bookworm-")


def test_python_base_recipe_keeps_the_contract() -> None:
    spec = standins.stand_in("python:3-slim").spec  # type: ignore[union-attr]
    text = bases.debootstrap_recipe(spec, "http://mirror.invalid/debian")
    assert "OSVersion: trixie" in text and "Include: ca-certificates python3 python3-pip python3-venv" in text
    assert "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED" in text
    for name in ("python", "pip", "pip3"):
        assert name in text
    assert "PIP_BREAK_SYSTEM_PACKAGES" not in text  # the marker is removed, no variable leaks into runs


def _project(tmp_path: Path, yaml: str, dockerfile: str) -> Path:
    (tmp_path / "hpcexp.yaml").write_text(yaml)
    (tmp_path / "experiments" / "tool").mkdir(parents=True)
    (tmp_path / "experiments" / "tool" / "Dockerfile").write_text(dockerfile)
    return tmp_path


def test_unmapped_python_converts_to_stand_in_with_report_notes(tmp_path: Path) -> None:
    root = _project(tmp_path, "{}\n", 'FROM python:3.12-slim\nRUN pip install x\nENTRYPOINT ["x"]\n')
    project = load_project(root)
    exp = project.experiment("tool")
    conv = convert(exp.dockerfile("amd64"), context=exp.path, resolve_base=base_resolver(project, exp))
    spec = standins.stand_in("python:3.12-slim").spec  # type: ignore[union-attr]
    assert f"From: @hpcexp-cache/bases/{bases.base_sif_name(spec)}" in conv.recipe
    report = json.loads(json.dumps(conv.report("tool.amd64.def")))
    from_notes = [n for n in report["notes"] if n["construct"] == "FROM python:3.12-slim"]
    assert any("stand-in" in n["reason"] and n["action"] == "translated" for n in from_notes)
    assert any("Python 3.13 (Debian trixie's python3) instead of 3.12" in n["reason"]
               and n["action"] == "approximated" for n in from_notes)


def test_bases_entry_and_switch_win_over_stand_in(tmp_path: Path) -> None:
    root = _project(tmp_path, 'bases:\n  "python:3.11-slim": {image: "docker://mirror.invalid/python:3.11-slim"}\n',
                    "FROM python:3.11-slim\n")
    project = load_project(root)
    spec = bases.spec_for(project.experiment("tool"), project, "python:3.11-slim")
    assert spec is not None and spec.kind == "image"
    (root / "hpcexp.yaml").write_text("build: {stand_ins: false}\n")
    project = load_project(root)
    assert bases.spec_for(project.experiment("tool"), project, "python:3.11-slim") is None
    assert project.host_network is True


def test_build_config_is_validated(tmp_path: Path) -> None:
    from hpcexp.errors import ConfigError
    root = _project(tmp_path, "build: {host_network: 'no'}\n", "FROM debian:12\n")
    with pytest.raises(ConfigError, match=r"hpcexp.yaml:1: build.host_network: must be true or false"):
        load_project(root)
    (root / "hpcexp.yaml").write_text("build: {colour: red}\n")
    with pytest.raises(ConfigError, match=r"build.colour: unknown key 'colour'"):
        load_project(root)


# --------------------------------------------------------------------------------------
# hostnet
# --------------------------------------------------------------------------------------

SECRET_ENV = {"HTTPS_PROXY": "http://user:s3cr%40t@127.0.0.1:9", "http_proxy": "http://bob:hunter22@127.0.0.1:9",
              "NO_PROXY": "localhost"}


def test_redact_proxy_passwords() -> None:
    secrets = hostnet.proxy_secrets(SECRET_ENV)
    assert "s3cr%40t" in secrets and "s3cr@t" in secrets and "hunter22" in secrets
    line = "Collecting x via http://user:s3cr%40t@127.0.0.1:9 (decoded s3cr@t) and https://bob:hunter22@h/"
    out = hostnet.redact(line, secrets)
    assert "s3cr" not in out and "hunter22" not in out
    assert "http://user:***@127.0.0.1:9" in out and "https://bob:***@h/" in out
    assert hostnet.redact("no secret at http://example.invalid/x") == "no secret at http://example.invalid/x"


def test_find_ca_bundle_order(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.pem", "b.pem", "c.pem"))
    for p in (a, b, c):
        p.write_text("x")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\ncert = {c}\n")
    env = {"HOME": str(tmp_path), "REQUESTS_CA_BUNDLE": str(b), "SSL_CERT_FILE": str(tmp_path / "missing")}
    assert hostnet.find_ca_bundle(env, [conf]) == (b, "REQUESTS_CA_BUNDLE")
    assert hostnet.find_ca_bundle({"HOME": str(tmp_path)}, [conf]) == (c, f"pip config {conf}")
    env = {"HOME": str(tmp_path), "SSL_CERT_FILE": str(a), "PIP_CERT": str(b)}
    assert hostnet.find_ca_bundle(env, [conf]) == (a, "SSL_CERT_FILE")


def test_prepare_binds_a_copy_and_sets_variables(tmp_path: Path) -> None:
    ca = tmp_path / "site-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = dict(SECRET_ENV, SSL_CERT_FILE=str(ca), HOME=str(tmp_path), PIP_CONFIG_FILE="/dev/null")
    net = hostnet.prepare(tmp_path / "host", True, env)
    assert (tmp_path / "host" / "ca-certificates.crt").read_text() == ca.read_text()
    assert 'Acquire::https::CAInfo "/.hpcexp-host/ca-certificates.crt";' in (tmp_path / "host" / "apt.conf").read_text()
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                "CONDA_SSL_VERIFY", "GIT_SSL_CAINFO"):
        assert net.env["APPTAINERENV_" + var] == "/.hpcexp-host/ca-certificates.crt"
    assert net.env["APPTAINERENV_APT_CONFIG"] == "/.hpcexp-host/apt.conf"
    assert net.bind_argv() == ["--bind", f"{tmp_path / 'host'}:/.hpcexp-host:ro"]
    built = net.apply(env)
    assert built["HTTPS_PROXY"] == SECRET_ENV["HTTPS_PROXY"]  # Apptainer hands it to %post itself
    described = json.dumps(net.describe())
    assert "s3cr" not in described and "hunter22" not in described and "HTTPS_PROXY" in described
    off = hostnet.prepare(tmp_path / "off", False, env)
    assert off.folder is None and off.env == {} and off.bind_argv() == []
    stripped = off.apply(env)
    assert not any(k.lower().endswith("_proxy") for k in stripped)
    assert not (tmp_path / "off").exists()


def test_inject_mount_point_in_every_stage() -> None:
    recipe = ("# header\nBootstrap: docker\nFrom: a\n\n%post\n    true\n\nBootstrap: localimage\nFrom: b\n\n"
              "%setup\n    echo hi\n\n%runscript\n    exec x\n")
    out = hostnet.inject_mount_point(recipe)
    assert out.startswith("# header\nBootstrap: docker\n")
    stages = out.split("Bootstrap:")[1:]
    assert len(stages) == 2
    for st in stages:
        assert st.count("%setup") == 1 and hostnet.BIND_DEST in st
    assert "%setup\n" + hostnet.SETUP_LINE + "\n    echo hi" in stages[1]


@pytest.mark.parametrize(("line", "tls"), [
    ("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed'", True),
    ("curl: (60) SSL certificate problem: self-signed certificate in certificate chain", True),
    ("E: Method https has died unexpectedly! server certificate verification failed", True),
    ("ERROR: No matching distribution found for nothing-here", False),
])
def test_tls_failure_detection(line: str, tls: bool) -> None:
    assert hostnet.tls_failure(line) is tls


def test_failure_hints_name_the_switch() -> None:
    off = hostnet.failure_hint(hostnet.BuildNetwork(enabled=False))
    assert "--no-host-network" in off and "host_network" in off and "\n" not in off
    on = hostnet.failure_hint(hostnet.BuildNetwork(enabled=True, ca_bundle=Path("/x.pem"), ca_source="SSL_CERT_FILE"))
    assert "/x.pem" in on and "SSL_CERT_FILE" in on


def test_build_announces_stand_ins_and_how_to_map_other_images(tmp_path: Path) -> None:
    from hpcexp.build import image
    root = _project(tmp_path, "{}\n", "FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS gpu\nFROM debian:12.5\n"
                                      "COPY --from=gpu /etc/hostname /x\n")
    project = load_project(root)
    exp = project.experiment("tool")
    prep = image.prepare(project, exp, "amd64", write=False)
    said: list[tuple[str, str]] = []
    image._announce_bases(project, exp, "amd64", prep, lambda kind, text: said.append((kind, text)))
    assert [k for k, _ in said] == ["note", "note"]
    assert said[0][1] == standins.mapping_hint("nvidia/cuda:12.4.1-runtime-ubuntu22.04")
    assert "FROM debian:12.5: no `bases:` entry, so hpcexp builds a stand-in: Debian bookworm (minbase); " \
           "1 difference(s)" in said[1][1]
    assert "Bootstrap: docker\nFrom: nvidia/cuda:12.4.1-runtime-ubuntu22.04" in prep.conversion.recipe


def test_doctor_probes_package_indexes(tmp_path: Path) -> None:
    import http.server
    import socket
    import threading

    from hpcexp.app import doctor

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    try:
        up = f"http://127.0.0.1:{server.server_address[1]}/"
        checks = doctor.check_package_indexes(None, timeout=3, urls=[("pip index", up),
                                                                     ("Debian mirror", f"http://u:pw123@127.0.0.1:{dead}/")])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    by_name = {c.name: c for c in checks}
    assert by_name["build CA bundle"].detail.startswith(("build steps get the host's CA bundle", "no CA bundle"))
    assert by_name["build network: pip index"].status == doctor.OK
    mirror = by_name["build network: Debian mirror"]
    assert mirror.status == doctor.WARN and "not reachable" in mirror.detail and "pw123" not in mirror.detail
