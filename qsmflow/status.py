"""Where a cohort run stands: which scans are done, which failed and why, which are pending.

A participant run records what it is about to do in ``WORK_DIR/.qsmflow/``: one small JSON
file per scan (``scans/<scan>.json``: its nodes, where its Chimap goes, or why it could not
start) and one per run (``runs/<time>-<host>-<pid>.json``: command, start, end, exit code).
Files per scan rather than one shared file, so that jobs processing different subjects with
the same work directory (one cluster job per subject) never overwrite each other's records.

:func:`cohort_status` reads these records, nipype's cache and crash files, and the
derivatives, and classifies every scan:

``done``
    its ``_Chimap.nii.gz`` is in the output directory (written last, atomically);
``failed``
    its inputs were refused before the run, or a crash file of the last run that took the scan
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
class ScanStatus:
    """State of one scan of a cohort."""

    name: str
    subject: str
    state: str
    nodes_done: int
    nodes_total: int
    node: str = ""
    reason: str = ""
    crash_file: str = ""
    chimap: str = ""


# --------------------------------------------------------------------------------------------
# Records written by a run
def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def record_scans(work_dir, output_dir, entries) -> None:
    """Record the scans a run is about to process (or refused).

    Parameters
    ----------
    work_dir, output_dir : path
    entries : list of dict
        Each with ``name`` (e.g. ``sub-01_MEGRE``), ``subject``, and either ``workflow`` (node
        path of the scan's workflow relative to the work directory, ``/``-separated), ``nodes``
        (node names inside it) and ``chimap`` (path relative to ``output_dir``), or ``invalid``
        (why the scan could not start).
    """
    directory = Path(work_dir) / RECORDS / "scans"
    for entry in entries:
        atomic_write_json(directory / f"{_safe_name(entry['name'])}.json",
                          {**entry, "output_dir": str(Path(output_dir).absolute()), "recorded": time.time()})


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
    finished = [p for p in hashes if not p.name.endswith("_unfinished.json")]
    if finished:
        return "done", max(p.stat().st_mtime for p in finished)
    if any(p.name.endswith("_unfinished.json") for p in hashes):
        return "started", max(p.stat().st_mtime for p in hashes)
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


def _latest_crashes(work_dir: Path) -> dict:
    """Newest crash per scan workflow: {'sub_01_MEGRE_wf': Failure}."""
    from .execution import read_crash_files

    latest = {}
    crash_root = work_dir / "crashes"
    directories = sorted({p.parent for p in crash_root.rglob("crash-*.txt")}) if crash_root.is_dir() else []
    for directory in directories:
        for failure in read_crash_files(directory):
            key = f"{failure.scan}_wf"
            mtime = Path(failure.crash_file).stat().st_mtime
            if key not in latest or mtime >= latest[key][0]:
                latest[key] = (mtime, failure)
    return {key: failure for key, (_, failure) in latest.items()}


def _discover_entries(work_dir: Path) -> list[dict]:
    """Scans found in the work directory when a run left no records (e.g. an older version)."""
    entries = []
    for scan_dir in sorted(work_dir.glob("*/sub_*_wf/*_wf")):
        nodes = sorted(p.name for p in scan_dir.iterdir() if p.is_dir())
        name = scan_dir.name[:-3]
        entries.append({"name": name, "subject": scan_dir.parent.name[4:-3], "nodes": nodes,
                        "workflow": str(scan_dir.relative_to(work_dir)), "chimap": None})
    return entries


def cohort_status(work_dir, output_dir) -> list[ScanStatus]:
    """Classify every scan recorded in ``work_dir`` (see the module docstring).

    Parameters
    ----------
    work_dir : path
        The run's ``--work-dir`` (nipype cache, crash files, qsmflow's records).
    output_dir : path
        The derivatives dataset.

    Returns
    -------
    list of ScanStatus, sorted by scan name.
    """
    work_dir, output_dir = Path(work_dir).absolute(), Path(output_dir).absolute()
    entries = {}
    for path in sorted((work_dir / RECORDS / "scans").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entries[entry["name"]] = entry
    if not entries:
        entries = {e["name"]: e for e in _discover_entries(work_dir)}
    crashes = _latest_crashes(work_dir)
    running = bool(_live_runs(work_dir))
    statuses = []
    for name, entry in sorted(entries.items()):
        if entry.get("invalid"):
            statuses.append(ScanStatus(name, entry["subject"], "failed", 0, 0, node="(input check)", reason=entry["invalid"]))
            continue
        scan_dir = work_dir / entry["workflow"]
        nodes = entry.get("nodes") or []
        states = {node: _node_state(scan_dir / node) for node in nodes}
        done = sum(1 for state, _ in states.values() if state == "done")
        status = ScanStatus(name, entry["subject"], "pending", done, len(nodes))
        chimap = output_dir / entry["chimap"] if entry.get("chimap") else None
        if chimap is not None and chimap.is_file():
            status.state, status.chimap = "done", str(chimap)
        elif chimap is None and states.get("write_derivatives", ("new", 0.0))[0] == "done":
            status.state = "done"  # no record of the Chimap's name: trust the writer's cache
        else:
            crash = crashes.get(Path(entry["workflow"]).name)
            if crash is not None:
                state, changed = states.get(crash.node, ("new", 0.0))
                crashed = Path(crash.crash_file).stat().st_mtime
                # a crash of an earlier run than the last one that took this scan (the input may
                # have been repaired), or a node that succeeded since, is history
                superseded = crashed < entry.get("recorded", 0.0) or (state == "done" and changed > crashed)
                if not superseded:
                    status.state, status.node, status.reason, status.crash_file = "failed", crash.node, crash.reason, crash.crash_file
            if status.state == "pending" and running and any(state == "started" for state, _ in states.values()):
                status.state = "running"
                status.node = ", ".join(node for node, (state, _) in states.items() if state == "started")
        statuses.append(status)
    return statuses


def format_status(statuses: list[ScanStatus], run: dict | None = None) -> str:
    """A table (scan, state, nodes done, detail) and a summary line."""
    rows = [("scan", "state", "nodes", "detail")]
    for s in statuses:
        if s.state == "done":
            detail = s.chimap
        elif s.state == "failed":
            detail = f"{s.node}: {s.reason}" + (f"  [{s.crash_file}]" if s.crash_file else "")
        elif s.state == "running":
            detail = f"running {s.node}"
        else:
            detail = "not started" if s.nodes_done == 0 else "stopped part-way; rerun to resume"
        rows.append((s.name, s.state, f"{s.nodes_done}/{s.nodes_total}" if s.nodes_total else "-", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    counts = {state: sum(1 for s in statuses if s.state == state) for state in ("done", "failed", "running", "pending")}
    nodes_done, nodes_total = sum(s.nodes_done for s in statuses), sum(s.nodes_total for s in statuses)
    summary = f"{len(statuses)} scan(s): " + ", ".join(f"{n} {state}" for state, n in counts.items()) + \
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


def main_status(work_dir, output_dir, stream=None) -> int:
    """``qsmflow status WORK_DIR OUTPUT_DIR``: print the table and the summary.

    Returns 0 whatever the scans' states (failed scans are a report, not an error of this
    command); 1 only when ``work_dir`` does not exist.
    """
    stream = stream or sys.stdout
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        print(f"qsmflow: error: {work_dir}: no such work directory", file=sys.stderr)
        return 1
    statuses = cohort_status(work_dir, output_dir)
    if not statuses:
        print(f"{work_dir}: no qsmflow scans recorded", file=stream)
        return 0
    print(format_status(statuses, last_run(work_dir)), file=stream)
    return 0
