"""Threads from the allocation: CPUs from the affinity mask and SLURM_CPUS_PER_TASK, never the machine's.

Unit tests of :mod:`qsmflow.resources`, then the check that matters: a participant run given one
CPU (``taskset -c 0``, and ``srun --cpus-per-task=1`` on the test suite's SLURM, which does not
bind jobs to cores) runs one MultiProc worker, and that worker never has more than one thread
(counted in ``/proc/<pid>/status`` while the run goes on: FFT workers, BLAS and TV thread pools
all start threads that stay). The same probe on two CPUs sees the extra threads, so it can fail.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECONSTRUCTION_ONLY
from qsmflow.resources import THREAD_VARIABLES, available_cpus, limited_threads, thread_count

ROOT = Path(__file__).resolve().parents[1]


def test_cpus_come_from_the_affinity_mask_and_slurm(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert available_cpus() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert available_cpus() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # more than the mask allows
    assert available_cpus() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert available_cpus() == 4


def test_thread_count_follows_the_node_and_the_allocation(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("QSMFLOW_FFT_WORKERS", raising=False)
    assert thread_count() == 4 and thread_count(2) == 2 and thread_count(64) == 4
    monkeypatch.setenv("QSMFLOW_FFT_WORKERS", "3")
    assert thread_count() == 3 and thread_count(1) == 3
    monkeypatch.setenv("QSMFLOW_FFT_WORKERS", "9")
    assert thread_count() == 4
    for bad in ("0", "two"):
        monkeypatch.setenv("QSMFLOW_FFT_WORKERS", bad)
        with pytest.raises(ValueError, match="QSMFLOW_FFT_WORKERS"):
            thread_count()


def test_limited_threads_caps_the_loaded_blas_and_restores_everything(monkeypatch):
    import numpy  # noqa: F401  (loads OpenBLAS)
    import scipy.linalg  # noqa: F401  (scipy's own OpenBLAS)
    from threadpoolctl import threadpool_info

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    before = [pool["num_threads"] for pool in threadpool_info()]
    assert before, "no native thread pool found: nothing would be limited"
    with limited_threads(1) as count:
        assert count == 1
        assert [pool["num_threads"] for pool in threadpool_info()] == [1] * len(before)
        assert all(os.environ[name] == "1" for name in THREAD_VARIABLES)
    assert [pool["num_threads"] for pool in threadpool_info()] == before
    assert os.environ["OMP_NUM_THREADS"] == "7" and "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS" not in os.environ


def test_nothing_sizes_threads_from_the_machine():
    """``os.cpu_count()`` / ``multiprocessing.cpu_count()`` count the machine, not the allocation."""
    offenders = []
    for path in sorted([*(ROOT / "qsmflow").rglob("*.py"), *(ROOT / "workflows").rglob("*.py")]):
        if path.name == "resources.py":
            continue  # its fallback where no affinity mask exists
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bcpu_count\s*\(", line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use qsmflow.resources.available_cpus()/thread_count():\n" + "\n".join(offenders)


def test_cluster_jobs_size_native_threads_from_their_allocation():
    from qsmflow.cluster import thread_exports

    for scheduler, variable in (("SLURM", "SLURM_CPUS_PER_TASK"), ("SGE", "NSLOTS"), ("PBS", "PBS_NUM_PPN")):
        script = thread_exports(scheduler) + '\necho "$OMP_NUM_THREADS $OPENBLAS_NUM_THREADS $ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"'
        answer = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"], variable: "3"})
        assert answer.stdout.split() == ["3", "3", "3"], (scheduler, answer.stderr)


# ---------------------------------------------------------------- a whole run inside one CPU

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from qsmflow import simulate

    root = tmp_path_factory.mktemp("threads")
    return simulate.write_bids_dataset(root / "bids", [("01", 40.0)], shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0))


def _process(pid: str) -> tuple[list[str], int, int] | None:
    """(argv, parent pid, threads) of a live process, or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return argv, int(fields["PPid"]), int(fields["Threads"])


def run_and_count_threads(command: list[str], marker: str, timeout: float = 120) -> dict:
    """Run ``command`` (a qsmflow participant run whose arguments contain ``marker``) and sample,
    every few ms, the threads of every ``python -m qsmflow.cli`` process carrying ``marker``.

    Returns ``{"driver": max threads, "workers": {pid: max threads}, "stderr": ...}``; workers are
    the processes the driver forked that lived through several samples (MultiProc's pool; a
    child the driver forks to run a command carries the same arguments for an instant only).
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    parents: dict[int, int] = {}
    samples: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, "the run did not end"
        for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
            found = _process(pid)
            if found is None:
                continue
            argv, parent, threads = found
            if argv[1:3] == ["-m", "qsmflow.cli"] and marker in argv:
                peaks[int(pid)] = max(peaks.get(int(pid), 0), threads)
                parents[int(pid)] = parent
                samples[int(pid)] = samples.get(int(pid), 0) + 1
        time.sleep(0.005)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    drivers = [pid for pid in peaks if parents[pid] not in peaks]
    assert len(drivers) == 1, (peaks, parents)
    workers = {pid: peak for pid, peak in peaks.items() if parents[pid] == drivers[0] and samples[pid] >= 5}
    return {"driver": peaks[drivers[0]], "workers": workers, "stderr": stderr}


def _participant(dataset: Path, out: Path, *options) -> list[str]:
    return [sys.executable, "-m", "qsmflow.cli", str(dataset), str(out), "participant", "--config", "fast",
            "--work-dir", str(out.parent / f"{out.name}-work"), "--progress", "off", *RECONSTRUCTION_ONLY, *options]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_one_cpu_by_taskset_means_one_worker_with_one_thread(dataset, tmp_path):
    out = tmp_path / "taskset-1"
    counted = run_and_count_threads(["taskset", "-c", "0", *_participant(dataset, out)], str(out))
    print(f"taskset -c 0: driver {counted['driver']} threads, workers {counted['workers']}")
    assert len(counted["workers"]) == 1, counted  # MultiProc: one process
    assert list(counted["workers"].values()) == [1], counted  # FFT, BLAS, TV step: one thread
    assert list(out.rglob("*_Chimap.nii.gz"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None or available_cpus() < 2, reason="needs taskset and two CPUs")
def test_the_thread_probe_sees_the_threads_of_two_cpus(dataset, tmp_path):
    out = tmp_path / "taskset-2"
    cpus = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2])
    counted = run_and_count_threads(["taskset", "-c", cpus, *_participant(dataset, out, "--nprocs", "1")], str(out))
    print(f"taskset -c {cpus} --nprocs 1: driver {counted['driver']} threads, workers {counted['workers']}")
    assert len(counted["workers"]) == 1 and list(counted["workers"].values())[0] >= 2, counted


@pytest.mark.slow
def test_one_cpu_by_srun_means_one_worker_with_one_thread(dataset, tmp_path):
    """``srun --cpus-per-task=1`` on the test cluster: SLURM does not bind the task (no task
    plugin), so only SLURM_CPUS_PER_TASK tells qsmflow; the affinity mask still shows every CPU."""
    import slurm_cluster

    slurm_cluster.start_or_skip()
    out = tmp_path / "srun-1"
    counted = run_and_count_threads(["srun", "--cpus-per-task=1", "--mem=2G", *_participant(dataset, out)], str(out))
    print(f"srun --cpus-per-task=1: driver {counted['driver']} threads, workers {counted['workers']}")
    assert len(counted["workers"]) == 1, counted
    assert list(counted["workers"].values()) == [1], counted
    assert list(out.rglob("*_Chimap.nii.gz"))
