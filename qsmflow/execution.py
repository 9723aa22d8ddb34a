"""Run nipype workflows, and turn their crashes into a readable summary."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)):\s*(.+)$")


@dataclass
class Failure:
    """One crashed node (or a unit refused before the run) and the unit of work it belongs to."""

    subject: str
    unit: str
    node: str
    reason: str
    crash_file: str
    node_path: str = ""  # the node's dotted name as nipype gives it (top workflow first)


def _execution_settings(crash_dir: Path) -> dict:
    return {
        "hash_method": "content",
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "remove_unnecessary_outputs": False,
        "stop_on_first_crash": False,
        "parameterize_dirs": False,
        "create_report": False,
    }


def configure_nipype(work_dir: Path, crash_dir: Path, *, debug: bool = False) -> None:
    """Global nipype settings: content hashing, text crash files, quiet logs."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    os.environ.setdefault("LOGNAME", os.environ.get("USER") or "qsmflow")
    nipype_config.update_config({
        "execution": _execution_settings(crash_dir),
        "logging": {"workflow_level": "INFO" if debug else "WARNING", "interface_level": "WARNING", "utils_level": "WARNING"},
        "monitoring": {"enabled": False},
    })
    nipype_logging.update_logging(nipype_config)


def _nipype_plugins() -> list[str]:
    from nipype.pipeline import plugins

    return sorted(name[:-len("Plugin")] for name in dir(plugins) if name.endswith("Plugin") and name != "Plugin")


def plugin_settings(config: dict) -> tuple[str, dict]:
    """nipype plugin name and arguments from the ``execution`` section of a configuration.

    For the cluster plugins (:data:`qsmflow.cluster.CLUSTER_PLUGINS`) the validated
    ``execution.cluster`` settings travel in ``plugin_args['cluster']``; a ``cluster`` mapping
    already in ``plugin_args`` (e.g. from ``--plugin-args FILE``) overrides them key by key.
    Raises :class:`~qsmflow.config.ConfigError` for an unknown plugin or a bad cluster setting.
    """
    from .cluster import CLUSTER_PLUGINS, ClusterSettings
    from .config import ConfigError
    from .resources import available_cpus

    execution = config["execution"]
    plugin = execution["plugin"]
    known = _nipype_plugins()
    if plugin == "SLURMArray":  # qsmflow.slurm_array: submits whole participant runs, runs no workflow here
        raise ConfigError("configuration key 'execution.plugin': SLURMArray submits participant-level runs "
                          "(qsmflow BIDS_DIR OUTPUT_DIR participant --plugin SLURMArray); here use MultiProc or a "
                          "per-node cluster plugin (SLURM, SLURMGraph, SGE, PBS)")
    if plugin not in known:
        raise ConfigError(f"configuration key 'execution.plugin': {plugin!r} is not a nipype plugin (known: {', '.join(known)})")
    plugin_args = dict(execution["plugin_args"] or {})
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", execution["nprocs"] or available_cpus())
        if execution["mem_gb"]:
            plugin_args.setdefault("memory_gb", execution["mem_gb"])
        plugin_args.setdefault("raise_insufficient", False)
    if plugin in CLUSTER_PLUGINS:
        extra = plugin_args.get("cluster") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"plugin argument 'cluster': expected a mapping, got {extra!r}")
        plugin_args["cluster"] = ClusterSettings.from_config({**(execution.get("cluster") or {}), **extra})
    return plugin, plugin_args


def run_workflow(workflow, work_dir, *, plugin: str = "MultiProc", plugin_args: dict | None = None, debug: bool = False,
                 status_callback=None, units=()) -> list[Failure]:
    """Run ``workflow`` with its cache in ``work_dir``; return the failed nodes (empty on success),
    each attributed to its unit among ``units``.

    ``status_callback(node, status)`` is nipype's plugin callback ('start', 'end', 'exception').
    SLURM, SLURMGraph, SGE and PBS run through :mod:`qsmflow.cluster`. ``poll_sleep_duration``
    and ``job_finished_timeout`` in ``plugin_args`` set nipype's options of those names.
    """
    from .cluster import CLUSTER_PLUGINS, LOOP_SETTINGS, make_plugin
    from .resources import limited_threads

    plugin_args = dict(plugin_args or {})
    if status_callback is not None:
        plugin_args["status_callback"] = status_callback
    loop_settings = {key: str(plugin_args.pop(key)) for key in LOOP_SETTINGS if key in plugin_args}
    work_dir = Path(work_dir).resolve()
    # one folder per process: runs sharing a work directory (array tasks) start in the same second
    crash_dir = work_dir / "crashes" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    configure_nipype(work_dir, crash_dir, debug=debug)
    workflow.base_dir = str(work_dir)
    _apply_execution_settings(workflow, {**_execution_settings(crash_dir), **loop_settings})
    try:
        if plugin in CLUSTER_PLUGINS:  # each job sizes its threads from its allocation (cluster.py)
            workflow.run(plugin=make_plugin(plugin, plugin_args))
        else:
            with limited_threads():  # BLAS/OpenMP/ITK of this process and its workers, like the FFTs
                if plugin == "MultiProc":
                    workflow.run(plugin=_resilient_multiproc_plugin()(plugin_args=plugin_args))
                else:
                    workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as error:
        failures = read_crash_files(crash_dir, units)
        if not failures:
            raise RuntimeError(f"the workflow failed without a crash file: {error}") from None
        return failures
    return []


def _apply_execution_settings(workflow, settings: dict) -> None:
    """Put ``settings`` into the ``execution`` configuration of ``workflow`` and of every workflow
    and node inside it. nipype copies its global configuration into each node when the node is
    made and lets that copy win when the workflow runs, so nodes built before
    :func:`configure_nipype` would otherwise keep nipype's defaults (e.g. timestamp hashing)."""
    stack = [workflow]
    while stack:
        element = stack.pop()
        if element.config is not None:  # a node without its own configuration takes the workflow's
            element.config.setdefault("execution", {}).update(settings)
        if hasattr(element, "_graph"):
            stack.extend(element._graph.nodes())


def _resilient_multiproc_plugin():
    """nipype's MultiProc plugin, made to survive a worker process that dies.

    When a worker is killed (e.g. by the kernel's out-of-memory killer), nipype's MultiProc
    loses the nodes that pool was running and waits for them forever. Here each lost node
    becomes a failure with a readable reason (and a crash file), the pool is rebuilt, and the
    rest of the cohort goes on.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

    class ResilientMultiProcPlugin(MultiProcPlugin):
        def _submit_job(self, node, updatehash=False):
            if getattr(self, "_pool_broken", False):
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = ProcessPoolExecutor(max_workers=self.processors, initializer=process_initializer,
                                                initargs=(self._cwd,))
                self._pool_broken = False
            self._taskid += 1
            if getattr(node.interface, "terminal_output", "") == "stream":
                node.interface.terminal_output = "allatonce"
            future = self.pool.submit(run_node, node, updatehash, self._taskid)
            future.add_done_callback(partial(self._collect, self._taskid, node.fullname))
            self._task_obj[self._taskid] = future
            return self._taskid

        def _collect(self, taskid, name, future):
            try:
                self._taskresult[taskid] = future.result()
            except Exception as error:  # BrokenProcessPool: the worker died without a result
                self._pool_broken = True
                reason = (f"WorkerDiedError: the process running {name} died without a result "
                          f"({type(error).__name__}; often the out-of-memory killer); rerun to retry\n")
                self._taskresult[taskid] = {"result": None, "traceback": [reason], "taskid": taskid}

    return ResilientMultiProcPlugin


def read_crash_files(crash_dir, units=()) -> list[Failure]:
    """Parse nipype's text crash files into :class:`Failure` records.

    Each failure is attributed to the unit of work (:mod:`qsmflow.workunits`) among ``units``
    that holds its node; without one, unit and subject are ``?``.
    """
    from .workunits import unit_of_node

    failures = []
    for crash_file in sorted(Path(crash_dir).glob("crash-*.txt")):
        text = crash_file.read_text(errors="replace")
        node_match = re.search(r"^Node: (\S+)", text, re.MULTILINE)
        node_path = node_match.group(1) if node_match else "?"
        unit = unit_of_node(list(units), node_path)
        failures.append(Failure(
            subject=(unit.subject or "-") if unit else "?", unit=unit.name if unit else "?",
            node=node_path.rsplit(".", 1)[-1], reason=_reason(text), crash_file=str(crash_file), node_path=node_path,
        ))
    return failures


def _reason(text: str) -> str:
    errors = [m for m in (_ERROR_LINE.match(line) for line in text.splitlines()) if m]
    meaningful = [m for m in errors if "Exception raised while executing Node" not in m.group(3)]
    chosen = (meaningful or errors)
    if not chosen:
        return "unknown error (see crash file)"
    match = chosen[-1]
    kind = match.group(1).rsplit(".", 1)[-1]
    return f"{kind}: {match.group(3).strip()}"


def format_failures(failures: list[Failure], noun: str = "scan") -> str:
    """A plain-text table of failures: subject, unit (headed ``noun``), node, reason, crash file."""
    rows = [("subject", noun, "node", "reason", "crash file")] + [
        (f.subject, f.unit, f.node, f.reason, f.crash_file) for f in failures
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(lines)
