"""Write a scan's derivatives into the BIDS derivatives dataset, atomically and all at once."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
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

from ..bids import atomic_write_bytes, derivative_path, json_bytes


#: Order of the stages whose provenance the workflow passes to :class:`WriteScanDerivatives`.
PROVENANCE_STAGES = ("load", "mask", "unwrap", "echoes", "background", "inversion", "reference", "r2star")


def nifti_gz_bytes(path) -> bytes:
    """The image at ``path`` as reproducible ``.nii.gz`` bytes (gzip header without a time)."""
    image = nib.load(str(path))
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


class _WriteInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="root of the derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the scan (subject, session, ...)")
    source_files = InputMultiObject(traits.Str, mandatory=True, desc="input images, relative to the BIDS root")
    scan_metadata = traits.Dict(value={}, usedefault=True, desc="echo times, field strength, ...")
    chi = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    qsm_mask = File(exists=True, mandatory=True)
    total_field = File(exists=True, mandatory=True)
    local_field = File(exists=True, mandatory=True)
    r2star = File(exists=True)
    provenance = traits.List(traits.Dict, mandatory=True, desc="provenance of each stage, in PROVENANCE_STAGES order")


class _WriteOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))
    chimap = File(exists=True)


class WriteScanDerivatives(SimpleInterface):
    """Copy a finished scan's maps into the derivatives dataset with JSON sidecars.

    All maps of one scan are written only once every stage has succeeded, each through a
    temporary file and a rename, the Chimap last: a Chimap under its final name means the
    scan is complete. Files whose content is unchanged are left untouched.
    """

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_interface(self, runtime):
        provenance = dict(zip(PROVENANCE_STAGES, self.inputs.provenance))
        common = {
            "Sources": [f"bids:raw:{path}" for path in self.inputs.source_files],
            **self.inputs.scan_metadata,
        }
        outputs = [
            (self.inputs.brain_mask, "mask", "brain", {"Type": "Brain", "Units": "arbitrary", "Masking": provenance.get("mask")}),
            (self.inputs.qsm_mask, "mask", "qsm", {
                "Type": "Brain",
                "Units": "arbitrary",
                "Description": "voxels where the local field and Chimap are valid (brain mask after background removal)",
                "BackgroundFieldRemoval": provenance.get("background"),
            }),
            (self.inputs.total_field, "fieldmap", "total", {
                "Units": "Hz",
                "Description": "total field offset from the multi-echo phase (background not removed)",
                "PhaseInput": provenance.get("load"),
                "PhaseUnwrapping": provenance.get("unwrap"),
                "EchoCombination": provenance.get("echoes"),
            }),
            (self.inputs.local_field, "fieldmap", "local", {
                "Units": "ppm",
                "Description": "local (tissue) field in ppm of B0, after background field removal",
                "BackgroundFieldRemoval": provenance.get("background"),
            }),
        ]
        if isdefined(self.inputs.r2star):
            outputs.append((self.inputs.r2star, "R2starmap", None, {"Units": "1/s", "R2starFit": provenance.get("r2star")}))
        outputs.append((self.inputs.chi, "Chimap", None, {
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
        for source, suffix, desc, sidecar in outputs:
            target = derivative_path(self.inputs.output_dir, self.inputs.entities, suffix, desc=desc)
            metadata = {**common, **{k: v for k, v in sidecar.items() if v is not None}}
            _write_if_changed(target.with_name(target.name.replace(".nii.gz", ".json")), json_bytes(metadata))
            _write_if_changed(target, nifti_gz_bytes(source))
            written.append(str(target))
        self._results["out_files"] = written
        self._results["chimap"] = written[-1]
        return runtime
