"""Real research Dockerfiles build with no `bases:` entry, through the real Apptainer, behind
this network's TLS-inspecting proxy.

Stand-in bases are built once: `python:3-slim` (trixie) into one cache folder shared by
this session's tests and cold at its start; `python:3.11` and `python:3.11-slim` (one
bookworm base for both tags) in the user's default cache, where the example experiment's
`FROM python:3.11-slim` (tests/test_example_e2e.py) builds the same base.
"""

from __future__ import annotations

import glob
import json
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOOL = "cowsay"            # a tiny pure-Python tool from PyPI with `--version`
TOOL_VERSION = "6.1"
SECRET = "s3cretPa55"


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One base cache for the whole session: stand-ins are built once, from cold."""
    return tmp_path_factory.mktemp("hpcexp-standin-cache")


@pytest.fixture
def dead_proxy_env() -> dict[str, str]:
    """A proxy URL with a password at a port where nothing listens; NO_PROXY=* keeps the
    clients from using it, so it only has to stay out of every file hpcexp writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:{SECRET}@127.0.0.1:{port}"
    return {"HTTPS_PROXY": url, "https_proxy": url, "NO_PROXY": "*", "no_proxy": "*"}


def _project(root: Path, cache: Path | None, experiments: dict[str, dict[str, str]], extra_yaml: str = "") -> Path:
    """A project; ``cache`` None keeps the user's default cache folder."""
    root.mkdir()
    (root / "hpcexp.yaml").write_text((f"cache: {cache}\n" if cache else "{}\n") + extra_yaml)
    for name, files in experiments.items():
        d = root / "experiments" / name
        d.mkdir(parents=True)
        for rel, text in files.items():
            (d / rel).write_text(text)
    return root


def _image(project: Path, name: str) -> Path:
    (sif,) = glob.glob(str(project / "images" / f"{name}-amd64-*.sif"))
    return Path(sif)


def _exec(image: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apptainer", "exec", "--containall", str(image), *cmd], capture_output=True,
                          text=True, timeout=120)


def _written_files(project: Path) -> list[Path]:
    return [p for p in project.rglob("*") if p.is_file() and p.suffix != ".sif"]


def _assert_image_carries_no_host_network(image: Path) -> None:
    proc = _exec(image, "sh", "-c", "ls -A /.hpcexp-host; env; cat /.singularity.d/env/*.sh")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0:1] != ["ca-certificates.crt"], proc.stdout
    for needle in ("/.hpcexp-host/", "PROXY=", "proxy=", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT",
                   "NODE_EXTRA_CA_CERTS", "APT_CONFIG", SECRET):
        assert needle not in proc.stdout, (needle, proc.stdout)


def test_three_line_dockerfile_builds_from_cold_cache_and_runs(tmp_path: Path, standin_cache: Path) -> None:
    assert not any(standin_cache.iterdir()), "the cache must be cold for this test"
    project = _project(tmp_path / "p", standin_cache, {"tool": {"Dockerfile": (
        "FROM python:3-slim\n"
        f"RUN pip install --no-cache-dir {TOOL}\n"
        f'ENTRYPOINT ["{TOOL}"]\n')}})
    proc = run_cli("build", "tool", cwd=project, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hpcexp: note: FROM python:3-slim: no `bases:` entry, so hpcexp builds a stand-in: Debian trixie " \
           "with Python 3.13" in proc.stderr
    assert list((standin_cache / "bases").glob("*/python-trixie-*.sif")), "the stand-in lives in the cache"

    report = json.loads((project / "recipes" / "tool.amd64.report.json").read_text())
    reasons = [n["reason"] for n in report["notes"] if n["construct"] == "FROM python:3-slim"]
    assert any("stand-in" in r for r in reasons) and any("Python 3.13" in r for r in reasons), reasons

    proc = run_cli("run", "tool", "--", "--version", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert TOOL_VERSION in proc.stdout.split()

    image = _image(project, "tool")
    for cmd in (["python", "--version"], ["python3", "--version"], ["pip", "--version"], ["pip3", "--version"]):
        got = _exec(image, *cmd)
        assert got.returncode == 0 and "3.13" in got.stdout + got.stderr, (cmd, got.stdout, got.stderr)
    assert _exec(image, "sh", "-c", "ls /usr/lib/python3*/EXTERNALLY-MANAGED").returncode != 0
    _assert_image_carries_no_host_network(image)


def test_requirements_and_cmd_on_python_311(tmp_path: Path, dead_proxy_env: dict[str, str]) -> None:
    project = _project(tmp_path / "p", None, {"train": {
        "Dockerfile": (
            "FROM python:3.11\n"
            "WORKDIR /app\n"
            "COPY requirements.txt .\n"
            "RUN pip install --upgrade pip && pip install --no-cache-dir -r requirements.txt\n"
            'RUN echo "building behind $HTTPS_PROXY"\n'
            "COPY train.py .\n"
            'CMD ["python", "train.py"]\n'),
        "requirements.txt": "six==1.16.0\nidna\npackaging\n",
        "train.py": ("import sys, six, idna, packaging\n"
                     "print('trained with', six.__version__, 'on python', '%d.%d' % sys.version_info[:2])\n"),
    }})
    proc = run_cli("build", "train", cwd=project, env=dead_proxy_env, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "stand-in: Debian bookworm with Python 3.11" in out
    proc2 = run_cli("run", "train", cwd=project, env=dead_proxy_env)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert "trained with 1.16.0 on python 3.11" in proc2.stdout
    image = _image(project, "train")
    pip = _exec(image, "pip", "--version")
    assert "/usr/local/lib/python3.11" in pip.stdout, "pip --upgrade replaced Debian's pip: " + pip.stdout

    # The proxy's password is nowhere hpcexp wrote: recipe, report, build log, sidecar, run record.
    logs = list((project / "images" / ".logs").glob("train-*.log"))
    assert logs and "building behind http://user:***@127.0.0.1:" in logs[0].read_text()
    for f in _written_files(project):
        assert SECRET not in f.read_text(errors="replace"), f
    assert SECRET not in out + proc2.stdout + proc2.stderr
    _assert_image_carries_no_host_network(image)


def test_apt_get_in_python_311_slim(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", None, {"apt": {"Dockerfile": (
        "FROM python:3.11-slim\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends tree && rm -rf /var/lib/apt/lists/*\n"
        'CMD ["tree", "--version"]\n')}})
    proc = run_cli("build", "apt", cwd=project, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("run", "apt", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tree v" in proc.stdout


def _tls_is_inspected(tmp_path: Path) -> bool:
    """Whether TLS to pip's index fails with Debian's stock CA list (what an image without
    the host's CA bundle trusts), i.e. this network inspects TLS with a site CA."""
    import ssl
    import urllib.error
    import urllib.request

    stock = sorted(Path("/usr/share/ca-certificates/mozilla").glob("*.crt"))
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        return False
    if not stock:
        return False
    bundle = tmp_path / "stock-ca.pem"
    bundle.write_text("\n".join(p.read_text() for p in stock))
    ctx = ssl.create_default_context(cafile=str(bundle))
    try:
        urllib.request.urlopen(PyPI.simple_url, timeout=15, context=ctx).close()  # noqa: S310
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ssl.SSLCertVerificationError)
    return False


def test_without_host_network_a_build_fails_with_one_hint(tmp_path: Path, standin_cache: Path) -> None:
    if not _tls_is_inspected(tmp_path):
        pytest.skip("this network does not inspect TLS: a build without the host's CA bundle would succeed")
    project = _project(tmp_path / "p", standin_cache, {"fig": {"Dockerfile": (
        "FROM python:3-slim\nRUN pip install --no-cache-dir --retries 0 pyfiglet\n")}})
    proc = run_cli("build", "fig", "--no-host-network", cwd=project, timeout=1500)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    hints = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcexp: hint:")]
    assert len(hints) == 1, proc.stderr
    assert "could not verify a TLS certificate" in hints[0] and "--no-host-network" in hints[0], hints
    log = next((project / "images" / ".logs").glob("fig-*.log")).read_text()
    assert "# host network: off" in log

    # The same through the config key.
    (project / "hpcexp.yaml").write_text(f"cache: {standin_cache}\nbuild: {{host_network: false}}\n")
    proc = run_cli("build", "fig", cwd=project, timeout=1500)
    assert proc.returncode == 4 and "host_network" in proc.stderr, proc.stderr
