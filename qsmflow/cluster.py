"""Run qsmflow's nipype workflows on a batch cluster: SLURM, SLURMGraph, SGE and PBS.

Each plugin here is nipype's plugin of the same name with three additions:

* **Per-node resources.** Every job requests what its node declares, ``mem_gb`` and
  ``n_procs`` (SLURM ``--mem``/``--cpus-per-task``; SGE ``h_vmem``/``-pe smp``; PBS
  ``mem``/``ppn``). Without ``--mem`` a SLURM partition with memory as a consumable resource
  gives each job the whole node's memory, so jobs run one at a time.
* **Threads from the job's allocation.** The batch script sets :data:`qsmflow.resources.THREAD_VARIABLES`
  (OpenMP, OpenBLAS/MKL, ITK) to the cores the job was given (``SLURM_CPUS_PER_TASK``,
  ``NSLOTS``, ``PBS_NUM_PPN``/``NCPUS``), i.e. its node's ``n_procs``; FFT workers follow the
  same allocation (:func:`qsmflow.resources.thread_count`). ``QSMFLOW_FFT_WORKERS`` set in the
  command's environment still caps them.
* **Cluster settings from the configuration** (``execution.cluster``: partition, account,
  time limit, extra submission arguments; see ``configs/slurm.yaml``), carried to the plugin
  in ``plugin_args['cluster']`` by :func:`qsmflow.execution.plugin_settings`.
* **Workarounds for nipype 1.x's failure modes** (locations in ``nipype/pipeline/plugins``):

  - ``slurm.py`` ``SLURMPlugin._submit_batchtask`` (likewise ``sge.py``, ``pbs.py``) names
    jobs with ``os.environ["LOGNAME"]``: a ``KeyError`` where LOGNAME is unset (containers,
    cron, some batch shells). Job names here come from the node's name only, and LOGNAME is
    set for the SGE/PBS submitters.
  - ``slurmgraph.py`` ``SLURMGraphPlugin.__init__`` sets ``_dont_resubmit_completed_jobs``
    only when ``plugin_args`` is non-empty, so ``plugin_args=None`` ends in an
    ``AttributeError``; its ``_sbatch_args`` is concatenated to per-node arguments without a
    space. Here the plugin always gets its attributes, and resubmits no finished node.
  - ``base.py`` ``SGELikeBatchManagerBase._get_result``: when a job ends without a result file
    (cancelled, killed, out of memory or time, node failure) the traceback it returns is a
    ``str``; ``tools.py`` ``report_crash`` then does ``traceback += [...]`` and the driver dies
    with ``TypeError: can only concatenate str (not "list") to str``, taking every other
    subject down. Here such a job becomes a :class:`ClusterJobError` in a text crash file
    (job id, final state, job log), a failure of that node only; its dependents are not run
    and everything else goes on. Rerunning the same command resumes.
  - The same ``_get_result`` waits ``job_finished_timeout`` for each such job in turn, so a
    partition-wide kill stalls the driver for minutes; a job that squeue reports ended
    without success (CANCELLED, FAILED, TIMEOUT, OUT_OF_MEMORY, ...) and without a result file
    is reported at once here.
  - ``slurm.py`` ``_submit_batchtask`` raises when ``sbatch`` refuses a job (e.g. more memory
    than any host has) and the whole run stops; here only that node fails.
  - The same ``_get_result`` takes any ``result_*.pklz`` in the node directory as the job's
    result, also one left by an earlier run with other inputs when the job died before the
    node started. The stale file is removed before the job is submitted.
  - ``base.py`` ``GraphPluginBase.run`` returns as soon as SLURMGraph has submitted the jobs:
    the command ends at once, failures are never reported, and the dependents of a failed job
    wait in the queue forever (``DependencyNeverSatisfied``). Here the dependents are
    cancelled by SLURM (``--kill-on-invalid-dep=yes``), the plugin waits for the jobs, and
    failed nodes are reported like those of the other plugins.
  - The polling interval (``poll_sleep_duration``) and the wait for a result file after a job
    ends (``job_finished_timeout``) are nipype *config* options; here they may also be given in
    ``plugin_args``.

On an interrupt (Ctrl-C or SIGTERM to the driver) the jobs still queued or running are
cancelled. After a SIGKILL they run on, so a SLURM run first cancels the jobs whose batch
scripts lie in its work directory: a rerun never races leftover jobs for the same node
directories.
"""
from __future__ import annotations

import getpass
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from socket import gethostname
from typing import Mapping

from nipype.pipeline.plugins.pbs import PBSPlugin as _NipypePBSPlugin
from nipype.pipeline.plugins.sge import SGEPlugin as _NipypeSGEPlugin
from nipype.pipeline.plugins.slurm import SLURMPlugin as _NipypeSLURMPlugin
from nipype.pipeline.plugins.slurmgraph import SLURMGraphPlugin as _NipypeSLURMGraphPlugin
from nipype.pipeline.plugins.tools import create_pyscript, report_crash

from .config import ConfigError

LOGGER = logging.getLogger("qsmflow")

#: Plugins of this module, by the name ``--plugin`` takes.
CLUSTER_PLUGINS = ("SLURM", "SLURMGraph", "SGE", "PBS")

#: Keys of ``execution.cluster`` (see configs/default.yaml).
CLUSTER_KEYS = ("partition", "account", "time", "extra_args", "request_resources")

#: ``plugin_args`` that nipype reads from its config instead; accepted here as plugin arguments.
LOOP_SETTINGS = ("poll_sleep_duration", "job_finished_timeout")

#: SLURM job states of a job that may still write its result.
SLURM_ACTIVE_STATES = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
}

#: SLURM job states of a job that ended without success (no waiting for its result file).
SLURM_FAILED_STATES = {"CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                       "DEADLINE", "REVOKED"}

_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


class ClusterJobError(RuntimeError):
    """A batch job ended without its node's result (cancelled, killed, out of memory or time)."""


@dataclass(frozen=True)
class ClusterSettings:
    """Submission settings shared by every job (``execution.cluster`` in the configuration).

    Attributes
    ----------
    partition : str or None
        SLURM partition (SGE/PBS queue); None leaves the cluster's default.
    account : str or None
        Account charged for the jobs; None leaves the user's default.
    time : str or None
        Wall-time limit of each job in SLURM's notation (``"90"`` minutes, ``"01:30:00"``,
        ``"1-00:00:00"``); None leaves the partition's default.
    extra_args : tuple of str
        Further submission arguments, placed after the generated ones so they override them.
    request_resources : bool
        Request each node's ``mem_gb`` and ``n_procs``.
    """

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    extra_args: tuple = ()
    request_resources: bool = True

    @classmethod
    def from_config(cls, section: Mapping | None) -> "ClusterSettings":
        """Validate ``execution.cluster``; raise :class:`~qsmflow.config.ConfigError` naming the key."""
        section = dict(section or {})
        unknown = sorted(set(section) - set(CLUSTER_KEYS))
        if unknown:
            raise ConfigError(f"configuration key 'execution.cluster.{unknown[0]}': unknown (known: {', '.join(CLUSTER_KEYS)})")
        for key in ("partition", "account"):
            value = section.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value)):
                raise ConfigError(f"configuration key 'execution.cluster.{key}': expected a name without spaces or null, got {value!r}")
        limit = section.get("time")
        if limit is not None:
            if not isinstance(limit, str):
                raise ConfigError(
                    f"configuration key 'execution.cluster.time': expected a quoted string such as \"02:00:00\", got {limit!r} "
                    "(YAML reads an unquoted 02:00:00 as a number of seconds)")
            time_limit_seconds(limit)
        extra = section.get("extra_args") or ()
        if isinstance(extra, str):
            try:
                extra = shlex.split(extra)
            except ValueError as error:
                raise ConfigError(f"configuration key 'execution.cluster.extra_args': {error}") from None
        elif not (isinstance(extra, (list, tuple)) and all(isinstance(item, str) for item in extra)):
            raise ConfigError(f"configuration key 'execution.cluster.extra_args': expected a string or a list of strings, got {extra!r}")
        request = section.get("request_resources", True)
        if not isinstance(request, bool):
            raise ConfigError(f"configuration key 'execution.cluster.request_resources': expected true or false, got {request!r}")
        return cls(partition=section.get("partition"), account=section.get("account"), time=limit,
                   extra_args=tuple(extra), request_resources=request)


def time_limit_seconds(limit: str) -> int | None:
    """Seconds of a SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``); None if unlimited."""
    text = limit.strip()
    if text.lower() in {"infinite", "unlimited"}:
        return None
    match = _TIME.match(text)
    if not match:
        raise ConfigError(f"configuration key 'execution.cluster.time': {limit!r} is not a time limit "
                          "(minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    parts = {key: int(value) for key, value in match.groupdict().items() if value is not None}
    if "days" in parts:
        seconds = parts["days"] * 86400 + parts["dh"] * 3600 + parts.get("dm", 0) * 60 + parts.get("ds", 0)
    elif "c" in parts:
        seconds = parts["a"] * 3600 + parts["b"] * 60 + parts["c"]
    else:
        seconds = parts["a"] * 60 + parts.get("b", 0)
    if seconds <= 0:
        raise ConfigError(f"configuration key 'execution.cluster.time': {limit!r} must be longer than zero")
    return seconds


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def node_resources(node) -> tuple[float, int]:
    """Memory (GB) and cores a nipype node declares."""
    return float(node.mem_gb), max(1, int(node.n_procs or 1))


def submission_args(scheduler: str, settings: ClusterSettings, mem_gb: float, n_procs: int) -> list[str]:
    """Submission arguments of one job for ``scheduler`` ('SLURM', 'SGE' or 'PBS').

    Memory is rounded up to whole MB. The configured ``extra_args`` come last.
    """
    megabytes = max(1, math.ceil(mem_gb * 1024))
    seconds = time_limit_seconds(settings.time) if settings.time else None
    args: list[str] = []
    if scheduler == "SLURM":
        if settings.partition:
            args.append(f"--partition={settings.partition}")
        if settings.account:
            args.append(f"--account={settings.account}")
        if settings.time:
            args.append(f"--time={settings.time.strip()}")
        if settings.request_resources:
            args += [f"--mem={megabytes}M", f"--cpus-per-task={n_procs}"]
    elif scheduler == "SGE":
        if settings.partition:
            args += ["-q", settings.partition]
        if settings.account:
            args += ["-A", settings.account]
        if seconds:
            args += ["-l", f"h_rt={_hms(seconds)}"]
        if settings.request_resources:
            args += ["-l", f"h_vmem={math.ceil(megabytes / n_procs)}M"]  # SGE memory is per slot
            if n_procs > 1:
                args += ["-pe", "smp", str(n_procs)]
    elif scheduler == "PBS":
        if settings.partition:
            args += ["-q", settings.partition]
        if settings.account:
            args += ["-A", settings.account]
        if seconds:
            args += ["-l", f"walltime={_hms(seconds)}"]
        if settings.request_resources:
            args += ["-l", f"mem={megabytes}mb,nodes=1:ppn={n_procs}"]
    else:
        raise ValueError(f"unknown scheduler {scheduler!r} (expected SLURM, SGE or PBS)")
    return args + list(settings.extra_args)


#: Shell expression of the cores a job was given, by scheduler.
ALLOCATED_CORES = {"SLURM": "${SLURM_CPUS_PER_TASK:-1}", "SGE": "${NSLOTS:-1}", "PBS": "${PBS_NUM_PPN:-${NCPUS:-1}}"}


def thread_exports(scheduler: str) -> str:
    """Batch-script line that sizes the job's native thread pools from its allocation, before
    Python starts (OpenBLAS starts one thread per CPU of the affinity mask otherwise, and SLURM
    need not bind a job to its cores)."""
    from .resources import THREAD_VARIABLES

    return f"qsmflow_cores={ALLOCATED_CORES[scheduler]}; export " + " ".join(f"{name}=$qsmflow_cores" for name in THREAD_VARIABLES)


def job_name(node) -> str:
    """A job name from the node alone (node first, as squeue truncates), e.g. ``invert_dipole.sub_01_MEGRE_wf.sub_01_wf``."""
    parts = node.fullname.split(".")
    return ".".join(reversed(parts[1:] if len(parts) > 2 else parts))


def login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def ensure_logname() -> None:
    """Set LOGNAME when unset, for nipype submitters that read it."""
    if not os.environ.get("LOGNAME"):
        os.environ["LOGNAME"] = login_name()


def _has_option(args, short: str, long: str) -> bool:
    return any(arg == short or arg.startswith(long) or (arg.startswith(short) and len(arg) > 2 and not arg.startswith("--"))
               for arg in args)


def _split_plugin_args(plugin_args) -> tuple[dict, ClusterSettings, dict, object]:
    args = dict(plugin_args or {})
    settings = args.pop("cluster", None)
    if not isinstance(settings, ClusterSettings):
        settings = ClusterSettings.from_config(settings)
    loop = {key: args.pop(key) for key in LOOP_SETTINGS if key in args}
    callback = args.pop("status_callback", None)
    return args, settings, loop, callback


def _remove_stale_result(node) -> None:
    for stale in glob(os.path.join(node.output_dir(), "result_*.pklz")):
        os.remove(stale)


def lost_job_traceback(scheduler: str, job_id, node, state: str | None, log: str | None) -> list[str]:
    """Crash-file lines for a job that ended without its node's result."""
    ended = f"ended ({state})" if state else "ended"
    return [
        f"{ClusterJobError.__module__}.{ClusterJobError.__name__}: {scheduler} job {job_id} {ended} without writing "
        f"a result; job log: {log or 'unknown'}\n",
        f"The job of node {node.fullname} was cancelled, killed, ran out of memory or time, or its compute node failed.\n",
        "Nodes that depend on it were not run. Rerun the same command to resume: finished nodes are reused.\n",
    ]


@contextmanager
def _cancel_jobs_on_interrupt(cancel):
    """Turn SIGTERM into KeyboardInterrupt while inside; on any exception, ``cancel()`` the jobs."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except BaseException:
        try:
            cancel()
        except Exception as error:  # the original exception matters more
            LOGGER.warning("could not cancel the submitted jobs: %s", error)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class SlurmQueue:
    """Job states from ``squeue``: one call per polling round for all of this user's jobs."""

    def __init__(self, max_age: float = 0.5):
        self.max_age = max_age
        self.states: dict[str, tuple[str, str]] = {}
        self.taken = -math.inf
        self.failed = False

    def refresh(self) -> None:
        try:
            answer = subprocess.run(["squeue", "-h", "-t", "all", "-u", str(os.getuid()), "-o", "%i|%T|%r"],
                                    capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            answer = None
            message = str(error)
        else:
            message = answer.stderr.strip()
        self.taken = time.monotonic()
        if answer is None or answer.returncode != 0:
            self.failed = True
            LOGGER.warning("squeue did not answer (%s); treating jobs as still running", message)
            return
        self.failed = False
        states = {}
        for line in answer.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 3:
                states[fields[0]] = (fields[1].split()[0], fields[2])
        self.states = states

    def state(self, job_id, *, since: float = -math.inf) -> tuple[str, str] | None:
        """(state, reason) of a job, from a listing taken after ``since``; None if SLURM forgot the job."""
        if time.monotonic() - self.taken > self.max_age or self.taken < since:
            self.refresh()
        return self.states.get(str(job_id))

    def is_active(self, job_id, *, since: float = -math.inf) -> bool:
        state = self.state(job_id, since=since)
        if self.failed:
            return True
        return state is not None and state[0] in SLURM_ACTIVE_STATES


def _describe(state: tuple[str, str] | None) -> str | None:
    """'CANCELLED' or 'FAILED, NonZeroExitCode' from squeue's (state, reason)."""
    if state is None:
        return None
    return state[0] + (f", {state[1]}" if state[1] and state[1] != "None" else "")


def _scancel(job_ids) -> None:
    job_ids = [str(job) for job in job_ids]
    if job_ids:
        LOGGER.warning("cancelling %d SLURM job(s) of this run", len(job_ids))
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def batch_dir(node) -> str:
    """Where nipype writes a node's batch scripts (``create_pyscript``): one folder per work directory."""
    top = node._hierarchy.split(".")[0] if node._hierarchy else ""
    return os.path.join(node.base_dir, top, "batch")


def cancel_leftover_jobs(nodes, queue: "SlurmQueue", *, wait: float = 120.0) -> list[str]:
    """Cancel SLURM jobs still queued or running from an earlier run of the same work directory.

    After the driver was killed (SIGKILL, a lost login session) its jobs run on; a rerun would
    race them for the same node directories. They are recognised by their batch script, which
    lies in this work directory, and cancelled; this waits until they have ended.
    """
    if not nodes:
        return []
    prefix = batch_dir(nodes[0]) + os.sep
    try:
        answer = subprocess.run(["squeue", "-h", "-u", str(os.getuid()), "-o", "%i|%T|%o"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    leftovers = [fields[0] for fields in (line.split("|", 2) for line in answer.stdout.splitlines())
                 if len(fields) == 3 and fields[1] in SLURM_ACTIVE_STATES and fields[2].startswith(prefix)]
    if not leftovers:
        return []
    LOGGER.warning("cancelling %d SLURM job(s) left running by an earlier run of this work directory", len(leftovers))
    subprocess.run(["scancel", *leftovers], capture_output=True, timeout=60)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        queue.refresh()
        if not any(queue.is_active(job) for job in leftovers):
            break
        time.sleep(0.5)
    return leftovers


def _sbatch(args: list[str], *, tries: int, retry_timeout: float) -> str:
    """Submit with ``sbatch --parsable``; return the job id. Raises ClusterJobError with sbatch's message."""
    message = ""
    for attempt in range(tries + 1):
        try:
            answer = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            message = str(error)
        else:
            if answer.returncode == 0 and answer.stdout.strip():
                return answer.stdout.strip().splitlines()[-1].split(";")[0]
            message = (answer.stderr or answer.stdout).strip().replace("\n", "; ")
        if attempt < tries:
            time.sleep(retry_timeout)
    raise ClusterJobError(f"sbatch could not submit the job: {message}")


class _BatchMixin:
    """Shared by the one-job-per-node plugins (SLURM, SGE, PBS): see the module docstring."""

    scheduler = "?"

    def _setup(self, plugin_args):
        args, self._settings, self._loop_settings, callback = _split_plugin_args(plugin_args)
        if callback is not None:
            args["status_callback"] = callback
        self._jobs: dict = {}  # task id -> dict(node=fullname, log=path, submitted=monotonic time)
        self._refused: dict = {}  # fake (negative) task id -> traceback lines, for jobs the scheduler refused
        self._refusals = 0
        return args

    def run(self, graph, config, updatehash=False):
        config = deepcopy(config)
        for key, value in self._loop_settings.items():
            config["execution"][key] = str(value)
        self._cancel_leftovers(graph)
        with _cancel_jobs_on_interrupt(self._cancel_active):
            return super().run(graph, config, updatehash=updatehash)

    def _cancel_leftovers(self, graph):
        """Jobs of an earlier run of this work directory: none for schedulers other than SLURM."""

    def _cancel_active(self):
        active = [task for task in self._pending if task not in self._refused]
        if active:
            self._cancel(active)

    def _cancel(self, task_ids):
        raise NotImplementedError

    def _submit_job(self, node, updatehash=False):
        """nipype's ``SGELikeBatchManagerBase._submit_job``, without a stale result; refusals fail the node."""
        _remove_stale_result(node)
        pyscript = create_pyscript(node, updatehash=updatehash)
        batch_dir, name = os.path.split(pyscript)
        name = ".".join(name.split(".")[:-1])
        batchscript = "\n".join((self._template.rstrip("\n"), thread_exports(self.scheduler), shlex.join([sys.executable, pyscript]), ""))
        batchscriptfile = os.path.join(batch_dir, f"batchscript_{name}.sh")
        with open(batchscriptfile, "w") as handle:
            handle.write(batchscript)
        try:
            return self._submit_batchtask(batchscriptfile, node)
        except ClusterJobError as error:
            # A refused submission (e.g. more memory than any host has) fails this node only.
            self._refusals += 1
            task = -self._refusals
            self._refused[task] = [f"{ClusterJobError.__module__}.{ClusterJobError.__name__}: {error}\n"]
            self._pending[task] = node.output_dir()
            return task

    def _get_result(self, taskid):
        if taskid in self._refused:
            return {"result": None, "traceback": self._refused[taskid], "hostname": gethostname()}
        result = super()._get_result(taskid)
        if result is not None and isinstance(result.get("traceback"), str):
            # base.py: no result file after job_finished_timeout; the str would crash report_crash.
            job = self._jobs.get(taskid, {})
            node = _NamedNode(job.get("node", "?"))
            result["traceback"] = lost_job_traceback(self.scheduler, taskid, node, self._final_state(taskid), job.get("log"))
        return result

    def _final_state(self, taskid) -> str | None:
        return None

    def _clear_task(self, taskid):
        self._refused.pop(taskid, None)
        self._jobs.pop(taskid, None)
        super()._clear_task(taskid)


class _NamedNode:
    def __init__(self, fullname):
        self.fullname = fullname


class SLURMPlugin(_BatchMixin, _NipypeSLURMPlugin):
    """nipype's SLURM plugin (one ``sbatch`` job per node) with per-node resources and the fixes above.

    ``plugin_args``: ``cluster`` (a mapping of ``execution.cluster`` settings), ``sbatch_args``
    (string, after the generated arguments), ``template`` (batch script header or file),
    ``max_jobs``, ``max_tries``, ``retry_timeout``, ``poll_sleep_duration``,
    ``job_finished_timeout``, ``status_callback``.
    """

    scheduler = "SLURM"

    def __init__(self, plugin_args=None, **kwargs):
        args = self._setup(plugin_args)
        super().__init__(plugin_args=args, **kwargs)
        self._queue = SlurmQueue()

    def _is_pending(self, taskid):
        return self._queue.is_active(taskid, since=self._jobs.get(taskid, {}).get("submitted", -math.inf))

    def _get_result(self, taskid):
        job = self._jobs.get(taskid)
        if job is not None:
            state = self._queue.state(taskid, since=job["submitted"])
            if state and state[0] in SLURM_FAILED_STATES and not glob(os.path.join(self._pending[taskid], "result_*.pklz")):
                # no need to wait job_finished_timeout for a result that cannot come
                return {"result": None, "hostname": gethostname(),
                        "traceback": lost_job_traceback("SLURM", taskid, _NamedNode(job["node"]), _describe(state), job["log"])}
        return super()._get_result(taskid)

    def _final_state(self, taskid):
        return _describe(self._queue.state(taskid, since=time.monotonic()))

    def _cancel(self, task_ids):
        _scancel(task_ids)

    def _cancel_leftovers(self, graph):
        cancel_leftover_jobs(list(graph.nodes()), self._queue)

    def _submit_batchtask(self, scriptfile, node):
        mem_gb, n_procs = node_resources(node)
        own = node.plugin_args if isinstance(node.plugin_args, dict) else {}
        node_args = shlex.split(own.get("sbatch_args", ""))
        user_args = [] if own.get("overwrite") else shlex.split(self._sbatch_args or "")
        args = submission_args("SLURM", self._settings, mem_gb, n_procs) + user_args + node_args
        log = os.path.join(os.path.dirname(scriptfile), "slurm-%j.out")
        if not _has_option(args, "-o", "--output"):
            args.append(f"--output={log}")
        args += ["--job-name", job_name(node), scriptfile]
        job_id = _sbatch(args, tries=self._max_tries, retry_timeout=self._retry_timeout)
        task = int(job_id)
        self._pending[task] = node.output_dir()
        self._jobs[task] = {"node": node.fullname, "log": log.replace("%j", job_id), "submitted": time.monotonic()}
        LOGGER.debug("submitted SLURM job %s for %s", job_id, node.fullname)
        return task


class _QsubMixin(_BatchMixin):
    """SGE and PBS: nipype's qsub submitters, given per-node arguments as ``qsub_args``."""

    def _submit_batchtask(self, scriptfile, node):
        ensure_logname()
        mem_gb, n_procs = node_resources(node)
        own = isinstance(node.plugin_args, dict) and node.plugin_args.get("overwrite")
        if not own:
            user_args = shlex.split(self._qsub_args or "") + shlex.split((node.plugin_args or {}).get("qsub_args", ""))
            args = submission_args(self.scheduler, self._settings, mem_gb, n_procs)
            directory = os.path.dirname(scriptfile)
            for flag in ("-o", "-e"):
                if flag not in user_args and flag not in args:
                    args += [flag, directory]
            node.plugin_args = {**(node.plugin_args or {}), "qsub_args": shlex.join(args + shlex.split((node.plugin_args or {}).get("qsub_args", "")))}
        try:
            task = super()._submit_batchtask(scriptfile, node)
        except RuntimeError as error:
            raise ClusterJobError(f"qsub could not submit the job: {error}") from None
        self._jobs[task] = {"node": node.fullname, "log": os.path.dirname(scriptfile), "submitted": time.monotonic()}
        return task

    def _cancel(self, task_ids):
        subprocess.run(["qdel", *map(str, task_ids)], capture_output=True, timeout=60)


class SGEPlugin(_QsubMixin, _NipypeSGEPlugin):
    """nipype's SGE plugin with per-node resources (``h_vmem`` per slot, ``-pe smp N``) and the fixes above."""

    scheduler = "SGE"

    def __init__(self, plugin_args=None, **kwargs):
        super().__init__(plugin_args=self._setup(plugin_args), **kwargs)


class PBSPlugin(_QsubMixin, _NipypePBSPlugin):
    """nipype's PBS/Torque plugin with per-node resources (``mem``, ``nodes=1:ppn=N``) and the fixes above."""

    scheduler = "PBS"

    def __init__(self, plugin_args=None, **kwargs):
        super().__init__(plugin_args=self._setup(plugin_args), **kwargs)


class SLURMGraphPlugin(_NipypeSLURMGraphPlugin):
    """The whole graph submitted at once, as SLURM jobs with ``afterok`` dependencies.

    Unlike nipype's SLURMGraph this waits for the jobs, skips nodes whose results are cached,
    cancels the dependents of a failed job, and reports failures as text crash files, so the
    command's exit code and failure summary mean what they mean with the other plugins.
    ``plugin_args`` as :class:`SLURMPlugin` (``status_callback`` is called as jobs start and end).
    """

    scheduler = "SLURM"

    def __init__(self, plugin_args=None, **kwargs):
        args, self._settings, self._loop_settings, self._callback = _split_plugin_args(plugin_args)
        self._max_tries = int(args.pop("max_tries", 2))
        self._retry_timeout = float(args.pop("retry_timeout", 2))
        # nipype sets _dont_resubmit_completed_jobs only for non-empty plugin_args.
        args.setdefault("dont_resubmit_completed_jobs", True)
        super().__init__(plugin_args=args, **kwargs)
        self._sbatch_args = self._sbatch_args or ""
        self._queue = SlurmQueue()
        self._jobs: dict[str, dict] = {}
        self._refused: list[str] = []

    def run(self, graph, config, updatehash=False):
        config = deepcopy(config)
        for key, value in self._loop_settings.items():
            config["execution"][key] = str(value)
        self._jobs, self._refused = {}, []
        cancel_leftover_jobs(list(graph.nodes()), self._queue)
        with _cancel_jobs_on_interrupt(lambda: _scancel([job for job in self._jobs if self._queue.is_active(job)])):
            super().run(graph, config, updatehash=updatehash)
            self._wait(float(config["execution"]["poll_sleep_duration"]))
        failures = self._refused + self._report()
        if failures:
            raise RuntimeError(f"{len(failures)} node(s) failed: " + ", ".join(failures))

    def _is_done(self, node) -> bool:
        if node.overwrite or (node.overwrite is None and node._interface.always_run):
            return False
        try:
            cached, updated = node.is_cached()
        except Exception:
            return False
        return cached and updated

    def _submit_graph(self, pyfiles, dependencies, nodes):
        job_ids: dict[int, str] = {}
        done: dict[int, bool] = {}
        for index, (pyscript, node) in enumerate(zip(pyfiles, nodes)):
            parents = dependencies.get(index, [])
            done[index] = all(done[parent] for parent in parents) and self._is_done(node)
            if done[index]:
                if self._callback:
                    self._callback(node, "start")
                    self._callback(node, "end")
                continue
            if any(not done[parent] and parent not in job_ids for parent in parents):
                continue  # a parent could not be submitted: not run
            _remove_stale_result(node)
            mem_gb, n_procs = node_resources(node)
            template, node_args = self._template, ""
            if isinstance(node.plugin_args, dict):
                template = node.plugin_args.get("template", template)
                node_args = node.plugin_args.get("sbatch_args", "")
            if os.path.isfile(template):
                template = Path(template).read_text()
            batch_dir, name = os.path.split(pyscript)
            name = ".".join(name.split(".")[:-1])
            script = os.path.join(batch_dir, f"batchscript_{name}.sh")
            Path(script).write_text("\n".join((template.rstrip("\n"), thread_exports("SLURM"), shlex.join([sys.executable, pyscript]), "")))
            args = submission_args("SLURM", self._settings, mem_gb, n_procs) + shlex.split(self._sbatch_args) + shlex.split(node_args)
            log = os.path.join(batch_dir, "slurm-%j.out")
            if not _has_option(args, "-o", "--output"):
                args.append(f"--output={log}")
            waits_for = [job_ids[parent] for parent in parents if parent in job_ids]
            if waits_for:
                args += [f"--dependency=afterok:{':'.join(waits_for)}", "--kill-on-invalid-dep=yes"]
            try:
                job_id = _sbatch([*args, "--job-name", job_name(node), script], tries=self._max_tries, retry_timeout=self._retry_timeout)
            except ClusterJobError as error:
                report_crash(node, traceback=[f"{ClusterJobError.__module__}.{ClusterJobError.__name__}: {error}\n"])
                self._refused.append(node.fullname)
                continue  # its dependents find no job to depend on and are not submitted either
            job_ids[index] = job_id
            self._jobs[job_id] = {"node": node, "log": log.replace("%j", job_id), "started": False}
        LOGGER.info("submitted %d SLURM job(s); %d node(s) cached", len(job_ids), sum(done.values()))

    def _wait(self, poll_seconds: float) -> None:
        remaining = set(self._jobs)
        while remaining:
            self._queue.refresh()
            for job_id in sorted(remaining):
                state = self._queue.states.get(job_id)
                job = self._jobs[job_id]
                if state and state[0] == "RUNNING" and not job["started"]:
                    job["started"] = True
                    if self._callback:
                        self._callback(job["node"], "start")
                if self._queue.failed or (state and state[0] in SLURM_ACTIVE_STATES):
                    continue
                remaining.discard(job_id)
                job["state"] = state
                never_ran = state is not None and state[0] == "CANCELLED" and "Dependency" in state[1]
                if self._callback and not never_ran:
                    if not job["started"]:  # ran between two polls
                        self._callback(job["node"], "start")
                    self._callback(job["node"], "end" if _finished(job["node"]) else "exception")
            if remaining:
                time.sleep(poll_seconds)

    def _report(self) -> list[str]:
        failures = []
        crashed = _crashed_nodes(self._config["execution"]["crashdump_dir"] if self._config else None)
        for job_id, job in self._jobs.items():
            node = job["node"]
            if _finished(node):
                continue
            state, reason = job.get("state") or ("", "")
            if state == "CANCELLED" and "Dependency" in reason:
                continue  # a parent failed; not run, like the dependents of a failed node elsewhere
            failures.append(node.fullname)
            if node.fullname in crashed:
                continue  # the job wrote its own crash file
            report_crash(node, traceback=lost_job_traceback("SLURM", job_id, node, _describe(job.get("state")), job["log"]))
        return failures


def _finished(node) -> bool:
    """The node's directory holds a result and the hash of a finished run."""
    directory = node.output_dir()
    return (os.path.isfile(os.path.join(directory, f"result_{node.name}.pklz"))
            and any(not path.endswith("_unfinished.json") for path in glob(os.path.join(directory, "_0x*.json"))))


def _crashed_nodes(crash_dir) -> set[str]:
    if not crash_dir or not os.path.isdir(crash_dir):
        return set()
    names = set()
    for path in glob(os.path.join(crash_dir, "crash-*.txt")):
        with open(path, errors="replace") as handle:
            first = handle.readline()
        if first.startswith("Node: "):
            names.add(first[6:].strip())
    return names


PLUGINS = {"SLURM": SLURMPlugin, "SLURMGraph": SLURMGraphPlugin, "SGE": SGEPlugin, "PBS": PBSPlugin}


#: Commands each plugin needs on PATH.
COMMANDS = {"SLURM": ("sbatch", "squeue", "scancel"), "SLURMGraph": ("sbatch", "squeue", "scancel"),
            "SGE": ("qsub", "qstat", "qdel"), "PBS": ("qsub", "qstat", "qdel")}


def make_plugin(name: str, plugin_args: dict | None):
    """An instance of the cluster plugin ``name`` (one of :data:`CLUSTER_PLUGINS`).

    Raises :class:`~qsmflow.config.ConfigError` when the scheduler's commands are not on PATH.
    """
    if name not in PLUGINS:
        raise ValueError(f"{name!r} is not a cluster plugin (expected one of {', '.join(CLUSTER_PLUGINS)})")
    missing = [command for command in COMMANDS[name] if shutil.which(command) is None]
    if missing:
        raise ConfigError(f"--plugin {name}: {', '.join(missing)} not found on PATH; run qsmflow where the "
                          "scheduler's commands work (e.g. a login node)")
    return PLUGINS[name](plugin_args=plugin_args)
