"""Report workflows: the participant report joins every scan of a subject."""
from __future__ import annotations

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.interfaces.reports import PublishReport, SubjectReport
from qsmflow.workunits import declare_unit

#: Per-scan inputs of the subject report that every scan has (from the reconstruction).
RECON_FIELDS = ("magnitude", "brain_mask", "qsm_mask", "chimap")
#: Per-scan inputs that exist only when segmentation runs.
SEGMENTATION_FIELDS = ("dseg", "dseg_tsv", "roistats", "template")


def scan_input(field: str, index: int) -> str:
    """Name of the report workflow's ``inputnode`` field for scan ``index``'s ``field``."""
    return f"{field}_{index}"


def init_subject_report_wf(subject: str, scan_names, output_dir, config: dict | None = None, *, segmentation: bool = False,
                           orientation: str = "radiological", chi_window: float = 0.15, figure_format: str = "png",
                           mem_gb: float = 1.0, name: str = "subject_report_wf"):
    """Write ``OUTPUT_DIR/sub-<subject>.html`` with a section per scan of the subject.

    Parameters
    ----------
    subject : str
        Participant label (without ``sub-``).
    scan_names : list of str
        Every scan of the subject (all sessions), as BIDS prefix and suffix
        (``sub-01_ses-1_MEGRE``), in the order of the ``inputnode`` indices.
    output_dir : path
        Root of the derivatives dataset.
    config : dict, optional
        Configuration used (shown in the footer).
    segmentation : bool
        Whether the scans have segmentation outputs (``dseg``, ``dseg_tsv``, ``roistats``,
        ``template``); without it the page states that segmentation did not run.
    orientation, chi_window, figure_format
        See :func:`qsmflow.reports.subject.write_subject_report`.
    mem_gb : float
        Memory of the rendering node (a few copies of one scan's volumes and matplotlib).

    Inputs (``inputnode``), for each scan index ``i`` (:func:`scan_input`)
    -----------------------------------------------------------------------
    magnitude_i, brain_mask_i, qsm_mask_i, chimap_i
        From the scan's reconstruction (:func:`init_scan_qsm_wf` ``outputnode``; the Chimap is
        the written derivative, whose JSON sidecar gives the methods shown).
    dseg_i, dseg_tsv_i, roistats_i, template_i
        With ``segmentation``: labels and their table in the scan's grid, the ROI statistics
        and the template warped into the scan's grid (``""`` for a scan without them).

    Outputs (``outputnode``)
    ------------------------
    out_report
        The written page in OUTPUT_DIR.

    The rendering node is cached (it reruns when any input's content changes, e.g. after an
    ROI-statistics option changed); the publishing node always runs, rewrites nothing unchanged
    and writes the page after its figures. The workflow belongs to the subject's unit of work,
    done when the page exists.
    """
    scan_names = list(scan_names)
    if not scan_names:
        raise ValueError(f"sub-{subject}: a report needs at least one scan")
    fields = RECON_FIELDS + (SEGMENTATION_FIELDS if segmentation else ())
    workflow = declare_unit(pe.Workflow(name=name), kind="subject", name=f"sub-{subject}", subject=subject,
                            outputs=[f"sub-{subject}.html"])
    inputnode = pe.Node(niu.IdentityInterface(fields=[scan_input(f, i) for f in fields for i in range(len(scan_names))]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_report"]), name="outputnode")
    report = pe.Node(SubjectReport(subject=subject, scan_names=scan_names, orientation=orientation, chi_window=chi_window,
                                   figure_format=figure_format),
                     name="subject_report", mem_gb=mem_gb, n_procs=1)
    if config is not None:
        report.inputs.config = config
    publish = pe.Node(PublishReport(output_dir=str(output_dir)), name="publish_report", mem_gb=0.2, n_procs=1)
    publish.overwrite = True
    for field in fields:
        merge = pe.Node(niu.Merge(len(scan_names)), name=f"merge_{field}", run_without_submitting=True)
        workflow.connect([(inputnode, merge, [(scan_input(field, i), f"in{i + 1}") for i in range(len(scan_names))]),
                          (merge, report, [("out", field)])])
    workflow.connect([
        (report, publish, [("report_dir", "report_dir")]),
        (publish, outputnode, [(("out_files", _page), "out_report")]),
    ])
    return workflow


def _page(out_files):
    return [path for path in out_files if path.endswith(".html")][-1]


def connect_scan(workflow, report_wf, index: int, recon_wf, segmentation_wf=None, *, segmentation_fields=None) -> None:
    """Connect scan ``index``'s reconstruction (and segmentation) outputnodes to ``report_wf``.

    ``workflow`` contains both (e.g. the subject's workflow). ``segmentation_fields`` maps the
    report's segmentation fields (:data:`SEGMENTATION_FIELDS`) to the segmentation outputnode's
    names when they differ.
    """
    for field in RECON_FIELDS:
        workflow.connect(recon_wf, f"outputnode.{field}", report_wf, f"inputnode.{scan_input(field, index)}")
    if segmentation_wf is not None:
        names = {field: field for field in SEGMENTATION_FIELDS} | dict(segmentation_fields or {})
        for field in SEGMENTATION_FIELDS:
            workflow.connect(segmentation_wf, f"outputnode.{names[field]}", report_wf, f"inputnode.{scan_input(field, index)}")


def report_memory_gb(shape, echoes: int) -> float:
    """Memory of the rendering node: the magnitude (all echoes), about six more float32 copies
    of one volume, and matplotlib (about 0.3 GB)."""
    voxels = int(np.prod(shape[:3]))
    return round(0.3 + (echoes + 6) * voxels * 4 / 1024**3, 2)


def add_subject_reports(subject_wfs: dict, scans, scan_wfs: dict, config: dict, output_dir, *, segmentation_wfs=None,
                        segmentation_fields=None) -> dict:
    """Add a report workflow to every subject's workflow and connect all its scans.

    Parameters
    ----------
    subject_wfs : dict
        Participant label -> the subject's workflow (it contains the scans' workflows).
    scans : list of qsmflow.bids.Scan
    scan_wfs : dict
        ``id(scan)`` -> the scan's reconstruction workflow (:func:`init_scan_qsm_wf`).
    config : dict
        Validated configuration; its ``report`` section sets orientation, window and format.
        The report shows (and hashes) every section but ``execution``, which does not change
        results.
    segmentation_wfs : dict, optional
        ``id(scan)`` -> the workflow whose ``outputnode`` has the scan's ``dseg``, ``dseg_tsv``,
        ``roistats`` and ``template``; default: the scan's workflow itself when
        ``segmentation.enabled`` (:func:`init_scan_qsm_wf` nests the segmentation), else none.

    Returns
    -------
    dict: participant label -> report workflow.
    """
    import nibabel as nib

    settings = config.get("report", {})
    shown = {key: value for key, value in config.items() if key != "execution"}
    if segmentation_wfs is None:
        segmented = config.get("segmentation", {}).get("enabled", False)
        segmentation_wfs = {id(s): scan_wfs[id(s)] for s in scans} if segmented else {}
    reports = {}
    for subject, subject_wf in subject_wfs.items():
        members = sorted((s for s in scans if s.subject == subject), key=lambda s: f"{s.name}_{s.suffix}")
        with_segmentation = [id(s) in segmentation_wfs for s in members]
        if any(with_segmentation) and not all(with_segmentation):
            raise ValueError(f"sub-{subject}: segmentation runs for some scans only; the report needs it for all or none")
        memory = max(report_memory_gb(nib.load(s.magnitude_files[0]).shape, len(s.echo_times)) for s in members)
        report_wf = init_subject_report_wf(
            subject, [f"{s.name}_{s.suffix}" for s in members], output_dir, shown, segmentation=all(with_segmentation),
            orientation=settings.get("orientation", "radiological"), chi_window=settings.get("chi_window", 0.15),
            figure_format=settings.get("figure_format", "png"), mem_gb=memory,
        )
        for index, scan in enumerate(members):
            connect_scan(subject_wf, report_wf, index, scan_wfs[id(scan)], segmentation_wfs.get(id(scan)),
                         segmentation_fields=segmentation_fields)
        reports[subject] = report_wf
    return reports


def report_unfinished_subjects(scans, failures, config: dict, output_dir) -> list:
    """After a run in which some scans failed, write those subjects' pages from what finished.

    A subject's report joins all its scans, so one failed scan stops its page in the workflow,
    and a scan refused at the input check is not in the workflow at all. This writes
    ``sub-<label>.html`` from the derivatives of the subject's scans that did finish (read from
    OUTPUT_DIR) and lists the failed and refused ones with the failing step and reason. The
    subject's unit of work stays failed (its report node did not finish), so ``qsmflow status``
    does not call it done, and the next successful run rewrites the page in full.

    Parameters
    ----------
    scans : list of qsmflow.bids.Scan
        The scans the run was built from.
    failures : list of qsmflow.execution.Failure
        Everything that failed or was refused, by unit of work.
    config : dict
        Validated configuration (its ``report`` and ``segmentation`` sections).
    output_dir : path
        Root of the derivatives dataset.

    Returns
    -------
    list of Path: the pages written.
    """
    from pathlib import Path

    from qsmflow.bids import derivative_path
    from qsmflow.reports.subject import FailedScan, ScanReportFiles, write_subject_report

    from .segmentation import segmentation_outputs

    output_dir = Path(output_dir)
    scan_units = {f"{scan.name}_{scan.suffix}": scan for scan in scans}
    failed_by_subject: dict[str, dict] = {}
    for failure in failures:
        if failure.unit in scan_units or failure.node == "(input check)":
            subject = scan_units[failure.unit].subject if failure.unit in scan_units else failure.subject
            failed_by_subject.setdefault(subject, {}).setdefault(
                failure.unit, FailedScan(failure.unit, failure.node, failure.reason, failure.crash_file))
    settings = config.get("report", {})
    segmented = config.get("segmentation", {}).get("enabled", False)
    shown = {key: value for key, value in config.items() if key != "execution"}
    pages = []
    for subject, failed in sorted(failed_by_subject.items()):
        finished = []
        for name, scan in sorted(scan_units.items()):
            if scan.subject != subject or name in failed:
                continue
            entities = {k: v for k, v in scan.entities.items() if v is not None}
            files = {"chimap": derivative_path(output_dir, entities, "Chimap"),
                     "brain_mask": derivative_path(output_dir, {**entities, "desc": "brain"}, "mask"),
                     "qsm_mask": derivative_path(output_dir, {**entities, "desc": "qsm"}, "mask")}
            if segmented:
                written = segmentation_outputs(entities, "template")  # the template's name is not in these three
                files.update({role: output_dir / written[role] for role in ("dseg", "dseg_tsv", "roistats")})
            missing = [path for path in files.values() if not Path(path).is_file()]
            if missing:
                failed[name] = FailedScan(name, "(outputs)", f"{missing[0]} missing after the run")
                continue
            finished.append(ScanReportFiles(name=name, magnitude=scan.magnitude_files[0],
                                            **{role: str(path) for role, path in files.items()}))
        if not finished:
            continue  # nothing of the subject finished: the run's table of failures says it all
        pages.append(write_subject_report(
            output_dir, subject, finished, config=shown, failed=list(failed.values()),
            orientation=settings.get("orientation", "radiological"), chi_window=settings.get("chi_window", 0.15),
            figure_format=settings.get("figure_format", "png")))
    return pages
