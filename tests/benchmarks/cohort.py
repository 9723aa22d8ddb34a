"""Cohort benchmark: wall time with 1 and 2 processes, and peak memory of each node type
against the ``mem_gb`` it declares to the scheduler.

Run by hand (not part of the test-suite):

    python tests/benchmarks/cohort.py [--subjects 8] [--shape 90 108 90] [--voxel-size 2]
                                      [--set KEY=VALUE ...] [--workdir DIR] [--memory-subjects 2]

1. Simulates a cohort with :func:`qsmflow.simulate.write_bids_dataset` (four echoes, 3 T).
2. Runs ``qsmflow BIDS OUT participant --nprocs N`` for N = 1 and 2, each with a fresh work
   and output directory, as a subprocess: wall time, CPU time of the run's processes, and the
   sum of the nodes' own durations (``runtime.duration`` in nipype's result files). The two
   runs' Chimaps are compared byte for byte.
3. Peak memory: nipype's resource monitor needs ``psutil`` and samples at intervals, so each
   node of the first ``--memory-subjects`` subjects is instead rerun from its pickled node
   (``_node.pklz``, which holds its resolved inputs) in a fresh Python process, whose peak
   resident set size the kernel reports exactly (``VmHWM`` in ``/proc/self/status``, Linux). The table gives, per node type,
   the largest peak over subjects, the process's resident size before the node ran (Python,
   numpy, nipype and the node's module loaded) and the declared ``mem_gb``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_NODE_CHILD = r"""
import json, os, sys, time
from nipype.utils.filemanip import loadpkl

def high_water_kb():
    # VmHWM belongs to this process's address space; ru_maxrss would carry over the parent's
    # peak across fork and exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

node = loadpkl(sys.argv[1])
interface = node.interface
os.chdir(sys.argv[2])
before = high_water_kb()
start = time.perf_counter()
interface.run(cwd=sys.argv[2])
seconds = time.perf_counter() - start
print(json.dumps({"before_kb": before, "peak_kb": high_water_kb(), "seconds": seconds, "mem_gb": node.mem_gb,
                  "n_procs": node.n_procs}))
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cohort(bids: Path, root: Path, nprocs: int, overrides: list[str]) -> dict:
    out, work = root / f"out-nprocs{nprocs}", root / f"work-nprocs{nprocs}"
    for stale in (out, work):  # a fresh cache: nothing may be reused
        shutil.rmtree(stale, ignore_errors=True)
    command = [sys.executable, "-m", "qsmflow.cli", str(bids), str(out), "participant", "--work-dir", str(work),
               "--nprocs", str(nprocs), "--progress", "off"] + [item for o in overrides for item in ("--set", o)]
    cpu = _children_cpu()
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"qsmflow failed with --nprocs {nprocs}:\n{run.stderr}")
    from nipype.utils.filemanip import loadpkl

    durations: dict[str, list[float]] = {}
    for result in work.rglob("result_*.pklz"):
        runtime = loadpkl(str(result)).runtime
        durations.setdefault(result.parent.name, []).append(float(runtime.duration))
    return {"nprocs": nprocs, "wall": wall, "cpu": _children_cpu() - cpu, "durations": durations, "out": out, "work": work}


def node_memory(work: Path, subjects: list[str], scratch: Path) -> dict:
    """Per node type: largest peak RSS over the given subjects' nodes, rerun one by one."""
    table: dict[str, dict] = {}
    for subject in subjects:
        for node_file in sorted(work.glob(f"qsmflow_wf/sub_{subject}_wf/*_wf/*/_node.pklz")):
            name = node_file.parent.name
            directory = scratch / f"{subject}-{name}"
            directory.mkdir(parents=True, exist_ok=True)
            run = subprocess.run([sys.executable, "-c", _NODE_CHILD, str(node_file), str(directory)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"rerunning {node_file} failed:\n{run.stderr}")
            measured = json.loads(run.stdout.strip().splitlines()[-1])
            entry = table.setdefault(name, {"peak_gb": 0.0, "before_gb": 0.0, "added_gb": 0.0, "mem_gb": measured["mem_gb"],
                                            "n_procs": measured["n_procs"]})
            entry["added_gb"] = max(entry["added_gb"], (measured["peak_kb"] - measured["before_kb"]) / 1024**2)
            entry["peak_gb"] = max(entry["peak_gb"], measured["peak_kb"] / 1024**2)
            entry["before_gb"] = max(entry["before_gb"], measured["before_kb"] / 1024**2)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="grid (default: the simulator's 90 108 90)")
    parser.add_argument("--voxel-size", type=float, default=None, help="isotropic voxel size in mm (default: 2)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--memory-subjects", type=int, default=2, help="subjects whose nodes are rerun for memory")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.subjects < 1:
        parser.error("--subjects must be at least 1")

    from qsmflow import simulate

    shape = tuple(args.shape) if args.shape else simulate.DEFAULT_SHAPE
    voxel = (args.voxel_size,) * 3 if args.voxel_size else simulate.DEFAULT_VOXEL_SIZE
    with tempfile.TemporaryDirectory(prefix="qsmflow-cohort-") as temporary:
        root = args.workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        bids = root / "bids"
        start = time.perf_counter()
        cohort = simulate.default_demo_cohort(args.subjects)
        reused = (bids / "dataset_description.json").exists()
        if not reused:
            simulate.write_bids_dataset(bids, cohort, shape=shape, voxel_size=voxel)
        simulated = time.perf_counter() - start

        runs = [run_cohort(bids, root, nprocs, args.overrides) for nprocs in (1, 2)]
        chimaps = [{p.relative_to(run["out"]): p.read_bytes() for p in run["out"].rglob("*_Chimap.nii.gz")} for run in runs]
        identical = chimaps[0] == chimaps[1] and len(chimaps[0]) == args.subjects
        labels = [s["label"] for s in cohort[: args.memory_subjects]]
        memory = node_memory(runs[0]["work"], labels, root / "memory")

    print(f"cohort: {args.subjects} subjects, {shape[0]}x{shape[1]}x{shape[2]} voxels of {voxel[0]:g} mm, "
          f"{len(simulate.DEFAULT_ECHO_TIMES)} echoes; config default"
          + (f" with {' '.join(args.overrides)}" if args.overrides else "")
          + f"; {os.cpu_count()} CPUs; " + ("dataset reused" if reused else f"simulated in {simulated:.1f} s"))
    print()
    print("nprocs  wall (s)  CPU (s)  sum of node durations (s)  subjects/min")
    for run in runs:
        node_seconds = sum(sum(v) for v in run["durations"].values())
        print(f"{run['nprocs']:>6}  {run['wall']:>8.1f}  {run['cpu']:>7.1f}  {node_seconds:>25.1f}  "
              f"{60 * args.subjects / run['wall']:>12.2f}")
    print(f"wall-time ratio nprocs 1 / nprocs 2: {runs[0]['wall'] / runs[1]['wall']:.2f} (2.00 would be perfect scaling)")
    print(f"Chimaps of the two runs byte-identical: {'yes' if identical else 'NO'}")
    print()
    print(f"peak memory per node type (largest over {len(labels)} subject(s); each node rerun alone in a fresh process)")
    print("node                declared mem_gb  peak RSS (GB)  RSS before run (GB)  added by node (GB)  "
          "peak/declared  median duration (s)  max duration (s)")
    for name in sorted(memory, key=lambda n: -memory[n]["peak_gb"]):
        entry = memory[name]
        durations = runs[0]["durations"].get(name, [0.0])
        flag = "  EXCEEDS" if entry["peak_gb"] > entry["mem_gb"] else ""
        print(f"{name:<18}  {entry['mem_gb']:>15.2f}  {entry['peak_gb']:>13.3f}  {entry['before_gb']:>19.3f}  "
              f"{entry['added_gb']:>18.3f}  "
              f"{entry['peak_gb'] / entry['mem_gb']:>13.2f}  {statistics.median(durations):>19.2f}  "
              f"{max(durations):>16.2f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
