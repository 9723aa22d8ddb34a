"""The unit dipole kernel, the forward model and the FFT conventions shared by all stages.

Every FFT in :mod:`qsmflow.recon` goes through :func:`rfftn` / :func:`irfftn` here so that the
worker count and float32 policy are set in one place.
"""
from __future__ import annotations


import numpy as np
import scipy.fft

#: Reduced gyromagnetic ratio of the proton, in MHz/T (CODATA 2018).
GYROMAGNETIC_RATIO_MHZ_PER_T = 42.577478518


def fft_workers() -> int:
    """Number of threads for ``scipy.fft``: ``QSMFLOW_FFT_WORKERS``, else the CPUs this process
    may use (:func:`qsmflow.resources.thread_count`)."""
    from qsmflow.resources import thread_count

    return thread_count()


def rfftn(array: np.ndarray) -> np.ndarray:
    """Real 3-D FFT (complex64 for float32 input) with the configured number of workers."""
    return scipy.fft.rfftn(array, workers=fft_workers())


def irfftn(spectrum: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`rfftn` back to a real array of ``shape``."""
    return scipy.fft.irfftn(spectrum, s=shape, workers=fft_workers())


def hz_to_ppm(field_hz: np.ndarray, field_strength_t: float) -> np.ndarray:
    """Convert a field map in Hz to ppm of B0."""
    return field_hz / (GYROMAGNETIC_RATIO_MHZ_PER_T * field_strength_t)


def ppm_to_hz(field_ppm: np.ndarray, field_strength_t: float) -> np.ndarray:
    """Convert a field map in ppm of B0 to Hz."""
    return field_ppm * (GYROMAGNETIC_RATIO_MHZ_PER_T * field_strength_t)


def b0_direction_from_affine(affine: np.ndarray) -> np.ndarray:
    """Unit vector of the main field (scanner/world z) expressed in voxel axes.

    The columns of the affine's 3x3 part are the voxel axes in world (RAS+) coordinates,
    scaled by the voxel size. Projecting world z onto each normalised column gives the
    direction cosines of B0 in the voxel frame; an axial acquisition gives (0, 0, ±1).

    Parameters
    ----------
    affine : (4, 4) array
        NIfTI voxel-to-world affine.

    Returns
    -------
    (3,) float64 array with unit norm.
    """
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit_columns = columns / np.linalg.norm(columns, axis=0, keepdims=True)
    direction = unit_columns[2, :]
    return direction / np.linalg.norm(direction)


def voxel_sizes_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) from a voxel-to-world affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def kspace_grid(shape, voxel_size, real: bool = True):
    """Spatial-frequency coordinates (cycles/mm) of an FFT grid, broadcastable to 3-D.

    With ``real=True`` the last axis is the half spectrum of :func:`rfftn`.
    """
    nx, ny, nz = shape
    dx, dy, dz = (float(v) for v in voxel_size)
    kx = scipy.fft.fftfreq(nx, d=dx).astype(np.float32)[:, None, None]
    ky = scipy.fft.fftfreq(ny, d=dy).astype(np.float32)[None, :, None]
    last = scipy.fft.rfftfreq(nz, d=dz) if real else scipy.fft.fftfreq(nz, d=dz)
    kz = last.astype(np.float32)[None, None, :]
    return kx, ky, kz


def dipole_kernel(shape, voxel_size, b0_direction=(0.0, 0.0, 1.0), real: bool = True) -> np.ndarray:
    """Unit dipole response in k-space, D(k) = 1/3 - (k·b0)^2 / |k|^2.

    Continuous-kernel form (Salomir et al., Concepts Magn Reson B 2003;19B:26-34;
    Marques & Bowtell, Concepts Magn Reson B 2005;25B:65-78), built on the voxel grid so that
    anisotropic voxels and oblique B0 directions are exact. D(0) is set to 0: the mean
    susceptibility is not observable and every map is referenced afterwards.

    Parameters
    ----------
    shape : tuple of 3 ints
        Image grid (the spatial shape, not the spectrum's).
    voxel_size : sequence of 3 floats
        Voxel edge lengths in mm.
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes (see :func:`b0_direction_from_affine`).
    real : bool
        Return the half spectrum matching :func:`rfftn` (default) or the full spectrum.

    Returns
    -------
    float32 array of shape ``shape`` (``real=False``) or ``(nx, ny, nz // 2 + 1)``.
    """
    b = np.asarray(b0_direction, dtype=np.float64)
    b = (b / np.linalg.norm(b)).astype(np.float32)
    kx, ky, kz = kspace_grid(shape, voxel_size, real=real)
    k_dot_b = kx * b[0] + ky * b[1] + kz * b[2]
    k_squared = kx**2 + ky**2 + kz**2
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.float32(1.0 / 3.0) - k_dot_b**2 / k_squared
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32, copy=False)


def forward_field(chi: np.ndarray, voxel_size, b0_direction=(0.0, 0.0, 1.0), padding: int = 0) -> np.ndarray:
    """Field perturbation (ppm of B0) produced by a susceptibility distribution (ppm).

    Parameters
    ----------
    chi : 3-D array
        Susceptibility in ppm.
    voxel_size, b0_direction
        As in :func:`dipole_kernel`.
    padding : int
        Zero-padding in voxels on every side, to suppress the periodic wrap-around of the FFT.

    Returns
    -------
    float32 array of ``chi.shape``.
    """
    chi = np.asarray(chi, dtype=np.float32)
    padded = np.pad(chi, padding) if padding else chi
    kernel = dipole_kernel(padded.shape, voxel_size, b0_direction)
    field = irfftn(rfftn(padded) * kernel, padded.shape)
    if padding:
        field = field[padding:-padding, padding:-padding, padding:-padding]
    return np.ascontiguousarray(field, dtype=np.float32)


def laplacian_kernel(shape, voxel_size, real: bool = True) -> np.ndarray:
    """k-space response of the discrete 7-point Laplacian (1/mm^2), zero at k = 0.

    L(k) = sum_i (2 cos(2 pi k_i d_i) - 2) / d_i^2, the exact spectrum of the finite-difference
    operator on a periodic grid, so that convolution and its inverse are consistent.
    """
    kx, ky, kz = kspace_grid(shape, voxel_size, real=real)
    kernel = np.float32(0.0)
    for k, d in zip((kx, ky, kz), voxel_size):
        d = np.float32(d)
        kernel = kernel + (2.0 * np.cos(np.float32(2.0 * np.pi) * k * d) - 2.0) / d**2
    return np.asarray(kernel, dtype=np.float32)


def sphere_kernel(shape, voxel_size, radius_mm: float, real: bool = True) -> np.ndarray:
    """k-space response of the normalised spherical mean value (SMV) filter of ``radius_mm``.

    The sphere is rasterised on the (possibly anisotropic) voxel grid, centred at the origin
    with periodic wrap, normalised to unit sum and transformed, so that ``1 - S`` is the
    SMV high-pass used by SHARP-type background removal (Schweser et al., NeuroImage 2011).
    """
    axes = []
    for n, d in zip(shape, voxel_size):
        index = np.arange(n)
        index = np.where(index > n // 2, index - n, index)
        axes.append((index * float(d)).astype(np.float32))
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    sphere = ((x**2 + y**2 + z**2) <= np.float32(radius_mm) ** 2).astype(np.float32)
    sphere /= sphere.sum()
    spectrum = rfftn(sphere) if real else scipy.fft.fftn(sphere, workers=fft_workers())
    return np.real(spectrum).astype(np.float32)


def pad_to_fast_shape(array: np.ndarray, padding=0):
    """Zero-pad a 3-D array by at least ``padding`` voxels per side, up to FFT-friendly sizes.

    Padding suppresses the periodic wrap-around of FFT convolutions; the extra voxels that make
    each axis a fast length for :func:`rfftn` go to the end of the axis.

    Parameters
    ----------
    array : 3-D array
    padding : int or sequence of 3 ints
        Minimum number of zero voxels added before and after the data along each axis.

    Returns
    -------
    padded : array of the same dtype
    crop : tuple of slices
        ``padded[crop]`` is the original grid.
    """
    margins = np.broadcast_to(np.asarray(padding, dtype=int), (3,))
    if np.any(margins < 0):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    widths = []
    for axis, (size, margin) in enumerate(zip(array.shape, margins)):
        fast = scipy.fft.next_fast_len(size + 2 * int(margin), real=axis == array.ndim - 1)
        widths.append((int(margin), fast - size - int(margin)))
    crop = tuple(slice(before, before + size) for (before, _), size in zip(widths, array.shape))
    return np.pad(array, widths), crop


def validated_field_inputs(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), name="field"):
    """Check the (field, mask, voxel_size, b0_direction) arguments shared by the field stages.

    Returns
    -------
    field : float32 array, zero outside the mask
    mask : bool array
    voxel_size : tuple of 3 floats
    b0_direction : tuple of 3 floats with unit norm

    Raises
    ------
    ValueError
        On a non-3-D field, a mask that is not a bool array of the same shape or is empty,
        non-positive voxel sizes, a zero B0 direction or non-finite field values in the mask.
    """
    field = np.asarray(field)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} does not match {name} shape {field.shape}")
    if mask.dtype != bool:
        raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
    if not mask.any():
        raise ValueError("mask is empty")
    sizes = np.asarray(voxel_size, dtype=np.float64)
    if sizes.shape != (3,) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    direction = np.asarray(b0_direction, dtype=np.float64)
    if direction.shape != (3,) or not np.all(np.isfinite(direction)) or not np.linalg.norm(direction) > 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    with np.errstate(invalid="ignore"):
        field = np.where(mask, field, 0).astype(np.float32)
    if not np.all(np.isfinite(field)):
        raise ValueError(f"{name} has non-finite values inside the mask")
    return field, mask, tuple(float(s) for s in sizes), tuple(float(c) for c in direction / np.linalg.norm(direction))


def mask_bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the smallest box holding every True voxel of a non-empty 3-D mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("mask is empty")
    bounds = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bounds.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(bounds)


class MaskGrid:
    """Computation grid of a masked volume: the mask's bounding box plus a zero margin.

    Fields are only known inside the mask, so FFT-based methods can work on the box around it,
    padded by ``margin`` voxels per side (int or 3 ints) to FFT-friendly sizes with
    :func:`pad_to_fast_shape`; :meth:`restore` puts a result back on the full grid.

    Attributes
    ----------
    box : tuple of slices
        The mask's bounding box in the full grid.
    inside : bool array
        The mask on the padded grid.
    crop : tuple of slices
        The box within the padded grid.
    shape : tuple of ints
        The padded grid's shape.
    """

    def __init__(self, mask: np.ndarray, margin=0):
        self.full_shape = mask.shape
        self.box = mask_bounding_box(mask)
        self.margin = margin
        self.inside, self.crop = pad_to_fast_shape(np.asarray(mask, dtype=bool)[self.box], margin)
        self.shape = self.inside.shape

    def extract(self, array: np.ndarray) -> np.ndarray:
        """``array`` (full grid) as float32 on the padded grid."""
        return pad_to_fast_shape(np.asarray(array[self.box], dtype=np.float32), self.margin)[0]

    def restore(self, array: np.ndarray) -> np.ndarray:
        """``array`` (padded grid) on the full grid, zero outside the box."""
        full = np.zeros(self.full_shape, dtype=array.dtype)
        full[self.box] = array[self.crop]
        return full
