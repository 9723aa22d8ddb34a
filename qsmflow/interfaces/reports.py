"""nipype interfaces of the reports: render a subject's report, then publish it to OUTPUT_DIR."""
from __future__ import annotations

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

from ..bids import write_if_changed

_OPTIONAL = "path per scan, or an empty string for a scan without it; undefined when no scan has it"


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="participant label, without 'sub-'")
    scan_names = traits.List(traits.Str, mandatory=True, desc="BIDS prefix and suffix of each scan, e.g. sub-01_ses-1_MEGRE")
    magnitude = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude per scan (3-D or 4-D, echoes last)")
    brain_mask = InputMultiObject(File(exists=True), mandatory=True, desc="brain mask per scan")
    qsm_mask = InputMultiObject(File(exists=True), mandatory=True, desc="QSM mask per scan")
    chimap = InputMultiObject(File(exists=True), mandatory=True, desc="Chimap derivative per scan (its JSON sidecar next to it)")
    sidecar = traits.List(traits.Str, desc="Chimap JSON sidecar per scan; " + _OPTIONAL + " (then: next to the Chimap)")
    # Paths given as strings are still hashed by content by nipype when the file exists.
    dseg = traits.List(traits.Str, desc="label image in subject space: " + _OPTIONAL)
    dseg_tsv = traits.List(traits.Str, desc="label table (index, name, hemisphere): " + _OPTIONAL)
    roistats = traits.List(traits.Str, desc="ROI statistics table: " + _OPTIONAL)
    template = traits.List(traits.Str, desc="template warped into the scan's grid: " + _OPTIONAL)
    config = traits.Dict(desc="configuration used, printed in the report's footer")
    orientation = traits.Enum("radiological", "neurological", usedefault=True)
    chi_window = traits.Float(0.15, usedefault=True, desc="half-width of the Chimap display window (ppm)")
    figure_format = traits.Enum("png", "svg", usedefault=True)


class _SubjectReportOutputSpec(TraitedSpec):
    report_dir = Directory(exists=True, desc="folder laid out as OUTPUT_DIR: sub-<label>.html and sub-<label>/figures/")
    out_report = File(exists=True, desc="the page, inside report_dir")


class SubjectReport(SimpleInterface):
    """Render a subject's HTML report (:func:`qsmflow.reports.subject.write_subject_report`)
    into the node's folder; :class:`PublishReport` copies it into OUTPUT_DIR."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _optional(self, name: str, count: int) -> list:
        values = getattr(self.inputs, name)
        if not isdefined(values) or not values:
            return [None] * count
        if len(values) != count:
            raise ValueError(f"sub-{self.inputs.subject}: {len(values)} {name} inputs for {count} scans")
        return [value or None for value in values]

    def _run_interface(self, runtime):
        from ..reports.subject import ScanReportFiles, write_subject_report

        names = list(self.inputs.scan_names)
        required = {field: list(getattr(self.inputs, field)) for field in ("magnitude", "brain_mask", "qsm_mask", "chimap")}
        for field, values in required.items():
            if len(values) != len(names):
                raise ValueError(f"sub-{self.inputs.subject}: {len(values)} {field} inputs for {len(names)} scans")
        optional = {field: self._optional(field, len(names)) for field in ("sidecar", "dseg", "dseg_tsv", "roistats", "template")}
        scans = [
            ScanReportFiles(name=name, **{field: values[i] for field, values in {**required, **optional}.items()})
            for i, name in enumerate(names)
        ]
        report_dir = Path(runtime.cwd) / "report"
        page = write_subject_report(
            report_dir, self.inputs.subject, scans,
            config=self.inputs.config if isdefined(self.inputs.config) else None,
            orientation=self.inputs.orientation, chi_window=self.inputs.chi_window, figure_format=self.inputs.figure_format,
        )
        self._results["report_dir"] = str(report_dir)
        self._results["out_report"] = str(page)
        return runtime


class _PublishReportInputSpec(BaseInterfaceInputSpec):
    report_dir = Directory(exists=True, mandatory=True, desc="rendered report, laid out as OUTPUT_DIR")
    output_dir = Directory(mandatory=True, desc="root of the derivatives dataset")


class _PublishReportOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="files written or already up to date, the pages last")


class PublishReport(SimpleInterface):
    """Copy a rendered report into OUTPUT_DIR, atomically, figures first and pages last.

    Files whose content is unchanged are not rewritten. Meant to run every time (node
    ``overwrite=True``): it is cheap, and restores a report deleted since the last run.
    """

    input_spec = _PublishReportInputSpec
    output_spec = _PublishReportOutputSpec

    def _run_interface(self, runtime):
        source = Path(self.inputs.report_dir)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        # pages reference the figures: a page under its final name has all its figures
        files.sort(key=lambda p: p.suffix == ".html")
        written = []
        for path in files:
            target = Path(self.inputs.output_dir) / path.relative_to(source)
            write_if_changed(target, path.read_bytes())
            written.append(str(target))
        self._results["out_files"] = written
        return runtime
