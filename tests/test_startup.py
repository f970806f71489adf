"""Start-up: what `hpcexp --help` and `hpcexp list --json` import (benchmarked in
bench/bench_startup.py), and the two shortcuts that keep them cheap stay exact: the help
page's command table and logging configured when something first imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from hpcexp.cli import main as cli_main
from tests.conftest import REPO


def _imports(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpcexp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    mods = [ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    return proc, mods


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    e.pop("HPCEXP_PROJECT", None)
    return e


def test_list_json_imports_no_stage_it_does_not_need(tmp_path: Path, env: dict[str, str]) -> None:
    init = subprocess.run([sys.executable, "-m", "hpcexp", "init", str(tmp_path / "p")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    first, mods = _imports(["list", "--json"], tmp_path / "p", env)
    assert first.returncode == 0, first.stderr
    assert "yaml" in mods, "the first load parses hpcexp.yaml"
    second, mods = _imports(["list", "--json"], tmp_path / "p", env)
    assert second.returncode == 0 and json.loads(second.stdout) == json.loads(first.stdout)
    assert [e["name"] for e in json.loads(second.stdout)] == ["hello"]
    for heavy in ("yaml", "logging", "hashlib", "spython", "hpcexp.convert", "hpcexp.build.image",
                  "hpcexp.execute", "hpcexp.runtime", "subprocess"):
        assert not [m for m in mods if m == heavy or m.startswith(heavy + ".")], heavy


def test_help_imports_no_command_module(tmp_path: Path, env: dict[str, str]) -> None:
    proc, mods = _imports(["--help"], tmp_path, env)
    assert proc.returncode == 0 and "Commands:" in proc.stdout
    for name in cli_main.COMMANDS:
        assert f"  {name} " in proc.stdout
    loaded = [m for m in mods if m.startswith("hpcexp.cli.") and m not in ("hpcexp.cli.main", "hpcexp.cli.common")]
    assert not loaded, loaded
    assert "logging" not in mods


def test_the_help_table_says_what_each_command_says() -> None:
    """SHORT_HELP saves `--help` importing every command; it must not drift from them."""
    for name in cli_main.COMMANDS:
        cmd = cli_main.LazyGroup._load(name)
        assert cmd is not None, name
        if name in cli_main.SHORT_HELP:
            assert cli_main.SHORT_HELP[name] == cmd.get_short_help_str(10_000), name
    assert set(cli_main.SHORT_HELP) <= set(cli_main.COMMANDS)


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_the_help_page_is_the_one_click_would_print(width: int) -> None:
    """Same rows and truncation as click's own Group.format_commands, which imports each command."""
    ctx = click.Context(cli_main.cli, info_name="hpcexp")
    ours = click.HelpFormatter(width=width)
    cli_main.cli.format_commands(ctx, ours)
    theirs = click.HelpFormatter(width=width)
    click.Group.format_commands(cli_main.cli, ctx, theirs)
    assert ours.getvalue() == theirs.getvalue()


LOGGING_CHILD = """
import sys
from hpcexp.cli import main
assert "logging" not in sys.modules
main._configure_logging_on_import(30)
import logging
logging.getLogger("hpcexp.demo").warning("disk nearly full")
logging.getLogger("hpcexp.demo").info("not shown at WARNING")
"""


def test_logging_configured_when_first_imported_speaks_as_before(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", LOGGING_CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "hpcexp: WARNING: hpcexp.demo: disk nearly full\n"


def test_verbose_configures_logging_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    proc, mods = _imports(["-v", "list", "--json"], tmp_path, env)  # no project here: an error, after logging
    assert proc.returncode != 0 and "hpcexp: error:" in proc.stderr
    assert "logging" in mods


QUICK_EXIT_CHILD = """
import atexit, sys, threading, time
from hpcexp.cli import main
atexit.register(lambda: sys.stderr.write("atexit ran\\n"))
sys.stdout.write("buffered, not flushed")
mode = sys.argv[1]
if mode == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), sys.stderr.write("thread finished\\n"))).start()
main._quick_exit({"zero": 0, "none": None, "code": 5, "text": "went wrong", "thread": 3}[mode])
"""


@pytest.mark.parametrize("mode, status", [("zero", 0), ("none", 0), ("code", 5), ("text", 1), ("thread", 3)])
def test_the_quick_exit_keeps_what_an_ordinary_exit_does(mode: str, status: int, env: dict[str, str]) -> None:
    """`hpcexp` skips the interpreter's teardown (start-up benchmark), never its effects: exit
    status, atexit handlers, buffered output; with another thread alive it exits as usual."""
    proc = subprocess.run([sys.executable, "-c", QUICK_EXIT_CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == status
    assert proc.stdout == "buffered, not flushed"
    assert "atexit ran" in proc.stderr
    assert ("went wrong" in proc.stderr) == (mode == "text")
    assert ("thread finished" in proc.stderr) == (mode == "thread")


def test_a_closed_pipe_is_no_error(tmp_path: Path, env: dict[str, str]) -> None:
    init = subprocess.run([sys.executable, "-m", "hpcexp", "init", str(tmp_path / "p")], env=env,
                          capture_output=True, timeout=60)
    assert init.returncode == 0
    proc = subprocess.run(f"{sys.executable} -m hpcexp --help | head -c 5", shell=True, cwd=tmp_path / "p", env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout == "Usage" and "Traceback" not in proc.stderr and "Exception" not in proc.stderr
