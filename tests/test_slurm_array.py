"""``--plugin SLURMArray``: one SLURM array task per participant, then a dependent group job.

The first group needs no scheduler. The second runs on the single-node SLURM of the test suite
(``tests/slurm_cluster.py``): three simulated participants are submitted as three array tasks
and one group job that waits for them (checked in the queue while it waits); one task is
cancelled while it runs, which cancels the group job; resubmitting the same command submits only
that participant and a new group job, which then runs the group level and succeeds; the Chimaps
are byte-identical to those of a local MultiProc run.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import slurm_cluster
from qsmflow import slurm_array
from qsmflow.config import ConfigError, load_config
from qsmflow.execution import plugin_settings
from qsmflow.slurm_array import ArraySettings, estimate_task_mem_gb

RUN_TIMEOUT = 180
#: The registration and ROI statistics of the participant level are not under test here, and cost a
#: minute per participant: they are switched off (where the configuration has them).
NO_SEGMENTATION = {"segmentation": {"enabled": False}, "reference": {"method": "mean"}}
NO_SEGMENTATION_SET = ["--set", "segmentation.enabled=false", "--set", "reference.method=mean"]


# ---------------------------------------------------------------- no scheduler needed

def test_task_memory_holds_the_largest_nodes_that_may_run_at_once():
    memories = {"01": [1.0, 2.0, 3.0, 0.25], "02": [0.5, 4.0]}
    assert estimate_task_mem_gb(memories, 1) == 4.5  # 4.0 (largest node) + 0.5 (driver)
    assert estimate_task_mem_gb(memories, 2) == 5.5  # 01: 3 + 2, 02: 4 + 0.5 -> 5 + 0.5
    assert estimate_task_mem_gb(memories, 8) == 6.8  # 01: all four nodes, rounded up to 0.1 GB


def test_preset_and_default_keys_agree():
    config = load_config("slurm-array")
    assert config["execution"]["plugin"] == "SLURMArray"
    assert set(config["execution"]["array"]) == set(slurm_array.ARRAY_KEYS)
    assert ArraySettings.from_config(config["execution"]["array"]) == ArraySettings(poll_seconds=30.0)
    with pytest.raises(ConfigError, match="execution.array.cpus_per_task"):
        load_config("slurm-array", ["execution.array.cpus_per_task=0"])
    with pytest.raises(ConfigError, match="execution.array.time"):
        ArraySettings.from_config({"time": "2 hours"})


def test_slurmarray_is_refused_where_a_workflow_runs_in_this_process():
    with pytest.raises(ConfigError, match="SLURMArray submits participant-level runs"):
        plugin_settings(load_config("slurm-array"))


def test_the_command_line_dispatches_to_the_array_mode(tmp_path, monkeypatch):
    from qsmflow import simulate
    from qsmflow.cli import main

    bids = simulate.write_bids_dataset(tmp_path / "bids", [("01", 30.0)], shape=(24, 28, 24), voxel_size=(4.0, 4.0, 4.0))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    code = main([str(bids), str(tmp_path / "out"), "participant", "--plugin", "SLURMArray"])
    assert code == 2  # a ConfigError: the array mode ran, and found no sbatch


def test_each_task_runs_the_participant_of_its_index(tmp_path):
    directory = tmp_path / "submission"
    (directory / "exit-codes").mkdir(parents=True)
    (directory / "labels.txt").write_text("01\n02\n03\n")
    record = tmp_path / "ran.txt"
    stand_in = tmp_path / "qsmflow"  # stands in for the participant command: records its arguments
    stand_in.write_text(f"#!/bin/sh\necho \"$@\" > {record}\n[ \"$2\" != 03 ]\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "participant.sbatch"
    script.write_text(slurm_array._task_script(directory, str(stand_in)))
    for index, label, code in ((1, "02", 0), (2, "03", 1)):
        answer = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                                env={**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "7",
                                     "SLURM_CPUS_PER_TASK": "3"})
        assert answer.returncode == code, answer.stderr
        assert record.read_text().split() == ["--participant-label", label, "--nprocs", "3"]
        assert (directory / "exit-codes" / label).read_text().strip() == str(code)
    beyond = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                            env={**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "7"})
    assert beyond.returncode == 2 and "no participant for array index 3" in beyond.stderr


def test_tasks_still_queued_from_an_earlier_submission_are_found_by_their_script(tmp_path, monkeypatch):
    work = tmp_path / "work"
    earlier = work / slurm_array.SUBMISSIONS / "20260101-000000"
    earlier.mkdir(parents=True)
    (earlier / "labels.txt").write_text("01\n02\n03\n")
    other = tmp_path / "elsewhere" / slurm_array.SUBMISSIONS / "x" / "participant.sbatch"
    listing = "\n".join([
        f"41_1|RUNNING|{earlier / 'participant.sbatch'}",
        f"41_2|PENDING|{earlier / 'participant.sbatch'}",
        f"41_0|COMPLETED|{earlier / 'participant.sbatch'}",  # ended: no longer in flight
        f"42|PENDING|{earlier / 'group.sbatch'}",
        f"43_0|RUNNING|{other}",  # another work directory's
    ])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat <<'END'\n{listing}\nEND\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    found = slurm_array.active_jobs_of(work)
    assert [(job["job"], job["kind"], job["label"]) for job in found] == [
        ("41_1", "participant", "02"), ("41_2", "participant", "03"), ("42", "group", None)]


def test_a_refused_group_job_cancels_the_array_and_leaves_no_submission(tmp_path, monkeypatch):
    from qsmflow import simulate
    from qsmflow.cluster import ClusterJobError

    bids = simulate.write_bids_dataset(tmp_path / "bids", [("01", 30.0)], shape=(24, 28, 24), voxel_size=(4.0, 4.0, 4.0))
    bin_dir, cancelled = tmp_path / "bin", tmp_path / "scancel.txt"
    bin_dir.mkdir()
    scripts = {  # sbatch accepts the array (job 500) and refuses the group job
        "sbatch": "#!/bin/sh\ncase \"$*\" in *--array=*) echo 500;; *) echo 'sbatch: error: invalid account' >&2; exit 1;; esac\n",
        "squeue": "#!/bin/sh\nexit 0\n",
        "scancel": f"#!/bin/sh\necho \"$@\" >> {cancelled}\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm_array, "SBATCH_RETRY_SECONDS", 0.0)
    config = load_config("slurm-array", ["execution.array.cpus_per_task=1", "segmentation.enabled=false", "reference.method=mean"])
    work = tmp_path / "work"
    with pytest.raises(ClusterJobError, match="invalid account"):
        slurm_array.submit(bids, tmp_path / "out", config=config, work_dir=work)
    assert cancelled.read_text().split() == ["500"]
    assert list((work / slurm_array.SUBMISSIONS).iterdir()) == []


# ---------------------------------------------------------------- a real SLURM on localhost

@pytest.fixture(scope="module")
def slurm():
    slurm_cluster.start_or_skip()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from qsmflow import simulate

    root = tmp_path_factory.mktemp("array")
    bids = simulate.write_bids_dataset(root / "bids", [("01", 30.0), ("02", 45.0), ("03", 60.0)], shape=(40, 48, 40),
                                       voxel_size=(4.0, 4.0, 4.0))
    return {"root": root, "bids": bids}


def _chimaps(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*_Chimap.nii.gz"))}


@pytest.fixture(scope="module")
def reference(cohort):
    out = cohort["root"] / "multiproc"
    answer = subprocess.run([sys.executable, "-m", "qsmflow.cli", str(cohort["bids"]), str(out), "participant",
                             "--config", "fast", "--nprocs", "2", "--work-dir", str(cohort["root"] / "multiproc-work"),
                             "--progress", "off", *NO_SEGMENTATION_SET], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert answer.returncode == 0, answer.stderr
    chimaps = _chimaps(out)
    assert len(chimaps) == 3
    return chimaps


def _submit_command(cohort, *, wait: bool) -> list[str]:
    """The participant command with the array mode (few bootstrap replicates for the group step)."""
    config = cohort["root"] / "array.yaml"
    config.write_text(yaml.safe_dump({
        "preset": "fast",
        "execution": {"plugin": "SLURMArray", "array": {"cpus_per_task": 1, "poll_seconds": 0.3, "wait": wait}},
        "group": {"bootstrap": 0, "test_bootstrap": 19, "test_bootstrap_structured": 19}, **NO_SEGMENTATION,
    }))
    return [sys.executable, "-m", "qsmflow.cli", str(cohort["bids"]), str(cohort["root"] / "out"), "participant",
            "--config", str(config), "--work-dir", str(cohort["root"] / "work")]


def _roi_tables_unless_written(cohort, reference_dir: Path) -> None:
    """The group level reads every scan's ``_roistats.tsv``. While the participant level writes
    none (no segmentation in the workflow yet), give each participant the table of its
    simulated truth (roi, num_voxels, mean), so that the group job has its inputs."""
    import csv

    if list(reference_dir.rglob("*_roistats.tsv")):
        return
    for truth in sorted((cohort["bids"] / "derivatives" / "simulation").glob("sub-*/anat/*_desc-truth_roistats.tsv")):
        subject = truth.name.split("_")[0]
        table = cohort["root"] / "out" / subject / "anat" / f"{subject}_roistats.tsv"
        table.parent.mkdir(parents=True, exist_ok=True)
        rows = list(csv.DictReader(truth.open(), delimiter="\t"))
        table.write_text("roi\tnum_voxels\tmean\n" + "".join(f"{r['name']}\t{r['voxels']}\t{r['mean']}\n" for r in rows))


def _queue(*job_ids) -> dict[str, tuple[str, str]]:
    listing = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, check=True).stdout
    return {fields[0]: (fields[1], fields[2]) for fields in (line.split("|") for line in listing.splitlines()) if len(fields) == 3}


def _wait_until_ended(job_ids, timeout=RUN_TIMEOUT) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _queue(*job_ids)
        if states and all(state not in slurm_array.SLURM_ACTIVE_STATES for state, _ in states.values()):
            return states
        time.sleep(0.3)
    raise AssertionError(f"jobs {job_ids} still queued or running after {timeout} s: {_queue(*job_ids)}")


def _submitted(stdout: str) -> tuple[str, int, str]:
    match = re.search(r"submitted: participant array (\d+) \((\d+) task\(s\)\), group job (\d+)", stdout)
    assert match, stdout
    return match.group(1), int(match.group(2)), match.group(3)


@pytest.mark.slow
def test_array_tasks_group_job_cancel_and_resubmission(slurm, cohort, reference):
    work, out = cohort["root"] / "work", cohort["root"] / "out"
    _roi_tables_unless_written(cohort, cohort["root"] / "multiproc")
    started = time.monotonic()
    answer = subprocess.run(_submit_command(cohort, wait=False), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert answer.returncode == 0, answer.stderr
    array, tasks, group = _submitted(answer.stdout)
    assert tasks == 3 and f"qsmflow status {work} {out}" in answer.stdout

    # while queued: three array tasks, and a group job held by its dependency on the array
    queued = _queue(array, group)
    print(f"queued after submission: {queued}")
    assert set(queued) == {f"{array}_0", f"{array}_1", f"{array}_2", group}, queued
    assert queued[group] == ("PENDING", "Dependency"), queued
    held = subprocess.run(["scontrol", "show", "job", group], capture_output=True, text=True, check=True).stdout
    assert f"Dependency=afterok:{array}_*(unfulfilled)" in held and "KillOInInvalidDependent=Yes" in held, held
    submission = next((work / "slurm-array").iterdir())
    assert (submission / "labels.txt").read_text().split() == ["01", "02", "03"]

    # cancel sub-02's task while it runs
    log = submission / "logs" / f"participant-{array}_1.out"
    deadline = time.monotonic() + 60
    while not (_queue(f"{array}_1").get(f"{array}_1", ("",))[0] == "RUNNING" and log.is_file()
               and "qsmflow: participant 02" in log.read_text()):
        assert time.monotonic() < deadline, f"sub-02's task never ran: {_queue(array)}"
        time.sleep(0.05)
    subprocess.run(["scancel", f"{array}_1"], check=True)
    ended = _wait_until_ended([array, group])
    print(f"after scancel {array}_1: {ended}")
    assert ended[f"{array}_0"][0] == ended[f"{array}_2"][0] == "COMPLETED", ended
    assert ended[f"{array}_1"][0] == "CANCELLED", f"the task was not cancelled while running: {ended}"
    assert ended[group] == ("CANCELLED", "DependencyNeverSatisfied"), ended  # not left pending forever
    assert sorted(_chimaps(out)) == ["sub-01/anat/sub-01_Chimap.nii.gz", "sub-03/anat/sub-03_Chimap.nii.gz"]
    assert not (submission / "exit-codes" / "02").exists()
    status = subprocess.run([sys.executable, "-m", "qsmflow.cli", "status", str(work), str(out)], capture_output=True,
                            text=True, timeout=60)
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines() if line.startswith("sub-")}
    # (sub-02 may not be listed at all: its task can be cancelled before its run recorded its units)
    assert states["sub-01_MEGRE"] == states["sub-03_MEGRE"] == "done" and states.get("sub-02_MEGRE") != "done", status.stdout
    print(f"first submission: {time.monotonic() - started:.1f} s")

    # the same command again, waiting this time: only sub-02, and a new group job that runs
    again = subprocess.run(_submit_command(cohort, wait=True), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stdout + again.stderr
    second_array, second_tasks, second_group = _submitted(again.stdout)
    assert second_tasks == 1 and "already done" in again.stderr and "sub-01, sub-03" in again.stderr
    resubmission = next(p for p in (work / "slurm-array").iterdir() if p != submission)
    assert (resubmission / "labels.txt").read_text().split() == ["02"]
    finished = _queue(second_array, second_group)
    print(f"resubmission: {finished}")
    assert finished == {f"{second_array}_0": ("COMPLETED", "None"), second_group: ("COMPLETED", "None")}, finished
    assert (resubmission / "exit-codes" / "group").read_text().strip() == "0"
    report = [line.split() for line in again.stdout.splitlines() if line.startswith(("sub-", "group"))]
    assert [row[:3] for row in report] == [["sub-02", f"{second_array}_0", "done"], ["group", second_group, "done"]]
    trajectories = out / "group" / "trajectories.tsv"  # the group level's results, from all three participants
    assert trajectories.is_file() and trajectories.stat().st_mtime > resubmission.stat().st_mtime
    group_log = (resubmission / "logs" / f"group-{second_group}.out").read_text()
    assert "finished" in group_log, group_log

    assert _chimaps(out) == reference  # byte for byte
    print(f"whole test: {time.monotonic() - started:.1f} s")
