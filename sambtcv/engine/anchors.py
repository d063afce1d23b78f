"""What the user gave, per organ and slice: prompts that accumulate, and the anchors walks never change.

Coordinates are the slice frame (`sambtcv.core.prompts`): slice k, XY pixels, XYXY boxes.

A `SlicePrompt` is everything given on one slice of one organ: a box, any number of + / - points, or a
painted mask. Prompts accumulate: a click after a box adds a point to that slice's prompt, and the box
stays. Every slice with a `SlicePrompt` is an *anchor* of its organ (`OrganState.anchors`): its mask is
the user's, and a walk (`sambtcv.engine.walks`) never overwrites it.

`OrganState` is one organ's whole state in a session: masks per slice, anchors, the z range of a 3D box,
where its walks stopped. It is replaced whole on every change (undo keeps the old one).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.core.prompts import Prompt

MAX_POINTS = 64  # points a slice's prompt may hold


@dataclass(frozen=True)
class SlicePrompt:
    """One slice's prompt for one organ: an XYXY `box`, (x, y) `points` with `labels` (1 = organ, 0 = not
    the organ), or `painted` (the mask was drawn by hand: no model decodes this slice)."""

    box: tuple | None = None
    points: tuple = ()
    labels: tuple = ()
    painted: bool = False
    carried: bool = False  # the point came from a click on a neighbouring slice (sambtcv.engine.editor.Editor.carry)

    def with_point(self, x: float, y: float, positive: bool) -> SlicePrompt:
        if len(self.points) >= MAX_POINTS:
            raise PipelineError(f"a slice's prompt holds at most {MAX_POINTS} points; clear it and start again")
        return replace(self, points=(*self.points, (float(x), float(y))), labels=(*self.labels, int(bool(positive))),
                       painted=False, carried=False)

    def with_box(self, box) -> SlicePrompt:
        return replace(self, box=tuple(float(v) for v in box), painted=False)

    @property
    def empty(self) -> bool:
        return self.box is None and not self.points and not self.painted

    def prompt(self) -> Prompt:
        """As `sambtcv.core.prompts.Prompt` (what the decoder takes)."""
        pts = np.asarray(self.points, float).reshape(-1, 2) if self.points else None
        return Prompt(points=pts, box=None if self.box is None else np.asarray(self.box, float),
                      labels=np.asarray(self.labels, float) if self.points else None)

    def describe(self) -> str:
        """"box + 2 points (1 -)", "3 points", "painted", for the page's list of anchors."""
        if self.painted:
            return "painted"
        parts = ["box"] if self.box is not None else []
        if self.points:
            neg = sum(1 for v in self.labels if not v)
            plural = "s" if len(self.points) > 1 else ""
            parts.append(f"{len(self.points)} point{plural}" + (f" ({neg} -)" if neg else ""))
        return " + ".join(parts) + (" (carried)" if self.carried else "") if parts else "empty"

    def as_json(self) -> dict:
        return {"box": None if self.box is None else [round(v, 2) for v in self.box],
                "points": [[round(x, 2), round(y, 2)] for x, y in self.points], "labels": list(self.labels),
                "painted": self.painted, "carried": self.carried, "given": self.describe()}


@dataclass(frozen=True)
class OrganState:
    """One organ's masks in a session (slice k -> `sambtcv.engine.propagation.SliceMask`), its anchors (slice k ->
    SlicePrompt), the slice range a 3D box bounds it to, and what its walks found."""

    organ: int
    slices: dict = field(default_factory=dict)
    anchors: dict = field(default_factory=dict)
    z_range: tuple | None = None  # (first, last) slice of a 3D box: walks stay inside
    xy_limit: tuple | None = None  # XYXY box that bounds every slice's box and mask (segment_volume.py's box3d)
    walked: bool = False
    pending: int | None = None  # the anchor changed since the last walk: the next walk starts there
    stops: tuple = ()  # sambtcv.engine.propagation.Stop per direction of the last walk from each side
    unsure: tuple = ()  # sambtcv.engine.propagation.Unsure slices
    visited: int = 0  # slices the walks visited
    candidates: tuple = ()  # SAM's masks for the last prompt (slice `pending`), to cycle through
    chosen: int = 0
    from_reference: bool = False

    @property
    def range(self) -> list | None:
        ks = [k for k, sm in self.slices.items() if sm.area]
        return [min(ks), max(ks)] if ks else None

    @property
    def first_anchor(self) -> int | None:
        return min(self.anchors) if self.anchors else None

    def anchor_list(self) -> list[dict]:
        """The anchors, by slice, as the page lists them."""
        return [{"slice": k, **self.anchors[k].as_json()} for k in sorted(self.anchors)]

    def masks(self, slices=None):
        """As `sambtcv.engine.propagation.OrganMasks` (what merge and walk_report take)."""
        from sambtcv.engine.propagation import OrganMasks

        return OrganMasks(self.organ, dict(self.slices if slices is None else slices), self.visited, list(self.stops),
                          list(self.unsure))

    def in_range(self, k: int, n_slices: int) -> bool:
        lo, hi = self.z_range if self.z_range is not None else (0, n_slices - 1)
        return lo <= k <= hi

    def doubted(self) -> set:
        """The slices a walk kept although it doubted them (`unsure`)."""
        return {u.k for u in self.unsure}
