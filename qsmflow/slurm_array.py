"""One SLURM array task per participant, then the group step as a job that depends on the array.

``--plugin SLURMArray`` (``configs/slurm-array.yaml``) does not run the workflow in this process.
It writes a *submission* into ``WORK_DIR/slurm-array/<time>/``:

``labels.txt``
    the participants of this submission, one a line; array index ``i`` processes line ``i + 1``;
``config.yaml``
    the resolved configuration (preset, ``--config`` file, ``--set`` and ``--plugin-args``
    applied), so that every task runs exactly the configuration of the submitting command;
``participant.sbatch``
    the array task: ``qsmflow BIDS_DIR OUTPUT_DIR participant --participant-label <label>
    --plugin MultiProc --nprocs $SLURM_CPUS_PER_TASK --work-dir WORK_DIR --config config.yaml``;
``group.sbatch``
    the group step, ``qsmflow BIDS_DIR OUTPUT_DIR group ...``, submitted with
    ``--dependency=afterok:<array job>``;
``submission.json``, ``logs/``, ``exit-codes/<label>``
    job ids, job logs, and the exit code each task's command returned.

The group job waits for ``afterok``, not ``afterany``: a group analysis run on the subjects that
happened to succeed would be a different analysis from the one asked for, without anybody
noticing. When a task fails or is cancelled, SLURM cancels the group job
(``--kill-on-invalid-dep=yes``) instead of leaving it pending forever; resubmitting the same
command then submits the participants that are not done, and a new group job.

A participant is *done* when every output its work units declare exists
(:func:`participant_done`). A resubmission skips done participants and those whose task of an
earlier submission of the same work directory is still queued or running (the new group job
waits for those too), so that no two tasks ever work on one participant's cache at once.

Each task gets ``execution.array.cpus_per_task`` cores and ``execution.array.mem_gb`` of memory;
when ``mem_gb`` is null it is estimated from the memory the workflow's nodes declare (the
``cpus_per_task`` largest nodes of the largest participant may run at once, plus the driver).
MultiProc inside the task is limited to the same memory. Partition, account, time limit and
extra arguments come from ``execution.cluster`` (``execution.array.time`` overrides the limit).

By default the command returns once the jobs are queued, printing their ids and the
``qsmflow status`` command that follows them; with ``execution.array.wait: true`` (or
``--set execution.array.wait=true``) it waits until they end and reports like a local run (exit
code 1 if any participant or the group step failed). Interrupting the wait leaves the jobs
running: they do not depend on this process.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import yaml

from .cluster import SLURM_ACTIVE_STATES, ClusterJobError, ClusterSettings, _sbatch, submission_args
from .config import ConfigError

LOGGER = logging.getLogger("qsmflow")

#: The ``--plugin`` name of this mode.
ARRAY_PLUGIN = "SLURMArray"

#: Keys of ``execution.array`` (see configs/default.yaml).
ARRAY_KEYS = ("cpus_per_task", "mem_gb", "time", "max_parallel", "group", "wait", "poll_seconds")

#: Where submissions are written, under the work directory.
SUBMISSIONS = "slurm-array"

#: Memory of the participant command itself (Python, nipype, pybids), beside its nodes' own.
DRIVER_MEM_GB = 0.5

#: sbatch is tried again this many times, this many seconds apart, when it fails (a busy controller).
SBATCH_TRIES, SBATCH_RETRY_SECONDS = 2, 5.0

#: Commands this mode needs on PATH.
COMMANDS = ("sbatch", "squeue", "scancel")


@dataclass(frozen=True)
class ArraySettings:
    """``execution.array``: resources of each array task and how the command waits.

    Attributes
    ----------
    cpus_per_task : int
        Cores of each task; its MultiProc runs that many processes.
    mem_gb : float or None
        Memory of each task; None estimates it from the nodes' declared memory.
    time : str or None
        Wall-time limit of each task (SLURM notation, quoted); None takes ``execution.cluster.time``.
    max_parallel : int or None
        At most this many tasks run at once (``--array=0-N%max_parallel``); None: no limit.
    group : bool
        Submit the group step, to run once every participant succeeded.
    wait : bool
        Wait for the jobs to end and report, instead of returning once they are queued.
    poll_seconds : float
        Seconds between two ``squeue`` calls while waiting.
    """

    cpus_per_task: int = 4
    mem_gb: float | None = None
    time: str | None = None
    max_parallel: int | None = None
    group: bool = True
    wait: bool = False
    poll_seconds: float = 10.0

    @classmethod
    def from_config(cls, section: Mapping | None) -> "ArraySettings":
        """Settings from ``execution.array`` (types and ranges checked by :mod:`qsmflow.config`);
        raises :class:`~qsmflow.config.ConfigError` for a time limit SLURM would not read."""
        from .cluster import time_limit_seconds

        section = dict(section or {})
        settings = cls(**{key: section[key] for key in ARRAY_KEYS if key in section})
        if settings.time is not None:
            try:
                time_limit_seconds(settings.time)
            except ConfigError as error:
                raise ConfigError(str(error).replace("execution.cluster.time", "execution.array.time")) from None
        return settings


@dataclass
class Submission:
    """What one call of :func:`submit` queued."""

    directory: Path
    labels: list
    array_job: str | None
    group_job: str | None
    skipped_done: list
    skipped_active: dict  # label -> array task id of an earlier submission still queued or running


# --------------------------------------------------------------------------------------------
# Participants, their state and their resources

def participant_plan(bids_dir, output_dir, config: dict, participant_labels=()):
    """The participant level's plan (:mod:`qsmflow.levels`), its units of work collected."""
    from .levels import level_builder

    plan = level_builder("participant")(bids_dir, output_dir, config, list(participant_labels))
    if plan.workflow is not None:
        plan.collect()
    return plan


def participants_of(plan) -> list[str]:
    """Sorted labels of the participants with a unit of work or a refused one."""
    return sorted({unit.subject for unit in plan.units if unit.subject} |
                  {problem.subject for problem in plan.problems if problem.subject})


def participant_done(label: str, plan, output_dir) -> bool:
    """Every output that the participant's units of work declare exists (and none was refused)."""
    if any(problem.subject == label for problem in plan.problems):
        return False
    outputs = [Path(output_dir) / output for unit in plan.units if unit.subject == label for output in unit.outputs]
    return bool(outputs) and all(path.is_file() for path in outputs)


def node_memories(plan, labels) -> dict[str, list[float]]:
    """Declared ``mem_gb`` of every node of each participant's units: label -> list."""
    memories: dict[str, list[float]] = {label: [] for label in labels}
    for unit in plan.units:
        if unit.subject in memories:
            memories[unit.subject] += [float(plan.workflow.get_node(name).mem_gb) for name in unit.nodes]
    return memories


def estimate_task_mem_gb(node_memories: Mapping[str, list[float]], cpus_per_task: int) -> float:
    """Memory (GB) for a task: its driver plus the ``cpus_per_task`` largest nodes of the most
    demanding participant (MultiProc may run that many at once), rounded up to 0.1 GB."""
    peak = max((sum(sorted(memories, reverse=True)[:cpus_per_task]) for memories in node_memories.values()), default=0.0)
    return math.ceil((DRIVER_MEM_GB + peak) * 10) / 10


# --------------------------------------------------------------------------------------------
# The queue

def _squeue(*options) -> list[list[str]]:
    try:
        answer = subprocess.run(["squeue", "-h", "-r", *options], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"squeue did not answer: {error}") from None
    if answer.returncode != 0:
        raise RuntimeError(f"squeue did not answer: {answer.stderr.strip()}")
    return [line.split("|") for line in answer.stdout.splitlines() if line.strip()]


def active_jobs_of(work_dir: Path) -> list[dict]:
    """Jobs of earlier submissions of ``work_dir`` still queued or running.

    Each as ``{"job": "123_4" or "125", "state": ..., "kind": "participant" | "group",
    "label": participant label or None}``; recognised by their batch script, which lies in the
    work directory's submissions.
    """
    prefix = str(work_dir / SUBMISSIONS) + os.sep
    found = []
    for fields in _squeue("-u", str(os.getuid()), "-o", "%i|%T|%o"):
        if len(fields) != 3 or fields[1] not in SLURM_ACTIVE_STATES or not fields[2].startswith(prefix):
            continue
        script = Path(fields[2])
        job = {"job": fields[0], "state": fields[1], "kind": script.stem, "label": None}
        if script.name == "participant.sbatch" and "_" in fields[0]:
            index = fields[0].split("_", 1)[1]
            labels = (script.parent / "labels.txt").read_text().split()
            if index.isdigit() and int(index) < len(labels):
                job["label"] = labels[int(index)]
        found.append(job)
    return found


def job_states(job_ids) -> dict[str, tuple[str, str]]:
    """(state, reason) of each job or array task SLURM still knows, e.g. ``{"123_0": ("RUNNING", "None")}``.

    Array tasks are listed one by one. Jobs that SLURM forgot (``MinJobAge`` after they ended)
    are missing.
    """
    job_ids = [str(job) for job in job_ids if job]
    if not job_ids:
        return {}
    states = {}
    for fields in _squeue("-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"):
        if len(fields) == 3:
            states[fields[0]] = (fields[1], fields[2])
    return states


# --------------------------------------------------------------------------------------------
# Submission

def _cli(*arguments) -> str:
    return shlex.join([sys.executable, "-m", "qsmflow.cli", *map(str, arguments)])


def _task_script(directory: Path, participant_command: str) -> str:
    labels, codes = directory / "labels.txt", directory / "exit-codes"
    return "\n".join([
        "#!/bin/bash",
        "# qsmflow participant array (qsmflow/slurm_array.py): task i processes line i+1 of labels.txt.",
        "set -u",
        f'label=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(labels))})',
        'if [ -z "$label" ]; then',
        f'    echo "qsmflow: no participant for array index $SLURM_ARRAY_TASK_ID in {labels}" >&2',
        "    exit 2",
        "fi",
        'echo "qsmflow: participant $label, array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}, '
        '${SLURM_CPUS_PER_TASK:-1} CPU(s), on $(hostname)"',
        f'{participant_command} --participant-label "$label" --nprocs "${{SLURM_CPUS_PER_TASK:-1}}"',
        "code=$?",
        f'echo "$code" > {shlex.quote(str(codes))}/"$label"',
        'exit "$code"',
        "",
    ])


def _group_script(directory: Path, group_command: str) -> str:
    return "\n".join([
        "#!/bin/bash",
        "# qsmflow group step (qsmflow/slurm_array.py): runs once every participant task succeeded.",
        "set -u",
        group_command,
        "code=$?",
        f"echo \"$code\" > {shlex.quote(str(directory / 'exit-codes' / 'group'))}",
        'exit "$code"',
        "",
    ])


def _new_submission_dir(work_dir: Path) -> Path:
    root = work_dir / SUBMISSIONS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        directory = root / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            continue
        return directory
    raise RuntimeError(f"{root}: cannot create a new submission folder")


def task_config(config: dict, mem_gb: float) -> dict:
    """The configuration each task runs: the command's own, with MultiProc inside the task's memory."""
    resolved = json.loads(json.dumps(config))  # a plain copy, safe for YAML
    execution = resolved["execution"]
    execution.update(plugin="MultiProc", plugin_args={}, nprocs=None,
                     mem_gb=max(0.25, round(mem_gb - DRIVER_MEM_GB, 2)))
    return resolved


def submit(bids_dir, output_dir, *, config: dict, work_dir=None, participant_labels=()) -> Submission:
    """Submit the participants that are not done as one SLURM array, and the dependent group job
    (``qsmflow BIDS_DIR OUTPUT_DIR group`` with the same work directory and configuration).

    Parameters
    ----------
    bids_dir, output_dir : path
    config : dict
        Validated configuration (``execution.array`` and ``execution.cluster`` are read here).
    work_dir : path, optional
        Shared work directory (default ``OUTPUT_DIR/.work``); it must be on a file system the
        compute nodes see.
    participant_labels : list of str
        Participants to consider (default: all of the dataset).

    Returns
    -------
    Submission
    """
    from .bids import check_dataset, check_output_dir, check_writable_dir, write_dataset_description

    missing = [command for command in COMMANDS if shutil.which(command) is None]
    if missing:
        raise ConfigError(f"--plugin {ARRAY_PLUGIN}: {', '.join(missing)} not found on PATH; run qsmflow where the "
                          "cluster's commands work (e.g. a login node)")
    array = ArraySettings.from_config(config["execution"].get("array"))
    cluster = ClusterSettings.from_config(config["execution"].get("cluster"))
    # every task requests its cores and memory, whatever execution.cluster.request_resources says
    cluster = replace(cluster, time=array.time or cluster.time, request_resources=True)

    bids_dir, output_dir = Path(bids_dir).absolute(), Path(output_dir).absolute()
    work_dir = Path(work_dir or output_dir / ".work").absolute()
    check_dataset(bids_dir)
    check_output_dir(bids_dir, output_dir)
    plan = participant_plan(bids_dir, output_dir, config, participant_labels)
    check_writable_dir(work_dir, "work directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(output_dir, bids_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    active = active_jobs_of(work_dir)
    in_flight = {job["label"]: job["job"] for job in active if job["kind"] == "participant" and job["label"]}
    labels, done = [], []
    for label in participants_of(plan):
        if participant_done(label, plan, output_dir):
            done.append(label)
        elif label not in in_flight:
            labels.append(label)
    directory = _new_submission_dir(work_dir)
    (directory / "logs").mkdir()
    (directory / "exit-codes").mkdir()
    (directory / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    mem_gb = array.mem_gb or estimate_task_mem_gb(node_memories(plan, labels), array.cpus_per_task)
    config_file = directory / "config.yaml"
    config_file.write_text(yaml.safe_dump(task_config(config, mem_gb), sort_keys=False))
    resources = submission_args("SLURM", cluster, mem_gb, array.cpus_per_task)

    try:
        array_job, group_job = _submit_jobs(directory, labels, in_flight, array, resources, participant_labels,
                                            participant_command=_cli(bids_dir, output_dir, "participant", "--plugin",
                                                                     "MultiProc", "--work-dir", work_dir, "--config",
                                                                     config_file, "--progress", "log"),
                                            group_command=_cli(bids_dir, output_dir, "group", "--work-dir", work_dir,
                                                               "--config", config_file, "--progress", "log"))
    except ClusterJobError:
        shutil.rmtree(directory, ignore_errors=True)  # nothing half-submitted is left to resume from
        raise
    if done:
        LOGGER.info("%d participant(s) already done, not submitted: %s", len(done), ", ".join(f"sub-{l}" for l in done))
    if in_flight:
        LOGGER.info("%d participant(s) still queued or running from an earlier submission, not submitted again: %s",
                    len(in_flight), ", ".join(f"sub-{label} ({job})" for label, job in sorted(in_flight.items())))
    stale_groups = [job["job"] for job in active if job["kind"] == "group"]
    if stale_groups and group_job:  # replaced by the new group job, which also waits for the new tasks
        LOGGER.info("cancelling the group job %s of an earlier submission; %s replaces it", ", ".join(stale_groups), group_job)
        subprocess.run(["scancel", *stale_groups], capture_output=True, timeout=60)

    submission = Submission(directory=directory, labels=labels, array_job=array_job, group_job=group_job,
                            skipped_done=done, skipped_active=in_flight)
    (directory / "submission.json").write_text(json.dumps({
        "bids_dir": str(bids_dir), "output_dir": str(output_dir), "work_dir": str(work_dir), "labels": labels,
        "array_job": array_job, "group_job": group_job, "waits_for_earlier_tasks": in_flight, "already_done": done,
        "cpus_per_task": array.cpus_per_task, "mem_gb": mem_gb, "submitted": time.time(),
    }, indent=2) + "\n")
    return submission


def _submit_jobs(directory: Path, labels, in_flight: Mapping[str, str], array: ArraySettings, resources, participant_labels,
                 *, participant_command: str, group_command: str) -> tuple[str | None, str | None]:
    """sbatch the participant array and the group job; (array job id, group job id). When sbatch
    refuses the group job, the array just submitted is cancelled before the error is raised."""
    array_job = None
    if labels:
        script = directory / "participant.sbatch"
        script.write_text(_task_script(directory, participant_command))
        indices = f"0-{len(labels) - 1}" + (f"%{array.max_parallel}" if array.max_parallel else "")
        array_job = _sbatch([f"--array={indices}", *resources, "--job-name=qsmflow-participant",
                             f"--output={directory / 'logs' / 'participant-%A_%a.out'}", str(script)],
                            tries=SBATCH_TRIES, retry_timeout=SBATCH_RETRY_SECONDS)
        LOGGER.info("submitted SLURM array job %s: %d participant(s) (%s), %s", array_job, len(labels),
                    ", ".join(f"sub-{label}" for label in labels), " ".join(resources))
    if not array.group:
        LOGGER.info("execution.array.group is false: no group job submitted")
        return array_job, None
    selection = ["--participant-label", *participant_labels] if participant_labels else []
    script = directory / "group.sbatch"
    script.write_text(_group_script(directory, shlex.join([*shlex.split(group_command), *selection])))
    waits_for = ([array_job] if array_job else []) + sorted(in_flight.values())
    dependency = ([f"--dependency=afterok:{':'.join(waits_for)}", "--kill-on-invalid-dep=yes"] if waits_for else [])
    try:
        group_job = _sbatch([*resources, *dependency, "--job-name=qsmflow-group",
                             f"--output={directory / 'logs' / 'group-%j.out'}", str(script)],
                            tries=SBATCH_TRIES, retry_timeout=SBATCH_RETRY_SECONDS)
    except ClusterJobError:
        if array_job:
            subprocess.run(["scancel", array_job], capture_output=True, timeout=60)
        raise
    LOGGER.info("submitted the group job %s%s", group_job,
                f", which starts once {', '.join(waits_for)} succeeded" if waits_for else "")
    return array_job, group_job


# --------------------------------------------------------------------------------------------
# Waiting and reporting

def task_ids(submission: Submission) -> dict[str, str]:
    """label -> array task id (``<array job>_<index>``) of the submission's participants."""
    return {label: f"{submission.array_job}_{index}" for index, label in enumerate(submission.labels)}


def wait_for(submission: Submission, poll_seconds: float) -> dict[str, tuple[str, str] | None]:
    """Block until none of the submission's jobs is queued or running; their last (state, reason)."""
    watched = list(task_ids(submission).values()) + list(submission.skipped_active.values())
    if submission.group_job:
        watched.append(submission.group_job)
    last: dict[str, tuple[str, str] | None] = {job: None for job in watched}
    while True:
        jobs = [job for job in watched if last[job] is None or last[job][0] in SLURM_ACTIVE_STATES]
        if not jobs:
            return last
        array_ids = {job.split("_")[0] for job in jobs}
        states = job_states(sorted(array_ids))
        for job in jobs:
            if job in states:
                last[job] = states[job]
            elif last[job] is not None and last[job][0] in SLURM_ACTIVE_STATES:
                last[job] = ("ENDED", "forgotten by SLURM")
            elif last[job] is None:
                last[job] = ("ENDED", "not listed by squeue")
        if any(last[job] is None or last[job][0] in SLURM_ACTIVE_STATES for job in watched):
            time.sleep(poll_seconds)


def _exit_code(directory: Path, name: str) -> int | None:
    path = directory / "exit-codes" / name
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no job log"
    errors = [line for line in lines if line.startswith("qsmflow: error:")]
    return errors[-1][len("qsmflow: error: "):] if errors else (lines[-1] if lines else "empty job log")


def report(submission: Submission, states: Mapping[str, tuple[str, str] | None], output_dir) -> tuple[str, int]:
    """A table (participant or group, job, state, detail) and the exit code of a local run (0 or 1)."""
    rows = [("step", "job", "state", "detail")]
    failed = 0
    for label, job in task_ids(submission).items():
        code = _exit_code(submission.directory, label)
        state = (states.get(job) or ("?", ""))[0]
        log = submission.directory / "logs" / f"participant-{job}.out"
        if code == 0:
            rows.append((f"sub-{label}", job, "done", str(output_dir)))
            continue
        failed += 1
        detail = _last_error(log) if code is not None else f"ended {state} without finishing"
        rows.append((f"sub-{label}", job, "failed", f"{detail}  [{log}]"))
    for label, job in sorted(submission.skipped_active.items()):
        state = (states.get(job) or ("?", ""))[0]
        ok = state == "COMPLETED"
        failed += not ok
        rows.append((f"sub-{label}", job, "done" if ok else "failed", f"earlier submission, ended {state}"))
    if submission.group_job:
        code = _exit_code(submission.directory, "group")
        state, reason = states.get(submission.group_job) or ("?", "")
        log = submission.directory / "logs" / f"group-{submission.group_job}.out"
        if code == 0:
            rows.append(("group", submission.group_job, "done", str(output_dir)))
        else:
            failed += 1
            detail = (_last_error(log) + f"  [{log}]" if code is not None
                      else "not run: a participant task did not succeed" if "Dependency" in reason or state == "CANCELLED"
                      else f"ended {state} without finishing")
            rows.append(("group", submission.group_job, "failed", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join(lines), 1 if failed else 0


def run_array(bids_dir, output_dir, *, config: dict, work_dir=None, participant_labels=(), stream=None) -> int:
    """``--plugin SLURMArray`` of the participant level: submit, then return or wait; the exit code."""
    stream = stream or sys.stdout
    output_dir = Path(output_dir).absolute()
    work_dir = Path(work_dir or output_dir / ".work").absolute()
    array = ArraySettings.from_config(config["execution"].get("array"))
    submission = submit(bids_dir, output_dir, config=config, work_dir=work_dir, participant_labels=participant_labels)
    jobs = [job for job in (submission.array_job, submission.group_job) if job]
    if not jobs:
        print("nothing to submit: every participant is done", file=stream)
        return 0
    print(f"submitted: participant array {submission.array_job or '-'} ({len(submission.labels)} task(s)), "
          f"group job {submission.group_job or '-'}; submission in {submission.directory}", file=stream)
    if not array.wait:
        print(f"follow with: squeue -j {','.join(jobs)}   and   qsmflow status {work_dir} {output_dir}", file=stream)
        return 0
    try:
        states = wait_for(submission, array.poll_seconds)
    except KeyboardInterrupt:
        print(f"qsmflow: stopped waiting; the jobs run on (scancel {' '.join(jobs)} to stop them)", file=sys.stderr)
        return 130
    table, code = report(submission, states, output_dir)
    print(table, file=stream if code == 0 else sys.stderr)
    return code
