"""Property-based: arbitrary bytes and shapes as run.json, hpcexp.yaml, a Dockerfile and a
sweep file never raise anything but hpcexp's own one-line errors, and never hang.

"Never a traceback" at the CLI edge means: the library raises only ``HpcexpError`` (which
``hpcexp.cli.main`` prints as one line) and nothing else (which it would report as an
internal error). Each example runs under an alarm, so a read that blocks or a parser that
loops fails the test instead of hanging it. Examples are few and small on purpose: the
whole module takes a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hpcexp.core import runs  # noqa: E402
from hpcexp.core.layout import RunPaths  # noqa: E402
from hpcexp.errors import HpcexpError  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALARM_SECONDS = 20  # generous on a loaded machine; a real hang never ends

# JSON-like shapes, including deep nesting and wrong types in every field
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
shapes = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=20)
FIELDS = ["experiment", "run_id", "state", "executor", "params", "args", "command", "executor_ids", "attempts",
          "attempt", "exit_code", "created_at", "task_index", "resources", "git_dirty", "sweep_id"]
records = st.fixed_dictionaries({}, optional={k: shapes for k in FIELDS})


def _deep(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + closer * depth).encode()


raw_inputs = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    shapes.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=300_000).map(_deep),
    st.integers(min_value=1, max_value=50_000).map(lambda d: _deep(d, "{\"a\":", "}")),
)


@contextlib.contextmanager
def alarm(seconds: int = ALARM_SECONDS) -> Iterator[None]:
    def hang(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def only_hpcexp_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; an HpcexpError (one line at the CLI) is fine, anything else fails the test."""
    with alarm():
        try:
            return fn(*args, **kwargs)
        except HpcexpError as exc:
            assert "\n" not in exc.message or isinstance(exc, HpcexpError)
            return exc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> RunPaths:
    paths = RunPaths(tmp_path_factory.mktemp("prop") / "runs" / "exp" / "20260101-000000.000-abcdef")
    paths.dir.mkdir(parents=True)
    return paths


def _render(paths: RunPaths, rec: runs.RunRecord) -> None:
    """What status/runs/logs do with a record: none of it may raise."""
    from hpcexp.app.runs import summarize
    from hpcexp.app.views import details, json_rows, run_rows

    run_rows([(paths, rec)])
    details(paths, rec)
    json.dumps(json_rows([(paths, rec)]), default=str)
    summarize([rec])
    rec.duration()
    _ = rec.terminal


@SETTINGS
@given(data=st.one_of(raw_inputs, records.map(lambda d: json.dumps(d).encode())))
def test_any_run_json_reads_as_a_record_or_unknown(run_dir: RunPaths, data: bytes) -> None:
    run_dir.record.write_bytes(data)
    with alarm():
        rec = runs.read_record(run_dir)
        _render(run_dir, rec)
    assert isinstance(rec, runs.RunRecord)
    if rec.state == "unknown" and rec.error:
        assert str(run_dir.record) in rec.error


@SETTINGS
@given(data=records)
def test_any_record_shape_with_matching_ids_reads_or_is_unknown(run_dir: RunPaths, data: dict[str, Any]) -> None:
    data = {**data, "experiment": "exp", "run_id": run_dir.dir.name}
    run_dir.record.write_text(json.dumps(data))
    with alarm():
        rec = runs.read_record(run_dir)
        _render(run_dir, rec)
    assert rec.state in runs.STATES


yaml_texts = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    shapes.map(lambda v: json.dumps(v).encode()),  # JSON is YAML
    st.dictionaries(st.sampled_from(["experiments", "slurm", "images", "runs", "bases", "env", "x"]), shapes,
                    max_size=4).map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=3_000).map(_deep),
)


@SETTINGS
@given(data=yaml_texts)
def test_any_hpcexp_yaml_loads_or_is_one_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    from hpcexp.core.config import load_project

    root = tmp_path_factory.mktemp("yaml")
    (root / "hpcexp.yaml").write_bytes(data)
    only_hpcexp_errors(load_project, explicit=str(root))


dockerfile_texts = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(["FROM busybox:latest", "RUN echo hi", "COPY . /app", "ENV A=1", "ARG X",
                              "WORKDIR /w", "CMD [\"sh\"]", "ENTRYPOINT [", "RUN <<EOF", "EOF", "\\", "# escape=`",
                              "FROM a AS b", "COPY --from=b /x /y", "USER 1:1", "LABEL a=b", "ONBUILD RUN x",
                              "HEALTHCHECK NONE", "SHELL [\"/bin/bash\", \"-c\"]", "FORM x", "ssh-rsa AAAA"]),
             max_size=12).map(lambda ls: "\n".join(ls).encode()),
    st.text(max_size=200).map(lambda t: ("FROM busybox\n" + t).encode("utf-8", "surrogatepass")),
)


@SETTINGS
@given(data=dockerfile_texts)
def test_any_dockerfile_converts_or_is_one_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    from hpcexp.convert import recipe

    folder = tmp_path_factory.mktemp("df")
    df = folder / "Dockerfile"
    df.write_bytes(data)
    only_hpcexp_errors(recipe.convert, df, context=folder)


@SETTINGS
@given(data=yaml_texts, suffix=st.sampled_from([".yaml", ".json", ".csv", ".tsv"]))
def test_any_sweep_file_loads_or_is_one_error(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                              suffix: str) -> None:
    from hpcexp.execute import sweep

    folder = tmp_path_factory.mktemp("sweep")
    path = folder / f"sweep{suffix}"
    path.write_bytes(data)
    only_hpcexp_errors(sweep.load_sweep_file, Path(path), inside=folder)
