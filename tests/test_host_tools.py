"""Host tools Apptainer runs (debootstrap, fakeroot, newuidmap, squashfuse) are found where
distributions install them, not only on the user's PATH: an ordinary Debian user's PATH has
no sbin folder, and Debian installs debootstrap in /usr/sbin."""

from __future__ import annotations

import getpass
import os
import shutil
import sys
from pathlib import Path

import pytest

from hpcexp.app import doctor
from hpcexp.build import bases, identity, image
from hpcexp.convert import recipe
from hpcexp.core.config import load_project
from hpcexp.errors import EnvironmentProblem
from hpcexp.infra import process
from hpcexp.runtime import apptainer
from tests.buildfakes import convert_fake

FAKES = Path(__file__).parent / "buildfakes"


def _exe(folder: Path, name: str, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /usr/sbin: the only folder hpcexp searches beyond PATH in these tests."""
    folder = tmp_path / "sbin"
    folder.mkdir()
    monkeypatch.setattr(process, "HOST_TOOL_DIRS", (str(folder),))
    return folder


@pytest.fixture
def user_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ordinary user's PATH: one bin folder of ours plus python's, no sbin."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.path.dirname(sys.executable)}")
    return folder


# --- the lookup ------------------------------------------------------------------------

def test_tool_only_in_sbin_is_found_there(sbin: Path, user_path: Path) -> None:
    tool = _exe(sbin, "debootstrap")
    assert process.which("debootstrap") is None  # not on the user's PATH...
    assert process.find_host_tool("debootstrap") == str(tool)  # ...but found where Debian puts it


def test_path_wins_over_sbin(sbin: Path, user_path: Path) -> None:
    _exe(sbin, "debootstrap")
    own = _exe(user_path, "debootstrap")
    assert process.find_host_tool("debootstrap") == str(own)


def test_env_argument_is_the_path_searched_first(sbin: Path, tmp_path: Path) -> None:
    other = _exe(tmp_path / "other", "debootstrap")
    _exe(sbin, "debootstrap")
    assert process.find_host_tool("debootstrap", {"PATH": str(other.parent)}) == str(other)


def test_missing_or_not_executable_tool_is_not_found(sbin: Path, user_path: Path) -> None:
    (sbin / "debootstrap").write_text("#!/bin/sh\n")  # not executable
    (sbin / "debootstrap").chmod(0o644)
    assert process.find_host_tool("debootstrap") is None
    assert process.find_host_tool("no-such-tool-anywhere") is None


def test_default_folders_are_the_distributions_admin_folders() -> None:
    dirs = process.HOST_TOOL_DIRS
    assert {"/usr/local/sbin", "/usr/sbin", "/sbin"} <= set(dirs)
    assert dirs.index("/usr/local/sbin") < dirs.index("/usr/sbin") < dirs.index("/sbin")


@pytest.mark.parametrize("path, expected", [
    ("/home/u/bin:/usr/bin:/bin", "/home/u/bin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin"),
    ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
     "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("/opt/x:/opt/x::/usr/bin", "/opt/x:/opt/x::/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin:/bin"),
    ("", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    (None, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
])
def test_host_tool_path_appends_what_is_missing_and_keeps_the_users_path_first(path: str | None,
                                                                               expected: str) -> None:
    assert process.host_tool_path(path) == expected
    assert process.host_tool_path(expected) == expected  # idempotent


# --- doctor ----------------------------------------------------------------------------

def test_doctor_debootstrap_ok_when_only_in_sbin(sbin: Path, user_path: Path) -> None:
    tool = _exe(sbin, "debootstrap")
    check = doctor.check_debootstrap()
    assert check.status == doctor.OK and check.detail.startswith(str(tool))
    assert "not on your PATH" in check.detail


def test_doctor_debootstrap_on_path_is_plain_ok(sbin: Path, user_path: Path) -> None:
    tool = _exe(user_path, "debootstrap")
    check = doctor.check_debootstrap()
    assert (check.status, check.detail) == (doctor.OK, str(tool))


def test_doctor_debootstrap_missing_fails_naming_where_it_looked(sbin: Path, user_path: Path) -> None:
    check = doctor.check_debootstrap()
    assert check.status == doctor.FAIL and str(sbin) in check.detail and "debootstrap" in (check.fix or "")


def test_doctor_reports_debootstrap_for_a_project_using_it(tmp_path: Path, sbin: Path, user_path: Path) -> None:
    _exe(sbin, "debootstrap")
    root = tmp_path / "p"
    (root / "experiments" / "py").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text('cache: .cache\nbases:\n  "debian:12": {debootstrap: bookworm}\n')
    (root / "experiments" / "py" / "Dockerfile").write_text("FROM debian:12\n")
    checks = {c.name: c for c in doctor.run_checks(load_project(root))}
    assert checks["debootstrap"].status == doctor.OK


def test_doctor_fakeroot_warns_without_newuidmap(tmp_path: Path, sbin: Path, user_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    user = getpass.getuser()
    for name in ("subuid", "subgid"):
        (tmp_path / name).write_text(f"{user}:100000:65536\n")
    monkeypatch.setenv("HPCEXP_SUBUID_FILE", str(tmp_path / "subuid"))
    monkeypatch.setenv("HPCEXP_SUBGID_FILE", str(tmp_path / "subgid"))
    check = doctor.check_fakeroot()
    assert check.status == doctor.WARN and "newuidmap and newgidmap" in check.detail and "uidmap" in check.fix
    _exe(sbin, "newuidmap")
    _exe(sbin, "newgidmap")
    assert doctor.check_fakeroot().status == doctor.OK


def test_fakeroot_command_in_sbin_counts(tmp_path: Path, sbin: Path, user_path: Path) -> None:
    empty = tmp_path / "subuid"
    empty.write_text("")
    assert apptainer.fakeroot_mode(empty) == "none"
    _exe(sbin, "fakeroot")
    assert apptainer.fakeroot_mode(empty) == "fakeroot-command"


# --- build -----------------------------------------------------------------------------

@pytest.fixture
def deb_project(tmp_path: Path, user_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose base is built with debootstrap; a fake apptainer that records its PATH."""
    seen = tmp_path / "apptainer-path.txt"
    fake = FAKES / "fake_apptainer"
    _exe(user_path, "apptainer",
         f'#!/bin/sh\n[ "$1" = build ] && printf "%s\\n" "$PATH" >> "{seen}"\nexec "{fake}" "$@"\n')
    subuid = tmp_path / "subuid"
    subuid.write_text(f"{getpass.getuser()}:100000:65536\n")
    monkeypatch.setenv("HPCEXP_SUBUID_FILE", str(subuid))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(recipe, "convert", convert_fake.convert)
    monkeypatch.setattr(identity, "_caches", {})
    apptainer._detect_cached.cache_clear()
    root = tmp_path / "deb"
    (root / "experiments" / "py").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text("cache: .cache\ndebian_mirror: http://mirror.invalid/debian\n"
                                      'bases:\n  "debian:12": {debootstrap: bookworm}\n')
    (root / "experiments" / "py" / "Dockerfile").write_text("FROM debian:12\nRUN true\n")
    return root


def test_build_finds_debootstrap_in_sbin_and_hands_apptainer_that_path(deb_project: Path, sbin: Path,
                                                                       user_path: Path, tmp_path: Path) -> None:
    _exe(sbin, "debootstrap")
    user = os.environ["PATH"]
    assert shutil.which("debootstrap", path=user) is None
    project = load_project(deb_project)
    image.ensure_image(project, project.experiment("py"), "amd64")
    assert image.valid_sif(bases.base_sif_path(project, project.bases["debian:12"]))
    seen = (tmp_path / "apptainer-path.txt").read_text().splitlines()
    assert len(seen) >= 2  # at least the base's build and the image's
    # Apptainer's PATH is the user's, then the sbin folder: the user's own tools still win.
    assert set(seen) == {f"{user}{os.pathsep}{sbin}"}, seen


def test_build_without_debootstrap_anywhere_says_what_to_do(deb_project: Path, sbin: Path,
                                                            tmp_path: Path) -> None:
    project = load_project(deb_project)
    with pytest.raises(EnvironmentProblem) as ei:
        image.ensure_image(project, project.experiment("py"), "amd64")
    assert ei.value.exit_code == 3 and "debootstrap" in ei.value.message and str(sbin) in ei.value.message
    assert "sif" in (ei.value.hint or "").lower()
    assert not (tmp_path / "apptainer-path.txt").exists()  # nothing was built
