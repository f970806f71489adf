"""hpcexp.yaml's parse is kept in the user's cache and reused while the file's text is
identical (hpcexp.infra.yamlload): the same data and line table, without importing yaml;
any doubt parses again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcexp.errors import ConfigError
from hpcexp.infra import yamlload
from tests.conftest import REPO

TEXT = 'experiments:\n  hello:\n    params: {lr: "0.1", seed: 3}\n    args: [--x, "1"]\nenv: {A: b}\n'


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "hpcexp" / "parsed"


def test_a_kept_parse_is_the_same_data_and_lines(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text(TEXT)
    first = yamlload.load_yaml(f)
    kept = list(cache.iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text())["text"] == TEXT
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    second = yamlload.load_yaml(f)
    assert second == first
    assert first[1]["experiments.hello.params.seed"] == 3 and first[0]["experiments"]["hello"]["params"]["seed"] == 3


def test_the_second_process_does_not_import_yaml(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text(TEXT)
    code = ("import sys, json\nfrom hpcexp.infra.yamlload import load_yaml\n"
            "data, lines = load_yaml(sys.argv[1])\nprint(json.dumps([data, lines, 'yaml' in sys.modules]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(cache.parents[1]))
    outs = [json.loads(subprocess.run([sys.executable, "-c", code, str(f)], env=env, capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert outs[0][2] is True and outs[1][2] is False
    assert outs[0][:2] == outs[1][:2]


@pytest.mark.parametrize("edit", ["value", "comment", "whitespace"])
def test_any_change_of_the_text_parses_again(tmp_path: Path, cache: Path, edit: str) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text(TEXT)
    yamlload.load_yaml(f)
    new = {"value": TEXT.replace("seed: 3", "seed: 4"), "comment": "# c\n" + TEXT, "whitespace": TEXT + "\n"}[edit]
    f.write_text(new)
    data, lines = yamlload.load_yaml(f)
    assert data["experiments"]["hello"]["params"]["seed"] == (4 if edit == "value" else 3)
    assert lines["env"] == (6 if edit == "comment" else 5)
    assert json.loads(next(cache.iterdir()).read_text())["text"] == new


def test_a_kept_parse_others_could_write_is_not_trusted(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text(TEXT)
    yamlload.load_yaml(f)
    kept = next(cache.iterdir())
    doc = json.loads(kept.read_text())
    doc["data"]["env"] = {"A": "planted"}
    kept.write_text(json.dumps(doc))
    assert yamlload.load_yaml(f)[0]["env"] == {"A": "planted"}, "the test's plant must be what a load would use"
    for target in (kept, cache):
        kept.write_text(json.dumps(doc))
        target.chmod(target.stat().st_mode | 0o022)
        assert yamlload.load_yaml(f)[0]["env"] == {"A": "b"}, target
        target.chmod(target.stat().st_mode & ~0o022)


@pytest.mark.parametrize("damage", ["not json", "other path", "format"])
def test_a_damaged_or_foreign_cache_file_parses_again(tmp_path: Path, cache: Path, damage: str) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text(TEXT)
    expected = yamlload.load_yaml(f)
    kept = next(cache.iterdir())
    doc = json.loads(kept.read_text())
    doc["data"] = {"env": {"A": "wrong"}}
    if damage == "not json":
        kept.write_text("{")
    elif damage == "other path":
        kept.write_text(json.dumps(dict(doc, path=str(tmp_path / "other.yaml"))))
    else:
        kept.write_text(json.dumps(dict(doc, format=99)))
    assert yamlload.load_yaml(f) == expected


def test_data_json_cannot_hold_exactly_is_not_kept(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "sweep.yaml"
    f.write_text("when: 2024-01-01\n1: numeric key\n")
    data, _ = yamlload.load_yaml(f)
    assert 1 in data and str(data["when"]) == "2024-01-01"
    assert not cache.exists() or not list(cache.iterdir())
    assert yamlload.load_yaml(f)[0] == data


def test_invalid_yaml_is_an_error_every_time_and_nothing_is_kept(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "hpcexp.yaml"
    f.write_text("a: &x 1\nb: *x\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match="anchors are not allowed"):
            yamlload.load_yaml(f)
    assert not cache.exists() or not list(cache.iterdir())


def test_old_parses_are_forgotten(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamlload, "KEEP_PARSED", 2)
    for i in range(6):
        f = tmp_path / f"p{i}.yaml"
        f.write_text(f"n: {i}\n")
        yamlload.load_yaml(f)
        assert len(list(cache.iterdir())) <= 4
    names = {json.loads(p.read_text())["path"] for p in cache.iterdir()}
    assert str(tmp_path / "p5.yaml") in names
