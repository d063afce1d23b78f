"""Prompts in the original slice frame: central point, random points, boxes, all from seeded generators.

Conventions used throughout the package:

* A 2D slice is an ``(H, W)`` ``uint8`` image (the HU window of `sambtcv.data.btcv` mapped to 0..255)
  with an ``(H, W)`` ``uint8`` label of BTCV ids 0..13, at the slice's own in-plane size.
* Points are ``(N, 2)`` arrays of ``(x, y)`` = (column, row) pixel coordinates; boxes are XYXY
  ``(x0, y0, x1, y1)`` with inclusive pixel coordinates. Both are in the original slice frame until
  `sambtcv.models.backbones.InputFrame` maps them into a model's input frame.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.core.names import NUM_ORGANS, POINT_PROMPTS, PROMPT_TYPES

BOX_MARGIN = 5  # pixels of the original slice added on each side for the larger box


def prompt_rng(seed: int, case: str, z: int, organ: int, prompt_type: str, epoch: int = 0):
    """A generator that depends only on (seed, case, slice, organ, prompt type, epoch).

    So the same seed gives the same prompts whatever order slices and organs are processed in.
    """
    key = [seed, zlib.crc32(case.encode()), int(z), int(organ), PROMPT_TYPES.index(prompt_type), int(epoch)]
    return np.random.default_rng(key)


def central_point(mask: np.ndarray) -> np.ndarray:
    """(1, 2) XY of the mask pixel farthest from the background (argmax of cv2.distanceTransform)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image border counts as background
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[col, row]], dtype=np.float64)


def random_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) XY of pixels drawn uniformly from the mask (without replacement where it has n pixels)."""
    rows, cols = np.nonzero(mask)
    assert rows.size > 0, "cannot draw points from an empty mask"
    pick = rng.choice(rows.size, size=n, replace=rows.size < n)
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)


def bound_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box (inclusive pixel coordinates) of a non-empty mask, float64 (4,)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert rows.size > 0, "cannot box an empty mask"
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def grow_box(box, margin: float, bounds) -> np.ndarray:
    """An XYXY box moved out by `margin` pixels on each side, clipped to the XYXY `bounds`."""
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = bounds
    return np.array([max(x0 - margin, bx0), max(y0 - margin, by0), min(x1 + margin, bx1), min(y1 + margin, by1)],
                    dtype=np.float64)


def larger_box(mask: np.ndarray, margin: int = BOX_MARGIN) -> np.ndarray:
    """The bound box moved out by `margin` pixels on each side, clipped to the image."""
    h, w = mask.shape
    return grow_box(bound_box(mask), margin, (0, 0, w - 1, h - 1))


def present_organs(label: np.ndarray) -> list[int]:
    """The BTCV organ ids (1..NUM_ORGANS) that a label slice or volume holds, ascending."""
    return [int(o) for o in np.unique(label) if 1 <= o <= NUM_ORGANS]


@dataclass
class Prompt:
    """One prompt in the slice frame: ``points`` (n, 2) XY with ``labels`` (n,) 1 = organ, 0 = background
    (None: all organ), or ``box`` (4,) XYXY."""

    points: np.ndarray | None = None
    box: np.ndarray | None = None
    labels: np.ndarray | None = None

    def point_labels(self) -> np.ndarray:
        """(n,) float labels of the points (all 1 when none were given)."""
        n = 0 if self.points is None else len(self.points)
        return np.ones(n) if self.labels is None else np.asarray(self.labels, float)


def make_prompt(mask: np.ndarray, prompt_type: str, rng: np.random.Generator | None) -> Prompt:
    """Prompt of `prompt_type` for a non-empty binary (H, W) mask, in the slice frame (`rng` draws the
    random points; unused for the other types)."""
    if prompt_type == "one_central_point":
        return Prompt(points=central_point(mask))
    if prompt_type in POINT_PROMPTS:
        return Prompt(points=random_points(mask, POINT_PROMPTS[prompt_type], rng))
    if prompt_type == "bound_box":
        return Prompt(box=bound_box(mask))
    if prompt_type == "larger_box":
        return Prompt(box=larger_box(mask))
    raise PipelineError(f"unknown prompt type {prompt_type!r}; choose from {', '.join(PROMPT_TYPES)}")
