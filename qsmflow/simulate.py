"""Simulated multi-echo GRE data of a brain-shaped numerical phantom, written as a BIDS dataset.

This module powers ``qsmflow demo`` and the test-suite. It builds a head phantom on a voxel grid
(scalp, skull, an air-filled sinus, CSF, cortex, white matter, ventricles and ten regions of
interest), lets the deep grey and white matter susceptibilities follow lifespan trajectories,
computes the field with :func:`qsmflow.recon.dipole.forward_field`, simulates multi-echo complex
signal and writes raw BIDS ``MEGRE`` images plus the ground truth as a derivatives dataset.

Conventions
-----------
* Arrays are indexed (x, y, z) with x from left to right, y from posterior to anterior and
  z from inferior to superior (RAS voxel axes); anatomical positions are in mm relative to the
  anterior commissure, close to MNI152 coordinates.
* ``Phantom.chi`` is in ppm **relative to CSF** (CSF = 0), the reference QSM maps are usually
  reported in. Air voxels hold ``air_chi`` (physically air - water = +9.4 ppm; the default is
  scaled down, see :data:`PHYSICAL_AIR_CHI`). Before the forward model the map is shifted so
  that air is 0, which makes the zero padding of the FFT behave as the air around the head.
* Fields are in ppm of B0 (``*_ppm``) or Hz; phase follows +2π·f·TE.

Ground-truth trajectories
-------------------------
Deep grey matter follows ``chi = a (1 - exp(-b age)) + c`` and white matter follows the Poisson
curve ``chi = A age exp(-age / B) + C`` (minimum at age B), as in Li W, Wu B, Batrachenko A,
et al. "Differential developmental trajectories of magnetic susceptibility in human brain gray
and white matter over the lifespan", Hum Brain Mapp 2014;35:2698-2713. The parameters in
:data:`TRUE_TRAJECTORIES` are rounded values chosen to resemble that study's curves (adult GP
about 0.19 ppm reaching a plateau in the twenties; putamen and caudate still rising at 80;
white-matter minima in the late twenties to mid-forties); they are not the paper's fitted
estimates and are meant as a plausible, known truth for testing.
"""
from __future__ import annotations

import csv
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from qsmflow.recon.dipole import (
    GYROMAGNETIC_RATIO_MHZ_PER_T,
    forward_field,
    ppm_to_hz,
)

#: Air minus water susceptibility in ppm (SI): +0.36 - (-9.05).
PHYSICAL_AIR_CHI = 9.4
#: Cortical bone relative to water (ppm), Buch S et al., Magn Reson Med 2015;73:2185-2194.
PHYSICAL_BONE_CHI = -2.0
#: Scale applied to the sources outside the brain (air and bone) by default. At their physical
#: values the skull and sinus fields change by up to ~15 rad per 2 mm voxel at TE = 28 ms and 3 T
#: next to the brain, which no unwrapping method survives (real data lose that signal to
#: dephasing instead); a quarter keeps the largest phase step between brain voxels near 1 rad
#: at the last echo while the background field stays about ten times the local field.
BACKGROUND_SCALE = 0.25
#: Default air susceptibility relative to CSF used by the phantom (ppm).
DEFAULT_AIR_CHI = PHYSICAL_AIR_CHI * BACKGROUND_SCALE
#: Default bone susceptibility relative to CSF used by the phantom (ppm).
DEFAULT_BONE_CHI = PHYSICAL_BONE_CHI * BACKGROUND_SCALE

DEFAULT_SHAPE = (90, 108, 90)
DEFAULT_VOXEL_SIZE = (2.0, 2.0, 2.0)
DEFAULT_ECHO_TIMES = (0.004, 0.012, 0.020, 0.028)

BIDS_VERSION = "1.9.0"


class ROILabel(NamedTuple):
    """One region of interest of the phantom's label image (labels are bilateral)."""

    index: int
    abbreviation: str
    name: str
    kind: str  # "deep_grey" or "white_matter"


#: Label image values of the phantom's regions of interest.
ROI_LABELS: tuple[ROILabel, ...] = (
    ROILabel(1, "PU", "putamen", "deep_grey"),
    ROILabel(2, "GP", "globus pallidus", "deep_grey"),
    ROILabel(3, "CN", "caudate nucleus", "deep_grey"),
    ROILabel(4, "TH", "thalamus", "deep_grey"),
    ROILabel(5, "RN", "red nucleus", "deep_grey"),
    ROILabel(6, "SN", "substantia nigra", "deep_grey"),
    ROILabel(7, "DN", "dentate nucleus", "deep_grey"),
    ROILabel(11, "IC", "internal capsule", "white_matter"),
    ROILabel(12, "SCC", "splenium of the corpus callosum", "white_matter"),
    ROILabel(13, "OR", "optic radiation", "white_matter"),
)

#: Ground-truth lifespan trajectories (ppm relative to CSF; age in years). ``exponential``:
#: chi = a (1 - exp(-b age)) + c; ``poisson``: chi = A age exp(-age / B) + C.
TRUE_TRAJECTORIES: dict[str, dict] = {
    "PU": {"model": "exponential", "a": 0.12, "b": 0.025, "c": -0.01},
    "GP": {"model": "exponential", "a": 0.19, "b": 0.12, "c": 0.0},
    "CN": {"model": "exponential", "a": 0.09, "b": 0.03, "c": -0.005},
    "TH": {"model": "exponential", "a": 0.035, "b": 0.05, "c": -0.005},
    "RN": {"model": "exponential", "a": 0.13, "b": 0.07, "c": -0.01},
    "SN": {"model": "exponential", "a": 0.16, "b": 0.08, "c": 0.0},
    "DN": {"model": "exponential", "a": 0.12, "b": 0.06, "c": -0.01},
    # A = -depth * e / B, so the curve dips by `depth` below C at age B.
    "IC": {"model": "poisson", "A": -0.0018, "B": 45.0, "C": -0.015},
    "SCC": {"model": "poisson", "A": -0.0023, "B": 30.0, "C": -0.02},
    "OR": {"model": "poisson", "A": -0.0024, "B": 28.0, "C": -0.015},
}

#: Trajectory of the white matter outside the ROIs (about -0.03 ppm in adults).
BACKGROUND_WHITE_MATTER_TRAJECTORY = {"model": "poisson", "A": -0.0016, "B": 35.0, "C": -0.01}


class Tissue(NamedTuple):
    """Tissue class of :attr:`Phantom.tissues` with its default MR properties."""

    index: int
    name: str
    m0: float  # proton density, relative to CSF ~ 1
    r2star: float  # 1/s at 3 T


#: Tissue classes; susceptibilities are set in :func:`brain_phantom`.
TISSUES: tuple[Tissue, ...] = (
    Tissue(0, "air", 0.0, 0.0),
    Tissue(1, "scalp", 1.0, 25.0),
    Tissue(2, "soft_tissue", 0.6, 30.0),
    Tissue(3, "bone", 0.05, 400.0),
    Tissue(4, "sinus_air", 0.0, 0.0),
    Tissue(5, "csf", 0.95, 4.0),
    Tissue(6, "cortex", 0.85, 17.0),
    Tissue(7, "white_matter", 0.72, 21.0),
    Tissue(8, "deep_grey", 0.8, 17.0),
    Tissue(9, "brainstem", 0.75, 20.0),
    Tissue(10, "spinal_cord", 0.75, 20.0),
)
_TISSUE = {t.name: t for t in TISSUES}

CORTEX_CHI = 0.01
BRAINSTEM_CHI = -0.02
#: R2* rises with iron: about 170 s^-1 per ppm of deep grey susceptibility at 3 T (GP ~50 s^-1).
R2STAR_PER_PPM_IRON = 170.0


def _curve(params: dict, age):
    age = np.asarray(age, dtype=np.float64)
    if params["model"] == "exponential":
        return params["a"] * (1.0 - np.exp(-params["b"] * age)) + params["c"]
    return params["A"] * age * np.exp(-age / params["B"]) + params["C"]


def true_susceptibility(roi: str, age_years):
    """Ground-truth mean susceptibility (ppm, relative to CSF) of ``roi`` at ``age_years``.

    Parameters
    ----------
    roi : str
        Abbreviation from :data:`ROI_LABELS` (``"GP"``, ``"IC"`` ...).
    age_years : float or array
        Age in years.

    Returns
    -------
    float or float64 array, following :data:`TRUE_TRAJECTORIES`.
    """
    if roi not in TRUE_TRAJECTORIES:
        raise ValueError(f"unknown ROI {roi!r}; expected one of {sorted(TRUE_TRAJECTORIES)}")
    if np.any(np.asarray(age_years) < 0):
        raise ValueError("age_years must be non-negative")
    value = _curve(TRUE_TRAJECTORIES[roi], age_years)
    return float(value) if np.ndim(value) == 0 else value


@dataclass(eq=False)
class Phantom:
    """A simulated head on a voxel grid.

    Attributes
    ----------
    chi : float32 array
        Susceptibility in ppm relative to CSF (CSF = 0); air holds :attr:`air_chi`.
    brain_mask, head_mask : bool arrays
        Brain (cerebrum, cerebellum, brainstem, ventricles, sulci) and whole head.
    labels : int16 array
        ROI label image (values of :data:`ROI_LABELS`, 0 elsewhere).
    label_names : dict
        Label value -> ROI abbreviation.
    m0 : float32 array
        Proton density magnitude (CSF ~ 1).
    r2star : float32 array
        Transverse relaxation rate R2* in 1/s.
    tissues : int8 array
        Tissue class (:data:`TISSUES`).
    voxel_size : tuple
        Voxel edge lengths in mm.
    age_years, seed, air_chi
        Parameters the phantom was made with.
    roi_chi : dict
        ROI abbreviation -> susceptibility given to that ROI (trajectory + subject variation).
    anatomy_scale : float
        Size of the head relative to the nominal adult head (smaller when shrunk to fit the grid).
    """

    chi: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    labels: np.ndarray
    label_names: dict
    m0: np.ndarray
    r2star: np.ndarray
    tissues: np.ndarray
    voxel_size: tuple
    age_years: float
    seed: int
    air_chi: float
    roi_chi: dict = field(default_factory=dict)
    anatomy_scale: float = 1.0

    @property
    def shape(self) -> tuple:
        return self.chi.shape


# ---------------------------------------------------------------------------------------------
# anatomy (mm, anterior commissure at the origin)

_HEAD_EXTENT = {"x": (-82.0, 82.0), "y": (-120.0, 86.0), "z_top": 94.0, "z_bottom": -72.0}
_MARGIN_MM = 6.0

# (center, semi-axes) of bilateral structures, given for the right side (x > 0).
_DEEP_GREY = {
    "PU": ((25.0, 3.0, 1.0), (5.5, 14.0, 9.0)),
    "GP": ((18.0, -2.0, -1.0), (3.5, 8.0, 5.5)),
    "CN": ((15.0, 11.0, 11.0), (4.5, 9.0, 7.0)),
    "TH": ((11.0, -18.0, 6.0), (6.5, 12.0, 8.0)),
    "RN": ((5.0, -20.0, -9.0), (3.5, 4.0, 4.0)),
    "SN": ((12.0, -15.0, -15.0), (3.5, 7.0, 3.5)),
    "DN": ((15.0, -57.0, -35.0), (6.0, 7.0, 5.0)),
}
_WHITE_MATTER_ROIS = {
    "IC": ((20.5, -14.0, 5.0), (2.5, 9.0, 9.0)),
    "SCC": ((0.0, -38.0, 12.0), (15.0, 6.0, 5.5)),
    "OR": ((31.0, -62.0, 5.0), (5.0, 18.0, 6.0)),
}
_BILATERAL = {"PU", "GP", "CN", "TH", "RN", "SN", "DN", "IC", "OR"}
_SINUS = ((0.0, 40.0, -47.0), (15.0, 17.0, 11.0))


def _ellipsoid(x, y, z, center, semi_axes):
    cx, cy, cz = center
    a, b, c = semi_axes
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0


def _structure(x, y, z, center, semi_axes, bilateral):
    mask = _ellipsoid(x, y, z, center, semi_axes)
    if bilateral:
        mask |= _ellipsoid(x, y, z, (-center[0], center[1], center[2]), semi_axes)
    return mask


def _anatomical_coordinates(shape, voxel_size, rng, vary, growth=1.0):
    """Sparse mm coordinates of the voxel centres in the anatomical frame, and the head scale."""
    fov = np.asarray(shape, dtype=np.float64) * np.asarray(voxel_size, dtype=np.float64)
    needed = np.array(
        [
            _HEAD_EXTENT["x"][1] - _HEAD_EXTENT["x"][0],
            _HEAD_EXTENT["y"][1] - _HEAD_EXTENT["y"][0],
            _HEAD_EXTENT["z_top"] - _HEAD_EXTENT["z_bottom"],
        ]
    )
    fit = float(np.min((fov - 2 * _MARGIN_MM) / needed))
    if fit < 0.3:
        raise ValueError(
            f"field of view {tuple(fov.tolist())} mm is too small for a head phantom: it needs at "
            f"least {tuple(np.round(needed * 0.3 + 2 * _MARGIN_MM).tolist())} mm (an adult-sized "
            f"head needs {tuple(np.round(needed + 2 * _MARGIN_MM).tolist())} mm)"
        )
    nominal_scale = min(1.0, fit)
    subject_scale = float(np.clip(rng.normal(1.0, 0.025), 0.95, 1.0)) if vary else 1.0
    shift = rng.uniform(-2.0, 2.0, size=3) if vary else np.zeros(3)
    scale = nominal_scale * subject_scale * growth

    # Head centred in x and y; top of the head one margin below the top of the grid.
    centre_x = 0.5 * (_HEAD_EXTENT["x"][0] + _HEAD_EXTENT["x"][1]) * scale
    centre_y = 0.5 * (_HEAD_EXTENT["y"][0] + _HEAD_EXTENT["y"][1]) * scale
    top_z = _HEAD_EXTENT["z_top"] * scale + _MARGIN_MM
    axes = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size)):
        grid = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * float(d)
        if axis == 0:
            world = grid + centre_x
        elif axis == 1:
            world = grid + centre_y
        else:
            world = grid - grid[-1] + top_z
        axes.append(((world + shift[axis]) / scale).astype(np.float32))
    x = axes[0][:, None, None]
    y = axes[1][None, :, None]
    z = axes[2][None, None, :]
    return x, y, z, scale


def head_size_for_age(age_years: float) -> float:
    """Linear size of the head relative to an adult's: the cube root of the brain volume fraction.

    Brain volume grows fast in infancy (about 35-40 % of the adult volume at birth, 75-80 % at 2
    years, above 90 % by 6): here ``V/V_adult = 1 - 0.6 exp(-age / 2.5)``, so the linear size is
    0.74 at birth, 0.90 at 2, 0.98 at 6 and 1 in adults. A rounded fit to the growth curves of
    Dekaban AS, "Changes in brain weights during the span of human life", Ann Neurol
    1978;4:345-356, and Knickmeyer RC et al., J Neurosci 2008;28:12176-12182; used to give the
    simulated children smaller brains.
    """
    if age_years < 0:
        raise ValueError("age_years must be non-negative")
    return float((1.0 - 0.6 * np.exp(-float(age_years) / 2.5)) ** (1.0 / 3.0))


def _anatomical_folding(seed: int, x, y, z, *, smoothness_mm: float = 4.0, spacing_mm: float = 1.0) -> np.ndarray:
    """A smooth random field of unit variance defined in the anatomical frame (mm from the anterior
    commissure, on a ``spacing_mm`` grid over the head's extent, Gaussian of ``smoothness_mm``
    sigma), sampled linearly at the sparse coordinates ``x, y, z``: the same folding for every
    head size and position."""
    lower = np.array([_HEAD_EXTENT["x"][0], _HEAD_EXTENT["y"][0], _HEAD_EXTENT["z_bottom"]]) - _MARGIN_MM
    upper = np.array([_HEAD_EXTENT["x"][1], _HEAD_EXTENT["y"][1], _HEAD_EXTENT["z_top"]]) + _MARGIN_MM
    size = tuple(int(n) for n in np.ceil((upper - lower) / spacing_mm) + 1)
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(size).astype(np.float32),
                                    smoothness_mm / spacing_mm)
    field /= field.std() + np.float32(1e-12)
    full = np.broadcast_shapes(x.shape, y.shape, z.shape)
    coordinates = [np.broadcast_to((axis - low) / spacing_mm, full) for axis, low in zip((x, y, z), lower)]
    return ndimage.map_coordinates(field, coordinates, order=1, mode="nearest").astype(np.float32)


def brain_phantom(
    shape=DEFAULT_SHAPE,
    voxel_size=DEFAULT_VOXEL_SIZE,
    *,
    age_years: float = 40.0,
    seed: int = 0,
    air_chi: float = DEFAULT_AIR_CHI,
    bone_chi: float = DEFAULT_BONE_CHI,
    deep_grey_sd: float = 0.01,
    white_matter_sd: float = 0.003,
    anatomical_variation: bool = True,
    growth_with_age: bool = False,
    sulcal_seed: int | None = None,
) -> Phantom:
    """Brain-shaped susceptibility phantom with age-dependent deep grey and white matter.

    The head is built from ellipsoids placed near their MNI152 positions (mm from the anterior
    commissure): cerebrum (with a frontal floor and tentorium), cerebellum and brainstem form the
    brain; a 3 mm CSF layer, a 7 mm skull and a 5 mm scalp surround it; below it lie the face and
    neck with an air-filled sinus beneath the frontal lobes. Cortex is the outer 3 mm of the brain,
    folded by random sulci; ventricles widen after 30. The head keeps its adult size (about
    164 x 206 x 166 mm) unless the grid is too small, in which case it is shrunk to fit
    (:attr:`Phantom.anatomy_scale`).

    Parameters
    ----------
    shape : tuple of 3 ints
        Grid size (x: left-right, y: posterior-anterior, z: inferior-superior).
    voxel_size : sequence of 3 floats
        Voxel edge lengths in mm.
    age_years : float
        Age that sets the ROI susceptibilities (:data:`TRUE_TRAJECTORIES`) and ventricle size.
    seed : int
        Subject identity: head size (0.95-1), position (±2 mm), sulcal pattern and per-ROI
        susceptibility deviations.
    air_chi, bone_chi : float
        Susceptibility of air and of bone relative to CSF in ppm (physical values
        :data:`PHYSICAL_AIR_CHI`, :data:`PHYSICAL_BONE_CHI`; defaults scaled by
        :data:`BACKGROUND_SCALE`).
    deep_grey_sd, white_matter_sd : float
        Standard deviation (ppm) of the between-subject deviation of each ROI from its trajectory.
    anatomical_variation : bool
        If False, head size and position are the nominal ones (sulci and χ deviations still
        follow ``seed``; set the SDs to 0 for the exact trajectory values).
    growth_with_age : bool
        Scale the head by :func:`head_size_for_age` (children's heads smaller; off by default).
    sulcal_seed : int, optional
        Seed of a sulcal pattern drawn in the anatomical frame (:func:`_anatomical_folding`), so
        that phantoms sharing it have corresponding sulci whatever their head size and position:
        they then differ only by what a deformation can align. By default the pattern is the
        subject's own (drawn from ``seed`` on the grid).

    Returns
    -------
    Phantom

    References
    ----------
    Li W et al., Hum Brain Mapp 2014;35:2698-2713 (lifespan susceptibility trajectories).
    """
    shape = tuple(int(n) for n in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8 voxels, got {shape}")
    if len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"voxel_size must be 3 positive lengths in mm, got {voxel_size}")
    if not 0 <= age_years <= 120:
        raise ValueError(f"age_years must be within 0..120, got {age_years}")
    if deep_grey_sd < 0 or white_matter_sd < 0:
        raise ValueError("deep_grey_sd and white_matter_sd must be non-negative")

    rng = np.random.default_rng(seed)
    growth = head_size_for_age(age_years) if growth_with_age else 1.0
    x, y, z, scale = _anatomical_coordinates(shape, voxel_size, rng, anatomical_variation, growth)
    full = np.broadcast_shapes(x.shape, y.shape, z.shape)
    # Distances from edt are on the grid, so convert anatomical mm to grid mm with `scale`.
    sampling = voxel_size

    def distance_inside(mask):
        return ndimage.distance_transform_edt(mask, sampling=sampling).astype(np.float32) / scale

    # --- brain outline ------------------------------------------------------------------
    cerebrum = _ellipsoid(x, y, z, (0.0, -17.0, 14.0), (67.0, 87.0, 64.0))
    frontal_floor = (y > 5.0) & (z < -22.0)
    temporal_floor = (z < -44.0)
    # Tentorium: a tent highest behind the splenium, sloping down backwards and sideways.
    tentorium_height = -6.0 + 0.2 * (y + 40.0) - 0.004 * x**2
    below_tentorium = (y < -40.0) & (z < tentorium_height)
    cerebrum &= ~(frontal_floor | temporal_floor | below_tentorium)
    cerebellum = _ellipsoid(x, y, z, (0.0, -62.0, -36.0), (50.0, 30.0, 26.0))
    cerebellum &= (z < tentorium_height - 1.5) & ~cerebrum
    brainstem = _ellipsoid(x, y, z, (0.0, -28.0, -30.0), (13.0, 14.0, 34.0))
    spinal_cord = (np.hypot(x, y + 38.0) <= 6.0) & (z < -50.0) & ~brainstem
    spinal_cord = np.broadcast_to(spinal_cord, full)
    brain = cerebrum | cerebellum | brainstem

    # --- head layers ----------------------------------------------------------------------
    intracranial_core = brain | spinal_cord
    distance_out = ndimage.distance_transform_edt(~intracranial_core, sampling=sampling)
    distance_out = distance_out.astype(np.float32) / scale
    intracranial = distance_out <= 3.0
    del distance_out
    distance_skull = ndimage.distance_transform_edt(~intracranial, sampling=sampling)
    distance_skull = distance_skull.astype(np.float32) / scale
    skull = (distance_skull <= 7.0) & ~intracranial
    face = _ellipsoid(x, y, z, (0.0, 10.0, -52.0), (58.0, 76.0, 44.0))
    neck = (((x / 48.0) ** 2 + ((y + 30.0) / 50.0) ** 2) <= 1.0) & (z < -40.0)
    head = (distance_skull <= 12.0) | face | neck
    del distance_skull
    head = ndimage.binary_fill_holes(head)
    scalp = head & (distance_inside(head) <= 5.0)

    sinus_center, sinus_axes = _SINUS
    sinus = _ellipsoid(x, y, z, sinus_center, sinus_axes) & head
    sinus_wall = _ellipsoid(x, y, z, sinus_center, tuple(a + 2.5 for a in sinus_axes)) & head

    # --- folding: CSF sheets along zero crossings of a smooth random field ---------------
    noise = rng.standard_normal(full).astype(np.float32)  # drawn either way: the later draws stay the subject's
    if sulcal_seed is None:
        sigma_vox = [4.0 * scale / d for d in voxel_size]
        folding = ndimage.gaussian_filter(noise, sigma_vox)
        folding /= folding.std() + np.float32(1e-12)
    else:
        folding = _anatomical_folding(int(sulcal_seed), x, y, z)
    del noise
    depth = distance_inside(cerebrum)
    sulci = cerebrum & (depth <= 9.0) & (depth > 1.0) & (np.abs(folding) < 0.12)
    corpus_callosum_and_below = _ellipsoid(x, y, z, (0.0, -4.0, 0.0), (10.0, 40.0, 26.0)) | (z < 0.0)
    fissure = cerebrum & (np.abs(x) < 1.5) & ~corpus_callosum_and_below
    del folding

    ventricle_growth = 1.0 + 0.006 * max(age_years - 30.0, 0.0)

    def grown(semi):
        return tuple(s * ventricle_growth for s in semi)

    ventricles = _structure(x, y, z, (8.0, -8.0, 17.0), grown((4.5, 25.0, 7.0)), True)
    ventricles |= _ellipsoid(x, y, z, (0.0, -15.0, 2.0), grown((1.5, 10.0, 6.0)))
    ventricles |= _ellipsoid(x, y, z, (0.0, -44.0, -30.0), grown((4.0, 4.0, 4.0)))
    ventricles &= brain

    tissue_for_cortex = brain & ~(sulci | fissure)
    cortex = ~brainstem & tissue_for_cortex & (distance_inside(tissue_for_cortex) <= 3.0)

    # --- tissue classes, painted in order (later wins) ------------------------------------
    tissues = np.zeros(full, dtype=np.int8)
    tissues[head] = _TISSUE["soft_tissue"].index
    tissues[scalp] = _TISSUE["scalp"].index
    tissues[skull | sinus_wall] = _TISSUE["bone"].index
    tissues[sinus] = _TISSUE["sinus_air"].index
    tissues[intracranial] = _TISSUE["csf"].index
    tissues[spinal_cord] = _TISSUE["spinal_cord"].index
    tissues[brain] = _TISSUE["white_matter"].index
    tissues[brainstem & ~cerebrum] = _TISSUE["brainstem"].index
    tissues[cortex] = _TISSUE["cortex"].index
    tissues[sulci | fissure | ventricles] = _TISSUE["csf"].index

    labels = np.zeros(full, dtype=np.int16)
    roi_chi = {}
    for roi in ROI_LABELS:
        trajectory_value = true_susceptibility(roi.abbreviation, age_years)
        sd = deep_grey_sd if roi.kind == "deep_grey" else white_matter_sd
        roi_chi[roi.abbreviation] = float(trajectory_value + (rng.normal(0.0, sd) if sd else 0.0))
    # White matter ROIs first, so that nuclei win where ellipsoids touch.
    for roi in sorted(ROI_LABELS, key=lambda r: r.kind != "white_matter"):
        geometry = _WHITE_MATTER_ROIS.get(roi.abbreviation) or _DEEP_GREY[roi.abbreviation]
        mask = _structure(x, y, z, *geometry, roi.abbreviation in _BILATERAL) & brain & ~ventricles
        labels[mask] = roi.index
        if roi.kind == "deep_grey":
            tissues[mask] = _TISSUE["deep_grey"].index
        else:
            tissues[mask] = _TISSUE["white_matter"].index

    # --- properties ---------------------------------------------------------------------
    chi = np.zeros(full, dtype=np.float32)
    m0 = np.zeros(full, dtype=np.float32)
    r2star = np.zeros(full, dtype=np.float32)
    for tissue in TISSUES:
        where = tissues == tissue.index
        m0[where] = tissue.m0
        r2star[where] = tissue.r2star
    chi[(tissues == _TISSUE["air"].index) | (tissues == _TISSUE["sinus_air"].index)] = air_chi
    chi[tissues == _TISSUE["bone"].index] = bone_chi
    chi[tissues == _TISSUE["cortex"].index] = CORTEX_CHI
    chi[tissues == _TISSUE["white_matter"].index] = _curve(BACKGROUND_WHITE_MATTER_TRAJECTORY, age_years)
    chi[(tissues == _TISSUE["brainstem"].index) | (tissues == _TISSUE["spinal_cord"].index)] = BRAINSTEM_CHI
    for roi in ROI_LABELS:
        where = labels == roi.index
        value = roi_chi[roi.abbreviation]
        chi[where] = value
        if roi.kind == "deep_grey":
            r2star[where] = _TISSUE["deep_grey"].r2star + R2STAR_PER_PPM_IRON * max(value, 0.0)

    brain_mask = brain.copy()
    return Phantom(
        chi=chi,
        brain_mask=brain_mask,
        head_mask=head,
        labels=labels,
        label_names={roi.index: roi.abbreviation for roi in ROI_LABELS},
        m0=m0,
        r2star=r2star,
        tissues=tissues,
        voxel_size=voxel_size,
        age_years=float(age_years),
        seed=int(seed),
        air_chi=float(air_chi),
        roi_chi=roi_chi,
        anatomy_scale=float(scale),
    )


# ---------------------------------------------------------------------------------------------
# fields and signal


@dataclass
class FieldMaps:
    """Field perturbation (ppm of B0) split into local and background parts."""

    total: np.ndarray
    local: np.ndarray
    background: np.ndarray


def _normalised_direction(b0_direction) -> np.ndarray:
    direction = np.asarray(b0_direction, dtype=np.float64)
    if direction.shape != (3,) or not np.all(np.isfinite(direction)) or np.linalg.norm(direction) == 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    return direction / np.linalg.norm(direction)


def _shim(field_ppm: np.ndarray, mask: np.ndarray, order: int | None) -> np.ndarray:
    """Least-squares fit over ``mask`` of polynomial terms up to ``order`` (the scanner's shim)."""
    if order is None:
        return np.zeros_like(field_ppm)
    index = np.nonzero(mask)
    centre = [np.mean(i) for i in index]
    coords = [(np.arange(n, dtype=np.float64) - c) / n for n, c in zip(field_ppm.shape, centre)]
    exponents = [(i, j, k) for i in range(order + 1) for j in range(order + 1) for k in range(order + 1)
                 if i + j + k <= order]
    design = np.stack([coords[0][index[0]] ** i * coords[1][index[1]] ** j * coords[2][index[2]] ** k
                       for i, j, k in exponents], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, field_ppm[index].astype(np.float64), rcond=None)
    fitted = np.zeros(field_ppm.shape, dtype=np.float64)
    x = coords[0][:, None, None]
    y = coords[1][None, :, None]
    z = coords[2][None, None, :]
    for coefficient, (i, j, k) in zip(coefficients, exponents):
        fitted += coefficient * (x**i * y**j * z**k)
    return fitted.astype(np.float32)


def simulate_field(
    phantom: Phantom,
    *,
    b0_direction=(0.0, 0.0, 1.0),
    shim_order: int | None = 1,
    padding: int | None = None,
) -> FieldMaps:
    """Total, local and background field (ppm) of a phantom.

    The total field is the dipole field of the whole head, computed with the map shifted so that
    air is zero and padded with air on all sides except below, where the neck is extended so that
    the cut through the neck at the bottom of the grid does not act as a surface source. A shim of
    ``shim_order`` (0: mean, 1: plus linear, 2: plus quadratic terms), fitted over the brain, is
    then subtracted as a scanner would. The local field is the field of the brain's own
    susceptibility (relative to CSF, zero outside the brain mask); the background field is the
    difference, which is harmonic inside the brain.

    Parameters
    ----------
    phantom : Phantom
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes.
    shim_order : {None, 0, 1, 2}
        Order of the shim removed from the total field.
    padding : int, optional
        Voxels of padding on each side (default: half the largest grid size).

    Returns
    -------
    FieldMaps (float32, ppm of B0).
    """
    direction = _normalised_direction(b0_direction)
    if shim_order not in (None, 0, 1, 2):
        raise ValueError(f"shim_order must be None, 0, 1 or 2, got {shim_order!r}")
    pad = max(phantom.shape) // 2 if padding is None else int(padding)
    if pad < 0:
        raise ValueError("padding must be non-negative")
    relative_to_air = phantom.chi - np.float32(phantom.air_chi)
    extended = np.pad(relative_to_air, ((0, 0), (0, 0), (pad, 0)), mode="edge")
    extended = np.pad(extended, ((pad, pad), (pad, pad), (0, pad)))
    total = forward_field(extended, phantom.voxel_size, direction)
    total = total[pad:pad + phantom.shape[0], pad:pad + phantom.shape[1], pad:pad + phantom.shape[2]]
    total = total - _shim(total, phantom.brain_mask, shim_order)
    brain_chi = np.where(phantom.brain_mask, phantom.chi, np.float32(0.0))
    local = forward_field(brain_chi, phantom.voxel_size, direction, padding=pad)
    total = np.ascontiguousarray(total, dtype=np.float32)
    return FieldMaps(total=total, local=local, background=(total - local).astype(np.float32))


def _phase_offset(shape, rng) -> np.ndarray:
    """Smooth receive phase at TE = 0: a constant plus gentle linear and quadratic terms (rad)."""
    coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]
    linear = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
    quadratic = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
    offset = np.float32(rng.uniform(-np.pi, np.pi))
    return (offset + linear[0] * x + linear[1] * y + linear[2] * z
            + quadratic[0] * x**2 + quadratic[1] * y**2 + quadratic[2] * z**2).astype(np.float32)


_PI_BELOW = np.nextafter(np.float32(np.pi), np.float32(0.0))


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Wrap radians into [-π, π) as float32 (values within float32 rounding of ±π are clipped)."""
    wrapped = np.mod(np.asarray(phase, dtype=np.float64) + np.pi, 2.0 * np.pi) - np.pi
    return np.clip(wrapped.astype(np.float32), -_PI_BELOW, _PI_BELOW)


def simulate_multi_echo(
    phantom: Phantom,
    *,
    echo_times=DEFAULT_ECHO_TIMES,
    field_strength: float = 3.0,
    b0_direction=(0.0, 0.0, 1.0),
    snr: float = 100.0,
    phase_offset: bool = True,
    seed: int = 0,
    shim_order: int | None = 1,
    field_ppm: np.ndarray | None = None,
):
    """Multi-echo GRE magnitude and wrapped phase of a phantom.

    Signal per echo: ``m0 exp(-R2* TE) exp(i (φ0 + 2π f TE)) + n`` with f the total field in Hz
    (:func:`simulate_field`), φ0 a smooth phase offset and n complex Gaussian noise whose standard
    deviation per channel is the mean brain ``m0`` divided by ``snr``.

    Parameters
    ----------
    phantom : Phantom
    echo_times : sequence of floats
        Echo times in seconds, increasing.
    field_strength : float
        B0 in tesla.
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes.
    snr : float
        Signal-to-noise ratio of the brain's proton density (``inf`` for no noise).
    phase_offset : bool
        Add the smooth TE = 0 phase φ0.
    seed : int
        Seed of the noise and of φ0.
    shim_order : {None, 0, 1, 2}
        Passed to :func:`simulate_field` when ``field_ppm`` is not given.
    field_ppm : array, optional
        Precomputed total field (ppm) to use instead of computing it (``b0_direction`` and
        ``shim_order`` are then unused).

    Returns
    -------
    magnitude, phase : float32 arrays of shape ``phantom.shape + (n_echoes,)``; phase in
    radians wrapped to [-π, π).
    """
    echo_times = np.asarray(echo_times, dtype=np.float64)
    if echo_times.ndim != 1 or echo_times.size == 0 or np.any(echo_times <= 0):
        raise ValueError(f"echo_times must be positive seconds, got {echo_times.tolist()}")
    if np.any(np.diff(echo_times) <= 0):
        raise ValueError("echo_times must be strictly increasing")
    if field_strength <= 0:
        raise ValueError(f"field_strength must be positive tesla, got {field_strength}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if field_ppm is None:
        field_ppm = simulate_field(phantom, b0_direction=b0_direction, shim_order=shim_order).total
    elif field_ppm.shape != phantom.shape:
        raise ValueError(f"field_ppm has shape {field_ppm.shape}, phantom {phantom.shape}")
    rng = np.random.default_rng(seed)
    offset = _phase_offset(phantom.shape, rng) if phase_offset else np.zeros(phantom.shape, np.float32)
    field_hz = ppm_to_hz(field_ppm.astype(np.float32), field_strength).astype(np.float32)
    sigma = float(phantom.m0[phantom.brain_mask].mean()) / snr if np.isfinite(snr) else 0.0

    magnitude = np.empty(phantom.shape + (echo_times.size,), dtype=np.float32)
    phase = np.empty_like(magnitude)
    for echo, te in enumerate(echo_times):
        decay = phantom.m0 * np.exp(-phantom.r2star * np.float32(te))
        angle = offset + np.float32(2.0 * np.pi * te) * field_hz
        signal = decay * np.exp(1j * angle).astype(np.complex64)
        if sigma:
            noise = rng.standard_normal((2,) + phantom.shape, dtype=np.float32) * np.float32(sigma)
            signal += noise[0] + 1j * noise[1]
        magnitude[..., echo] = np.abs(signal)
        phase[..., echo] = wrap_phase(np.angle(signal))
    return magnitude, phase


@dataclass
class Acquisition:
    """A simulated multi-echo acquisition and its ground truth on the acquisition grid.

    Attributes
    ----------
    magnitude, phase : float32 arrays ``shape + (n_echoes,)``
        Magnitude and wrapped phase (rad) on the acquisition grid.
    truth : Phantom
        The phantom on the acquisition grid: ``chi``, ``m0`` and ``r2star`` are the means of each
        voxel's sub-voxels; masks, labels and tissue classes are those of the majority of them.
    fields : FieldMaps
        Total, local and background field (ppm), means of each voxel's sub-voxels.
    echo_times : tuple of floats (s)
    field_strength : float (T)
    b0_direction : tuple of 3 floats (voxel axes)
    supersampling : int
        Sub-voxels per acquisition voxel along each axis.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    truth: Phantom
    fields: FieldMaps
    echo_times: tuple
    field_strength: float
    b0_direction: tuple
    supersampling: int


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping ``factor``-cubes (the shape must be divisible by ``factor``)."""
    nx, ny, nz = (n // factor for n in array.shape[:3])
    blocks = array.reshape(nx, factor, ny, factor, nz, factor, *array.shape[3:])
    return blocks.mean(axis=(1, 3, 5), dtype=np.complex64 if np.iscomplexobj(array) else np.float32)


def _block_majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """Label of each cube held by at least half of its sub-voxels (0 when no label is)."""
    result = np.zeros(tuple(n // factor for n in labels.shape), dtype=labels.dtype)
    for value in np.unique(labels):
        if value != 0:
            result[_block_mean((labels == value).astype(np.float32), factor) >= 0.5] = value
    return result


def _supersampled_echoes(fine_magnitude, field_hz, echo_times, factor: int, *, offset, sigma: float, rng):
    """Magnitude and wrapped phase on the acquisition grid from a supersampled signal.

    For each echo the complex signal ``fine_magnitude(echo, te) * exp(i 2 pi te field_hz)`` is
    formed on the fine grid and averaged over blocks of ``factor**3`` voxels (intravoxel
    dephasing), then the phase offset and complex Gaussian noise of SD ``sigma`` (none if 0)
    are added on the acquisition grid. Returns float32 arrays with echoes last.
    """
    shape = offset.shape
    magnitude = np.empty(shape + (len(echo_times),), dtype=np.float32)
    phase = np.empty_like(magnitude)
    for echo, te in enumerate(echo_times):
        fine_signal = fine_magnitude(echo, te) * np.exp(
            1j * (np.float32(2.0 * np.pi * te) * field_hz)).astype(np.complex64)
        signal = _block_mean(fine_signal, factor) * np.exp(1j * offset).astype(np.complex64)
        del fine_signal
        if sigma:
            noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(sigma)
            signal += noise[0] + 1j * noise[1]
        magnitude[..., echo] = np.abs(signal)
        phase[..., echo] = wrap_phase(np.angle(signal))
    return magnitude, phase


def simulate_acquisition(
    shape=DEFAULT_SHAPE,
    voxel_size=DEFAULT_VOXEL_SIZE,
    *,
    age_years: float = 50.0,
    seed: int = 0,
    echo_times=DEFAULT_ECHO_TIMES,
    field_strength: float = 3.0,
    b0_direction=(0.0, 0.0, 1.0),
    snr: float = 100.0,
    supersampling: int = 2,
    air_chi: float = PHYSICAL_AIR_CHI,
    bone_chi: float = PHYSICAL_BONE_CHI,
    shim_order: int | None = 1,
    phase_offset: bool = True,
    fine_phantom: Phantom | None = None,
) -> Acquisition:
    """Multi-echo GRE of the head phantom simulated on a finer grid, as a scanner measures it.

    Unlike :func:`simulate_field` + :func:`simulate_multi_echo` on one grid (the tissue field then
    comes from the very kernel and grid the inversions use, an "inverse crime", and air and bone
    are scaled down by :data:`BACKGROUND_SCALE`), the phantom is built at ``supersampling`` times
    the resolution with air and bone at full strength; the field and the complex signal
    ``m0 exp(-R2* TE) exp(i 2 pi f TE)`` are computed there and averaged over each acquisition
    voxel, so that intravoxel dephasing darkens voxels next to air and bone as in real data. The
    smooth phase offset and complex Gaussian noise (standard deviation: mean brain ``m0`` / ``snr``)
    are then added on the acquisition grid. A tilted head is ``b0_direction`` away from voxel z.

    Parameters
    ----------
    shape, voxel_size
        Acquisition grid (see :func:`brain_phantom`).
    age_years, seed
        See :func:`brain_phantom`; ``seed`` also seeds the noise and the phase offset.
    echo_times, field_strength, b0_direction, snr, shim_order, phase_offset
        See :func:`simulate_multi_echo` and :func:`simulate_field`.
    supersampling : int
        Sub-voxels per acquisition voxel along each axis (1 reproduces the single-grid model).
    air_chi, bone_chi : float
        Susceptibility of air and bone relative to CSF (ppm); physical values by default.
    fine_phantom : Phantom, optional
        A phantom already on the fine grid (``shape`` times ``supersampling``), used instead of
        building one (``age_years``, ``air_chi`` and ``bone_chi`` are then unused), e.g. a head
        tilted in the scanner (:func:`tilted_phantom`).

    Returns
    -------
    Acquisition

    References
    ----------
    Inverse crime in QSM simulations and the need for a finer forward grid: Milovic C et al.,
    "Comparison of parameter optimization methods for quantitative susceptibility mapping",
    MRM 2021;85:480-494; Marques JP et al., "QSM reconstruction challenge 2.0", MRM
    2021;86:526-542 (forward simulation at higher resolution, then downsampled).
    """
    factor = int(supersampling)
    if factor != supersampling or factor < 1:
        raise ValueError(f"supersampling must be a positive integer, got {supersampling!r}")
    echo_times = np.asarray(echo_times, dtype=np.float64)
    if echo_times.ndim != 1 or echo_times.size == 0 or np.any(echo_times <= 0) or np.any(np.diff(echo_times) <= 0):
        raise ValueError(f"echo_times must be positive, increasing seconds, got {echo_times.tolist()}")
    if field_strength <= 0:
        raise ValueError(f"field_strength must be positive tesla, got {field_strength}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    direction = tuple(float(v) for v in _normalised_direction(b0_direction))
    shape = tuple(int(n) for n in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    if fine_phantom is None:
        fine = brain_phantom(tuple(n * factor for n in shape), tuple(v / factor for v in voxel_size),
                             age_years=age_years, seed=seed, air_chi=air_chi, bone_chi=bone_chi)
    elif fine_phantom.shape != tuple(n * factor for n in shape):
        raise ValueError(f"fine_phantom has shape {fine_phantom.shape}, expected {tuple(n * factor for n in shape)}")
    else:
        fine = fine_phantom
    fine_fields = simulate_field(fine, b0_direction=direction, shim_order=shim_order,
                                 padding=max(fine.shape) // 4)
    field_hz = ppm_to_hz(fine_fields.total, field_strength).astype(np.float32)

    truth = Phantom(
        chi=_block_mean(fine.chi, factor),
        brain_mask=_block_mean(fine.brain_mask.astype(np.float32), factor) >= 0.5,
        head_mask=_block_mean(fine.head_mask.astype(np.float32), factor) >= 0.5,
        labels=_block_majority(fine.labels, factor),
        label_names=dict(fine.label_names),
        m0=_block_mean(fine.m0, factor),
        r2star=_block_mean(fine.r2star, factor),
        tissues=_block_majority(fine.tissues, factor),
        voxel_size=voxel_size,
        age_years=fine.age_years,
        seed=fine.seed,
        air_chi=fine.air_chi,
        roi_chi=dict(fine.roi_chi),
        anatomy_scale=fine.anatomy_scale,
    )
    fields = FieldMaps(*(_block_mean(f, factor) for f in (fine_fields.total, fine_fields.local, fine_fields.background)))

    rng = np.random.default_rng(seed)
    offset = _phase_offset(shape, rng) if phase_offset else np.zeros(shape, np.float32)
    sigma = float(truth.m0[truth.brain_mask].mean()) / snr if np.isfinite(snr) else 0.0
    magnitude, phase = _supersampled_echoes(
        lambda echo, te: fine.m0 * np.exp(-fine.r2star * np.float32(te)), field_hz, echo_times, factor,
        offset=offset, sigma=sigma, rng=rng)
    return Acquisition(magnitude=magnitude, phase=phase, truth=truth, fields=fields,
                       echo_times=tuple(float(t) for t in echo_times), field_strength=float(field_strength),
                       b0_direction=direction, supersampling=factor)


def affine_for_b0_direction(b0_direction, voxel_size, shape=None) -> np.ndarray:
    """NIfTI affine of a grid whose voxel axes are rotated so that world z is ``b0_direction``.

    The rotation is the smallest one that takes world z onto ``b0_direction`` expressed in voxel
    axes (Rodrigues' formula), so :func:`qsmflow.recon.dipole.b0_direction_from_affine` returns
    the normalised ``b0_direction``. With ``shape`` the grid centre is put at the world origin.

    Parameters
    ----------
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes.
    voxel_size : sequence of 3 floats
        Voxel edge lengths in mm.
    shape : tuple of 3 ints, optional
        Grid size, used only to centre the field of view.

    Returns
    -------
    (4, 4) float64 array.
    """
    b = _normalised_direction(b0_direction)
    voxel_size = np.asarray(voxel_size, dtype=np.float64)
    if voxel_size.shape != (3,) or np.any(voxel_size <= 0):
        raise ValueError(f"voxel_size must be 3 positive lengths, got {voxel_size.tolist()}")
    world_z = np.array([0.0, 0.0, 1.0])
    # world_to_voxel takes world z onto b; the affine's rotation is its transpose.
    axis = np.cross(world_z, b)
    sine, cosine = np.linalg.norm(axis), float(np.dot(world_z, b))
    if sine < 1e-12:
        world_to_voxel = np.eye(3) if cosine > 0 else np.diag([1.0, -1.0, -1.0])
    else:
        k = axis / sine
        cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        world_to_voxel = np.eye(3) + sine * cross + (1.0 - cosine) * cross @ cross
    rotation = world_to_voxel.T
    affine = np.eye(4)
    affine[:3, :3] = rotation * voxel_size[None, :]
    if shape is not None:
        centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


# ---------------------------------------------------------------------------------------------
# BIDS writer


def default_demo_cohort(n_subjects: int = 4, *, min_age: float = 8.0, max_age: float = 80.0) -> list[dict]:
    """Subjects spread evenly over the lifespan for ``qsmflow demo``.

    Returns
    -------
    list of dicts with ``label`` ("01", "02", ...), ``age`` (years), ``sex`` ("F"/"M").
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if not 0 <= min_age <= max_age:
        raise ValueError("ages must satisfy 0 <= min_age <= max_age")
    ages = np.linspace(min_age, max_age, n_subjects) if n_subjects > 1 else np.array([min_age])
    width = max(2, len(str(n_subjects)))
    return [
        {"label": f"{i + 1:0{width}d}", "age": float(round(age, 1)), "sex": "F" if i % 2 == 0 else "M"}
        for i, age in enumerate(ages)
    ]


def lifespan_demo_cohort(n_subjects: int = 12, *, min_age: float = 1.0, max_age: float = 80.0, repeated: int = 3,
                         follow_up_years: float = 3.0) -> list[dict]:
    """A lifespan cohort for ``qsmflow demo``'s group level: ages spread over ``min_age``-``max_age``
    and ``repeated`` subjects (spread over the range) scanned twice, ``follow_up_years`` apart.

    Returns
    -------
    list of dicts for :func:`write_bids_dataset` with ``label``, ``age`` (first session), ``sex``
    and ``sessions`` (``{"1": age}`` or ``{"1": age, "2": age + follow_up_years}``).
    """
    cohort = default_demo_cohort(n_subjects, min_age=min_age, max_age=max_age)
    twice = set(np.linspace(1, n_subjects - 2, repeated).round().astype(int)) if repeated and n_subjects > 2 else set()
    for index, subject in enumerate(cohort):
        subject["sessions"] = {"1": subject["age"]}
        if index in twice:
            subject["sessions"]["2"] = round(min(subject["age"] + follow_up_years, 120.0), 1)
    return cohort


_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def _clean_label(value, prefix: str) -> str:
    label = str(value)
    if label.startswith(prefix + "-"):
        label = label[len(prefix) + 1:]
    if not _LABEL.match(label):
        raise ValueError(f"{prefix} label must be alphanumeric, got {value!r}")
    return label


def _normalise_subjects(subjects, sessions) -> list[dict]:
    if not subjects:
        raise ValueError("subjects must list at least one (label, age) or dict")
    normalised = []
    for entry in subjects:
        if isinstance(entry, dict):
            if "label" not in entry or "age" not in entry:
                raise ValueError(f"subject dict needs 'label' and 'age': {entry!r}")
            spec = dict(entry)
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            spec = {"label": entry[0], "age": entry[1]}
        else:
            raise ValueError(f"subject must be (label, age) or a dict, got {entry!r}")
        spec["label"] = _clean_label(spec["label"], "sub")
        spec["age"] = float(spec["age"])
        if not 0 <= spec["age"] <= 120:
            raise ValueError(f"age of sub-{spec['label']} must be within 0..120, got {spec['age']}")
        spec.setdefault("sex", "n/a")
        spec.setdefault("seed", zlib.crc32(spec["label"].encode()) % (2**31))
        subject_sessions = spec.get("sessions", sessions)
        if subject_sessions is None:
            spec["sessions"] = {None: spec["age"]}
        elif isinstance(subject_sessions, dict):
            spec["sessions"] = {_clean_label(k, "ses"): float(v) for k, v in subject_sessions.items()}
        else:
            spec["sessions"] = {_clean_label(k, "ses"): spec["age"] for k in subject_sessions}
        if not spec["sessions"]:
            raise ValueError(f"sub-{spec['label']} has an empty session list")
        normalised.append(spec)
    labels = [s["label"] for s in normalised]
    if len(set(labels)) != len(labels):
        raise ValueError(f"subject labels must be unique, got {labels}")
    uses_sessions = {None in s["sessions"] for s in normalised}
    if len(uses_sessions) > 1:
        raise ValueError("either every subject has sessions or none has")
    return normalised


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_tsv(path: Path, header: list, rows: list) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("qsmflow")
    except Exception:  # not installed: running from a source tree
        return "0+unknown"


def write_bids_dataset(
    root,
    subjects,
    *,
    field_strength: float = 3.0,
    echo_times=DEFAULT_ECHO_TIMES,
    b0_direction=(0.0, 0.0, 1.0),
    shape=DEFAULT_SHAPE,
    voxel_size=DEFAULT_VOXEL_SIZE,
    snr: float = 100.0,
    sessions=None,
    air_chi: float = DEFAULT_AIR_CHI,
    shim_order: int | None = 1,
    anatomy: str = "phantom",
    atlas=None,
) -> Path:
    """Simulate subjects and write them as a raw BIDS dataset with ground-truth derivatives.

    Layout (``[_ses-Y]`` only when sessions are used)::

        dataset_description.json  README  participants.tsv  participants.json
        sub-X/[ses-Y/]anat/sub-X[_ses-Y]_echo-N_part-{mag,phase}_MEGRE.nii.gz (+ .json)
        sub-X/sub-X_sessions.tsv                                    (with sessions)
        derivatives/simulation/dataset_description.json
        derivatives/simulation/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_
            Chimap.nii.gz (ppm rel. CSF, 0 outside the brain)  desc-brain_mask.nii.gz
            dseg.nii.gz + dseg.tsv  desc-total_fieldmap.nii.gz  desc-local_fieldmap.nii.gz (ppm)
            R2starmap.nii.gz (1/s)  desc-truth_roistats.tsv          (+ .json sidecars)

    Parameters
    ----------
    root : path
        Dataset directory (created; existing subject files are overwritten).
    subjects : list
        ``(label, age)`` tuples or dicts with ``label``, ``age`` and optionally ``sex``, ``seed``,
        ``b0_direction`` and ``sessions`` (list of labels, or dict label -> age at that session).
    field_strength : float
        B0 in tesla.
    echo_times : sequence of floats
        Echo times in seconds.
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes, carried in each image's affine.
    shape, voxel_size
        Grid (see :func:`brain_phantom`).
    snr : float
        See :func:`simulate_multi_echo`.
    sessions : list of str, optional
        Session labels given to every subject (same age; new noise and phase offset per session).
    air_chi, shim_order
        See :func:`brain_phantom` and :func:`simulate_field`.
    anatomy : {"phantom", "template"}
        ``phantom``: :func:`brain_phantom` on the acquisition grid; ``template``: the MNI template's
        own anatomy (:func:`template_acquisition` of ``atlas``, default
        :func:`qsmflow.segmentation.default_atlas`), whose truth labels are the atlas' (left/right).

    Returns
    -------
    Path of ``root``.
    """
    if anatomy not in ("phantom", "template"):
        raise ValueError(f"anatomy must be 'phantom' or 'template', got {anatomy!r}")
    if anatomy == "template" and atlas is None:
        from .segmentation import default_atlas

        atlas = default_atlas()
    root = Path(root)
    specs = _normalise_subjects(subjects, sessions)
    echo_times = tuple(float(t) for t in echo_times)
    root.mkdir(parents=True, exist_ok=True)
    truth_root = root / "derivatives" / "simulation"
    truth_root.mkdir(parents=True, exist_ok=True)
    version = _package_version()

    _write_json(root / "dataset_description.json", {
        "Name": "qsmflow simulated multi-echo GRE cohort",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["qsmflow simulation"],
        "GeneratedBy": [{"Name": "qsmflow.simulate", "Version": version}],
    })
    (root / "README").write_text(
        "Simulated multi-echo gradient-echo data of a numerical head phantom made by\n"
        "qsmflow.simulate. Ground truth (susceptibility, masks, labels, fields) is in\n"
        "derivatives/simulation.\n"
    )
    _write_tsv(root / "participants.tsv", ["participant_id", "age", "sex"],
               [[f"sub-{s['label']}", f"{s['age']:g}", s["sex"]] for s in specs])
    _write_json(root / "participants.json", {
        "age": {"Description": "age of the participant (first session)", "Units": "year"},
        "sex": {"Description": "sex of the participant", "Levels": {"F": "female", "M": "male"}},
    })
    _write_json(truth_root / "dataset_description.json", {
        "Name": "qsmflow simulation ground truth",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmflow.simulate", "Version": version,
                         "Description": "brain phantom, dipole forward model, multi-echo GRE"}],
        "SourceDatasets": [{"URL": "../../"}],
    })

    for spec in specs:
        direction = _normalised_direction(spec.get("b0_direction", b0_direction))
        affine = affine_for_b0_direction(direction, voxel_size, shape)
        if None not in spec["sessions"]:
            subject_dir = root / f"sub-{spec['label']}"
            subject_dir.mkdir(parents=True, exist_ok=True)
            _write_tsv(subject_dir / f"sub-{spec['label']}_sessions.tsv", ["session_id", "age"],
                       [[f"ses-{k}", f"{v:g}"] for k, v in spec["sessions"].items()])
        for session_index, (session, age) in enumerate(spec["sessions"].items()):
            noise_seed = spec["seed"] + 7919 * (session_index + 1)
            if anatomy == "template":
                acquisition = template_acquisition(
                    atlas, age=age, seed=spec["seed"], shape=shape, voxel_size=voxel_size, echo_times=echo_times,
                    field_strength=field_strength, b0_direction=direction, snr=snr, noise_seed=noise_seed,
                    air_chi=air_chi, shim_order=shim_order)
                phantom, fields = acquisition.truth, acquisition.fields
                magnitude, phase = acquisition.magnitude, acquisition.phase
            else:
                phantom = brain_phantom(shape, voxel_size, age_years=age, seed=spec["seed"], air_chi=air_chi)
                fields = simulate_field(phantom, b0_direction=direction, shim_order=shim_order)
                magnitude, phase = simulate_multi_echo(
                    phantom, echo_times=echo_times, field_strength=field_strength, b0_direction=direction,
                    snr=snr, seed=noise_seed, field_ppm=fields.total)
            relative = Path(f"sub-{spec['label']}") / (f"ses-{session}" if session else "") / "anat"
            stem = f"sub-{spec['label']}" + (f"_ses-{session}" if session else "")
            anat = root / relative
            anat.mkdir(parents=True, exist_ok=True)
            common = {
                "MagneticFieldStrength": float(field_strength),
                "ImagingFrequency": round(GYROMAGNETIC_RATIO_MHZ_PER_T * field_strength, 6),
                "Manufacturer": "qsmflow simulation",
                "MRAcquisitionType": "3D",
                "RepetitionTime": round(max(echo_times) + 0.007, 6),
                "FlipAngle": 15,
            }
            for echo, te in enumerate(echo_times, start=1):
                for part, data, units in (("mag", magnitude, "arbitrary"), ("phase", phase, "rad")):
                    name = f"{stem}_echo-{echo}_part-{part}_MEGRE"
                    _save_nifti(anat / f"{name}.nii.gz", np.ascontiguousarray(data[..., echo - 1]), affine)
                    _write_json(anat / f"{name}.json", {"EchoTime": te, "Units": units, **common})

            truth = truth_root / relative
            truth.mkdir(parents=True, exist_ok=True)
            chi_brain = np.where(phantom.brain_mask, phantom.chi, np.float32(0.0)).astype(np.float32)
            outputs = {
                "Chimap": (chi_brain, {"Units": "ppm", "Description": "susceptibility relative to CSF"}),
                "desc-brain_mask": (phantom.brain_mask.astype(np.uint8), {"Type": "Brain"}),
                "dseg": (phantom.labels, {"Description": "bilateral ROI labels, see dseg.tsv"}),
                "desc-total_fieldmap": (fields.total, {
                    "Units": "ppm", "Description": f"total field after a shim of order {shim_order}"}),
                "desc-local_fieldmap": (fields.local, {
                    "Units": "ppm", "Description": "field of the brain's susceptibility (rel. CSF)"}),
                "R2starmap": (phantom.r2star, {"Units": "1/s"}),
            }
            for suffix, (data, sidecar) in outputs.items():
                _save_nifti(truth / f"{stem}_{suffix}.nii.gz", data, affine)
                _write_json(truth / f"{stem}_{suffix}.json", {
                    **sidecar, "AgeYears": age, "Seed": spec["seed"], "B0Direction": direction.tolist(),
                    "MagneticFieldStrength": float(field_strength), "AirSusceptibility": phantom.air_chi,
                })
            voxel_volume = float(np.prod(voxel_size))
            rows = []
            if anatomy == "template":
                _write_tsv(truth / f"{stem}_dseg.tsv", ["index", "name", "abbreviation", "hemisphere", "kind"],
                           [[r.index, r.name, r.abbreviation, r.hemisphere, r.kind] for r in atlas.table])
                for row in atlas.table:
                    if row.abbreviation not in TRUE_TRAJECTORIES:
                        continue
                    count = int(np.count_nonzero(phantom.labels == row.index))
                    rows.append([f"{row.abbreviation}_{row.hemisphere[0].upper()}", count, f"{count * voxel_volume:g}",
                                 f"{phantom.roi_chi[row.abbreviation]:.6f}",
                                 f"{true_susceptibility(row.abbreviation, age):.6f}"])
            else:
                _write_tsv(truth / f"{stem}_dseg.tsv", ["index", "name", "abbreviation", "kind"],
                           [[r.index, r.name, r.abbreviation, r.kind] for r in ROI_LABELS])
                for roi in ROI_LABELS:
                    count = int(np.count_nonzero(phantom.labels == roi.index))
                    rows.append([roi.abbreviation, count, f"{count * voxel_volume:g}",
                                 f"{phantom.roi_chi[roi.abbreviation]:.6f}",
                                 f"{true_susceptibility(roi.abbreviation, age):.6f}"])
            _write_tsv(truth / f"{stem}_desc-truth_roistats.tsv",
                       ["name", "voxels", "volume", "mean", "trajectory"], rows)
    return root


# ---------------------------------------------------------------------------------------------
# several head orientations (COSMOS)


def tilted_phantom(phantom: Phantom, head_rotation_degrees, affine, reference_affine) -> Phantom:
    """The phantom's head rotated inside the scanner and sampled on the grid of ``affine``.

    The head of ``phantom`` lies on the grid of ``reference_affine``; it is rotated by
    :func:`qsmflow.recon.cosmos.rotation_matrix` of ``head_rotation_degrees`` about the world
    origin (the grid centre of :func:`affine_for_b0_direction` grids) and resampled onto the grid
    of ``affine``: linear interpolation for chi, m0 and R2*, nearest for labels and tissue
    classes, masks where their interpolated fraction is at least one half. An axial ``affine``
    equal to ``reference_affine`` is a tilted head in an axial acquisition; a rotated ``affine`` is
    an oblique acquisition. Outside the reference grid each map takes its value at the nearest
    edge (air; the neck below).
    """
    from qsmflow.recon.cosmos import rotation_matrix

    rotation = np.eye(4)
    rotation[:3, :3] = rotation_matrix(head_rotation_degrees)
    # target voxel -> world -> head point in the reference world -> reference voxel
    voxel_map = np.linalg.inv(np.asarray(reference_affine, dtype=np.float64)) @ rotation.T @ np.asarray(affine, dtype=np.float64)

    def resample(array, order):
        return ndimage.affine_transform(array, voxel_map[:3, :3], offset=voxel_map[:3, 3], output_shape=phantom.shape,
                                        order=order, mode="nearest")

    def resample_mask(mask):
        return resample(mask.astype(np.float32), 1) >= 0.5

    return Phantom(
        chi=resample(phantom.chi, 1).astype(np.float32),
        brain_mask=resample_mask(phantom.brain_mask),
        head_mask=resample_mask(phantom.head_mask),
        labels=resample(phantom.labels, 0).astype(phantom.labels.dtype),
        label_names=dict(phantom.label_names),
        m0=resample(phantom.m0, 1).astype(np.float32),
        r2star=resample(phantom.r2star, 1).astype(np.float32),
        tissues=resample(phantom.tissues, 0).astype(phantom.tissues.dtype),
        voxel_size=phantom.voxel_size,
        age_years=phantom.age_years,
        seed=phantom.seed,
        air_chi=phantom.air_chi,
        roi_chi=dict(phantom.roi_chi),
        anatomy_scale=phantom.anatomy_scale,
    )


#: Head tilts (degrees about x, y, z) of the multi-orientation subject: neutral, then 15-25
#: degrees about two different axes, and a fourth combining both (Liu et al. 2009 tilted the
#: head within the coil by about 20 degrees).
DEFAULT_HEAD_ROTATIONS = ((0.0, 0.0, 0.0), (20.0, 0.0, 0.0), (0.0, -18.0, 0.0), (-15.0, 15.0, 0.0))


def write_multi_orientation_dataset(
    root,
    label: str = "01",
    age: float = 40.0,
    *,
    head_rotations=DEFAULT_HEAD_ROTATIONS[:3],
    acquisition_rotations=None,
    seed: int | None = None,
    field_strength: float = 3.0,
    echo_times=DEFAULT_ECHO_TIMES,
    shape=DEFAULT_SHAPE,
    voxel_size=DEFAULT_VOXEL_SIZE,
    snr: float = 100.0,
    supersampling: int = 2,
    air_chi: float = DEFAULT_AIR_CHI,
    shim_order: int | None = 1,
) -> Path:
    """Write one subject scanned in several head orientations as ``run-1..N`` of one session.

    The same head (:func:`brain_phantom`, built at ``supersampling`` times the resolution) is
    tilted inside the scanner by each of ``head_rotations`` (degrees about the scanner's x, y, z;
    :func:`tilted_phantom` on the fine grid) and acquired with :func:`simulate_acquisition`, so
    every run samples one continuous head (no interpolation of the coarse maps); B0 stays along
    scanner z. With ``acquisition_rotations`` omitted every run is an axial acquisition (identical
    affines); otherwise run ``i``'s field of view is rotated by ``acquisition_rotations[i]`` (an
    oblique acquisition, the rotation written in its affine). Each run's field is computed with B0
    in its own voxel axes (from its affine).

    Layout as :func:`write_bids_dataset`, with ``_run-N`` in every name; each truth sidecar in
    ``derivatives/simulation`` adds ``HeadRotationDegrees``, ``AcquisitionRotationDegrees`` and
    ``B0Direction`` (voxel axes). Run 1's truth is the reference head for COSMOS.

    Returns
    -------
    Path of ``root``.
    """
    from qsmflow.recon.cosmos import rotation_matrix
    from qsmflow.recon.dipole import b0_direction_from_affine

    root = Path(root)
    label = _clean_label(label, "sub")
    head_rotations = [tuple(float(a) for a in r) for r in head_rotations]
    if len(head_rotations) < 1:
        raise ValueError("head_rotations must list at least one orientation")
    if acquisition_rotations is None:
        acquisition_rotations = [(0.0, 0.0, 0.0)] * len(head_rotations)
    acquisition_rotations = [tuple(float(a) for a in r) for r in acquisition_rotations]
    if len(acquisition_rotations) != len(head_rotations):
        raise ValueError("acquisition_rotations must give one rotation per head rotation")
    factor = int(supersampling)
    shape = tuple(int(n) for n in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    seed = zlib.crc32(label.encode()) % (2**31) if seed is None else int(seed)
    echo_times = tuple(float(t) for t in echo_times)
    version = _package_version()
    truth_root = root / "derivatives" / "simulation"
    anat, truth = root / f"sub-{label}" / "anat", truth_root / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    _write_json(root / "dataset_description.json", {
        "Name": "qsmflow simulated multi-orientation GRE", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC0", "Authors": ["qsmflow simulation"],
        "GeneratedBy": [{"Name": "qsmflow.simulate", "Version": version}],
    })
    (root / "README").write_text(
        "Simulated multi-echo gradient-echo data of one numerical head phantom scanned in several\n"
        "head orientations (runs), made by qsmflow.simulate. Ground truth is in derivatives/simulation.\n")
    _write_tsv(root / "participants.tsv", ["participant_id", "age", "sex"], [[f"sub-{label}", f"{age:g}", "n/a"]])
    _write_json(truth_root / "dataset_description.json", {
        "Name": "qsmflow simulation ground truth", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmflow.simulate", "Version": version,
                         "Description": "brain phantom in several head orientations, supersampled dipole forward model"}],
        "SourceDatasets": [{"URL": "../../"}],
    })
    fine_shape, fine_voxel = tuple(n * factor for n in shape), tuple(v / factor for v in voxel_size)
    head = brain_phantom(fine_shape, fine_voxel, age_years=age, seed=seed, air_chi=air_chi)
    reference_affine = affine_for_b0_direction((0.0, 0.0, 1.0), voxel_size, shape)
    fine_reference = affine_for_b0_direction((0.0, 0.0, 1.0), fine_voxel, fine_shape)
    common = {
        "MagneticFieldStrength": float(field_strength),
        "ImagingFrequency": round(GYROMAGNETIC_RATIO_MHZ_PER_T * field_strength, 6),
        "Manufacturer": "qsmflow simulation", "MRAcquisitionType": "3D",
        "RepetitionTime": round(max(echo_times) + 0.007, 6), "FlipAngle": 15,
    }
    for run, (head_rotation, acquisition_rotation) in enumerate(zip(head_rotations, acquisition_rotations), start=1):
        tilt = rotation_matrix(acquisition_rotation)
        affine, fine_affine = reference_affine.copy(), fine_reference.copy()
        affine[:3, :] = tilt @ reference_affine[:3, :]
        fine_affine[:3, :] = tilt @ fine_reference[:3, :]
        direction = b0_direction_from_affine(affine)
        acquisition = simulate_acquisition(
            shape, voxel_size, seed=seed + 7919 * run, echo_times=echo_times, field_strength=field_strength,
            b0_direction=direction, snr=snr, supersampling=factor, shim_order=shim_order,
            fine_phantom=tilted_phantom(head, head_rotation, fine_affine, fine_reference))
        phantom, fields = acquisition.truth, acquisition.fields
        stem = f"sub-{label}_run-{run}"
        for echo, te in enumerate(echo_times, start=1):
            for part, data, units in (("mag", acquisition.magnitude, "arbitrary"), ("phase", acquisition.phase, "rad")):
                name = f"{stem}_echo-{echo}_part-{part}_MEGRE"
                _save_nifti(anat / f"{name}.nii.gz", np.ascontiguousarray(data[..., echo - 1]), affine)
                _write_json(anat / f"{name}.json", {"EchoTime": te, "Units": units, **common})
        chi_brain = np.where(phantom.brain_mask, phantom.chi, np.float32(0.0)).astype(np.float32)
        outputs = {
            "Chimap": (chi_brain, {"Units": "ppm", "Description": "susceptibility relative to CSF"}),
            "desc-brain_mask": (phantom.brain_mask.astype(np.uint8), {"Type": "Brain"}),
            "dseg": (phantom.labels, {"Description": "bilateral ROI labels"}),
            "desc-local_fieldmap": (fields.local, {"Units": "ppm", "Description": "field of the brain's susceptibility"}),
        }
        for suffix, (data, sidecar) in outputs.items():
            _save_nifti(truth / f"{stem}_{suffix}.nii.gz", data, affine)
            _write_json(truth / f"{stem}_{suffix}.json", {
                **sidecar, "AgeYears": age, "Seed": seed, "B0Direction": direction.tolist(),
                "HeadRotationDegrees": list(head_rotation), "AcquisitionRotationDegrees": list(acquisition_rotation),
                "Supersampling": factor, "MagneticFieldStrength": float(field_strength),
                "AirSusceptibility": phantom.air_chi,
            })
    return root


# ---------------------------------------------------------------------------------------------
# known deformations and a cohort for the atlas


@dataclass
class Deformation:
    """A known spatial transform of a grid: output voxel i takes the input at ``coordinates[:, i]``.

    Attributes
    ----------
    coordinates : float32 array (3, nx, ny, nz)
        Input voxel coordinates sampled by each output voxel (a pull-back map).
    rms_nonlinear_mm : float
        RMS over the grid of the nonlinear part's displacement (mm).
    rotation_degrees, translation_mm, scale : tuple
        The affine part (about the grid centre).
    """

    coordinates: np.ndarray
    rms_nonlinear_mm: float
    rotation_degrees: tuple
    translation_mm: tuple
    scale: tuple

    def apply(self, array: np.ndarray, *, labels: bool = False) -> np.ndarray:
        """``array`` deformed (linear interpolation; nearest neighbour for ``labels``)."""
        order = 0 if labels else 1
        result = ndimage.map_coordinates(np.asarray(array, dtype=np.float32 if not labels else array.dtype),
                                         self.coordinates, order=order, mode="constant", cval=0)
        return result.astype(array.dtype if labels else np.float32)


def random_deformation(shape, voxel_size, *, seed: int = 0, rotation_degrees: float = 4.0,
                       translation_mm: float = 4.0, scale_sd: float = 0.03, nonlinear_rms_mm: float = 3.0,
                       smoothness_mm: float = 20.0) -> Deformation:
    """Random affine plus smooth nonlinear deformation of a grid, with known parameters.

    Rotations about each axis uniform in ±``rotation_degrees``, translations uniform in
    ±``translation_mm``, scales normal(1, ``scale_sd``) per axis, about the grid centre; then a
    displacement field of Gaussian-smoothed white noise (``smoothness_mm`` sigma) rescaled to an
    RMS of ``nonlinear_rms_mm`` over the grid.

    Returns
    -------
    Deformation (a pull-back map: apply it to the phantom's arrays).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    voxel = np.asarray(voxel_size, dtype=np.float64)
    angles = np.deg2rad(rng.uniform(-rotation_degrees, rotation_degrees, 3))
    translation = rng.uniform(-translation_mm, translation_mm, 3)
    scales = rng.normal(1.0, scale_sd, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rotation = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
                @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    linear = rotation @ np.diag(scales)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    mm = (grid - centre[:, None, None, None].astype(np.float32)) * voxel[:, None, None, None].astype(np.float32)
    # Pull-back: the output at mm position p samples the input at L^-1 (p - t).
    inverse = np.linalg.inv(linear).astype(np.float32)
    source = np.einsum("ij,j...->i...", inverse, mm - translation[:, None, None, None].astype(np.float32))
    sigma = [smoothness_mm / v for v in voxel]
    displacement = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
                             for _ in range(3)])
    rms = float(np.sqrt(np.mean(np.sum(displacement**2, axis=0))))
    if nonlinear_rms_mm > 0 and rms > 0:
        displacement *= np.float32(nonlinear_rms_mm / rms)
    else:
        displacement[:] = 0
    source = source + displacement
    coordinates = source / voxel[:, None, None, None].astype(np.float32) + centre[:, None, None, None].astype(np.float32)
    return Deformation(coordinates=coordinates.astype(np.float32),
                       rms_nonlinear_mm=float(np.sqrt(np.mean(np.sum(displacement**2, axis=0)))),
                       rotation_degrees=tuple(np.rad2deg(angles).round(3).tolist()),
                       translation_mm=tuple(translation.round(3).tolist()), scale=tuple(scales.round(4).tolist()))


@dataclass
class AtlasSubject:
    """One simulated scan of an atlas cohort, deformed by a known transform.

    ``chi`` (ppm rel. CSF, noisy, 0 outside the brain), ``magnitude`` (first echo), ``brain_mask``,
    ``labels`` (true ROI labels carried by the known deformation), ``phantom`` (undeformed truth).
    """

    label: str
    age: float
    chi: np.ndarray
    magnitude: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    deformation: Deformation
    phantom: Phantom


def simulate_atlas_subject(label: str, age: float, *, shape=DEFAULT_SHAPE, voxel_size=DEFAULT_VOXEL_SIZE,
                           seed: int | None = None, chi_noise: float = 0.01, snr: float = 50.0,
                           echo_time: float = DEFAULT_ECHO_TIMES[0], nonlinear_rms_mm: float = 3.0,
                           psf_voxels: float = 0.6, deformation: bool = True,
                           sulcal_seed: int | None = None) -> AtlasSubject:
    """A subject's participant-level outputs as the atlas level reads them, with their truth.

    The phantom grows with age (:func:`head_size_for_age`; ventricles widen after 30, see
    :func:`brain_phantom`), is deformed by :func:`random_deformation` (seeded by the subject) and
    given Gaussian noise: ``chi_noise`` ppm on the susceptibility (a reconstructed Chimap's
    noise), and the first-echo magnitude ``m0 exp(-R2* TE)`` with noise of mean brain signal /
    ``snr``. The images are blurred by a Gaussian point-spread function of ``psf_voxels`` sigma
    before the deformation, as an acquisition band-limits them: the phantom's one-voxel sulci
    and cortex would otherwise be aliased, and no resampling could match them. ``sulcal_seed``
    (:func:`brain_phantom`) gives the cohort one sulcal pattern in the anatomical frame.
    """
    seed = zlib.crc32(str(label).encode()) % (2**31) if seed is None else int(seed)
    phantom = brain_phantom(shape, voxel_size, age_years=age, seed=seed, growth_with_age=True, sulcal_seed=sulcal_seed)
    rng = np.random.default_rng(seed + 1)
    if deformation:
        warp = random_deformation(shape, voxel_size, seed=seed + 2, nonlinear_rms_mm=nonlinear_rms_mm)
    else:
        identity = np.indices(tuple(shape), dtype=np.float32)
        warp = Deformation(identity, 0.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mask = warp.apply(phantom.brain_mask.astype(np.float32)) >= 0.5
    def blurred(image):
        return ndimage.gaussian_filter(image.astype(np.float32), psf_voxels) if psf_voxels > 0 else image

    brain_chi = np.where(phantom.brain_mask, phantom.chi, np.float32(0.0))
    chi = warp.apply(blurred(brain_chi))
    chi = np.where(mask, chi + rng.normal(0.0, chi_noise, chi.shape).astype(np.float32), 0.0).astype(np.float32)
    signal = warp.apply(blurred(phantom.m0 * np.exp(-phantom.r2star * np.float32(echo_time))))
    sigma = float(signal[mask].mean()) / snr
    magnitude = np.abs(signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
                       + 1j * rng.normal(0.0, sigma, signal.shape).astype(np.float32)).astype(np.float32)
    labels = warp.apply(phantom.labels, labels=True)
    affine = affine_for_b0_direction((0.0, 0.0, 1.0), voxel_size, shape)
    return AtlasSubject(label=str(label), age=float(age), chi=chi, magnitude=magnitude, brain_mask=mask,
                        labels=labels, affine=affine, deformation=warp, phantom=phantom)


# ---------------------------------------------------------------------------------------------
# subjects made from the MNI template and the default atlas (ground truth for segmentation)


def receive_bias_field(shape, voxel_size, *, seed: int = 0, amplitude: float = 0.2,
                       smoothness_mm: float = 40.0) -> np.ndarray:
    """Smooth multiplicative receive-coil bias: ``exp(b)`` with ``b`` Gaussian-smoothed white noise
    (``smoothness_mm`` sigma) scaled so that its standard deviation over the grid is ``amplitude``
    (0.2 gives a field of roughly 0.7-1.4 across a head)."""
    rng = np.random.default_rng(seed)
    sigma = [smoothness_mm / float(v) for v in voxel_size]
    field_ = ndimage.gaussian_filter(rng.standard_normal(tuple(int(n) for n in shape)).astype(np.float32), sigma,
                                     mode="reflect")
    field_ -= field_.mean()
    field_ *= np.float32(amplitude / max(float(field_.std()), 1e-12))
    return np.exp(field_).astype(np.float32)


@dataclass
class TemplateSubject:
    """A subject made from the MNI template and the default atlas, deformed by a known transform.

    ``magnitude`` (x, y, z, echo; with receive bias and Rician noise), ``chi`` (true susceptibility,
    ppm rel. CSF, noise-free, 0 outside the brain), ``labels`` (the atlas labels carried by the
    true deformation: the truth dseg), ``brain_mask``, ``affine`` (subject grid), ``deformation``
    (subject voxel -> reference-grid voxel), ``roi_chi`` (label value -> true susceptibility).
    """

    magnitude: np.ndarray
    chi: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    deformation: Deformation
    roi_chi: dict
    age: float


def atlas_coordinates(deformation: Deformation, affine, atlas_affine) -> np.ndarray:
    """Atlas voxel coordinates (3, x, y, z) of every subject voxel: the subject voxel through
    ``deformation`` to the reference grid, to world by the subject ``affine``, to the atlas' voxels."""
    to_atlas = np.linalg.inv(np.asarray(atlas_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    return (np.einsum("ij,j...->i...", to_atlas[:3, :3].astype(np.float32), deformation.coordinates)
            + to_atlas[:3, 3].astype(np.float32)[:, None, None, None])


def template_subject(atlas, *, voxel_size=(2.0, 2.0, 2.0), age: float = 40.0, seed: int = 0,
                     nonlinear_rms_mm: float = 3.5, bias_amplitude: float = 0.2, snr: float = 40.0,
                     echo_times=DEFAULT_ECHO_TIMES, margin_mm: float = 8.0) -> TemplateSubject:
    """Simulate a subject from a template and its labels (e.g. :func:`qsmflow.segmentation.build_default_atlas`).

    The phantom's anatomy *is* the atlas' (so that registering the template to it has a right
    answer): template grey/white/CSF fractions become proton density (:data:`TISSUES`: cortex
    0.85, white matter 0.72, deep grey 0.8, CSF 0.95) and susceptibility (cortex
    :data:`CORTEX_CHI`, white matter the background trajectory, each ROI label its
    :data:`TRUE_TRAJECTORIES` value at ``age``; CSF 0); R2* rises with iron as in
    :func:`brain_phantom`. The subject grid covers the template brain at ``voxel_size``; every
    subject voxel samples the 1 mm template maps (after a Gaussian point-spread function of the
    subject voxel) through a :func:`random_deformation` (random affine plus a smooth nonlinear
    warp of ``nonlinear_rms_mm`` RMS), labels by nearest neighbour. The magnitude is the
    first echo times a :func:`receive_bias_field`, with Rician noise of mean brain signal / ``snr``.
    The GRE-like contrast (CSF bright, grey above white matter, iron-rich nuclei dark at later
    echoes) differs from the template's T1w. ``magnitude`` has one volume per echo time (last axis).
    """
    atlas_affine = np.asarray(atlas.affine, dtype=np.float64)
    atlas_voxel = np.sqrt((atlas_affine[:3, :3] ** 2).sum(axis=0))
    voxel_size = np.asarray(voxel_size, dtype=np.float64)
    where = np.nonzero(atlas.brain_mask)
    low = np.array([w.min() for w in where]) - margin_mm / atlas_voxel
    high = np.array([w.max() for w in where]) + margin_mm / atlas_voxel
    world_low = atlas_affine[:3, :3] @ low + atlas_affine[:3, 3]
    world_high = atlas_affine[:3, :3] @ high + atlas_affine[:3, 3]
    start = np.minimum(world_low, world_high)
    extent = np.abs(world_high - world_low)
    shape = tuple(int(np.ceil(e / v)) + 1 for e, v in zip(extent, voxel_size))
    affine = np.diag(list(voxel_size) + [1.0])
    affine[:3, 3] = start

    # Template-space maps at 1 mm.
    import nibabel as nib

    from .segmentation import installed_atlas_files

    files = installed_atlas_files()
    grey = np.asarray(nib.load(str(files["grey_matter"])).dataobj, dtype=np.float32) / 255.0
    white = np.asarray(nib.load(str(files["white_matter"])).dataobj, dtype=np.float32) / 255.0
    if grey.shape != atlas.labels.shape:
        raise ValueError("template_subject needs the default atlas' grid (ICBM 2009a, 1 mm)")
    brain = atlas.brain_mask
    csf = np.clip(1.0 - grey - white, 0.0, 1.0) * brain
    roi_chi = {}
    rois = atlas.labels > 0
    deep = np.zeros(grey.shape, bool)
    wm_chi = float(_curve(BACKGROUND_WHITE_MATTER_TRAJECTORY, age))
    chi_t = (CORTEX_CHI * grey + wm_chi * white).astype(np.float32)
    m0_t = (_TISSUE["cortex"].m0 * grey + _TISSUE["white_matter"].m0 * white + _TISSUE["csf"].m0 * csf).astype(np.float32)
    r2_t = (_TISSUE["cortex"].r2star * grey + _TISSUE["white_matter"].r2star * white + _TISSUE["csf"].r2star * csf).astype(np.float32)
    for row in atlas.table:
        where_label = atlas.labels == row.index
        if not where_label.any():
            continue
        value = true_susceptibility(row.abbreviation, age) if row.abbreviation in TRUE_TRAJECTORIES else 0.0
        roi_chi[row.index] = float(value)
        chi_t[where_label] = value
        if row.kind == "deep_grey":
            deep |= where_label
            m0_t[where_label] = _TISSUE["deep_grey"].m0
            r2_t[where_label] = _TISSUE["deep_grey"].r2star + R2STAR_PER_PPM_IRON * max(value, 0.0)
        elif row.kind == "csf":
            m0_t[where_label] = _TISSUE["csf"].m0
            r2_t[where_label] = _TISSUE["csf"].r2star
    del rois, deep
    chi_t[~brain] = 0.0
    m0_t[~brain] = 0.0
    psf = [0.42 * v / a for v, a in zip(voxel_size, atlas_voxel)]  # FWHM of about one subject voxel
    echo_times = [float(t) for t in np.atleast_1d(echo_times)]
    signals_t = [ndimage.gaussian_filter(m0_t * np.exp(-r2_t * np.float32(te)), psf) for te in echo_times]
    chi_t = ndimage.gaussian_filter(chi_t, psf)

    warp = random_deformation(shape, voxel_size, seed=seed, nonlinear_rms_mm=nonlinear_rms_mm)
    coordinates = atlas_coordinates(warp, affine, atlas_affine)

    def sample(array, order):
        return ndimage.map_coordinates(array, coordinates, order=order, mode="constant", cval=0)

    labels = sample(atlas.labels, 0).astype(np.int16)
    brain_mask = sample(brain.astype(np.uint8), 0) > 0
    chi = np.where(brain_mask, sample(chi_t, 1), 0.0).astype(np.float32)
    bias = receive_bias_field(shape, voxel_size, seed=seed + 1, amplitude=bias_amplitude)
    signals = [sample(signal_t, 1) * bias for signal_t in signals_t]
    rng = np.random.default_rng(seed + 2)
    sigma = float(signals[0][brain_mask].mean()) / snr
    magnitude = np.stack([np.abs(signal + rng.normal(0.0, sigma, shape) + 1j * rng.normal(0.0, sigma, shape))
                          for signal in signals], axis=-1).astype(np.float32)
    return TemplateSubject(magnitude=magnitude, chi=chi, labels=labels, brain_mask=brain_mask, affine=affine,
                           deformation=warp, roi_chi=roi_chi, age=float(age))


def template_acquisition(atlas, *, age: float, seed: int = 0, shape=(60, 72, 60), voxel_size=(3.0, 3.0, 3.0),
                         supersampling: int = 2, echo_times=DEFAULT_ECHO_TIMES, field_strength: float = 3.0,
                         b0_direction=(0.0, 0.0, 1.0), snr: float = 100.0, noise_seed: int | None = None,
                         air_chi: float = DEFAULT_AIR_CHI, bone_chi: float = DEFAULT_BONE_CHI,
                         skull_mm: float = 8.0, shim_order: int | None = 1, nonlinear_rms_mm: float = 3.5,
                         bias_amplitude: float = 0.2) -> Acquisition:
    """Multi-echo GRE of a subject made from the MNI template, sized for its age (the demo's lifespan cohort).

    The brain is :func:`template_subject` of ``atlas`` at ``age`` (every ROI label at its
    :data:`TRUE_TRAJECTORIES` value, white matter on the background trajectory, CSF 0; deformed by
    a :func:`random_deformation` seeded by ``seed``, so that a subject's sessions share one anatomy),
    simulated noise-free on a grid ``supersampling`` times finer than the acquisition. Its linear
    size is :func:`head_size_for_age` of the adult template's: the fine voxel is declared
    ``voxel_size / supersampling`` although the brain was sampled at that size divided by the
    head-size factor. The brain sits centred in the grid inside a skull shell of ``skull_mm``
    (``bone_chi``, no signal) surrounded by air (``air_chi``; by default both scaled by
    :data:`BACKGROUND_SCALE`, as the demo's phantom), above a neck that continues the brainstem
    (susceptibility 0, no signal). The field of the whole head
    (:func:`simulate_field`, shim of ``shim_order`` over the brain) and the complex signal are
    computed on the fine grid and averaged over each acquisition voxel; the smooth phase offset
    and complex Gaussian noise (mean brain first-echo signal / ``snr``, seeded by ``noise_seed``)
    are added on the acquisition grid, as in :func:`simulate_acquisition`.

    Returns
    -------
    Acquisition
        ``truth`` on the acquisition grid: ``chi`` (ppm rel. CSF, 0 outside the brain),
        ``brain_mask``, ``labels`` (``atlas`` label values by majority of sub-voxels),
        ``m0`` (noise-free first-echo signal), ``r2star`` (1/s, from the noise-free first two
        echoes), ``tissues`` (0 air, 2 neck, 3 skull, 7 brain), ``roi_chi`` (abbreviation -> true value).
    """
    factor = int(supersampling)
    if factor != supersampling or factor < 1:
        raise ValueError(f"supersampling must be a positive integer, got {supersampling!r}")
    shape = tuple(int(n) for n in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    echo_times = tuple(float(t) for t in np.atleast_1d(echo_times))
    if len(echo_times) < 2:
        raise ValueError("template_acquisition needs at least two echo times (R2* of the truth)")
    direction = tuple(float(v) for v in _normalised_direction(b0_direction))
    fine_shape = tuple(n * factor for n in shape)
    fine_voxel = tuple(v / factor for v in voxel_size)
    scale = head_size_for_age(age)
    subject = template_subject(atlas, voxel_size=tuple(v / scale for v in fine_voxel), age=age, seed=seed,
                               nonlinear_rms_mm=nonlinear_rms_mm, bias_amplitude=bias_amplitude, snr=np.inf,
                               echo_times=echo_times)
    if any(n > m for n, m in zip(subject.chi.shape, fine_shape)):
        raise ValueError(f"the grid {shape} of {voxel_size} mm is too small for the template head at age {age} "
                         f"(needs {[int(np.ceil(n / factor)) for n in subject.chi.shape]} voxels)")
    start = [(m - n) // 2 for n, m in zip(subject.chi.shape, fine_shape)]
    window = tuple(slice(s, s + n) for s, n in zip(start, subject.chi.shape))

    def placed(array, dtype):
        out = np.zeros(fine_shape + array.shape[3:], dtype=dtype)
        out[window] = array
        return out

    brain = placed(subject.brain_mask, bool)
    labels = placed(subject.labels, np.int16)
    signal = placed(subject.magnitude, np.float32)
    # The skull: voxels within skull_mm of the brain (chamfer-like steps of the 18-neighbourhood).
    steps = max(1, int(round(skull_mm / min(fine_voxel))))
    skull = ndimage.binary_dilation(brain, structure=ndimage.generate_binary_structure(3, 2), iterations=steps) & ~brain
    # The neck: the brain's lowest slice extended to the bottom of the grid, as soft tissue (chi 0, no
    # signal), so that the cut through the brainstem is no surface source of field.
    lowest = int(np.nonzero(brain.any(axis=(0, 1)))[0][0])
    neck = np.zeros_like(brain)
    neck[:, :, :lowest] = brain[:, :, lowest:lowest + 1]
    skull &= ~neck
    chi = np.where(brain | neck, placed(subject.chi, np.float32), np.float32(air_chi))
    chi[neck] = 0.0
    chi[skull] = bone_chi
    tissues = np.select([brain, skull, neck], [np.int8(7), np.int8(3), np.int8(2)], np.int8(0)).astype(np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2star = np.where(signal[..., 1] > 0, np.log(signal[..., 0] / signal[..., 1]) / (echo_times[1] - echo_times[0]),
                          0.0).astype(np.float32)
    names = {row.index: row.abbreviation for row in atlas.table}
    fine = Phantom(chi=chi.astype(np.float32), brain_mask=brain, head_mask=brain | skull | neck, labels=labels,
                   label_names=names, m0=signal[..., 0], r2star=r2star, tissues=tissues, voxel_size=fine_voxel,
                   age_years=float(age), seed=int(seed), air_chi=float(air_chi),
                   roi_chi={names[k]: v for k, v in subject.roi_chi.items()}, anatomy_scale=scale)
    fine_fields = simulate_field(fine, b0_direction=direction, shim_order=shim_order, padding=max(fine_shape) // 4)
    field_hz = ppm_to_hz(fine_fields.total, field_strength).astype(np.float32)
    truth = Phantom(
        chi=_block_mean(np.where(brain, fine.chi, np.float32(0.0)), factor),
        brain_mask=_block_mean(brain.astype(np.float32), factor) >= 0.5,
        head_mask=_block_mean(fine.head_mask.astype(np.float32), factor) >= 0.5,
        labels=_block_majority(labels, factor), label_names=names, m0=_block_mean(fine.m0, factor),
        r2star=_block_mean(r2star, factor), tissues=_block_majority(tissues, factor), voxel_size=voxel_size,
        age_years=float(age), seed=int(seed), air_chi=float(air_chi), roi_chi=dict(fine.roi_chi), anatomy_scale=scale)
    fields = FieldMaps(*(_block_mean(f, factor) for f in (fine_fields.total, fine_fields.local, fine_fields.background)))

    rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
    offset = _phase_offset(shape, rng)
    sigma = float(truth.m0[truth.brain_mask].mean()) / snr if np.isfinite(snr) else 0.0
    magnitude, phase = _supersampled_echoes(lambda echo, te: signal[..., echo], field_hz, echo_times, factor,
                                            offset=offset, sigma=sigma, rng=rng)
    return Acquisition(magnitude=magnitude, phase=phase, truth=truth, fields=fields, echo_times=echo_times,
                       field_strength=float(field_strength), b0_direction=direction, supersampling=factor)


def split_hemispheres(labels, affine) -> np.ndarray:
    """The phantom's bilateral ROI labels as the default atlas' left/right values
    (:func:`qsmflow.segmentation.label_index`), split at world x = 0 (RAS, left x < 0)."""
    from .segmentation import label_index

    labels = np.asarray(labels)
    world_x = np.asarray(affine)[0, 0] * np.arange(labels.shape[0]) + np.asarray(affine)[0, 3]
    left = (world_x < 0)[:, None, None]
    split = np.zeros(labels.shape, dtype=np.int16)
    for roi in ROI_LABELS:
        where = labels == roi.index
        split[where & left] = label_index(roi.abbreviation, "left")
        split[where & ~left] = label_index(roi.abbreviation, "right")
    return split


def phantom_label_atlas(shape=DEFAULT_SHAPE, voxel_size=DEFAULT_VOXEL_SIZE, *, age_years: float = 40.0,
                        echo_time: float = DEFAULT_ECHO_TIMES[0], psf_voxels: float = 0.6):
    """The nominal phantom as a labelled template (a stand-in for the MNI atlas in simulations).

    Template: the first-echo magnitude of the undeformed adult phantom (brain only, nominal
    size and position, Gaussian point-spread of ``psf_voxels``); labels: its ROIs split into
    left and right at x = 0 with the default atlas' label values
    (:func:`qsmflow.segmentation.label_index`) and table.

    Returns
    -------
    qsmflow.segmentation.Atlas
    """
    from .segmentation import Atlas, default_table

    phantom = brain_phantom(shape, voxel_size, age_years=age_years, seed=0, anatomical_variation=False,
                            deep_grey_sd=0.0, white_matter_sd=0.0)
    affine = affine_for_b0_direction((0.0, 0.0, 1.0), voxel_size, shape)
    signal = np.where(phantom.brain_mask, phantom.m0 * np.exp(-phantom.r2star * np.float32(echo_time)), 0.0)
    if psf_voxels > 0:
        signal = ndimage.gaussian_filter(signal.astype(np.float32), psf_voxels)
    labels = split_hemispheres(phantom.labels, affine)
    present = set(np.unique(labels).tolist())
    table = tuple(row for row in default_table() if row.index in present)
    return Atlas(template=signal.astype(np.float32), brain_mask=phantom.brain_mask.copy(), labels=labels,
                 affine=affine, table=table, name="phantom")


def write_atlas_inputs(bids_dir, output_dir, subjects, *, shape=DEFAULT_SHAPE, voxel_size=DEFAULT_VOXEL_SIZE,
                       overwrite: bool = False, **options) -> dict:
    """Participant-level outputs of a simulated atlas cohort, as the atlas level reads them.

    Writes ``bids_dir`` (dataset_description.json, participants.tsv with ages) and, in the
    derivatives ``output_dir``, per subject ``anat/sub-X_Chimap.nii.gz``,
    ``anat/sub-X_desc-brain_mask.nii.gz`` and ``fmap/sub-X_magnitude.nii.gz``
    (:func:`simulate_atlas_subject`), plus the truth ``anat/sub-X_desc-truth_dseg.nii.gz`` (the
    phantom's labels carried by the known deformation; left/right as the default atlas).

    Parameters
    ----------
    subjects : list of (label, age)
    overwrite : bool
        Rewrite a subject whose Chimap exists (default: leave its files, so that adding a subject
        to a cohort changes no other subject's files).
    options : passed to :func:`simulate_atlas_subject`

    Returns
    -------
    dict label -> AtlasSubject
    """
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    _write_json(bids_dir / "dataset_description.json", {"Name": "qsmflow simulated atlas cohort",
                                                        "BIDSVersion": BIDS_VERSION, "DatasetType": "raw"})
    _write_tsv(bids_dir / "participants.tsv", ["participant_id", "age"],
               [[f"sub-{label}", f"{age:g}"] for label, age in subjects])
    made = {}
    for label, age in subjects:
        subject = simulate_atlas_subject(label, age, shape=shape, voxel_size=voxel_size, **options)
        made[label] = subject
        anat = output_dir / f"sub-{label}" / "anat"
        fmap = output_dir / f"sub-{label}" / "fmap"
        if (anat / f"sub-{label}_Chimap.nii.gz").is_file() and not overwrite:
            continue
        anat.mkdir(parents=True, exist_ok=True)
        fmap.mkdir(parents=True, exist_ok=True)
        truth = split_hemispheres(subject.labels, subject.affine)
        _save_nifti(anat / f"sub-{label}_Chimap.nii.gz", subject.chi, subject.affine)
        _save_nifti(anat / f"sub-{label}_desc-brain_mask.nii.gz", subject.brain_mask.astype(np.uint8), subject.affine)
        _save_nifti(anat / f"sub-{label}_desc-truth_dseg.nii.gz", truth, subject.affine)
        _save_nifti(fmap / f"sub-{label}_magnitude.nii.gz", subject.magnitude, subject.affine)
        # sidecars as the participant level writes them, so the folder is a valid derivatives dataset
        _write_json(anat / f"sub-{label}_Chimap.json", {"Units": "ppm", "SkullStripped": False})
        _write_json(fmap / f"sub-{label}_magnitude.json", {"Units": "arbitrary", "SkullStripped": False})
    return made
