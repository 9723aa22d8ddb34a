"""Write derivatives into the BIDS derivatives dataset, atomically: one writer for every level.

:class:`WriteDerivatives` writes any list of files under BIDS names built by
:func:`qsmflow.bids.derivative_path` (any entity: ``space``, ``atlas``, ``desc``, ``cohort``,
``tpl``, ``res``, ``from``/``to``/``mode`` ...). :class:`WriteScanDerivatives` is the
reconstruction's use of it: a scan's maps with the sidecars that state their provenance.
"""
from __future__ import annotations

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

from ..bids import write_derivative

#: Order of the stages whose provenance the workflow passes to :class:`WriteScanDerivatives`.
PROVENANCE_STAGES = ("load", "mask", "unwrap", "echoes", "background", "inversion", "reference", "r2star")


class _WriteDerivativesInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="root of the derivatives dataset")
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="files to write, in the order of specs")
    specs = traits.List(traits.Dict, mandatory=True, desc=(
        "one dict per file: entities (dict), suffix, and optionally extension, datatype (default anat) and "
        "metadata (the JSON sidecar); written in this order, so the unit's done-marker goes last"))
    metadata = traits.List(traits.Dict, desc=(
        "one dict per file, in the order of specs, merged into its sidecar (what earlier nodes did, "
        "e.g. the registration's settings); {} for none"))


class _WriteDerivativesOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="the derivatives written, in order")


class WriteDerivatives(SimpleInterface):
    """Write files into the derivatives dataset under BIDS names (:func:`qsmflow.bids.write_derivative`).

    Files are written in the order given, each through a temporary file and a rename, so a
    file under its final name is complete and, when the last one exists, so are all the
    others. Files whose content is unchanged are not rewritten. The node should run every time
    (``node.overwrite = True``): it is cheap and restores outputs deleted since the last run.
    """

    input_spec = _WriteDerivativesInputSpec
    output_spec = _WriteDerivativesOutputSpec

    def _run_interface(self, runtime):
        if len(self.inputs.in_files) != len(self.inputs.specs):
            raise ValueError(f"{len(self.inputs.in_files)} files for {len(self.inputs.specs)} derivative specs")
        updates = list(self.inputs.metadata) if isdefined(self.inputs.metadata) else [{}] * len(self.inputs.specs)
        if len(updates) != len(self.inputs.specs):
            raise ValueError(f"{len(updates)} metadata updates for {len(self.inputs.specs)} derivative specs")
        written = []
        for source, spec, update in zip(self.inputs.in_files, self.inputs.specs, updates):
            metadata = {**(spec.get("metadata") or {}), **update} if update else spec.get("metadata")
            written.append(str(write_derivative(
                self.inputs.output_dir, source, spec["entities"], spec["suffix"], extension=spec.get("extension"),
                datatype=spec.get("datatype", "anat"), metadata=metadata,
            )))
        self._results["out_files"] = written
        return runtime


class _WriteScanInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="root of the derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the scan (subject, session, ...)")
    source_files = InputMultiObject(traits.Str, mandatory=True, desc="input images, relative to the BIDS root")
    scan_metadata = traits.Dict(value={}, usedefault=True, desc="echo times, field strength, ...")
    magnitude = File(exists=True, mandatory=True, desc="first-echo magnitude (raw input), for the field maps")
    chi = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    qsm_mask = File(exists=True, mandatory=True)
    total_field = File(exists=True, mandatory=True)
    local_field = File(exists=True, mandatory=True)
    r2star = File(exists=True)
    provenance = traits.List(traits.Dict, mandatory=True, desc="provenance of each stage, in PROVENANCE_STAGES order")


class _WriteScanOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))
    chimap = File(exists=True)


class WriteScanDerivatives(SimpleInterface):
    """Write a finished scan's maps into the derivatives dataset with JSON sidecars.

    ``anat/``: Chimap, R2*map, brain and QSM masks; ``fmap/``: the total (Hz) and local (ppm)
    field maps with the first-echo magnitude they belong to (BIDS requires a field map's
    magnitude). All are written only once every stage has succeeded, the Chimap last: a Chimap
    under its final name means the scan is complete.
    """

    input_spec = _WriteScanInputSpec
    output_spec = _WriteScanOutputSpec

    def _run_interface(self, runtime):
        provenance = dict(zip(PROVENANCE_STAGES, self.inputs.provenance))
        common = {
            "Sources": [f"bids:raw:{path}" for path in self.inputs.source_files],
            **self.inputs.scan_metadata,
        }
        outputs = [
            (self.inputs.brain_mask, "mask", "anat", {"desc": "brain"}, {
                "Type": "Brain", "Units": "arbitrary", "Masking": provenance.get("mask")}),
            (self.inputs.qsm_mask, "mask", "anat", {"desc": "qsm"}, {
                "Type": "Brain",
                "Units": "arbitrary",
                "Description": "voxels where the local field and Chimap are valid (brain mask after background removal)",
                "BackgroundFieldRemoval": provenance.get("background"),
            }),
            (self.inputs.magnitude, "magnitude", "fmap", {}, {
                "Units": "arbitrary",
                "Description": "first-echo magnitude of the scan, as acquired",
                "EchoTime": (self.inputs.scan_metadata.get("EchoTime") or [None])[0],
            }),
            (self.inputs.total_field, "fieldmap", "fmap", {"desc": "total"}, {
                "Units": "Hz",
                "Description": "total field offset from the multi-echo phase (background not removed)",
                "PhaseInput": provenance.get("load"),
                "PhaseUnwrapping": provenance.get("unwrap"),
                "EchoCombination": provenance.get("echoes"),
            }),
            (self.inputs.local_field, "fieldmap", "fmap", {"desc": "local"}, {
                "Units": "ppm",
                "Description": "local (tissue) field in ppm of B0, after background field removal",
                "BackgroundFieldRemoval": provenance.get("background"),
            }),
        ]
        if isdefined(self.inputs.r2star):
            outputs.append((self.inputs.r2star, "R2starmap", "anat", {}, {
                "Units": "1/s", "R2starFit": provenance.get("r2star")}))
        outputs.append((self.inputs.chi, "Chimap", "anat", {}, {
            "Units": "ppm",
            "Description": "magnetic susceptibility (QSM)",
            "PhaseInput": provenance.get("load"),
            "Masking": provenance.get("mask"),
            "PhaseUnwrapping": provenance.get("unwrap"),
            "EchoCombination": provenance.get("echoes"),
            "BackgroundFieldRemoval": provenance.get("background"),
            "DipoleInversion": provenance.get("inversion"),
            "SusceptibilityReference": provenance.get("reference"),
        }))
        written = []
        for source, suffix, datatype, extra_entities, sidecar in outputs:
            metadata = {**common, **{k: v for k, v in sidecar.items() if v is not None}}
            target = write_derivative(self.inputs.output_dir, source, {**self.inputs.entities, **extra_entities}, suffix,
                                      datatype=datatype, metadata=metadata)
            written.append(str(target))
        self._results["out_files"] = written
        self._results["chimap"] = written[-1]
        return runtime
