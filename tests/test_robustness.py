"""Cohort runs that survive trouble: crash isolation and its report, status, progress,
resume after SIGKILL, atomic outputs and bit-identical results across runs and plugins.

One small simulated cohort (three subjects, 48x56x48 voxels of 3.5 mm) is shared by the
module; every run goes through the real command line in a subprocess.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import RECONSTRUCTION_ONLY
from qsmflow import simulate
from qsmflow.progress import RunProgress
from qsmflow.status import cohort_status, last_run
from qsmflow.workunits import WorkUnit

pytestmark = pytest.mark.slow

SHAPE, VOXEL = (48, 56, 48), (3.5, 3.5, 3.5)
NODES_PER_SCAN = 10
#: A slow but deterministic inversion (fixed iteration count), so that a run can be killed part-way.
SLOW_INVERSION = ["--set", "inversion.method=tv", "--set", "inversion.tv.iterations=1000", "--set", "inversion.tv.tolerance=0"]


#: These tests count and time a scan's reconstruction nodes: segmentation and the subject report are left out.
NO_REPORT = list(RECONSTRUCTION_ONLY)


def qsmflow(*arguments, **kwargs):
    arguments = [str(a) for a in arguments]
    arguments += NO_REPORT if "participant" in arguments else []
    return subprocess.run([sys.executable, "-m", "qsmflow.cli", *arguments], capture_output=True, text=True, **kwargs)


def outputs(directory: Path) -> dict:
    """Bytes of every derivative file (NIfTI and JSON) under ``directory``, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("sub-*/**/*")) if p.is_file()}


def finished_nodes(work_dir: Path) -> dict:
    """mtime of result_*.pklz of every computing node whose run finished (nipype's hash file is
    written). The derivative writer is left out: it runs every time by design (it copies, and
    rewrites nothing unchanged)."""
    found = {}
    for hashfile in work_dir.rglob("_0x*.json"):
        if hashfile.name.endswith("_unfinished.json") or hashfile.parent.name == "write_derivatives":
            continue
        for result in hashfile.parent.glob("result_*.pklz"):
            found[str(result.relative_to(work_dir))] = result.stat().st_mtime_ns
    return found


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    """True for a running process (not a zombie, not gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    bids = root / "bids"
    simulate.write_bids_dataset(bids, simulate.default_demo_cohort(3), shape=SHAPE, voxel_size=VOXEL)
    shutil.rmtree(bids / "derivatives")
    return root


@pytest.fixture(scope="module")
def reference(cohort):
    """An uninterrupted MultiProc run of the default configuration."""
    out, work = cohort / "reference" / "out", cohort / "reference" / "work"
    run = qsmflow(cohort / "bids", out, "participant", "--work-dir", work, "--nprocs", "2")
    assert run.returncode == 0, run.stderr
    return {"out": out, "work": work, "stderr": run.stderr}


# --------------------------------------------------------------------------------------------
def test_one_broken_subject_does_not_stop_the_others(cohort, reference, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(cohort / "bids", bids)
    broken = bids / "sub-02" / "anat" / "sub-02_echo-3_part-phase_MEGRE.nii.gz"
    pristine = broken.read_bytes()
    image = nib.load(str(broken))
    data = np.asarray(image.dataobj).copy()
    data[10:13, 30, 20] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine, image.header), str(broken))
    out, work = tmp_path / "out", tmp_path / "work"

    run = qsmflow(bids, out, "participant", "--work-dir", work, "--nprocs", "2")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    # the good subjects finished, with exactly the outputs of a cohort without the broken one
    expected = {k: v for k, v in outputs(reference["out"]).items() if not k.startswith("sub-02")}
    assert outputs(out) == expected
    assert not (out / "sub-02").exists()
    # the summary table: subject, scan, node, one-line reason, crash file
    lines = run.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"subject\s+scan\s+node\s+reason\s+crash file$", line))
    assert lines[header - 1].startswith("2 of 3 scan(s) finished; 1 failed")
    row = lines[header + 1].split()
    assert row[:3] == ["02", "sub-02_MEGRE", "load_echoes"]
    assert row[3:6] == ["ValueError:", f"{broken}:", "3"] and " ".join(row[6:-1]) == "voxels are NaN or infinite"
    crash_file = Path(row[-1])
    assert crash_file.is_file() and crash_file.suffix == ".txt" and crash_file.is_relative_to(work / "crashes")
    assert f"ValueError: {broken}: 3 voxels are NaN or infinite" in crash_file.read_text()
    assert lines[-1] == f"qsmflow: error: {broken}: 3 voxels are NaN or infinite (scan sub-02_MEGRE, step load_echoes)"
    # plain progress lines (stderr is not a terminal): one per finished or failed node, with counts
    assert re.search(r"\[\s*\d+/30 nodes\] sub-02_MEGRE: load_echoes FAILED", run.stderr)
    assert len(re.findall(r"\[\s*\d+/30 nodes\] sub-0[13]_MEGRE: \w+ done", run.stderr)) == 2 * NODES_PER_SCAN
    assert "20 of 30 nodes done, 1 failed, 9 not run; 2 of 3 subjects complete" in run.stderr
    assert "\r" not in run.stderr

    status = qsmflow("status", work, out)
    assert status.returncode == 0, status.stderr
    table = status.stdout.splitlines()
    assert re.match(r"sub-01_MEGRE\s+done\s+10/10\s+\S+sub-01_Chimap.nii.gz$", table[1])
    assert re.match(rf"sub-02_MEGRE\s+failed\s+0/10\s+load_echoes: ValueError: {re.escape(str(broken))}: "
                    rf"3 voxels are NaN or infinite  \[{re.escape(str(crash_file))}\]$", table[2])
    assert re.match(r"sub-03_MEGRE\s+done\s+10/10", table[3])
    assert table[4].startswith("3 scan(s): 2 done, 1 failed, 0 running, 0 pending; 20 of 30 nodes done; last run started")
    assert table[4].endswith("ended with exit code 1")

    # once a new run takes the scan again, the old crash is history (unless it crashes again)
    record_file = work / ".qsmflow" / "units" / "sub-02_MEGRE.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "recorded": time.time()}))
    assert [s.state for s in cohort_status(work, out)] == ["done", "pending", "done"]

    # repaired input: the rerun computes only the broken subject, and everything is done
    before = finished_nodes(work)
    assert len(before) == 2 * (NODES_PER_SCAN - 1)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("sub-*/anat/*")}
    broken.write_bytes(pristine)
    again = qsmflow(bids, out, "participant", "--work-dir", work, "--nprocs", "2")
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in finished_nodes(work).items() if k in before} == before
    assert {p: p.stat().st_mtime_ns for p in written} == written
    # the progress count includes the nodes reused from the cache
    assert "30 of 30 nodes done; 3 of 3 subjects complete" in again.stderr
    assert outputs(out) == outputs(reference["out"])
    status = qsmflow("status", work, out)
    assert "3 scan(s): 3 done, 0 failed, 0 running, 0 pending; 30 of 30 nodes done" in status.stdout


def test_status_of_a_run_that_has_not_started(cohort, tmp_path):
    status = qsmflow("status", tmp_path / "nowhere", tmp_path / "out")
    assert status.returncode == 1 and "no such work directory" in status.stderr
    (tmp_path / "work").mkdir()
    status = qsmflow("status", tmp_path / "work", tmp_path / "out")
    assert status.returncode == 1 and "no qsmflow run recorded in this work directory" in status.stderr


# --------------------------------------------------------------------------------------------
class _Node:
    def __init__(self, fullname):
        self.fullname = fullname


def test_progress_counts_each_node_once_whatever_the_plugin_reports():
    names = [f"sub_{s}_wf.sub_{s}_MEGRE_wf.{n}" for s in ("01", "02") for n in ("load", "fit", "write")]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("qsmflow")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        units = [WorkUnit(kind="scan", name=f"sub-{s}_MEGRE", subject=s, nodes=[n for n in names if f"sub_{s}_wf" in n])
                 for s in ("01", "02")]
        progress = RunProgress(units, top_name="qsmflow_wf", mode="log")
        node = {n: _Node("qsmflow_wf." + n) for n in names}
        progress(node[names[0]], "end")            # reused from the cache: MultiProc reports only 'end'
        progress(node[names[1]], "start")
        progress(node[names[1]], "end")
        progress(node[names[1]], "end")            # reported twice: still counted once
        progress(node[names[2]], "start")
        progress(node[names[2]], "end")
        progress(node[names[3]], "start")
        progress(node[names[3]], "exception")      # crashed; then MultiProc's main-process path says 'end'
        progress(node[names[3]], "end")
        progress(_Node("qsmflow_wf.sub_02_wf.sub_02_MEGRE_wf._fit0"), "end")  # a MapNode's sub-node: ignored
        progress.close()                           # names[4:] never run (downstream of the crash)
    finally:
        logger.removeHandler(handler)
        logger.level = level
    assert (progress.done, progress.failed, progress.not_run, progress.total) == (3, 1, 2, 6)
    messages = [r.getMessage() for r in records]
    assert messages[:3] == [
        "[1/6 nodes] sub-01_MEGRE: load done (sub-01: 1/3)",
        "[2/6 nodes] sub-01_MEGRE: fit done in 0.0 s (sub-01: 2/3)",
        "[3/6 nodes] sub-01_MEGRE: write done in 0.0 s (sub-01: 3/3)",
    ]
    assert messages[3] == "[3/6 nodes] sub-01: all 3 nodes done (1 of 2 subjects done)"
    assert messages[4] == "[4/6 nodes] sub-02_MEGRE: load FAILED (sub-02: 0/3 done, 1 failed)"
    assert messages[5].startswith("3 of 6 nodes done, 1 failed, 2 not run; 1 of 2 subjects complete; elapsed 00:0")
    assert len(messages) == 6


def test_progress_bar_on_a_terminal(cohort, tmp_path):
    import pty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    command = [sys.executable, "-m", "qsmflow.cli", str(cohort / "bids"), str(tmp_path / "out"), "participant",
               "--participant-label", "01", "03", "--work-dir", str(tmp_path / "work"), "--nprocs", "2", *NO_REPORT]
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    frames = [f for f in re.split(r"[\r\n]+", screen) if f.startswith("qsmflow:") and "nodes [" in f]
    assert frames, screen
    last = frames[-1]
    assert re.search(r"100%\|.*\| 20/20 nodes \[\d\d:\d\d<\d\d:\d\d\], subjects 2/2 done", last), last
    assert any(re.search(r"running sub-0[13] \d+/10", f) for f in frames), frames
    assert any(re.search(r"\| \d/20 nodes \[00:0\d<\d\d:\d\d\]", f) for f in frames)  # elapsed and ETA from the start
    assert "qsmflow: sub-01 done (1 of 2 subjects)" in screen or "qsmflow: sub-03 done (1 of 2 subjects)" in screen
    assert not re.search(r"\[\s*\d+/20 nodes\]", screen)  # no plain log lines on a terminal


# --------------------------------------------------------------------------------------------
def test_resume_after_sigkill(cohort, tmp_path):
    bids = cohort / "bids"
    uninterrupted = tmp_path / "uninterrupted"
    run = qsmflow(bids, uninterrupted / "out", "participant", "--work-dir", uninterrupted / "work", "--nprocs", "2",
                  *SLOW_INVERSION)
    assert run.returncode == 0, run.stderr

    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "qsmflow.cli", str(bids), str(out), "participant", "--work-dir", str(work),
               "--nprocs", "2", *SLOW_INVERSION, *NO_REPORT]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            inversions_running = list(work.glob("qsmflow_wf/*/*/invert_dipole/_0x*_unfinished.json"))
            if inversions_running and len(finished_nodes(work)) >= 12:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        live = cohort_status(work, out)  # in-process: quick enough to catch the run alive
        assert last_run(work)["state"] == "running"
        assert "running" in {s.state for s in live} and {s.state for s in live} <= {"running", "pending", "done"}
        workers[:] = children_of(process.pid)
        assert len(workers) == 2  # MultiProc's worker processes
        os.kill(process.pid, signal.SIGKILL)  # the qsmflow process only
        process.wait()
        # its workers die with it rather than finish their node as orphans
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in workers:  # should the test fail, leave no orphan behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL

    survivors = finished_nodes(work)
    assert len(survivors) >= 12
    chimaps_before = sorted(out.rglob("*_Chimap.nii.gz"))
    assert len(chimaps_before) < 3, "killed too late to test resuming"
    for path in out.rglob("*.nii*"):  # whatever has a final name is complete
        if not path.name.endswith(".tmp"):
            np.asarray(nib.load(str(path)).dataobj)
    status = qsmflow("status", work, out)
    assert status.returncode == 0
    assert re.search(r"scan\(s\): \d done, 0 failed, 0 running, \d pending", status.stdout), status.stdout
    assert "stopped without finishing" in status.stdout
    # a writer killed between writing and renaming leaves a temporary file; the rerun removes it
    litter = out / "sub-01" / "anat" / ".sub-01_Chimap.nii.gz.k1ll3d.tmp"
    litter.parent.mkdir(parents=True, exist_ok=True)
    litter.write_bytes(b"\x1f\x8b partial")

    again = qsmflow(*command[3:])
    assert again.returncode == 0, again.stderr
    after = finished_nodes(work)
    assert {k: after[k] for k in survivors} == survivors  # nothing that had finished was recomputed
    assert len(after) > len(survivors)
    assert outputs(out) == outputs(uninterrupted / "out")
    assert not list(out.rglob("*.tmp"))
    assert "removed 1 temporary file(s) left by an interrupted run" in again.stderr


def test_atomic_write_killed_before_the_rename_leaves_no_partial_file(tmp_path):
    """The derivative writer's primitive, killed after writing the data but before renaming it."""
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from qsmflow import bids
        real_fsync = os.fsync
        def fsync_then_hang(descriptor):
            real_fsync(descriptor)
            Path(sys.argv[2]).write_text("data written")
            time.sleep(120)
        os.fsync = fsync_then_hang
        bids.atomic_write_bytes(Path(sys.argv[1]), b"new content " * 100000)
    """)
    for existing in (None, b"old complete content"):
        target = tmp_path / f"case{existing is not None}" / "sub-01_Chimap.nii.gz"
        target.parent.mkdir()
        if existing is not None:
            target.write_bytes(existing)
        signal_file = target.parent / "signal"
        process = subprocess.Popen([sys.executable, "-c", script, str(target), str(signal_file)])
        try:
            deadline = time.monotonic() + 60
            while not signal_file.exists() and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            assert signal_file.exists(), "the writer never got to the point of the kill"
        finally:
            process.kill()
            process.wait()
        if existing is None:
            assert not target.exists()
        else:
            assert target.read_bytes() == existing
        temporaries = list(target.parent.glob(".sub-01_Chimap.nii.gz.*.tmp"))
        assert len(temporaries) == 1 and temporaries[0].stat().st_size == 1200000


# --------------------------------------------------------------------------------------------
def test_identical_chimaps_across_runs_and_plugins(cohort, reference, tmp_path):
    linear = qsmflow(cohort / "bids", tmp_path / "linear", "participant", "--work-dir", tmp_path / "work-linear",
                     "--plugin", "Linear")
    assert linear.returncode == 0, linear.stderr
    single = qsmflow(cohort / "bids", tmp_path / "single", "participant", "--work-dir", tmp_path / "work-single",
                     "--nprocs", "1")
    assert single.returncode == 0, single.stderr
    expected = outputs(reference["out"])
    chimaps = [k for k in expected if k.endswith("_Chimap.nii.gz")]
    assert len(chimaps) == 3
    for name in ("linear", "single"):
        produced = outputs(tmp_path / name)
        assert produced.keys() == expected.keys()
        for key in expected:
            assert produced[key] == expected[key], f"{name}: {key} differs"
    reference_chi = np.asarray(nib.load(str(reference["out"] / chimaps[0])).dataobj)
    assert np.count_nonzero(reference_chi) > 5000 and np.isfinite(reference_chi).all()
