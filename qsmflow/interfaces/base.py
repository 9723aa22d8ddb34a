"""NIfTI input/output and provenance shared by qsmflow's interfaces."""
from __future__ import annotations

import inspect
import re
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


def docstring_references(function) -> list[str]:
    """The entries of the ``References`` section of a numpy-style docstring, one string each.

    Entries start with ``.. [n]`` (continuation lines are joined); without such markers each
    paragraph is one entry. Empty when there is no such section.
    """
    lines = (inspect.getdoc(function) or "").splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.strip() == "References" and set(lines[index + 1].strip()) == {"-"}:
            break
    else:
        return []
    section = []
    for number, line in enumerate(lines[index + 2:], start=index + 2):
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if line.strip() and following.strip() and set(following.strip()) == {"-"}:
            break  # the next section's heading
        section.append(line.strip())
    entries, current = [], []
    for line in section + [""]:
        starts_entry = re.match(r"^\.\. \[[^\]]+\]\s*", line)
        if starts_entry or not line:
            if current:
                entries.append(" ".join(current))
            current = [line[starts_entry.end():]] if starts_entry else []
        else:
            current.append(line)
    return entries


def function_provenance(function, parameters: dict) -> dict:
    """Name, effective keyword parameters (given or default), summary and papers of an algorithm."""
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
        "References": docstring_references(function),
    }
