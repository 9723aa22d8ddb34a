"""Units of work: declared by builders, found in composed workflows, and used unchanged by the
command line, ``qsmflow status``, the progress display and crash attribution for a level that
none of them knows (a toy group level that sums the subjects' values)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow import cli, levels
from qsmflow.status import cohort_status, format_status, main_status
from qsmflow.workunits import collect_units, declare_unit, unit_of_node


def _value(subject, output_dir, broken=False):
    """Toy per-subject step: write the subject's value (its label as a number)."""
    from pathlib import Path

    if subject == "13" or broken:
        raise ValueError(f"subject {subject}: unlucky input")
    path = Path(output_dir) / f"sub-{subject}" / "toy" / f"sub-{subject}_value.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(int(subject)))
    return str(path)


def _sum(values, output_dir):
    """Toy group step: sum the subjects' values."""
    from pathlib import Path

    path = Path(output_dir) / "group" / "toy_sum.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(sum(int(Path(v).read_text()) for v in values)))
    return str(path)


def toy_level(bids_dir, output_dir, config, participant_labels=()):
    subjects = list(participant_labels) or ["01", "02"]
    workflow = pe.Workflow(name="toy_wf")
    merge = pe.Node(niu.Merge(len(subjects)), name="gather")
    total = pe.Node(niu.Function(function=_sum, input_names=["values", "output_dir"], output_names=["out"]),
                    name="sum_values")
    total.inputs.output_dir = str(output_dir)
    group_wf = declare_unit(pe.Workflow(name="group_wf"), kind="sum", name="group-sum", outputs=["group/toy_sum.txt"])
    group_wf.add_nodes([merge, total])
    group_wf.connect(merge, "out", total, "values")
    for index, subject in enumerate(subjects, start=1):
        subject_wf = declare_unit(pe.Workflow(name=f"s{subject}_wf"), kind="value", name=f"value-{subject}",
                                  subject=subject, outputs=[f"sub-{subject}/toy/sub-{subject}_value.txt"])
        node = pe.Node(niu.Function(function=_value, input_names=["subject", "output_dir", "broken"], output_names=["out"]),
                       name="compute_value")
        node.inputs.subject, node.inputs.output_dir = subject, str(output_dir)
        node.inputs.broken = subject in os.environ.get("TOY_BROKEN", "").split()
        subject_wf.add_nodes([node])
        workflow.connect(subject_wf, "compute_value.out", group_wf, f"gather.in{index}")
    return levels.LevelPlan(workflow=workflow, noun="value")


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(levels.LEVELS, "toy", toy_level)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    for subject in ("01", "02", "13"):
        (bids / f"sub-{subject}").mkdir()
    return bids


def test_collect_units_assigns_every_node_to_its_innermost_unit():
    plan = toy_level(None, "/out", {}, ["01", "02"])
    units = {unit.name: unit for unit in collect_units(plan.workflow)}
    assert set(units) == {"group-sum", "value-01", "value-02"}
    assert units["value-01"].nodes == ["s01_wf.compute_value"] and units["value-01"].subject == "01"
    assert sorted(units["group-sum"].nodes) == ["group_wf.gather", "group_wf.sum_values"]
    assert units["group-sum"].subject is None and units["group-sum"].owner == "group-sum"
    assert sorted(units["group-sum"].after) == ["value-01", "value-02"] and units["value-01"].after == []
    assert unit_of_node(list(units.values()), "toy_wf.s02_wf.compute_value").name == "value-02"
    assert unit_of_node(list(units.values()), "toy_wf.elsewhere") is None


def test_units_of_one_name_merge_and_different_units_cannot_share_a_name():
    top = pe.Workflow(name="top")
    first = declare_unit(pe.Workflow(name="recon_wf"), kind="scan", name="sub-01_MEGRE", subject="01", outputs=["a"])
    second = declare_unit(pe.Workflow(name="seg_wf"), kind="scan", name="sub-01_MEGRE", subject="01", outputs=["b"])
    for workflow in (first, second):
        workflow.add_nodes([pe.Node(niu.Merge(1), name="step")])
    top.add_nodes([first, second])
    (unit,) = collect_units(top)
    assert unit.outputs == ["a", "b"] and sorted(unit.nodes) == ["recon_wf.step", "seg_wf.step"]
    declare_unit(second, kind="fit", name="sub-01_MEGRE")
    with pytest.raises(ValueError, match="two different units of work are named 'sub-01_MEGRE'"):
        collect_units(top)


def test_identity_nodes_are_not_counted():
    workflow = declare_unit(pe.Workflow(name="w"), kind="scan", name="x")
    step = pe.Node(niu.Merge(1), name="step")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out"]), name="outputnode")
    workflow.connect(step, "out", outputnode, "out")
    (unit,) = collect_units(workflow)
    assert unit.nodes == ["step"]  # nipype never runs the outputnode


def test_a_new_level_gets_status_progress_and_crash_attribution(toy, tmp_path, capsys, caplog):
    out, work = tmp_path / "out", tmp_path / "work"
    with caplog.at_level(logging.INFO, logger="qsmflow"):
        logging.getLogger("qsmflow").addHandler(caplog.handler)
        code = cli.main([str(toy), str(out), "toy", "--participant-label", "01", "13", "--work-dir", str(work),
                         "--plugin", "Linear", "--progress", "log"])
    assert code == 1
    err = capsys.readouterr().err
    # the failure table attributes the crash to the toy unit, headed by the level's noun
    assert "1 of 2 value(s) finished; 1 failed" in err
    row = next(line for line in err.splitlines() if line.startswith("13 "))
    assert row.split()[:3] == ["13", "value-13", "compute_value"]
    assert "unlucky input" in row
    assert err.splitlines()[-1].startswith("qsmflow: error: subject 13: unlucky input (value value-13, step compute_value)")
    # the progress lines name the units
    messages = [r.getMessage() for r in caplog.records]
    assert any("value-01: compute_value done" in m for m in messages), messages
    assert any("value-13: compute_value FAILED" in m for m in messages), messages
    # status knows the level's units from the records alone
    states = {s.name: s for s in cohort_status(work)}
    assert states["value-01"].state == "done" and states["value-01"].kind == "value"
    assert states["value-13"].state == "failed" and states["value-13"].node == "compute_value"
    assert states["group-sum"].state == "pending"  # downstream of the failure
    table = format_status(list(states.values()))
    assert "1 sum(s) and 2 value(s): 1 done, 1 failed, 0 running, 1 pending; 1 of 4 nodes done" in table

    # a good input: the level completes, status says so, and the cached unit is reused
    code = cli.main([str(toy), str(out), "toy", "--participant-label", "01", "02", "--work-dir", str(work),
                     "--plugin", "Linear", "--progress", "off"])
    assert code == 0
    assert (out / "group" / "toy_sum.txt").read_text() == "3"
    states = {s.name: s.state for s in cohort_status(work)}
    assert states["value-01"] == states["value-02"] == states["group-sum"] == "done"


def test_status_does_not_count_outputs_of_an_earlier_configuration(toy, tmp_path):
    """Outputs exist from a finished run, but a rerun with other inputs started the unit and
    stopped: the unit is pending, not done."""
    out, work = tmp_path / "out", tmp_path / "work"
    assert cli.main([str(toy), str(out), "toy", "--participant-label", "01", "02", "--work-dir", str(work),
                     "--plugin", "Linear", "--progress", "off"]) == 0
    assert {s.state for s in cohort_status(work)} == {"done"}
    node_dir = work / "toy_wf" / "s01_wf" / "compute_value"
    (node_dir / "_0xfeedface_unfinished.json").write_text("{}")  # a later run with new inputs started it
    states = {s.name: s.state for s in cohort_status(work)}
    assert states["value-01"] == "pending" and states["value-02"] == "done"
    assert Path(out / "sub-01" / "toy" / "sub-01_value.txt").is_file()


def test_status_after_a_failed_rerun_with_new_settings_is_failed_not_done(toy, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    arguments = [str(toy), str(out), "toy", "--participant-label", "01", "02", "--work-dir", str(work), "--plugin",
                 "Linear", "--progress", "off"]
    assert cli.main(arguments) == 0
    monkeypatch.setenv("TOY_BROKEN", "02")  # new inputs for sub-02's step, which now fails
    assert cli.main(arguments) == 1
    assert (out / "sub-02" / "toy" / "sub-02_value.txt").is_file()  # the first run's output is still there
    states = {s.name: s for s in cohort_status(work)}
    assert {name: s.state for name, s in states.items()} == {"value-01": "done", "value-02": "failed", "group-sum": "pending"}
    assert states["group-sum"].reason == "waits for value-02"  # its output is from the first run


def test_status_finds_outputs_where_the_run_wrote_them(toy, tmp_path, capsys):
    """As `qsmflow status DEMO/work DEMO` for the demo, whose derivatives are in DEMO/derivatives/qsmflow."""
    out, work = tmp_path / "derivatives" / "qsmflow", tmp_path / "work"
    assert cli.main([str(toy), str(out), "toy", "--work-dir", str(work), "--plugin", "Linear", "--progress", "off"]) == 0
    capsys.readouterr()
    assert main_status(work, tmp_path) == 0
    printed = capsys.readouterr().out
    assert f"the run wrote its outputs to {out}" in printed
    assert "3 done, 0 failed, 0 running, 0 pending" in printed
    assert main_status(work) == 0 and "3 done" in capsys.readouterr().out
    assert main_status(tmp_path / "empty") == 1
