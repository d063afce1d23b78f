"""Walks that stay on their organ (sambtcv.engine.guard), clicks that repair a walk gone astray (sambtcv.engine.editor's
remove_part / add_part), and CTs resampled to the resolutions users load (sambtcv.data.resample,
tools/resample_case.py). Scripted decoders stand in for the models, so each rule is tested alone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, fails
from sambtcv.data.resample import new_grid, resample
from sambtcv.engine.anchors import OrganState, SlicePrompt
from sambtcv.engine.editor import ADD_LIMIT, DISK_MM, UNBACKED_CUT_LIMIT, Editor, EditRules, _follows
from sambtcv.engine.guard import GUARD_REASONS, Geometry, Guard
from sambtcv.engine.propagation import SIGNALS, Candidates, SliceMask, Unsure
from sambtcv.engine.walks import WalkRules, walk

sys.path.insert(0, str(ROOT / "tools"))
import resample_case  # noqa: E402


def _disk(side: int, cy: float, cx: float, r_px: float) -> np.ndarray:
    yy, xx = np.ogrid[:side, :side]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r_px ** 2


# ---------------------------------------------------------------------------------------------- the guard
@pytest.mark.parametrize("pixel_mm", [0.7, 1.5, 3.0])
def test_the_guard_judges_in_millimetres_alike_at_every_resolution(pixel_mm):
    """A 20 mm organ whose next section (1.5 mm further) is 0.5 mm wider is kept; 12 mm wider it has outgrown
    the organ; 40 mm away it has left it: the same verdicts at 0.7, 1.5 and 3 mm pixels."""
    side = int(200 / pixel_mm)
    c = side / 2
    prev = _disk(side, c, c, 20 / pixel_mm)
    guard = Guard(Geometry(pixel_mm, 1.5), prev)
    assert guard.check(prev, _disk(side, c, c, 20.5 / pixel_mm)).ok
    assert guard.check(prev, _disk(side, c, c, 32 / pixel_mm)).reason == "outgrown"
    assert guard.check(prev, _disk(side, c, c + 60 / pixel_mm, 20 / pixel_mm)).reason == "jumped"
    assert guard.check(prev, _disk(side, c, c, 10 / pixel_mm)).ok  # towards a pole organs shrink
    # a section may not creep past 1.5 times the first one's radius, however slowly it grew
    wide = _disk(side, c, c, 29 / pixel_mm)
    assert guard.check(wide, _disk(side, c, c, 29.5 / pixel_mm)).ok
    assert guard.check(_disk(side, c, c, 35 / pixel_mm), _disk(side, c, c, 36 / pixel_mm)).reason == "outgrown"


def test_a_clipped_mask_grows_no_more_than_allowed():
    prev = _disk(100, 50, 50, 10)
    guard = Guard(Geometry(1.0, 2.0), prev)
    clipped = guard.clip(prev, np.ones((100, 100), bool))
    grown = np.sqrt(clipped.sum() / np.pi) - np.sqrt(prev.sum() / np.pi)
    assert 0 < grown <= guard.allowed_growth_mm() + 0.5


class _FillsTheBox:
    """A decoder that answers every box with the box itself (what a leaking box prompt does on a flat image)."""

    def __init__(self, n: int = 12, side: int = 96):
        self.stack = np.full((n, side, side), 100, np.uint8)
        self.hw = (side, side)

    def decode(self, k, prompt, mask_input=None):
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        mask = np.zeros(self.hw, bool)
        mask[y0:y1 + 1, x0:x1 + 1] = True
        return SliceMask(mask, np.where(mask, 2.0, -2.0).astype(np.float32), 0.9)


@pytest.mark.parametrize("guard", [True, False])
def test_a_leaking_walk_stays_the_organs_size_with_the_guard(guard):
    """Each slice's box is the previous mask's grown by the margin: a decoder that fills its box leaks a margin
    per slice. Guarded, every kept mask stays within the allowed growth of the one before (and the slices say
    why they were cut); unguarded, it grows to the image's size."""
    dec = _FillsTheBox()
    first = np.zeros(dec.hw, bool)
    first[40:50, 40:50] = True
    state = OrganState(1, {6: SliceMask(first, np.where(first, 2.0, -2.0).astype(np.float32), 0.9)}, z_range=(0, 11))
    rules = WalkRules("intensity", 6.0, Geometry(1.0, 1.0), guard, stride_mm=0.0)
    done = walk(dec, state, 6, rules)
    areas = [done.slices[k].area for k in range(12)]
    if guard:
        assert max(areas) < 3 * first.sum(), areas
        assert "outgrown" in {s for u in done.unsure for s in u.signals} <= set(GUARD_REASONS) | set(SIGNALS)
    else:
        assert max(areas) > 20 * first.sum(), areas


# ---------------------------------------------------------------------------------------------- clicks that repair
class _World:
    """A stack of labelled structures standing in for both models: a box gets the structure with most pixels
    inside it (clipped to the box), a point gets the structure under it as its one candidate."""

    def __init__(self, regions: np.ndarray):
        self.regions = regions
        self.stack = np.where(regions > 0, 100 + 20 * regions, 20).astype(np.uint8)
        self.hw = regions.shape[1:]

    def _mask(self, k, rid):
        m = self.regions[k] == rid
        return SliceMask(m, np.where(m, 2.0, -2.0).astype(np.float32), 0.9)

    def decode(self, k, prompt, mask_input=None):
        if prompt.box is None:
            x, y = (int(round(v)) for v in prompt.points[0])
            return self._mask(k, self.regions[k][y, x])
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        inside = self.regions[k][y0:y1 + 1, x0:x1 + 1]
        ids, counts = np.unique(inside[inside > 0], return_counts=True)
        return self._mask(k, ids[np.argmax(counts)] if len(ids) else -1)

    def candidates(self, k, prompt, mask_input=None):
        x, y = (int(round(v)) for v in prompt.points[0])
        rid = self.regions[k][y, x]
        return Candidates([self._mask(k, rid if rid > 0 else -1)], 0)


def _two_structures(n: int = 10, side: int = 64):
    """Structure 1 (the organ) on the left of every slice, structure 2 (another organ) on the right."""
    regions = np.zeros((n, side, side), np.int16)
    regions[:, 20:36, 8:24] = 1
    regions[:, 20:40, 36:56] = 2
    return regions


def _editor(world: _World, pixel_mm: float = 1.0) -> Editor:
    return Editor(world, EditRules(WalkRules("intensity", 2.0, Geometry(pixel_mm, 1.0), stride_mm=0.0)), world)


def _state(world, masks: dict, anchor: int, unsure=()):
    slices = {k: SliceMask(m, np.where(m, 2.0, -2.0).astype(np.float32), 0.9) for k, m in masks.items()}
    return OrganState(1, slices, {anchor: SlicePrompt(box=(8.0, 20.0, 23.0, 35.0))}, z_range=(0, len(world.stack) - 1),
                      unsure=tuple(Unsure(k, ["intensity"]) for k in unsure))


@pytest.mark.parametrize("doubted", [True, False])
def test_a_minus_click_on_a_doubted_wrong_part_removes_its_slab(doubted):
    """The walk left the organ after slice 5 for its neighbour (slices 6-9 hold structure 2, the walk doubted
    them). A - click in the middle of the wrong part on slice 7 removes it there and on the slices beyond it,
    away from the box's slice; the slices between keep theirs until a click there. Where the walk did not doubt
    the slices and the part looks like the organ, the click only cuts near itself."""
    regions = _two_structures()
    world = _World(regions)
    masks = {k: regions[k] == (1 if k <= 5 else 2) for k in range(10)}
    if not doubted:
        world.stack[regions == 2] = world.stack[regions == 1][0]  # looks like the organ
    state = _state(world, masks, anchor=2, unsure=range(6, 10) if doubted else ())
    new = _editor(world).correct(state, 7, 46.0, 30.0, False)
    left = {k: int((new.slices[k].mask & (regions[k] == 2)).sum()) for k in range(6, 10)}
    if doubted:
        assert left[7] == left[8] == left[9] == 0 and left[6] == int((regions[6] == 2).sum()), left
    else:  # cut near the click (and carried), the part kept
        assert all(0.5 * (regions[k] == 2).sum() < left[k] < (regions[k] == 2).sum() for k in (7, 8)), left
    assert all(np.array_equal(new.slices[k].mask, masks[k]) for k in range(6))


def test_a_plus_click_apart_from_the_mask_adds_a_part_walked_through_its_slab():
    """The organ has two parts on slices 3-8 (structure 2 counts as the organ there too), and the walk holds
    only the first. A + click on the missed part of slice 5 adds it there and walks it both ways, added to the
    slices' masks, which keep what they had. A region larger than the organ's largest section is no part of it."""
    regions = _two_structures()
    regions[regions == 2] = 0
    regions[3:9, 22:34, 40:52] = 2  # smaller than the organ's sections: a part of it, not another organ
    world = _World(regions)
    masks = {k: regions[k] == 1 for k in range(10)}
    state = _state(world, masks, anchor=2)
    new = _editor(world).correct(state, 5, 46.0, 30.0, True)
    for k in range(10):
        assert np.array_equal(new.slices[k].mask & (regions[k] == 1), regions[k] == 1)
        assert (new.slices[k].mask & (regions[k] == 2)).sum() == (regions[k] == 2).sum(), k
    assert 5 in new.anchors and new.anchors[5].points == ((46.0, 30.0),)
    regions[3:9, 22:34, 40:52] = 0
    regions[3:9, 16:40, 36:56] = 2  # now larger than any section of the organ: the click edits near itself
    world = _World(regions)
    new = _editor(world).correct(_state(world, masks, anchor=2), 5, 46.0, 30.0, True)
    assert all((new.slices[k].mask & (regions[k] == 2)).sum() < 0.25 * (regions[k] == 2).sum() for k in range(3, 9))


def test_a_minus_click_sam_cannot_answer_cuts_as_wide_as_it_lies_deep():
    """The mask holds the organ and, beside it, a wrong region that looks the same (one blob). A - click in the
    middle of the wrong region, where SAM's answer would take more than the mask may lose, cuts a disk as wide as
    the click lies deep in the mask (within the limit), from the wrong region alone; not a few pixels."""
    regions = np.zeros((3, 64, 64), np.int16)
    regions[:, 20:36, 8:24] = 1  # the organ
    regions[:, 20:36, 24:40] = 2  # an isodense neighbour the walk took with it
    world = _World(regions)
    world.stack[regions == 2] = world.stack[regions == 1][0]
    masks = {k: regions[k] > 0 for k in range(3)}
    new = _editor(world).correct(_state(world, masks, anchor=0), 1, 32.0, 28.0, False)
    cut = masks[1] & ~new.slices[1].mask
    assert (cut & (regions[1] == 1)).sum() == 0
    assert (cut & (regions[1] == 2)).sum() > 3 * int(np.pi * DISK_MM ** 2), int(cut.sum())  # 1 mm pixels
    assert cut.sum() <= UNBACKED_CUT_LIMIT * masks[1].sum() + 1


@pytest.mark.parametrize("pixel_mm", [0.75, 1.5, 3.0])
def test_a_click_sam_cannot_answer_changes_as_many_mm_at_every_pixel_size(pixel_mm):
    """A + click just outside a small organ's mask, where SAM sees nothing: the disk it adds is DISK_MM wide
    (at least a pixel), the same in mm at 0.75, 1.5 and 3 mm pixels; not 3 pixels, which at 3 mm would be
    larger than the organ's section."""
    regions = np.zeros((3, 64, 64), np.int16)
    regions[:, 28:36, 28:36] = 1
    world = _World(regions)
    masks = {k: regions[k] == 1 for k in range(3)}
    new = _editor(world, pixel_mm).correct(_state(world, masks, anchor=0), 1, 40.0, 32.0, True)
    added = int((new.slices[1].mask & ~masks[1]).sum())
    radius_mm = max(DISK_MM, pixel_mm)
    assert new.slices[1].mask[32, 40] and added * pixel_mm ** 2 <= np.pi * (radius_mm + pixel_mm) ** 2, added


def test_a_plus_click_sam_cannot_answer_adds_as_wide_as_it_lies_from_the_mask():
    """The mask misses an 8 px strip of the organ beside it. A + click in the middle of the strip, where SAM's
    region (the whole strip) adds more than ADD_LIMIT of the mask, adds a disk as wide as the click lies from the
    mask (within the limit), on the organ: not the smallest disk of a few pixels."""
    regions = np.zeros((3, 64, 64), np.int16)
    regions[:, 20:36, 8:32] = 1
    world = _World(regions)
    masks = {k: (regions[k] == 1) & (np.arange(64) < 24)[None, :] for k in range(3)}
    new = _editor(world).correct(_state(world, masks, anchor=0), 1, 28.0, 28.0, True)
    added = new.slices[1].mask & ~masks[1]
    assert added.sum() > 2 * np.pi * DISK_MM ** 2, int(added.sum())
    assert added.sum() <= ADD_LIMIT * masks[1].sum() + 1 and (added & (regions[1] == 1)).sum() >= 0.9 * added.sum()


@pytest.mark.parametrize("pixel_mm", [0.75, 1.5, 3.0])
def test_a_carried_change_may_grow_by_mm_not_by_pixels(pixel_mm):
    """A carried click continues while its change on the next slice continues the last one (`_follows`): at most
    CARRY_GROWTH times as large plus CARRY_SLACK_MM2, and near it. The same tissue gives the same verdict at every
    pixel size: a 3 mm square of change followed by a 12 mm square around it is another error, a 6 mm square
    continues it (50 pixels of slack would let the 12 mm square pass at 3 mm pixels)."""
    geometry = Geometry(pixel_mm, 1.0)

    def square(side_mm: float) -> np.ndarray:
        n = int(round(side_mm / pixel_mm))
        m = np.zeros((64, 64), bool)
        m[32 - n // 2: 32 - n // 2 + n, 32 - n // 2: 32 - n // 2 + n] = True
        return m

    assert not _follows(square(12.0), square(3.0), geometry)
    assert _follows(square(6.0), square(3.0), geometry)


def test_without_repair_a_click_only_edits_near_itself():
    regions = _two_structures()
    world = _World(regions)
    masks = {k: regions[k] == 1 for k in range(10)}
    ed = _editor(world)
    ed.rules = EditRules(WalkRules("intensity", 2.0, Geometry(1.0, 1.0), stride_mm=0.0), repair=False)
    new = ed.correct(_state(world, masks, anchor=2), 5, 46.0, 30.0, True)
    assert all(0 < (new.slices[k].mask & (regions[k] == 2)).sum() < 0.25 * (regions[k] == 2).sum() for k in (4, 5, 6))


# ---------------------------------------------------------------------------------------------- resampling
def test_resampling_keeps_the_body_and_its_labels():
    """LPS-stored 0.8 x 0.8 x 5 mm -> 1.5 mm: the same outer corner and orientation, the label's ids and its
    volume in mm3 (nearest neighbour), a flat image flat (linear)."""
    affine = np.diag([-0.8, -0.8, 5.0, 1.0])
    affine[:3, 3] = [100.0, 80.0, -40.0]
    label = np.zeros((100, 90, 12), np.uint8)
    label[20:60, 30:70, 2:10] = 6
    label[70:80, 10:20, 4:8] = 12
    image = np.full(label.shape, -57.0, np.float32)
    out = resample(image, label, affine, [1.5, 1.5, 1.5])
    assert out.image.shape == new_grid(label.shape, affine, [1.5] * 3)[0] == (53, 48, 40)
    corner = lambda a: a[:3, 3] - a[:3, :3] @ np.full(3, 0.5)  # noqa: E731
    assert np.allclose(corner(out.affine), corner(affine))
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    assert set(np.unique(out.label)) == {0, 6, 12}
    before, after = (label == 6).sum() * 0.8 * 0.8 * 5, (out.label == 6).sum() * 1.5 ** 3
    assert abs(after - before) < 0.1 * before, (before, after)
    assert np.allclose(out.image, -57.0)


def _dataset(root: Path) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    label = np.zeros((40, 40, 8), np.uint8)
    label[10:30, 10:30, 2:6] = 1
    image = np.where(label > 0, 60, -100).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / "ct1.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / "ct1.nii.gz"))
    (root / "dataset_0.json").write_text(json.dumps({"training": [], "validation": [
        {"image": "imagesTr/ct1.nii.gz", "label": "labelsTr/ct1.nii.gz", "labelled": [1], "source": "test"}]}))
    return root


def test_the_resample_tool_writes_a_dataset_that_keeps_what_is_labelled(tmp_path):
    src = _dataset(tmp_path / "src")
    resample_case.main(["--data-dir", str(src), "--spacing", "2", "--out", str(tmp_path / "out")])
    spec = json.loads((tmp_path / "out" / "dataset_0.json").read_text())
    entry = spec["validation"][0]
    assert entry["labelled"] == [1] and entry["source"] == "test" and entry["spacing_mm"] == [2.0, 2.0, 2.0]
    img = nib.load(str(tmp_path / "out" / entry["image"]))
    assert img.shape == (16, 16, 10) and np.allclose(img.header.get_zooms(), 2.0)
    assert img.get_data_dtype() == np.int16


@pytest.mark.parametrize("argv,needle", [(["--spacing", "0"], "--spacing"), (["--spacing", "1,2"], "--spacing"),
                                         (["--out", "FOREIGN"], "--out")])
def test_the_resample_tool_refuses_bad_input_before_any_work(tmp_path, capsys, argv, needle):
    src = _dataset(tmp_path / "src")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not the project's")
    args = ["--data-dir", str(src), "--spacing", "1.5", "--out", str(tmp_path / "out")]
    for i in range(0, len(argv), 2):
        args[args.index(argv[i]) + 1] = str(foreign) if argv[i + 1] == "FOREIGN" else argv[i + 1]
    line = fails(capsys, resample_case.main, args)
    assert needle in line
    assert (foreign / "mine.txt").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- stride
class _Counting(_World):
    """`_World` that counts the slices it decodes on their own embedding (an encoder pass each, once) and those it
    decodes on a mixed one (`blended`)."""

    def __init__(self, regions):
        super().__init__(regions)
        self.encoded, self.blended_slices = set(), []

    def blended(self, a, b, t):
        self.encoded.update((a, b))
        return ("mixed", a, b, t)

    def decode(self, k, prompt, mask_input=None, embedding=None):
        if embedding is None:
            self.encoded.add(k)
        else:
            self.blended_slices.append(k)
        return super().decode(k, prompt, mask_input)


def _walked(regions, stride_mm, slice_mm=1.0, given=None, ranged=True):
    """The organ (structure 1) walked both ways from the middle slice, which holds `given` (default: a box),
    inside a 3D box's z range (the whole stack) when `ranged`."""
    world = _Counting(regions)
    k = len(regions) // 2
    first = world._mask(k, 1)
    state = OrganState(1, {k: first}, {k: given or SlicePrompt(box=(0.0, 0.0, 47.0, 47.0))},
                       z_range=(0, len(regions) - 1) if ranged else None)
    done = walk(world, state, k, WalkRules("vanish", 2.0, Geometry(1.0, slice_mm), True, stride_mm))
    return world, done


def test_a_stride_encodes_a_slice_every_few_mm_and_fills_the_rest_alike():
    """On 1 mm slices with a 3 mm stride the walk encodes about a third of the organ's slices; the slices between
    (their neighbours agree) are decoded on mixed embeddings, and every mask is the every-slice walk's."""
    regions = np.zeros((31, 48, 48), np.int16)
    regions[3:28, 14:30, 12:32] = 1
    every, a = _walked(regions, 0.0)
    strided, b = _walked(regions, 3.0)
    assert set(a.slices) == set(b.slices) == set(range(3, 28))
    assert all(np.array_equal(a.slices[k].mask, b.slices[k].mask) for k in a.slices)
    assert len(strided.encoded) <= len(every.encoded) / 2 and strided.blended_slices
    assert {s.reason for s in b.stops} == {"vanished"} and {s.k for s in b.stops} == {3, 27}


def test_where_neighbours_disagree_the_slices_between_are_encoded():
    """An organ that changes place between slices: no slice is filled from mixed embeddings there."""
    regions = np.zeros((21, 48, 48), np.int16)
    for k in range(2, 19):
        x0 = 8 + 2 * k  # moves 2 px a slice: masks 3 slices apart overlap little
        regions[k, 20:28, x0:x0 + 8] = 1
    strided, b = _walked(regions, 3.0)
    assert not strided.blended_slices
    every, a = _walked(regions, 0.0)
    assert set(a.slices) == set(b.slices) and all(np.array_equal(a.slices[k].mask, b.slices[k].mask) for k in a.slices)


def test_thick_slices_and_walks_a_click_starts_go_slice_by_slice():
    regions = np.zeros((11, 48, 48), np.int16)
    regions[1:10, 14:30, 12:32] = 1
    strided, _ = _walked(regions, 3.0, slice_mm=5.0)
    assert not strided.blended_slices
    clicked, _ = _walked(regions, 3.0, given=SlicePrompt().with_point(20.0, 20.0, True))
    assert not clicked.blended_slices


def test_a_walk_without_a_z_range_goes_slice_by_slice():
    """A 2D box's walk finds the organ's end by itself: it encodes every slice it visits."""
    regions = np.zeros((31, 48, 48), np.int16)
    regions[3:28, 14:30, 12:32] = 1
    unranged, b = _walked(regions, 3.0, ranged=False)
    assert not unranged.blended_slices and unranged.encoded == set(range(2, 29)) - {15}  # 15: the given slice
    assert set(b.slices) == set(range(3, 28))


def test_towards_a_pole_the_walk_encodes_every_slice():
    """Where the organ's section falls under STRIDE_SHARE of the largest it has shown, the walk strides no more:
    every slice from there on is encoded, not filled (a pole changes fast)."""
    regions = np.zeros((31, 48, 48), np.int16)
    regions[3:21, 14:30, 12:32] = 1  # 320 px
    regions[21:28, 18:26, 18:26] = 1  # 64 px: a fifth of it
    strided, b = _walked(regions, 3.0)
    assert set(b.slices) == set(range(3, 28))
    assert set(range(22, 28)) <= strided.encoded and not set(range(22, 28)) & set(strided.blended_slices)
    assert strided.blended_slices  # the organ's body still strides


def test_a_parts_walk_ends_where_the_guard_refuses_its_mask():
    """A + click's part is followed only while it keeps its track: where the structure under it swells past what
    the part showed (slices 7-9), its walk ends instead of adding a cut-down piece of that structure."""
    regions = _two_structures()
    regions[regions == 2] = 0
    regions[2:7, 22:34, 40:52] = 2  # the part the click points at (smaller than the organ's sections)
    regions[7:, 16:40, 36:56] = 2  # above it, something three times its size
    world = _World(regions)
    masks = {k: regions[k] == 1 for k in range(10)}
    new = _editor(world).correct(_state(world, masks, anchor=0), 4, 46.0, 30.0, True)
    assert all((new.slices[k].mask & (regions[k] == 2)).sum() == (regions[k] == 2).sum() for k in range(2, 7))
    assert all(not (new.slices[k].mask & (regions[k] == 2)).any() for k in range(7, 10))


def test_a_plus_click_beside_a_doubted_slices_mask_walks_the_doubted_slices_again():
    """The walk left the organ (structure 1) for its neighbour (2, touching it) on slices 6-9 and doubted 6-8. A
    + click on the organ on slice 7 makes slice 7 the organ's region and walks from it through the doubted slices
    (6-8), up to the first trusted one (5 below, 9 above), which keep their masks."""
    regions = np.zeros((10, 64, 64), np.int16)
    regions[:, 20:36, 8:24] = 1
    regions[:, 20:40, 24:44] = 2
    world = _World(regions)
    masks = {k: regions[k] == (1 if k < 6 else 2) for k in range(10)}
    state = _state(world, masks, anchor=2, unsure=(6, 7, 8))
    new = _editor(world).correct(state, 7, 14.0, 28.0, True)
    for k in range(10):
        want = regions[k] == 1 if k in (6, 7, 8) else masks[k]
        assert np.array_equal(new.slices[k].mask, want), k
    assert new.anchors[7].points == ((14.0, 28.0),) and not any(u.k == 7 for u in new.unsure)


def test_a_plus_click_near_a_pole_adds_what_sam_sees_up_to_a_share_of_the_largest_section():
    """Towards a pole the organ's section is small and its mask there smaller still (6 of 42 pixels). A + click
    in the part it misses adds SAM's region there: what a + click may add is a share (ADD_LIMIT) of the organ's
    largest section, not of the few pixels the slice's mask holds."""
    regions = np.zeros((10, 64, 64), np.int16)
    regions[:9, 20:36, 8:24] = 1
    regions[9, 24:30, 8:15] = 1
    world = _World(regions)
    masks = {k: regions[k] == 1 for k in range(9)}
    masks[9] = np.zeros((64, 64), bool)
    masks[9][24:26, 8:11] = True
    new = _editor(world).correct(_state(world, masks, anchor=2), 9, 13.0, 28.0, True)
    assert np.array_equal(new.slices[9].mask, regions[9] == 1), int(new.slices[9].mask.sum())
