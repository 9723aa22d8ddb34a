"""nipype interfaces of the atlas level: each loads files, calls one qsmflow.atlas step, saves files."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _read(path):
    import ants

    try:
        return ants.image_read(str(path))
    except Exception as error:  # unreadable or truncated files
        raise ValueError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


def _first_volume(path):
    """A 3-D image from ``path``: the first volume (echo) of a 4-D image."""
    import ants

    image = _read(path)
    if image.dimension == 4:
        image = ants.slice_image(image, axis=3, idx=0)
    if image.dimension != 3:
        raise ValueError(f"{path}: expected a 3-D image (or 4-D echoes), got {image.dimension}-D")
    return image


def _write(image, name: str) -> str:
    import ants

    path = str(Path(name).resolve())
    ants.image_write(image.clone("float") if image.pixeltype != "float" else image, path)
    return path


def _on_grid(reference, image, *, labels=False):
    """``image`` on ``reference``'s grid (physical coordinates; images of a scan share them)."""
    import ants

    if image.shape == reference.shape and np.allclose(image.origin, reference.origin) and np.allclose(
            image.spacing, reference.spacing):
        return image
    return ants.resample_image_to_target(image, reference, interp_type="genericLabel" if labels else "linear")


class _HybridInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="Chimap (ppm)")
    magnitude = File(exists=True, mandatory=True, desc="magnitude (first echo) or T1w, same subject space")
    brain_mask = File(exists=True, mandatory=True)
    chi_weight = traits.Float(mandatory=True, desc="weight of chi (per ppm) in the hybrid")


class _HybridOutputSpec(TraitedSpec):
    hybrid = File(exists=True)
    intensity = File(exists=True, desc="the magnitude/T1w (3-D) on the Chimap's grid")
    chi = File(exists=True)
    brain_mask = File(exists=True)


class MakeHybrid(SimpleInterface):
    """Hybrid registration image of one scan (:func:`qsmflow.atlas.hybrid_image`)."""

    input_spec = _HybridInputSpec
    output_spec = _HybridOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import hybrid_image

        chi = _first_volume(self.inputs.chi)
        intensity = _on_grid(chi, _first_volume(self.inputs.magnitude))
        mask = _on_grid(chi, _first_volume(self.inputs.brain_mask), labels=True)
        if not np.all(np.isfinite(chi.numpy())):
            raise ValueError(f"{self.inputs.chi}: NaN or infinite voxels")
        try:
            hybrid = hybrid_image(intensity, chi, mask, chi_weight=self.inputs.chi_weight)
        except ValueError as error:
            raise ValueError(f"{self.inputs.magnitude}: {error}") from None
        self._results["hybrid"] = _write(hybrid, "hybrid.nii.gz")
        self._results["intensity"] = _write(intensity, "intensity.nii.gz")
        self._results["chi"] = _write(chi, "chi.nii.gz")
        self._results["brain_mask"] = _write(mask, "brain_mask.nii.gz")
        return runtime


class _InitialInputSpec(BaseInterfaceInputSpec):
    hybrids = InputMultiObject(File(exists=True), mandatory=True)
    masks = InputMultiObject(File(exists=True), mandatory=True)
    resolution_mm = traits.Either(None, traits.Float, default=None, usedefault=True)


class _TemplateOutputSpec(TraitedSpec):
    template = File(exists=True)


class InitialTemplate(SimpleInterface):
    """Unregistered average of the inputs (:func:`qsmflow.atlas.initial_template`)."""

    input_spec = _InitialInputSpec
    output_spec = _TemplateOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import initial_template

        template = initial_template([_read(p) for p in self.inputs.hybrids], [_read(p) for p in self.inputs.masks],
                                    resolution_mm=self.inputs.resolution_mm)
        self._results["template"] = _write(template, "initial_template.nii.gz")
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    template = File(exists=True, mandatory=True)
    template_mask = File(exists=True, desc="restricts the metric (from the second iteration)")
    hybrid = File(exists=True, mandatory=True)
    chi = File(exists=True, mandatory=True)
    intensity = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    transform = traits.Enum("rigid", "affine", "syn", mandatory=True)
    stages = traits.Dict(value={}, usedefault=True, desc="stage overrides (qsmflow.registration.register)")
    threads = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    forward = OutputMultiObject(File(exists=True), desc="template points -> subject")
    field = File(exists=True, desc="the forward transform as one displacement field on the template grid")
    hybrid = File(exists=True)
    chi = File(exists=True)
    intensity = File(exists=True)
    brain_mask = File(exists=True)


class RegisterToTemplate(SimpleInterface):
    """Register one input to the current template and resample its images into it."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import apply_transforms, displacement_field, register_to_template

        template = _read(self.inputs.template)
        mask = _read(self.inputs.template_mask) if isdefined(self.inputs.template_mask) else None
        result = register_to_template(template, _read(self.inputs.hybrid), Path.cwd(), transform=self.inputs.transform,
                                      stages=self.inputs.stages or None, template_mask=mask,
                                      threads=self.inputs.threads)
        self._results["forward"] = list(result.forward)
        self._results["field"] = displacement_field(template, result.forward, Path.cwd() / "field.nii.gz")
        for key, name in (("hybrid", "hybrid"), ("chi", "chi"), ("intensity", "intensity"), ("brain_mask", "brain_mask")):
            warped = apply_transforms(template, _read(getattr(self.inputs, key)), result.forward)
            self._results[key] = _write(warped, f"warped_{name}.nii.gz")
        return runtime


class _UpdateInputSpec(BaseInterfaceInputSpec):
    hybrids = InputMultiObject(File(exists=True), mandatory=True)
    chis = InputMultiObject(File(exists=True), mandatory=True)
    intensities = InputMultiObject(File(exists=True), mandatory=True)
    masks = InputMultiObject(File(exists=True), mandatory=True)
    fields = InputMultiObject(File(exists=True), mandatory=True)
    gradient_step = traits.Float(0.25, usedefault=True)
    blending_weight = traits.Float(0.75, usedefault=True)


class _UpdateOutputSpec(TraitedSpec):
    hybrid = File(exists=True)
    chi = File(exists=True)
    intensity = File(exists=True)
    brain_mask = File(exists=True)
    coverage = File(exists=True)
    update = OutputMultiObject(File(exists=True), desc="new template points -> old (put before a subject's transforms)")


class UpdateTemplate(SimpleInterface):
    """Average, shape update and sharpening of one iteration (:func:`qsmflow.atlas.update_template`)."""

    input_spec = _UpdateInputSpec
    output_spec = _UpdateOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import update_template

        warped = {key: [_read(p) for p in getattr(self.inputs, attribute)]
                  for key, attribute in (("hybrid", "hybrids"), ("chi", "chis"), ("intensity", "intensities"),
                                         ("mask", "masks"))}
        step = update_template(warped, list(self.inputs.fields), Path.cwd(), gradient_step=self.inputs.gradient_step,
                               blending_weight=self.inputs.blending_weight)
        for key in ("hybrid", "chi", "intensity", "coverage"):
            self._results[key] = _write(step[key], f"template_{key}.nii.gz")
        self._results["brain_mask"] = _write(step["mask"], "template_mask.nii.gz")
        self._results["update"] = list(step["update"])
        return runtime


class _ComposeInputSpec(BaseInterfaceInputSpec):
    reference = File(exists=True, mandatory=True, desc="grid of the composed field (the target template)")
    transforms = InputMultiObject(File(exists=True), mandatory=True, desc="reference points -> source, first applied first")


class _ComposeOutputSpec(TraitedSpec):
    transform = File(exists=True)


class ComposeTransforms(SimpleInterface):
    """A chain of transforms as one displacement field: one resampling from source to template."""

    input_spec = _ComposeInputSpec
    output_spec = _ComposeOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import displacement_field

        self._results["transform"] = displacement_field(_read(self.inputs.reference), list(self.inputs.transforms),
                                                        Path.cwd() / "composed_field.nii.gz")
        return runtime


class _ResampleInputSpec(BaseInterfaceInputSpec):
    reference = File(exists=True, mandatory=True)
    in_files = InputMultiObject(File(exists=True), mandatory=True)
    transforms = InputMultiObject(File(exists=True), mandatory=True)
    labels = traits.Bool(False, usedefault=True, desc="genericLabel interpolation")


class _ResampleOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))


class ResampleToTemplate(SimpleInterface):
    """Images resampled onto a template through one transform chain (one resampling each)."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import apply_transforms

        reference = _read(self.inputs.reference)
        outputs = []
        for index, path in enumerate(self.inputs.in_files):
            image = apply_transforms(reference, _read(path), list(self.inputs.transforms),
                                     interpolator="genericLabel" if self.inputs.labels else "linear")
            outputs.append(_write(image, f"resampled_{index:02d}_{Path(path).name.split('.')[0]}.nii.gz"))
        self._results["out_files"] = outputs
        return runtime


class _ParcellateInputSpec(BaseInterfaceInputSpec):
    hybrid = File(exists=True, mandatory=True)
    chi = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    template = File(exists=True, mandatory=True, desc="labelled template image (e.g. MNI T1w)")
    template_labels = File(exists=True, mandatory=True)
    template_mask = File(exists=True, desc="the template's brain mask")
    table = File(exists=True, mandatory=True, desc="the template's label table (TSV with index)")
    nucleus_labels = traits.Dict(mandatory=True, desc="nucleus -> label values redrawn from the chi contrast")
    stages = traits.Dict(value={}, usedefault=True)
    min_contrast = traits.Float(0.02, usedefault=True)
    surroundings = traits.Enum("local", "median", usedefault=True,
                               desc="threshold of the redrawn nuclei (qsmflow.atlas.delineate_nuclei)")
    threads = traits.Int(1, usedefault=True)


class _ParcellateOutputSpec(TraitedSpec):
    dseg = File(exists=True)
    dseg_tsv = File(exists=True)
    carried = File(exists=True, desc="the template's labels before the nuclei were redrawn")
    transform = File(exists=True, desc="atlas points -> labelled template points, one displacement field on the "
                                       "atlas grid (carries the template's labels to a scan in one resampling)")
    report = traits.Dict()


class Parcellate(SimpleInterface):
    """Whole-brain parcellation of a template (:func:`qsmflow.atlas.parcellate`)."""

    input_spec = _ParcellateInputSpec
    output_spec = _ParcellateOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import displacement_field, parcellate

        result = parcellate(_read(self.inputs.hybrid), _read(self.inputs.chi), _read(self.inputs.brain_mask),
                            _read(self.inputs.template), _read(self.inputs.template_labels),
                            {k: [int(v) for v in values] for k, values in self.inputs.nucleus_labels.items()},
                            Path.cwd(), template_mask=_read(self.inputs.template_mask) if isdefined(
                                self.inputs.template_mask) else None, stages=self.inputs.stages or None, threads=self.inputs.threads,
                            min_contrast=self.inputs.min_contrast, surroundings=self.inputs.surroundings)
        self._results["dseg"] = _write(result["labels"], "dseg.nii.gz")
        self._results["carried"] = _write(result["carried"], "carried_dseg.nii.gz")
        self._results["transform"] = displacement_field(_read(self.inputs.hybrid), result["transforms"],
                                                        Path.cwd() / "to_labelled_template_field.nii.gz")
        methods = {int(value): entry["method"] for value, entry in result["report"].items()}
        present = set(np.unique(result["labels"].numpy()).astype(int).tolist())
        path = Path("dseg.tsv").resolve()
        with open(self.inputs.table, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            columns = list(reader.fieldnames or []) + ["delineation"]
            rows = [row for row in reader if int(row["index"]) in present]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            for row in rows:
                value = int(row["index"])
                writer.writerow({**row, "delineation": {"contrast": "redrawn from the chi contrast within the prior",
                                                         "prior": "template label (contrast too low to redraw)"}.get(
                                                             methods.get(value), "template label")})
        self._results["dseg_tsv"] = str(path)
        self._results["report"] = {str(k): v for k, v in result["report"].items()}
        return runtime


class _ROIInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="a band's chi template in atlas space")
    dseg = File(exists=True, mandatory=True)
    label_names = traits.Dict(mandatory=True)
    band = traits.Dict(mandatory=True, desc="label, ages and subjects of the band")


class _ROIOutputSpec(TraitedSpec):
    roistats = File(exists=True)


class BandROIStatistics(SimpleInterface):
    """ROI susceptibility of a band template in atlas space (:func:`qsmflow.atlas.roi_susceptibility`)."""

    input_spec = _ROIInputSpec
    output_spec = _ROIOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import roi_susceptibility

        rows = roi_susceptibility(_read(self.inputs.chi).numpy(), np.round(_read(self.inputs.dseg).numpy()),
                                  {int(k): v for k, v in self.inputs.label_names.items()})
        path = Path("roistats.tsv").resolve()
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["cohort", "mean_age", "index", "name", "voxels", "mean", "median", "std"])
            for row in rows:
                if row["voxels"]:
                    writer.writerow([self.inputs.band["label"], f"{self.inputs.band['mean_age']:.3f}", row["index"],
                                     row["name"], row["voxels"], f"{row['mean']:.6f}", f"{row['median']:.6f}",
                                     f"{row['std']:.6f}"])
        self._results["roistats"] = str(path)
        return runtime


class _FiguresInputSpec(BaseInterfaceInputSpec):
    band_chis = InputMultiObject(File(exists=True), mandatory=True, desc="band chi templates in atlas space")
    band_labels = traits.List(traits.Str, mandatory=True)
    atlas_chi = File(exists=True, mandatory=True)
    atlas_dseg = File(exists=True, mandatory=True)
    atlas_mask = File(exists=True, mandatory=True)
    label_names = traits.Dict(mandatory=True)
    window = traits.Float(0.15, usedefault=True, desc="ppm: the montage shows -window..+window")


class _FiguresOutputSpec(TraitedSpec):
    montage = File(exists=True)
    parcellation = File(exists=True)


class AtlasFigures(SimpleInterface):
    """Montage of the band templates and the parcellation overlay (:mod:`qsmflow.reports.atlas`)."""

    input_spec = _FiguresInputSpec
    output_spec = _FiguresOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.registration import to_array
        from qsmflow.reports.atlas import plot_band_montage, plot_parcellation

        chis = [to_array(_read(p)) for p in self.inputs.band_chis]
        mask, affine = to_array(_read(self.inputs.atlas_mask))
        dseg, _ = to_array(_read(self.inputs.atlas_dseg))
        chi, _ = to_array(_read(self.inputs.atlas_chi))
        names = {int(k): v for k, v in self.inputs.label_names.items()}
        basal_ganglia = [value for value, name in names.items() if name.split("_")[0] in ("CN", "PU", "GP")]
        self._results["montage"] = str(plot_band_montage(
            Path("montage.png").resolve(), [c for c, _ in chis], affine, list(self.inputs.band_labels),
            dseg=np.where(np.isin(np.rint(dseg), basal_ganglia), dseg, 0), mask=mask, window=self.inputs.window))
        self._results["parcellation"] = str(plot_parcellation(
            Path("parcellation.png").resolve(), chi, dseg, affine,
            {int(k): v for k, v in self.inputs.label_names.items()}, mask=mask, window=self.inputs.window))
        return runtime


class _DescriptionInputSpec(BaseInterfaceInputSpec):
    atlas_dir = Directory(mandatory=True, desc="OUTPUT_DIR/atlas")
    name = traits.Str(mandatory=True)
    description = traits.Dict(mandatory=True)
    ready = InputMultiObject(File(exists=True), desc="written outputs this waits for")


class _DescriptionOutputSpec(TraitedSpec):
    description = File(exists=True)


class WriteTemplateDescription(SimpleInterface):
    """``atlas/tpl-<name>/template_description.json`` (TemplateFlow), written after everything else."""

    input_spec = _DescriptionInputSpec
    output_spec = _DescriptionOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.bids import json_bytes, write_if_changed

        path = Path(self.inputs.atlas_dir) / f"tpl-{self.inputs.name}" / "template_description.json"
        write_if_changed(path, json_bytes(self.inputs.description))
        self._results["description"] = str(path)
        return runtime


class _PageInputSpec(BaseInterfaceInputSpec):
    atlas_dir = Directory(mandatory=True)
    name = traits.Str(mandatory=True)
    montage = File(exists=True, mandatory=True)
    parcellation = File(exists=True, mandatory=True)
    roistats = InputMultiObject(File(exists=True), mandatory=True)
    correlations = InputMultiObject(File(exists=True), desc="per band: registered subjects vs template (TSV)")
    description = traits.Dict(mandatory=True)
    config = traits.Dict(value={}, usedefault=True)


class _PageOutputSpec(TraitedSpec):
    page = File(exists=True)


class AtlasReport(SimpleInterface):
    """The atlas's HTML page (:func:`qsmflow.reports.atlas.write_atlas_report`)."""

    input_spec = _PageInputSpec
    output_spec = _PageOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.reports.atlas import write_atlas_report

        self._results["page"] = str(write_atlas_report(
            Path(self.inputs.atlas_dir), self.inputs.name, montage=self.inputs.montage,
            parcellation=self.inputs.parcellation, roistats=list(self.inputs.roistats),
            correlations=list(self.inputs.correlations) if isdefined(self.inputs.correlations) else [],
            description=self.inputs.description, config=self.inputs.config))
        return runtime


class _CorrelationInputSpec(BaseInterfaceInputSpec):
    template = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)
    subjects = InputMultiObject(File(exists=True), mandatory=True, desc="hybrid images")
    transforms = InputMultiObject(File(exists=True), mandatory=True, desc="one composed field per subject")
    names = traits.List(traits.Str, mandatory=True)


class _CorrelationOutputSpec(TraitedSpec):
    table = File(exists=True)


class TemplateSharpness(SimpleInterface):
    """Correlation of every registered subject with its template inside the template's brain mask."""

    input_spec = _CorrelationInputSpec
    output_spec = _CorrelationOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.atlas import apply_transforms, masked_correlation

        template = _read(self.inputs.template)
        mask = _read(self.inputs.template_mask).numpy()
        path = Path("sharpness.tsv").resolve()
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["scan", "correlation"])
            for name, subject, transform in zip(self.inputs.names, self.inputs.subjects, self.inputs.transforms,
                                                strict=True):
                warped = apply_transforms(template, _read(subject), [transform])
                writer.writerow([name, f"{masked_correlation(warped.numpy(), template.numpy(), mask):.4f}"])
        self._results["table"] = str(path)
        return runtime
