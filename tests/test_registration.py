"""qsmflow.registration: image conversion, rigid/affine/SyN registration, label-safe resampling."""
import numpy as np
import pytest
from scipy import ndimage

from qsmflow import registration
from qsmflow.simulate import affine_for_b0_direction

ants = pytest.importorskip("ants")


def _blobs(shape=(40, 44, 36), voxel=3.0, shift_mm=(0.0, 0.0, 0.0)):
    """Smooth piecewise-constant volume with labelled ellipsoids (mm coordinates, centred)."""
    axes = [(np.arange(n) - (n - 1) / 2) * voxel for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    x, y, z = x - shift_mm[0], y - shift_mm[1], z - shift_mm[2]
    head = (x / 50) ** 2 + (y / 58) ** 2 + (z / 45) ** 2 <= 1
    labels = np.zeros(shape, np.int16)
    for value, (c, r) in {3: ((-18, 10, 5), (9, 14, 10)), 7: ((20, -12, 0), (11, 9, 12)),
                          9: ((0, 25, -15), (14, 8, 8))}.items():
        labels[((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1] = value
    image = np.where(head, 100.0, 0.0) + 60.0 * (labels == 3) - 40.0 * (labels == 7) + 90.0 * (labels == 9)
    return ndimage.gaussian_filter(image, 0.7).astype(np.float32), labels


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def test_conversion_round_trip_keeps_oblique_affine():
    affine = affine_for_b0_direction((0.2, -0.1, 1.0), (2.0, 2.5, 3.0), (10, 12, 8))
    data = np.random.default_rng(0).random((10, 12, 8)).astype(np.float32)
    image = registration.to_ants(data, affine)
    back, back_affine = registration.to_array(image)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    np.testing.assert_allclose(image.spacing, (2.0, 2.5, 3.0), atol=1e-6)


def test_conversion_matches_ants_reading_the_nifti(tmp_path):
    import nibabel as nib

    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (40.0, -50.0, -30.0)
    data = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "image.nii.gz")
    read = ants.image_read(str(tmp_path / "image.nii.gz"))
    mine = registration.to_ants(data, affine)
    np.testing.assert_array_equal(read.numpy(), mine.numpy())
    np.testing.assert_allclose(read.origin, mine.origin, atol=1e-5)
    np.testing.assert_allclose(read.direction, mine.direction, atol=1e-6)


def test_shear_is_refused():
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        registration.to_ants(np.zeros((4, 4, 4)), affine)


def test_rigid_registration_recovers_a_shift_and_is_reproducible(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -(np.array((40, 44, 36)) - 1) / 2 * 3.0
    fixed_data, fixed_labels = _blobs()
    moving_data, moving_labels = _blobs(shift_mm=(7.0, -5.0, 4.0))
    fixed = registration.to_ants(fixed_data, affine)
    moving = registration.to_ants(moving_data, affine)
    before = _dice(fixed_labels == 7, moving_labels == 7)
    first = registration.register(fixed, moving, transform="rigid", threads=1, output_dir=tmp_path / "a")
    second = registration.register(fixed, moving, transform="rigid", threads=1, output_dir=tmp_path / "b")
    np.testing.assert_array_equal(first.warped.numpy(), second.warped.numpy())
    labels = registration.apply_transform(fixed, registration.to_ants(moving_labels, affine), first.forward,
                                          interpolation="genericLabel").numpy()
    assert set(np.unique(labels)) <= {0, 3, 7, 9}
    for value in (3, 7, 9):
        assert _dice(labels == value, fixed_labels == value) > 0.9, value
    assert before < 0.6
    # The inverse transform takes the fixed image back onto the moving one.
    back = registration.apply_transform(moving, fixed, first.inverse).numpy()
    assert np.corrcoef(back.ravel(), moving_data.ravel())[0, 1] > 0.98
    assert first.provenance()["Stages"][0]["Transform"] == "rigid"
    assert first.forward[0].endswith("Composite.h5")


def test_syn_recovers_a_local_deformation(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    fixed_data, fixed_labels = _blobs()
    # Deform the moving image: a smooth displacement of up to ~6 mm.
    shape = fixed_data.shape
    grid = np.indices(shape, dtype=np.float32)
    bump = np.exp(-(((grid[0] - 12) ** 2 + (grid[1] - 26) ** 2 + (grid[2] - 20) ** 2) / (2 * 6.0**2)))
    coordinates = grid + np.stack([2.0 * bump, -1.5 * bump, 0.5 * bump])
    moving_data = ndimage.map_coordinates(fixed_data, coordinates, order=1)
    moving_labels = ndimage.map_coordinates(fixed_labels, coordinates, order=0)
    fixed = registration.to_ants(fixed_data, affine)
    moving = registration.to_ants(moving_data, affine)
    result = registration.register(fixed, moving, transform="syn", threads=1, output_dir=tmp_path,
                                   stages={"rigid": {"iterations": (200, 100, 0), "shrink_factors": (4, 2, 1),
                                                     "smoothing_sigmas": (2, 1, 0)},
                                           "affine": {"iterations": (200, 100, 0), "shrink_factors": (4, 2, 1),
                                                      "smoothing_sigmas": (2, 1, 0)},
                                           "syn": {"iterations": (100, 70, 50), "shrink_factors": (4, 2, 1),
                                                   "smoothing_sigmas": (2, 1, 0), "gradient_step": 0.25}})
    labels = registration.apply_transform(fixed, registration.to_ants(moving_labels, affine), result.forward,
                                          interpolation="genericLabel").numpy()
    assert _dice(labels == 3, fixed_labels == 3) > _dice(moving_labels == 3, fixed_labels == 3)
    assert _dice(labels == 3, fixed_labels == 3) > 0.88
    assert [s["Transform"] for s in result.provenance()["Stages"]] == ["rigid", "affine", "syn"]


def test_labels_are_never_interpolated_linearly(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    data, labels = _blobs((20, 22, 18))
    image = registration.to_ants(data, affine)
    result = registration.register(image, image, transform="rigid", threads=1, output_dir=tmp_path,
                                   stages={"rigid": {"iterations": (10, 0), "shrink_factors": (2, 1),
                                                     "smoothing_sigmas": (1, 0)}})
    shifted_affine = affine.copy()
    shifted_affine[:3, 3] = 1.3
    moved = registration.apply_transform(registration.to_ants(data, shifted_affine),
                                         registration.to_ants(labels, affine), result.forward,
                                         interpolation="nearestNeighbor").numpy()
    assert set(np.unique(moved)) <= {0, 3, 7, 9}
    with pytest.raises(ValueError, match="whole-number labels"):
        registration.apply_transform(image, registration.to_ants(data / 7.0, affine), result.forward,
                                     interpolation="genericLabel")
    with pytest.raises(ValueError, match="unknown interpolation"):
        registration.apply_transform(image, image, result.forward, interpolation="cubic")
    with pytest.raises(FileNotFoundError):
        registration.apply_transform(image, image, [str(tmp_path / "missing.h5")])


def test_bad_settings_are_named():
    image = registration.to_ants(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="unknown transform"):
        registration.register(image, image, transform="bspline")
    with pytest.raises(ValueError, match="unknown setting"):
        registration.register(image, image, transform="rigid", stages={"rigid": {"speed": 2}})
    with pytest.raises(ValueError, match="one value per level"):
        registration.register(image, image, transform="rigid", stages={"rigid": {"iterations": (10, 5)}})


def test_channels_become_weighted_metric_terms():
    """A channel adds a CC term of its weight to the stages it names; the main metric keeps the
    rest (the effect on a registration is measured by tests/benchmarks/segmentation.py)."""
    stage = registration.Stage(metric="cc", metric_parameter=2)
    plain = registration._stage_arguments("syn", stage, "F", "M")
    assert [a for a in plain if a.startswith("CC[")] == ["CC[F,M,1,2]"]
    both = registration._stage_arguments("syn", stage, "F", "M", [("F2", "M2", 0.3, 3)])
    assert [a for a in both if a.startswith("CC[")] == ["CC[F,M,0.7,2]", "CC[F2,M2,0.3,3]"]
    mixed = registration._stage_arguments("affine", registration.Stage(metric="cc+mattes"), "F", "M", [("F2", "M2", 0.5, 2)])
    metrics = [mixed[i + 1] for i, a in enumerate(mixed) if a == "--metric"]
    assert [m.split(",")[2] for m in metrics] == ["0.25", "0.25", "0.5"]
    image = registration.to_ants(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="weight"):
        registration.register(image, image, transform="rigid", channels=(registration.Channel(image, image, weight=1.0),))
    with pytest.raises(ValueError, match="add up"):
        registration.register(image, image, transform="rigid", channels=[registration.Channel(image, image, weight=0.6)] * 2)
    with pytest.raises(ValueError, match="unknown stage"):
        registration.register(image, image, transform="rigid",
                              channels=(registration.Channel(image, image, stages=("bspline",)),))


_PARENT = r"""
import sys, threading, time
import numpy as np
from qsmflow import registration

data = np.zeros((24, 24, 24), np.float32)
data[6:18, 5:19, 7:17] = 1.0
image = registration.to_ants(data, np.diag([2.0, 2.0, 2.0, 1.0]))
# A rigid stage that runs for minutes (no convergence test can stop it early).
stages = {"rigid": {"iterations": (10**7,), "shrink_factors": (1,), "smoothing_sigmas": (0,),
                    "convergence_threshold": 1e-30, "convergence_window": 10**6, "metric": "meansquares"}}
threading.Thread(target=registration.register, args=(image, image),
                 kwargs=dict(transform="rigid", stages=stages, threads=1, output_dir=sys.argv[1]), daemon=True).start()
time.sleep(600)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ants_child_dies_with_its_parent(tmp_path):
    """Kill a process in the middle of a registration: its antsRegistration child goes too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)])
    try:
        child = None
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            time.sleep(0.2)
            children = set()
            for task in os.listdir(f"/proc/{parent.pid}/task"):
                with open(f"/proc/{parent.pid}/task/{task}/children") as handle:
                    children |= {int(pid) for pid in handle.read().split()}
            for pid in children:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if b"antsRegistration" in handle.read():
                        child = pid
        assert child is not None, "the registration child did not start"
        time.sleep(1.0)
        assert os.path.exists(f"/proc/{child}")
    finally:
        parent.kill()
        parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(child):  # the test's own clean-up; the assertion below reports the failure
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the antsRegistration child outlived its killed parent")
