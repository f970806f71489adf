"""The shell a Slurm job runs for the services beside its payload (docs/services.md). Pure.

The job script needs neither hpcexp nor Python on the compute node, so the services are
started, checked and stopped by generated bash, doing what
:mod:`hpcexp.execute.services` does for a local run:

1. choose each port: a random port in ``PORT_RANGE`` nobody listens on, reserved by an
   exclusive ``mkdir`` in the same per-user folder the local runs use (the owner file
   holds the job script's pid, so a reservation of a dead job is taken over);
2. start a *guard* that outlives a SIGKILL of the job script (Slurm sends one
   ``KillWait`` seconds after the SIGTERM of ``scancel`` or a time limit, and Apptainer's
   instances are not the script's descendants any more): double-forked, it waits for the
   script's pid to go and then stops the instances;
3. per service: ``apptainer instance start``, its command through ``exec instance://``
   in the background (output in ``services/NAME.out|err``), then its readiness check
   until its timeout: a failure writes the exit marker with the launch error
   ``service 'NAME' ...`` and stops what was started;
4. a *monitor* in the background: a service that is not optional and dies while the
   payload runs leaves ``services/.died-I`` and the payload (the processes carrying the
   run's ``HPCEXP_RUN_ID`` marker) gets SIGTERM; the exit marker then carries
   ``service_failure``, which fails the run (:mod:`hpcexp.execute.slurm.decide`);
5. after the payload (and in the EXIT trap): stop every instance, release the ports.

Every value is quoted here, once (``shlex.quote``); placeholders ``{host}``, ``{port}``,
``{port.NAME}`` become references to the shell variables holding the chosen ports.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import Any, Mapping, Sequence

from hpcexp.core.model import SERVICE_PLACEHOLDER_RE
from hpcexp.execute.services import HOST, PORT_RANGE, STOP_GRACE, env_prefix
from hpcexp.execute.values import check_value
from hpcexp.runtime import instances

_SENTINEL = "hpcexp-instance-name-here"


def _q(value: str) -> str:
    return shlex.quote(value)


def _argv(argv: Sequence[str], name_expr: str) -> str:
    """An argv from :mod:`hpcexp.runtime.instances` as shell words, the sentinel instance
    name (alone or in ``instance://``) replaced by ``name_expr``."""
    words = []
    for arg in argv:
        check_value("service argument", arg)
        if arg == _SENTINEL:
            words.append(name_expr)
        elif arg == f"instance://{_SENTINEL}":
            words.append(f'"instance://"{name_expr}')
        else:
            words.append(_q(arg))
    return " ".join(words)


def _word(text: str, index: int, ports: Sequence[str]) -> str:
    """A service word with its placeholders as references to the chosen ports."""
    check_value("service value", text)
    out: list[str] = []
    pos = 0
    for m in SERVICE_PLACEHOLDER_RE.finditer(text):
        literal = text[pos:m.start()]
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            literal += token[0]
            out.append(_q(literal) if literal else "")
            continue
        if literal:
            out.append(_q(literal))
        name = m.group(1)
        if name == "host":
            out.append(HOST)
        else:
            pname = ports[0] if name == "port" else name[5:]
            out.append(f'"${{HPCEXP_SP_{index}_{ports.index(pname)}}}"')
    if pos < len(text):
        out.append(_q(text[pos:]))
    joined = "".join(w for w in out if w)
    return joined or "''"


def _json_sh(text: str) -> str:
    """A JSON string as one shell word (for the exit marker's launch_error/service_failure)."""
    return _q(json.dumps(text))


PORT_FUNCTION = f"""\
hpcexp_ports_dir="/tmp/hpcexp-ports-$(id -u)"
mkdir -m 700 "$hpcexp_ports_dir" 2>/dev/null || true
if [ -L "$hpcexp_ports_dir" ] || [ ! -d "$hpcexp_ports_dir" ] || [ ! -O "$hpcexp_ports_dir" ]; then
  hpcexp_ports_dir=""   # planted by someone else: choose without reservations
fi
# hpcexp_port: choose a free TCP port, reserve it for this job; sets HPCEXP_PORT
hpcexp_port() {{
  local p d o n
  for n in $(seq 4000); do
    p=$(( {PORT_RANGE[0]} + ( (RANDOM << 15 | RANDOM) % {PORT_RANGE[1] - PORT_RANGE[0] + 1} ) ))
    case " ${{HPCEXP_SVC_PORTS[*]:-}} " in *" $p "*) continue ;; esac
    if (exec 3<>"/dev/tcp/{HOST}/$p") 2>/dev/null; then continue; fi
    if [ -n "$hpcexp_ports_dir" ]; then
      d="$hpcexp_ports_dir/$p"
      if ! mkdir -m 700 "$d" 2>/dev/null; then
        o=$(cat "$d/owner" 2>/dev/null || true)
        if [ -z "$o" ] || kill -0 "$o" 2>/dev/null; then continue; fi
        rm -rf "$d"; mkdir -m 700 "$d" 2>/dev/null || continue
      fi
      echo "$$" > "$d/.owner.$$" && mv -f "$d/.owner.$$" "$d/owner"
      HPCEXP_SVC_HELD+=("$d")
    fi
    HPCEXP_SVC_PORTS+=("$p"); HPCEXP_PORT=$p
    return 0
  done
  return 1
}}"""


def start_block(services: Sequence[Mapping[str, Any]], *, program: str, env_prefix_: str) -> str:
    """The shell that starts ``services`` (the records' ``extra.services`` dicts) before the
    payload; it goes at the end of ``{{ record_start }}``."""
    for svc in services:
        check_value("service name", str(svc["name"]))
    inst_expr = [f'"hpcexp-${{HPCEXP_RUN_ID}}-{svc["name"]}"' for svc in services]
    stop_argv = _argv(instances.instance_stop_argv(_SENTINEL, program=program, timeout=STOP_GRACE), '"$n"')
    force_argv = _argv(instances.instance_stop_argv(_SENTINEL, program=program, force=True), '"$n"')
    guard_script = ("trap '' TERM INT HUP; owner=$1; shift; while kill -0 \"$owner\" 2>/dev/null; do sleep 1; "
                    "done; for n in \"$@\"; do case \"$n\" in "
                    "/*) [ \"$(cat \"$n/owner\" 2>/dev/null)\" = \"$owner\" ] && rm -rf \"$n\" ;; "
                    f"*) {force_argv} "
                    ">/dev/null 2>&1 ;; esac; done")
    lines = [
        "# --- hpcexp: the services beside the payload (docs/services.md): ports chosen and reserved for",
        "# this job, each service an Apptainer instance named after the run, stopped when the job ends",
        "HPCEXP_SVC_INST=(); HPCEXP_SVC_PIDS=(); HPCEXP_SVC_HELD=(); HPCEXP_SVC_PORTS=(); HPCEXP_SVC_ENV=()",
        "HPCEXP_SVC_FAILURE=null; HPCEXP_SVC_MON=''",
        'HPCEXP_SVC_DIR="$HPCEXP_RUN_DIR/services"',
        'mkdir -p "$HPCEXP_SVC_DIR"',
        PORT_FUNCTION,
        "hpcexp_services_stop() {",
        "  local n s stoppers=()",
        '  if [ -n "$HPCEXP_SVC_MON" ]; then kill "$HPCEXP_SVC_MON" 2>/dev/null || true; '
        'wait "$HPCEXP_SVC_MON" 2>/dev/null || true; HPCEXP_SVC_MON=""; fi',
        '  for n in "${HPCEXP_SVC_INST[@]+"${HPCEXP_SVC_INST[@]}"}"; do',
        f"    {stop_argv} >/dev/null 2>&1 &",
        "    stoppers+=($!)",
        "  done",
        '  for s in "${stoppers[@]+"${stoppers[@]}"}"; do wait "$s" 2>/dev/null || true; done',
        '  for s in "${HPCEXP_SVC_PIDS[@]+"${HPCEXP_SVC_PIDS[@]}"}"; do wait "$s" 2>/dev/null || true; done',
        '  for n in "${HPCEXP_SVC_HELD[@]+"${HPCEXP_SVC_HELD[@]}"}"; do rm -rf "$n"; done',
        "  HPCEXP_SVC_INST=(); HPCEXP_SVC_PIDS=(); HPCEXP_SVC_HELD=()",
        "  return 0",
        "}",
        "# hpcexp_services_fail MESSAGE JSON: a service did not start; record it, stop the others",
        "hpcexp_services_fail() {",
        '  echo "hpcexp: $1" >&2',
        "  hpcexp_services_stop",
        '  hpcexp_exit 1 "$2"',
        "  exit 1",
        "}",
        "# the EXIT trap's hpcexp_early_exit now stops the services first (wrapped, not replaced)",
        'eval "hpcexp_early_exit_before_services() $(declare -f hpcexp_early_exit | tail -n +2)"',
        'hpcexp_early_exit() { hpcexp_services_stop; hpcexp_early_exit_before_services "$@"; }',
        "# hpcexp_ready INDEX TIMEOUT PID KIND [PORT | COMMAND...]: 0 ready, 1 timed out, 2 exited, 3 stopped",
        "hpcexp_ready() {",
        '  local i="$1" deadline=$(( SECONDS + $2 )) pid="$3" kind="$4" left; shift 4',
        "  while :; do",
        '    if ! kill -0 "$pid" 2>/dev/null; then return 2; fi',
        '    case "$kind" in',
        f'      tcp) if (exec 3<>"/dev/tcp/{HOST}/$1") 2>/dev/null; then return 0; fi ;;',
        '      command) left=$(( deadline - SECONDS )); [ "$left" -ge 1 ] || left=1',
        '        if timeout "$left" "$@" >/dev/null 2>&1; then return 0; fi ;;',
        "      *) return 0 ;;",
        "    esac",
        "    $HPCEXP_TERM && return 3",
        '    [ "$SECONDS" -ge "$deadline" ] && return 1',
        "    sleep 0.2",
        "  done",
        "}",
    ]
    # ports first (every service is told where every other one is), then the environment
    env_words = [_q(f"{env_prefix_}HPCEXP_SERVICES={' '.join(str(s['name']) for s in services)}")]
    no_port = _json_sh("services: no free TCP port found for this job's services")
    for i, svc in enumerate(services):
        prefix = env_prefix(str(svc["name"]))
        env_words.append(_q(f"{env_prefix_}{prefix}HOST={HOST}"))
        for j, pname in enumerate(svc["ports"]):
            lines.append(f"hpcexp_port || hpcexp_services_fail {_q('services: no free TCP port found')} {no_port}")
            lines.append(f"HPCEXP_SP_{i}_{j}=$HPCEXP_PORT")
            if j == 0:
                env_words.append(f'"{env_prefix_}{prefix}PORT=$HPCEXP_SP_{i}_{j}"')
            env_words.append(f'"{env_prefix_}{prefix}PORT_{pname.upper()}=$HPCEXP_SP_{i}_{j}"')
    lines.append("HPCEXP_SVC_ENV=(" + " ".join(env_words) + ")")
    all_names = " ".join(inst_expr)
    lines += [
        "# the guard: stops the instances if this script is killed before it could (SIGKILL)",
        f"( setsid bash -c {_q(guard_script)} hpcexp-guard \"$$\" {all_names} "
        '"${HPCEXP_SVC_HELD[@]+"${HPCEXP_SVC_HELD[@]}"}" </dev/null >/dev/null 2>&1 & )',
    ]
    for i, svc in enumerate(services):
        name = str(svc["name"])
        ports = list(svc["ports"])
        out = f'"$HPCEXP_SVC_DIR/"{_q(name + ".out")}'
        err = f'"$HPCEXP_SVC_DIR/"{_q(name + ".err")}'
        own_env = " ".join(f"{_q(env_prefix_ + k + '=')}{_word(str(v), i, ports)}"
                           for k, v in sorted(dict(svc.get("env") or {}).items()))
        env_cmd = 'env "${HPCEXP_SVC_ENV[@]}"' + (f" {own_env}" if own_env else "")
        start = _argv(instances.instance_start_argv(str(svc["image"]), _SENTINEL, program=program),
                      f'"${{HPCEXP_SVC_INST[{i}]}}"')
        command = [str(w) for w in svc.get("command") or []] or ["/.singularity.d/runscript"]
        exec_words = _argv(instances.instance_exec_argv(_SENTINEL, ["true"], program=program)[:-1],
                           f'"${{HPCEXP_SVC_INST[{i}]}}"')
        cmd_words = " ".join(_word(w, i, ports) for w in command)
        ready = svc.get("ready") or {}
        timeout = max(1, math.ceil(float(svc.get("timeout") or 60)))
        if ready.get("tcp"):
            check = f"tcp \"$HPCEXP_SP_{i}_{ports.index(ready['tcp'])}\""
            what = "its port did not answer"
        elif ready.get("command"):
            check = f"command {env_cmd} {exec_words} " + " ".join(_word(str(w), i, ports) for w in ready["command"])
            what = f"`{' '.join(ready['command'])}` did not succeed"
        else:
            check = "none"
            what = ""
        log = f"services/{name}.err"
        failed_start = f"service {name!r}: its instance did not start; see {log}"
        not_ready = f"service {name!r} was not ready after {timeout} s ({what}); see {log}"
        exited = f"service {name!r} exited before it was ready; see {log}"
        stopped = f"service {name!r}: the job was told to stop while its services started"
        ports_file = " ".join(f"{p}=$HPCEXP_SP_{i}_{j}" for j, p in enumerate(ports))
        lines += [
            f"# service {name}",
            f"HPCEXP_SVC_INST+=({inst_expr[i]})",
            (f"echo \"{ports_file}\" > \"$HPCEXP_SVC_DIR/.\"{_q(name + '.ports')}\".$$\" && "
             f"mv -f \"$HPCEXP_SVC_DIR/.\"{_q(name + '.ports')}\".$$\" \"$HPCEXP_SVC_DIR/\"{_q(name + '.ports')}")
            if ports else ":",
            f"if ! {env_cmd} {start} >>{err} 2>&1 </dev/null; then",
            f"  hpcexp_services_fail {_q(failed_start)} {_json_sh(failed_start)}",
            "fi",
            f"{env_cmd} {exec_words} {cmd_words} >>{out} 2>>{err} </dev/null &",
            "HPCEXP_SVC_PIDS+=($!)",
            f"hpcexp_r=0; hpcexp_ready {i} {timeout} \"$!\" {check} || hpcexp_r=$?",
            'case "$hpcexp_r" in',
            "  0) ;;",
            f"  1) hpcexp_services_fail {_q(not_ready)} {_json_sh(not_ready)} ;;",
            f"  2) hpcexp_services_fail {_q(exited)} {_json_sh(exited)} ;;",
            f"  *) hpcexp_services_fail {_q(stopped)} {_json_sh(stopped)} ;;",
            "esac",
        ]
    # the monitor, and the payload told where the services are
    required = [i for i, s in enumerate(services) if not s.get("optional")]
    marker = f"{env_prefix_}HPCEXP_RUN_ID"
    lines += [
        "# the monitor: a service that is not optional and dies stops the payload (SIGTERM to the",
        "# processes carrying this run's marker: Apptainer's own drop it, the container's keep it),",
        "# leaving services/.died-INDEX behind",
        "(",
        "  trap - TERM INT; trap '' EXIT",
        "  while sleep 0.5; do",
        f"    for i in {' '.join(str(i) for i in required) or ':'}; do",
        '      [ "$i" = : ] && continue',
        '      if ! kill -0 "${HPCEXP_SVC_PIDS[$i]}" 2>/dev/null; then',
        '        : > "$HPCEXP_SVC_DIR/.died-$i"',
        f'        for f in $(grep -lzxF -e "{marker}=$HPCEXP_RUN_ID" -e "HPCEXP_RUN_ID=$HPCEXP_RUN_ID" '
        "/proc/[0-9]*/environ 2>/dev/null); do",
        '          f="${f#/proc/}"; kill -TERM "${f%/environ}" 2>/dev/null || true',
        "        done",
        "        exit 0",
        "      fi",
        "    done",
        "  done",
        ") &",
        "HPCEXP_SVC_MON=$!",
        'HPCEXP_CMD=("${HPCEXP_CMD[0]}" "${HPCEXP_SVC_ENV[@]}" "${HPCEXP_CMD[@]:1}")',
    ]
    return "\n".join(lines)


def end_block(services: Sequence[Mapping[str, Any]]) -> str:
    """The shell at the start of ``{{ record_end }}``: what the monitor saw, then stop all."""
    lines = ["# --- hpcexp: stop the services; a required one that died fails the run"]
    lines.append('if [ -n "$HPCEXP_SVC_MON" ]; then kill "$HPCEXP_SVC_MON" 2>/dev/null || true; '
                 'wait "$HPCEXP_SVC_MON" 2>/dev/null || true; HPCEXP_SVC_MON=""; fi')
    for i, svc in enumerate(services):
        if svc.get("optional"):
            continue
        text = f"service {svc['name']!r} exited during the run; see services/{svc['name']}.err"
        lines.append(f'if [ -e "$HPCEXP_SVC_DIR/.died-{i}" ]; then HPCEXP_SVC_FAILURE={_json_sh(text)}; '
                     f"echo {_q('hpcexp: ' + text)} >&2; fi")
    lines.append("hpcexp_services_stop")
    lines.append('if [ "$HPCEXP_SVC_FAILURE" != null ]; then hpcexp_event services \'{"attempt": %d, "failure": %s}\' '
                 '"$HPCEXP_ATTEMPT" "$HPCEXP_SVC_FAILURE"; fi')
    return "\n".join(lines)
