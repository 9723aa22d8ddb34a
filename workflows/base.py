"""Cohort-level workflow: one sub-workflow per subject, one per scan inside it."""
from __future__ import annotations

import re

import nibabel as nib
from nipype.pipeline import engine as pe

from qsmflow.bids import InputError, orientation_sets
from qsmflow.workunits import declare_unit

from .cosmos import connect_orientation_set, init_cosmos_wf
from .recon import init_scan_qsm_wf
from .reports import add_subject_reports


def subject_workflow_name(subject: str) -> str:
    """nipype name of a subject's sub-workflow."""
    return "sub_" + re.sub(r"[^A-Za-z0-9]", "_", subject) + "_wf"


def init_participant_wf(scans, config: dict, output_dir, *, name: str = "qsmflow_wf"):
    """Reconstruct every scan of every selected participant.

    Parameters
    ----------
    scans : list of qsmflow.bids.Scan
        Validated scans (from :func:`qsmflow.bids.collect_scans`).
    config : dict
        Validated configuration.
    output_dir : path
        Root of the derivatives dataset.

    Returns
    -------
    nipype Workflow named ``name`` containing ``sub_<label>_wf`` workflows (a subject's unit of
    work, for steps that join its scans), each with one ``<scan>_wf`` per scan (a scan's unit; see
    :func:`qsmflow.workflows.recon.init_scan_qsm_wf`) and, with ``report.enabled``, the subject's report
    (:func:`qsmflow.workflows.reports.add_subject_reports`).
    """
    workflow = pe.Workflow(name=name)
    subjects: dict[str, pe.Workflow] = {}
    scan_wfs: dict[int, pe.Workflow] = {}
    for scan in scans:
        if scan.subject not in subjects:
            subjects[scan.subject] = declare_unit(pe.Workflow(name=subject_workflow_name(scan.subject)), kind="subject",
                                                  name=f"sub-{scan.subject}", subject=scan.subject)
        subject_wf = subjects[scan.subject]
        shape = nib.load(scan.magnitude_files[0]).shape
        scan_wfs[id(scan)] = init_scan_qsm_wf(scan, config, output_dir, shape=shape, name=f"{scan.node_name}_{scan.suffix}_wf")
        subject_wf.add_nodes([scan_wfs[id(scan)]])
    if config["cosmos"]["enabled"]:
        sets = orientation_sets(scans, config["cosmos"]["group_by"], config["cosmos"]["files"])
        if not sets:
            raise InputError(f"cosmos.enabled: no orientation set found with cosmos.group_by "
                             f"{config['cosmos']['group_by']!r} (a set is two or more scans of one session)")
        for members in sets:
            shape = nib.load(members[0].magnitude_files[0]).shape
            cosmos_wf = init_cosmos_wf(members, config, output_dir, shape=shape,
                                       name=f"{members[0].node_name}_{members[0].suffix}_cosmos_wf")
            connect_orientation_set(subjects[members[0].subject], cosmos_wf, [scan_wfs[id(s)] for s in members])
    if config["report"]["enabled"]:
        add_subject_reports(subjects, scans, scan_wfs, config, output_dir)  # sub-<label>.html, in the subject's unit
    workflow.add_nodes(list(subjects.values()))
    return workflow
