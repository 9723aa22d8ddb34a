"""nipype interfaces of multi-orientation QSM (COSMOS): align one orientation, solve the set."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..recon import cosmos as cosmos_recon
from ..recon.dipole import b0_direction_from_affine, voxel_sizes_from_affine
from .base import function_provenance, load_volume, save_like


def _first_echo(magnitude: np.ndarray) -> np.ndarray:
    return magnitude[..., 0] if magnitude.ndim == 4 else magnitude


class _AlignInputSpec(BaseInterfaceInputSpec):
    reference_magnitude = File(exists=True, mandatory=True, desc="reference orientation's magnitude (3-D or 4-D)")
    magnitude = File(exists=True, mandatory=True, desc="this orientation's magnitude (3-D or 4-D)")
    mask = File(exists=True, mandatory=True, desc="this orientation's QSM mask")
    local_field = File(exists=True, mandatory=True, desc="this orientation's local field (ppm)")
    interpolation = traits.Enum("bSpline", "linear", "lanczosWindowedSinc", usedefault=True)
    threads = traits.Int(1, usedefault=True, desc="ITK threads (the node's n_procs)")


class _AlignOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field (ppm) on the reference grid")
    mask = File(exists=True, desc="this orientation's mask on the reference grid")
    transform = File(exists=True, desc="ITK transform taking this orientation into the reference's space")
    rotation_degrees = traits.List(traits.Float, desc="head rotation from the reference, degrees about x, y, z")
    b0_direction = traits.List(traits.Float, desc="B0 direction in the reference's voxel axes")
    provenance = traits.Dict()


class AlignOrientation(SimpleInterface):
    """Rigidly register an orientation to the reference and resample its local field
    (:func:`qsmflow.recon.cosmos.align_orientation`)."""

    input_spec = _AlignInputSpec
    output_spec = _AlignOutputSpec

    def _run_interface(self, runtime):
        from ..resources import thread_count

        reference_magnitude, reference_image = load_volume(self.inputs.reference_magnitude)
        magnitude, image = load_volume(self.inputs.magnitude)
        mask, _ = load_volume(self.inputs.mask, dtype=np.uint8)
        field, _ = load_volume(self.inputs.local_field)
        for path, data in ((self.inputs.mask, mask), (self.inputs.local_field, field)):
            if data.shape[:3] != magnitude.shape[:3]:
                raise ValueError(f"{path}: shape {data.shape} differs from the magnitude's {magnitude.shape[:3]}")
        aligned = cosmos_recon.align_orientation(
            _first_echo(reference_magnitude), reference_image.affine,
            _first_echo(magnitude), mask > 0, image.affine, field,
            threads=thread_count(self.inputs.threads), output_dir=runtime.cwd,
            interpolation=self.inputs.interpolation)
        transform = Path(runtime.cwd) / "orientation_to_reference_xfm.h5"
        if Path(aligned.transform_file).resolve() != transform.resolve():
            shutil.move(aligned.transform_file, transform)
        self._results["local_field"] = save_like(aligned.local_field, reference_image, "aligned_local_field.nii")
        self._results["mask"] = save_like(aligned.mask, reference_image, "aligned_mask.nii", dtype=np.uint8)
        self._results["transform"] = str(transform)
        self._results["rotation_degrees"] = [round(float(v), 4) for v in aligned.rotation_degrees]
        self._results["b0_direction"] = [float(v) for v in aligned.b0_direction]
        self._results["provenance"] = {
            **function_provenance(cosmos_recon.align_orientation, {"interpolation": self.inputs.interpolation}),
            "Registration": aligned.registration,
        }
        return runtime


class _SolveInputSpec(BaseInterfaceInputSpec):
    reference_field = File(exists=True, mandatory=True, desc="reference orientation's local field (ppm)")
    reference_mask = File(exists=True, mandatory=True, desc="reference orientation's QSM mask")
    aligned_fields = InputMultiObject(File(exists=True), mandatory=True, desc="other orientations' fields, aligned")
    aligned_masks = InputMultiObject(File(exists=True), mandatory=True, desc="their masks on the reference grid")
    b0_directions = traits.List(traits.Float, mandatory=True, desc=(
        "B0 direction of each aligned orientation in the reference voxel axes, concatenated (3 per orientation, "
        "as niu.Merge joins lists)"))
    weighting = traits.Enum("none", "noise", usedefault=True, desc="equal or inverse-noise-variance weights")
    parameters = traits.Dict(value={}, usedefault=True, desc="keyword arguments of qsmflow.recon.cosmos.cosmos")


class _SolveOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="COSMOS susceptibility (ppm, not referenced)")
    mask = File(exists=True, desc="intersection of the orientations' masks")
    b0_directions = traits.List(traits.List(traits.Float), desc="B0 direction of every orientation, reference first")
    provenance = traits.Dict()


class SolveCOSMOS(SimpleInterface):
    """COSMOS inversion of a set of aligned local fields (:func:`qsmflow.recon.cosmos.cosmos`)."""

    input_spec = _SolveInputSpec
    output_spec = _SolveOutputSpec

    def _run_interface(self, runtime):
        reference, image = load_volume(self.inputs.reference_field)
        mask, _ = load_volume(self.inputs.reference_mask, dtype=np.uint8)
        fields, masks = [reference], [mask > 0]
        aligned_directions = np.reshape(np.asarray(self.inputs.b0_directions, dtype=float), (-1, 3)).tolist()
        if not (len(self.inputs.aligned_fields) == len(self.inputs.aligned_masks) == len(aligned_directions)):
            raise ValueError("one aligned field, mask and B0 direction per orientation are needed")
        for field_path, mask_path in zip(self.inputs.aligned_fields, self.inputs.aligned_masks):
            field, _ = load_volume(field_path)
            aligned_mask, _ = load_volume(mask_path, dtype=np.uint8)
            if field.shape != reference.shape or aligned_mask.shape != reference.shape:
                raise ValueError(f"{field_path}: not on the reference grid {reference.shape}")
            fields.append(field)
            masks.append(aligned_mask > 0)
        common = np.logical_and.reduce(masks)
        if not common.any():
            raise ValueError(f"{self.inputs.reference_mask}: the orientations' masks do not overlap")
        directions = [b0_direction_from_affine(image.affine).tolist()] + aligned_directions
        parameters = dict(self.inputs.parameters)
        noise = None
        if self.inputs.weighting == "noise":
            noise = [cosmos_recon.field_noise_sd(f, common) for f in fields]
            parameters["weights"] = cosmos_recon.noise_weights(noise)
        chi = cosmos_recon.cosmos(fields, common, voxel_sizes_from_affine(image.affine), directions, **parameters)
        self._results["chi"] = save_like(chi, image, "chi_cosmos_unreferenced.nii")
        self._results["mask"] = save_like(common, image, "cosmos_mask.nii", dtype=np.uint8)
        self._results["b0_directions"] = directions
        provenance = function_provenance(cosmos_recon.cosmos, {k: v for k, v in parameters.items() if k != "weights"})
        provenance["Weighting"] = self.inputs.weighting
        if noise is not None:
            provenance["FieldNoiseSD"] = [float(v) for v in noise]
            provenance["Weights"] = [float(w) for w in parameters["weights"]]
        provenance["MinimumKernelPower"] = cosmos_recon.minimum_kernel_power(
            chi.shape, voxel_sizes_from_affine(image.affine), directions, weights=parameters.get("weights"))
        self._results["provenance"] = provenance
        return runtime


class _SidecarInputSpec(BaseInterfaceInputSpec):
    orientation_files = traits.List(traits.Str, mandatory=True, desc="each orientation's first magnitude file (BIDS URI)")
    rotations = traits.List(traits.Float, mandatory=True, desc=(
        "rotation (degrees about x, y, z) of each non-reference orientation, concatenated"))
    b0_directions = traits.List(traits.List(traits.Float), mandatory=True, desc="B0 of every orientation, reference first")
    solver = traits.Dict(mandatory=True, desc="COSMOS provenance")
    registrations = traits.List(traits.Dict, mandatory=True, desc="provenance of each alignment")
    reference = traits.Dict(desc="referencing provenance")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the COSMOS outputs")


class _SidecarOutputSpec(TraitedSpec):
    specs = traits.List(traits.Dict, desc="WriteDerivatives specs: the QSM mask, then the Chimap")


class COSMOSMetadata(SimpleInterface):
    """Derivative specs of a COSMOS set (for :class:`qsmflow.interfaces.derivatives.WriteDerivatives`):
    the mask, then the Chimap, whose sidecar lists each orientation's file, rotation and B0 direction."""

    input_spec = _SidecarInputSpec
    output_spec = _SidecarOutputSpec

    def _run_interface(self, runtime):
        rotations = [[0.0, 0.0, 0.0]] + np.reshape(np.asarray(self.inputs.rotations, dtype=float), (-1, 3)).tolist()
        if not len(self.inputs.orientation_files) == len(rotations) == len(self.inputs.b0_directions):
            raise ValueError("one file, rotation and B0 direction per orientation are needed")
        orientations = [
            {"Source": source, "RotationDegrees": rotation, "B0Direction": direction,
             "Registration": "reference orientation (output grid)" if index == 0 else registration}
            for index, (source, rotation, direction, registration) in enumerate(zip(
                self.inputs.orientation_files, rotations, self.inputs.b0_directions,
                [None] + list(self.inputs.registrations)))
        ]
        chimap = {
            "Units": "ppm",
            "Description": "magnetic susceptibility from several head orientations (COSMOS), on the grid of the "
                           "first orientation; RotationDegrees: head rotation from the first orientation about "
                           "world x, y, z (R = Rz Ry Rx); B0Direction: main field in the first orientation's voxel axes",
            "Sources": list(self.inputs.orientation_files),
            "SkullStripped": True,
            "Orientations": orientations,
            "DipoleInversion": self.inputs.solver,
            "SusceptibilityReference": self.inputs.reference or None,
        }
        mask = {
            "Type": "Brain",
            "Units": "arbitrary",
            "Description": "voxels valid in every orientation (intersection of the QSM masks on the first grid)",
            "Sources": list(self.inputs.orientation_files),
        }
        entities = dict(self.inputs.entities)
        self._results["specs"] = [
            {"entities": {**entities, "desc": "qsm"}, "suffix": "mask", "metadata": mask},
            {"entities": entities, "suffix": "Chimap", "metadata": chimap},
        ]
        return runtime
