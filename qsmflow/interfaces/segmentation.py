"""nipype interfaces of the segmentation stages; each loads files, calls one function of
qsmflow.registration / qsmflow.segmentation and saves files (antspyx runs in-process; nipype's
own ANTs interfaces need the ANTs programs, which the antspyx wheel does not provide)."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
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

from .base import function_provenance, load_volume, save_like


def _first_echo(data: np.ndarray) -> np.ndarray:
    return data[..., 0] if data.ndim == 4 else data


def _voxel_size(image) -> np.ndarray:
    return np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))


# ---------------------------------------------------------------------------------------------
class _AtlasInputSpec(BaseInterfaceInputSpec):
    template = File(exists=True, desc="user atlas: template image (default: the built-in atlas)")
    labels = File(exists=True, desc="user atlas: label image on the template grid")
    table = File(exists=True, desc="user atlas: TSV with index and name (and hemisphere, source, kind)")
    name = traits.Str("custom", usedefault=True, desc="user atlas: template name for space- entities")


class _AtlasOutputSpec(TraitedSpec):
    template = File(exists=True)
    brain_mask = File(exists=True)
    labels = File(exists=True)
    table = File(exists=True)
    name = traits.Str(desc="template identifier (space- entity)")
    provenance = traits.Dict()


class Atlas(SimpleInterface):
    """The atlas (template, brain mask, labels, label table): the built-in one, assembled from
    installed packages' files (:func:`qsmflow.segmentation.build_default_atlas`), or a user's."""

    input_spec = _AtlasInputSpec
    output_spec = _AtlasOutputSpec

    def _run_interface(self, runtime):
        from .. import segmentation

        given = [isdefined(v) for v in (self.inputs.template, self.inputs.labels, self.inputs.table)]
        if any(given) and not all(given):
            raise ValueError("segmentation.atlas needs all of template, labels and table")
        if all(given):
            atlas = segmentation.load_user_atlas(self.inputs.template, self.inputs.labels, self.inputs.table,
                                                 name=self.inputs.name)
            provenance = {"Atlas": "user", "Template": str(self.inputs.template), "Labels": str(self.inputs.labels),
                          "Table": str(self.inputs.table)}
        else:
            atlas = segmentation.default_atlas()
            provenance = {**function_provenance(segmentation.build_default_atlas, {}),
                          "Template": segmentation.DEFAULT_TEMPLATE,
                          "Licences": segmentation.SOURCE_LICENCES}
        reference = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), atlas.affine)
        self._results["template"] = save_like(atlas.template, reference, "template.nii.gz")
        self._results["brain_mask"] = save_like(atlas.brain_mask, reference, "template_brain_mask.nii.gz", dtype=np.uint8)
        self._results["labels"] = save_like(atlas.labels, reference, "template_labels.nii.gz", dtype=np.int16)
        self._results["table"] = segmentation.write_table(Path("labels.tsv").resolve(), atlas.table)
        self._results["name"] = atlas.name
        self._results["provenance"] = provenance
        return runtime


def _load_atlas(template, brain_mask, labels, table, name):
    from .. import segmentation

    template_data, image = load_volume(template)
    return segmentation.Atlas(
        template=template_data, brain_mask=load_volume(brain_mask, dtype=np.uint8)[0] > 0,
        labels=load_volume(labels, dtype=np.int16)[0], affine=image.affine, table=segmentation.read_table(table),
        name=name)


# ---------------------------------------------------------------------------------------------
class _T1wInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="the session's T1w image")
    magnitude = File(exists=True, mandatory=True, desc="magnitude (3-D or 4-D; the first echo is used)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask in the magnitude's grid")
    seed = traits.Int(20240601, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads (set from the node's n_procs)")


class _T1wOutputSpec(TraitedSpec):
    t1w = File(exists=True, desc="T1w resampled into the magnitude's grid (rigid)")
    transform = File(exists=True, desc="T1w -> magnitude rigid transform (ITK composite HDF5)")
    provenance = traits.Dict()


class RegisterT1wToMagnitude(SimpleInterface):
    """Rigid registration of the T1w to the first-echo magnitude (mutual information)."""

    input_spec = _T1wInputSpec
    output_spec = _T1wOutputSpec

    def _run_interface(self, runtime):
        from .. import registration

        magnitude, image = load_volume(self.inputs.magnitude)
        t1w, t1w_image = load_volume(self.inputs.t1w)
        if t1w.ndim != 3:
            raise ValueError(f"{self.inputs.t1w}: expected a 3-D T1w image, found shape {t1w.shape}")
        mask = load_volume(self.inputs.brain_mask, dtype=np.uint8)[0] > 0
        from ..segmentation import registration_target

        target, region = registration_target(_first_echo(magnitude), mask, _voxel_size(image))
        fixed = registration.to_ants(target, image.affine)
        result = registration.register(fixed, registration.to_ants(t1w, t1w_image.affine), transform="rigid",
                                       fixed_mask=registration.to_ants(region.astype(np.float32), image.affine),
                                       seed=self.inputs.seed, threads=self.inputs.num_threads,
                                       output_dir=Path("t1w_registration").resolve())
        resampled = registration.apply_transform(fixed, registration.to_ants(t1w, t1w_image.affine), result.forward)
        self._results["t1w"] = save_like(resampled.numpy(), image, "t1w_in_magnitude.nii.gz")
        self._results["transform"] = result.forward[0]
        self._results["provenance"] = result.provenance()
        return runtime


# ---------------------------------------------------------------------------------------------
class _RegisterInputSpec(BaseInterfaceInputSpec):
    target = File(exists=True, mandatory=True, desc="subject image: magnitude (4-D: all echoes) or T1w in its grid")
    brain_mask = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True)
    template_brain_mask = File(exists=True, mandatory=True)
    labels = File(exists=True, mandatory=True, desc="atlas labels on the template grid")
    table = File(exists=True, mandatory=True)
    template_name = traits.Str(mandatory=True)
    preset = traits.Str("default", usedefault=True)
    stages = traits.Dict(value={}, usedefault=True, desc="stage overrides of the preset")
    seed = traits.Int(20240601, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads (set from the node's n_procs)")
    chi = File(exists=True, desc="the scan's susceptibility map (any reference), for the susceptibility channel")
    qsm_mask = File(exists=True, desc="where chi is valid")
    susceptibility_weight = traits.Float(0.0, usedefault=True,
                                         desc="share of the susceptibility channel in the metric (0: magnitude only)")
    susceptibility_stages = traits.List(traits.Str, value=["syn"], usedefault=True,
                                        desc="stages that use the susceptibility channel")
    template_chi = File(exists=True, desc="a susceptibility template on the template grid (a built atlas cohort's "
                                          "Chimap): the channel's template instead of the label prior")
    source_labels = File(exists=True, desc="the labels on their own grid (a built atlas' labelled template), "
                                           "carried in one resampling through label_transforms")
    label_transforms = InputMultiObject(File(exists=True), desc="template points -> source_labels points")


class _RegisterOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="template -> subject (ITK composite HDF5)")
    inverse_transform = File(exists=True, desc="subject -> template (ITK composite HDF5)")
    labels = File(exists=True, desc="atlas labels in the subject grid (genericLabel)")
    warped_template = File(exists=True, desc="template in the subject grid (linear)")
    provenance = traits.Dict()


class RegisterTemplate(SimpleInterface):
    """Template → subject registration (rigid, affine, SyN) and the atlas labels carried along
    (:func:`qsmflow.segmentation.template_to_subject`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from .. import segmentation

        target, image = load_volume(self.inputs.target)
        mask = load_volume(self.inputs.brain_mask, dtype=np.uint8)[0] > 0
        atlas = _load_atlas(self.inputs.template, self.inputs.template_brain_mask, self.inputs.labels,
                            self.inputs.table, self.inputs.template_name)
        optional = {name: getattr(self.inputs, name) if isdefined(getattr(self.inputs, name)) else None
                    for name in ("template_chi", "source_labels", "label_transforms")}
        segmentation.with_cohort_inputs(atlas, chi=optional["template_chi"], source_labels=optional["source_labels"],
                                        label_transforms=optional["label_transforms"] or [])
        chi = qsm_mask = None
        if self.inputs.susceptibility_weight:
            if not (isdefined(self.inputs.chi) and isdefined(self.inputs.qsm_mask)):
                raise ValueError("segmentation.registration.susceptibility_weight > 0 needs the scan's chi and QSM mask")
            chi = load_volume(self.inputs.chi)[0]
            qsm_mask = load_volume(self.inputs.qsm_mask, dtype=np.uint8)[0] > 0
        labels, warped, result = segmentation.template_to_subject(
            target, mask, image.affine, atlas, preset=self.inputs.preset, stages=self.inputs.stages,
            seed=self.inputs.seed, threads=self.inputs.num_threads, output_dir=Path("registration").resolve(),
            chi=chi, qsm_mask=qsm_mask, susceptibility_weight=self.inputs.susceptibility_weight,
            susceptibility_stages=tuple(self.inputs.susceptibility_stages))
        self._results["labels"] = save_like(labels, image, "atlas_labels.nii.gz", dtype=np.int16)
        self._results["warped_template"] = save_like(warped, image, "template_in_subject.nii.gz")
        self._results["forward_transform"] = result.forward[0]
        self._results["inverse_transform"] = result.inverse[0]
        self._results["provenance"] = {**result.provenance(), "Preset": self.inputs.preset,
                                       "Template": self.inputs.template_name,
                                       **({"SusceptibilityPrior": str(self.inputs.template_chi)
                                           if isdefined(self.inputs.template_chi) else
                                           "qsmflow.segmentation.susceptibility_prior (atlas labels, PRIOR_CHI)"}
                                          if self.inputs.susceptibility_weight else {}),
                                       **({"LabelsCarriedFrom": str(self.inputs.source_labels)}
                                          if atlas.label_source is not None else {})}
        return runtime


# ---------------------------------------------------------------------------------------------
class _LabelsInputSpec(BaseInterfaceInputSpec):
    labels = File(exists=True, mandatory=True, desc="atlas labels in the subject grid")
    table = File(exists=True, mandatory=True)
    chi = File(exists=True, mandatory=True, desc="susceptibility (any reference: the refinement is offset-invariant)")
    qsm_mask = File(exists=True, mandatory=True)
    refine = traits.List(traits.Str, value=["RN", "SN", "DN", "GP"], usedefault=True,
                         desc="ROIs refined in the Chimap: RN, SN, DN narrowed to their paramagnetic core, "
                              "GP's boundary against its labelled neighbours moved to its contrast")


class _LabelsOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc="subject-space label image")
    dseg_tsv = File(exists=True, desc="label table")
    provenance = traits.Dict()


class SubjectLabels(SimpleInterface):
    """Final subject-space labels: the warped atlas, with the small iron-rich nuclei narrowed to
    their paramagnetic core and then GP's boundary moved to its contrast
    (:func:`qsmflow.segmentation.refine_labels`)."""

    input_spec = _LabelsInputSpec
    output_spec = _LabelsOutputSpec

    def _run_interface(self, runtime):
        from .. import segmentation

        labels, image = load_volume(self.inputs.labels, dtype=np.int16)
        chi, _ = load_volume(self.inputs.chi)
        mask = load_volume(self.inputs.qsm_mask, dtype=np.uint8)[0] > 0
        table = segmentation.read_table(self.inputs.table)
        labels, settings = segmentation.refine_labels(labels, chi, table, rois=tuple(self.inputs.refine),
                                                      voxel_size=_voxel_size(image), mask=mask)
        provenance = {}
        if "cores" in settings:
            provenance["Refinement"] = function_provenance(segmentation.refine_by_contrast,
                                                           {"rois": settings["cores"], "fraction": settings["fraction"]})
        if "boundaries" in settings:
            provenance["BoundaryRefinement"] = function_provenance(segmentation.refine_boundaries,
                                                                   {"rois": settings["boundaries"],
                                                                    "band_mm": segmentation.BOUNDARY_BAND_MM})
        if "boundaries_skipped" in settings:
            provenance["BoundaryRefinement"] = "skipped: " + settings["boundaries_skipped"]
        self._results["dseg"] = save_like(labels, image, "dseg.nii.gz", dtype=np.int16)
        shutil.copyfile(self.inputs.table, "dseg.tsv")
        self._results["dseg_tsv"] = str(Path("dseg.tsv").resolve())
        self._results["provenance"] = provenance or {"Refinement": "none (segmentation.refine is empty)"}
        return runtime


# ---------------------------------------------------------------------------------------------
class _StatsInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="referenced susceptibility (ppm)")
    dseg = File(exists=True, mandatory=True)
    dseg_tsv = File(exists=True, mandatory=True)
    qsm_mask = File(exists=True, mandatory=True)
    reference = traits.Str(mandatory=True, desc="reference region, written into every row")
    erosion_mm = traits.Float(0.0, usedefault=True)
    inside_qsm_mask = traits.Bool(True, usedefault=True, desc="count only voxels inside the QSM mask")


class _StatsOutputSpec(TraitedSpec):
    roistats = File(exists=True)


class RoiStatistics(SimpleInterface):
    """One row per ROI: voxels, volume, mean, median, std, min, max (ppm) and the reference
    (:func:`qsmflow.segmentation.roi_statistics`)."""

    input_spec = _StatsInputSpec
    output_spec = _StatsOutputSpec

    def _run_interface(self, runtime):
        from .. import segmentation

        chi, image = load_volume(self.inputs.chi)
        labels = load_volume(self.inputs.dseg, dtype=np.int16)[0]
        mask = load_volume(self.inputs.qsm_mask, dtype=np.uint8)[0] > 0 if self.inputs.inside_qsm_mask else None
        rows = segmentation.roi_statistics(chi, labels, segmentation.read_table(self.inputs.dseg_tsv),
                                           voxel_size=_voxel_size(image), mask=mask,
                                           erosion_mm=self.inputs.erosion_mm, reference=self.inputs.reference)
        self._results["roistats"] = segmentation.write_roistats(Path("roistats.tsv").resolve(), rows)
        return runtime


# ---------------------------------------------------------------------------------------------
class _ToTemplateInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True)
    qsm_mask = File(exists=True, mandatory=True)
    inverse_transform = File(exists=True, mandatory=True, desc="subject -> template transform")
    template = File(exists=True, mandatory=True, desc="its grid is the output grid")


class _ToTemplateOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="susceptibility in template space (ppm; 0 outside the warped QSM mask)")


class ResampleToTemplate(SimpleInterface):
    """The Chimap resampled into template space (linear), zero outside the warped QSM mask."""

    input_spec = _ToTemplateInputSpec
    output_spec = _ToTemplateOutputSpec

    def _run_interface(self, runtime):
        from .. import registration

        chi, image = load_volume(self.inputs.chi)
        mask = load_volume(self.inputs.qsm_mask, dtype=np.uint8)[0]
        template, template_image = load_volume(self.inputs.template)
        reference = registration.to_ants(template, template_image.affine)
        transforms = [self.inputs.inverse_transform]
        moved = registration.apply_transform(reference, registration.to_ants(chi, image.affine), transforms).numpy()
        inside = registration.apply_transform(reference, registration.to_ants(mask, image.affine), transforms,
                                              interpolation="nearestNeighbor").numpy() > 0
        self._results["chi"] = save_like(np.where(inside, moved, 0.0), template_image, "chi_template.nii.gz")
        return runtime
