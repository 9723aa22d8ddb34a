"""Report figures: slices of 3-D volumes with contours, overlays, colour bars and legends.

Every function takes numpy arrays on one voxel grid plus that grid's NIfTI ``affine`` and writes
one image file; the format follows the extension of ``out_file`` (``.png`` or ``.svg``). They
use matplotlib's object API (no pyplot, no global state), so they are safe in nipype worker
processes and need no display.

Geometry, shared by all figures:

- Volumes are reoriented to the closest RAS+ axes of ``affine`` (voxels are permuted and
  flipped, never resampled; an oblique grid is shown along its closest anatomical axes).
- Each panel is drawn in millimetres, so anisotropic voxels are not stretched.
- ``orientation="radiological"`` puts the subject's right on the viewer's left in axial and
  coronal panels; ``"neurological"`` puts it on the right. Sagittal panels show anterior on the
  left. Every row carries its orientation letters, and :func:`orientation_note` gives the
  sentence a page should print next to the figures.
- Slices are spread around the centre of mass of ``slice_mask`` (the brain, the labels ...)
  within its extent; panels are cropped to the bounding box of ``frame_mask`` plus a margin.

The building block is :func:`plot_slices`, which draws any stack of :class:`ImageLayer` and
:class:`ContourLayer`; :func:`plot_mask_contours`, :func:`plot_chimap`,
:func:`plot_registration` and :func:`plot_labels` are the participant report's figures, and
the group and atlas reports reuse them or :func:`plot_slices` directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEWS = ("axial", "coronal", "sagittal")
ORIENTATIONS = ("radiological", "neurological")
#: Default display window of susceptibility maps: ±0.15 ppm.
CHI_WINDOW_PPM = 0.15
#: Axis of the RAS+ volume along which each view slices, and the world coordinate it names.
_SLICE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_COORDINATE_NAME = {"sagittal": "x", "coronal": "y", "axial": "z"}
_DPI = 110
_FONT_SIZE = 9
#: Categorical colours for label images, in the order labels are sorted (then repeated).
#: No greys or pastels: they vanish over a grey susceptibility map.
_LABEL_COLOURS = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#ff8fa3", "#008080", "#b07cff", "#9a6324", "#00a0ff", "#800000", "#00d084",
    "#808000", "#ff00aa", "#000075", "#ffa500", "#c00000", "#2e8b57", "#7a5cff", "#d4a000",
)


@dataclass
class ImageLayer:
    """A volume drawn as an image.

    Attributes
    ----------
    data : 3-D array
    cmap : str or matplotlib colormap
    vmin, vmax : float, optional
        Display window; default: the 0.5th and 99.5th percentiles inside the frame mask.
    norm : matplotlib Normalize, optional
        Overrides ``vmin``/``vmax`` (e.g. a BoundaryNorm for labels).
    alpha : float
    transparent_zero : bool
        Leave voxels equal to 0 transparent (for overlays such as label images).
    """

    data: np.ndarray
    cmap: object = "gray"
    vmin: float | None = None
    vmax: float | None = None
    norm: object = None
    alpha: float = 1.0
    transparent_zero: bool = False


@dataclass
class ContourLayer:
    """Iso-lines of a volume (a mask at level 0.5 by default), listed in the legend as ``label``."""

    data: np.ndarray
    colour: str
    label: str | None = None
    levels: tuple = (0.5,)
    linewidth: float = 1.2
    linestyle: object = "-"


@dataclass
class ColourBar:
    """A horizontal colour bar under the panels for the image layer at ``layer_index``."""

    label: str
    layer_index: int = 0
    ticks: tuple | None = None
    extend: str = "both"


def orientation_note(orientation: str = "radiological") -> str:
    """One sentence stating how the figures are oriented, for the page that shows them."""
    _check_orientation(orientation)
    side = "left" if orientation == "radiological" else "right"
    return (
        f"Images are shown in {orientation} convention: the subject's right is on the viewer's {side} "
        "in axial and coronal slices; sagittal slices show anterior on the left. Slices are drawn to scale "
        "in millimetres along the closest anatomical axes of the image grid (not resampled); "
        "each panel gives the slice's world coordinate."
    )


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``volume`` to the closest RAS+ axes of ``affine``, without resampling.

    Returns the reoriented array (a view where possible) and its affine.
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(np.asarray(volume), ornt)
    return data, affine @ nib.orientations.inv_ornt_aff(ornt, np.asarray(volume).shape[:3])


def slice_indices(mask: np.ndarray, axis: int, count: int, *, spread: float = 0.6) -> list[int]:
    """Slice indices along ``axis`` centred on ``mask``'s centre of mass.

    The slices are evenly spaced over ``spread`` times the distance from the centre of mass to
    the nearer end of the mask, on both sides, so they stay inside the mask. Duplicates (thin
    masks) are removed.
    """
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("cannot choose slices: the mask is empty")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    profile = mask.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
    positions = np.arange(profile.size)
    centre = float((profile * positions).sum() / profile.sum())
    present = positions[profile > 0]
    half = spread * min(centre - present[0], present[-1] - centre)
    chosen = np.rint(np.linspace(centre - half, centre + half, count)).astype(int) if count > 1 else [round(centre)]
    return sorted({int(i) for i in chosen})


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(present[0] - margin, 0), min(present[-1] + margin + 1, mask.shape[axis])))
    return tuple(box)


def display_plane(volume: np.ndarray, view: str, index: int, orientation: str = "radiological") -> np.ndarray:
    """One slice of a RAS+ volume (:func:`to_ras`) as a 2-D display array, row 0 at the top.

    Axial: anterior at the top; coronal and sagittal: superior at the top; sagittal: anterior
    on the left; axial and coronal: the subject's right on the left (radiological) or on the
    right (neurological).
    """
    _check_orientation(orientation)
    if view == "axial":
        plane = volume[:, :, index].T[::-1]  # rows: anterior at the top; columns: left → right
    elif view == "coronal":
        plane = volume[:, index, :].T[::-1]  # rows: superior at the top
    else:
        return volume[index, :, :].T[::-1, ::-1]  # columns: anterior on the left
    return plane[:, ::-1] if orientation == "radiological" else plane


def plane_spacing(voxel_size, view: str) -> tuple[float, float]:
    """(column, row) spacing in mm of :func:`display_plane`'s array, from RAS+ voxel sizes."""
    x, y, z = voxel_size
    return {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}[view]


def _side_letters(view: str, orientation: str) -> tuple[str, str]:
    if view == "sagittal":
        return "A", "P"
    return ("R", "L") if orientation == "radiological" else ("L", "R")


def _robust_window(data: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    values = data[where] if where.any() else data.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def plot_slices(
    out_file,
    affine,
    layers,
    *,
    slice_mask: np.ndarray,
    frame_mask: np.ndarray | None = None,
    views=VIEWS,
    count: int = 5,
    spread: float = 0.6,
    orientation: str = "radiological",
    colour_bar: ColourBar | None = None,
    legend: list | None = None,
    title: str | None = None,
    panel_height: float = 1.9,
    max_width: float = 11.0,
    margin_voxels: int = 2,
) -> Path:
    """Draw rows of slices (one row per view) of stacked layers and write them to ``out_file``.

    Parameters
    ----------
    out_file : path
        ``.png`` or ``.svg``, written atomically (folders are created).
    affine : (4, 4) array
        Voxel-to-world affine shared by every layer.
    layers : sequence of ImageLayer or ContourLayer
        Drawn in order (the first is the background).
    slice_mask : 3-D array
        Slices are centred on its centre of mass (:func:`slice_indices`).
    frame_mask : 3-D array, optional
        Panels are cropped to its bounding box plus ``margin_voxels``; default ``slice_mask``.
    views : sequence of {"axial", "coronal", "sagittal"}
    count : int
        Slices per view.
    spread : float
        Fraction of the mask's half-extent the slices cover (see :func:`slice_indices`).
    orientation : {"radiological", "neurological"}
    colour_bar : ColourBar, optional
    legend : list of (label, colour), optional
        Extra legend entries (patches); contour layers with a ``label`` are added automatically.
    title : str, optional
    panel_height : float
        Height of one row in inches (rows too wide for ``max_width`` inches are scaled down).

    Returns
    -------
    Path of the written file.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.patheffects import withStroke

    outline = withStroke(linewidth=2.5, foreground="black")

    _check_orientation(orientation)
    out_file = Path(out_file)
    if out_file.suffix.lower() not in {".png", ".svg"}:
        raise ValueError(f"{out_file}: figures are written as .png or .svg")
    unknown = [view for view in views if view not in _SLICE_AXIS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; expected some of {VIEWS}")
    shape = np.asarray(layers[0].data).shape[:3]
    for layer in layers:
        if np.asarray(layer.data).shape[:3] != shape:
            raise ValueError(f"all layers must share one grid: {np.asarray(layer.data).shape} differs from {shape}")
    if np.asarray(slice_mask).shape != shape:
        raise ValueError(f"slice_mask has shape {np.asarray(slice_mask).shape}, layers {shape}")

    slice_ras, ras_affine = to_ras(np.asarray(slice_mask) > 0, affine)
    frame_ras = to_ras(np.asarray(frame_mask) > 0, affine)[0] if frame_mask is not None else slice_ras
    box = _bounding_box(frame_ras | slice_ras, margin_voxels)
    offset = np.array([b.start for b in box])
    slice_ras = slice_ras[box]
    frame_ras = frame_ras[box]
    voxel_size = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    volumes = [to_ras(np.asarray(layer.data, dtype=np.float32), affine)[0][box] for layer in layers]

    rows = []
    for view in views:
        axis = _SLICE_AXIS[view]
        indices = slice_indices(slice_ras, axis, count, spread=spread)
        column_mm, row_mm = plane_spacing(voxel_size, view)
        plane_shape = display_plane(frame_ras, view, indices[0], orientation).shape
        width_mm, height_mm = plane_shape[1] * column_mm, plane_shape[0] * row_mm
        rows.append((view, indices, width_mm, height_mm))

    label_width, gap = 0.45, 0.06
    heights = []
    for view, indices, width_mm, height_mm in rows:
        row_width = len(indices) * panel_height * width_mm / height_mm + (len(indices) - 1) * gap
        heights.append(panel_height * min(1.0, (max_width - label_width) / row_width))
    widths = [len(r[1]) * h * r[2] / r[3] + (len(r[1]) - 1) * gap for r, h in zip(rows, heights)]
    contour_entries = [(layer.label, layer.colour, "line", layer.linestyle) for layer in layers if isinstance(layer, ContourLayer) and layer.label]
    entries = contour_entries + [(label, colour, "patch", None) for label, colour in (legend or [])]
    figure_width = label_width + max(widths) + 0.15
    # a legend column is about 0.45 in of handle and spacing plus 0.075 in per character at 9 pt
    column_width = 0.45 + 0.075 * max((len(entry[0]) for entry in entries), default=0)
    legend_columns = max(1, min(len(entries), int((figure_width - 0.2) // column_width))) if entries else 1
    legend_height = 0.21 * int(np.ceil(len(entries) / legend_columns)) + 0.1 if entries else 0.0
    bar_height = 0.75 if colour_bar else 0.0
    title_height = 0.35 if title else 0.0
    caption_height = 0.2  # slice coordinate under each row
    figure_height = title_height + sum(h + caption_height + 0.08 for h in heights) + bar_height + legend_height + 0.1

    figure = Figure(figsize=(figure_width, figure_height), dpi=_DPI, facecolor="white")
    figure.set_layout_engine(None)
    if title:
        figure.text(0.5, 1 - 0.2 / figure_height, title, ha="center", va="center", fontsize=_FONT_SIZE + 2, weight="bold")

    windows = []
    for layer, volume in zip(layers, volumes):
        if isinstance(layer, ImageLayer) and layer.norm is None:
            low, high = _robust_window(volume, frame_ras)
            windows.append(Normalize(layer.vmin if layer.vmin is not None else low, layer.vmax if layer.vmax is not None else high))
        else:
            windows.append(getattr(layer, "norm", None))

    top = figure_height - title_height - 0.05
    mappable = None
    for (view, indices, width_mm, height_mm), height in zip(rows, heights):
        # One axes per row, in millimetres; panel j spans [j * pitch, j * pitch + width_mm].
        panel_width = height * width_mm / height_mm
        pitch = width_mm * (panel_width + gap) / panel_width
        row_width = len(indices) * panel_width + (len(indices) - 1) * gap
        bottom = top - height
        figure.text(0.12 / figure_width, (bottom + height / 2) / figure_height, view, rotation=90,
                    ha="center", va="center", fontsize=_FONT_SIZE + 1)
        ax = figure.add_axes((label_width / figure_width, bottom / figure_height, row_width / figure_width, height / figure_height))
        ax.set_facecolor(figure.get_facecolor())
        axis = _SLICE_AXIS[view]
        for column, index in enumerate(indices):
            left = column * pitch
            extent = (left, left + width_mm, 0.0, height_mm)
            for layer, volume, norm in zip(layers, volumes, windows):
                plane = display_plane(volume, view, index, orientation)
                if isinstance(layer, ImageLayer):
                    shown = np.ma.masked_equal(plane, 0) if layer.transparent_zero else plane
                    image = ax.imshow(shown, cmap=layer.cmap, norm=norm, alpha=layer.alpha, origin="upper",
                                      extent=extent, interpolation="nearest", aspect="equal")
                    if colour_bar and layer is layers[colour_bar.layer_index]:
                        mappable = image
                elif np.ptp(plane) > 0 and any(plane.min() < level < plane.max() for level in layer.levels):
                    ax.contour(plane, levels=list(layer.levels), colors=[layer.colour], linewidths=layer.linewidth,
                               linestyles=[layer.linestyle], origin="upper", extent=extent)
            # world coordinate at the panel's centre (on an oblique grid it varies across the slice)
            centre = np.where(np.arange(3) == axis, index, (np.asarray(frame_ras.shape) - 1) / 2)
            world = ras_affine @ np.append(offset + centre, 1.0)
            ax.text(left + width_mm / 2, -0.02, f"{_COORDINATE_NAME[view]} = {world[axis]:.0f} mm", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=_FONT_SIZE - 1)
            if column == 0:
                first, last = _side_letters(view, orientation)
                for x, letter, align in ((0.03, first, "left"), (0.97, last, "right")):
                    ax.text(left + x * width_mm, height_mm / 2, letter, ha=align, va="center", color="white",
                            fontsize=_FONT_SIZE + 1, weight="bold", path_effects=[outline])
        ax.set_xlim(0, (len(indices) - 1) * pitch + width_mm)
        ax.set_ylim(0, height_mm)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        top = bottom - caption_height - 0.08

    if colour_bar:
        if mappable is None:
            raise ValueError(f"colour_bar.layer_index {colour_bar.layer_index} is not an image layer")
        bar_width = min(4.0, figure_width * 0.5)
        bar_axes = figure.add_axes(((figure_width - bar_width) / 2 / figure_width, (top - 0.2) / figure_height,
                                    bar_width / figure_width, 0.14 / figure_height))
        bar = figure.colorbar(mappable, cax=bar_axes, orientation="horizontal", extend=colour_bar.extend,
                              ticks=list(colour_bar.ticks) if colour_bar.ticks is not None else None)
        bar.set_label(colour_bar.label, fontsize=_FONT_SIZE + 1)
        bar.ax.tick_params(labelsize=_FONT_SIZE)
        top -= bar_height
    if entries:
        handles = [Line2D([0], [0], color=colour, lw=2, linestyle=style) if kind == "line" else Patch(facecolor=colour, edgecolor="black", lw=0.5)
                   for _, colour, kind, style in entries]
        figure.legend(handles, [entry[0] for entry in entries], loc="upper center", ncol=legend_columns, frameon=False,
                      fontsize=_FONT_SIZE, bbox_to_anchor=(0.5, top / figure_height), handlelength=1.6, columnspacing=1.2)

    import io

    import matplotlib

    from ..bids import atomic_write_bytes

    image_format = out_file.suffix.lower()[1:]
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "qsmflow"}):
        figure.savefig(buffer, format=image_format, dpi=_DPI, metadata={"Date": None} if image_format == "svg" else {"Software": None})
    atomic_write_bytes(out_file, buffer.getvalue())
    return out_file


def _background(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    return volume[..., 0] if volume.ndim == 4 else volume


def plot_mask_contours(out_file, magnitude, affine, masks, *, orientation: str = "radiological", count: int = 5, title=None) -> Path:
    """Outlines of masks over the magnitude image.

    Parameters
    ----------
    magnitude : 3-D or 4-D array
        Background image (the first echo of a 4-D magnitude).
    masks : sequence of (label, mask, colour)
        E.g. ``[("brain mask", brain, "#ff3b30"), ("QSM mask", qsm, "#34c759")]``; slices are
        centred on the first mask and panels cropped to the union of the masks. The first outline
        is solid, the others dashed, so coinciding masks stay distinguishable.
    """
    if not masks:
        raise ValueError("masks must hold at least one (label, mask, colour)")
    layers = [ImageLayer(_background(magnitude), cmap="gray", vmin=0.0)]
    # later outlines dashed: where masks coincide both colours alternate along the line
    layers += [ContourLayer(np.asarray(mask) > 0, colour=colour, label=label, linewidth=1.4, linestyle="-" if position == 0 else (0, (3, 3)))
               for position, (label, mask, colour) in enumerate(masks)]
    union = np.zeros(layers[0].data.shape, dtype=bool)
    for _, mask, _ in masks:
        union |= np.asarray(mask) > 0
    return plot_slices(out_file, affine, layers, slice_mask=np.asarray(masks[0][1]) > 0, frame_mask=union,
                       orientation=orientation, count=count, title=title)


def plot_chimap(out_file, chi, affine, *, mask=None, window: float = CHI_WINDOW_PPM, orientation: str = "radiological",
                count: int = 5, title=None) -> Path:
    """Susceptibility slices in grey with a fixed ±``window`` ppm display range and a colour bar.

    A fixed window (not one scaled to each map) makes maps of different scans, subjects and
    methods look alike when their values agree. Values beyond the window are clipped (the bar's
    arrows say so). Slices centre on ``mask`` (default: the non-zero voxels of ``chi``).
    """
    if not window > 0:
        raise ValueError(f"window must be a positive number of ppm, got {window}")
    chi = np.asarray(chi, dtype=np.float32)
    where = np.asarray(mask) > 0 if mask is not None else chi != 0
    layers = [ImageLayer(chi, cmap="gray", vmin=-window, vmax=window)]
    ticks = (-window, -window / 2, 0.0, window / 2, window)
    return plot_slices(out_file, affine, layers, slice_mask=where, orientation=orientation, count=count,
                       colour_bar=ColourBar("χ (ppm)", ticks=ticks), title=title)


def template_edge_levels(template: np.ndarray, *, classes: int = 3) -> tuple[float, ...]:
    """Intensity levels separating the template's tissue classes (multi-Otsu thresholds).

    For a T1-weighted template with 3 classes these are the CSF/grey and grey/white
    boundaries; their iso-lines outline the template's anatomy whatever its intensity scale.
    """
    from skimage.filters import threshold_multiotsu

    template = np.asarray(template, dtype=np.float32)
    values = template[np.isfinite(template) & (template > 0)]
    if values.size < classes * 10:
        raise ValueError("the template has too few non-zero voxels to outline")
    return tuple(float(level) for level in threshold_multiotsu(values, classes=classes))


def plot_registration(out_file, subject, template, affine, *, mask=None, orientation: str = "radiological",
                      count: int = 5, colours=("#ffcc00", "#ff3b30"), smoothing_voxels: float = 1.0, title=None) -> Path:
    """Outlines of a template registered into subject space over the subject's image.

    Parameters
    ----------
    subject : 3-D or 4-D array
        The registration target (first-echo magnitude or T1w) on the subject grid.
    template : 3-D array
        The template resampled into the subject grid by the estimated transform.
    mask : 3-D array, optional
        Slices centre on it (default: the template's non-zero voxels).
    colours : pair of colours
        Colour of the outer (lower-intensity) and inner template iso-lines.
    smoothing_voxels : float
        Gaussian sigma (voxels) applied to the template before drawing its iso-lines.

    Misregistration shows as template outlines that cut across the subject's anatomy (ventricles,
    the brain's edge, the deep grey nuclei).
    """
    from scipy import ndimage

    # A light smoothing keeps the iso-lines to anatomical boundaries, not to voxel noise.
    template = ndimage.gaussian_filter(np.asarray(template, dtype=np.float32), sigma=smoothing_voxels) if smoothing_voxels else np.asarray(template, dtype=np.float32)
    levels = template_edge_levels(template)
    layers = [ImageLayer(_background(subject), cmap="gray", vmin=0.0)]
    names = ("template outer edge", "template inner edge") if len(levels) == 2 else tuple(f"template edge {i + 1}" for i in range(len(levels)))
    for level, colour, name in zip(levels, colours * len(levels), names):
        layers.append(ContourLayer(template, colour=colour, label=name, levels=(level,), linewidth=1.0))
    where = np.asarray(mask) > 0 if mask is not None else template > levels[0]
    return plot_slices(out_file, affine, layers, slice_mask=where, orientation=orientation, count=count, title=title)


def label_colours(indices, label_names: dict | None = None) -> dict:
    """A distinct colour for each label value, in sorted order (repeating after 24 colours).

    Values with the same name in ``label_names`` (e.g. the left and right putamen, both named
    ``"putamen"``) share one colour.
    """
    label_names = label_names or {}
    colours, by_name = {}, {}
    for index in sorted(int(i) for i in indices):
        name = label_names.get(index, f"label {index}")
        if name not in by_name:
            by_name[name] = _LABEL_COLOURS[len(by_name) % len(_LABEL_COLOURS)]
        colours[index] = by_name[name]
    return colours


def plot_labels(out_file, chi, labels, affine, label_names: dict, *, mask=None, window: float = CHI_WINDOW_PPM,
                orientation: str = "radiological", count: int = 5, alpha: float = 0.7, title=None) -> Path:
    """A label image in distinct colours over the susceptibility map, with a legend of names.

    Parameters
    ----------
    chi : 3-D array
        Susceptibility (ppm), shown in grey within ±``window``.
    labels : 3-D int array
        0 is background.
    label_names : dict
        Label value -> name shown in the legend; values present in ``labels`` but missing here
        are listed by number. Values that share a name share a colour and one legend entry: name
        a structure's left and right labels alike (the side shows in the image) to halve the
        colours needed.
    mask : 3-D array, optional
        Frame of the panels (default: non-zero ``chi``); slices centre on the labels.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    labels = np.rint(np.asarray(labels)).astype(np.int32)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        raise ValueError("the label image has no non-zero label")
    colours = label_colours(present, label_names)
    # One colour bin per label value: labels need not be consecutive.
    values = np.array(present, dtype=np.float64)
    edges = np.concatenate(([values[0] - 0.5], (values[:-1] + values[1:]) / 2, [values[-1] + 0.5]))
    norm = BoundaryNorm(edges, len(present))
    cmap = ListedColormap([colours[v] for v in present])
    chi = np.asarray(chi, dtype=np.float32)
    frame = np.asarray(mask) > 0 if mask is not None else chi != 0
    layers = [ImageLayer(chi, cmap="gray", vmin=-window, vmax=window),
              ImageLayer(labels.astype(np.float32), cmap=cmap, norm=norm, alpha=alpha, transparent_zero=True)]
    legend = []
    for value in present:
        entry = (str(label_names.get(value, f"label {value}")), colours[value])
        if entry not in legend:
            legend.append(entry)
    return plot_slices(out_file, affine, layers, slice_mask=labels > 0, frame_mask=frame, orientation=orientation,
                       count=count, spread=0.5, legend=legend, title=title)
