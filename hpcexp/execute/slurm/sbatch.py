"""Slurm job scripts: a tiny template language and the shell hpcexp generates. Pure.

Why our own renderer (and not Jinja2): the only thing a template needs is to drop a
fixed set of values into a bash script, and every one of them must arrive already
shell-quoted. A general template engine would make unquoted interpolation and logic
the easy path; here there is exactly one syntax, ``{{ name }}``, which cannot collide
with ``$VAR``/``${VAR}``, ``$((...))`` or Slurm's ``%A``/``%a``/``%j``, and whose every
value is produced by :func:`shlex.quote` (or is generated code). An unknown name is an
error naming the template and line, never an empty string.

The ``#SBATCH`` header is generated in code, sorted, with each value quoted the way
sbatch parses directive lines (double quotes, backslash escapes; single quotes are NOT
special there). Values holding a newline or any other control character are refused
before anything is rendered: a newline in a job name would otherwise add a directive
(reliability test 6).

What the job does on the compute node needs neither hpcexp nor Python: it writes its
own state markers with plain shell into ``RUN_DIR/events/`` (``attempt-N.started``,
``attempt-N.exit``, JSON, written to a temp name then renamed), and ``hpcexp status``
folds them into run.json (see :mod:`hpcexp.execute.slurm.reconcile`). A requeued job starts
again from the top; its attempt number is the submission's base attempt plus
``SLURM_RESTART_COUNT``, and each attempt writes its own log files so earlier ones are
kept.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from hpcexp.errors import UsageError
from hpcexp.execute.slurm.checkpoint import (
    checkpoint_launch,
    checkpoint_marker_fields,
    checkpoint_record_end,
    checkpoint_setup,
)
from hpcexp.execute.values import check_value
from hpcexp.runtime.apptainer import SCRUBBED_ENV_KEEP as SCRUB_KEEP
from hpcexp.runtime.apptainer import SCRUBBED_ENV_PREFIXES as SCRUB_PREFIXES

PLACEHOLDER_RE = re.compile(r"\{\{(.*?)\}\}")
NAME_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
REQUIRED = ("sbatch_header", "record_start", "launch", "record_end")
PLACEHOLDERS = ("sbatch_header", "record_start", "launch", "record_end", "experiment", "run_id", "run_dir",
                "results", "sweep_id", "image", "project")
# Slurm's default max_script_size is 4 MB; stay clearly below it.
MAX_SCRIPT_BYTES = 3_500_000
HEADER_BARE_RE = re.compile(r"^[A-Za-z0-9_.,:@+=/%-]+$")


def default_template() -> str:
    """The packaged template that ``hpcexp init`` copies to slurm/default.sbatch."""
    return resources.files("hpcexp").joinpath("templates/default.sbatch").read_text(encoding="utf-8")


def header_quote(value: str) -> str:
    """Quote a value for an ``#SBATCH`` line as sbatch parses it (double quotes, backslash)."""
    check_value("sbatch value", value)
    if value and HEADER_BARE_RE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_path(path: str | Path) -> str:
    """A file name for --output/--error with a literal '%' escaped (Slurm expands %j etc.)."""
    return str(path).replace("%", "%%")


@dataclass(frozen=True)
class TaskSpec:
    """One run inside a job: where it lives and the exact command that runs it."""

    run_id: str
    run_dir: Path
    argv: tuple[str, ...]                   # apptainer run|exec ... IMAGE PAYLOAD...
    container_env: Mapping[str, str]        # injected as <env_prefix>KEY
    attempt: int = 1                        # attempt number of this submission's first try
    env_prefix: str = "APPTAINERENV_"


@dataclass(frozen=True)
class JobSpec:
    """Everything rendered into one job script (one run, or one array of runs)."""

    experiment: str
    project_root: Path
    image: Path
    tasks: tuple[TaskSpec, ...]
    options: Mapping[str, str | None]       # long sbatch option (no dashes) -> value (None: flag)
    extra_args: tuple[str, ...] = ()        # --sbatch-arg / sbatch_args, appended as given
    sweep_id: str | None = None
    array: bool = False
    launch_error_hint: str = ""
    template_label: str = "default.sbatch"
    meta: Mapping[str, str] = field(default_factory=dict)
    # (host, port, names): the container gets these variables only if host:port answers
    # from the compute node when the job starts (a tracking server, see hpcexp.track)
    env_if_reachable: tuple[str, int, tuple[str, ...]] | None = None
    # the shell that starts the services beside each task's payload (end of record_start)
    # and stops them (start of record_end), made by hpcexp.execute.slurm.services_sh
    services_start: str = ""
    services_end: str = ""
    # (signal name, seconds): Slurm sends it to this script that long before the time
    # limit (--signal=B:SIG@SECONDS); the script forwards it to the payload (see checkpoint.py)
    checkpoint: tuple[str, int] | None = None
    requeue_on: tuple[str, ...] = ()        # endings the job requeues itself after
    max_attempts: int | None = None         # the requeue budget (attempts in all)


def header_lines(options: Mapping[str, str | None], extra_args: Sequence[str] = ()) -> list[str]:
    """``#SBATCH`` lines: options sorted by name, then the user's extra arguments as given."""
    lines = []
    for name in sorted(options):
        check_value(f"sbatch option --{name}", name)
        value = options[name]
        lines.append(f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={header_quote(value)}")
    for arg in extra_args:
        check_value("sbatch argument", arg)
        if not arg.startswith("-"):
            raise UsageError(f"sbatch argument {arg!r} must start with '-' (e.g. --constraint=a100)")
        key, sep, value = arg.partition("=")
        if not re.match(r"^--?[A-Za-z][A-Za-z0-9-]*$", key):
            raise UsageError(f"sbatch argument {arg!r}: invalid option name {key!r}")
        lines.append(f"#SBATCH {key}={header_quote(value)}" if sep else f"#SBATCH {key}")
    return lines


def container_env_value(value: str) -> str:
    """A value for ``APPTAINERENV_KEY`` that reaches the container byte for byte.

    Apptainer (1.4.5, checked) evaluates these values like a double-quoted shell word
    while setting up the container environment: ``$(...)``, backticks and ``$VAR``
    expand inside the container. :mod:`hpcexp.runtime.launch` passes ``--no-eval``, which stops
    that; for a command without it (a record made before that flag was added, being
    resubmitted) escaping backslash, ``$`` and backtick makes the value arrive verbatim.
    """
    return value.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


def _q(value: str) -> str:
    return shlex.quote(value)


def _task_block(task: TaskSpec, indent: str) -> list[str]:
    """Shell assignments selecting one task: run folder, base attempt and the command."""
    for key, value in task.container_env.items():
        check_value(f"environment variable {key}", key)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError(f"invalid environment variable name {key!r}")
        check_value(f"value of {key}", value)
    for arg in task.argv:
        check_value("argument", arg)
    no_eval = "--no-eval" in task.argv
    cmd = ["env"] + [f"{task.env_prefix}{k}={v if no_eval else container_env_value(v)}"
                     for k, v in sorted(task.container_env.items())]
    cmd += list(task.argv)
    return [
        f"{indent}HPCEXP_RUN_ID={_q(task.run_id)}",
        f"{indent}HPCEXP_RUN_DIR={_q(str(task.run_dir))}",
        f"{indent}HPCEXP_ATTEMPT_BASE={int(task.attempt)}",
        f"{indent}HPCEXP_CMD=(" + " ".join(_q(a) for a in cmd) + ")",
    ]


def _reach_check(reach: tuple[str, int, tuple[str, ...]], prefix: str) -> list[str]:
    """Drop the listed container variables from HPCEXP_CMD unless host:port accepts a TCP
    connection from this node within 5 s (bash's /dev/tcp: no curl or python needed)."""
    host, port, names = reach
    check_value("tracking host", host)
    if not re.match(r"^[A-Za-z0-9._:\[\]-]+$", host) or not 0 < int(port) < 65536:
        raise UsageError(f"invalid tracking server address {host!r}:{port!r}")
    for name in names:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise UsageError(f"invalid environment variable name {name!r}")
    pattern = "|".join(f"{prefix}{n}=*" for n in names)
    note = (f"hpcexp: tracking server {host}:{port} does not answer from this node: the payload gets no "
            f"{', '.join(names)}; hpcexp exports the run later")
    return [
        "# --- hpcexp: the payload may log to the tracking server only if it answers from this node",
        f"if ! timeout 5 bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' _ {_q(host)} {int(port)} 2>/dev/null; then",
        "  hpcexp_keep=(); hpcexp_in_env=true",
        '  for hpcexp_a in "${HPCEXP_CMD[@]:1}"; do',
        '    if $hpcexp_in_env && [[ "$hpcexp_a" != *=* ]]; then hpcexp_in_env=false; fi',
        f'    if $hpcexp_in_env; then case "$hpcexp_a" in {pattern}) continue ;; esac; fi',
        '    hpcexp_keep+=("$hpcexp_a")',
        "  done",
        '  HPCEXP_CMD=("${HPCEXP_CMD[0]}" "${hpcexp_keep[@]}")',
        f"  echo {_q(note)} >&2",
        "fi",
    ]


def _record_start(spec: JobSpec) -> str:
    lines = ["# --- hpcexp: select this task's run, record that it started (plain shell, no hpcexp needed)"]
    if spec.array:
        lines.append('case "${SLURM_ARRAY_TASK_ID:-}" in')
        for i, task in enumerate(spec.tasks):
            lines.append(f"  {i})")
            lines += _task_block(task, "    ")
            lines.append("    ;;")
        lines.append('  *) echo "hpcexp: array task ${SLURM_ARRAY_TASK_ID:-?} is not in this job\'s table" >&2; '
                     "exit 2 ;;")
        lines.append("esac")
    else:
        if len(spec.tasks) != 1:
            raise ValueError("a job that is not an array holds exactly one task")
        lines += _task_block(spec.tasks[0], "")
    if spec.env_if_reachable is not None:
        lines += _reach_check(spec.env_if_reachable, spec.tasks[0].env_prefix if spec.tasks else "APPTAINERENV_")
    ckpt_fields = checkpoint_marker_fields() if spec.checkpoint else None
    image_error = json.dumps(f"image {spec.image} is gone (deleted, or not visible from this node); "
                             f"nothing was run{spec.launch_error_hint}")
    lines += [
        f"HPCEXP_IMAGE={_q(str(spec.image))}",
        'HPCEXP_ATTEMPT=$(( HPCEXP_ATTEMPT_BASE + ${SLURM_RESTART_COUNT:-0} ))',
        'if [ "$HPCEXP_ATTEMPT" -le 1 ]; then',
        '  HPCEXP_STDOUT="$HPCEXP_RUN_DIR/stdout.log"; HPCEXP_STDERR="$HPCEXP_RUN_DIR/stderr.log"',
        "else",
        '  HPCEXP_STDOUT="$HPCEXP_RUN_DIR/stdout.$HPCEXP_ATTEMPT.log"; '
        'HPCEXP_STDERR="$HPCEXP_RUN_DIR/stderr.$HPCEXP_ATTEMPT.log"',
        "fi",
        'HPCEXP_HOST="${HOSTNAME:-unknown}"; HPCEXP_HOST="${HPCEXP_HOST//[^A-Za-z0-9._-]/_}"',
        'HPCEXP_JOB="${SLURM_JOB_ID:-}"; HPCEXP_JOB="${HPCEXP_JOB//[^0-9_]/}"',
        "HPCEXP_RC=0; HPCEXP_TERM=false; HPCEXP_ENDED=false",
        'mkdir -p "$HPCEXP_RUN_DIR/results" "$HPCEXP_RUN_DIR/events"',
        "# sbatch exports the login shell's environment: drop settings that would add binds or",
        "# change the container's environment behind hpcexp's back (as apptainer.clean_env does)",
        'for hpcexp_v in $(compgen -e); do case "$hpcexp_v" in',
        f"  {'|'.join(SCRUB_KEEP)}) ;;",
        f"  {'|'.join(p + '*' for p in SCRUB_PREFIXES)}) unset \"$hpcexp_v\" ;;",
        "esac; done",
        "hpcexp_now() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }",
        "# hpcexp_event KIND FORMAT ARGS...: write events/attempt-N.KIND atomically (temp name, then mv)",
        "hpcexp_event() {",
        '  local kind="$1" fmt="$2" dir="$HPCEXP_RUN_DIR/events" tmp; shift 2',
        '  tmp="$dir/.hpcexp-tmp-${HPCEXP_HOST%%.*}-$$-$(printf %08x $(( (RANDOM << 15 | RANDOM) & 0xffffffff )))'
        '-attempt-$HPCEXP_ATTEMPT.$kind"',
        '  printf "$fmt\\n" "$@" > "$tmp"',
        '  mv -f "$tmp" "$dir/attempt-$HPCEXP_ATTEMPT.$kind"',
        "}",
        "hpcexp_exit() {",
        '  local rc="$1" err="$2"',
        '  $HPCEXP_ENDED && return 0; HPCEXP_ENDED=true',
        "  hpcexp_event exit '{\"attempt\": %d, \"exit_code\": %d, \"term_received\": %s, \"launch_error\": %s, "
        "\"time\": \"%s\", \"host\": \"%s\", \"job_id\": \"%s\"" + (ckpt_fields[0] if ckpt_fields else "")
        + "}' \\",
        '    "$HPCEXP_ATTEMPT" "$rc" "$HPCEXP_TERM" "$err" "$(hpcexp_now)" "$HPCEXP_HOST" "$HPCEXP_JOB"'
        + (ckpt_fields[1] if ckpt_fields else ""),
        "}",
        "hpcexp_early_exit() {",
        '  hpcexp_exit "$1" "\\"the job script stopped (exit code $1) before the payload\'s exit was recorded; '
        'see the Slurm output file\\""',
        "}",
        "trap 'HPCEXP_TERM=true' TERM INT",
        "trap 'hpcexp_early_exit \"$?\"' EXIT",
        *(checkpoint_setup(spec.checkpoint, spec.tasks[0].env_prefix if spec.tasks else "APPTAINERENV_",
                           spec.max_attempts if spec.requeue_on else None)
          if spec.checkpoint or spec.requeue_on else []),
        'if [ ! -f "$HPCEXP_IMAGE" ]; then',
        f"  echo {_q('hpcexp: ' + json.loads(image_error))} >&2",
        f"  hpcexp_exit 127 {_q(image_error)}",
        "  exit 127",
        "fi",
        "hpcexp_event started '{\"attempt\": %d, \"time\": \"%s\", \"host\": \"%s\", \"job_id\": \"%s\", "
        "\"array_job_id\": \"%s\", \"array_task_id\": \"%s\"}' \\",
        '  "$HPCEXP_ATTEMPT" "$(hpcexp_now)" "$HPCEXP_HOST" "$HPCEXP_JOB" "${SLURM_ARRAY_JOB_ID:-}" '
        '"${SLURM_ARRAY_TASK_ID:-}"',
    ]
    if spec.services_start:
        lines.append(spec.services_start)
    return "\n".join(lines)


LAUNCH = "\n".join([
    "# --- hpcexp: run the payload (its exit code is kept, not fatal to this script)",
    'cd "$HPCEXP_RUN_DIR"',
    '"${HPCEXP_CMD[@]}" >"$HPCEXP_STDOUT" 2>"$HPCEXP_STDERR" </dev/null || HPCEXP_RC=$?',
])

RECORD_END = "\n".join([
    "# --- hpcexp: record the exit code; the job's exit status is the payload's",
    'hpcexp_exit "$HPCEXP_RC" null',
    'exit "$HPCEXP_RC"',
])


def placeholder_values(spec: JobSpec) -> dict[str, str]:
    """Every placeholder's text, each already shell-quoted (or generated shell code)."""
    header = "\n".join(header_lines(spec.options, spec.extra_args))
    single = spec.tasks[0] if not spec.array else None
    values = {
        "sbatch_header": header,
        "record_start": _record_start(spec),
        "launch": checkpoint_launch(spec.checkpoint[0]) if spec.checkpoint else LAUNCH,
        "record_end": (spec.services_end + "\n" if spec.services_end else "")
        + (checkpoint_record_end("timeout" in spec.requeue_on, spec.max_attempts or 1)
           if spec.checkpoint else RECORD_END),
        "experiment": _q(check_value("experiment", spec.experiment)),
        "sweep_id": _q(check_value("sweep id", spec.sweep_id or "")),
        "image": _q(check_value("image path", str(spec.image))),
        "project": _q(check_value("project path", str(spec.project_root))),
        "run_id": _q(single.run_id) if single else '"$HPCEXP_RUN_ID"',
        "run_dir": _q(str(single.run_dir)) if single else '"$HPCEXP_RUN_DIR"',
        "results": _q(str(single.run_dir / "results")) if single else '"$HPCEXP_RUN_DIR/results"',
    }
    return values


def render_template(text: str, values: Mapping[str, str], *, label: str) -> str:
    """Replace every ``{{ name }}``; an unknown or malformed one is an error naming label:line.

    Placeholders in ``REQUIRED`` must each appear exactly once (hpcexp cannot know how a
    job ended without them).
    """
    seen: dict[str, int] = {}
    out_lines = []
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        def sub(m: re.Match[str], lineno: int = lineno) -> str:
            nm = NAME_RE.match(m.group(1))
            if not nm or nm.group(1) not in values:
                raise UsageError(f"{label}:{lineno}: unknown placeholder {m.group(0)}",
                                 hint="known placeholders: " + ", ".join("{{ %s }}" % n for n in PLACEHOLDERS))
            name = nm.group(1)
            seen[name] = seen.get(name, 0) + 1
            return values[name]
        out_lines.append(PLACEHOLDER_RE.sub(sub, line))
        rest = PLACEHOLDER_RE.sub("", line)
        if "{{" in rest or "}}" in rest:
            raise UsageError(f"{label}:{lineno}: unbalanced '{{{{' or '}}}}' (placeholders look like {{{{ name }}}})")
    for name in REQUIRED:
        if seen.get(name, 0) != 1:
            how = "is missing" if not seen.get(name) else f"appears {seen[name]} times"
            raise UsageError(f"{label}: placeholder {{{{ {name} }}}} {how}; it must appear exactly once",
                             hint="start from hpcexp's default template (hpcexp/templates/default.sbatch)")
    rendered = "".join(out_lines)
    first = rendered.split("\n", 1)[0]
    if not first.startswith("#!") or "bash" not in first:
        raise UsageError(f"{label}:1: a job script must start with #!/bin/bash (hpcexp's lines use bash), "
                         f"got {first[:60]!r}")
    return rendered


def render(template_text: str, spec: JobSpec) -> str:
    """The complete job script for ``spec`` from a user-editable template."""
    return render_template(template_text, placeholder_values(spec), label=spec.template_label)
