"""qsmflow on clusters: submission arguments, nipype's traps, and a real single-node SLURM.

The first group needs no scheduler (a stand-in ``sbatch`` records its arguments). The second
starts SLURM on localhost (``tests/slurm_cluster.py``; root and Debian's slurm-wlm + munge,
which ``.ci/run`` installs) and runs a simulated two-subject cohort through ``--plugin SLURM``
and ``--plugin SLURMGraph``: the outputs must equal a MultiProc run bit for bit; a job
cancelled with ``scancel`` while it runs, a node raising in its job, and a job sbatch refuses
must each be reported as that node's failure without stopping the other subject; SIGTERM to
the command cancels its jobs; after a SIGKILL the rerun cancels the leftover jobs; and
rerunning the same command must finish without recomputing any finished node.
"""
from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nipype
import numpy as np
import pytest
import yaml

import slurm_cluster
from qsmflow import cluster
from qsmflow.cluster import ClusterSettings, PBSPlugin, SGEPlugin, SLURMGraphPlugin, SLURMPlugin, submission_args
from qsmflow.config import ConfigError, load_config
from qsmflow.execution import plugin_settings, read_crash_files
from qsmflow.workunits import WorkUnit

# The dipole inversion is made slow enough (about 2 s) to cancel its job while it computes.
#: the subject report is left out: the tests count the jobs of a scan's nodes
RECON = ["--set", "inversion.method=tv", "inversion.tv.iterations=600", "inversion.tv.tolerance=1.0e-12",
         "report.enabled=false", "segmentation.enabled=false", "reference.method=mean"]
LOOP = {"poll_sleep_duration": 0.2, "job_finished_timeout": 1, "max_tries": 0}
RUN_TIMEOUT = 240


# ---------------------------------------------------------------- no scheduler needed

def test_slurm_arguments_follow_the_configuration_and_the_node():
    settings = ClusterSettings.from_config({"partition": "short", "account": "lab", "time": "00:30:00",
                                            "extra_args": "--qos=normal --mem=9G", "request_resources": True})
    args = submission_args("SLURM", settings, 1.3, 2)
    assert args == ["--partition=short", "--account=lab", "--time=00:30:00", "--mem=1332M", "--cpus-per-task=2",
                    "--qos=normal", "--mem=9G"]  # extra arguments last, so they win
    bare = submission_args("SLURM", ClusterSettings.from_config({"request_resources": False}), 1.3, 2)
    assert bare == []


def test_sge_and_pbs_get_the_same_settings_in_their_own_words():
    settings = ClusterSettings.from_config({"partition": "all.q", "account": "lab", "time": "1-02:00:00"})
    assert submission_args("SGE", settings, 2.0, 4) == [
        "-q", "all.q", "-A", "lab", "-l", "h_rt=26:00:00", "-l", "h_vmem=512M", "-pe", "smp", "4"]
    assert submission_args("PBS", settings, 2.0, 4) == [
        "-q", "all.q", "-A", "lab", "-l", "walltime=26:00:00", "-l", "mem=2048mb,nodes=1:ppn=4"]
    assert submission_args("PBS", ClusterSettings.from_config({"time": "90"}), 0.25, 1)[:2] == ["-l", "walltime=01:30:00"]


@pytest.mark.parametrize("section, message", [
    ({"time": 7200}, "quoted string"),  # YAML reads an unquoted 02:00:00 as 7200
    ({"time": "2 hours"}, "not a time limit"),
    ({"time": "0"}, "longer than zero"),
    ({"partition": "a b"}, "execution.cluster.partition"),
    ({"extra_args": 5}, "execution.cluster.extra_args"),
    ({"request_resources": "yes"}, "request_resources"),
    ({"queue": "x"}, "execution.cluster.queue"),
])
def test_bad_cluster_settings_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        ClusterSettings.from_config(section)


def test_slurm_preset_and_default_keys_agree(tmp_path):
    config = load_config("slurm")
    assert set(config["execution"]["cluster"]) == set(cluster.CLUSTER_KEYS)
    name, args = plugin_settings(config)
    assert name == "SLURM" and args["cluster"].time == "01:00:00"
    user = tmp_path / "site.yaml"
    user.write_text('preset: slurm\nexecution:\n  cluster: {partition: short, time: "00:10:00"}\n')
    _, args = plugin_settings(load_config(user))
    assert (args["cluster"].partition, args["cluster"].time) == ("short", "00:10:00")
    with pytest.raises(ConfigError, match="unknown configuration key 'execution.cluster.queue'"):
        load_config(None, ["execution.cluster.queue=x"])
    with pytest.raises(ConfigError, match="'Slurm' is not a nipype plugin"):
        plugin_settings(load_config(None, ["execution.plugin=Slurm"]))


def test_a_missing_scheduler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="--plugin SLURM: sbatch, squeue, scancel not found on PATH"):
        cluster.make_plugin("SLURM", {})


def test_slurmgraph_plugin_needs_no_plugin_args():
    # nipype's own SLURMGraphPlugin() fails here with AttributeError (_dont_resubmit_completed_jobs).
    plugin = SLURMGraphPlugin()
    assert plugin._dont_resubmit_completed_jobs is True and plugin._sbatch_args == ""
    assert SLURMGraphPlugin(plugin_args=None)._settings == ClusterSettings()


def _node(tmp_path, name="invert_dipole", mem_gb=1.5, n_procs=2):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    node = pe.Node(IdentityInterface(fields=["value"]), name=name, mem_gb=mem_gb, n_procs=n_procs)
    node.base_dir = str(tmp_path / "work")
    node._hierarchy = "qsmflow_wf.sub_01_wf.sub_01_MEGRE_wf"
    node.config = copy.deepcopy(nipype.config._sections)
    node.config["execution"].update({"crashdump_dir": str(tmp_path / "crashes"), "crashfile_format": "txt"})
    return node


def _fake_sbatch(tmp_path, monkeypatch, answer="4242"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_args.json"
    script = bin_dir / "sbatch"
    script.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                      f"print({answer!r})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_jobs_are_named_and_sized_without_logname(tmp_path, monkeypatch):
    record = _fake_sbatch(tmp_path, monkeypatch)
    monkeypatch.delenv("LOGNAME", raising=False)
    plugin = SLURMPlugin(plugin_args={"cluster": {"partition": "short"}, "sbatch_args": "--qos=low"})
    node = _node(tmp_path)
    script = tmp_path / "batchscript.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    assert plugin._submit_batchtask(str(script), node) == 4242
    args = json.loads(record.read_text())
    assert args[:5] == ["--parsable", "--partition=short", "--mem=1536M", "--cpus-per-task=2", "--qos=low"]
    assert f"--output={tmp_path}/slurm-%j.out" in args
    assert args[-3:] == ["--job-name", "invert_dipole.sub_01_MEGRE_wf.sub_01_wf", str(script)]
    assert plugin._pending[4242] == node.output_dir()


@pytest.mark.parametrize("plugin_class, answer, expected", [
    (SGEPlugin, 'Your job 55 ("x") has been submitted', ["-q", "all.q", "-l", "h_vmem=768M", "-pe", "smp", "2"]),
    (PBSPlugin, "56.server", ["-q", "all.q", "-l", "mem=1536mb,nodes=1:ppn=2"]),
])
def test_sge_and_pbs_submit_with_node_resources_without_logname(tmp_path, monkeypatch, plugin_class, answer, expected):
    record = tmp_path / "qsub_args.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                                  f"print({answer!r})\n")
    (bin_dir / "qsub").chmod(0o755)
    (bin_dir / "qstat").write_text("#!/bin/sh\necho '<?xml version=\"1.0\"?><job_info><job_info></job_info></job_info>'\n")
    (bin_dir / "qstat").chmod(0o755)  # SGE's plugin asks qstat for the user's jobs when it starts
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LOGNAME", raising=False)
    plugin = plugin_class(plugin_args={"cluster": {"partition": "all.q"}})
    node = _node(tmp_path)
    script = tmp_path / "batchscript.sh"
    script.write_text("true\n")
    task = plugin._submit_batchtask(str(script), node)
    assert str(task) in answer
    args = json.loads(record.read_text())
    assert args[:len(expected)] == expected
    assert args[-1] == str(script) and "-N" in args and "-o" in args and "-e" in args


class _StubQueue:
    def __init__(self, state):
        self.answer = state

    def state(self, job_id, since=0.0):
        return self.answer

    def is_active(self, job_id, since=0.0):
        return False


@pytest.mark.parametrize("queue_state, described", [
    (("CANCELLED", "None"), " (CANCELLED)"),  # squeue still knows the job: reported at once
    (None, ""),  # SLURM forgot the job: nipype's wait for a result file, then the same report
])
def test_a_job_lost_without_result_becomes_a_readable_failure(tmp_path, queue_state, described):
    """nipype's driver dies with TypeError in report_crash here; qsmflow writes a crash file."""
    from nipype.pipeline.plugins.tools import report_crash

    plugin = SLURMPlugin(plugin_args={})
    plugin._config = {"execution": {"job_finished_timeout": "0"}}
    plugin._queue = _StubQueue(queue_state)
    node = _node(tmp_path)
    Path(node.output_dir()).mkdir(parents=True)
    plugin._pending[77] = node.output_dir()
    plugin._jobs[77] = {"node": node.fullname, "log": "/work/batch/slurm-77.out", "submitted": 0.0}
    result = plugin._get_result(77)
    assert isinstance(result["traceback"], list)
    report_crash(node, traceback=result["traceback"])  # what nipype's _clean_queue calls
    unit = WorkUnit(kind="scan", name="sub-01_MEGRE", subject="01", nodes=["sub_01_wf.sub_01_MEGRE_wf.invert_dipole"])
    (failure,) = read_crash_files(tmp_path / "crashes", [unit])
    assert (failure.subject, failure.unit, failure.node) == ("01", "sub-01_MEGRE", "invert_dipole")
    assert failure.reason == (f"ClusterJobError: SLURM job 77 ended{described} without writing a result; "
                              "job log: /work/batch/slurm-77.out")


def test_a_refused_submission_fails_only_its_node(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Memory specification can not be satisfied' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    plugin = SLURMPlugin(plugin_args={"max_tries": 0})
    node = _node(tmp_path)
    task = plugin._submit_job(node)
    assert task < 0
    result = plugin._get_result(task)
    assert "Memory specification can not be satisfied" in result["traceback"][0]


# ---------------------------------------------------------------- a real SLURM on localhost

@pytest.fixture(scope="session")
def slurm():
    """A cluster on localhost, started if needed and left running (another session may use it)."""
    try:
        slurm_cluster.start()
    except slurm_cluster.ClusterUnavailable as reason:
        pytest.skip(f"no SLURM here: {reason}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from qsmflow import simulate

    root = tmp_path_factory.mktemp("slurm")
    bids = simulate.write_bids_dataset(root / "bids", [("01", 30.0), ("02", 60.0)], shape=(48, 56, 48),
                                       voxel_size=(3.5, 3.5, 3.5))
    plugin_args = root / "plugin_args.yaml"
    plugin_args.write_text(yaml.safe_dump(LOOP))
    return {"root": root, "bids": bids, "plugin_args": plugin_args}


def qsmflow(cohort, name, *options):
    out, work = cohort["root"] / name / "out", cohort["root"] / name / "work"
    command = [sys.executable, "-m", "qsmflow.cli", str(cohort["bids"]), str(out), "participant", "--work-dir", str(work),
               "--plugin-args", str(cohort["plugin_args"]), *RECON, *options]
    return command, out, work


def run(command):
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def reference(cohort):
    command, out, _ = qsmflow(cohort, "multiproc", "--nprocs", "2")
    started = time.monotonic()
    answer = run(command)
    print(f"MultiProc run: {time.monotonic() - started:.1f} s")
    assert answer.returncode == 0, answer.stderr
    return images(out)


def images(out: Path) -> dict:
    """Every NIfTI under ``out``: relative path -> (header bytes, data)."""
    found = {}
    for path in sorted(out.rglob("*.nii.gz")):
        image = nib.load(str(path))
        found[str(path.relative_to(out))] = (image.header.binaryblock, np.asarray(image.dataobj))
    return found


def assert_identical(found: dict, reference: dict, subjects=("01", "02")) -> None:
    expected = {k: v for k, v in reference.items() if k.split("/")[0][4:] in subjects}
    assert sorted(found) == sorted(expected)
    assert sum(name.endswith("_Chimap.nii.gz") for name in found) == len(subjects)
    for name, (header, data) in expected.items():
        assert found[name][0] == header, name
        assert found[name][1].dtype == data.dtype and np.array_equal(found[name][1], data), f"{name} differs"


def results(work: Path) -> dict:
    """mtime of every cached node result, except the always-rerun derivative writers."""
    return {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz") if "write_derivatives" not in str(p)}


def job_ids(work: Path) -> list[str]:
    """Jobs of the run in ``work`` that started (each wrote a log)."""
    return sorted(p.stem.split("-")[1] for p in work.rglob("slurm-*.out"))


def queued_jobs(work: Path, states: str = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED") -> list[tuple[str, str, str]]:
    """(id, name, state) of this run's jobs in the queue (other test sessions may share the cluster)."""
    listing = subprocess.run(["squeue", "-h", "-t", states, "-o", "%i|%j|%T|%o"], capture_output=True, text=True, check=True)
    rows = [line.split("|", 3) for line in listing.stdout.splitlines() if line.count("|") >= 3]
    return [(job, name, state) for job, name, state, script in rows if script.startswith(f"{work}/")]


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_cluster_run_equals_multiproc_and_resumes_cached(slurm, cohort, reference, plugin):
    command, out, work = qsmflow(cohort, f"{plugin}-whole", "--plugin", plugin)
    started = time.monotonic()
    answer = run(command)
    print(f"{plugin} run: {time.monotonic() - started:.1f} s")
    assert answer.returncode == 0, answer.stderr
    assert_identical(images(out), reference)

    # every node was a SLURM job that asked for the node's declared memory and one core
    jobs = job_ids(work)
    assert len(jobs) >= 18  # 9 or 10 nodes per scan, two scans
    listing = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(jobs), "-o", "%i %j %m %C %T"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [line.split() for line in listing if line.strip()]
    assert len(rows) == len(jobs) and all(row[4] == "COMPLETED" for row in rows)
    declared = {n.name: n for n in _scan_nodes(cohort)}
    for _, name, memory, cpus, _ in rows:
        node = declared[name.split(".")[0]]
        assert memory == f"{int(np.ceil(node.mem_gb * 1024))}M" and cpus == str(node.n_procs), name

    before = results(work)
    again = run(command)
    assert again.returncode == 0, again.stderr
    assert results(work) == before  # nothing recomputed
    assert len(job_ids(work)) == len(jobs) + 2  # only the two derivative writers ran again


def _scan_nodes(cohort):
    from qsmflow.bids import collect_scans
    from qsmflow.workflows.base import init_participant_wf

    scans, _ = collect_scans(cohort["bids"], ["01"], field_strength=None)
    workflow = init_participant_wf(scans, load_config(None, RECON[1:]), cohort["root"] / "unused")
    return [workflow.get_node(name) for name in workflow.list_node_names()]


def _cancel_running(work: Path, job_prefix: str, node_dir: Path, process, timeout: float = 150) -> str:
    """scancel the job whose name starts with ``job_prefix`` once its node has started computing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        running = [job for job, name, _ in queued_jobs(work, "RUNNING") if name.startswith(job_prefix)]
        if running and list(node_dir.glob("_0x*_unfinished.json")):
            subprocess.run(["scancel", running[0]], check=True)
            return running[0]
        time.sleep(0.1)
    raise AssertionError(f"never saw a running job {job_prefix}* (run ended: {process.poll() is not None})")


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_scancelled_job_is_reported_and_the_rerun_resumes(slurm, cohort, reference, plugin):
    command, out, work = qsmflow(cohort, f"{plugin}-cancel", "--plugin", plugin)
    node_dir = work / "qsmflow_wf" / "sub_01_wf" / "sub_01_MEGRE_wf" / "invert_dipole"
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = _cancel_running(work, "invert_dipole.sub_01_MEGRE_wf", node_dir, process)
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    print(f"{plugin} interrupted run: {time.monotonic() - started:.1f} s")

    assert process.returncode == 1, stderr
    table = [line.split() for line in stderr.splitlines() if line.startswith("01 ")]
    assert len(table) == 1 and table[0][1:3] == ["sub-01_MEGRE", "invert_dipole"], stderr
    assert f"ClusterJobError: SLURM job {job} ended (CANCELLED" in stderr
    (failure,) = read_crash_files(next((work / "crashes").iterdir()))
    assert failure.node == "invert_dipole" and Path(failure.crash_file).read_text().startswith(
        "Node: qsmflow_wf.sub_01_wf.sub_01_MEGRE_wf.invert_dipole")
    assert_identical(images(out), reference, subjects=("02",))  # the other subject finished
    assert queued_jobs(work) == []  # no job left waiting (SLURMGraph: dependents cancelled)

    finished = results(work)
    assert not (node_dir / "result_invert_dipole.pklz").exists()
    assert any("sub_01_MEGRE_wf/remove_background" in str(p) for p in finished)
    started = time.monotonic()
    again = run(command)
    print(f"{plugin} resumed run: {time.monotonic() - started:.1f} s")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished nodes were not recomputed
    assert (node_dir / "result_invert_dipole.pklz").exists()
    assert_identical(images(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_sigterm_to_the_driver_cancels_its_jobs(slurm, cohort, plugin):
    command, _, work = qsmflow(cohort, f"{plugin}-sigterm", "--plugin", plugin)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # some node finished, and a job of this run is queued or running
            if list(work.rglob("result_load_echoes.pklz")) and queued_jobs(work):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("never saw a finished node and a queued job at once")
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "cancelling" in stderr
    assert queued_jobs(work) == []


@pytest.mark.slow
def test_a_rerun_after_the_driver_was_killed_cancels_its_leftover_jobs_and_completes(slurm, cohort, reference):
    command, out, work = qsmflow(cohort, "SLURMGraph-sigkill", "--plugin", "SLURMGraph")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(work.rglob("result_brain_mask.pklz")) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()  # SIGKILL: no chance to cancel its jobs
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert queued_jobs(work), "the killed driver left no job behind; nothing was tested"
    finished = results(work)
    answer = run(command)
    assert answer.returncode == 0, answer.stderr
    assert "left running by an earlier run of this work directory" in answer.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert_identical(images(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_a_node_failing_in_its_job_is_reported_and_its_dependents_never_run(slurm, cohort, tmp_path, plugin):
    for subject in ("01", "02"):  # a mask on the wrong grid: the brain_mask node raises inside its job
        nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / f"{subject}.nii.gz"))
    command, out, work = qsmflow(cohort, f"{plugin}-failing", "--plugin", plugin, "--set", "mask.method=file",
                                 f"mask.file={tmp_path}/{{subject}}.nii.gz")
    answer = run(command)
    assert answer.returncode == 1, answer.stderr
    rows = [line.split() for line in answer.stderr.splitlines() if line.startswith(("01 ", "02 "))]
    assert [row[2] for row in rows] == ["brain_mask", "brain_mask"], answer.stderr
    assert {f.node for f in read_crash_files(next((work / "crashes").iterdir()))} == {"brain_mask"}
    assert not list(work.rglob("result_unwrap_phase.pklz")) and not list(out.rglob("*_Chimap.nii.gz"))
    assert queued_jobs(work) == []


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_a_job_slurm_refuses_fails_its_scan_without_hanging(slurm, cohort, tmp_path, plugin):
    plugin_args = tmp_path / "too_big.yaml"
    plugin_args.write_text(yaml.safe_dump({**LOOP, "sbatch_args": "--mem=100000000M"}))
    command, out, _ = qsmflow(cohort, f"{plugin}-refused", "--plugin", plugin)
    command[command.index("--plugin-args") + 1] = str(plugin_args)
    answer = run(command)
    assert answer.returncode == 1
    rows = [line.split() for line in answer.stderr.splitlines() if line.startswith(("01 ", "02 "))]
    assert [row[2] for row in rows] == ["load_echoes", "load_echoes"], answer.stderr
    assert "ClusterJobError: sbatch could not submit the job: sbatch: error: Memory specification can not be satisfied" in answer.stderr
    assert not list(out.rglob("*_Chimap.nii.gz"))
