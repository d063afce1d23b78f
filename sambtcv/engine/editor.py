"""The engine of corrections, shared by the viewer, `predict_segfm.py` and `interactive_eval.py`: what a
box, a click, a stroke of the brush and a walk do to one organ's `sambtcv.engine.anchors.OrganState`.

Every operation returns a new state (the caller keeps the old one for undo):

* `Editor.box3d`: a 3D box (slices z_lo..z_hi, an XYXY box on slice k): k is an anchor with the box, the
  organ is bounded to those slices, and walked from k (`sambtcv.engine.walks`);
* `Editor.prompt`: a box and/or points on slice k, added to what that slice already holds (a click after a
  box keeps the box) or starting it afresh, decoded together; k becomes an anchor;
* `Editor.click`: one + / - point on slice k. On a slice the user has not prompted, the box comes from the
  organ's mask there (or the nearest slice it has one on), grown by the walk's margin and by the point
  when the point lies outside it, so a click refines what is shown instead of starting over;
* `Editor.paint`: a slice's mask drawn by hand (brush and eraser): an anchor no model decodes;
* `Editor.walk`: from an anchor both ways up to the neighbouring anchors, stops or convergence
  (`sambtcv.engine.walks.walk`);
* `Editor.correct`: a click and what follows from it: what one step of the challenge's protocol does.

The decoder gets the slice's earlier low-res logits as SAM's mask prompt when the rules say so
(`EditRules.mask_input`), and clicks may go to another model than boxes (`point_dec`: e.g. the box-trained
LiteMedSAM walks, MobileSAM answers clicks).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from sambtcv.core.errors import PipelineError
from sambtcv.core.prompts import bound_box, grow_box
from sambtcv.engine.anchors import OrganState, SlicePrompt
from sambtcv.engine.propagation import (
    AGREE_IOU_FLOOR,
    INTENSITY_PERCENTILES,
    MIN_AREA,
    SliceMask,
    VolumeDecoder,
    main_part,
)
from sambtcv.engine.walks import WalkRules, union, walk

PAINTED_LOGIT = 1e3  # a painted voxel's logit: the user's stroke wins over any model's mask of another organ
EDGE_LOGIT = 1.0  # the least |logit| a voxel a click added or cut gets (overlaps with other organs)
ADD_LIMIT = 0.3  # a + click's region adding more than this share of the organ's largest section is no correction
CUT_LIMIT = 0.5  # a - click's region covering more of the organ's mask than this is the organ, not a leak
UNBACKED_CUT_LIMIT = 0.25  # ... where the region looks like the organ (its intensities do not back the cut)
BAND_SCALE = 2.0  # a click changes pixels up to this many times its own distance from the mask's edge
REACH_SCALE = 4.0  # ... and within this many times (its distance + 1 px) of the click
DISK_MM = 2.25  # radius of the region a click changes when SAM finds none there (3 px at 0.75 mm; at least 1 px)
FALLBACK_SHARE = 1.0  # ... or this share of its distance from the mask's edge (Editor._fallback)
CARRY_INTENSITY = 24  # a click is carried to the next slice while its pixel there differs by at most this (0..255)
CARRY_GROWTH = 2.0  # ... and while what it changes there is at most this many times what it changed on the slice before
CARRY_SLACK_MM2 = 28.0  # ... plus this area (50 px at 0.75 mm)
CARRY_REACH_MM = 2.25  # ... and lies mostly (CARRY_OVERLAP) within this distance of it (3 px at 0.75 mm; >= 1 px)
CARRY_OVERLAP = 0.5
GATE_MIN_PX = 20  # the organ's intensity range on a slice needs at least this many of its pixels
CORE_SHARE = 0.7  # a - click this deep in its part of the mask (share of the part's greatest depth) rejects the part
SLAB_OVERLAP = 0.5  # ... and the part of the next slice that lies this much (share of its area) on the removed one
PART_COVER = 0.5  # ... when the structure the point model sees at the click covers this share of the part
UNLIKE_SHARE = 0.5  # ... and under this share of the part looks like the organ on its nearest given slice
CLICK_RULES = ("local", "joint")
AFTER_CLICK = ("none", "walk")


@dataclass(frozen=True)
class EditRules:
    """The walk's rules and how a click's slice is decoded: with the slice's earlier logits as SAM's mask
    prompt (`mask_input`)."""

    walk: WalkRules
    mask_input: bool = True
    click: str = "local"  # CLICK_RULES (see Editor.edit)
    after: str = "none"  # AFTER_CLICK: what a correction does beyond its slice (see Editor.correct)
    carry: bool = True  # a correction is carried to the neighbouring slices that share its error (Editor.carry)
    gate: bool = True  # a click changes only pixels whose intensity backs it, where it can tell (Editor._gate)
    repair: bool = True  # a click on a wrong part removes its slab, one on a missed part or doubted slice walks it


class Editor:
    """Operations on one volume's organs. `dec` decodes boxes and walks; `point_dec` (default: `dec`)
    decodes a slice whose prompt holds points. Both are `sambtcv.engine.propagation.VolumeDecoder` on one stack."""

    def __init__(self, dec: VolumeDecoder, rules: EditRules, point_dec: VolumeDecoder | None = None):
        self.dec, self.rules = dec, rules
        self.point_dec = point_dec or dec

    @property
    def disk_px(self) -> float:
        """DISK_MM in this stack's pixels, at least 1."""
        return max(1.0, self.rules.walk.geometry.px(DISK_MM))

    @property
    def n_slices(self) -> int:
        return len(self.dec.stack)

    @property
    def hw(self) -> tuple[int, int]:
        return self.dec.hw

    # ------------------------------------------------------------------ one slice
    def decode(self, state: OrganState, k: int, sp: SlicePrompt) -> SliceMask:
        """Slice k's mask for its whole prompt (with the slice's earlier logits when the rules say so)."""
        if sp.empty:
            raise PipelineError("a slice's prompt needs a box or a point")
        dec = self.point_dec if sp.points else self.dec
        old = state.slices.get(k) if state is not None else None
        # both models' low-res logits cover the same padded square of the slice, so either's can refine
        mask_input = old.lowres if (self.rules.mask_input and sp.points and old is not None) else None
        return dec.decode(k, sp.prompt(), mask_input=mask_input)

    def _set_anchor(self, state: OrganState, k: int, sp: SlicePrompt, sm: SliceMask) -> OrganState:
        return replace(state, slices={**state.slices, k: sm}, anchors={**state.anchors, k: sp}, pending=k,
                       candidates=(), chosen=0, from_reference=False)

    def prompt(self, state: OrganState | None, organ: int, k: int, box=None, points=(), labels=(),
               fresh: bool = False) -> OrganState:
        """Add a box and/or points to slice k's prompt (or, with `fresh`, replace it) and decode it."""
        state = state or OrganState(organ)
        self._check_slice(state, k)
        sp = SlicePrompt() if fresh or k not in state.anchors else state.anchors[k]
        if box is not None:
            sp = sp.with_box(box)
        for (x, y), lab in zip(points, labels):
            sp = sp.with_point(x, y, bool(lab))
        if sp.box is None and sp.points and k not in state.anchors and not fresh:
            sp = self._derived_box(state, k, sp)
        return self._set_anchor(state, k, sp, self.decode(state, k, sp))

    def click(self, state: OrganState, k: int, x: float, y: float, positive: bool) -> OrganState:
        """One + / - point added to slice k's prompt (see the module's docstring); the slice's mask is
        `edit`ed by it. A + click outside the organ's z range widens the range to it (the user says the
        organ is there); a - click there changes nothing."""
        if state.z_range is not None and not state.in_range(k, self.n_slices) and 0 <= k < self.n_slices:
            if not positive:
                return state
            lo, hi = state.z_range
            state = replace(state, z_range=(min(lo, k), max(hi, k)))
        self._check_slice(state, k)
        sp = state.anchors.get(k)
        sp = self._derived_box(state, k, SlicePrompt()) if sp is None or sp.painted else sp
        if sp.box is not None and positive:
            sp = sp.with_box(_include(sp.box, x, y, self.rules.walk.margin_px, self.hw))
        sp = sp.with_point(x, y, positive)
        state = replace(state, anchors={**state.anchors, k: sp})
        return self._set_anchor(state, k, sp, self.edit(state, k, (x, y, positive)))

    def edit(self, state: OrganState, k: int, click) -> SliceMask:
        """Slice k's mask after a click (x, y, positive) on it. Rule "joint" (EditRules.click): the slice's
        whole prompt decoded together, when that answers the click (holds a + point, leaves out a - one).
        Otherwise, and always under rule "local": the old mask with the region SAM sees at the point (its
        smallest mask there, or the joint mask's part there) added for a + click or cut out for a - click,
        so a click changes its slice only near itself."""
        x, y, positive = click
        xi, yi = int(round(x)), int(round(y))
        old = state.slices.get(k)
        sp = state.anchors.get(k) or self._derived_box(state, k, SlicePrompt()).with_point(x, y, positive)
        joint = self.decode(state, k, sp)
        answers = bool(joint.mask[yi, xi]) == bool(positive)
        if old is None or not old.area:
            return joint if positive and answers else self._alone(k, x, y, positive, old)
        if self.rules.click == "joint" and answers:
            return joint
        # the click sits in the middle of the error, so the error reaches about twice its distance from the
        # mask's edge: the change stays within that band of the edge, connected to the click
        side = ~old.mask if positive else old.mask
        depth = ndimage.distance_transform_edt(side)
        band = (depth <= BAND_SCALE * depth[yi, xi] + 1) & _disk(self.hw, xi, yi, REACH_SCALE * (depth[yi, xi] + 1))
        if answers:  # what SAM changes, given the click, next to the click
            changed = _component((joint.mask != old.mask) & side & band, yi, xi)
        else:
            changed = _component(self._point_region(k, x, y) & side & band, yi, xi)
        backed = False
        if self.rules.gate:
            changed, backed = self._gate(k, old.mask, changed, xi, yi, positive)
        limit = ADD_LIMIT if positive else CUT_LIMIT if backed else UNBACKED_CUT_LIMIT
        base = max(old.area, _largest_section(state)) if positive else old.area
        if not changed[yi, xi] or changed.sum() > limit * base:
            changed = self._fallback(old, side, depth[yi, xi], xi, yi, positive)
            if self.rules.gate and not positive:  # only what looks like the clicked pixel, where it can tell
                changed, _ = self._gate(k, old.mask, changed, xi, yi, positive)
        mask = old.mask | changed if positive else old.mask & ~changed
        logits = old.logits.copy()
        logits[changed] = EDGE_LOGIT if positive else -EDGE_LOGIT
        logits[yi, xi] = PAINTED_LOGIT if positive else -PAINTED_LOGIT
        mask[yi, xi] = bool(positive)
        return SliceMask(mask, logits.astype(np.float32), old.iou, None)

    def _fallback(self, old: SliceMask, side: np.ndarray, depth: float, xi: int, yi: int, positive: bool) -> np.ndarray:
        """What a click changes where SAM's region does not answer it: a disk around it of FALLBACK_SHARE of its
        `depth` (its distance from the mask's edge: the click sits in the middle of an error about that wide), cut
        by a - click (at most UNBACKED_CUT_LIMIT of the slice's mask) or added by a + click (at most ADD_LIMIT of
        it), and never narrower than DISK_MM."""
        floor = r = self.disk_px
        limit = ADD_LIMIT if positive else UNBACKED_CUT_LIMIT
        if FALLBACK_SHARE > 0:
            r = max(r, FALLBACK_SHARE * depth)
            while r > floor and (_disk(self.hw, xi, yi, r) & side).sum() > limit * old.area:
                r *= 0.8
        return _disk(self.hw, xi, yi, max(r, floor)) & side

    def _gate(self, k: int, organ: np.ndarray, changed: np.ndarray, xi: int, yi: int, positive: bool) -> tuple:
        """(region, backed): the part of a click's `changed` region that the slice's intensities back. Where
        the clicked pixel looks as the click says (a + click inside the organ's intensity range, a - click
        outside it), only the pixels that look like the clicked one, connected to it (backed); else (a -
        click on tissue that looks like the organ, a + click on a lesion) all of it, as SAM found it."""
        img = self.dec.stack[k]
        inside = organ & ~changed
        if inside.sum() < GATE_MIN_PX:
            return changed, False
        lo, hi = np.percentile(img[inside], INTENSITY_PERCENTILES)
        like = (img >= lo) & (img <= hi)
        if bool(like[yi, xi]) != bool(positive):
            return changed, False
        return _component(changed & (like if positive else ~like), yi, xi), True

    def _point_region(self, k: int, x: float, y: float) -> np.ndarray:
        """The smallest of SAM's masks for a single + point at (x, y) that holds the point (the point
        model's), else a small disk around it."""
        xi, yi = int(round(x)), int(round(y))
        found = self.point_dec.candidates(k, SlicePrompt().with_point(x, y, True).prompt())
        holding = [c.mask for c in found.masks if c.mask[yi, xi]]
        return min(holding, key=lambda m: m.sum()) if holding else _disk(self.hw, xi, yi, self.disk_px)

    def _alone(self, k: int, x: float, y: float, positive: bool, old) -> SliceMask:
        """A click on a slice where the organ has no mask: a + click gets SAM's region at the point, a -
        click leaves the slice empty."""
        h, w = self.hw
        mask = self._point_region(k, x, y) if positive else np.zeros((h, w), bool)
        logits = np.where(mask, np.float32(EDGE_LOGIT), np.float32(-EDGE_LOGIT))
        return SliceMask(mask, logits, 1.0, None)

    def _derived_box(self, state: OrganState, k: int, sp: SlicePrompt) -> SlicePrompt:
        """The box a walk would prompt slice k with: the organ's mask there (else on the nearest slice that
        has one), its main part grown by the margin; no box when the organ has no mask yet."""
        have = [j for j, sm in state.slices.items() if sm.area]
        if not have:
            return sp
        j = min(have, key=lambda j: (abs(j - k), j))
        h, w = self.hw
        return sp.with_box(grow_box(bound_box(main_part(state.slices[j].mask)), self.rules.walk.margin_px,
                                    (0, 0, w - 1, h - 1)))

    def paint(self, state: OrganState | None, organ: int, k: int, mask: np.ndarray) -> OrganState:
        """Slice k's mask as the user painted it (brush / eraser): an anchor, never decoded again."""
        state = state or OrganState(organ)
        self._check_slice(state, k)
        mask = np.asarray(mask, bool)
        if mask.shape != self.hw:
            raise PipelineError(f"a painted mask must be {self.hw[0]} x {self.hw[1]} (the slice), got {mask.shape}")
        logits = np.where(mask, np.float32(PAINTED_LOGIT), np.float32(-PAINTED_LOGIT))
        return self._set_anchor(state, k, SlicePrompt(painted=True), SliceMask(mask.copy(), logits, 1.0))

    def clear(self, state: OrganState, k: int) -> OrganState:
        """Slice k afresh: its prompt and mask gone (not an anchor any more)."""
        anchors = {j: v for j, v in state.anchors.items() if j != k}
        slices = {j: v for j, v in state.slices.items() if j != k}
        return replace(state, anchors=anchors, slices=slices, pending=None if state.pending == k else state.pending,
                       candidates=(), chosen=0)

    def _check_slice(self, state: OrganState, k: int) -> None:
        if not 0 <= k < self.n_slices:
            raise PipelineError(f"slice {k} is not inside 0..{self.n_slices - 1}")
        if state.z_range is not None and not state.in_range(k, self.n_slices):
            lo, hi = state.z_range
            raise PipelineError(f"slice {k} lies outside the organ's 3D box (slices {lo}..{hi})")

    # ------------------------------------------------------------------ walks
    def walk(self, state: OrganState, start: int | None = None) -> OrganState:
        """Walk from `start` (default: the pending anchor, else the first anchor). Toward masks the organ
        has beyond a gap of slices without one (`start` lies past the organ's end: a click there), the walk
        only fills the gap and joins them (`sambtcv.engine.walks.walk`'s `join`), never replaces them."""
        start = start if start is not None else (state.pending if state.pending is not None else state.first_anchor)
        if start is None or start not in state.slices:
            raise PipelineError("the organ has no prompted slice to walk from; prompt it first")
        return walk(self.dec, state, start, self.rules.walk, join=_gaps(state, start))

    def box3d(self, organ: int, z_lo: int, z_hi: int, k: int, box) -> OrganState:
        """A 3D box: slice k anchored with the box, the organ bounded to z_lo..z_hi, walked from k."""
        if not 0 <= z_lo <= k <= z_hi < self.n_slices:
            raise PipelineError(f"a 3D box needs 0 <= first <= slice <= last < {self.n_slices}, got {z_lo}, {k}, "
                                f"{z_hi}")
        state = OrganState(organ, z_range=(int(z_lo), int(z_hi)))
        return self.walk(self.prompt(state, organ, k, box=box))

    def correct(self, state: OrganState, k: int, x: float, y: float, positive: bool,
                walk_ends: bool = True) -> OrganState:
        """A click on slice k and what follows from it (one step of the challenge's protocol). With `repair`: a
        - click on a doubted wrong part removes its slab (`remove_part`), a + click on a part apart from the mask
        walks that part (`add_part`), a + click beside the mask of a slice the walk doubted walks the doubted
        slices again from it (`redo_doubted`). Where the organ had no mask on k (an end cut short), a walk from k
        (with `walk_ends`; the viewer leaves it to P); else the click carried to the neighbouring slices that share
        its error (`carry`, when the rules say so), then, by EditRules.after, nothing more ("none") or a walk from
        k ("walk")."""
        had = k in state.slices and state.slices[k].area >= MIN_AREA
        if had and self.rules.repair:
            if not positive and self._wrong_part(state, k, x, y):
                return self.remove_part(state, k, x, y)
            if positive:
                region = self._separate_part(state, k, x, y)
                if region is not None:
                    return self.add_part(state, k, x, y, region)
                region = self._doubted_slice_region(state, k, x, y)
                if region is not None:
                    return self.redo_doubted(state, k, x, y, region)
        new = self.click(state, k, x, y, positive)
        if not had:  # an end cut short: walk outward from k, and toward the organ only across the gap
            return self.walk(new, k) if walk_ends and new.slices[k].area >= MIN_AREA else new
        if self.rules.carry:
            new = self.carry(new, k, x, y, positive, new.slices[k].mask ^ state.slices[k].mask)
        if self.rules.after == "walk":
            return self.walk(new, k) if new.slices[k].area >= MIN_AREA else new
        return new

    def remove_part(self, state: OrganState, k: int, x: float, y: float) -> OrganState:
        """A - click on the core of a part of slice k's mask (`_at_core`): that part is not the organ. It goes,
        and so do the parts of the slices beyond, each way, that lie on the part removed before them (at least
        SLAB_OVERLAP of their area), up to an anchor or the organ's z range: a wrong slab goes whole."""
        xi, yi = int(round(x)), int(round(y))
        part = _component(state.slices[k].mask, yi, xi)
        slices = {**state.slices, k: _without(state.slices[k], part)}
        lo, hi = state.z_range if state.z_range is not None else (0, self.n_slices - 1)
        for d in _outward(state, k):
            j, prev = k + d, part
            while lo <= j <= hi and j not in state.anchors and j in slices:
                cut = _lying_on(slices[j].mask, prev)
                if not cut.any() or not self._doubted(state, j, cut):
                    break
                slices[j] = _without(slices[j], cut)
                j, prev = j + d, cut
        return replace(state, slices=slices, pending=None, candidates=(), chosen=0, from_reference=False)

    def _wrong_part(self, state: OrganState, k: int, x: float, y: float) -> bool:
        """A - click rejects its whole part of slice k's mask when it lies on the part's core (`_at_core`), the
        structure the point model sees there covers at least PART_COVER of the part (one structure, not the organ
        with a leak, where the click cuts only the leak), and the part is in doubt (`_doubted`)."""
        xi, yi = int(round(x)), int(round(y))
        mask = state.slices[k].mask
        if not _at_core(mask, xi, yi):
            return False
        part = _component(mask, yi, xi)
        if (self._point_region(k, x, y) & part).sum() < PART_COVER * part.sum():
            return False
        return self._doubted(state, k, part)

    def _doubted(self, state: OrganState, k: int, part: np.ndarray) -> bool:
        """A part of slice k's mask is in doubt where the walk doubted the slice (`OrganState.unsure`), or where
        under UNLIKE_SHARE of it looks like the organ on its nearest given slice (5th-95th percentile)."""
        if k in state.doubted():
            return True
        given = [j for j, sp in state.anchors.items() if not sp.carried and j in state.slices
                 and state.slices[j].area >= GATE_MIN_PX]
        if not given:
            return False
        ref = min(given, key=lambda j: (abs(j - k), j))
        lo, hi = np.percentile(self.dec.stack[ref][state.slices[ref].mask], INTENSITY_PERCENTILES)
        vals = self.dec.stack[k][part]
        return ((vals >= lo) & (vals <= hi)).mean() < UNLIKE_SHARE

    def _separate_part(self, state: OrganState, k: int, x: float, y: float) -> np.ndarray | None:
        """The region a + click on slice k points at when it lies apart from the organ's mask there (no pixel
        of it touches the mask): the smallest of the point model's masks for the point that holds it, stays
        apart, is one structure by the model's own estimate (predicted IoU >= AGREE_IOU_FLOOR) and is no larger
        than the organ's largest section so far. None when the click refines the mask's edge instead, or the
        model sees no such part there."""
        near = ndimage.binary_dilation(state.slices[k].mask, iterations=1)
        return self._organ_region(state, k, x, y, avoid=near)

    def _organ_region(self, state: OrganState, k: int, x: float, y: float, avoid=None) -> np.ndarray | None:
        """The smallest of the point model's masks for a + point at (x, y) on slice k that holds the point, is one
        structure by the model's own estimate (predicted IoU >= AGREE_IOU_FLOOR), is no larger than the organ's
        largest section so far and touches no pixel of `avoid` ((H, W) bool, optional); None when none is."""
        xi, yi = int(round(x)), int(round(y))
        largest = _largest_section(state)
        found = self.point_dec.candidates(k, SlicePrompt().with_point(x, y, True).prompt())
        fit = [c for c in found.masks if c.mask[yi, xi] and c.iou >= AGREE_IOU_FLOOR and c.area <= largest
               and (avoid is None or not (c.mask & avoid).any())]
        return min(fit, key=lambda c: c.area).mask if fit else None

    def _doubted_slice_region(self, state: OrganState, k: int, x: float, y: float) -> np.ndarray | None:
        """Where the walk doubted slice k and a + click there lies outside its mask: the organ's region at the
        click (`_organ_region`). None elsewhere."""
        xi, yi = int(round(x)), int(round(y))
        if k not in state.doubted() or state.slices[k].mask[yi, xi]:
            return None
        return self._organ_region(state, k, x, y)

    def redo_doubted(self, state: OrganState, k: int, x: float, y: float, region: np.ndarray) -> OrganState:
        """A + click beside the mask of a slice the walk doubted: the walk had lost the organ there. The slice
        becomes the point model's region at the click (an anchor with the point), and the walk goes on from it
        through the slices beyond that it doubted too, up to the first it trusted."""
        sp = (state.anchors.get(k) or self._derived_box(state, k, SlicePrompt())).with_point(x, y, True)
        logits = np.where(region, np.float32(EDGE_LOGIT), np.float32(-EDGE_LOGIT))
        state = self._set_anchor(state, k, sp, SliceMask(region.copy(), logits, 1.0, None))
        state = replace(state, unsure=tuple(u for u in state.unsure if u.k != k))
        return walk(self.dec, state, k, self.rules.walk, doubted_only=True)

    def add_part(self, state: OrganState, k: int, x: float, y: float, region: np.ndarray) -> OrganState:
        """A part of the organ on slice k that its mask misses (`_separate_part`): added there (k becomes an
        anchor with the point), then walked through the slices beyond, each way, and added to their masks up to
        where it joins them (`sambtcv.engine.walks.walk` with `part`)."""
        sp = state.anchors.get(k) or self._derived_box(state, k, SlicePrompt())
        sp = sp.with_point(x, y, True)
        logits = np.where(region, np.float32(EDGE_LOGIT), np.float32(-EDGE_LOGIT))
        part = SliceMask(region.copy(), logits, 1.0, None)
        state = self._set_anchor(state, k, sp, union(state.slices[k], part))
        return walk(self.dec, state, k, self.rules.walk, part=part)

    def carry(self, state: OrganState, k: int, x: float, y: float, positive: bool, clicked=None) -> OrganState:
        """A click on slice k repeated on the slices beyond it, each way, while they share its error: the
        organ has a mask there, the point lies on the wrong side of it (inside for a - click, outside for a +
        one), the slice is no anchor and the pixel under the point still looks as it did on k (within
        CARRY_INTENSITY). Each slice is `edit`ed as if clicked, and becomes an anchor ("carried"), while what
        the edit changes continues what it changed on the slice before (`_follows`; on k: `clicked`, (H, W)
        bool, when given)."""
        xi, yi = int(round(x)), int(round(y))
        stack = self.dec.stack
        seen = int(stack[k][yi, xi])
        lo, hi = state.z_range if state.z_range is not None else (0, self.n_slices - 1)
        for d in (1, -1):
            j, changed = k + d, clicked
            while lo <= j <= hi and j not in state.anchors:
                sm = state.slices.get(j)
                if sm is None or sm.area < MIN_AREA or bool(sm.mask[yi, xi]) == positive:
                    break
                if abs(int(stack[j][yi, xi]) - seen) > CARRY_INTENSITY:
                    break
                sp = replace(self._derived_box(state, j, SlicePrompt()).with_point(x, y, positive), carried=True)
                anchored = replace(state, anchors={**state.anchors, j: sp})
                new = self.edit(anchored, j, (x, y, positive))
                now = new.mask ^ sm.mask
                if changed is not None and not _follows(now, changed, self.rules.walk.geometry):
                    break
                state = replace(anchored, slices={**state.slices, j: new})
                j, changed = j + d, now
        return state


def _gaps(state: OrganState, start: int) -> tuple:
    """The directions from slice `start` in which the next slice has no mask but a later one has: a walk
    there fills the gap and joins the organ."""
    masked = [j for j, sm in state.slices.items() if sm.area >= MIN_AREA and j != start]
    out = []
    for d in (1, -1):
        nxt = state.slices.get(start + d)
        if (nxt is None or nxt.area < MIN_AREA) and any((j - start) * d > 0 for j in masked):
            out.append(d)
    return tuple(out)


def _outward(state: OrganState, k: int) -> tuple:
    """The directions from slice k away from the organ's nearest anchor the user gave (a walk's errors grow
    outward from it); both where there is none or k is one."""
    given = [j for j, sp in state.anchors.items() if not sp.carried]
    if not given:
        return (1, -1)
    ref = min(given, key=lambda j: (abs(j - k), j))
    return (1, -1) if ref == k else ((1,) if k > ref else (-1,))


def _at_core(mask: np.ndarray, x: int, y: int) -> bool:
    """Pixel (x, y) lies inside `mask` at least CORE_SHARE as deep as the deepest pixel of its connected part."""
    if not mask[y, x]:
        return False
    depth = ndimage.distance_transform_edt(_component(mask, y, x))
    return depth[y, x] >= CORE_SHARE * depth.max()


def _lying_on(mask: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The connected parts of `mask` with at least SLAB_OVERLAP of their area on `removed`."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    area = ndimage.sum(mask, lab, index=range(1, n + 1))
    on = ndimage.sum(mask & removed, lab, index=range(1, n + 1))
    keep = np.flatnonzero(on >= SLAB_OVERLAP * area) + 1
    return np.isin(lab, keep)


def _without(sm: SliceMask, cut: np.ndarray) -> SliceMask:
    """A slice's mask with the pixels of `cut` removed (their logits made negative)."""
    logits = np.where(cut, np.minimum(sm.logits, -EDGE_LOGIT), sm.logits).astype(np.float32)
    return SliceMask(sm.mask & ~cut, logits, sm.iou, None)


def _follows(change: np.ndarray, previous: np.ndarray, geometry) -> bool:
    """A carried change continues the previous slice's change: not much larger than it, and mostly within
    CARRY_REACH_MM of it (an error that shares the click's error, not another one). `geometry`: the stack's
    voxel size (`sambtcv.engine.guard.Geometry`)."""
    n = int(change.sum())
    if n == 0:
        return False
    if n > CARRY_GROWTH * int(previous.sum()) + CARRY_SLACK_MM2 / geometry.pixel_mm ** 2:
        return False
    near = ndimage.binary_dilation(previous, iterations=max(1, int(round(geometry.px(CARRY_REACH_MM)))))
    return int((change & near).sum()) >= CARRY_OVERLAP * n


def _largest_section(state: OrganState) -> int:
    """The organ's largest section so far, pixels."""
    return max((sm.area for sm in state.slices.values()), default=0)


def _component(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """The connected part of `mask` that holds pixel (y, x) (all of it when the pixel is outside it)."""
    if not mask[y, x]:
        return mask.copy()
    lab, _ = ndimage.label(mask)
    return lab == lab[y, x]


def _disk(hw, x: int, y: int, r: float) -> np.ndarray:
    yy, xx = np.ogrid[:hw[0], :hw[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= r * r


def _include(box, x: float, y: float, margin: float, hw) -> tuple:
    """The XYXY box grown to hold (x, y) with `margin` px around it, inside the slice."""
    h, w = hw
    x0, y0, x1, y1 = box
    return (max(0.0, min(x0, x - margin)), max(0.0, min(y0, y - margin)), min(w - 1.0, max(x1, x + margin)),
            min(h - 1.0, max(y1, y + margin)))
