"""Nipype interfaces of the group level: gather tables, fit one ROI, combine, draw, publish.

Each interface loads its files, calls one function of :mod:`qsmflow.group`,
:mod:`qsmflow.stats.trajectories` or :mod:`qsmflow.reports.group`, and writes its outputs in
the node's folder (the publisher writes into ``OUTPUT_DIR/group``).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _json_load(path) -> dict:
    return json.loads(Path(path).read_text())


def _json_dump(path, content) -> str:
    Path(path).write_text(json.dumps(content, indent=1, allow_nan=False, default=str) + "\n")
    return str(Path(path).absolute())


# ---------------------------------------------------------------------------------------------


class _GatherInputSpec(BaseInterfaceInputSpec):
    roistats_files = InputMultiObject(File(exists=True), mandatory=True, desc="every scan's _roistats.tsv")
    bids_dir = Directory(exists=True, mandatory=True, desc="raw dataset (participants.tsv, sessions.tsv)")
    demographics = traits.List(File(exists=True), desc="participants.tsv and sessions.tsv files (for the cache hash)")
    settings = traits.Dict(mandatory=True, desc="value, age_column, covariates, combine_hemispheres, age_tolerance, roi_kinds")


class _GatherOutputSpec(TraitedSpec):
    table = File(exists=True, desc="roistats.tsv: one row per scan and ROI with age and covariates")
    notes = File(exists=True, desc="cohort.json: subjects without age, age disagreements, missing ROIs ...")


class GatherGroupTable(SimpleInterface):
    """Join the scans' ROI tables with participants.tsv / sessions.tsv (:func:`qsmflow.group.gather_group_table`)."""

    input_spec = _GatherInputSpec
    output_spec = _GatherOutputSpec

    def _run_interface(self, runtime):
        from ..group import gather_group_table, write_rows

        s = self.inputs.settings
        rows, notes = gather_group_table(
            self.inputs.roistats_files, self.inputs.bids_dir, value=s["value"], age_column=s["age_column"],
            covariates=tuple(s["covariates"]), combine_hemispheres=s["combine_hemispheres"],
            age_tolerance=s["age_tolerance"], roi_kinds=dict(s["roi_kinds"]))
        self._results["table"] = str(write_rows(Path(runtime.cwd, "roistats.tsv"), rows).absolute())
        self._results["notes"] = _json_dump(Path(runtime.cwd, "cohort.json"), notes)
        return runtime


class _FitInputSpec(BaseInterfaceInputSpec):
    table = File(exists=True, mandatory=True, desc="group roistats.tsv")
    roi = traits.Str(mandatory=True)
    kind = traits.Str(mandatory=True)
    models = traits.List(traits.Str, mandatory=True, desc="candidate models, the primary first")
    settings = traits.Dict(mandatory=True, desc="covariates and the analysis settings of analyse_roi")


class _FitOutputSpec(TraitedSpec):
    analysis = File(exists=True, desc="JSON: every model's fit, test, bands; the normative model")


class FitROI(SimpleInterface):
    """Analyse one ROI (:func:`qsmflow.stats.trajectories.analyse_roi`)."""

    input_spec = _FitInputSpec
    output_spec = _FitOutputSpec

    def _run_interface(self, runtime):
        from ..group import read_group_table
        from ..stats.trajectories import analyse_roi

        s = self.inputs.settings
        roi = self.inputs.roi
        rows = [r for r in read_group_table(self.inputs.table) if r["roi"] == roi and r["included"]]
        result = {"roi": roi, "kind": self.inputs.kind, "models": list(self.inputs.models)}
        covariates = [c for c in s["covariates"] if rows and c in rows[0]]
        if len(rows) < 4:
            result["skipped"] = f"{len(rows)} usable scans"
        else:
            result["analysis"] = analyse_roi(
                [r["value"] for r in rows], [r["age"] for r in rows], [r["participant_id"] for r in rows],
                covariates={c: [r[c] for r in rows] for c in covariates} or None, models=tuple(self.inputs.models),
                random_intercept=s["random_intercept"], heteroscedastic=s["heteroscedastic"],
                normative_model=s["normative_model"], grid_points=s["grid_points"], level=s["level"],
                n_bands=s["bootstrap"], n_test=s["test_bootstrap"], n_test_structured=s["test_bootstrap_structured"],
                seed=int(s["seed"]) + zlib.crc32(roi.encode()) % 100000, held_out=s["held_out"])
        self._results["analysis"] = _json_dump(Path(runtime.cwd, f"analysis_{roi}.json"), result)
        return runtime


class _CombineInputSpec(BaseInterfaceInputSpec):
    analyses = InputMultiObject(File(exists=True), mandatory=True)
    table = File(exists=True, mandatory=True)
    notes = File(exists=True, mandatory=True)
    settings = traits.Dict(mandatory=True, desc="settings recorded in the sidecar")


class _CombineOutputSpec(TraitedSpec):
    trajectories = File(exists=True)
    trajectories_sidecar = File(exists=True)
    zscores = File(exists=True)
    cohort = File(exists=True)


class CombineTrajectories(SimpleInterface):
    """trajectories.tsv (+ JSON sidecar, BH across ROIs) and zscores.tsv from the ROI analyses."""

    input_spec = _CombineInputSpec
    output_spec = _CombineOutputSpec

    def _run_interface(self, runtime):
        from ..group import (TRAJECTORY_COLUMNS, read_group_table, trajectory_columns, trajectory_rows, write_rows,
                             zscore_rows)
        from ..stats.models import MODELS

        analyses = {}
        for path in self.inputs.analyses:
            entry = _json_load(path)
            analyses[entry["roi"]] = entry
        table = read_group_table(self.inputs.table)
        rows = trajectory_rows(analyses)
        path = write_rows(Path(runtime.cwd, "trajectories.tsv"), rows, columns=trajectory_columns(rows))
        header = path.read_text().splitlines()[0].split("\t")
        columns = {}
        for column in header:
            pattern = next((k for k in (column, "*_" + column.rsplit("_", 1)[-1], "*_ci_" + column.rsplit("_", 1)[-1])
                            if k in TRAJECTORY_COLUMNS), None)
            if column.startswith("effect_") and "_ci_" not in column:
                pattern = "effect_*"
            if pattern:
                columns[column] = TRAJECTORY_COLUMNS[pattern]
        notes = _json_load(self.inputs.notes)
        notes["skipped_fits"] = [{"roi": r["roi"], "model": r["model"], "reason": r["reason"]}
                                 for r in rows if r["status"] != "fitted"]
        notes["fits_at_bound"] = [{"roi": r["roi"], "model": r["model"], "at_bound": r["at_bound"]}
                                  for r in rows if r.get("at_bound")]
        sidecar = {**columns, "Models": {name: model.formula for name, model in MODELS.items()},
                   "Settings": dict(self.inputs.settings),
                   "Cohort": {k: notes[k] for k in ("subjects", "scans", "covariates", "subjects_without_age",
                                                    "age_disagreements", "missing_covariates", "covariates_absent",
                                                    "roi_missing", "roi_empty", "skipped_fits", "fits_at_bound")}}
        self._results["trajectories"] = str(path.absolute())
        self._results["trajectories_sidecar"] = _json_dump(Path(runtime.cwd, "trajectories.json"), sidecar)
        columns_z = ["participant_id", "session_id", "scan", "roi", "age", "value", "model", "z", "centile",
                     "z_heldout", "centile_heldout"]
        self._results["zscores"] = str(write_rows(Path(runtime.cwd, "zscores.tsv"), zscore_rows(analyses, table),
                                                  columns=columns_z).absolute())
        self._results["cohort"] = _json_dump(Path(runtime.cwd, "cohort.json"), notes)
        return runtime


def _scans(table_path, roi: str) -> list[dict]:
    from ..group import read_group_table

    return [r for r in read_group_table(table_path) if r["roi"] == roi and r["included"]]


class _PlotROIInputSpec(BaseInterfaceInputSpec):
    analysis = File(exists=True, mandatory=True)
    table = File(exists=True, mandatory=True)
    options = traits.Dict(mandatory=True, desc="figure options: dpi, band, centiles, point_size, format")


class _PlotOutputSpec(TraitedSpec):
    figure = File(exists=True)


class PlotROITrajectory(SimpleInterface):
    """One ROI's trajectory figure (:func:`qsmflow.reports.group.plot_roi_trajectory`)."""

    input_spec = _PlotROIInputSpec
    output_spec = _PlotOutputSpec

    def _run_interface(self, runtime):
        from ..reports.group import plot_roi_trajectory

        entry = _json_load(self.inputs.analysis)
        o = self.inputs.options
        out = Path(runtime.cwd, f"roi-{entry['roi']}_trajectory.{o['format']}")
        plot_roi_trajectory(out, entry["roi"], entry.get("analysis") or {}, _scans(self.inputs.table, entry["roi"]),
                            dpi=o["dpi"], show_band=o["band"], show_centiles=o["centiles"], point_size=o["point_size"])
        self._results["figure"] = str(out.absolute())
        return runtime


class _PlotGroupInputSpec(BaseInterfaceInputSpec):
    analyses = InputMultiObject(File(exists=True), mandatory=True)
    table = File(exists=True, mandatory=True)
    zscores = File(exists=True, mandatory=True)
    options = traits.Dict(mandatory=True)


class _PlotGroupOutputSpec(TraitedSpec):
    grid = File(exists=True)
    qq = File(exists=True)


class PlotGroupFigures(SimpleInterface):
    """The grid of all ROIs and the held-out z-score QQ plot."""

    input_spec = _PlotGroupInputSpec
    output_spec = _PlotGroupOutputSpec

    def _run_interface(self, runtime):
        from ..group import read_tsv
        from ..reports.group import plot_roi_grid, plot_zscore_qq

        o = self.inputs.options
        entries = sorted((_json_load(p) for p in self.inputs.analyses), key=lambda e: (e["kind"], e["roi"]))
        items = [(e["roi"], e.get("analysis") or {}, _scans(self.inputs.table, e["roi"])) for e in entries]
        grid = Path(runtime.cwd, f"trajectories_grid.{o['format']}")
        plot_roi_grid(grid, items, dpi=o["dpi"], show_band=o["band"], show_centiles=o["centiles"],
                      point_size=max(4.0, o["point_size"] / 2))
        zscores = {}
        for row in read_tsv(self.inputs.zscores):
            if row["z_heldout"] not in ("n/a", ""):
                zscores.setdefault(row["roi"], []).append(float(row["z_heldout"]))
        qq = Path(runtime.cwd, f"zscores_qq.{o['format']}")
        plot_zscore_qq(qq, zscores, dpi=o["dpi"])
        self._results["grid"], self._results["qq"] = str(grid.absolute()), str(qq.absolute())
        return runtime


class _PublishInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="derivatives dataset; results go to its group/ folder")
    table = File(exists=True, mandatory=True)
    trajectories = File(exists=True, mandatory=True)
    trajectories_sidecar = File(exists=True, mandatory=True)
    zscores = File(exists=True, mandatory=True)
    cohort = File(exists=True, mandatory=True)
    roi_figures = InputMultiObject(File(exists=True), mandatory=True)
    grid = File(exists=True, mandatory=True)
    qq = File(exists=True, mandatory=True)
    settings = traits.Dict(mandatory=True)
    config = traits.Dict(desc="configuration shown in the report footer")


class _PublishOutputSpec(TraitedSpec):
    report = File(exists=True)
    out_files = OutputMultiObject(File(exists=True))


class PublishGroupResults(SimpleInterface):
    """Copy tables and figures into ``OUTPUT_DIR/group`` and write ``group/index.html`` last.

    Files are written atomically and only when their content changed; run it every time
    (``node.overwrite = True``) so deleted outputs come back.
    """

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec

    def _run_interface(self, runtime):
        from .. import __version__
        from ..bids import write_if_changed
        from ..group import read_tsv
        from ..reports.group import write_group_report

        group = Path(self.inputs.output_dir) / "group"
        (group / "figures").mkdir(parents=True, exist_ok=True)
        targets = {"table": group / "roistats.tsv", "trajectories": group / "trajectories.tsv",
                   "trajectories_sidecar": group / "trajectories.json", "zscores": group / "zscores.tsv",
                   "cohort": group / "cohort.json", "grid": group / "figures" / Path(self.inputs.grid).name,
                   "qq": group / "figures" / Path(self.inputs.qq).name}
        written = []
        for field, target in targets.items():
            write_if_changed(target, Path(getattr(self.inputs, field)).read_bytes())
            written.append(str(target))
        roi_figures = {}
        for figure in self.inputs.roi_figures:
            target = group / "figures" / Path(figure).name
            write_if_changed(target, Path(figure).read_bytes())
            roi_figures[Path(figure).name.split("_")[0][4:]] = target
            written.append(str(target))
        trajectories = read_tsv(targets["trajectories"])
        for row in trajectories:
            for key, value in list(row.items()):
                if value in ("n/a", ""):
                    row[key] = None
                elif key not in ("roi", "model", "kind", "status", "reason", "at_bound", "warnings", "p_method",
                                 "nonlinear", "formula", "variance", "extremum_kind") and not key.endswith("_open"):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        pass
                if key.startswith("preferred"):
                    row[key] = value == "True"
        report = write_group_report(
            group / "index.html", trajectories=trajectories, notes=_json_load(targets["cohort"]), roi_figures=roi_figures,
            grid_figure=targets["grid"], qq_figure=targets["qq"],
            tables={"ROI values with age and covariates": targets["table"], "trajectories": targets["trajectories"],
                    "column descriptions and settings": targets["trajectories_sidecar"], "z-scores": targets["zscores"],
                    "cohort record": targets["cohort"]},
            settings=dict(self.inputs.settings), version=__version__,
            config=dict(self.inputs.config) if isdefined(self.inputs.config) else None)
        self._results["report"] = str(report)
        self._results["out_files"] = written + [str(report)]
        return runtime


__all__ = ["GatherGroupTable", "FitROI", "CombineTrajectories", "PlotROITrajectory", "PlotGroupFigures",
           "PublishGroupResults"]
