"""Longitudinal QSM atlas: group-wise template construction, age bands, parcellation.

The steps of unbiased group-wise template construction (Avants BB, Yushkevich P, Pluta J, et al.
"The optimal template effect in hippocampus studies of diseased populations", NeuroImage
2010;49:2457-2466; the scheme of ANTs' ``buildtemplateparallel.sh`` and
``antsMultivariateTemplateConstruction2.sh``) as separate functions, so that a workflow can
run each registration as its own cached, parallel node:

1. :func:`register_to_template` -- one subject to the current template;
2. :func:`average_images` -- the registered subjects averaged (susceptibility in ppm as is,
   magnitude/T1w intensity-normalised first, :func:`normalise_intensity`);
3. :func:`shape_update` -- the average moved by the inverse of the mean transform from the
   template to the subjects, so that the template sits at the cohort's mean shape;
4. :func:`sharpen` -- Laplacian sharpening blended with the average, as ANTs does.

Registration is driven by a hybrid image (:func:`hybrid_image`): normalised magnitude (or T1w)
minus ``w`` times the susceptibility, so that the iron-rich nuclei, flat in the magnitude, take
part in the match (Zhang Y, Wei H, Cronin MJ, et al. "Longitudinal atlas for normative human
brain development and aging over the lifespan using quantitative susceptibility mapping",
NeuroImage 2018;171:176-189; Hanspach J, Dwyer MG, Bergsland NP, et al. "Methods for the
computation of templates from quantitative magnetic susceptibility maps (QSM): toward
improved atlas- and voxel-based analyses (VBA)", J Magn Reson Imaging 2017;46:1474-1484;
Lim IAL, Faria AV, Li X, et al. "Human brain atlas for automated region of interest selection
in quantitative susceptibility mapping", NeuroImage 2013;82:449-469).

A longitudinal atlas is built in two steps: the scans of each age band (:func:`age_bands`)
make a band template; the band templates then make a template of templates, the atlas, and
each subject's transforms are concatenated with its band's (:func:`concatenate_transforms`)
so that every scan reaches the atlas in one resampling. :func:`parcellate` carries a labelled
template's labels onto the atlas and redraws the deep grey nuclei from the atlas's own
susceptibility contrast (:func:`delineate_nuclei`).

Images are ``ants.ANTsImage`` (physical grid: origin, spacing, direction) in and out; transforms
are lists of ANTs transform files in ``ants.apply_transforms`` order (the first applied first to
the points of the fixed image).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

#: Default weight of the susceptibility in the hybrid image (per ppm of chi, on the magnitude
#: normalised to a brain median of 1): GP at 0.19 ppm then darkens by 0.38, about three times the
#: grey/white contrast of a first-echo magnitude, so the nuclei drive the match without erasing
#: the cortex (see tests/benchmarks/atlas.py for the comparison of weights).
HYBRID_CHI_WEIGHT = 2.0

#: Deep grey nuclei redrawn on the atlas from its susceptibility contrast.
DEEP_NUCLEI = ("CN", "PU", "GP", "TH", "RN", "SN", "DN")


def _ants():
    import ants

    return ants


# ---------------------------------------------------------------------------------------------
# images


def normalise_intensity(image, mask):
    """Image divided by its median inside ``mask`` (an image of 0/1), zero outside ``mask``.

    Magnitude and T1w intensities are in arbitrary units that differ between scans; dividing by
    the brain median makes them comparable before averaging, as template construction does with
    non-quantitative images. Never apply it to susceptibility maps, whose ppm are the quantity.

    Raises
    ------
    ValueError
        If the mask is empty or the median inside it is not positive.
    """
    data = image.numpy()
    inside = mask.numpy() > 0.5
    if not inside.any():
        raise ValueError("normalise_intensity: the mask is empty")
    median = float(np.median(data[inside]))
    if not median > 0:
        raise ValueError(f"normalise_intensity: the median inside the mask is {median:g}, not positive")
    return image.new_image_like(np.where(inside, data / median, 0.0).astype(np.float32))


def hybrid_image(intensity, chi, mask, *, chi_weight: float = HYBRID_CHI_WEIGHT):
    """Hybrid registration image: normalised magnitude (or T1w) minus ``chi_weight`` * chi.

    ``hybrid = intensity / median_brain(intensity) - chi_weight * chi`` inside the mask, 0
    outside. The magnitude (or T1w) shows the cortex and the ventricles; the susceptibility (ppm)
    shows the iron-rich nuclei (GP, SN, RN, DN) and the white matter's myelin, which are flat in
    the magnitude. Zhang et al. 2018 built their lifespan QSM atlas from such a combination of
    T1-weighted and susceptibility contrast; Hanspach et al. 2017 found templates driven by QSM
    alone or by magnitude alone each blur the structures the other shows.

    Parameters
    ----------
    intensity, chi, mask : ants.ANTsImage on one grid
        Magnitude (first echo) or T1w, susceptibility (ppm) and brain mask (0/1).
    chi_weight : float
        Weight of chi per ppm (:data:`HYBRID_CHI_WEIGHT`); 0 gives the normalised intensity.

    References
    ----------
    Zhang Y et al., NeuroImage 2018;171:176-189. Hanspach J et al., JMRI 2017;46:1474-1484.
    """
    normalised = normalise_intensity(intensity, mask).numpy()
    inside = mask.numpy() > 0.5
    values = normalised - np.float32(chi_weight) * chi.numpy().astype(np.float32)
    return intensity.new_image_like(np.where(inside, values, 0.0).astype(np.float32))


def resample_to_resolution(image, resolution_mm: float, *, interpolator: str = "linear"):
    """``image`` resampled to isotropic ``resolution_mm`` voxels over the same field of view."""
    ants = _ants()
    interp = {"linear": 0, "nearestNeighbor": 1, "genericLabel": 1}[interpolator]
    return ants.resample_image(image, (float(resolution_mm),) * 3, use_voxels=False, interp_type=interp)


# ---------------------------------------------------------------------------------------------
# one registration (qsmflow.registration does the work)


def register_to_template(template, moving, output_dir, *, transform: str = "syn", stages: dict | None = None,
                         template_mask=None, threads: int = 1, prefix: str = "to_template_"):
    """Register one subject's hybrid image to the current template (one node of an iteration).

    A thin use of :func:`qsmflow.registration.register` (rigid, affine, then SyN when
    ``transform="syn"``; ``stages`` overrides its schedule) with the template fixed.

    Returns
    -------
    qsmflow.registration.Registration
        ``forward`` maps template points to the subject (resamples the subject into the template).
    """
    from .registration import register

    return register(template, moving, transform=transform, stages=stages, fixed_mask=template_mask,
                    threads=threads, output_dir=output_dir, prefix=prefix)


def apply_transforms(reference, image, transforms, *, interpolator: str = "linear"):
    """``image`` resampled onto ``reference``'s grid through ``transforms`` in one resampling.

    ``transforms`` map points of ``reference`` to points of ``image`` (the first applied first),
    as :attr:`qsmflow.registration.Registration.forward` does; an empty list resamples by the
    images' physical coordinates. Labels need ``interpolator="genericLabel"``.
    """
    from .registration import apply_transform

    if not transforms:
        ants = _ants()
        interp = "genericLabel" if interpolator in ("genericLabel", "nearestNeighbor") else "linear"
        return ants.resample_image_to_target(image, reference, interp_type=interp)
    return apply_transform(reference, image, list(transforms), interpolation=interpolator)


def concatenate_transforms(outer, inner):
    """Transforms of ``A -> C`` from those of ``A -> B`` (``outer``) and ``B -> C`` (``inner``).

    With ``outer`` mapping points of A (e.g. the atlas) to B (a band template) and ``inner``
    points of B to C (a subject), the list ``outer + inner`` maps points of A to C, so that
    ``apply_transforms(A, subject, outer + inner)`` resamples the subject once.
    """
    return [str(t) for t in outer] + [str(t) for t in inner]


def displacement_field(reference, transforms, output_path):
    """Write ``transforms`` (mapping points of ``reference``) as one displacement field (mm).

    The field holds, at each voxel x of ``reference``, T(x) - x in ITK's physical (LPS)
    coordinates: every linear and deformable part composed into one ANTs transform file.
    """
    ants = _ants()
    output_path = Path(output_path)
    prefix = str(output_path.parent / (output_path.name.split(".")[0] + "_compose"))
    image = reference if reference.pixeltype == "float" else reference.clone("float")
    composed = ants.apply_transforms(image, image, [str(t) for t in transforms], compose=prefix)
    shutil.move(composed, output_path)
    return str(output_path)


# ---------------------------------------------------------------------------------------------
# averaging, shape update, sharpening


def average_images(images, *, masks=None, normalise: bool = False, min_coverage: float = 0.5):
    """Voxel-wise mean of images on one grid (the template of one iteration).

    Parameters
    ----------
    images : list of ants.ANTsImage
        Registered subjects on the template grid.
    masks : list of ants.ANTsImage, optional
        Their brain masks on that grid. With masks, each voxel averages only the subjects whose
        mask covers it (so the edge is not diluted by zeros) and voxels covered by fewer than
        ``min_coverage`` of the subjects are 0.
    normalise : bool
        Divide each image by its median inside its mask first (:func:`normalise_intensity`):
        True for magnitude/T1w, False for susceptibility (ppm averaged as is).
    min_coverage : float
        Fraction of the subjects that must cover a voxel.

    Returns
    -------
    average : ants.ANTsImage
    coverage : ants.ANTsImage or None
        Fraction of subjects covering each voxel (None without masks).
    """
    if not images:
        raise ValueError("average_images: no images")
    if normalise and masks is None:
        raise ValueError("average_images: intensity normalisation needs the masks")
    reference = images[0]
    shape = reference.shape
    for image in images[1:]:
        if image.shape != shape:
            raise ValueError(f"average_images: images on different grids {shape} and {image.shape}")
    total = np.zeros(shape, dtype=np.float64)
    if masks is None:
        for image in images:
            total += image.numpy()
        return reference.new_image_like((total / len(images)).astype(np.float32)), None
    weight = np.zeros(shape, dtype=np.float64)
    for image, mask in zip(images, masks, strict=True):
        inside = np.clip(mask.numpy().astype(np.float64), 0.0, 1.0)
        data = (normalise_intensity(image, mask) if normalise else image).numpy()
        total += inside * data
        weight += inside
    coverage = weight / len(images)
    mean = np.where(coverage >= min_coverage, total / np.maximum(weight, 1e-12), 0.0)
    return (reference.new_image_like(mean.astype(np.float32)),
            reference.new_image_like(coverage.astype(np.float32)))


def shape_update(template, fields, output_dir, *, gradient_step: float = 0.25, compositions: int = 4,
                 extra_images=()):
    """Move the template to the mean shape of the subjects registered to it.

    Each registration maps template points x to subject points x + d_k(x) (``fields``: the
    subjects' whole transforms, linear and deformable, as displacement fields on the template
    grid, :func:`displacement_field`). Resampling the template through the inverse of the mean
    map, approximated by ``compositions`` steps of -``gradient_step`` times the mean
    displacement (ANTs' ``antsMultivariateTemplateConstruction2.sh``: 4 steps of 0.25), makes
    the mean transform from the new template to the subjects the identity, so the template is
    biased towards no subject, in shape, size or position.

    Parameters
    ----------
    template : ants.ANTsImage
        The average of the registered subjects.
    fields : list of paths
        Each subject's displacement field on the template grid.
    output_dir : path
        Where the update (the scaled mean displacement) is written.
    gradient_step, compositions : float, int
        Step of the mean displacement and how many times it is composed.
    extra_images : sequence of ants.ANTsImage
        Images on the template grid moved by the same update (chi, magnitude, mask averages).

    Returns
    -------
    updated template, list of updated extra images, and the update's transform list (mapping
    points of the new template to the old one; put it before a subject's transforms to the old
    template to reach the new one without registering again, :func:`concatenate_transforms`).

    References
    ----------
    Avants BB et al., NeuroImage 2010;49:2457-2466; Guimond A, Meunier J, Thirion JP, "Average
    brain models: a convergence study", Comput Vis Image Underst 2000;77:192-210.
    """
    ants = _ants()
    if not fields:
        raise ValueError("shape_update: no displacement fields")
    if gradient_step <= 0 or int(compositions) < 1:
        raise ValueError("shape_update: gradient_step must be positive and compositions at least 1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first = ants.image_read(str(fields[0]))
    total = first.numpy().astype(np.float64)
    for path in fields[1:]:
        image = ants.image_read(str(path))
        if image.shape != first.shape:
            raise ValueError(f"shape_update: displacement fields on different grids ({path})")
        total += image.numpy()
    step = (total / len(fields)) * (-float(gradient_step))
    update_image = ants.from_numpy(step.astype(np.float32), origin=first.origin, spacing=first.spacing,
                                   direction=first.direction, has_components=True)
    update_path = str(output_dir / "template_update_warp.nii.gz")
    ants.image_write(update_image, update_path)
    update = [update_path] * int(compositions)
    moved = ants.apply_transforms(template, template, update)
    extras = [ants.apply_transforms(image, image, update) for image in extra_images]
    return moved, extras, update


def sharpen(template, *, blending_weight: float = 0.75, mask=None):
    """Blend the template with its Laplacian-sharpened version, as ANTs template construction.

    ``blending_weight * template + (1 - blending_weight) * Sharpen(template)`` where Sharpen is
    ITK's Laplacian sharpening (``ImageMath Sharpen``; ``ants.build_template``'s blending).
    Applied to the registration image only: the susceptibility template stays an average in ppm.
    """
    if not 0.0 <= blending_weight <= 1.0:
        raise ValueError(f"blending_weight must be within 0..1, got {blending_weight}")
    ants = _ants()
    sharp = ants.iMath(template, "Sharpen")
    blended = template * blending_weight + sharp * (1.0 - blending_weight)
    if mask is not None:
        blended = blended * (mask > 0.5)
    return blended


# ---------------------------------------------------------------------------------------------
# age bands


@dataclass
class AgeBand:
    """One cohort of the atlas: an age range and the scans whose age falls in it."""

    label: str
    low: float
    high: float
    scans: list = field(default_factory=list)
    ages: list = field(default_factory=list)

    @property
    def mean_age(self) -> float:
        return float(np.mean(self.ages))

    def as_dict(self) -> dict:
        return {"label": self.label, "age_min": self.low, "age_max": self.high,
                "mean_age": round(self.mean_age, 3), "scans": list(self.scans), "ages": list(self.ages)}


def age_bands(ages: dict, *, edges=None, quantiles=None, min_scans: int = 3) -> list[AgeBand]:
    """Split scans into age bands by edges in years or by quantiles of the cohort's ages.

    Parameters
    ----------
    ages : dict
        Scan name -> age in years.
    edges : sequence of floats, optional
        Band edges in years, increasing; band k holds ages in [edges[k], edges[k+1]) (the last
        band includes its upper edge).
    quantiles : int, optional
        Number of bands of (nearly) equal size, cut at quantiles of the ages (instead of edges).
    min_scans : int
        Minimum number of scans per band.

    Returns
    -------
    list of :class:`AgeBand`, labelled ``"1"``, ``"2"`` ... (TemplateFlow's ``cohort-<k>``).

    Raises
    ------
    ValueError
        Naming the band and its count when a band has fewer than ``min_scans`` scans, when a scan's
        age is outside the edges, or when neither or both of ``edges``/``quantiles`` are given.
    """
    if (edges is None) == (quantiles is None):
        raise ValueError("age bands: give either edges (years) or quantiles (number of bands)")
    if not ages:
        raise ValueError("age bands: no scans with an age")
    names = sorted(ages)
    values = np.array([float(ages[n]) for n in names])
    if not np.all(np.isfinite(values)):
        missing = [n for n, v in zip(names, values) if not np.isfinite(v)]
        raise ValueError(f"age bands: scans without an age: {missing}")
    if quantiles is not None:
        count = int(quantiles)
        if count < 1:
            raise ValueError(f"age bands: quantiles must be at least 1, got {quantiles}")
        edges = np.quantile(values, np.linspace(0.0, 1.0, count + 1))
    edges = [float(e) for e in edges]
    if len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"age bands: edges must be at least two increasing ages, got {edges}")
    outside = [n for n, v in zip(names, values) if v < edges[0] or v > edges[-1]]
    if outside:
        raise ValueError(f"age bands: ages of {outside} are outside the band edges {edges[0]:g}-{edges[-1]:g} years")
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    bands = []
    for k in range(len(edges) - 1):
        members = [(n, float(v)) for n, v, i in zip(names, values, index) if i == k]
        band = AgeBand(label=str(k + 1), low=edges[k], high=edges[k + 1],
                       scans=[n for n, _ in members], ages=[v for _, v in members])
        if len(band.scans) < min_scans:
            raise ValueError(
                f"age band {band.label} ({band.low:g}-{band.high:g} years) has {len(band.scans)} "
                f"scan(s), fewer than the minimum of {min_scans}; change atlas.bands or atlas.min_scans")
        bands.append(band)
    return bands


def nearest_band(age: float, bands) -> str:
    """Label of the band whose range holds ``age``, else the band with the nearest mean age."""
    for band in bands:
        low, high = float(band["age_min"]), float(band["age_max"])
        if low <= age <= high:
            return str(band["label"])
    return str(min(bands, key=lambda b: abs(float(b["mean_age"]) - age))["label"])


# ---------------------------------------------------------------------------------------------
# serial template construction (the template of templates, and the reference for the workflow)


@dataclass
class Template:
    """A template and how every input maps to it."""

    hybrid: object
    chi: object
    intensity: object
    mask: object
    transforms: list  # per input: transforms mapping template points to the input
    iterations: int


def initial_template(images, masks, *, resolution_mm: float | None = None):
    """Unregistered average of the inputs on the first input's grid (optionally resampled)."""
    ants = _ants()
    reference = images[0] if resolution_mm is None else resample_to_resolution(images[0], resolution_mm)
    resampled = [ants.resample_image_to_target(i, reference) for i in images]
    resampled_masks = [ants.resample_image_to_target(m, reference) for m in masks]
    average, _ = average_images(resampled, masks=resampled_masks)
    return average


def build_template(hybrids, chis, intensities, masks, work_dir, *, iterations: int = 3,
                   initial_transform: str = "affine", transform: str = "syn", stages: dict | None = None,
                   resolution_mm: float | None = None, gradient_step: float = 0.25,
                   blending_weight: float = 0.75, threads: int = 1, initial=None) -> Template:
    """Group-wise template of the inputs, serially: what the atlas workflow does node by node.

    The first of ``iterations`` iterations registers every input to the unregistered average
    with ``initial_transform``, the others with ``transform``. After each: average hybrid, chi (ppm, no
    normalisation), intensity (normalised) and masks, shape update, sharpening of the hybrid
    (:func:`update_template`). Each input's transforms to the final template are its last
    registration preceded by the last shape update.

    Parameters
    ----------
    hybrids, chis, intensities, masks : lists of ants.ANTsImage (one per input, each on its grid)
    work_dir : path
        Where the transforms are written.
    iterations : int
        Iterations in all (the first linear, the others with ``transform``).
    initial_transform, transform, stages, threads
        See :func:`register_to_template`.
    resolution_mm : float, optional
        Template voxel size (default: the first input's grid).
    gradient_step, blending_weight
        See :func:`shape_update`, :func:`sharpen`.
    initial : ants.ANTsImage, optional
        Starting template (default: :func:`initial_template`).

    Returns
    -------
    Template

    References
    ----------
    Avants BB et al., NeuroImage 2010;49:2457-2466.
    """
    work_dir = Path(work_dir)
    template = initial if initial is not None else initial_template(hybrids, masks, resolution_mm=resolution_mm)
    template_mask = None
    if int(iterations) < 1:
        raise ValueError(f"build_template: iterations must be at least 1, got {iterations}")
    for iteration in range(int(iterations)):
        kind = initial_transform if iteration == 0 else transform
        iteration_dir = work_dir / f"iteration-{iteration}"
        registrations = [
            register_to_template(template, h, iteration_dir, transform=kind, stages=stages, threads=threads,
                                 template_mask=template_mask, prefix=f"input-{k:03d}_")
            for k, h in enumerate(hybrids)]
        forwards = [r.forward for r in registrations]
        fields = [displacement_field(template, f, iteration_dir / f"input-{k:03d}_field.nii.gz")
                  for k, f in enumerate(forwards)]
        warped = warp_inputs(template, forwards, hybrids, chis, intensities, masks)
        step = update_template(warped, fields, iteration_dir, gradient_step=gradient_step,
                               blending_weight=blending_weight)
        template, template_mask = step["hybrid"], step["mask"]
    transforms = [concatenate_transforms(step["update"], f) for f in forwards]
    return Template(hybrid=step["hybrid"], chi=step["chi"], intensity=step["intensity"], mask=step["mask"],
                    transforms=transforms, iterations=iterations)


def warp_inputs(template, transforms, hybrids, chis, intensities, masks):
    """Every input's images resampled into the template through its transforms."""
    warped = {"hybrid": [], "chi": [], "intensity": [], "mask": []}
    for forward, h, c, i, m in zip(transforms, hybrids, chis, intensities, masks, strict=True):
        for key, image in (("hybrid", h), ("chi", c), ("intensity", i), ("mask", m)):
            warped[key].append(apply_transforms(template, image, forward))
    return warped


def update_template(warped: dict, fields, work_dir, *, gradient_step=0.25, blending_weight=0.75):
    """Average the warped inputs, move the averages to the mean shape, sharpen the hybrid.

    Parameters
    ----------
    warped : dict
        ``hybrid``, ``chi``, ``intensity``, ``mask``: lists of the inputs' images on the template grid.
    fields : list of paths
        The inputs' displacement fields (template points -> input), :func:`displacement_field`.

    Returns
    -------
    dict with ``hybrid`` (sharpened), ``chi`` (ppm, averaged as is), ``intensity`` (normalised
    average), ``mask`` (voxels covered by at least half of the inputs), ``coverage`` and
    ``update`` (the shape update's transforms, new template points -> old).
    """
    masks = warped["mask"]
    hybrid, _ = average_images(warped["hybrid"], masks=masks)
    chi, _ = average_images(warped["chi"], masks=masks)
    intensity, _ = average_images(warped["intensity"], masks=masks, normalise=True)
    coverage, _ = average_images(masks)
    hybrid, (chi, intensity, coverage), update = shape_update(
        hybrid, fields, work_dir, gradient_step=gradient_step, extra_images=(chi, intensity, coverage))
    mask = coverage.new_image_like((coverage.numpy() >= 0.5).astype(np.float32))
    hybrid = sharpen(hybrid, blending_weight=blending_weight, mask=mask)
    return {"hybrid": hybrid, "chi": chi * mask, "intensity": intensity * mask, "mask": mask,
            "coverage": coverage, "update": update}


# ---------------------------------------------------------------------------------------------
# parcellation and ROI statistics


def carry_labels(target, labels, transforms):
    """Labels resampled onto ``target`` through ``transforms`` with ANTs' genericLabel."""
    return apply_transforms(target, labels, transforms, interpolator="genericLabel")


def delineate_nuclei(chi, labels, nucleus_labels: dict, *, voxel_size=(1.0, 1.0, 1.0), search_mm: float = 2.0,
                     ring_mm: float = 4.0, min_contrast: float = 0.02, surroundings: str = "local"):
    """Redraw paramagnetic deep grey nuclei from the susceptibility contrast within atlas priors.

    For each nucleus with prior P (the carried label), the threshold is halfway between its core
    (P eroded by one voxel, median chi) and its surroundings (the ``ring_mm`` shell outside the
    search region, outside every prior): with ``surroundings="local"`` (default) the value of
    the ring voxel nearest each voxel, so that the edge of a blurred nucleus is placed half-way
    to whatever lies next to it (half-way to CSF at about 0 ppm beside the ventricles, half-way
    to white matter at about -0.03 ppm elsewhere); with ``"median"`` one threshold from the
    ring's median, which lets the caudate grow into the ventricles (tests/benchmarks/atlas.py at
    3 mm: atlas CN Dice 0.66 with the median, 0.75 local; PU, GP, TH within 0.01).
    The nucleus becomes the connected voxels above that threshold within
    P dilated by ``search_mm`` that touch P's core; voxels of other nuclei's priors are never
    taken. Where the contrast is below ``min_contrast`` ppm (e.g. the caudate of a young child)
    the prior is kept, and the returned report says so.

    Parameters
    ----------
    chi : float array (ppm)
    labels : int array
        Carried labels (all ROIs; nuclei are redrawn, other labels are kept where no nucleus is).
    nucleus_labels : dict
        Nucleus abbreviation -> list of label values (e.g. left and right).
    voxel_size : sequence of 3 floats
        Voxel size in mm.
    search_mm, ring_mm : float
        Dilation of the prior searched, and width of the surrounding shell (mm; at least one voxel).
    min_contrast : float
        Core minus surroundings (ppm) needed to redraw from contrast.

    Returns
    -------
    labels : int array
    report : dict nucleus label value -> {"method": "contrast"|"prior", "contrast": ppm, "threshold": ppm}

    References
    ----------
    Lim IAL et al., NeuroImage 2013;82:449-469 (nuclei boundaries drawn on a QSM atlas's
    contrast); Zhang Y et al., NeuroImage 2018;171:176-189.
    """
    chi = np.asarray(chi, dtype=np.float32)
    labels = np.asarray(labels)
    out = labels.copy()
    all_nucleus_values = [v for values in nucleus_labels.values() for v in values]
    any_prior = np.isin(labels, all_nucleus_values)
    structure = ndimage.generate_binary_structure(3, 1)
    report = {}
    voxel = float(np.mean(voxel_size))
    search_voxels = max(1, int(round(search_mm / voxel)))
    ring_voxels = max(search_voxels + 1, int(round((search_mm + ring_mm) / voxel)))
    for name, values in nucleus_labels.items():
        for value in values:
            prior = labels == value
            if not prior.any():
                continue
            core = ndimage.binary_erosion(prior, structure)
            if not core.any():
                core = prior
            search = ndimage.binary_dilation(prior, structure, iterations=search_voxels)
            ring = (ndimage.binary_dilation(prior, structure, iterations=ring_voxels) & ~search & ~any_prior
                    & (chi != 0))
            if ring.sum() < 5:
                report[int(value)] = {"nucleus": name, "method": "prior", "contrast": None, "threshold": None}
                continue
            inside_value = float(np.median(chi[core]))
            outside_value = float(np.median(chi[ring]))
            contrast = inside_value - outside_value
            if contrast < min_contrast:
                report[int(value)] = {"nucleus": name, "method": "prior", "contrast": round(contrast, 5), "threshold": None}
                continue
            if surroundings == "local":
                # each voxel's surroundings: the nearest ring voxel's value, the ring's values
                # smoothed along the ring first (normalised convolution, sigma one voxel) against noise
                weight = ndimage.gaussian_filter(ring.astype(np.float32), 1.0)
                smooth = ndimage.gaussian_filter(np.where(ring, chi, np.float32(0.0)), 1.0)
                ring_values = np.where(ring, smooth / np.maximum(weight, 1e-6), 0.0)
                _, nearest = ndimage.distance_transform_edt(~ring, sampling=voxel_size, return_indices=True)
                threshold = 0.5 * (inside_value + ring_values[tuple(nearest)])
            elif surroundings == "median":
                threshold = 0.5 * (inside_value + outside_value)
            else:
                raise ValueError(f"surroundings must be 'local' or 'median', not {surroundings!r}")
            others = any_prior & ~prior
            candidate = search & ~others & (chi > threshold)
            components, _ = ndimage.label(candidate, structure)
            keep = np.unique(components[core & candidate])
            drawn = np.isin(components, keep[keep > 0])
            out[prior & ~drawn] = 0
            out[drawn] = value
            report[int(value)] = {"nucleus": name, "method": "contrast", "contrast": round(contrast, 5),
                                  "threshold": round(float(np.median(np.broadcast_to(threshold, chi.shape)[search])), 5)}
    # Voxels of a prior that were not redrawn fall back to the nearest non-nucleus label.
    emptied = (out == 0) & (labels != 0)
    if emptied.any():
        background = np.where(np.isin(out, all_nucleus_values), 0, out)
        if (background > 0).any():
            _, nearest = ndimage.distance_transform_edt(background == 0, return_indices=True)
            fill = background[tuple(nearest)]
            out[emptied] = fill[emptied]
    return out, report


def parcellate(atlas_hybrid, atlas_chi, atlas_mask, template, template_labels, nucleus_labels: dict,
               output_dir, *, template_mask=None, transform: str = "syn", stages: dict | None = None,
               threads: int = 1, delineate: bool = True, min_contrast: float = 0.02, surroundings: str = "local"):
    """Whole-brain parcellation of a QSM atlas from a labelled template (e.g. MNI).

    The template is registered to the atlas (rigid, affine, SyN), its labels are carried across
    with genericLabel interpolation and restricted to the atlas's brain mask, and the deep grey
    nuclei are redrawn from the atlas's susceptibility contrast (:func:`delineate_nuclei`).

    Parameters
    ----------
    atlas_hybrid, atlas_chi, atlas_mask : ants.ANTsImage
        The atlas (or a band template): registration image, chi (ppm), brain mask.
    template, template_labels : ants.ANTsImage
        Labelled template: its image (similar contrast to ``atlas_hybrid`` helps) and labels.
    template_mask : ants.ANTsImage, optional
        The template's brain: the template is registered inside it (dilated by 4 voxels), as
        the atlas is a brain without skull.
    surroundings : {"local", "median"}
        :func:`delineate_nuclei`'s threshold.
    nucleus_labels : dict
        Nucleus abbreviation -> label values redrawn (:func:`delineate_nuclei`).
    output_dir : path
        Where the template-to-atlas transforms are written.

    Returns
    -------
    dict with ``labels`` (ants.ANTsImage on the atlas grid), ``carried`` (before redrawing),
    ``report`` (per nucleus label), ``transforms`` (atlas points -> template points).
    """
    if template_mask is not None:
        region = ndimage.binary_dilation(template_mask.numpy() > 0.5, iterations=4)
        template = template.new_image_like(np.where(region, template.numpy(), 0.0).astype(np.float32))
    registration = register_to_template(atlas_hybrid, template, output_dir, transform=transform, stages=stages,
                                        threads=threads, prefix="template_to_atlas_")
    carried = carry_labels(atlas_hybrid, template_labels, registration.forward)
    mask = atlas_mask.numpy() > 0.5
    carried_data = np.where(mask, carried.numpy(), 0).astype(np.int32)
    if delineate:
        final, report = delineate_nuclei(atlas_chi.numpy(), carried_data, nucleus_labels,
                                         voxel_size=tuple(atlas_hybrid.spacing), min_contrast=min_contrast,
                                         surroundings=surroundings)
    else:
        final, report = carried_data, {}
    final = np.where(mask, final, 0)
    return {
        "labels": atlas_hybrid.new_image_like(final.astype(np.float32)),
        "carried": atlas_hybrid.new_image_like(carried_data.astype(np.float32)),
        "report": report,
        "transforms": registration.forward,
    }


def roi_susceptibility(chi, labels, names: dict) -> list[dict]:
    """Mean, median, std and voxel count of chi (ppm) in each label."""
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    rows = []
    for value, name in sorted(names.items()):
        inside = labels == int(value)
        count = int(inside.sum())
        values = chi[inside]
        rows.append({"index": int(value), "name": name, "voxels": count,
                     "mean": float(values.mean()) if count else float("nan"),
                     "median": float(np.median(values)) if count else float("nan"),
                     "std": float(values.std()) if count else float("nan")})
    return rows


def masked_correlation(a, b, mask) -> float:
    """Pearson correlation of two images inside a mask."""
    inside = np.asarray(mask) > 0.5
    x = np.asarray(a, dtype=np.float64)[inside]
    y = np.asarray(b, dtype=np.float64)[inside]
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def band_template_for_age(template_dir, age: float) -> dict:
    """The files of the built atlas's cohort nearest ``age``, as a segmentation atlas.

    Parameters
    ----------
    template_dir : path
        ``OUTPUT_DIR/atlas/tpl-<name>`` of a built atlas (with ``template_description.json``).
    age : float
        The scan's age in years.

    Returns
    -------
    dict with ``template`` (the cohort's magnitude template, ``_T2starw``), ``brain_mask``,
    ``labels`` (``_dseg.nii.gz``), ``table`` (``_dseg.tsv``), ``name`` (``<name>cohort<k>``, for
    ``space-`` entities) and ``cohort``: what :func:`qsmflow.segmentation.load_user_atlas` reads;
    when the atlas has them, ``chi`` (the cohort's Chimap), ``source_labels`` (the labelled
    template's labels) and ``label_transform`` (cohort -> labelled template), which
    :func:`band_segmentation_atlas` uses.

    Raises
    ------
    FileNotFoundError
        Naming the missing file when the directory is not a built atlas.
    """
    import json

    template_dir = Path(template_dir)
    description_path = template_dir / "template_description.json"
    if not description_path.is_file():
        raise FileNotFoundError(f"{description_path} does not exist: {template_dir} is not a built qsmflow atlas "
                                "(run the atlas level first)")
    description = json.loads(description_path.read_text())
    name = template_dir.name.removeprefix("tpl-")
    bands = [{"label": label, "age_min": entry["age"][0], "age_max": entry["age"][1], "mean_age": entry["mean_age"]}
             for label, entry in description["cohort"].items()]
    if not bands:
        raise ValueError(f"{description_path}: no cohort")
    cohort = nearest_band(float(age), bands)
    resolution = next(iter(description["res"]))
    stem = template_dir / f"cohort-{cohort}" / f"tpl-{name}_cohort-{cohort}_res-{resolution}"
    files = {"template": Path(f"{stem}_T2starw.nii.gz"), "brain_mask": Path(f"{stem}_desc-brain_mask.nii.gz"),
             "labels": Path(f"{stem}_dseg.nii.gz"), "table": Path(f"{stem}_dseg.tsv")}
    for role, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (the {role} of cohort {cohort} of {template_dir})")
    # the cohort's Chimap (the susceptibility channel's template) and its labelled template's
    # labels with the cohort -> labelled-template field (labels carried in one resampling);
    # atlases built before these outputs existed lack them
    optional = {"chi": Path(f"{stem}_Chimap.nii.gz"),
                "source_labels": template_dir / f"tpl-{name}_desc-labelled_dseg.nii.gz",
                "label_transform": Path(f"{stem}_from-labelled_mode-image_xfm.nii.gz")}
    files.update({role: path for role, path in optional.items() if path.is_file()})
    return {**{k: str(v) for k, v in files.items()}, "name": f"{name}cohort{cohort}", "cohort": cohort}


def band_segmentation_atlas(files: dict):
    """The :class:`qsmflow.segmentation.Atlas` of a cohort (:func:`band_template_for_age`'s files).

    Template: the cohort's magnitude template; brain mask: its mask; labels: its ``dseg``. With
    the cohort's Chimap, that is the susceptibility channel's template (the cohort's own contrast,
    e.g. a child's low pallidal iron, instead of adult values painted on the labels); with the
    labelled template's labels and the cohort's field to them, the labels reach a scan in one
    resampling (scan -> cohort -> labelled template) instead of being resampled twice, which
    erodes the thin caudate (tests/benchmarks/atlas.py, held-out subjects).
    """
    import nibabel as nib

    from . import segmentation

    atlas = segmentation.load_user_atlas(files["template"], files["labels"], files["table"], name=files["name"])
    atlas.brain_mask = np.asarray(nib.load(files["brain_mask"]).dataobj) > 0.5
    return segmentation.with_cohort_inputs(atlas, chi=files.get("chi"), source_labels=files.get("source_labels"),
                                           label_transforms=[files["label_transform"]] if "label_transform" in files else [])
