"""Image registration with ANTs (antspyx): rigid, affine and SyN, and applying the transforms.

Plain functions on images: numpy arrays with a NIfTI affine (:func:`to_ants` / :func:`to_array`
convert) or ``ants.ANTsImage``; no nipype, no file names other than the transform files.

The registration is one ``antsRegistration`` run (the program behind ``ants.registration``,
called through antspyx's library entry point so that every stage gets its own metric and
schedule) of up to three stages, rigid → affine → SyN, as ANTs' ``antsRegistrationSyN.sh``
recipe does, with the moving image first aligned to the fixed one by their centres of mass.
The transforms are written as ITK composite HDF5 files (``Composite.h5`` maps the moving image
into the fixed image's space; ``InverseComposite.h5`` the other way), the files fMRIPrep names
``_from-<moving>_to-<fixed>_mode-image_xfm.h5``.

Usage (other parts of qsmflow call these)::

    from qsmflow import registration
    fixed = registration.to_ants(subject_array, subject_affine)
    moving = registration.to_ants(template_array, template_affine)
    result = registration.register(fixed, moving, transform="syn", output_dir=".", threads=2)
    warped = registration.apply_transform(fixed, moving, result.forward)          # linear
    labels = registration.apply_transform(fixed, template_labels, result.forward,
                                          interpolation="genericLabel")          # labels
    back = registration.apply_transform(moving, subject_chi, result.inverse)     # to template

    rigid = registration.register(fixed, moving, transform="rigid")             # e.g. COSMOS
    # multichannel: a second pair (e.g. subject Chimap, template-space prior) in the SyN stage
    both = registration.register(fixed, moving, channels=[registration.Channel(chi, prior, weight=0.5)])

The antsRegistration child process is killed by Linux when the process that started it dies
(``PR_SET_PDEATHSIG``), so a killed run leaves no registration running.

References
----------
Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with
cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain. Med
Image Anal 2008;12:26-41 (SyN).
Avants BB, Tustison NJ, Song G, et al. A reproducible evaluation of ANTs similarity metric
performance in brain image registration. NeuroImage 2011;54:2033-2044 (metrics, MI across
contrasts).
Mattes D, Haynor DR, Vesselle H, et al. PET-CT image registration in the chest using free-form
deformations. IEEE Trans Med Imaging 2003;22:120-128 (Mattes mutual information).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

#: Transform stages in the order they run.
STAGE_ORDER = ("rigid", "affine", "syn")
#: Which stages each ``transform`` choice of :func:`register` runs.
TRANSFORM_STAGES = {"rigid": ("rigid",), "affine": ("rigid", "affine"), "syn": ("rigid", "affine", "syn")}
#: Interpolations :func:`apply_transform` accepts (ANTs names). Labels: ``genericLabel`` or
#: ``nearestNeighbor``, never a linear one.
INTERPOLATIONS = ("linear", "bSpline", "lanczosWindowedSinc", "nearestNeighbor", "genericLabel")
LABEL_INTERPOLATIONS = ("nearestNeighbor", "genericLabel")
METRICS = ("mattes", "mi", "cc", "meansquares", "cc+mattes")
DEFAULT_SEED = 20240601


@dataclass(frozen=True)
class Stage:
    """One stage of the registration (``antsRegistration`` options of that stage).

    Attributes
    ----------
    metric : {"mattes", "mi", "cc", "meansquares", "cc+mattes"}
        Similarity metric. Mattes mutual information works across contrasts (template T1w to a
        GRE magnitude); neighbourhood cross-correlation (``cc``, squared, so locally invariant to
        a contrast's sign) follows local detail; ``cc+mattes`` weighs both equally.
    metric_parameter : int
        Histogram bins (``mattes``/``mi``) or neighbourhood radius in voxels (``cc``).
    sampling_rate : float
        Fraction of voxels sampled on a regular grid by the linear stages' metric (1 = all).
    gradient_step : float
        Step of the optimiser (``Rigid[step]``, ``Affine[step]``, ``SyN[step, ...]``).
    iterations : tuple of int
        Iterations per resolution level, coarse to fine.
    shrink_factors, smoothing_sigmas : tuple
        Down-sampling factor and Gaussian sigma (voxels) of each level.
    convergence_threshold, convergence_window : float, int
        Stop a level when the metric changed less than the threshold over the window.
    update_sigma, total_sigma : float
        SyN only: Gaussian regularisation (voxels) of the update and total deformation field.
    """

    metric: str = "mattes"
    metric_parameter: int = 32
    sampling_rate: float = 0.25
    gradient_step: float = 0.1
    iterations: tuple = (1000, 500, 250, 0)
    shrink_factors: tuple = (8, 4, 2, 1)
    smoothing_sigmas: tuple = (3, 2, 1, 0)
    convergence_threshold: float = 1e-6
    convergence_window: int = 10
    update_sigma: float = 3.0
    total_sigma: float = 0.0


#: Stage settings of ANTs' ``antsRegistrationSyNQuick.sh`` recipe (rigid and affine: MI, 32
#: bins, 25 % regular sampling, 1000x500x250x0 iterations at shrink 8x4x2x1; SyN: MI with
#: SyN[0.1,3,0] and 100x70x50x0), which uses mutual information also in the SyN stage and so
#: suits a T1w template registered to a GRE magnitude.
DEFAULT_STAGES = {
    "rigid": Stage(),
    "affine": Stage(),
    "syn": Stage(iterations=(100, 70, 50, 0), sampling_rate=1.0),
}


@dataclass
class Registration:
    """Result of :func:`register`.

    Attributes
    ----------
    forward : list of str
        Transform files that resample the *moving* image into the *fixed* image's space
        (``apply_transform(fixed, moving_image, forward)``); fMRIPrep's
        ``from-<moving>_to-<fixed>``.
    inverse : list of str
        Transform files that resample an image in the fixed space into the moving space.
    warped : ants.ANTsImage
        The moving image resampled into the fixed space (linear interpolation).
    stages : dict
        Stage name -> effective :class:`Stage` settings, for provenance.
    seed, threads : int
        Random seed and ITK threads the registration ran with.
    """

    forward: list
    inverse: list
    warped: object
    stages: dict = field(default_factory=dict)
    seed: int = DEFAULT_SEED
    threads: int = 1
    channels: list = field(default_factory=list)

    def provenance(self) -> dict:
        """Stages and settings as a JSON-friendly dict (for sidecars)."""
        return {
            "Software": f"ANTs antsRegistration via antspyx {_ants_version()}",
            "Stages": [{"Transform": name, **{k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in vars(stage).items()}}
                       for name, stage in self.stages.items()],
            **({"Channels": self.channels} if self.channels else {}),
            "InitialTransform": "centres of mass aligned",
            "RandomSeed": self.seed,
            "Threads": self.threads,
            "TransformFormat": "ITK composite transform (HDF5)",
        }


def _ants():
    import ants

    return ants


def _ants_version() -> str:
    try:
        from importlib.metadata import version

        return version("antspyx")
    except Exception:  # not installed through pip
        return "unknown"


# ---------------------------------------------------------------------------------------------
# images

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def to_ants(array, affine, *, dtype=np.float32):
    """An ``ants.ANTsImage`` of ``array`` (x, y, z voxel axes) placed by the NIfTI ``affine``.

    NIfTI world coordinates are RAS; ITK's are LPS, so the first two rows of the affine change
    sign. Oblique affines are kept (as a direction matrix); shears are not representable and
    raise ``ValueError``.
    """
    ants = _ants()
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    linear = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError("affine has shears; ANTs images need orthogonal voxel axes")
    origin = _RAS_TO_LPS @ affine[:3, 3]
    return ants.from_numpy(np.ascontiguousarray(array, dtype=dtype), origin=origin.tolist(),
                           spacing=spacing.tolist(), direction=direction)


def to_array(image) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array and NIfTI (RAS) affine of an ``ants.ANTsImage`` (inverse of :func:`to_ants`)."""
    direction = np.asarray(image.direction, dtype=np.float64)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ (direction * spacing[None, :])
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.origin, dtype=np.float64)
    return image.numpy(), affine


def _as_float_image(image):
    return image if image.pixeltype == "float" else image.clone("float")


# ---------------------------------------------------------------------------------------------
# registration

def _stage_arguments(name: str, stage: Stage, fixed: str, moving: str, channels=()) -> list[str]:
    if stage.metric not in METRICS:
        raise ValueError(f"unknown metric {stage.metric!r} of the {name} stage; expected one of {METRICS}")
    levels = {len(stage.iterations), len(stage.shrink_factors), len(stage.smoothing_sigmas)}
    if len(levels) != 1:
        raise ValueError(f"{name} stage: iterations, shrink_factors and smoothing_sigmas need one "
                         f"value per level, got {stage.iterations}, {stage.shrink_factors}, {stage.smoothing_sigmas}")
    if any(int(f) < 1 for f in stage.shrink_factors):
        raise ValueError(f"{name} stage: shrink factors must be >= 1, got {stage.shrink_factors}")
    if not 0 < stage.sampling_rate <= 1:
        raise ValueError(f"{name} stage: sampling_rate must be in (0, 1], got {stage.sampling_rate}")
    sampling = "Regular" if stage.sampling_rate < 1 else "None"
    if stage.metric in ("mattes", "mi"):
        metric = {"mattes": "Mattes", "mi": "MI"}[stage.metric]
        metrics = [f"{metric}[{fixed},{moving},1,{int(stage.metric_parameter)},{sampling},{stage.sampling_rate:g}]"]
    elif stage.metric == "cc":
        metrics = [f"CC[{fixed},{moving},1,{int(stage.metric_parameter)}]"]
    elif stage.metric == "cc+mattes":
        # Both, weighted equally: CC (radius metric_parameter) for local detail, Mattes MI
        # (32 bins) for the global intensity relation across contrasts.
        metrics = [f"CC[{fixed},{moving},0.5,{int(stage.metric_parameter)}]",
                   f"Mattes[{fixed},{moving},0.5,32,{sampling},{stage.sampling_rate:g}]"]
    else:
        metrics = [f"MeanSquares[{fixed},{moving},1,0]"]
    if channels:
        # Further image pairs (multichannel registration): each a CC term of its weight; the
        # main pair keeps the rest of the unit total.
        rest = 1.0 - sum(weight for _, _, weight, _ in channels)
        metrics = [_reweighted(text, rest) for text in metrics]
        metrics += [f"CC[{f},{m},{weight:g},{int(radius)}]" for f, m, weight, radius in channels]
    if name == "syn":
        transform = f"SyN[{stage.gradient_step:g},{stage.update_sigma:g},{stage.total_sigma:g}]"
    else:
        transform = f"{name.capitalize()}[{stage.gradient_step:g}]"
    return [
        *[part for text in metrics for part in ("--metric", text)],
        "--transform", transform,
        "--convergence", "[{},{:g},{}]".format("x".join(str(int(i)) for i in stage.iterations),
                                                stage.convergence_threshold, int(stage.convergence_window)),
        "--shrink-factors", "x".join(str(int(f)) for f in stage.shrink_factors),
        "--smoothing-sigmas", "x".join(f"{float(s):g}" for s in stage.smoothing_sigmas) + "vox",
    ]


def _reweighted(metric: str, factor: float) -> str:
    """``Name[fixed,moving,weight,...]`` with its weight multiplied by ``factor``."""
    name, rest = metric.split("[", 1)
    parts = rest.rstrip("]").split(",")
    parts[2] = f"{float(parts[2]) * factor:g}"
    return f"{name}[{','.join(parts)}]"


@dataclass(frozen=True)
class Channel:
    """One more image pair of a multichannel registration (an extra metric term).

    Attributes
    ----------
    fixed, moving : ants.ANTsImage
        The pair, in the same spaces as :func:`register`'s ``fixed`` and ``moving`` (e.g. a
        subject's susceptibility map and a susceptibility prior in template space).
    weight : float
        Share of this pair's neighbourhood cross-correlation in the stage's metric, in (0, 1);
        the main pair keeps 1 minus the channels' total.
    radius : int
        CC neighbourhood radius (voxels).
    stages : tuple of str
        Stages that use the pair (e.g. ``("syn",)``: the linear stages stay on the main pair).
    """

    fixed: object
    moving: object
    weight: float = 0.5
    radius: int = 2
    stages: tuple = ("syn",)


def register(
    fixed,
    moving,
    *,
    transform: str = "syn",
    stages: dict | None = None,
    channels=(),
    fixed_mask=None,
    moving_mask=None,
    seed: int = DEFAULT_SEED,
    threads: int | None = None,
    output_dir=None,
    prefix: str = "registration_",
) -> Registration:
    """Register ``moving`` to ``fixed`` with ANTs: rigid, then affine, then SyN.

    Parameters
    ----------
    fixed, moving : ants.ANTsImage
        Images (see :func:`to_ants`). The transforms take ``moving`` into ``fixed``'s space.
    transform : {"rigid", "affine", "syn"}
        Last stage to run (``"affine"`` runs rigid then affine; ``"syn"`` all three).
    stages : dict, optional
        Stage name -> :class:`Stage` or dict of :class:`Stage` fields overriding
        :data:`DEFAULT_STAGES` (e.g. ``{"syn": {"iterations": (40, 20, 0)}}``).
    channels : sequence of Channel
        Further image pairs, each one more CC term of the stages it names (multichannel
        registration: the deformation has to match every pair; Avants et al. 2011).
    fixed_mask, moving_mask : ants.ANTsImage, optional
        Where the metric is evaluated (e.g. dilated brain masks), in each image's space.
    seed : int
        Random seed of the metric sampling (``--random-seed``): the same inputs, seed and
        thread count give the same transforms.
    threads : int, optional
        ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``); default
        :func:`qsmflow.resources.thread_count`.
    output_dir : path, optional
        Where the transform files are written (default: a new temporary directory).
    prefix : str
        File-name prefix of the transform files.

    Returns
    -------
    Registration
        ``forward``: ``[<prefix>Composite.h5]``; ``inverse``: ``[<prefix>InverseComposite.h5]``.

    References
    ----------
    Avants BB et al., Med Image Anal 2008;12:26-41 (SyN); the stage defaults follow ANTs'
    ``antsRegistrationSyNQuick.sh`` (Tustison NJ, Avants BB, Front Neuroinform 2013;7:39).
    """
    from .resources import thread_count

    ants = _ants()
    if transform not in TRANSFORM_STAGES:
        raise ValueError(f"unknown transform {transform!r}; expected one of {sorted(TRANSFORM_STAGES)}")
    effective = {}
    for name in TRANSFORM_STAGES[transform]:
        stage = DEFAULT_STAGES[name]
        override = (stages or {}).get(name)
        if isinstance(override, Stage):
            stage = override
        elif override:
            unknown = set(override) - set(vars(stage))
            if unknown:
                raise ValueError(f"unknown setting(s) {sorted(unknown)} of the {name} stage")
            stage = replace(stage, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in override.items()})
        _stage_arguments(name, stage, "fixed", "moving")  # validates the settings before any work
        effective[name] = stage
    channels = tuple(channels)
    for channel in channels:
        if not 0 < channel.weight < 1:
            raise ValueError(f"a registration channel's weight must be in (0, 1), got {channel.weight}")
        if set(channel.stages) - set(STAGE_ORDER):
            raise ValueError(f"unknown stage(s) {sorted(set(channel.stages) - set(STAGE_ORDER))} of a registration channel")
    if sum(channel.weight for channel in channels) >= 1:
        raise ValueError("the registration channels' weights must add up to less than 1")
    unknown_stages = set(stages or {}) - set(STAGE_ORDER)
    if unknown_stages:
        raise ValueError(f"unknown registration stage(s) {sorted(unknown_stages)}; expected {STAGE_ORDER}")

    threads = thread_count(threads)
    output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="qsmflow_reg_"))
    output_dir.mkdir(parents=True, exist_ok=True)
    outprefix = str(output_dir.resolve() / prefix)
    with tempfile.TemporaryDirectory(prefix="inputs_", dir=output_dir) as scratch:
        files = {}
        for key, image in (("fixed", fixed), ("moving", moving), ("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
            if image is not None:
                files[key] = str(Path(scratch) / f"{key}.nii.gz")
                ants.image_write(_as_float_image(image), files[key])
        for number, channel in enumerate(channels):
            for key, image in (("fixed", channel.fixed), ("moving", channel.moving)):
                files[f"{key}_channel{number}"] = str(Path(scratch) / f"{key}_channel{number}.nii.gz")
                ants.image_write(_as_float_image(image), files[f"{key}_channel{number}"])
        warped_path = str(Path(scratch) / "warped.nii.gz")
        arguments = ["--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
                     "--write-composite-transform", "1",
                     "--initial-moving-transform", f"[{files['fixed']},{files['moving']},1]",
                     "--interpolation", "Linear",
                     "--winsorize-image-intensities", "[0.005,0.995]",
                     "--use-histogram-matching", "0",
                     "--random-seed", str(int(seed)),
                     "--output", f"[{outprefix},{warped_path}]"]
        for name, stage in effective.items():
            pairs = [(files[f"fixed_channel{n}"], files[f"moving_channel{n}"], c.weight, c.radius)
                     for n, c in enumerate(channels) if name in c.stages]
            arguments += _stage_arguments(name, stage, files["fixed"], files["moving"], pairs)
        if "fixed_mask" in files or "moving_mask" in files:
            arguments += ["--masks", "[{},{}]".format(files.get("fixed_mask", "NULL"), files.get("moving_mask", "NULL"))]
        _run_ants_registration(arguments, threads)
        warped = ants.image_read(warped_path)
    forward, inverse = outprefix + "Composite.h5", outprefix + "InverseComposite.h5"
    for path in (forward, inverse):
        if not Path(path).is_file():
            raise RuntimeError(f"antsRegistration wrote no {path}")
    return Registration(forward=[forward], inverse=[inverse], warped=warped, stages=effective,
                        seed=int(seed), threads=threads,
                        channels=[{"Metric": "CC", "Weight": c.weight, "Radius": int(c.radius), "Stages": list(c.stages)}
                                  for c in channels])


#: ``PR_SET_PDEATHSIG`` of Linux' ``prctl(2)`` and the signal sent to the child when its parent dies.
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9


def _die_with_parent(parent: int, prctl) -> None:
    """In the forked child before ``exec``: ask Linux to kill this process when the thread that
    forked it exits (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so that an antsRegistration child does
    not outlive a killed qsmflow run; ``parent`` is the parent's pid, ``prctl`` libc's function
    (looked up in the parent: no library loading between fork and exec)."""
    if prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child_setup():
    """``preexec_fn`` of the antsRegistration child: :func:`_die_with_parent` on Linux, ``None``
    elsewhere (there the child survives a killed parent)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return functools.partial(_die_with_parent, os.getpid(), ctypes.CDLL(None, use_errno=True).prctl)


#: The child's program. It loads antspyx's compiled library alone: ``import ants`` also imports
#: its plotting, learning and deep-learning modules (matplotlib, scikit-learn, statsmodels), about
#: 3 s of CPU per registration, most of a small registration's time. The arguments name files
#: only, so nothing else of antspyx is needed.
_ANTS_REGISTRATION_CHILD = """
import glob, importlib.util, json, os, sys
package = importlib.util.find_spec("ants").submodule_search_locations[0]
libraries = glob.glob(os.path.join(package, "lib.*.so")) + glob.glob(os.path.join(package, "lib.*.pyd"))
if libraries:
    spec = importlib.util.spec_from_file_location("ants.lib", libraries[0])
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
else:  # another layout of antspyx: the same library through the package
    import ants
    lib = ants.lib
sys.exit(lib.antsRegistration(json.loads(sys.stdin.read())))
"""


def _run_ants_registration(arguments: list[str], threads: int) -> None:
    """Run antsRegistration in a child process whose ITK uses exactly ``threads`` threads.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once per process, at its first use, and
    antspyx has no other thread setting; a fresh process is the only way to honour a node's
    ``n_procs`` in a reused worker. With one thread the result is bit-reproducible; with more,
    ITK's multi-threaded metric sums make transforms differ between runs in the last digits.
    """
    environment = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(int(threads)))
    completed = subprocess.run([sys.executable, "-c", _ANTS_REGISTRATION_CHILD], input=json.dumps(arguments), text=True,
                               env=environment, capture_output=True, preexec_fn=_child_setup())
    if completed.returncode != 0:
        message = (completed.stderr or completed.stdout).strip().splitlines()
        raise RuntimeError(f"antsRegistration failed with exit code {completed.returncode}: "
                           + (message[-1] if message else "no message"))


def apply_transform(reference, image, transforms, *, interpolation: str = "linear", default_value: float = 0.0):
    """Resample ``image`` onto the grid of ``reference`` through ``transforms``.

    Parameters
    ----------
    reference : ants.ANTsImage
        Image whose grid (shape, spacing, origin, direction) the result takes.
    image : ants.ANTsImage
        Image to resample.
    transforms : list of str
        Transform files, e.g. :attr:`Registration.forward` (moving → fixed) or
        :attr:`Registration.inverse` (fixed → moving).
    interpolation : str
        One of :data:`INTERPOLATIONS`. Label images need ``genericLabel`` (ANTs' label-aware
        Gaussian interpolation, smooth boundaries without blending label values) or
        ``nearestNeighbor``.
    default_value : float
        Value outside ``image``.

    Returns
    -------
    ants.ANTsImage (float for the intensity interpolations, the input's label values for the
    label interpolations).
    """
    ants = _ants()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    if isinstance(transforms, (str, os.PathLike)):
        transforms = [transforms]
    transforms = [str(t) for t in transforms]
    for path in transforms:
        if not Path(path).is_file():
            raise FileNotFoundError(f"transform file {path} does not exist")
    if interpolation in LABEL_INTERPOLATIONS:
        values = image.numpy()
        if not np.allclose(values, np.round(values)):
            raise ValueError("label interpolation needs an image of whole-number labels")
    result = ants.apply_transforms(fixed=_as_float_image(reference), moving=_as_float_image(image),
                                   transformlist=transforms, interpolator=interpolation,
                                   defaultvalue=default_value)
    if interpolation in LABEL_INTERPOLATIONS:
        result = result.new_image_like(np.round(result.numpy()))
    return result


def linear_transform_matrix(transform_file) -> np.ndarray:
    """The 4x4 world (RAS, mm) matrix of a linear ANTs transform file (rigid or affine).

    The transform maps a point of the *fixed* image's world to the point of the *moving* image's
    world that lands on it (the direction ITK transforms points; :attr:`Registration.forward`
    resamples the moving image with it). ITK's ``y = M (x - c) + c + t`` in LPS coordinates is
    returned as one homogeneous matrix in NIfTI's RAS coordinates. E.g. for a rigid transform
    between two scans of one head, its 3x3 part is the head's rotation from the fixed scan to
    the moving one in world axes.

    Raises
    ------
    ValueError
        When the file holds a non-linear transform (e.g. SyN's displacement field).
    """
    ants = _ants()
    path = Path(transform_file)
    if not path.is_file():
        raise FileNotFoundError(f"transform file {path} does not exist")
    transform = ants.read_transform(str(path))
    parameters = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)
    if parameters.size != 12 or centre.size != 3:
        raise ValueError(f"{path}: not a single linear transform ({parameters.size} parameters)")
    linear, translation = parameters[:9].reshape(3, 3), parameters[9:]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip
