"""A labelled CT resampled to another voxel spacing, as TotalSegmentator and nnU-Net store CTs (1.5 mm, 3 mm):
the image with linear interpolation, the label with nearest neighbour, on one new grid.

The new grid keeps the volume's orientation (the affine's direction) and its outer corner: voxel (0, 0, 0)'s
corner stays where it was, so the resampled volume covers the same box of the patient (its size along an axis
is round(old size x old spacing / new spacing), at least 1). Shapes are NIfTI's ``(i, j, k)``; spacings in mm
along those axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sambtcv.core.errors import PipelineError

MIN_SPACING_MM = 0.1  # a finer spacing than this is a typing error, not a CT


@dataclass
class Resampled:
    """An image (float32, the input's units: HU for a CT) and its label (uint8) on the new grid, with the
    new affine (4, 4) and spacing (3,) mm."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray


def parse_spacing(text) -> np.ndarray:
    """'1.5' (isotropic) or '0.8,0.8,3' (i, j, k) -> (3,) mm; each at least MIN_SPACING_MM."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError as exc:
        raise PipelineError(f"{{subject}} is one number or three, in mm, separated by commas; got {text!r}",
                            "the spacing") from exc
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(np.isfinite(vals)) or min(vals) < MIN_SPACING_MM:
        raise PipelineError(f"{{subject}} is one number or three, each at least {MIN_SPACING_MM} mm; got {text!r}",
                            "the spacing")
    return np.asarray(vals, float)


def new_grid(shape, affine: np.ndarray, spacing) -> tuple[tuple, np.ndarray]:
    """The resampled grid's shape and affine: same direction and outer corner, voxels of `spacing` mm."""
    affine = np.asarray(affine, float)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.asarray(spacing, float)
    shape_new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, old, spacing))
    direction = affine[:3, :3] / old
    out = np.eye(4)
    out[:3, :3] = direction * spacing
    corner = affine[:3, 3] - affine[:3, :3] @ np.full(3, 0.5)  # the outer corner of voxel (0, 0, 0)
    out[:3, 3] = corner + out[:3, :3] @ np.full(3, 0.5)
    return shape_new, out


def resample(image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing) -> Resampled:
    """`image` and `label` (same (i, j, k) shape, on `affine`) on the grid of `spacing` mm (`new_grid`)."""
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise PipelineError(f"image {image.shape} and label {label.shape} must be one 3D grid")
    shape, out_affine = new_grid(image.shape, affine, spacing)
    # a new voxel's centre in old voxel coordinates: old_index = A_old^-1 A_new new_index
    to_old = np.linalg.solve(np.asarray(affine, float), out_affine)
    matrix, offset = to_old[:3, :3], to_old[:3, 3]
    img = ndimage.affine_transform(image.astype(np.float32), matrix, offset, output_shape=shape, order=1,
                                   mode="nearest")
    lab = ndimage.affine_transform(label.astype(np.uint8), matrix, offset, output_shape=shape, order=0,
                                   mode="nearest")
    return Resampled(img, lab, out_affine, np.asarray(spacing, float))
