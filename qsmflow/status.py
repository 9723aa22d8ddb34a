"""Where a run stands: which units of work are done, which failed and why, which are pending.

A run records what it is about to do in ``WORK_DIR/.qsmflow/``: one small JSON file per unit
of work (``units/<unit>.json``: its kind, subject, nodes and outputs, or why it could not
start; see :mod:`qsmflow.workunits`) and one per run (``runs/<time>-<host>-<pid>.json``:
command, start, end, exit code). Files per unit rather than one shared file, so that jobs
processing different subjects with the same work directory (one cluster job per subject)
never overwrite each other's records.

:func:`cohort_status` reads these records, nipype's cache and crash files, and the
derivatives, and classifies every unit:

``done``
    all its outputs are in the output directory (written last, atomically) and all its nodes
    have finished in the cache (so the outputs of an earlier configuration do not count once a
    run with another one has started the unit);
``failed``
    its inputs were refused before the run, or a crash file of the last run that took the unit
    names one of its nodes and that node has not succeeded since;
``running``
    a run that is still alive (same host, live process) has started one of its nodes;
``pending``
    everything else (not started, or stopped part-way: rerun to resume).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .bids import atomic_write_json

RECORDS = ".qsmflow"


@dataclass
class UnitStatus:
    """State of one unit of work."""

    name: str
    subject: str | None
    state: str
    nodes_done: int
    nodes_total: int
    kind: str = "scan"
    node: str = ""
    reason: str = ""
    crash_file: str = ""
    output: str = ""


# --------------------------------------------------------------------------------------------
# Records written by a run
def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def record_units(work_dir, output_dir, top_workflow: str, units, problems=(), *, level: str = "participant") -> None:
    """Record the units of work a run is about to process, and those refused before it.

    Parameters
    ----------
    work_dir, output_dir : path
    top_workflow : str
        Name of the run's top workflow (its folder in ``work_dir``).
    units : list of qsmflow.workunits.WorkUnit
    problems : list of qsmflow.levels.Problem
        Units that could not start, with the reason.
    """
    directory = Path(work_dir) / RECORDS / "units"
    common = {"output_dir": str(Path(output_dir).absolute()), "workflow": top_workflow, "level": level, "recorded": time.time()}
    for unit in units:
        atomic_write_json(directory / f"{_safe_name(unit.name)}.json", {**unit.record(), **common})
    for problem in problems:
        atomic_write_json(directory / f"{_safe_name(problem.unit)}.json",
                          {"name": problem.unit, "subject": problem.subject, "invalid": problem.reason, **common})


def start_run_record(work_dir, command) -> Path:
    """Record the start of a run; returns the record to pass to :func:`end_run_record`."""
    host, pid = socket.gethostname(), os.getpid()
    path = Path(work_dir) / RECORDS / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{_safe_name(host)}-{pid}.json"
    atomic_write_json(path, {"command": list(command), "host": host, "pid": pid, "started": time.time()})
    return path


def end_run_record(path, exit_code: int) -> None:
    record = json.loads(Path(path).read_text())
    record.update(ended=time.time(), exit_code=int(exit_code))
    atomic_write_json(Path(path), record)


# --------------------------------------------------------------------------------------------
# Reading the state
def _node_state(node_dir: Path) -> tuple[str, float]:
    """('done' | 'started' | 'failed' | 'new', time of the last change) of a nipype node folder."""
    if not node_dir.is_dir():
        return "new", 0.0
    hashes = list(node_dir.glob("_0x*.json"))
    finished = [p.stat().st_mtime for p in hashes if not p.name.endswith("_unfinished.json")]
    unfinished = [p.stat().st_mtime for p in hashes if p.name.endswith("_unfinished.json")]
    # a run with other inputs (e.g. a new configuration) that started the node makes the
    # result of the earlier inputs history
    if unfinished and (not finished or max(unfinished) >= max(finished)):
        return "started", max(unfinished)
    if finished:
        return "done", max(finished)
    results = list(node_dir.glob("result_*.pklz"))
    if results:  # a result without a hash file: the node raised
        return "failed", max(p.stat().st_mtime for p in results)
    return "new", 0.0


def _live_runs(work_dir: Path) -> list[dict]:
    """Run records without an end whose process is alive on this host."""
    live = []
    host = socket.gethostname()
    for path in sorted((work_dir / RECORDS / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "ended" in record or record.get("host") != host:
            continue
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        live.append(record)
    return live


def last_run(work_dir) -> dict | None:
    """The most recently started run record, with ``state`` running / ended / stopped."""
    paths = sorted((Path(work_dir) / RECORDS / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        return None
    record = json.loads(paths[-1].read_text())
    if "ended" in record:
        record["state"] = "ended"
    elif record.get("host") == socket.gethostname() and any(r["pid"] == record["pid"] for r in _live_runs(Path(work_dir))):
        record["state"] = "running"
    else:
        record["state"] = "stopped"  # killed, or running on another host
    return record


def _latest_crashes(work_dir: Path, units) -> dict:
    """Newest crash per unit of work: {unit name: Failure}."""
    from .execution import read_crash_files

    latest = {}
    crash_root = work_dir / "crashes"
    directories = sorted({p.parent for p in crash_root.rglob("crash-*.txt")}) if crash_root.is_dir() else []
    for directory in directories:
        for failure in read_crash_files(directory, units):
            mtime = Path(failure.crash_file).stat().st_mtime
            if failure.unit not in latest or mtime >= latest[failure.unit][0]:
                latest[failure.unit] = (mtime, failure)
    return {key: failure for key, (_, failure) in latest.items()}


def read_records(work_dir) -> list[dict]:
    """The unit records of ``work_dir`` (see :func:`record_units`), sorted by name."""
    records = {}
    for path in sorted((Path(work_dir) / RECORDS / "units").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        records[record["name"]] = record
    return [records[name] for name in sorted(records)]


def cohort_status(work_dir, output_dir=None) -> list[UnitStatus]:
    """Classify every unit of work recorded in ``work_dir`` (see the module docstring).

    Parameters
    ----------
    work_dir : path
        The run's ``--work-dir`` (nipype cache, crash files, qsmflow's records).
    output_dir : path, optional
        Where to look for the outputs; by default where the run that recorded each unit wrote them.

    Returns
    -------
    list of UnitStatus, sorted by unit name.
    """
    from .workunits import WorkUnit

    work_dir = Path(work_dir).absolute()
    records = read_records(work_dir)
    units = [WorkUnit(kind=r.get("kind", "scan"), name=r["name"], subject=r.get("subject"), outputs=r.get("outputs", []),
                      nodes=[f"{r['workflow']}.{n}" for n in r.get("nodes", [])]) for r in records if not r.get("invalid")]
    crashes = _latest_crashes(work_dir, units)
    running = bool(_live_runs(work_dir))
    statuses = []
    for record in records:
        kind = record.get("kind", "scan")
        if record.get("invalid"):
            statuses.append(UnitStatus(record["name"], record.get("subject"), "failed", 0, 0, kind=kind,
                                       node="(input check)", reason=record["invalid"]))
            continue
        root = Path(output_dir).absolute() if output_dir is not None else Path(record["output_dir"])
        nodes = record.get("nodes") or []
        states = {node: _node_state(work_dir / record["workflow"] / node.replace(".", "/")) for node in nodes}
        done = sum(1 for state, _ in states.values() if state == "done")
        status = UnitStatus(record["name"], record.get("subject"), "pending", done, len(nodes), kind=kind)
        outputs = [root / p for p in record.get("outputs", [])]
        crash = crashes.get(record["name"])
        if crash is not None:
            node = crash.node_path.split(".", 1)[-1]
            state, changed = states.get(node, ("new", 0.0))
            crashed = Path(crash.crash_file).stat().st_mtime
            # a crash of an earlier run than the last one that took this unit (the input may
            # have been repaired), or of a node that succeeded since, is history
            if not (crashed < record.get("recorded", 0.0) or (state == "done" and changed > crashed)):
                status.state, status.node, status.reason, status.crash_file = "failed", crash.node, crash.reason, crash.crash_file
        if status.state == "pending":
            if outputs and all(p.is_file() for p in outputs) and done == len(nodes):
                status.state, status.output = "done", str(outputs[-1])
            elif running and any(state == "started" for state, _ in states.values()):
                status.state = "running"
                status.node = ", ".join(node.rsplit(".", 1)[-1] for node, (state, _) in states.items() if state == "started")
        statuses.append(status)
    _wait_for_upstream(statuses, records)
    return statuses


def _wait_for_upstream(statuses: list[UnitStatus], records: list[dict]) -> None:
    """A unit whose inputs come from units that are not done (e.g. a group fit after a scan that
    failed on rerun) is pending, whatever its own outputs say: they are out of date."""
    by_name = {status.name: status for status in statuses}
    after = {record["name"]: record.get("after", []) for record in records}
    changed = True
    while changed:
        changed = False
        for status in statuses:
            if status.state == "done" and any(by_name.get(name) is not None and by_name[name].state != "done"
                                              for name in after.get(status.name, [])):
                status.state, status.output = "pending", ""
                status.reason = "waits for " + ", ".join(n for n in after[status.name] if by_name[n].state != "done")
                changed = True


def _count_label(statuses) -> str:
    """``3 scan(s)`` or, for units of several kinds, ``3 scan(s) and 10 fit(s)``."""
    kinds: dict[str, int] = {}
    for status in statuses:
        kinds[status.kind] = kinds.get(status.kind, 0) + 1
    return " and ".join(f"{n} {kind}(s)" for kind, n in kinds.items())


def format_status(statuses: list[UnitStatus], run: dict | None = None) -> str:
    """A table (unit, state, nodes done, detail) and a summary line."""
    rows = [("unit", "state", "nodes", "detail")]
    for s in statuses:
        if s.state == "done":
            detail = s.output
        elif s.state == "failed":
            detail = f"{s.node}: {s.reason}" + (f"  [{s.crash_file}]" if s.crash_file else "")
        elif s.state == "running":
            detail = f"running {s.node}"
        elif s.reason:
            detail = s.reason
        else:
            detail = "not started" if s.nodes_done == 0 else "stopped part-way; rerun to resume"
        rows.append((s.name, s.state, f"{s.nodes_done}/{s.nodes_total}" if s.nodes_total else "-", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    counts = {state: sum(1 for s in statuses if s.state == state) for state in ("done", "failed", "running", "pending")}
    nodes_done, nodes_total = sum(s.nodes_done for s in statuses), sum(s.nodes_total for s in statuses)
    summary = f"{_count_label(statuses)}: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + \
        f"; {nodes_done} of {nodes_total} nodes done"
    if run is not None:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"]))
        if run["state"] == "ended":
            summary += f"; last run started {started}, ended with exit code {run['exit_code']}"
        elif run["state"] == "running":
            summary += f"; a run is in progress (pid {run['pid']}, started {started})"
        else:
            summary += f"; the last run (started {started} on {run['host']}) stopped without finishing, or runs elsewhere"
    return "\n".join(lines + [summary])


def main_status(work_dir, output_dir=None, stream=None) -> int:
    """``qsmflow status WORK_DIR [OUTPUT_DIR]``: print the table and the summary.

    Outputs are looked for where the recorded run wrote them (e.g. the demo's
    ``OUTPUT/derivatives/qsmflow``); an ``output_dir`` elsewhere gets a note saying so.
    Returns 0 whatever the units' states (failed units are a report, not an error of this
    command); 1 only when ``work_dir`` does not exist or holds no qsmflow records.
    """
    stream = stream or sys.stdout
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        print(f"qsmflow: error: {work_dir}: no such work directory", file=sys.stderr)
        return 1
    records = read_records(work_dir)
    if not records:
        print(f"qsmflow: error: {work_dir}: no qsmflow run recorded in this work directory", file=sys.stderr)
        return 1
    recorded = sorted({r["output_dir"] for r in records})
    if output_dir is not None and [str(Path(output_dir).absolute())] != recorded:
        print(f"note: the run wrote its outputs to {', '.join(recorded)} (not {Path(output_dir).absolute()}); "
              "they are looked for there", file=stream)
    print(format_status(cohort_status(work_dir), last_run(work_dir)), file=stream)
    return 0
