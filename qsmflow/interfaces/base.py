"""NIfTI input/output and provenance shared by qsmflow's interfaces."""
from __future__ import annotations

import inspect
from pathlib import Path

import nibabel as nib
import numpy as np


def load_volume(path, *, dtype=np.float32) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI image's data as ``dtype`` together with the image (for affine/header)."""
    image = nib.load(str(path))
    try:
        data = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # truncated or corrupt files raise zlib, EOF or value errors
        raise ValueError(f"{path}: cannot read image data ({type(error).__name__}: {error})") from None
    return data, image


def save_like(data: np.ndarray, reference: nib.Nifti1Image, filename: str, *, dtype=np.float32) -> str:
    """Save ``data`` on the grid and affine of ``reference`` in the current directory."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header)
    image.header.set_xyzt_units("mm", "sec")
    path = Path(filename).resolve()
    nib.save(image, str(path))
    return str(path)


def function_provenance(function, parameters: dict) -> dict:
    """Name, effective keyword parameters (given or default) and summary of an algorithm."""
    effective = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.default is not inspect.Parameter.empty and parameter.name not in {"mask", "voxel_size", "b0_direction"}:
            effective[parameter.name] = parameter.default
    effective.update(parameters)
    doc = inspect.getdoc(function) or ""
    return {
        "Function": f"{function.__module__}.{function.__name__}",
        "Parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in effective.items()},
        "Description": doc.split("\n\n")[0].replace("\n", " "),
    }
