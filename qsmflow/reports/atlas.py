"""Figures and the HTML page of the atlas level."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from .figures import CHI_WINDOW_PPM, display_plane, plot_labels, plane_spacing, to_ras


def basal_ganglia_slices(dseg_ras: np.ndarray, mask_ras: np.ndarray, count: int = 4) -> list[int]:
    """Axial slice indices through the labelled deep grey matter (else around the brain's centre)."""
    labelled = dseg_ras > 0
    source = labelled if labelled.any() else mask_ras > 0
    present = np.flatnonzero(source.any(axis=(0, 1)))
    if present.size == 0:
        raise ValueError("cannot choose slices: no brain voxels")
    low, high = present[0], present[-1]
    centre = 0.5 * (low + high)
    half = 0.35 * (high - low)
    return sorted({int(round(v)) for v in np.linspace(centre - half, centre + half, count)})


def plot_band_montage(out_file, chis, affine, band_labels, *, dseg=None, mask=None, window: float = CHI_WINDOW_PPM,
                      count: int = 4, orientation: str = "radiological") -> Path:
    """One row per age band, the same axial slices through the basal ganglia, the same ppm window.

    Parameters
    ----------
    chis : list of 3-D arrays
        The band templates' chi (ppm) on one grid (the atlas space).
    affine : (4, 4) array
    band_labels : list of str
        Row titles.
    dseg, mask : 3-D arrays, optional
        Parcellation (slices through its deep nuclei) and brain mask (the frame).
    window : float
        Grey scale from -window to +window ppm in every panel.
    """
    from matplotlib.figure import Figure

    out_file = Path(out_file)
    ras = [to_ras(np.asarray(c, dtype=np.float32), affine)[0] for c in chis]
    _, ras_affine = to_ras(np.asarray(chis[0]), affine)
    voxel = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    mask_ras = to_ras(np.asarray(mask) > 0, affine)[0] if mask is not None else ras[0] != 0
    dseg_ras = to_ras(np.asarray(dseg), affine)[0] if dseg is not None else np.zeros(mask_ras.shape)
    slices = basal_ganglia_slices(dseg_ras, mask_ras, count)
    box_rows = [np.flatnonzero(mask_ras.any(axis=(1, 2))), np.flatnonzero(mask_ras.any(axis=(0, 2)))]
    crop = tuple(slice(max(r[0] - 2, 0), r[-1] + 3) for r in box_rows)
    figure = Figure(figsize=(2.2 * len(slices) + 0.8, 2.4 * len(ras)), dpi=110)
    axes = figure.subplots(len(ras), len(slices), squeeze=False)
    image = None
    for row, (volume, label) in enumerate(zip(ras, band_labels)):
        for column, index in enumerate(slices):
            plane = display_plane(volume[crop[0], crop[1], :], "axial", index, orientation)
            spacing = plane_spacing(voxel, "axial")
            extent = (0, plane.shape[1] * spacing[0], 0, plane.shape[0] * spacing[1])
            image = axes[row, column].imshow(plane, cmap="gray", vmin=-window, vmax=window, extent=extent,
                                             interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            z = float((ras_affine @ np.array([0, 0, index, 1.0]))[2])
            if row == 0:
                axes[row, column].set_title(f"z = {z:.0f} mm", fontsize=9)
        axes[row, 0].set_ylabel(label, fontsize=10)
    colour_bar = figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    colour_bar.set_label("chi (ppm)")
    figure.suptitle("Band templates, axial slices through the basal ganglia (radiological: R on the left)", fontsize=10)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file)
    return out_file


def plot_parcellation(out_file, chi, dseg, affine, label_names: dict, *, mask=None, window: float = CHI_WINDOW_PPM) -> Path:
    """The atlas parcellation over the atlas's chi (:func:`qsmflow.reports.figures.plot_labels`)."""
    names = {value: str(name).removesuffix("_L").removesuffix("_R") for value, name in label_names.items()}
    return plot_labels(out_file, chi, dseg, affine, names, mask=mask, window=window,
                       title="Atlas parcellation (labels carried from the template; nuclei from the chi contrast)")


def _read_rows(path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    return rows[0], rows[1:]


def write_atlas_report(atlas_dir, name: str, *, montage, parcellation, roistats, correlations, description: dict,
                       config: dict | None = None) -> Path:
    """``atlas/tpl-<name>/index.html``: cohorts, montage, parcellation, ROI tables, registration check."""
    from .. import __version__
    from .html import ReportPage

    folder = Path(atlas_dir) / f"tpl-{name}"
    figures = folder / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    copies = []
    for source, target in ((montage, "montage.png"), (parcellation, "parcellation.png")):
        destination = figures / target
        shutil.copyfile(source, destination)
        copies.append(destination)
    page = ReportPage(f"QSM atlas {name}", path=folder / "index.html",
                      subtitle="age-band templates and their template of templates")
    cohorts = page.section("Cohorts")
    cohorts.facts({f"cohort-{label}": f"{entry['age'][0]:g}-{entry['age'][1]:g} years, mean {entry['mean_age']:g}, "
                   f"{len(entry['scans'])} scans" for label, entry in description.get("cohort", {}).items()})
    figure_section = page.section("Templates")
    figure_section.figure(copies[0], "Band templates in the atlas space: the same slices and ppm window in every row")
    figure_section.figure(copies[1], "Whole-brain parcellation of the atlas over its chi")
    tables = page.section("ROI susceptibility per band (atlas space)")
    for path in roistats:
        tables.table_from_tsv(path, caption=Path(path).name)
    check = page.section("Registration check")
    check.paragraph("Correlation of each registered input with its template inside the template's brain mask "
                    "(hybrid images); low values flag a failed registration.")
    for path in correlations:
        check.table_from_tsv(path, caption=Path(path).name)
    page.provenance(version=__version__, config=config)
    return page.write()
