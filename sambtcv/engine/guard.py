"""What a walk trusts about its organ, and the masks it refuses to pass on as the next slice's prompt.

A walk (`sambtcv.engine.walks`) prompts each slice with the previous slice's box, so a mask that leaks onto a
neighbour feeds the next prompt and grows. The guard compares each new mask with the last mask the walk
kept, in physical units (`Geometry`: the in-plane pixel and the slice step in mm), so that CTs of 0.7, 1.5
and 3 mm behave alike:

* *outgrown*: the section's equivalent radius (sqrt(area / pi)) grows by more than GROW_SLOPE mm per mm of
  z, plus one pixel (the resolution), or to more than SHOWN_RATIO times the radius of what the organ showed
  where the walk started (its mask there and the ellipse inscribed in the user's box), so a leak cannot creep
  by the allowed growth slice after slice.
  Going outward from the middle of an organ its sections shrink or stay (the development labels' 95th
  percentile is 0.2-0.6 mm per mm, tubes keep their calibre; no organ's largest section had over 1.32 times
  the radius of its section on the challenge box's slice);
* *jumped*: under REACH_FLOOR of the new mask lies within REACH_SLOPE mm per mm of z (plus one pixel) of the
  previous mask: the mask is on something else.

A refused mask is cut to what the organ may have grown into (`Guard.clip`: the previous mask grown by the
allowed radius), so the next prompt stays the organ's size, and the slice is marked unsure with the reason.
(Trying the slice again with a tighter box first was measured worse: each retry's mask sits inside the last
box, and a kidney's walk shrank slice after slice; docs/MEASUREMENTS.md, section 11.) Arrays are (H, W) bool
masks in the slice frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GROW_SLOPE = 0.6  # mm of equivalent radius an organ's section may grow per mm of z, slice to slice
SHOWN_RATIO = 1.5  # a section's radius may reach this many times the radius of the walk's first section
REACH_SLOPE = 2.0  # mm per mm of z: how far beyond the previous mask a new section may reach
REACH_FLOOR = 0.5  # fraction of a new mask that must lie within that reach
GUARD_REASONS = {"outgrown": "the mask outgrew the organ's last section",
                 "jumped": "the mask left the organ's last section"}


@dataclass(frozen=True)
class Geometry:
    """A slice stack's voxel size: in-plane pixel and slice step, mm."""

    pixel_mm: float = 1.0
    slice_mm: float = 1.0

    @classmethod
    def of(cls, spacing_zyx) -> Geometry:
        """From a spacing (slice, row, column) in mm; the pixel is the mean of row and column."""
        z, y, x = (float(v) for v in spacing_zyx)
        return cls((y + x) / 2, z)

    def px(self, mm: float) -> float:
        return mm / self.pixel_mm


@dataclass
class Verdict:
    """A new mask judged against the previous one: `reason` (GUARD_REASONS) when refused, else None; the
    values behind it (radius growth, mm; share within reach)."""

    reason: str | None
    grow_mm: float
    within: float

    @property
    def ok(self) -> bool:
        return self.reason is None


def radius_mm(mask: np.ndarray, geo: Geometry) -> float:
    """The equivalent radius of a mask's area, mm."""
    return math.sqrt(float(mask.sum()) / math.pi) * geo.pixel_mm


class Guard:
    """Judge and mend a walk's masks, one slice step (`steps` slices apart) at a time; `shown` is what the
    organ showed where the walk started (its mask, and the box's inscribed ellipse: `sambtcv.engine.walks`)."""

    def __init__(self, geo: Geometry, shown: np.ndarray):
        self.geo = geo
        self.largest_mm = SHOWN_RATIO * radius_mm(shown, geo) + geo.pixel_mm

    def allowed_growth_mm(self, steps: int = 1) -> float:
        return GROW_SLOPE * steps * self.geo.slice_mm + self.geo.pixel_mm

    def reach_mm(self, steps: int = 1) -> float:
        return REACH_SLOPE * steps * self.geo.slice_mm + self.geo.pixel_mm

    def check(self, prev: np.ndarray, new: np.ndarray, steps: int = 1) -> Verdict:
        grow = radius_mm(new, self.geo) - radius_mm(prev, self.geo)
        n = int(new.sum())
        if n == 0 or not prev.any():
            return Verdict(None, grow, 1.0)
        dist = ndimage.distance_transform_edt(~prev) * self.geo.pixel_mm
        within = float((dist[new] <= self.reach_mm(steps)).mean())
        if within < REACH_FLOOR:
            return Verdict("jumped", grow, within)
        if grow > self.allowed_growth_mm(steps) or radius_mm(new, self.geo) > self.largest_mm:
            return Verdict("outgrown", grow, within)
        return Verdict(None, grow, within)

    def clip(self, prev: np.ndarray, new: np.ndarray, steps: int = 1) -> np.ndarray:
        """`new` cut to the previous mask grown by the allowed radius growth; to the previous mask itself where
        that would still be larger than the walk may reach (SHOWN_RATIO)."""
        dist = ndimage.distance_transform_edt(~prev) * self.geo.pixel_mm
        out = new & (dist <= self.allowed_growth_mm(steps))
        return out if radius_mm(out, self.geo) <= self.largest_mm else new & prev
