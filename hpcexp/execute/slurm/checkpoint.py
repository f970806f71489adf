"""The job script's checkpoint-and-requeue lines (``checkpoint:`` and ``requeue:``). Pure.

What the generated script does when an experiment has a checkpoint signal, following the
contract of the well-known Python tool for Slurm (signal, save, requeue, count attempts):

1. ``#SBATCH --signal=B:SIG@SECONDS`` (added by :mod:`.submit`) makes Slurm send SIG to
   the batch shell only, that long before the time limit (Slurm checks every 30 s or so,
   so it may come up to that much earlier).
2. The payload runs in the background and the script ``wait``\\ s for it: bash runs a trap
   only between commands, so a foreground payload would delay the trap until it ended.
   The trap forwards SIG to the ``apptainer`` process, which passes it on to the
   container's payload (Apptainer does not act on such signals itself). Background jobs of
   a non-interactive shell ignore SIGINT/SIGQUIT, so those are no checkpoint signals here.
3. The payload saves its state in ``HPCEXP_CHECKPOINT_DIR`` (``results/checkpoint``, kept
   across attempts) and exits. Its exit after the signal means "saved and stopped", never
   "finished": the script then requeues the job itself (``scontrol requeue``) while the
   attempt budget lasts, and records in the exit marker that it did (``"requeue":
   "requested"``), or that the budget is spent (``"spent"``) or no requeue is configured
   for time limits (``"off"``); :mod:`.decide` reads these.

``HPCEXP_ATTEMPT`` (1, 2, ...) reaches the payload with every requeue policy or checkpoint.
"""

from __future__ import annotations

import shlex

# Extra fields of the exit marker (format part, argument part) in checkpoint mode.
_MARKER_FORMAT = ', "checkpoint_signal": %s, "requeue": "%s"'
_MARKER_ARGS = ' "$HPCEXP_CKPT" "$HPCEXP_REQUEUE"'


def checkpoint_marker_fields() -> tuple[str, str]:
    """(printf format, its arguments) appended to the exit marker in checkpoint mode."""
    return _MARKER_FORMAT, _MARKER_ARGS


def attempt_env(prefix: str) -> list[str]:
    """Give the payload its attempt number (known only when the attempt starts)."""
    return ['HPCEXP_CMD=("${HPCEXP_CMD[0]}" ' + shlex.quote(f"{prefix}HPCEXP_ATTEMPT=") + '"$HPCEXP_ATTEMPT" '
            '"${HPCEXP_CMD[@]:1}")',
            'mkdir -p "$HPCEXP_RUN_DIR/results/checkpoint"']


def budget_guard(max_attempts: int) -> list[str]:
    """An attempt past the budget (Slurm requeued the job itself, after a preemption or a node
    failure) does not start the payload; its exit marker says ``"over_budget": true``."""
    note = (f"hpcexp: attempt $HPCEXP_ATTEMPT is past max_attempts={int(max_attempts)} (Slurm requeued the job "
            "itself): the payload is not started")
    return [
        f'if [ "$HPCEXP_ATTEMPT" -gt {int(max_attempts)} ]; then',
        f'  echo "{note}" >&2',
        "  hpcexp_event exit '{\"attempt\": %d, \"exit_code\": 0, \"term_received\": false, "
        "\"launch_error\": null, \"time\": \"%s\", \"host\": \"%s\", \"job_id\": \"%s\", "
        "\"over_budget\": true}' \\",
        '    "$HPCEXP_ATTEMPT" "$(hpcexp_now)" "$HPCEXP_HOST" "$HPCEXP_JOB"',
        "  HPCEXP_ENDED=true",
        "  exit 0",
        "fi",
    ]


def checkpoint_setup(checkpoint: tuple[str, int] | None, prefix: str, max_attempts: int | None = None
                     ) -> list[str]:
    """Lines after the job's traps: the attempt variable, the budget guard, and the trap for
    the checkpoint signal."""
    lines = ["# --- hpcexp: checkpoint contract (HPCEXP_ATTEMPT, HPCEXP_CHECKPOINT_DIR, the warning signal)"]
    if checkpoint is not None:
        lines.append('HPCEXP_CKPT=false; HPCEXP_REQUEUE=off; HPCEXP_PID=""')
    if max_attempts is not None:
        lines += budget_guard(max_attempts)
    lines += attempt_env(prefix)
    if checkpoint is None:
        return lines
    sig, before = checkpoint
    note = (f"hpcexp: SIG{sig} received ({before} s or less before the time limit): forwarding it to the "
            "payload so that it saves a checkpoint and exits")
    lines += [
        "hpcexp_checkpoint() {",
        "  HPCEXP_CKPT=true",
        f"  echo {shlex.quote(note)} >&2",
        f'  if [ -n "$HPCEXP_PID" ]; then kill -s {sig} "$HPCEXP_PID" 2>/dev/null || true; fi',
        "}",
        f"trap hpcexp_checkpoint {sig}",
    ]
    return lines


def checkpoint_launch(sig: str) -> str:
    """The payload in the background, waited for (so the trap runs at once), signal forwarded."""
    return "\n".join([
        "# --- hpcexp: run the payload in the background and wait, so that the checkpoint signal",
        "# reaches it at once (its exit code is kept, not fatal to this script)",
        'cd "$HPCEXP_RUN_DIR"',
        '"${HPCEXP_CMD[@]}" >"$HPCEXP_STDOUT" 2>"$HPCEXP_STDERR" </dev/null &',
        "HPCEXP_PID=$!",
        f'if $HPCEXP_CKPT; then kill -s {sig} "$HPCEXP_PID" 2>/dev/null || true; fi',
        "while :; do",
        '  HPCEXP_RC=0; wait "$HPCEXP_PID" || HPCEXP_RC=$?',
        '  kill -0 "$HPCEXP_PID" 2>/dev/null || break   # a trap interrupted wait: the payload still runs',
        "done",
    ])


def checkpoint_record_end(requeue_on_timeout: bool, max_attempts: int) -> str:
    """Record the exit; after the checkpoint signal, requeue the job while the budget lasts."""
    decide = (f'  if [ "$HPCEXP_ATTEMPT" -lt {int(max_attempts)} ]; then HPCEXP_REQUEUE=requested; '
              "else HPCEXP_REQUEUE=spent; fi") if requeue_on_timeout else "  HPCEXP_REQUEUE=off"
    spent = f"hpcexp: attempt $HPCEXP_ATTEMPT of {int(max_attempts)}: requeue budget spent, not requeued"
    return "\n".join([
        "# --- hpcexp: record the exit code; after the checkpoint signal the payload saved and stopped:",
        "# requeue the job (same run, next attempt) while the attempt budget lasts",
        "if $HPCEXP_CKPT; then",
        decide,
        "fi",
        'hpcexp_exit "$HPCEXP_RC" null',
        'if [ "$HPCEXP_REQUEUE" = requested ]; then',
        '  if scontrol requeue "${SLURM_JOB_ID:-}"; then',
        '    echo "hpcexp: attempt $HPCEXP_ATTEMPT saved a checkpoint; job requeued" >&2',
        "    exit 0",
        "  fi",
        "  HPCEXP_REQUEUE=failed; HPCEXP_ENDED=false",
        '  echo "hpcexp: scontrol requeue failed; the job ends here" >&2',
        '  hpcexp_exit "$HPCEXP_RC" null',
        'elif [ "$HPCEXP_REQUEUE" = spent ]; then',
        f'  echo "{spent}" >&2',
        "fi",
        'exit "$HPCEXP_RC"',
    ])
