"""Walks between anchors: an organ followed slice by slice from one slice outward, never over an anchor.

`walk` starts on a slice whose mask is set (an anchor the user just gave or corrected) and goes each way,
prompting each next slice with the previous slice's box (its mask's main part, grown by the margin), until
one of:

* the next anchor (its mask is the user's: kept), the volume's end, or the end of the organ's z range
  (a 3D box bounds the walk in z);
* the STOP rule of `sambtcv.engine.propagation`, outside a z range; inside one only a vanished mask stops the
  walk (the box says the organ is there);
* *convergence*: on a slice that had a mask before, the new mask agrees with it (IoU >= CONVERGED_IOU):
  the rest beyond is kept as it was. So a walk from a correction re-walks only as far as it changes
  something, not "everything beyond";
* with `join` (a click beyond the organ's end), the first slice that already has a mask.

What the walk had left beyond the place it stopped stays, except at the organ's outer ends without a z
range: there a walk that stops before the old masks' end takes them with it (they came from a walk
through what was just corrected, e.g. a leak past the organ's end).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from sambtcv.core import config
from sambtcv.core.metrics import iou_score
from sambtcv.core.prompts import Prompt
from sambtcv.engine.anchors import OrganState, SlicePrompt
from sambtcv.engine.guard import Geometry, Guard
from sambtcv.engine.propagation import (
    MIN_AREA,
    OrganMasks,
    SliceMask,
    Stop,
    Unsure,
    VolumeDecoder,
    WalkState,
    box_mask,
    next_box,
)

CONVERGED_IOU = 0.95  # a walk stops where its new mask agrees this well with the mask there before
PART_JOINED = 0.5  # a part's walk stops where this share of its mask lies inside the organ's masks
FILL_IOU = 0.85  # two masks a stride apart that agree this well fill the slices between without encoding them
STRIDE_SHARE = 0.5  # a walk strides only while its mask keeps this share of the largest section it has seen


def union(a: SliceMask, b: SliceMask) -> SliceMask:
    """Both masks of one slice as one: pixels of either, each with the higher logit (no low-res logits: the
    union was not decoded)."""
    mask = a.mask | b.mask
    return SliceMask(mask, np.maximum(a.logits, b.logits).astype(np.float32), min(a.iou, b.iou), None)


@dataclass(frozen=True)
class WalkRules:
    """How walks go: the stop rule outside a z range, the margin (px) around the previous mask's box, the
    stack's voxel size and whether the guard judges each new mask."""

    stop: str
    margin_px: float
    geometry: Geometry  # the voxel size: the guard's limits are in mm
    guard: bool = True  # masks that outgrow or leave the organ's last section are cut (sambtcv.engine.guard)
    stride_mm: float = config.STRIDE_MM  # a 3D box's first walk encodes a slice every this many mm (`_first_walk`)

    def stride(self) -> int:
        """Slices from one visited slice to the next on a first walk (1: every slice)."""
        if self.stride_mm <= 0:
            return 1
        return max(1, int(round(self.stride_mm / self.geometry.slice_mm)))


@dataclass
class _Direction:
    """One direction's walk: slices kept (k -> SliceMask), where and why it ended, unsure slices."""

    kept: dict = field(default_factory=dict)
    stop: Stop | None = None
    unsure: list = field(default_factory=list)
    visited: int = 0
    drop: list = field(default_factory=list)  # slices whose old masks go


def walk(dec: VolumeDecoder, state: OrganState, start: int, rules: WalkRules, directions=(1, -1),
         join=(), part: SliceMask | None = None, doubted_only: bool = False) -> OrganState:
    """The organ walked from slice `start` (which must have a mask) in `directions` (+1 superior, -1
    inferior), as the module says; in the directions of `join` the walk only fills slices without a mask and
    stops at the first one that has one (a click beyond the organ's end joins it, never replaces it). With a
    `part` (a part of the organ on `start` that its masks miss: a + click there), the part alone is walked and
    added to the masks it meets, up to the slice where it joins them (PART_JOINED of it inside them). The
    new state (start is not made an anchor here). With `doubted_only` the walk replaces only slices an earlier walk
    doubted (`OrganState.unsure`) and stops at the first it trusted."""
    first = state.slices[start] if part is None else part
    results = [_walk_one(dec, state, start, d, first, rules, d in join, part is not None, doubted_only)
               for d in directions]
    return _apply(state, results, start, dec_visits=sum(r.visited for r in results))


def propagate(dec: VolumeDecoder, organ: int, start: int, first: SliceMask, rule: str, margin: float,
              geometry: Geometry, k_range=None, box_limit=None, directions=(1, -1), guard: bool = True,
              stride_mm: float = config.STRIDE_MM, box=None) -> OrganMasks:
    """One prompt's walk through the volume (segment_volume.py): from slice `start` (whose mask is
    `first`) in `directions`, each slice prompted with the previous slice's box grown by `margin` px;
    stops by `rule`, at the volume's ends, or (a 3D box) at the ends of `k_range` (inclusive), and with
    `box_limit` (XYXY) boxes and masks stay inside it; `guard`: each new mask judged (`sambtcv.engine.guard`, in the
    mm of `geometry`); `stride_mm`: a slice encoded every this many mm, those between filled (`WalkRules`), when
    the prompt was a `box` (XYXY; it also tells the guard the organ's size).
    The result holds `start` and the slices kept beyond it, and a `Stop` per direction."""
    if box_limit is not None:
        first.mask &= box_mask(dec.hw, box_limit)
    if first.area < MIN_AREA:
        return OrganMasks(organ, {}, 1, [Stop(start, d, "empty") for d in directions])
    state = OrganState(organ, {start: first}, {} if box is None else {start: SlicePrompt(box=tuple(box))},
                       z_range=None if k_range is None else tuple(k_range),
                       xy_limit=None if box_limit is None else tuple(float(v) for v in box_limit))
    done = walk(dec, state, start, WalkRules(rule, margin, geometry, guard, stride_mm), directions)
    return OrganMasks(organ, done.slices, 1 + done.visited, list(done.stops), list(done.unsure))


def _apply(state: OrganState, results: list, start: int, dec_visits: int) -> OrganState:
    slices = dict(state.slices)
    for r in results:
        for k in r.drop:
            slices.pop(k, None)
        slices.update(r.kept)
    stops = {s.direction: s for s in state.stops}
    stops.update({r.stop.direction: r.stop for r in results if r.stop is not None})
    touched = {k for r in results for k in (*r.kept, *r.drop)} | {start}
    unsure = [u for u in state.unsure if u.k not in touched] + [u for r in results for u in r.unsure]
    return replace(state, slices=slices, walked=True, pending=None, visited=state.visited + dec_visits,
                   stops=tuple(stops[d] for d in sorted(stops, reverse=True)),
                   unsure=tuple(sorted(unsure, key=lambda u: u.k)), from_reference=False)


def _walk_one(dec: VolumeDecoder, state: OrganState, start: int, d: int, first: SliceMask,
              rules: WalkRules, join: bool = False, part: bool = False, doubted_only: bool = False) -> _Direction:
    out = _Direction()
    n = len(dec.stack)
    lo, hi = state.z_range if state.z_range is not None else (0, n - 1)
    if first.area < MIN_AREA:
        out.stop = Stop(start, d, "empty")
        out.drop = _outer_beyond(state, start + d, d, n)
        return out
    ws = WalkState(dec.stack[start], first, rules.stop, rules.margin_px)
    guard = Guard(rules.geometry, _shown(state, start, first, part, dec.hw)) if rules.guard else None
    stride = rules.stride() if _first_walk(state, start, d, part, join) else 1
    prev, at, reason, largest = first, start, None, first.area
    doubted = state.doubted() if doubted_only else set()
    k = _ahead(at, d, stride, lo, hi)
    while lo <= k <= hi:
        if k in state.anchors:
            reason = "anchor"
            break
        if doubted_only and k not in doubted:
            reason = "joined"
            break
        old = state.slices.get(k)
        if join and old is not None and old.area >= MIN_AREA:
            reason = "joined"
            break
        new, reason, check = _visit(dec, state, ws, guard, out, prev, k, rules, abs(k - at), ranged=not part)
        if reason and abs(k - at) > 1:  # the organ may end inside the stride: walk it slice by slice
            out.unsure = [u for u in out.unsure if u.k != k]
            stride, k, reason = 1, at + d, None
            continue
        if reason:
            break
        if part and old is not None and old.area:
            if (new.mask & old.mask).sum() >= PART_JOINED * new.area:
                reason = "joined"
                break
            out.kept[k] = union(old, new)
            prev, at, k = new, k, k + d
            continue
        if old is not None and old.area and iou_score(new.mask, old.mask) >= CONVERGED_IOU:
            reason = "converged"
            break
        if abs(k - at) > 1:
            _fill(dec, state, ws, guard, out, prev, at, new, k, rules)
        _keep(dec, ws, out, k, new, check)
        prev, at, largest = new, k, max(largest, new.area)
        if new.area < STRIDE_SHARE * largest:  # towards a pole sections change fast: every slice from here
            stride = 1
        k = _ahead(at, d, stride, lo, hi)
    if reason is None:
        reason = "range" if state.z_range is not None and 0 <= at + d < n else "edge"
    out.stop = Stop(at, d, reason)
    if not part and reason not in ("anchor", "converged", "joined", "range", "edge"):
        out.drop = _outer_beyond(state, at + d, d, n)
    return out


def _first_walk(state: OrganState, start: int, d: int, part: bool, join: bool) -> bool:
    """A 3D box's first walk this way: inside the box's slices (a z range), from a slice the user boxed (no
    points), no masks beyond it yet. Only these stride; walks a click starts or repeats, and walks with no z range
    to end them (a 2D box's), go slice by slice: a walk that must find the organ's end by itself lost its organ
    more often with a stride (MEASUREMENTS 13)."""
    sp = state.anchors.get(start)
    boxed = sp is not None and sp.box is not None and not sp.points and not sp.painted
    ranged = state.z_range is not None
    return ranged and boxed and not part and not join and not any((j - start) * d > 0 for j in state.slices)


def _ahead(at: int, d: int, stride: int, lo: int, hi: int) -> int:
    """The next slice a walk visits from `at`: `stride` slices on, or the last slice of its range when the
    stride would pass it."""
    k = at + d * stride
    if stride > 1 and not lo <= k <= hi and at != (hi if d > 0 else lo):
        k = hi if d > 0 else lo
    return k


def _visit(dec: VolumeDecoder, state: OrganState, ws: WalkState, guard, out: _Direction, prev: SliceMask, k: int,
           rules: WalkRules, steps: int = 1, ranged: bool = True):
    """Slice k decoded from the previous mask's box (`steps` slices back), bounded, guarded: (mask, why the
    walk stops there or None, its signals). Inside a 3D box's slices (and `ranged`) only a vanished mask stops
    the walk; else the stop rule does. A part's walk (not `ranged`: from a click) also ends where the guard
    refuses its mask: a part the user pointed at is followed only as long as it keeps its track."""
    new = dec.decode(k, Prompt(box=next_box(prev.mask, rules.margin_px, state.xy_limit)))
    if state.xy_limit is not None:
        new.mask &= box_mask(dec.hw, state.xy_limit)
    out.visited += 1
    if guard is not None and new.area >= MIN_AREA:
        new, refused = _guarded(guard, prev, new, steps)
        if refused and not ranged:
            return new, refused, None
        if refused:
            out.unsure.append(Unsure(k, [refused]))
    if state.z_range is not None and ranged:
        return new, *(("vanished", None) if new.area < MIN_AREA else (None, ws.check(prev, new, dec.stack[k])))
    return new, *ws.stop_reason(prev, new, dec.stack[k])


def _fill(dec: VolumeDecoder, state: OrganState, ws: WalkState, guard, out: _Direction, prev: SliceMask, at: int,
          new: SliceMask, k: int, rules: WalkRules) -> None:
    """The slices between two a stride apart. Where the two masks agree (IoU >= FILL_IOU) each is decoded, with
    the box of the nearer mask, on an embedding mixed from theirs (`VolumeDecoder.blended`: no encoder pass);
    where they do not, each is encoded and decoded in turn as a walk of single steps would."""
    d = 1 if k > at else -1
    between = range(at + d, k, d)
    if iou_score(prev.mask, new.mask) >= FILL_IOU:
        for j in between:
            t = abs(j - at) / abs(k - at)
            box = next_box(prev.mask if t <= 0.5 else new.mask, rules.margin_px, state.xy_limit)
            sm = dec.decode(j, Prompt(box=box), embedding=dec.blended(at, k, t))
            if state.xy_limit is not None:
                sm.mask &= box_mask(dec.hw, state.xy_limit)
            out.kept[j] = sm
        return
    p = prev
    for j in between:
        p, _, check = _visit(dec, state, ws, guard, out, p, j, rules)
        _keep(dec, ws, out, j, p, check)


def _keep(dec: VolumeDecoder, ws: WalkState, out: _Direction, k: int, sm: SliceMask, check) -> None:
    """Slice k's mask kept by the walk: listed as unsure where its signals fail, and the walk's history of what
    the organ looks like updated."""
    if check is not None and check.failing:
        out.unsure.append(Unsure(k, check.failing))
    out.kept[k] = sm
    ws.keep(dec.stack[k], sm)


def _shown(state: OrganState, start: int, first: SliceMask, part: bool, hw) -> np.ndarray:
    """What the organ showed where the walk starts: its mask there, and the ellipse inscribed in the box the
    user gave there (a first mask that misses part of the organ does not shrink the guard's limit)."""
    sp = state.anchors.get(start)
    if part or sp is None or sp.box is None:
        return first.mask
    x0, y0, x1, y1 = sp.box
    yy, xx = np.ogrid[:hw[0], :hw[1]]
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    return first.mask | (((xx - (x0 + x1) / 2) / rx) ** 2 + ((yy - (y0 + y1) / 2) / ry) ** 2 <= 1)


def _guarded(guard: Guard, prev: SliceMask, new: SliceMask, steps: int = 1) -> tuple[SliceMask, str | None]:
    """(mask, why the guard refused it or None): `new` where the guard admits it, else `new` cut to what the
    organ may have grown into since `prev`, `steps` slices back (`sambtcv.engine.guard`)."""
    verdict = guard.check(prev.mask, new.mask, steps)
    if verdict.ok:
        return new, None
    mask = guard.clip(prev.mask, new.mask, steps)
    logits = np.where(mask, new.logits, np.minimum(new.logits, -1.0)).astype(np.float32)
    return SliceMask(mask, logits, new.iou, None), verdict.reason


def _outer_beyond(state: OrganState, k: int, d: int, n: int) -> list:
    """Old masks from slice k on in direction d, when that side is the organ's outer end (no anchor lies
    beyond, no z range): a walk that ended before them takes them with it. Else none."""
    if state.z_range is not None:
        return []
    ks = range(k, n) if d > 0 else range(k, -1, -1)
    if any(j in state.anchors for j in ks):
        return []
    return [j for j in ks if j in state.slices]
