"""Submitting Slurm runs: one job, or one job array for a sweep; resubmitting; waiting.

Owns the order that makes a submission safe: every value is checked first, every run
record exists (``submitting``) and the sweep record names every array part before any
``sbatch`` call, and each record holds its job id (``pending``) right after. A sweep
larger than MaxArraySize, or whose script would exceed the controller's limit, becomes
several arrays under one sweep id. Also resubmitting a sweep's failed tasks as a new
attempt, and ``submit --wait``. The job script itself is rendered by :mod:`.sbatch`;
it and the sweep model are imported where they are used (``hpcexp status`` loads this
package but never renders a script or expands a sweep).

At about 500 lines this is the largest module of the package: the submission steps share
one state (the tasks, their records and the sweep record) and read best in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcexp.core import runs
from hpcexp.core.config import SlurmResources
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import HpcexpError, NotFound, SchedulerError, UsageError
from hpcexp.execute import base
from hpcexp.execute.slurm.commands import JOB_PREFIX, SubmitUncertain, array_spec, submit_script
from hpcexp.execute.slurm.decide import settled
from hpcexp.execute.slurm.facts import cached_facts
from hpcexp.execute.slurm.reconcile import array_task_ids, write_many
from hpcexp.execute.slurm.resources import (
    check_against_cluster,
    check_resources,
    offending_option,
    resource_options,
    resources_dict,
)
from hpcexp.infra import atomic
from hpcexp.infra import host as hostinfo

MAX_TASK_ARGV = 2048
"""A sweep task's record holds the hpcexp command line only up to this many characters (the
sweep record always holds it)."""


def _fault(point: str) -> None:
    """Test hook (reliability test 35, the kill test of docs/records.md):
    ``HPCEXP_TEST_FAULT=slurm.after_sbatch:kill`` kills this process right after sbatch
    accepted a job and before any record holds its id; the other points are
    ``slurm.before_records``, ``slurm.after_part_records``, ``slurm.before_sbatch`` and
    ``slurm.after_sweep_record``."""
    spec = os.environ.get("HPCEXP_TEST_FAULT", "")
    if spec == f"{point}:kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Submission:
    """What ``submit`` did (or, with dry_run, would do)."""

    experiment: str
    sweep_id: str | None
    runs: list[tuple[RunPaths, runs.RunRecord]]
    job_ids: list[str]                      # one per sbatch call (array job ids for sweeps)
    scripts: list[Path]
    texts: list[str]                        # the rendered scripts
    dry_run: bool = False


@dataclass
class _Task:
    paths: RunPaths
    record: runs.RunRecord
    spec: Any                               # sbatch.TaskSpec


def _template(layout: Layout, name: str, template: str | None) -> tuple[str, str]:
    """(text, label) of slurm/TEMPLATE.sbatch, slurm/NAME.sbatch, slurm/default.sbatch, or the built-in one."""
    from hpcexp.execute.slurm import sbatch  # the renderer: not needed by `hpcexp status`

    proj = layout.project
    if template:
        path = proj.slurm_dir / f"{template}.sbatch"
        if not path.is_file():
            raise UsageError(f"slurm template {template!r} not found: {path} does not exist",
                             hint=f"create it from {proj.slurm_dir / 'default.sbatch'} or drop slurm.template")
    else:
        path = layout.slurm_template(name)
    if path.is_file():
        try:
            label = str(path.relative_to(proj.root))
        except ValueError:
            label = str(path)
        try:
            return path.read_text(encoding="utf-8"), label
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read slurm template {label}: {exc}") from exc
    return sbatch.default_template(), "(built-in default.sbatch)"


def _runtime_program(cache_dir: Path | None = None) -> tuple[str, str | None, str]:
    """(program name to call on the node, version, env prefix).

    The version is the one remembered for this very binary when there is one (asking is a Go
    start-up, a fifth of a small submission's time), else asked and remembered."""
    from hpcexp.infra import process
    from hpcexp.runtime import versions

    def prefix(program: str) -> str:
        return "SINGULARITYENV_" if program == "singularity" else "APPTAINERENV_"

    if cache_dir is not None:
        name = "apptainer" if process.which("apptainer") else "singularity"
        path = process.which(name)
        version = versions.known_version(path, cache_dir) if path else None
        if version is not None:
            return name, version, prefix(name)
    from hpcexp.runtime import apptainer

    inst = apptainer.detect()
    program = inst.program if inst else "apptainer"
    if inst is not None and cache_dir is not None:
        versions.remember_version(inst.path, inst.version, versions.version_cache(cache_dir))
    return program, (inst.version if inst else None), prefix(program)


def _image_fields(image: Any) -> dict[str, Any]:
    if isinstance(image, (str, os.PathLike)):
        return {"path": Path(image)}
    return {name: getattr(image, name, None)
            for name in ("path", "sha256", "input_hash", "recipe_sha256", "workdir", "apptainer_version",
                         "cmd", "entrypoint", "source_ref")}


def _chunks(n: int, size: int) -> list[range]:
    size = max(1, size)
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _link_script(script: Path, target: Path) -> None:
    """Keep the job script in the run folder: a hard link to the array's script (no copies of
    a large table), or a copy where links are not possible."""
    try:
        if target.exists() or target.is_symlink():
            target.unlink()
        os.link(script, target)
    except OSError:
        atomic.write_bytes(target, script.read_bytes())


def _submit_tasks(layout: Layout, exp_name: str, image: Path, tasks: list[_Task], res: SlurmResources, *,
                  sweep_id: str | None, array: bool, hold: bool, dry_run: bool, label_hint: str,
                  first_chunk: int = 0, sweep_record: dict[str, Any] | None = None,
                  fresh: bool = False,
                  env_probe: tuple[str, int, tuple[str, ...]] | None = None,
                  services: Sequence[Mapping[str, Any]] = ()) -> Submission:
    """Render, keep and submit the job script(s) for ``tasks`` (records already written).

    ``fresh``: the runs were created for this submission; when sbatch refuses the first
    part, their folders (and the sweep's) are removed again instead of kept as ``failed``."""
    from hpcexp.execute import sweep as sweep_mod  # in-function: `hpcexp status` needs no sweep model
    from hpcexp.execute.slurm import sbatch  # the renderer: not needed by `hpcexp status`

    proj = layout.project
    text, label = _template(layout, exp_name, res.template)
    f = cached_facts(layout) if array else {}
    max_size = int(f.get("max_array_size") or 1001)
    # the largest index is MaxArraySize-1 and each array's indices start at 0
    sizes = _chunks(len(tasks), max(1, max_size)) if array else [range(0, 1)]
    base_opts = resource_options(res)
    base_opts["open-mode"] = "append"
    base_opts["chdir"] = str(proj.root)
    ckpt, requeue_on, max_attempts = _policies(tasks[0].record) if tasks else (None, (), None)
    base_opts.update(_policy_options(ckpt, requeue_on, max_attempts))
    renders: list[tuple[range, str, str, Path]] = []
    pending = list(sizes)
    k = first_chunk
    while pending:
        rng = pending.pop(0)
        part = [tasks[i] for i in rng]
        opts = dict(base_opts)
        if array:
            job_name = f"{JOB_PREFIX}{sweep_id}-{k}"
            opts["array"] = array_spec(len(part), res.max_parallel)
            opts["output"] = sbatch.slurm_path(layout.sweep_dir(str(sweep_id))) + "/slurm-%A_%a.out"
            opts["comment"] = f"hpcexp sweep {sweep_id} part {k}"
            script = layout.sweep_dir(str(sweep_id)) / f"array-{k}.sbatch"
        else:
            job_name = f"{JOB_PREFIX}{part[0].record.run_id}"
            opts["output"] = sbatch.slurm_path(part[0].paths.dir) + "/slurm-%j.out"
            opts["comment"] = f"hpcexp run {part[0].record.run_id}"
            script = part[0].paths.script
        opts["job-name"] = job_name
        svc_start = svc_end = ""
        if services:  # the job starts them beside each task's payload (docs/services.md)
            from hpcexp.execute.slurm import services_sh

            svc_start = services_sh.start_block(services, program=part[0].spec.argv[0],
                                                env_prefix_=part[0].spec.env_prefix)
            svc_end = services_sh.end_block(services)
        spec = sbatch.JobSpec(experiment=exp_name, project_root=proj.root, image=image,
                              tasks=tuple(t.spec for t in part), options=opts, extra_args=tuple(res.sbatch_args),
                              sweep_id=sweep_id, array=array, launch_error_hint=label_hint, template_label=label,
                              env_if_reachable=env_probe, services_start=svc_start, services_end=svc_end,
                              checkpoint=ckpt, requeue_on=requeue_on, max_attempts=max_attempts)
        rendered = sbatch.render(text, spec)
        if len(rendered.encode()) > min(sbatch.MAX_SCRIPT_BYTES, int(f.get("max_script_size") or 4 << 20) - 65536) \
                and len(part) > 1:
            half = len(rng) // 2
            pending[:0] = [range(rng.start, rng.start + half), range(rng.start + half, rng.stop)]
            continue
        renders.append((rng, job_name, rendered, script, k))
        k += 1

    if dry_run:
        return Submission(exp_name, sweep_id, [(t.paths, t.record) for t in tasks], [],
                          [r[3] for r in renders], [r[2] for r in renders], dry_run=True)

    # keep the scripts and note every part in the sweep record before any sbatch call
    for rng, job_name, rendered, script, _k in renders:
        atomic.write_text(script, rendered)
        for pos, i in enumerate(rng):
            t = tasks[i]
            t.record.executor_ids["job_name"] = job_name
            if array:
                t.record.executor_ids.update(array_task_id=pos, array_size=len(rng))
                if not fresh:   # a new sweep's tasks have no folder yet; the script is in the sweep's
                    _link_script(script, t.paths.script)
    _fault("slurm.before_records")
    if array and sweep_record is not None:
        # One durable step per part (docs/records.md): the part's records as one fsynced
        # table, the sweep record naming it (fsynced), then each run.json by rename without
        # fsync; a run.json a crash takes away is written again from its table.
        subs = sweep_record.setdefault("submissions", [])
        for rng, job_name, _, script, part in renders:
            table = layout.sweep_table(str(sweep_id), part)
            runs.create_records(table, [(tasks[i].paths, tasks[i].record) for i in rng], run_json=not fresh)
            subs.append({"job_name": job_name, "script": str(script), "array_job_id": None,
                         "run_ids": [tasks[i].record.run_id for i in rng], "records": table.name,
                         "task_indexes": [tasks[i].record.task_index for i in rng], "submitted_at": None})
            _fault("slurm.after_part_records")
        sweep_mod.write_sweep(layout, sweep_record)
    else:
        write_many([(t.paths, t.record) for t in tasks], strict=True)
    _fault("slurm.before_sbatch")

    job_ids: list[str] = []
    for n, (rng, job_name, _, script, _part) in enumerate(renders):
        # A sweep split into several arrays: --max-parallel throttles each array, so with a
        # throttle each part waits for the previous one (afterany), keeping the global limit.
        after = job_ids[-1] if (array and res.max_parallel and job_ids) else None
        try:
            job = submit_script(script, hold=hold, cwd=proj.root, after=after)
        except SubmitUncertain as exc:
            done = f"; already submitted before it: job(s) {', '.join(job_ids)}" if job_ids else ""
            rest = [tasks[i] for r in renders[n + 1:] for i in r[0]]
            for t in rest:
                t.record.state = "failed"
                t.record.launch_error = t.record.reason = "not submitted: an earlier sbatch call did not answer"
                t.record.ended_at = runs.utcnow()
            write_many([(t.paths, t.record) for t in rest])
            raise SubmitUncertain(exc.message + done, hint=exc.hint) from exc
        except SchedulerError as exc:
            which = offending_option(exc.message, res)
            if which:
                exc = SchedulerError(f"{exc.message} (the option it refused: {which})", hint=exc.hint)
            failed = [tasks[i] for r in renders[n:] for i in r[0]]
            if fresh and not job_ids:
                # nothing was ever queued: leave no run behind (the records were ours alone)
                _discard_unsubmitted(layout, tasks, sweep_id if array else None)
                raise SchedulerError(exc.message + "; nothing was submitted and no run was kept",
                                     hint=exc.hint) from exc
            for t in failed:
                t.record.state = "failed"
                t.record.launch_error = f"not submitted: {exc.message}"
                t.record.reason = t.record.launch_error
                t.record.ended_at = runs.utcnow()
            write_many([(t.paths, t.record) for t in failed])
            if array and sweep_record is not None:
                sweep_mod.write_sweep(layout, sweep_record)
            done = f"; already submitted: job(s) {', '.join(job_ids)} (`hpcexp stop {sweep_id}` cancels them)" \
                if job_ids else "; nothing was submitted"
            raise SchedulerError(exc.message + done, hint=exc.hint) from exc
        _fault("slurm.after_sbatch")
        job_ids.append(job)
        now = runs.utcnow()
        for pos, i in enumerate(rng):
            t = tasks[i]
            ids = t.record.executor_ids
            t.record.state = "pending"
            ids["submitted_at"] = now
            if array:
                ids.update(array_task_ids(layout, str(sweep_id), job, pos, len(rng)))
            else:
                ids.update(job_id=job, slurm_output=str(t.paths.dir / f"slurm-{job}.out"))
        if array and sweep_record is not None:
            for sub in sweep_record["submissions"]:
                if sub["job_name"] == job_name:
                    sub.update(array_job_id=job, submitted_at=now, held=hold, after=after)
            sweep_mod.write_sweep(layout, sweep_record)
            _fault("slurm.after_sweep_record")
            # The array job id is now durable in the sweep record (and Slurm knows the job by
            # its name): every reader completes the task records from it (reconcile), so they
            # are not written a second time; the records returned here are complete.
        else:
            write_many([(tasks[i].paths, tasks[i].record) for i in rng], strict=True)
    return Submission(exp_name, sweep_id, [(t.paths, t.record) for t in tasks], job_ids,
                      [r[3] for r in renders], [r[2] for r in renders])


def submit_runs(project: Any, exp: Any, image: Any, param_sets: Sequence[Mapping[str, str]],
                resources: SlurmResources, *, args: Sequence[str] | None = None, sweep: bool | None = None,
                arch: str | None = None, hold: bool = False, dry_run: bool = False, allow_binds: bool = False,
                cmdline: Sequence[str] | None = None,
                payload_env: Callable[[Sequence[RunPaths], str | None], Mapping[str, Mapping[str, str]]] | None = None,
                env_probe: tuple[str, int] | None = None,
                service_images: Mapping[str, Path] | None = None, checkpoint: Any = None) -> Submission:
    """Submit one run per parameter set: one job for a single run, ONE job array for a sweep.

    ``payload_env(run_paths, sweep_id)`` may add container environment per run id once
    the run folders exist (tracking); with ``env_probe`` (host, port) each job gives its
    payload those variables only if that server answers from the compute node.

    Every value is checked before anything is created; every run record exists (state
    ``submitting``) before ``sbatch`` runs, then holds its job id (state ``pending``).
    ``image`` is an ImageInfo (or a path) already built on this login node.
    ``checkpoint`` (a CheckpointPolicy) overrides the experiment's ``checkpoint:``.
    """
    from hpcexp.core.config import host_arch
    from hpcexp.execute import sweep as sweep_mod  # in-function: `hpcexp status` needs no sweep model
    from hpcexp.execute.slurm import sbatch  # the renderer: not needed by `hpcexp status`
    from hpcexp.runtime import launch

    layout = Layout(project)
    check_resources(resources)
    if not dry_run:
        check_against_cluster(layout, resources)
    for arg in resources.sbatch_args:
        sbatch.check_value("--sbatch-arg", arg)
    if not param_sets:
        raise UsageError("nothing to submit: the sweep has no parameter sets")
    for ps in param_sets:
        for k, v in ps.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", k):
                raise UsageError(f"invalid parameter name {k!r}")
            sbatch.check_value(f"parameter {k}", v)
    for k, v in exp.params.items():
        sbatch.check_value(f"hpcexp.yaml parameter {k}", v)
    for a in (args or ()):
        sbatch.check_value("argument", a)
    info = _image_fields(image)
    image_path = Path(info["path"])
    if not dry_run and not image_path.is_file():
        raise UsageError(f"image {image_path} does not exist", hint=f"build it with `hpcexp build {exp.name}`")
    is_array = bool(sweep) if sweep is not None else len(param_sets) > 1
    program, version, prefix = _runtime_program(project.cache_dir if not dry_run else None)
    commit, dirty = runs.git_state(project.root) if not dry_run else (None, None)
    sweep_id = (sweep_mod.new_sweep_id() if dry_run else sweep_mod.allocate_sweep(layout)) if is_array else None
    res_dict = resources_dict(resources)
    hpcexp_argv = list(cmdline) if cmdline is not None else None
    # a sweep's command line holds every value of the sweep: kept once, in the sweep record,
    # and in each task's record only when short (else it made records grow with the sweep)
    argv_size = sum(len(a) + 1 for a in hpcexp_argv or ())
    host, user = hostinfo.hostname(), hostinfo.user()

    tasks: list[_Task] = []
    allocated: list[RunPaths] = []
    try:
        with runs.bulk():  # thousands of records and plans, no cycles among them
            if is_array:
                # A sweep's tasks get no folder here: their records are the part's durable
                # table until their first change (their job makes the folder when it
                # starts), and their ids name the sweep (core/sweeptable.py, docs/records.md).
                from hpcexp.core import sweeptable

                allocated = [layout.run(exp.name, rid)
                             for rid in sweeptable.task_run_ids(str(sweep_id), len(param_sets))]
                if not dry_run:
                    atomic.ensure_dir(layout.experiment_runs(exp.name))
                    if payload_env is not None:   # tracking keeps its state in the run folders
                        for p in allocated:
                            atomic.ensure_dir(p.dir)
            elif dry_run:
                allocated = [layout.run(exp.name, runs.new_run_id()) for _ in param_sets]
            elif len(param_sets) < 16:
                allocated = [runs.allocate_run(layout, exp.name) for _ in param_sets]
            else:
                # exclusive mkdirs are independent syscalls: overlap them (a sweep makes a thousand)
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=8) as pool:
                    futures = [pool.submit(runs.allocate_run, layout, exp.name) for _ in param_sets]
                    for fut in futures:
                        try:
                            allocated.append(fut.result())
                        except HpcexpError:
                            pass
                if len(allocated) != len(param_sets):
                    futures[[f.exception() is not None for f in futures].index(True)].result()
            if not dry_run:
                launch.ensure_mount_point(exp)  # once here, not raced by the array's tasks on the nodes
            extra_envs = payload_env(allocated, sweep_id) if (payload_env is not None and not dry_run) else {}
            for index, ps in enumerate(param_sets):
                paths = allocated[index]
                run_id = paths.dir.name
                plan = launch.plan(project, exp, image_path, paths, run_id=run_id, params=ps, args=args,
                                   image_workdir=info.get("workdir"), image_cmd=info.get("cmd"),
                                   image_entrypoint=info.get("entrypoint"), allow_binds=allow_binds, program=program,
                                   extra_env=extra_envs.get(run_id))
                merged = dict(exp.params)
                merged.update(ps)
                rec = runs.RunRecord(
                    experiment=exp.name, run_id=run_id, state="submitting", executor="slurm",
                    arch=arch or host_arch(), params=merged, args=list(args if args is not None else exp.args),
                    command=list(plan.argv), image=str(image_path), image_sha256=info.get("sha256"),
                    input_hash=info.get("input_hash"), recipe_sha256=info.get("recipe_sha256"),
                    apptainer_version=info.get("apptainer_version") or version, git_commit=commit, git_dirty=dirty,
                    sweep_id=sweep_id, task_index=index if is_array else None, resources=dict(res_dict),
                    executor_ids={"base_attempt": 1}, host=host, user=user,
                )
                rec.extra = {"container_env": dict(plan.container_env), "pwd": plan.pwd, "runtime": program}
                policy_extra = policy_record(checkpoint or exp.checkpoint, exp.requeue)
                if policy_extra:
                    rec.extra.update(policy_extra)
                    rec.extra["container_env"]["HPCEXP_CHECKPOINT_DIR"] = plan.container_env["HPCEXP_RESULTS"] \
                        + "/checkpoint"
                if info.get("source_ref"):
                    rec.extra["image_ref"] = info["source_ref"]   # the registry digest of the image
                if hpcexp_argv is not None and (not is_array or argv_size <= MAX_TASK_ARGV):
                    rec.extra["hpcexp_argv"] = hpcexp_argv
                if exp.services:  # started by the job script beside the payload (docs/services.md)
                    from hpcexp.execute.services import describe

                    rec.extra["services"] = describe(exp, service_images or {}, run_id)
                # results/ and events/ are made by the job script (mkdir -p): a thousand mkdirs here
                # would cost more than the whole sbatch call on a busy shared file system
                spec = sbatch.TaskSpec(run_id=run_id, run_dir=paths.dir, argv=tuple(plan.argv),
                                       container_env=dict(rec.extra["container_env"]), attempt=1,
                                       env_prefix=prefix)
                tasks.append(_Task(paths, rec, spec))
    except BaseException:
        if not dry_run:  # nothing was submitted: leave no half-made runs behind
            import shutil

            for p in allocated:
                shutil.rmtree(p.dir, ignore_errors=True)
            if sweep_id:
                shutil.rmtree(layout.sweep_dir(sweep_id), ignore_errors=True)
        raise
    sweep_record = None
    if is_array:
        sweep_record = {"sweep_id": sweep_id, "experiment": exp.name, "created_at": runs.utcnow(),
                        "size": len(tasks), "params": sorted({k for ps in param_sets for k in ps}),
                        "resources": res_dict, "image": str(image_path), "submissions": []}
        if hpcexp_argv is not None:
            sweep_record["hpcexp_argv"] = hpcexp_argv
    probe = None
    if env_probe is not None and extra_envs:
        names = sorted({k for env in extra_envs.values() for k in env})
        probe = (env_probe[0], int(env_probe[1]), tuple(names))
    return _submit_tasks(layout, exp.name, image_path, tasks, resources, sweep_id=sweep_id, array=is_array,
                         hold=hold, dry_run=dry_run, label_hint=f"; rebuild with `hpcexp build {exp.name}`",
                         sweep_record=sweep_record, fresh=True, env_probe=probe,
                         services=tasks[0].record.extra.get("services") or () if tasks else ())


def policy_record(checkpoint: Any, requeue: Any) -> dict[str, Any]:
    """The run record's ``checkpoint`` and ``requeue`` entries (what the job script and
    reconcile act on; kept in the record so that a resubmission keeps them)."""
    out: dict[str, Any] = {}
    if checkpoint is not None:
        out["checkpoint"] = {"signal": checkpoint.signal, "before": int(checkpoint.before)}
    if requeue is not None:
        out["requeue"] = {"on": list(requeue.on), "max_attempts": int(requeue.max_attempts)}
    return out


def _policies(rec: runs.RunRecord) -> tuple[tuple[str, int] | None, tuple[str, ...], int | None]:
    """(checkpoint (signal, seconds), requeue endings, max attempts) from a record."""
    ck = rec.extra.get("checkpoint")
    rq = rec.extra.get("requeue")
    ckpt = (str(ck["signal"]), int(ck["before"])) if isinstance(ck, dict) and ck.get("signal") else None
    if isinstance(rq, dict):
        return ckpt, tuple(str(e) for e in rq.get("on") or ()), int(rq.get("max_attempts") or 1)
    return ckpt, (), None


def _policy_options(ckpt: tuple[str, int] | None, requeue_on: Sequence[str], max_attempts: int | None
                    ) -> dict[str, str | None]:
    """sbatch options of the policies: the warning signal; ``--requeue`` with a requeue
    policy (``scontrol requeue`` refuses a job submitted with ``--no-requeue``), and
    ``--no-requeue`` with a policy that lists no ending at all."""
    opts: dict[str, str | None] = {}
    if ckpt is not None:
        opts["signal"] = f"B:{ckpt[0]}@{int(ckpt[1])}"
    if max_attempts is not None:
        opts["requeue" if requeue_on else "no-requeue"] = None
    return opts


def _discard_unsubmitted(layout: Layout, tasks: Sequence[_Task], sweep_id: str | None) -> None:
    """Remove the run folders (and sweep record) of a submission sbatch refused outright."""
    import shutil

    for t in tasks:
        shutil.rmtree(t.paths.dir, ignore_errors=True)
    if sweep_id:
        shutil.rmtree(layout.sweep_dir(sweep_id), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(layout.sweep(sweep_id))
    # and the folders made for them, when nothing else is in there (rmdir refuses otherwise)
    for folder in {t.paths.dir.parent for t in tasks} | ({layout.sweeps_dir()} if sweep_id else set()):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def resubmit_runs(project: Any, sweep_id: str, chosen: Sequence[tuple[RunPaths, runs.RunRecord]], *,
                  hold: bool = False, dry_run: bool = False, resources: SlurmResources | None = None
                  ) -> Submission:
    """Submit these runs of a sweep again as one new array: same run records and folders, a
    new attempt each (the previous attempt is kept in ``attempts`` and its logs stay)."""
    from hpcexp.execute import sweep as sweep_mod  # in-function: `hpcexp status` needs no sweep model
    from hpcexp.execute.slurm import sbatch  # the renderer: not needed by `hpcexp status`

    layout = Layout(project)
    record = sweep_mod.read_sweep(layout, sweep_id)
    exp_name = str(record.get("experiment") or chosen[0][1].experiment)
    image = Path(chosen[0][1].image or record.get("image") or "")
    if not image.is_file():
        raise UsageError(f"image {image} of sweep {sweep_id} no longer exists",
                         hint=f"rebuild it with `hpcexp build {exp_name}` (same inputs give the same image) "
                              "and resubmit")
    _, _, prefix = _runtime_program()
    base = dict(record.get("resources") or {})
    res = SlurmResources(partition=base.get("partition"), time=base.get("time"), cpus=base.get("cpus"),
                         mem=base.get("mem"), gpus=base.get("gpus"), account=base.get("account"),
                         qos=base.get("qos"), max_parallel=base.get("max_parallel"),
                         sbatch_args=tuple(base.get("sbatch_args") or ()))
    if resources is not None:
        res = res.merged(resources)
    check_resources(res)
    tasks: list[_Task] = []
    # the script each task ran last (a new sweep's tasks have no job.sbatch of their own)
    scripts = {str(sub.get("job_name")): Path(str(sub["script"])) for sub in record.get("submissions") or []
               if isinstance(sub, dict) and isinstance(sub.get("script"), str)}
    for paths, rec in chosen:
        rec = rec.copy()
        old_job_name = rec.executor_ids.get("job_name")
        env = rec.extra.get("container_env")
        if not isinstance(env, dict) or not rec.command:
            raise UsageError(f"run {rec.run_id} has no stored command to resubmit (made by an older hpcexp?)")
        rec.attempts.append({"attempt": rec.attempt, "job_id": rec.executor_ids.get("job_id"),
                             "state": rec.state, "started_at": rec.started_at, "ended_at": rec.ended_at,
                             "exit_code": rec.exit_code, "reason": rec.reason,
                             "slurm_state": rec.executor_ids.get("slurm_state"),
                             "slurm_output": rec.executor_ids.get("slurm_output")})
        rec.attempt += 1
        rec.state = "submitting"
        rec.started_at = rec.ended_at = None
        rec.exit_code = rec.signal = None
        rec.reason = rec.launch_error = None
        rec.executor_ids = {"base_attempt": rec.attempt, "resubmitted_at": runs.utcnow()}
        rec.resources = resources_dict(res)
        if not dry_run:
            _keep_old_script(paths, rec.attempt - 1, scripts.get(str(old_job_name)))
        spec = sbatch.TaskSpec(run_id=rec.run_id, run_dir=paths.dir, argv=tuple(rec.command),
                               container_env={str(k): str(v) for k, v in env.items()}, attempt=rec.attempt,
                               env_prefix=prefix)
        tasks.append(_Task(paths, rec, spec))
    first = len(record.get("submissions") or [])
    return _submit_tasks(layout, exp_name, image, tasks, res, sweep_id=sweep_id, array=True, hold=hold,
                         dry_run=dry_run, label_hint=f"; rebuild with `hpcexp build {exp_name}`",
                         first_chunk=first, sweep_record=record,
                         env_probe=_tracking_probe([t.spec.container_env for t in tasks]),
                         services=tasks[0].record.extra.get("services") or () if tasks else ())


def _keep_old_script(paths: RunPaths, attempt: int, part_script: Path | None) -> None:
    """Keep the script of the attempt before a resubmission as ``job.attempt-N.sbatch``: the
    run folder's ``job.sbatch``, or (a new sweep's task) its array part's script, linked."""
    old = paths.dir / f"job.attempt-{attempt}.sbatch"
    if old.exists():
        return
    if paths.script.exists():
        os.replace(paths.script, old)
    elif part_script is not None and part_script.is_file():
        atomic.ensure_dir(paths.dir)
        _link_script(part_script, old)


def _tracking_probe(envs: Sequence[Mapping[str, str]]) -> tuple[str, int, tuple[str, ...]] | None:
    """A resubmitted task keeps the MLflow variables of its first submission: its job checks
    again, at its start, that the server answers from the node (see sbatch.env_if_reachable)."""
    from urllib.parse import urlsplit

    for env in envs:
        uri = env.get("MLFLOW_TRACKING_URI")
        if uri:
            parts = urlsplit(uri)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            names = tuple(sorted(k for k in env if k.startswith("MLFLOW_")))
            return (parts.hostname or "", port, names) if parts.hostname else None
    return None


def resubmit_sweep(project: Any, sweep_id: str, *, which: Sequence[str] | None = None,
                   hold: bool = False, dry_run: bool = False, resources: SlurmResources | None = None
                   ) -> Submission:
    """Submit the sweep's tasks in the given states again, as one new array: each keeps its
    run record and folder and gets a new attempt (earlier attempts and logs are kept).

    The tasks' states are reconciled first (through :func:`hpcexp.execute.base.reconcile`),
    so a task that failed since the last ``status`` is resubmitted too. ``which`` defaults to
    :data:`hpcexp.execute.sweep.FAILED_STATES`."""
    from hpcexp.execute import sweep as sweep_mod  # in-function: `hpcexp status` needs no sweep model
    which = sweep_mod.FAILED_STATES if which is None else which
    layout = Layout(project)
    sweep_mod.read_sweep(layout, sweep_id)  # must exist
    items = runs.sweep_runs(layout, sweep_id)
    if items is None:  # a damaged sweep record: the records say which runs are its
        items = [(p, r) for p, r in runs.iter_runs(layout) if r.sweep_id == sweep_id]
    if not items:
        raise NotFound(f"sweep {sweep_id} has no runs")
    items = base.reconcile(layout, items)
    chosen = sorted([(p, r) for p, r in items if r.state in which], key=lambda t: t[1].task_index or 0)
    if not chosen:
        raise UsageError(f"sweep {sweep_id}: no task is {' or '.join(which)} "
                         f"({sweep_mod.summary(r.state for _, r in items)})")
    return resubmit_runs(project, sweep_id, chosen, hold=hold, dry_run=dry_run, resources=resources)


# --------------------------------------------------------------------------------------
# Waiting for submitted runs (submit --wait)
# --------------------------------------------------------------------------------------

def wait(layout: Layout, run_dirs: Sequence[Path], *, poll: float = 2.0,
         on_change: Any = None, sleep: Any = time.sleep) -> list[runs.RunRecord]:
    """Block until every run in ``run_dirs`` has settled; return their final records.

    Each round is one :func:`hpcexp.execute.base.reconcile` over all of them, that is one squeue
    call (and at most one sacct/scontrol call), whatever the number of tasks, so waiting on
    a large sweep does not load the controller. ``on_change(records)`` is called whenever
    the set of states changes (to print progress).
    """
    last: tuple[str, ...] | None = None
    while True:
        items = [(RunPaths(d), runs.read_record(RunPaths(d))) for d in run_dirs]
        items = base.reconcile(layout, items)
        records = [rec for _, rec in items]
        states = tuple(sorted(rec.state for rec in records))
        if states != last and on_change is not None:
            on_change(records)
        last = states
        if all(settled(rec) for rec in records):
            return records
        sleep(poll)

