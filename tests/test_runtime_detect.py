"""Which container runtime is on PATH, judged by what its ``--version`` says (reliability case 12):
an ``apptainer`` that is really an old Singularity is refused, a broken ``apptainer`` is
reported as broken (not replaced by the ``singularity`` link beside it), and a ``singularity``
that is Apptainer is judged as Apptainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcexp.app import doctor
from hpcexp.errors import EnvironmentProblem
from hpcexp.runtime import apptainer


def _shim(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + body + "\n")
    (folder / name).chmod(0o755)


@pytest.fixture
def path_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def use(*shims: tuple[str, str]) -> Path:
        d = tmp_path / "bin"
        for name, body in shims:
            _shim(d, name, body)
        monkeypatch.setenv("PATH", str(d))
        apptainer._detect_cached.cache_clear()
        return d
    yield use
    apptainer._detect_cached.cache_clear()


def test_an_apptainer_that_is_an_old_singularity_is_refused(path_of) -> None:
    d = path_of(("apptainer", 'echo "singularity version 3.5.0"'))
    inst = apptainer.detect()
    assert inst is not None and inst.kind == "singularity" and not inst.supports_unprivileged_build
    with pytest.raises(EnvironmentProblem) as err:
        apptainer.require()
    assert str(err.value) == (f"singularity >= 3.9.0 required for rootless builds, found apptainer "
                              f"(singularity 3.5.0) at {d}/apptainer")
    check = doctor.check_apptainer()
    assert check.failed_required and "too old" in check.detail


def test_a_broken_apptainer_is_reported_not_replaced_by_singularity(path_of) -> None:
    d = path_of(("apptainer", "echo 'cannot execute' >&2; exit 127"),
                ("singularity", 'echo "apptainer version 1.4.5"'))
    assert apptainer.detect() is None
    with pytest.raises(EnvironmentProblem) as err:
        apptainer.require()
    text = str(err.value)
    assert text.startswith(f"apptainer does not work: `{d}/apptainer --version` failed")
    assert "127" in text or "cannot execute" in text
    assert "1.4.5" not in text and "\n" not in text
    check = doctor.check_apptainer()
    assert check.failed_required and "does not work" in check.detail


def test_an_apptainer_printing_no_version_is_reported(path_of) -> None:
    path_of(("apptainer", "echo hello"))
    with pytest.raises(EnvironmentProblem, match="printed no version"):
        apptainer.require()


def test_a_singularity_link_to_apptainer_is_judged_as_apptainer(path_of) -> None:
    path_of(("singularity", 'echo "apptainer version 1.4.5-1"'))
    inst = apptainer.require()
    assert (inst.program, inst.kind, inst.version_tuple) == ("singularity", "apptainer", (1, 4, 5))
    assert inst.label == "singularity (apptainer 1.4.5-1)"


def test_singularity_ce_new_enough_is_accepted_and_old_refused(path_of) -> None:
    path_of(("singularity", 'echo "singularity-ce version 3.11.4"'))
    assert apptainer.require().kind == "singularity"
    path_of(("singularity", 'echo "singularity-ce version 3.8.7"'))
    with pytest.raises(EnvironmentProblem, match=r"singularity >= 3\.9\.0 required"):
        apptainer.require()


def test_nothing_on_path_says_not_found(path_of) -> None:
    path_of()
    with pytest.raises(EnvironmentProblem, match="not found on PATH"):
        apptainer.require()
