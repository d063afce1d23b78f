"""The challenge's interactive protocol (boxes, clicks, files), predict_segfm.py step by step in new
processes, and the engine's anchors (sambtcv.engine.editor, sambtcv.engine.walks) on the tiny phantom."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from conftest import error_line, run_script
from sambtcv.core.errors import PipelineError
from sambtcv.core.names import ORGAN_ID
from sambtcv.data.btcv import find_cases
from sambtcv.engine import segfm
from sambtcv.engine.editor import CARRY_INTENSITY, Editor, EditRules
from sambtcv.engine.propagation import VolumeDecoder, merge
from sambtcv.engine.protocol import predict, run_case
from sambtcv.engine.volume import load_case
from sambtcv.engine.walks import WalkRules

SCORED = [ORGAN_ID[o] for o in ("spleen", "right_kidney", "left_kidney", "liver")]


# ---------------------------------------------------------------------------------------------- protocol
def test_challenge_box_follows_the_rules():
    gt = np.zeros((20, 256, 512), bool)
    gt[4:15, 100:140, 200:300] = True
    gt[9, 90:150, 190:310] = True  # the middle slice of the slices the class is on is slice 9
    boxes = [segfm.challenge_box(gt, np.random.RandomState(segfm.BOX_SEED)) for _ in range(2)]
    assert boxes[0] == boxes[1]  # seeded
    b = boxes[0]
    assert (b.z_min, b.z_max, b.z_mid) == (4, 14, 9)
    x0, y0, x1, y1 = b.box
    shift_x, shift_y = 190 - x0, 90 - y0
    assert 0 <= shift_y <= 5 and shift_x == int(shift_y * 512 / 256)  # 0-5 px per 256 px, both sides
    assert (x1 - 309, y1 - 149) == (shift_x, shift_y)


def test_next_click_is_the_centre_of_the_largest_error():
    gt = np.zeros((12, 40, 40), bool)
    gt[2:10, 5:35, 5:35] = True
    seg = gt.copy()
    seg[3:8, 10:22, 10:22] = False  # a missed block (720 voxels)
    seg[2:10, 36:39, 5:20] = True  # a leak (360 voxels)
    c = segfm.next_click(gt, seg)
    assert c.positive and 3 <= c.z <= 7 and 13 <= c.y <= 18 and 13 <= c.x <= 18
    seg[3:8, 10:22, 10:22] = True
    c = segfm.next_click(gt, seg)
    assert not c.positive and c.y >= 36 and 5 <= c.x < 20
    assert segfm.next_click(gt, gt.copy()) is None
    assert segfm.auc([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(0.6 / 2 + 0.7 + 0.8 + 0.9 + 1.0 / 2)


def test_nsd_is_monais_surface_dice():
    gt = np.zeros((10, 30, 30), bool)
    gt[2:8, 5:25, 5:25] = True
    assert segfm.nsd(gt, gt, (2.0, 1.0, 1.0)) == pytest.approx(1.0)
    shifted = np.roll(gt, 6, axis=2)
    assert 0.2 < segfm.nsd(gt, shifted, (2.0, 1.0, 1.0)) < 0.9


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_case_files_round_trip(tmp_path):
    imgs = np.zeros((6, 20, 30), np.uint8)
    boxes = [segfm.Box3D(1, 4, 2, (3, 4, 10, 12)), segfm.Box3D(0, 5, 3, (0, 0, 29, 19))]
    clicks = [{"fg": [[2, 5, 6]], "bg": [[3, 7, 8], [1, 1, 1]]}, {"fg": [], "bg": []}]
    order = [["bg", "fg", "bg"], [None, None, None]]
    segfm.write_case(tmp_path / "a.npz", imgs, (2.5, 0.8, 0.8), boxes, clicks, order)
    case = segfm.read_case(tmp_path / "a.npz")
    assert case.boxes == boxes and case.spacing == (2.5, 0.8, 0.8)
    assert [(c.z, c.positive) for c in case.clicks[0]] == [(3, False), (2, True), (1, False)]
    assert case.clicks[1] == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_npz_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.npz"
    np.savez(path, imgs=np.zeros((2, 4, 4), np.uint8), spacing=np.ones(3), boxes=np.array([_Evil()], dtype=object))
    with pytest.raises(PipelineError, match="evil.npz is not a readable .npz .*system is not allowed here"):
        segfm.read_case(path)
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def val_case(raw_phantom):
    _, image, label = find_cases(raw_phantom)["val"][0]
    return load_case("val", image, label, (-160, 240))


@pytest.fixture(scope="module")
def decoders(val_case, litemedsam, mobilesam, tmp_path_factory):
    from sambtcv.models.decoder import load_decoder

    cache = tmp_path_factory.mktemp("interactive") / "cache"
    box = VolumeDecoder(val_case.stack, litemedsam, load_decoder(litemedsam).eval(), cache, "cpu")
    point = VolumeDecoder(val_case.stack, mobilesam, load_decoder(mobilesam).eval(), cache, "cpu")
    return box, point


def _editor(decoders, case) -> Editor:
    return Editor(decoders[0], EditRules(WalkRules("intensity", 9.0 / case.pixel_mm, case.geometry)), decoders[1])


@pytest.mark.slow
def test_clicks_do_not_lower_the_dice_on_average(decoders, val_case):
    """The protocol on the phantom: a box, then 5 clicks; the mean DSC over organs never falls by more
    than 0.01 from one step to the next (the acceptance's bound), and ends above where the box left it."""
    run = run_case(_editor(decoders, val_case), "val", val_case.label,
                   (val_case.spacing[2], val_case.spacing[0], val_case.spacing[1]), SCORED, nsd=False)
    s = run.summary()
    assert len(s) == 4 and all(len(v["dsc"]) == 6 for v in s.values())
    mean = [np.mean([v["dsc"][i] for v in s.values()]) for i in range(6)]
    assert mean[0] > 0.8, mean
    assert all(b >= a - 0.01 for a, b in zip(mean, mean[1:])), mean
    assert mean[-1] > mean[0], mean


def test_a_click_after_a_box_keeps_the_box(decoders, val_case):
    ed = _editor(decoders, val_case)
    liver = ORGAN_ID["liver"]
    k = int(np.argmax((val_case.label == liver).sum(axis=(1, 2))))
    box = tuple(float(v) for v in np.argwhere(val_case.label[k] == liver)[:, ::-1].min(0)) + \
        tuple(float(v) for v in np.argwhere(val_case.label[k] == liver)[:, ::-1].max(0))
    state = ed.prompt(None, liver, k, box=box)
    ys, xs = np.nonzero(state.slices[k].mask)
    state = ed.click(state, k, float(xs[0]), float(ys[0]), False)
    sp = state.anchors[k]
    assert sp.box == box and sp.points == ((float(xs[0]), float(ys[0])),) and sp.labels == (0,)
    assert not state.slices[k].mask[ys[0], xs[0]]  # the click is answered
    assert sp.describe() == "box + 1 point (1 -)"


def test_walks_never_overwrite_an_anchor(decoders, val_case):
    ed = _editor(decoders, val_case)
    spleen = ORGAN_ID["spleen"]
    ks = np.flatnonzero((val_case.label == spleen).any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    ys, xs = np.nonzero(val_case.label[k] == spleen)
    state = ed.walk(ed.prompt(None, spleen, k, box=(xs.min(), ys.min(), xs.max(), ys.max())))
    j = k + 1 if k + 1 in state.slices else k - 1
    painted = np.zeros(val_case.stack.shape[1:], bool)
    painted[ys.min():ys.min() + 3, xs.min():xs.min() + 3] = True
    state = ed.paint(state, spleen, j, painted)
    again = ed.walk(ed.prompt(state, spleen, k, box=(xs.min(), ys.min(), xs.max(), ys.max()), fresh=True), k)
    assert np.array_equal(again.slices[j].mask, painted) and j in again.anchors
    assert any(s.reason == "anchor" and s.k == j - np.sign(j - k) for s in again.stops)


def test_a_walk_from_an_unchanged_slice_converges_at_once(decoders, val_case):
    ed = _editor(decoders, val_case)
    liver = ORGAN_ID["liver"]
    k = int(np.argmax((val_case.label == liver).sum(axis=(1, 2))))
    ys, xs = np.nonzero(val_case.label[k] == liver)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    state = ed.walk(ed.prompt(None, liver, k, box=box))
    again = ed.walk(ed.prompt(state, liver, k, box=box, fresh=True), k)
    assert again.visited - state.visited <= 2  # one slice each way, then "converged"
    assert {s.reason for s in again.stops} <= {"converged", "edge", "range", "intensity", "vanished"}
    assert "converged" in {s.reason for s in again.stops}


def _leaking_liver(ed, case):
    """The liver walked from its largest slice, then made to leak into the right kidney on every other slice
    both share (the kidney's pixels added to the liver's masks there): (state, the leak's slices, kidney)."""
    from dataclasses import replace

    from sambtcv.engine.propagation import SliceMask

    liver, kidney = ORGAN_ID["liver"], ORGAN_ID["right_kidney"]
    k = int(np.argmax((case.label == liver).sum(axis=(1, 2))))
    ys, xs = np.nonzero(case.label[k] == liver)
    state = ed.walk(ed.prompt(None, liver, k, box=(xs.min(), ys.min(), xs.max(), ys.max())))
    both = [j for j in sorted(state.slices) if (case.label[j] == kidney).sum() > 30 and j not in state.anchors]
    slices = dict(state.slices)
    for j in both:
        leak = case.label[j] == kidney
        logits = np.where(leak, 5.0, slices[j].logits).astype(np.float32)
        slices[j] = SliceMask(slices[j].mask | leak, logits, slices[j].iou, None)
    return replace(state, slices=slices), both, kidney


@pytest.mark.parametrize("carry", [True, False])
def test_a_minus_click_in_a_leak_corrects_the_slices_that_share_it(decoders, val_case, carry):
    """A - click in the middle of a leak shared by several slices cuts it there too (the click is carried
    while its pixel stays inside the mask and looks the same); with carrying off only its own slice changes."""
    from dataclasses import replace

    from scipy import ndimage

    ed = _editor(decoders, val_case)
    ed.rules = replace(ed.rules, carry=carry)
    state, both, kidney = _leaking_liver(ed, val_case)
    assert len(both) >= 2, both
    k = both[len(both) // 2]
    leak = val_case.label[k] == kidney
    # the deepest pixel of the leak that lies in the leak on a neighbouring slice too, looking the same there
    same = np.zeros_like(leak)
    for j in (k - 1, k + 1):
        if j in both:
            look = np.abs(val_case.stack[j].astype(int) - val_case.stack[k].astype(int)) <= CARRY_INTENSITY
            same |= (val_case.label[j] == kidney) & look
    y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(leak) * same), leak.shape)
    assert same[y, x]
    new = ed.correct(state, k, float(x), float(y), False)
    left = {j: int((new.slices[j].mask & (val_case.label[j] == kidney)).sum()) for j in both}
    before = {j: int((state.slices[j].mask & (val_case.label[j] == kidney)).sum()) for j in both}
    assert left[k] < 0.5 * before[k], (left, before)
    neighbours = [j for j in both if j != k]
    fixed = [j for j in neighbours if left[j] < 0.5 * before[j]]
    if carry:
        assert fixed, (left, before)
        assert all(new.anchors[j].carried for j in fixed)
    else:
        assert fixed == [] and all(np.array_equal(new.slices[j].mask, state.slices[j].mask) for j in neighbours)


def test_a_plus_click_beyond_the_end_joins_the_organ_without_replacing_it(decoders, val_case):
    """A + click on a slice beyond the walked end of the organ walks outward from there, and toward the organ
    only across the slices without a mask: the organ's masks stay as they were."""
    from dataclasses import replace

    ed = _editor(decoders, val_case)
    liver = ORGAN_ID["liver"]
    ks = np.flatnonzero((val_case.label == liver).any(axis=(1, 2)))
    k = int(np.argmax((val_case.label == liver).sum(axis=(1, 2))))
    ys, xs = np.nonzero(val_case.label[k] == liver)
    state = ed.walk(ed.prompt(None, liver, k, box=(xs.min(), ys.min(), xs.max(), ys.max())))
    end = int(ks[0]) if k - ks[0] > ks[-1] - k else int(ks[-1])  # the end farther from the prompt
    inward = 1 if end < k else -1
    assert abs(k - end) >= 3
    kept = {j: sm for j, sm in state.slices.items() if (j - end) * inward > 1}  # the end and its neighbour go
    cut = replace(state, slices=kept)
    yx = np.argwhere(val_case.label[end] == liver)
    y, x = yx[len(yx) // 2]
    new = ed.correct(cut, end, float(x), float(y), True)
    assert new.slices[end].area > 0 and new.slices[end + inward].area > 0  # the end and the gap are filled
    for j, sm in kept.items():  # nothing the organ had is replaced
        assert np.array_equal(new.slices[j].mask, sm.mask), j
    assert any(s.reason == "joined" for s in new.stops)


# ---------------------------------------------------------------------------------------------- predictor


@pytest.mark.slow
def test_predictor_steps_in_new_processes_equal_one_session(decoders, val_case, tmp_path):
    """predict_segfm.py called once per step (a new process each, as the challenge runs it) gives what the
    in-process protocol gives; a broken file beside it gets one line and no output, the good one is written,
    exit status 2."""
    gt = np.zeros(val_case.label.shape, np.uint8)
    for i, o in enumerate(SCORED[:2]):
        gt[val_case.label == o] = i + 1
    rng = np.random.RandomState(segfm.BOX_SEED)
    boxes = [segfm.challenge_box(gt == i + 1, rng) for i in range(2)]
    spacing = (val_case.spacing[2], val_case.spacing[0], val_case.spacing[1])
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "broken.npz").write_bytes(b"not a zip")
    args = ["predict_segfm.py", "--inputs", inp, "--outputs", out, "--runtime", "torch", "--cache-dir",
            tmp_path / "cache", "--device", "cpu"]
    clicks, order = [{"fg": [], "bg": []} for _ in boxes], [[] for _ in boxes]
    segfm.write_case(inp / "case.npz", val_case.stack, spacing, boxes)
    rules = EditRules(WalkRules("intensity", 9.0 / val_case.pixel_mm, val_case.geometry))
    session = Editor(decoders[0], rules, decoders[1])
    for step in range(3):
        res = run_script(args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert error_line(res.stderr).startswith("error: broken.npz is not a readable .npz")
        assert not (out / "broken.npz").exists()
        segs = np.load(out / "case.npz")["segs"]
        expected = predict(session, segfm.read_case(inp / "case.npz"))
        assert segs.dtype == np.uint8 and segs.shape == gt.shape
        assert np.array_equal(segs, expected)
        for i in range(2):
            c = segfm.next_click(gt == i + 1, segs == i + 1)
            clicks[i]["fg" if c.positive else "bg"].append([c.z, c.y, c.x])
            order[i].append("fg" if c.positive else "bg")
        segfm.write_case(inp / "case.npz", val_case.stack, spacing, boxes, clicks, order, prev_pred=segs)
    assert segfm.dsc(gt == 1, segs == 1) > 0.8
    assert len(list((tmp_path / "cache" / "segfm_states").glob("*.npz"))) == 2  # the last step's, one per class


def test_a_saved_state_is_the_state(decoders, val_case, tmp_path):
    """A class's state survives the file it is kept in between the predictor's steps (merged segs, anchors,
    stops, low-res logits); a damaged file reads as missing (the step then replays)."""
    from sambtcv.engine.states import StateStore, from_bytes, to_bytes

    ed = _editor(decoders, val_case)
    state, both, kidney = _leaking_liver(ed, val_case)
    k = both[0]
    ys, xs = np.nonzero(state.slices[k].mask & (val_case.label[k] == kidney))
    state = ed.correct(state, k, float(xs[len(xs) // 2]), float(ys[len(ys) // 2]), False)
    back = from_bytes(to_bytes(state))
    shape = val_case.stack.shape
    assert np.array_equal(merge([back.masks()], shape), merge([state.masks()], shape))
    assert back.anchors == state.anchors and back.stops == state.stops and back.z_range == state.z_range
    assert all(np.array_equal(back.slices[j].lowres, sm.lowres) for j, sm in state.slices.items()
               if sm.lowres is not None)
    store = StateStore(tmp_path / "states")
    store.put("a" * 32, state)
    (tmp_path / "states" / ("a" * 32 + ".npz")).write_bytes(b"PK\x03\x04 damaged")
    assert store.get("a" * 32) is None and store.get("b" * 32) is None


@pytest.mark.parametrize("content, needle", [
    ({"imgs": np.zeros((2, 4, 4), np.float32), "spacing": np.ones(3)}, "imgs must be a (D, H, W) uint8 array"),
    ({"imgs": np.zeros((2, 4, 4), np.uint8), "spacing": np.ones(2)}, "spacing must be three positive numbers"),
    ({"imgs": np.zeros((2, 4, 4), np.uint8), "spacing": np.ones(3)}, "holds neither boxes nor clicks"),
    ({"imgs": np.zeros((2, 4, 4), np.uint8), "spacing": np.ones(3),
      "boxes": np.array([{"z_min": 0, "z_max": 5, "z_mid": 1, "z_mid_x_min": 0, "z_mid_y_min": 0,
                          "z_mid_x_max": 2, "z_mid_y_max": 2}], dtype=object)}, "0 <= z_min <= z_mid <= z_max < 2"),
    ({"imgs": np.zeros((2, 4, 4), np.uint8), "spacing": np.ones(3),
      "clicks": np.array([{"fg": [[0, 9, 1]], "bg": []}], dtype=object)}, "lies outside the volume"),
])
def test_bad_case_files_are_one_line(tmp_path, content, needle):
    path = tmp_path / "x.npz"
    path.write_bytes(_npz(**content))
    with pytest.raises(PipelineError) as exc:
        segfm.read_case(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_segs_merge_classes_in_order(decoders, val_case):
    """segs holds class i + 1 for the i-th box, whatever BTCV organ it is."""
    state = _editor(decoders, val_case)
    gt = val_case.label == ORGAN_ID["liver"]
    b = segfm.challenge_box(gt, np.random.RandomState(0))
    st = state.box3d(1, b.z_min, b.z_max, b.z_mid, b.box)
    segs = merge([st.masks()], gt.shape)
    assert set(np.unique(segs)) <= {0, 1} and segfm.dsc(gt, segs == 1) > 0.7


def test_the_record_names_the_runtime_that_ran():
    """Table 5's record states the runtime that ran, not 'auto' (on a CPU, auto runs OpenVINO)."""
    import interactive_eval
    from sambtcv.cli import parse_config

    cfg = parse_config(vars(interactive_eval), ["--data-dir", "x", "--runtime", "auto"])
    assert interactive_eval.settings_of(cfg, "cpu")["runtime"] == "openvino"
    cfg = parse_config(vars(interactive_eval), ["--data-dir", "x", "--runtime", "torch"])
    assert interactive_eval.settings_of(cfg, "cpu")["runtime"] == "torch"
