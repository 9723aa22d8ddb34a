"""The participant report: one HTML page per subject with a section per scan, like fMRIPrep's.

Layout (as fMRIPrep lays out its reports)::

    OUTPUT_DIR/sub-<label>.html
    OUTPUT_DIR/sub-<label>/figures/<scan>_desc-masks_<suffix>.png       brain and QSM masks on the magnitude
    OUTPUT_DIR/sub-<label>/figures/<scan>_Chimap.png                    Chimap, fixed ppm window
    OUTPUT_DIR/sub-<label>/figures/<scan>_desc-registration_<suffix>.png  template outline over the subject
    OUTPUT_DIR/sub-<label>/figures/<scan>_dseg.png                      labels over the Chimap

The figures come from :mod:`qsmflow.reports.figures`, the page from :mod:`qsmflow.reports.html`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import figures
from .html import ReportPage, read_tsv

#: Colours of the mask outlines on the magnitude.
BRAIN_MASK_COLOUR = "#ff3b30"
QSM_MASK_COLOUR = "#30d158"
#: Sidecar keys of the reconstruction stages, in pipeline order, with the name the page shows.
_STAGES = (
    ("Masking", "Brain mask"),
    ("PhaseUnwrapping", "Phase unwrapping"),
    ("EchoCombination", "Echo combination"),
    ("BackgroundFieldRemoval", "Background field removal"),
    ("DipoleInversion", "Dipole inversion"),
)
#: Decimals of the ROI table's columns (others: 4, i.e. 0.1 ppb for ppm values).
_ROI_DECIMALS = {"volume_mm3": 1, "volume": 1}


@dataclass
class FailedScan:
    """A scan of the subject that did not finish: its name, the step that failed and why."""

    name: str
    step: str
    reason: str
    crash_file: str = "-"


@dataclass
class ScanReportFiles:
    """The files one scan contributes to its subject's report.

    Attributes
    ----------
    name : str
        The scan's BIDS prefix and suffix, e.g. ``sub-01_ses-1_run-1_MEGRE``.
    magnitude, brain_mask, qsm_mask, chimap : path
        Magnitude (3-D, or 4-D with echoes last: the first echo is shown), masks and the
        Chimap (ppm), all on the scan's grid.
    sidecar : path, optional
        The Chimap's JSON sidecar; default: the ``.json`` next to ``chimap``.
    dseg, dseg_tsv, roistats : path, optional
        Labels in subject space, their table (``index``, ``name`` [, ``hemisphere``]) and the
        ROI statistics table; absent when segmentation did not run.
    template : path, optional
        The registration template resampled into the scan's grid.
    """

    name: str
    magnitude: str
    brain_mask: str
    qsm_mask: str
    chimap: str
    sidecar: str | None = None
    dseg: str | None = None
    dseg_tsv: str | None = None
    roistats: str | None = None
    template: str | None = None

    @property
    def prefix_and_suffix(self) -> tuple[str, str]:
        prefix, _, suffix = self.name.rpartition("_")
        return (prefix, suffix) if prefix else (self.name, "scan")


def _load(path, role: str, scan: str, *, shape=None):
    from ..interfaces.base import load_volume

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: the {role} of scan {scan} does not exist")
    try:
        data, image = load_volume(path)
    except ValueError as error:
        raise ValueError(f"{error} (the {role} of scan {scan})") from None
    except Exception as error:  # nibabel raises several types for unreadable headers
        raise ValueError(f"{path}: cannot read the {role} of scan {scan} ({type(error).__name__}: {error})") from None
    if shape is not None and data.shape[:3] != tuple(shape):
        raise ValueError(f"{path}: the {role} of scan {scan} has shape {data.shape[:3]}, the Chimap {tuple(shape)}")
    return data, image.affine


def label_names_from_tsv(path, *, with_hemisphere: bool = True) -> dict:
    """Label value -> display name from a BIDS ``_dseg.tsv`` (``index``, ``name`` and an
    optional ``hemisphere`` column, appended to the name when the name does not say it and
    ``with_hemisphere``)."""
    header, rows = read_tsv(path)
    if "index" not in header or "name" not in header:
        raise ValueError(f"{path}: a dseg table needs 'index' and 'name' columns, found {header}")
    names = {}
    for row in rows:
        cells = dict(zip(header, row))
        try:
            index = int(float(cells["index"]))
        except ValueError:
            raise ValueError(f"{path}: index {cells['index']!r} is not an integer") from None
        name = cells["name"]
        hemisphere = cells.get("hemisphere", "n/a")
        if with_hemisphere and hemisphere not in {"", "n/a", "bilateral"} and hemisphere.lower() not in name.lower():
            name = f"{name} ({hemisphere})"
        names[index] = name
    return names


def _stage_text(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    function = str(entry.get("Function", "n/a")).rsplit(".", 1)[-1]
    description = entry.get("Description")
    return f"{function}: {description}" if description else function


def _reference_text(entry) -> str:
    if isinstance(entry, dict):
        for key in ("Reference", "Description", "Method", "Function"):
            if entry.get(key):
                return str(entry[key])
        return json.dumps(entry, sort_keys=True)
    return "n/a" if entry is None else str(entry)


def scan_facts(sidecar: dict) -> list[tuple[str, str]]:
    """The key facts of a scan, from its Chimap sidecar, as (name, text) pairs."""
    facts = []
    strength = sidecar.get("MagneticFieldStrength")
    facts.append(("Field strength", f"{strength:g} T" if isinstance(strength, (int, float)) else "n/a"))
    echo_times = sidecar.get("EchoTime")
    if isinstance(echo_times, (int, float)):
        echo_times = [echo_times]
    if echo_times:
        facts.append(("Echo times", f"{', '.join(f'{1000 * float(t):g}' for t in echo_times)} ms ({len(echo_times)} echoes)"))
    phase = sidecar.get("PhaseInput") or {}
    units = str(phase.get("PhaseUnits", "n/a"))
    if "PhaseUnitsDetected" in phase:
        units += " (detected)" if phase["PhaseUnitsDetected"] else " (as configured)"
    rescaling = phase.get("PhaseRescaling")
    if rescaling and not str(rescaling).startswith("none"):
        units += f"; {rescaling}"
    if phase.get("PhaseSign") == -1:
        units += "; phase sign inverted"
    facts.append(("Phase units", units))
    for key, label in _STAGES:
        if key in sidecar:
            facts.append((label, _stage_text(sidecar[key])))
    facts.append(("Susceptibility reference", _reference_text(sidecar.get("SusceptibilityReference"))))
    return facts


def method_details(sidecar: dict) -> list[tuple[str, str]]:
    """Each reconstruction stage's function and effective parameters, then the papers cited."""
    details, references = [], []
    for key, label in _STAGES + (("PhaseInput", "Phase input"),):
        entry = sidecar.get(key)
        if not isinstance(entry, dict) or "Function" not in entry:
            continue
        parameters = entry.get("Parameters") or {}
        listed = ", ".join(f"{name}={json.dumps(value)}" for name, value in parameters.items())
        details.append((label, f"{entry['Function']}({listed})"))
        references += [r for r in entry.get("References") or [] if r not in references]
    details += [(f"[{number}]", reference) for number, reference in enumerate(references, start=1)]
    return details


def _read_sidecar(path: Path, scan: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: the Chimap sidecar of scan {scan} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: the Chimap sidecar of scan {scan} is not valid JSON ({error})") from None


def _scan_section(page: ReportPage, scan: ScanReportFiles, figure_dir: Path, *, orientation: str, chi_window: float,
                  figure_format: str) -> None:
    section = page.section(scan.name)
    prefix, suffix = scan.prefix_and_suffix
    chi, affine = _load(scan.chimap, "Chimap", scan.name)
    shape = chi.shape[:3]
    magnitude = _load(scan.magnitude, "magnitude", scan.name, shape=shape)[0]
    brain = _load(scan.brain_mask, "brain mask", scan.name, shape=shape)[0] > 0
    qsm = _load(scan.qsm_mask, "QSM mask", scan.name, shape=shape)[0] > 0
    sidecar = _read_sidecar(Path(scan.sidecar) if scan.sidecar else Path(str(scan.chimap).replace(".nii.gz", ".json").replace(".nii", ".json")), scan.name)
    facts = scan_facts(sidecar)
    roi_references = []
    if scan.roistats:
        header, rows = read_tsv(scan.roistats)
        if "reference" in header:
            roi_references = sorted({row[header.index("reference")] for row in rows})
            facts.append(("ROI reference (roistats)", ", ".join(roi_references) or "n/a"))
    section.facts(facts)
    details = method_details(sidecar)
    if details:
        section.facts(details, collapsed="Methods: functions, parameters and references (from the Chimap sidecar)")
    if not brain.any():
        raise ValueError(f"{scan.brain_mask}: the brain mask of scan {scan.name} is empty")

    masks_figure = figure_dir / f"{prefix}_desc-masks_{suffix}.{figure_format}"
    figures.plot_mask_contours(masks_figure, magnitude, affine, [("brain mask", brain, BRAIN_MASK_COLOUR), ("QSM mask", qsm, QSM_MASK_COLOUR)],
                               orientation=orientation)
    section.figure(masks_figure, f"Brain mask (red) and QSM mask (green, dashed: where the local field and χ are valid) on the "
                                 f"first-echo magnitude; where they coincide the line alternates red and green. QSM mask: "
                                 f"{int(qsm.sum())} voxels, {100 * qsm.sum() / brain.sum():.0f} % of the brain mask.")

    chi_figure = figure_dir / f"{prefix}_Chimap.{figure_format}"
    figures.plot_chimap(chi_figure, chi, affine, mask=qsm if qsm.any() else brain, window=chi_window, orientation=orientation)
    section.figure(chi_figure, f"Susceptibility map (Chimap), fixed window ±{chi_window:g} ppm (values beyond are clipped); "
                               "paramagnetic (iron) bright, diamagnetic (myelin, calcium) dark.")

    if scan.template:
        template = _load(scan.template, "registered template", scan.name, shape=shape)[0]
        registration_figure = figure_dir / f"{prefix}_desc-registration_{suffix}.{figure_format}"
        figures.plot_registration(registration_figure, magnitude, template, affine, mask=brain, orientation=orientation)
        section.figure(registration_figure, "Registration check: iso-intensity outlines of the template, warped into this scan's grid, "
                                            "over the first-echo magnitude. They should follow the brain's edge, the ventricles and "
                                            "the deep grey nuclei.")
    else:
        section.note("Registration check: no template registered to this scan (segmentation disabled, or not run).")

    if scan.dseg:
        labels = np.rint(_load(scan.dseg, "label image (dseg)", scan.name, shape=shape)[0]).astype(np.int32)
        # one colour per structure, both sides alike: the side is plain in the image
        names = label_names_from_tsv(scan.dseg_tsv, with_hemisphere=False) if scan.dseg_tsv else {}
        if labels.any():
            labels_figure = figure_dir / f"{prefix}_dseg.{figure_format}"
            figures.plot_labels(labels_figure, chi, labels, affine, names, mask=brain, window=chi_window, orientation=orientation)
            section.figure(labels_figure, f"ROI labels (dseg) over the Chimap (±{chi_window:g} ppm), one colour per structure "
                                          "(left and right alike); slices centred on the labels.")
        else:
            section.note(f"The label image {Path(scan.dseg).name} holds no label.")
    else:
        section.note("Segmentation was not run for this scan (segmentation disabled): no labels and no ROI statistics.")

    if scan.roistats:
        header = read_tsv(scan.roistats)[0]
        relative = f"; reference: {', '.join(roi_references)}" if roi_references else ""
        # the reference is the same in every row: it goes into the caption, not a column
        section.table_from_tsv(scan.roistats, caption=f"ROI statistics ({prefix}_roistats.tsv); χ in ppm{relative}.",
                               columns=[c for c in header if c != "reference" or len(roi_references) > 1], decimals=_ROI_DECIMALS)
    elif scan.dseg:
        section.note("No ROI statistics table was given for this scan.")


def write_subject_report(output_dir, subject: str, scans, *, config: dict | None = None, orientation: str = "radiological",
                         chi_window: float = figures.CHI_WINDOW_PPM, figure_format: str = "png", failed=()) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` and its figures under ``sub-<subject>/figures/``.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    subject : str
        Participant label (without ``sub-``).
    scans : sequence of ScanReportFiles
        Every scan of the subject (all sessions); one section each, sorted by name.
    config : dict, optional
        Configuration used, printed in the footer.
    orientation : {"radiological", "neurological"}
    chi_window : float
        Half-width of the Chimap display window (ppm).
    figure_format : {"png", "svg"}
    failed : sequence of FailedScan
        Scans of the subject that did not finish in this run: listed in the summary and in a
        section of their own with the failing step and the reason, so that the page never
        passes for a complete report.

    Returns
    -------
    Path of the page. Each file is written atomically; a scan whose inputs are missing or
    unreadable raises ``ValueError`` naming the file before the page is written.
    """
    from .. import __version__

    if figure_format not in {"png", "svg"}:
        raise ValueError(f"figure_format must be 'png' or 'svg', got {figure_format!r}")
    scans = sorted(scans, key=lambda s: s.name)
    failed = sorted(failed, key=lambda f: f.name)
    if not scans and not failed:
        raise ValueError(f"sub-{subject}: no scans to report")
    output_dir = Path(output_dir)
    figure_dir = output_dir / f"sub-{subject}" / "figures"
    total = len(scans) + len(failed)
    subtitle = f"qsmflow participant report: {total} scan{'s' if total != 1 else ''}"
    if failed:
        subtitle += f", {len(failed)} failed"
    page = ReportPage(f"sub-{subject}", path=output_dir / f"sub-{subject}.html", subtitle=subtitle)
    summary = page.section("Summary", anchor="summary")
    rows = [[s.name, "finished", "yes" if s.dseg else "no", "yes" if s.roistats else "no"] for s in scans]
    rows += [[f.name, "failed", "-", "-"] for f in failed]
    summary.table(sorted(rows), header=["scan", "state", "segmentation", "ROI statistics"],
                  caption="Scans of this participant")
    if failed:
        summary.note(f"{len(failed)} of {total} scans did not finish in the last run (see 'Scans that failed'); "
                     "this page shows the others and is rewritten in full once every scan finishes.")
        section = page.section("Scans that failed", anchor="failed")
        section.table([[f.name, f.step, f.reason, f.crash_file] for f in failed],
                      header=["scan", "step", "reason", "crash file"])
    summary.note(figures.orientation_note(orientation), kind="info")
    for scan in scans:
        _scan_section(page, scan, figure_dir, orientation=orientation, chi_window=chi_window, figure_format=figure_format)
    page.provenance(version=__version__, config=config)
    return page.write()
