"""Group-level workflow: gather ROI tables, fit each ROI's trajectories, combine, draw, publish."""
from __future__ import annotations

import re
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.interfaces.group import (CombineTrajectories, FitROI, GatherGroupTable, PlotGroupFigures,
                                      PlotROITrajectory, PublishGroupResults)
from qsmflow.workunits import declare_unit

#: Outputs (relative to OUTPUT_DIR) whose presence means the group results are complete.
GROUP_OUTPUTS = ("group/roistats.tsv", "group/trajectories.tsv", "group/trajectories.json", "group/zscores.tsv",
                 "group/index.html")


def analysis_settings(group: dict, covariates) -> dict:
    """What each ROI's fit depends on (its node's inputs: changing any of these refits)."""
    return {
        "covariates": list(covariates), "random_intercept": bool(group["random_intercept"]),
        "heteroscedastic": bool(group["heteroscedastic"]), "normative_model": group["normative_model"],
        "grid_points": int(group["grid_points"]), "level": float(group["level"]), "bootstrap": int(group["bootstrap"]),
        "test_bootstrap": int(group["test_bootstrap"]), "test_bootstrap_structured": int(group["test_bootstrap_structured"]),
        "seed": int(group["seed"]), "held_out": bool(group["held_out_zscores"]),
    }


def gather_settings(group: dict) -> dict:
    return {"value": group["value"], "age_column": group["age_column"], "covariates": list(group["covariates"]),
            "combine_hemispheres": bool(group["combine_hemispheres"]), "age_tolerance": float(group["age_tolerance"]),
            "roi_kinds": dict(group["roi_kinds"])}


def init_group_wf(bids_dir, output_dir, roistats_files, rois: dict, group: dict, *, config: dict | None = None,
                  name: str = "group_wf"):
    """Trajectories, centiles and figures of every ROI of a cohort.

    Parameters
    ----------
    bids_dir : path
        Raw dataset (participants.tsv, sub-X/sub-X_sessions.tsv).
    output_dir : path
        Derivatives dataset holding the scans' ``_roistats.tsv``; results go to ``group/``.
    roistats_files : list of paths
        The scans' ROI tables.
    rois : dict
        ROI -> kind (``deep_grey``, ``white_matter``, ``other``), as gathered at build time.
    group : dict
        The ``group`` section of the configuration.
    config : dict, optional
        Whole configuration, shown in the report.

    Returns
    -------
    nipype Workflow with units of work declared: ``group-<ROI>`` (kind ``fit``: the ROI's fit and
    figure nodes; done when ``group/figures/roi-<ROI>_trajectory.png`` is published) and ``group``
    (gathering, combining, publishing), done when :data:`GROUP_OUTPUTS` exist.

    Nodes: ``gather`` -> ``fit_<ROI>`` -> ``plot_<ROI>``; ``merge_analyses`` -> ``combine`` ->
    ``plot_group`` -> ``publish``. Each node's inputs are exactly what it depends on, so the cache
    reruns a fit when the ROI table or the analysis settings change (a new subject) and only the
    figure nodes when a figure option changes.
    """
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    workflow = pe.Workflow(name=name)
    demographics = [bids_dir / "participants.tsv"] if (bids_dir / "participants.tsv").is_file() else []
    demographics += sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv"))
    gather = pe.Node(GatherGroupTable(
        roistats_files=[str(p) for p in roistats_files], bids_dir=str(bids_dir), demographics=[str(p) for p in demographics],
        settings=gather_settings(group)), name="gather")

    settings = analysis_settings(group, group["covariates"])
    figure_options = {"dpi": int(group["figures"]["dpi"]), "format": group["figures"]["format"],
                      "band": bool(group["figures"]["band"]), "centiles": bool(group["figures"]["centiles"]),
                      "point_size": float(group["figures"]["point_size"])}
    merge_analyses = pe.Node(niu.Merge(len(rois)), name="merge_analyses")
    merge_figures = pe.Node(niu.Merge(len(rois)), name="merge_figures")
    for index, (roi, kind) in enumerate(sorted(rois.items()), start=1):
        models = list(group["models"].get(kind, group["models"]["other"]))
        safe = re.sub(r"[^A-Za-z0-9]", "_", roi)
        fit = pe.Node(FitROI(roi=roi, kind=kind, models=models, settings=settings), name=f"fit_{safe}", mem_gb=0.5)
        plot = pe.Node(PlotROITrajectory(options=figure_options), name=f"plot_{safe}", mem_gb=0.3)
        for node in (fit, plot):  # done when its figure is published (the publisher writes it)
            declare_unit(node, kind="fit", name=f"group-{roi}",
                         outputs=[f"group/figures/roi-{roi}_trajectory.{figure_options['format']}"])
        workflow.connect([
            (gather, fit, [("table", "table")]),
            (gather, plot, [("table", "table")]),
            (fit, plot, [("analysis", "analysis")]),
            (fit, merge_analyses, [("analysis", f"in{index}")]),
            (plot, merge_figures, [("figure", f"in{index}")]),
        ])
    combine = pe.Node(CombineTrajectories(settings={**settings, **gather_settings(group),
                                                    "models": {k: list(v) for k, v in group["models"].items()}}),
                      name="combine")
    plot_group = pe.Node(PlotGroupFigures(options=figure_options), name="plot_group")
    publish = pe.Node(PublishGroupResults(output_dir=str(output_dir), settings={
        "value": group["value"], "variance": "ML; subject random intercept when a subject has several scans"
        if group["random_intercept"] else "ML; independent scans",
        "bootstrap replicates (bands)": group["bootstrap"], "seed": group["seed"]}), name="publish")
    if config is not None:
        publish.inputs.config = config
    publish.overwrite = True  # cheap; restores outputs deleted since the last run
    for node in (gather, merge_analyses, merge_figures, combine, plot_group, publish):
        declare_unit(node, kind="group", name="group", outputs=list(GROUP_OUTPUTS))
    workflow.connect([
        (merge_analyses, combine, [("out", "analyses")]),
        (gather, combine, [("table", "table"), ("notes", "notes")]),
        (merge_analyses, plot_group, [("out", "analyses")]),
        (gather, plot_group, [("table", "table")]),
        (combine, plot_group, [("zscores", "zscores")]),
        (gather, publish, [("table", "table")]),
        (combine, publish, [("trajectories", "trajectories"), ("trajectories_sidecar", "trajectories_sidecar"),
                            ("zscores", "zscores"), ("cohort", "cohort")]),
        (merge_figures, publish, [("out", "roi_figures")]),
        (plot_group, publish, [("grid", "grid"), ("qq", "qq")]),
    ])
    return workflow


def group_level(bids_dir, output_dir, config: dict, participant_labels=()):
    """The ``group`` level (:data:`qsmflow.levels.LEVELS`): check inputs, build :func:`init_group_wf`.

    A scan whose ROI table cannot be read is refused (a problem naming the file) and left out;
    everything else about the cohort (no age, missing ROIs, too few scans) is recorded in the
    results. ``participant_labels`` restricts the cohort to those subjects.
    """
    from qsmflow.group import GroupInputError, find_roistats, gather_group_table, read_roistats, scan_entities
    from qsmflow.levels import LevelPlan, Problem

    group = config["group"]
    files, problems = [], []
    labels = {str(label).removeprefix("sub-") for label in participant_labels or ()}
    for path in find_roistats(output_dir):
        try:
            entities = scan_entities(path)
            if labels and entities["sub"] not in labels:
                continue
            read_roistats(path)
        except GroupInputError as error:
            problems.append(Problem(unit=Path(path).name.removesuffix("_roistats.tsv"),
                                    subject=Path(path).name.split("_")[0].removeprefix("sub-"), reason=str(error)))
            continue
        files.append(path)
    if not files:
        problems.append(Problem(unit="group", subject=None, reason=(
            f"{output_dir}: no readable _roistats.tsv; run the participant level (with segmentation) first")))
        return LevelPlan(workflow=None, problems=problems, noun="fit")
    try:
        rows, _ = gather_group_table(files, bids_dir, **{k: v for k, v in gather_settings(group).items()
                                                        if k != "covariates"}, covariates=tuple(group["covariates"]))
    except GroupInputError as error:
        return LevelPlan(workflow=None, problems=problems + [Problem(unit="group", subject=None, reason=str(error))],
                         noun="fit")
    rois = {row["roi"]: row["kind"] for row in rows}
    workflow = init_group_wf(bids_dir, output_dir, files, rois, group, config=config)
    return LevelPlan(workflow=workflow, problems=problems, noun="fit")
