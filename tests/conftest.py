"""Shared fixtures: tiny BIDS datasets written on the fly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_gre_scan(root: Path, subject: str, *, session=None, acquisition=None, run=None, echo_times=(0.004, 0.008),
                   shape=(12, 12, 10), suffix="MEGRE", field_strength=3.0, phase_scale=1.0, affine=None, seed=0):
    """Write one small multi-echo scan (random magnitude, smooth phase) and its sidecars."""
    rng = np.random.default_rng(seed)
    directory = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    directory.mkdir(parents=True, exist_ok=True)
    entities = f"sub-{subject}" + (f"_ses-{session}" if session else "") + (f"_acq-{acquisition}" if acquisition else "") + (f"_run-{run}" if run else "")
    affine = np.diag([1.0, 1.0, 1.5, 1.0]) if affine is None else affine
    paths = []
    for number, echo_time in enumerate(echo_times, start=1):
        echo = f"_echo-{number}" if len(echo_times) > 1 else ""
        for part in ("mag", "phase"):
            if part == "mag":
                data = 100 + 10 * rng.random(shape)
            else:
                data = np.angle(np.exp(1j * np.linspace(-2, 2, int(np.prod(shape))).reshape(shape) * number)) * phase_scale
            path = directory / f"{entities}{echo}_part-{part}_{suffix}.nii.gz"
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
            sidecar = {"EchoTime": echo_time}
            if field_strength is not None:
                sidecar["MagneticFieldStrength"] = field_strength
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
            paths.append(path)
    return paths


@pytest.fixture
def bids_root(tmp_path):
    """An empty BIDS dataset (only dataset_description.json)."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    return root


def tree_digest(root: Path) -> dict:
    """SHA-256 of every file under ``root`` (to prove an input was not modified)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def bids_validator_errors(dataset: Path) -> list[str]:
    """Errors the official BIDS validator (``bids-validator-deno``, offline) reports for ``dataset``,
    one ``CODE location`` line each (warnings are left out). Fails the test when the validator
    cannot run: it is a test requirement (``pip install -e '.[test]'``)."""
    import shutil
    import subprocess
    import sys

    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    run = subprocess.run([validator, str(dataset), "--format", "json"], capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"bids-validator-deno did not report on {dataset} (exit {run.returncode}): {run.stderr[-2000:]}")
    return [f"{issue['code']} {issue.get('location', '')} {issue.get('issueMessage', '')[:200]}".strip()
            for issue in report["issues"]["issues"] if issue["severity"] == "error"]


#: Command-line settings for tests of the reconstruction and of the execution layer (caching,
#: failures, clusters): the participant level stops at the Chimap, referenced to the mean over
#: the QSM mask as before segmentation existed, without the per-subject report. Segmentation,
#: reference regions and reports have tests of their own.
RECONSTRUCTION_ONLY = ("--set", "segmentation.enabled=false", "--set", "reference.method=mean",
                       "--set", "report.enabled=false")


#: Command-line settings for tests that need the segmentation's outputs (names, sidecars, reports)
#: but not its accuracy (tests/test_segmentation.py measures that): a short registration schedule.
QUICK_REGISTRATION = ("--set", "segmentation.registration.stages.rigid.iterations=[100,50,0]",
                      "--set", "segmentation.registration.stages.affine.iterations=[100,50,0]",
                      "--set", "segmentation.registration.stages.syn.iterations=[10,5,0]")
