"""nipype interfaces for the reconstruction stages; each wraps one function of qsmflow.recon."""
from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..config import registry
from ..recon import dipole, units
from ..recon.masking import reliable_field_mask
from .base import function_provenance, load_volume, save_like


def _b0_direction(requested, image) -> list[float]:
    if isdefined(requested) and requested:
        direction = np.asarray(requested, dtype=float)
        return (direction / np.linalg.norm(direction)).tolist()
    return dipole.b0_direction_from_affine(image.affine).tolist()


class _MethodInputSpec(BaseInterfaceInputSpec):
    method = traits.Str(mandatory=True, desc="name of the algorithm in the stage's registry")
    parameters = traits.Dict(value={}, usedefault=True, desc="keyword arguments of the algorithm")


class _ProvenanceOutputSpec(TraitedSpec):
    provenance = traits.Dict(desc="algorithm, effective parameters and notes for the sidecar")


# ---------------------------------------------------------------------------------------------
class _LoadEchoesInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude, one file per echo")
    phase_files = InputMultiObject(File(exists=True), mandatory=True, desc="phase, one file per echo")
    phase_units = traits.Enum(*units.PHASE_UNITS, usedefault=True,
                              desc="phase convention (qsmflow.recon.units.PHASE_CONVENTIONS) or auto (detected)")
    phase_sign = traits.Enum(1, -1, usedefault=True, desc="-1 for scanners whose phase runs the other way")


class _LoadEchoesOutputSpec(TraitedSpec):
    magnitude = File(exists=True, desc="4-D magnitude (echoes last), float32")
    phase = File(exists=True, desc="4-D wrapped phase in radians, float32")
    provenance = traits.Dict(desc="phase convention (detected or configured), rescaling and sign")


class LoadEchoes(SimpleInterface):
    """Stack a scan's echoes into 4-D magnitude and phase, checking data and phase units.

    The phase convention is detected from the range of all echoes together (one rescaling for
    the scan, so an echo that happens to span less than the others is scaled alike), or checked
    against ``phase_units``; see :mod:`qsmflow.recon.units`.
    """

    input_spec = _LoadEchoesInputSpec
    output_spec = _LoadEchoesOutputSpec

    def _run_interface(self, runtime):
        magnitudes, phases = [], []
        reference = None
        for path in self.inputs.magnitude_files:
            data, image = load_volume(path)
            _check_volume(path, data, reference)
            reference = reference or image
            magnitudes.append(data)
        summaries = []
        for path in self.inputs.phase_files:
            data, _ = load_volume(path)
            _check_volume(path, data, reference)
            summary = units.phase_summary(data)
            kind = "integer" if summary["integer"] and max(-summary["minimum"], summary["maximum"]) > 2 * np.pi else "radians"
            if summaries and kind != summaries[0]["kind"]:
                raise ValueError(f"{path}: phase in {kind} units, but {self.inputs.phase_files[0]} is in "
                                 f"{summaries[0]['kind']} units; all echoes of a scan must use the same")
            summaries.append({**summary, "kind": kind})
            phases.append(data)
        low, high = min(s["minimum"] for s in summaries), max(s["maximum"] for s in summaries)
        first = self.inputs.phase_files[0]
        scan_files = first if len(phases) == 1 else f"{first} (and the scan's other echoes)"
        try:
            if self.inputs.phase_units == "auto":
                convention = units.detect_phase_convention(low, high, all(s["integer"] for s in summaries))
            else:
                convention = units.PHASE_CONVENTIONS[self.inputs.phase_units]
                units.check_phase_convention(convention, low, high)
        except ValueError as error:
            raise ValueError(f"{scan_files}: {error}") from None
        sign = int(self.inputs.phase_sign)
        phases = [units.phase_to_radians(phase, convention, sign=sign) for phase in phases]
        report = {
            "PhaseUnits": convention.name,
            "PhaseUnitsDetected": self.inputs.phase_units == "auto",
            "PhaseConvention": convention.description,
            "PhaseRange": [low, high],
            "PhaseRescaling": convention.rescaling(),
            "PhaseSign": sign,
        }
        if len(phases) == 1:
            report["PhaseOffset"] = ("not removed: a single echo cannot separate the phase offset at TE = 0 "
                                     "from the field, so the field map holds offset / (2 pi TE); background "
                                     "removal takes away its smooth part only")
        self._results["magnitude"] = save_like(np.stack(magnitudes, axis=-1), reference, "magnitude.nii")
        self._results["phase"] = save_like(np.stack(phases, axis=-1), reference, "phase.nii")
        self._results["provenance"] = report
        return runtime


def _check_volume(path, data, reference) -> None:
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, found shape {data.shape}")
    if reference is not None and data.shape != reference.shape:
        raise ValueError(f"{path}: shape {data.shape} differs from the first echo {reference.shape}")
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} voxels are NaN or infinite")


# ---------------------------------------------------------------------------------------------
class _BrainMaskInputSpec(_MethodInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4-D magnitude")
    mask_file = File(exists=True, desc="user-supplied mask, used when method is 'file'")


class _BrainMaskOutputSpec(_ProvenanceOutputSpec):
    mask = File(exists=True, desc="brain mask, uint8")


class BrainMask(SimpleInterface):
    """Brain mask from the echoes' root-sum-of-squares magnitude, or a user-supplied mask."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = load_volume(self.inputs.magnitude)
        if self.inputs.method == "file":
            if not isdefined(self.inputs.mask_file):
                raise ValueError("mask method 'file' needs a mask file")
            mask_data, mask_image = load_volume(self.inputs.mask_file)
            if mask_data.shape != magnitude.shape[:3] or not np.allclose(mask_image.affine, image.affine, atol=1e-3):
                raise ValueError(f"{self.inputs.mask_file}: mask grid differs from the magnitude's")
            mask = mask_data > 0.5
            provenance = {"Function": "user-supplied", "Source": str(self.inputs.mask_file)}
        else:
            function = registry("mask")[self.inputs.method]
            combined = np.sqrt(np.sum(magnitude.reshape(magnitude.shape[:3] + (-1,)) ** 2, axis=-1))
            voxel_size = dipole.voxel_sizes_from_affine(image.affine)
            mask = function(combined, voxel_size, **self.inputs.parameters)
            provenance = function_provenance(function, self.inputs.parameters)
        if not mask.any():
            raise ValueError(f"{self.inputs.magnitude}: the brain mask is empty")
        self._results["mask"] = save_like(mask, image, "brain_mask.nii", dtype=np.uint8)
        self._results["provenance"] = provenance
        return runtime


# ---------------------------------------------------------------------------------------------
class _UnwrapInputSpec(_MethodInputSpec):
    phase = File(exists=True, mandatory=True, desc="4-D wrapped phase (rad)")
    magnitude = File(exists=True, mandatory=True, desc="4-D magnitude")
    mask = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True, desc="seconds")


class _UnwrapOutputSpec(_ProvenanceOutputSpec):
    unwrapped = File(exists=True, desc="4-D unwrapped phase (rad)")


class UnwrapPhase(SimpleInterface):
    """Spatial and temporal unwrapping of the echoes' phase."""

    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec

    def _run_interface(self, runtime):
        from ..recon import unwrap

        phase, image = load_volume(self.inputs.phase)
        magnitude, _ = load_volume(self.inputs.magnitude)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        spatial = registry("unwrap")[self.inputs.method]
        unwrapped = unwrap.unwrap_echoes(
            _as_4d(phase), _as_4d(magnitude), self.inputs.echo_times,
            mask=mask, voxel_size=dipole.voxel_sizes_from_affine(image.affine),
            method=self.inputs.method, **self.inputs.parameters,
        )
        self._results["unwrapped"] = save_like(unwrapped, image, "unwrapped_phase.nii")
        provenance = function_provenance(spatial, self.inputs.parameters)
        temporal = function_provenance(unwrap.unwrap_echoes, {"method": self.inputs.method})
        provenance["TemporalUnwrapping"] = temporal["Description"]
        provenance["References"] = provenance["References"] + [r for r in temporal["References"]
                                                                 if r not in provenance["References"]]
        self._results["provenance"] = provenance
        return runtime


def _as_4d(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 4 else array[..., None]


# ---------------------------------------------------------------------------------------------
class _FitFieldInputSpec(_MethodInputSpec):
    unwrapped = File(exists=True, mandatory=True, desc="4-D unwrapped phase (rad)")
    magnitude = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True)
    outlier_factor = traits.Either(None, traits.Float, default=None, usedefault=True,
                                   desc="drop voxels whose fit residual is an outlier (robust z-score); None keeps all")
    edge_outlier_factor = traits.Either(None, traits.Float, default=None, usedefault=True,
                                        desc="stricter outlier factor in the mask's outer edge_mm; None: outlier_factor")
    edge_mm = traits.Float(6.0, usedefault=True, desc="width of that outer shell (mm)")
    outlier_min_cluster = traits.Int(10, usedefault=True, desc="smallest connected cluster of outliers dropped (voxels)")


class _FitFieldOutputSpec(_ProvenanceOutputSpec):
    field_hz = File(exists=True, desc="total field map (Hz)")
    field_weight = File(exists=True, desc="inverse standard deviation of the field (relative), the data weight")
    mask = File(exists=True, desc="brain mask without voxels whose phase the fit cannot explain")


class FitField(SimpleInterface):
    """Combine the echoes' unwrapped phase into a field map in Hz."""

    input_spec = _FitFieldInputSpec
    output_spec = _FitFieldOutputSpec

    def _run_interface(self, runtime):
        unwrapped, image = load_volume(self.inputs.unwrapped)
        magnitude, _ = load_volume(self.inputs.magnitude)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        function = registry("echoes")[self.inputs.method]
        fit = function(_as_4d(unwrapped), _as_4d(magnitude), self.inputs.echo_times, mask=mask, **self.inputs.parameters)
        field_hz = np.where(mask, fit["field_hz"], 0.0)
        self._results["field_hz"] = save_like(field_hz, image, "total_field_hz.nii")
        self._results["field_weight"] = save_like(np.where(mask, fit["field_weight"], 0.0), image, "field_weight.nii")
        provenance = function_provenance(function, self.inputs.parameters)
        provenance["EchoTimes"] = list(self.inputs.echo_times)
        if self.inputs.outlier_factor is not None:
            options = {"outlier_factor": self.inputs.outlier_factor,
                       "edge_outlier_factor": self.inputs.edge_outlier_factor, "edge_mm": self.inputs.edge_mm,
                       "min_cluster": self.inputs.outlier_min_cluster}
            reliable = reliable_field_mask(mask, fit["residual"], voxel_size=dipole.voxel_sizes_from_affine(image.affine),
                                           **options)
            provenance["ReliabilityMask"] = {
                **function_provenance(reliable_field_mask, options),
                "VoxelsExcluded": int(mask.sum() - reliable.sum()),
            }
            mask = reliable
        self._results["mask"] = save_like(mask, image, "field_mask.nii", dtype=np.uint8)
        self._results["provenance"] = provenance
        return runtime


# ---------------------------------------------------------------------------------------------
class _R2StarInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True)
    method = traits.Str("loglinear", usedefault=True)


class _R2StarOutputSpec(_ProvenanceOutputSpec):
    r2star = File(exists=True, desc="R2* map (1/s)")


class R2Star(SimpleInterface):
    """R2* relaxation rate from the multi-echo magnitude."""

    input_spec = _R2StarInputSpec
    output_spec = _R2StarOutputSpec

    def _run_interface(self, runtime):
        from ..recon.echoes import r2star_map

        magnitude, image = load_volume(self.inputs.magnitude)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        r2star = r2star_map(magnitude, self.inputs.echo_times, mask=mask, method=self.inputs.method)
        self._results["r2star"] = save_like(r2star, image, "r2star.nii")
        self._results["provenance"] = function_provenance(r2star_map, {"method": self.inputs.method})
        return runtime


def _weight_arguments(function, files: dict) -> dict:
    """The weight volumes among ``files`` (keyword -> path or undefined) that ``function`` takes."""
    import inspect

    accepted = inspect.signature(function).parameters
    return {key: load_volume(path)[0] for key, path in files.items() if isdefined(path) and key in accepted}


# ---------------------------------------------------------------------------------------------
class _EdgeWeightInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="magnitude (4-D: all echoes)")
    mask = File(exists=True, mandatory=True)
    edge_fraction = traits.Float(0.1, usedefault=True, desc="fraction of the mask marked as edges")


class _EdgeWeightOutputSpec(_ProvenanceOutputSpec):
    gradient_weight = File(exists=True, desc="0 on magnitude edges, 1 elsewhere")


class EdgeWeight(SimpleInterface):
    """MEDI gradient weight (edges of the magnitude) for edge-preserving inversions."""

    input_spec = _EdgeWeightInputSpec
    output_spec = _EdgeWeightOutputSpec

    def _run_interface(self, runtime):
        from ..recon.masking import edge_weight

        magnitude, image = load_volume(self.inputs.magnitude)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        weight = edge_weight(magnitude, mask, dipole.voxel_sizes_from_affine(image.affine),
                             edge_fraction=self.inputs.edge_fraction)
        self._results["gradient_weight"] = save_like(weight, image, "gradient_weight.nii")
        self._results["provenance"] = function_provenance(edge_weight, {"edge_fraction": self.inputs.edge_fraction})
        return runtime


# ---------------------------------------------------------------------------------------------
class _BackgroundInputSpec(_MethodInputSpec):
    field_hz = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask = File(exists=True, mandatory=True)
    field_strength = traits.Float(mandatory=True, desc="tesla")
    b0_direction = traits.List(traits.Float, desc="B0 in voxel axes; default from the affine")
    weight = File(exists=True, desc="data weight (e.g. the echo fit's field_weight), for methods with a weight")


class _BackgroundOutputSpec(_ProvenanceOutputSpec):
    local_field = File(exists=True, desc="local field (ppm)")
    mask = File(exists=True, desc="mask where the local field is valid")


class RemoveBackground(SimpleInterface):
    """Remove the background field: total field (Hz) to local field (ppm)."""

    input_spec = _BackgroundInputSpec
    output_spec = _BackgroundOutputSpec

    def _run_interface(self, runtime):
        field_hz, image = load_volume(self.inputs.field_hz)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        function = registry("background")[self.inputs.method]
        b0_direction = _b0_direction(self.inputs.b0_direction, image)
        total_ppm = dipole.hz_to_ppm(field_hz, self.inputs.field_strength).astype(np.float32)
        weights = _weight_arguments(function, {"weight": self.inputs.weight})
        local, reduced = function(
            total_ppm, mask, dipole.voxel_sizes_from_affine(image.affine),
            b0_direction=b0_direction, **weights, **self.inputs.parameters,
        )
        if not reduced.any():
            raise ValueError(f"{self.inputs.mask}: nothing of the mask is left after background removal")
        self._results["local_field"] = save_like(np.where(reduced, local, 0.0), image, "local_field_ppm.nii")
        self._results["mask"] = save_like(reduced, image, "local_mask.nii", dtype=np.uint8)
        provenance = function_provenance(function, self.inputs.parameters)
        provenance["B0Direction"] = b0_direction
        provenance["Weights"] = sorted(weights)
        provenance["MaskFractionKept"] = float(reduced.sum() / max(mask.sum(), 1))
        self._results["provenance"] = provenance
        return runtime


# ---------------------------------------------------------------------------------------------
class _InversionInputSpec(_MethodInputSpec):
    local_field = File(exists=True, desc="local field (ppm); for a total-field inversion give field_hz instead")
    field_hz = File(exists=True, desc="total field (Hz), for total-field inversions (TOTAL_FIELD_INVERSIONS)")
    field_strength = traits.Float(desc="tesla, to convert field_hz to ppm")
    mask = File(exists=True, mandatory=True)
    data_weight = File(exists=True, desc="data weight (the echo fit's field_weight), for methods with data_weight")
    gradient_weight = File(exists=True, desc="MEDI edge weight (EdgeWeight), for methods with gradient_weight")
    b0_direction = traits.List(traits.Float)


class _InversionOutputSpec(_ProvenanceOutputSpec):
    chi = File(exists=True, desc="susceptibility (ppm), not referenced")
    mask = File(exists=True, desc="the mask where chi is valid (the input mask)")
    local_field = File(exists=True, desc="total-field inversions: the field (ppm) of the solution inside the mask")


class InvertDipole(SimpleInterface):
    """Dipole inversion of the local field to susceptibility."""

    input_spec = _InversionInputSpec
    output_spec = _InversionOutputSpec

    def _run_interface(self, runtime):
        from ..recon.inversion import TOTAL_FIELD_INVERSIONS

        if self.inputs.method in TOTAL_FIELD_INVERSIONS:
            if not (isdefined(self.inputs.field_hz) and isdefined(self.inputs.field_strength)):
                raise ValueError(f"inversion {self.inputs.method!r} takes the total field: connect field_hz and "
                                 "set field_strength")
            field_hz, image = load_volume(self.inputs.field_hz)
            field = dipole.hz_to_ppm(field_hz, self.inputs.field_strength).astype(np.float32)
        elif isdefined(self.inputs.local_field):
            field, image = load_volume(self.inputs.local_field)
        else:
            raise ValueError(f"inversion {self.inputs.method!r} needs the local field (local_field)")
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        function = registry("inversion")[self.inputs.method]
        b0_direction = _b0_direction(self.inputs.b0_direction, image)
        weights = _weight_arguments(function, {"data_weight": self.inputs.data_weight,
                                               "gradient_weight": self.inputs.gradient_weight})
        chi = function(field, mask, dipole.voxel_sizes_from_affine(image.affine), b0_direction=b0_direction,
                       **weights, **self.inputs.parameters)
        self._results["chi"] = save_like(np.where(mask, chi, 0.0), image, "chi_unreferenced.nii")
        self._results["mask"] = save_like(mask, image, "inversion_mask.nii", dtype=np.uint8)
        if self.inputs.method in TOTAL_FIELD_INVERSIONS:
            # The tissue field the solution attributes to sources inside the mask (the local field).
            tissue_field = dipole.forward_field(np.where(mask, chi, 0.0), dipole.voxel_sizes_from_affine(image.affine),
                                                b0_direction, padding=16)
            self._results["local_field"] = save_like(np.where(mask, tissue_field, 0.0), image, "local_field_ppm.nii")
        provenance = function_provenance(function, self.inputs.parameters)
        provenance["B0Direction"] = b0_direction
        provenance["Weights"] = sorted(weights)
        self._results["provenance"] = provenance
        return runtime


# ---------------------------------------------------------------------------------------------
class _ReferenceInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True, desc="QSM mask: where chi is valid")
    method = traits.Enum("mean", "brain", "csf", "none", usedefault=True,
                         desc="reference region (qsmflow.segmentation.REFERENCE_METHODS)")
    brain_mask = File(exists=True, desc="brain mask, for 'brain'")
    labels = File(exists=True, desc="subject-space labels, for 'csf'")
    table = File(exists=True, desc="label table of labels, for 'csf'")
    erosion_mm = traits.Float(desc="erosion of the reference region (default: the method's)")


class _ReferenceOutputSpec(_ProvenanceOutputSpec):
    chi = File(exists=True, desc="referenced susceptibility (ppm)")


class ReferenceSusceptibility(SimpleInterface):
    """Reference the susceptibility map: its mean over a region becomes zero
    (:func:`qsmflow.segmentation.reference_region`)."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        from .. import segmentation
        from ..recon.inversion import reference_susceptibility

        chi, image = load_volume(self.inputs.chi)
        mask = load_volume(self.inputs.mask, dtype=np.uint8)[0] > 0
        method = self.inputs.method
        optional = {"brain_mask": self.inputs.brain_mask, "labels": self.inputs.labels}
        if method == "brain" and not isdefined(optional["brain_mask"]):
            raise ValueError("reference method 'brain' needs the brain mask")
        if method == "csf" and not (isdefined(optional["labels"]) and isdefined(self.inputs.table)):
            raise ValueError("reference method 'csf' needs subject-space labels (segmentation.enabled)")
        region = segmentation.reference_region(
            method, qsm_mask=mask,
            brain_mask=load_volume(self.inputs.brain_mask, dtype=np.uint8)[0] > 0 if method == "brain" else None,
            labels=load_volume(self.inputs.labels, dtype=np.int16)[0] if method == "csf" else None,
            table=segmentation.read_table(self.inputs.table) if method == "csf" else (),
            voxel_size=dipole.voxel_sizes_from_affine(image.affine),
            erosion_mm=self.inputs.erosion_mm if isdefined(self.inputs.erosion_mm) else None)
        if region is None:
            referenced = reference_susceptibility(chi, mask, reference="none")
            offset = 0.0
        else:
            referenced = reference_susceptibility(chi, mask, reference="mean", reference_mask=region)
            offset = float(chi[region].mean(dtype=np.float64))
        self._results["chi"] = save_like(np.where(mask, referenced, 0.0), image, "chi.nii")
        self._results["provenance"] = {
            "Reference": segmentation.REFERENCE_METHODS[method],
            "ReferenceMethod": method,
            "ReferenceVoxels": int(region.sum()) if region is not None else 0,
            "ReferenceOffset": offset,
        }
        return runtime
