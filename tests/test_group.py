"""Group level: gathering the cohort's tables (and its realities), the workflow, its cache, outputs."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsmflow.group import GroupInputError, gather_group_table, read_tsv, trajectory_rows
from qsmflow.segmentation import ROISTATS_COLUMNS
from qsmflow.simulate import TRUE_TRAJECTORIES, true_susceptibility
from qsmflow.stats.trajectories import analyse_roi

ROIS = ("GP", "PU", "SCC")
FAST = ["--set", "group.bootstrap=10", "group.test_bootstrap=49", "group.test_bootstrap_structured=19",
        "group.grid_points=61", "execution.nprocs=2"]


def _write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_roistats(path: Path, age: float, rng, rois=ROIS, noise=0.006):
    rows = []
    for roi in rois:
        shift = rng.normal(0, noise)
        for side, hemisphere in (("L", "left"), ("R", "right")):
            value = true_susceptibility(roi, age) + shift + rng.normal(0, noise / 2)
            rows.append([f"{roi}_{side}", 1, roi, hemisphere, 120, 960.0, f"{value:.6f}", f"{value:.6f}", 0.02, -0.1,
                         0.3, "lateral-ventricle CSF"])
    _write_tsv(path, ROISTATS_COLUMNS, rows)


def make_cohort(root: Path, n_subjects: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """Raw dataset (participants.tsv, some sessions.tsv) and derivatives with _roistats.tsv."""
    rng = np.random.default_rng(seed)
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    ages = np.linspace(1, 80, n_subjects)
    rng.shuffle(ages)
    participants = []
    for i, age in enumerate(ages):
        label = f"{i + 1:02d}"
        participants.append([f"sub-{label}", f"{age:.1f}", "F" if i % 2 else "M"])
        if i % 6 == 0:
            _write_tsv(bids / f"sub-{label}" / f"sub-{label}_sessions.tsv", ["session_id", "age"],
                       [["ses-1", f"{age:.1f}"], ["ses-2", f"{age + 2.5:.1f}"]])
            for session, session_age in (("1", age), ("2", age + 2.5)):
                write_roistats(out / f"sub-{label}" / f"ses-{session}" / "anat" /
                               f"sub-{label}_ses-{session}_MEGRE_roistats.tsv", session_age, rng)
        else:
            write_roistats(out / f"sub-{label}" / "anat" / f"sub-{label}_MEGRE_roistats.tsv", age, rng)
    _write_tsv(bids / "participants.tsv", ["participant_id", "age", "sex"], participants)
    return bids, out


def test_gathering_reports_every_reality_of_the_cohort(tmp_path):
    bids, out = make_cohort(tmp_path, n_subjects=12)
    rows = read_tsv(bids / "participants.tsv")
    rows[1]["age"] = "n/a"  # sub-02: no age anywhere
    rows[2]["sex"] = "n/a"  # sub-03: covariate missing
    rows[0]["age"] = "30"  # sub-01 has sessions at other ages
    _write_tsv(bids / "participants.tsv", ["participant_id", "age", "sex"], [list(r.values()) for r in rows])
    lacking = out / "sub-04" / "anat" / "sub-04_MEGRE_roistats.tsv"
    write_roistats(lacking, 40.0, np.random.default_rng(1), rois=("GP", "PU"))
    half = out / "sub-05" / "anat" / "sub-05_MEGRE_roistats.tsv"
    table = read_tsv(half)
    table[0]["num_voxels"], table[0]["mean"] = "0", "n/a"  # GP_L empty
    _write_tsv(half, ROISTATS_COLUMNS, [list(r.values()) for r in table])

    files = sorted(out.glob("sub-*/**/*_roistats.tsv"))
    gathered, notes = gather_group_table(files, bids, covariates=("sex", "site"))
    assert notes["subjects_without_age"] == ["sub-02"]
    assert [d["participant_id"] for d in notes["age_disagreements"]] == ["sub-01"]
    assert notes["missing_covariates"][0]["scan"] == "sub-03_MEGRE"
    assert notes["covariates_absent"] == ["site"]
    assert notes["roi_missing"] == {"SCC": ["sub-04_MEGRE"]}
    assert notes["hemispheres_incomplete"][0] == {"scan": "sub-05_MEGRE", "roi": "GP", "present": ["GP_R"]}
    by_scan = {(r["scan"], r["roi"]): r for r in gathered}
    assert not by_scan["sub-02_MEGRE", "GP"]["included"] and by_scan["sub-02_MEGRE", "GP"]["exclusion"] == "no age"
    assert not by_scan["sub-03_MEGRE", "GP"]["included"] and "sex" in by_scan["sub-03_MEGRE", "GP"]["exclusion"]
    assert by_scan["sub-01_ses-2_MEGRE", "GP"]["age_source"] == "sessions.tsv"
    assert by_scan["sub-05_MEGRE", "GP"]["included"] and by_scan["sub-05_MEGRE", "GP"]["num_voxels"] == 120
    assert {r["roi"] for r in gathered} == set(ROIS)  # hemispheres combined


def test_an_unusable_roi_table_is_refused_naming_the_file(tmp_path):
    bids, out = make_cohort(tmp_path, n_subjects=8)
    bad = out / "sub-03" / "anat" / "sub-03_MEGRE_roistats.tsv"
    _write_tsv(bad, ["roi", "num_voxels"], [["GP_L", "10"]])
    with pytest.raises(GroupInputError, match=r"sub-03_MEGRE_roistats.tsv.*lacks column\(s\) mean"):
        gather_group_table([bad], bids)
    from qsmflow.config import load_config
    from qsmflow.workflows.group import group_level

    plan = group_level(bids, out, load_config(None))
    assert [p.unit for p in plan.problems] == ["sub-03_MEGRE"] and "lacks column" in plan.problems[0].reason
    assert plan.workflow is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = group_level(bids, empty, load_config(None))
    assert plan.workflow is None and "no readable _roistats.tsv" in plan.problems[0].reason


def test_too_few_scans_skip_models_with_the_reason():
    ages = np.array([5.0, 20, 35, 50, 65, 80, 12])
    values = true_susceptibility("GP", ages)
    result = analyse_roi(values + np.random.default_rng(0).normal(0, 0.005, 7), ages, [str(i) for i in range(7)],
                         models=("exponential", "linear", "cubic"), n_bands=5, n_test=19, grid_points=41)
    assert "exponential" in result["models"] and "linear" in result["models"]
    assert result["skipped"]["cubic"] == "7 scans; cubic needs at least 8"
    rows = trajectory_rows({"GP": {"kind": "deep_grey", "analysis": result}})
    assert [(r["model"], r["status"]) for r in rows] == [("exponential", "fitted"), ("linear", "fitted"), ("cubic", "skipped")]


def test_the_demo_runs_the_group_level_only_on_roi_tables(tmp_path, capsys):
    from qsmflow.cli import _demo_group
    from qsmflow.config import load_config

    bids, out = make_cohort(tmp_path / "cohort", n_subjects=4)
    empty = tmp_path / "derivatives"
    assert _demo_group(bids, empty, tmp_path, 0, config=load_config(None), work_dir=tmp_path / "work") == 0
    assert not (tmp_path / "demo_trajectories.txt").exists() and "group report" not in capsys.readouterr().out


def run_group(bids, out, work, *extra) -> int:
    """``qsmflow BIDS OUT group`` in a new process, as users run it."""
    command = [sys.executable, "-m", "qsmflow.cli", str(bids), str(out), "group", "--work-dir", str(work),
               "--progress", "off", *FAST, *extra]
    return subprocess.run(command, capture_output=True, text=True).returncode


def _result_times(work: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in work.glob("group_wf/*/result_*.pklz")}


@pytest.mark.slow
def test_group_level_end_to_end_with_its_cache(tmp_path):
    from qsmflow.config import load_config
    from qsmflow.reports.group import recovered_parameters
    from qsmflow.workflows.group import group_level
    from qsmflow.workunits import collect_units

    bids, out = make_cohort(tmp_path)
    work = tmp_path / "work"
    assert run_group(bids, out, work) == 0
    from conftest import bids_validator_errors

    assert bids_validator_errors(out) == []  # the group level leaves a valid derivatives dataset
    group = out / "group"
    for name in ("roistats.tsv", "trajectories.tsv", "trajectories.json", "zscores.tsv", "cohort.json", "index.html"):
        assert (group / name).is_file(), name
    trajectories = {(r["roi"], r["model"]): r for r in read_tsv(group / "trajectories.tsv")}
    assert set(trajectories) == {(roi, m) for roi in ("GP", "PU") for m in ("exponential", "linear", "quadratic", "cubic")} | {
        ("SCC", m) for m in ("poisson", "linear", "quadratic", "cubic")}
    gp, pu, scc = trajectories["GP", "exponential"], trajectories["PU", "exponential"], trajectories["SCC", "poisson"]
    assert float(gp["b"]) > float(pu["b"])
    assert 20 < float(scc["extremum_age"]) < 40 and scc["extremum_kind"] == "minimum"
    assert float(gp["b_ci_low"]) < TRUE_TRAJECTORIES["GP"]["b"] < float(gp["b_ci_high"])
    assert gp["variance"].endswith("subject random intercept, constant sigma") and gp["n_subjects"] == "30"
    assert float(gp["p_age"]) <= 1 / 20 + 1e-9 and gp["q_age"] != "n/a"
    sidecar = json.loads((group / "trajectories.json").read_text())
    assert sidecar["b"]["Units"] == "1/year" and "exponential" in sidecar["Models"]
    assert sidecar["Settings"]["bootstrap"] == 10
    zscores = read_tsv(group / "zscores.tsv")
    assert len(zscores) == 35 * 3  # 30 subjects, 5 with two sessions, 3 ROIs
    held_out = np.array([float(r["z_heldout"]) for r in zscores])
    assert abs(held_out.mean()) < 0.3 and 0.7 < held_out.std() < 1.4
    page = (group / "index.html").read_text()
    for figure in ("figures/roi-GP_trajectory.png", "figures/trajectories_grid.png", "figures/zscores_qq.png"):
        assert figure in page and (group / figure).is_file()
    recovered = {(r["roi"], r["parameter"]): r for r in recovered_parameters(
        group / "trajectories.tsv", {roi: TRUE_TRAJECTORIES[roi] for roi in ROIS})}
    assert recovered["GP", "b"]["estimate"] == pytest.approx(float(gp["b"])) and recovered["GP", "b"]["covered"]
    assert recovered["SCC", "B"]["true"] == TRUE_TRAJECTORIES["SCC"]["B"]
    plan_units = collect_units(group_level(bids, out, load_config(None)).workflow)
    assert sorted(u.name for u in plan_units if u.kind == "fit") == ["group-GP", "group-PU", "group-SCC"]
    status = subprocess.run([sys.executable, "-m", "qsmflow.cli", "status", str(work), str(out)], capture_output=True,
                            text=True).stdout
    assert "1 group(s) and 3 fit(s): 4 done" in status, status

    # a figure option changes: only figure nodes (and the publisher) run again
    before = _result_times(work)
    assert run_group(bids, out, work, "group.figures.dpi=60") == 0
    after = _result_times(work)
    rerun = {name for name in before if after[name] != before[name]}
    assert rerun == {"plot_GP", "plot_PU", "plot_SCC", "merge_figures", "plot_group", "publish"}

    # a new subject: every ROI is refitted
    write_roistats(out / "sub-31" / "anat" / "sub-31_MEGRE_roistats.tsv", 50.0, np.random.default_rng(5))
    with (bids / "participants.tsv").open("a") as handle:
        handle.write("sub-31\t50.0\tF\n")
    assert run_group(bids, out, work, "group.figures.dpi=60") == 0
    refit = _result_times(work)
    assert all(refit[f"fit_{roi}"] != after[f"fit_{roi}"] for roi in ROIS)
    assert len(read_tsv(group / "zscores.tsv")) == 36 * 3
