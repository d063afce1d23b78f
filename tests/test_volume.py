"""segment_volume.py: NIfTI round trips in any orientation, propagation, the 3D cache, bad input."""
import contextlib
import io
import json
import re

import nibabel as nib
import numpy as np
import pytest

import segment_volume
from conftest import assert_figure, fails, held_by_another_process
from sambtcv.core.config import ORIENTATION
from sambtcv.core.errors import PipelineError
from sambtcv.core.metrics import hd95
from sambtcv.data import btcv as data
from sambtcv.data.btcv import find_cases, load_label
from sambtcv.engine import volume
from sambtcv.engine.guard import Geometry
from sambtcv.engine.propagation import MIN_AREA, OrganMasks, SliceMask, box_mask, merge, next_box
from sambtcv.engine.walks import propagate
from utils import ORGAN_ID, dice_score


def _case_files(raw_phantom):
    cases = find_cases(raw_phantom)
    return cases["val"][0]


def _reoriented_copy(image, label, codes, dst):
    """The same body stored with another axis order/direction: data permuted/flipped, affine to match."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for src in (image, label):
        im = nib.load(str(src))
        ornt = nib.orientations.io_orientation(im.affine)
        new = im.as_reoriented(nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(codes)))
        assert nib.aff2axcodes(new.affine) == codes
        path = dst / src.name
        nib.save(new, str(path))
        out.append(path)
    return out


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "S"), ("P", "I", "L")])
def test_label_map_round_trip_in_any_orientation(raw_phantom, tmp_path, codes):
    """A label read, reoriented to the slice frame and written back equals the file voxel for voxel,
    with the image's shape and affine."""
    _, image, label = _case_files(raw_phantom)
    image, label = _reoriented_copy(image, label, codes, tmp_path / "in")
    case = volume.load_case("c", image, label, (-160, 240))
    out = volume.write_label_map(case.label, case, tmp_path / "back.nii.gz")
    back, src = nib.load(str(out)), nib.load(str(label))
    assert back.shape == src.shape and np.allclose(back.affine, nib.load(str(image)).affine)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj).astype(np.uint8))
    # and the slice frame is the one preprocess.py writes: the same reoriented label
    lab = load_label(label, ORIENTATION)
    assert np.array_equal(case.label[3], lab[:, :, 3].T)


def test_merge_gives_overlaps_to_the_highest_logit():
    a, b = np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool)
    a[0, :, :3], b[0, :, 1:] = True, True
    la, lb = np.where(a[0], 2.0, -1.0), np.where(b[0], 1.0, -1.0)
    lb[:, 2] = 5.0  # organ 6 more certain in column 2
    labels = merge([OrganMasks(1, {0: SliceMask(a[0], la, 0.9)}), OrganMasks(6, {0: SliceMask(b[0], lb, 0.9)})],
                   (1, 4, 4))
    assert labels[0, 0].tolist() == [1, 1, 6, 6]


def test_3d_scores_agree_with_monai():
    """The 3D Dice is the project's one Dice, equal to MONAI's DiceMetric; HD95 is MONAI's, in mm."""
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    gt = np.zeros((6, 20, 20), bool)
    gt[1:5, 4:15, 5:12] = True
    pred = gt & (rng.random(gt.shape) > 0.2)
    pred[2, 15:18, 5:8] = True
    ours = dice_score(pred, gt)
    theirs = float(compute_dice(torch.from_numpy(pred[None, None]).float(), torch.from_numpy(gt[None, None]).float()))
    assert ours == pytest.approx(theirs)
    case = volume.Case("c", None, None, gt, (2.0, 1.0, 5.0))
    assert hd95(gt, gt, case.spacing) == 0.0
    shifted = np.roll(gt, 1, axis=2)  # one column = 1 mm
    assert hd95(shifted, gt, case.spacing) == pytest.approx(1.0)
    assert hd95(np.zeros_like(gt), gt, case.spacing) is None


def test_next_box_uses_the_main_part_with_a_margin():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    mask[18, 18] = True  # a speck: not part of the organ's box
    assert next_box(mask, 2).tolist() == [3, 3, 11, 11]
    assert next_box(mask, 10).tolist() == [0, 0, 19, 19]


@pytest.fixture
def flat(tmp_path):
    """A NIfTI that is not a 3D volume (8 x 8)."""
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(path))
    return path


@pytest.fixture(scope="module")
def evaluated(raw_phantom, tmp_path_factory):
    """Evaluation on the tiny phantom's validation case, LiteMedSAM (fast), cache in its own folder."""
    root = tmp_path_factory.mktemp("vol")
    args = ["--model", "litemedsam", "--cache-dir", str(root / "cache")]
    segment_volume.main(["--data-dir", str(raw_phantom), *args, "--results-dir", str(root / "r1")])
    _, image, label = _case_files(raw_phantom)  # the same CT again, one organ: from the cache alone
    with contextlib.redirect_stdout(io.StringIO()) as out:
        segment_volume.main(["--image", str(image), "--label", str(label), "--organs", "liver", *args,
                             "--out", str(root / "r2" / "liver.nii.gz")])
    (root / "r2" / "stdout.txt").write_text(out.getvalue())
    return root


@pytest.mark.slow
def test_evaluation_outputs_and_cache(evaluated, raw_phantom):
    res = json.loads((evaluated / "r1" / "volume_3d.json").read_text())
    case, image, label = _case_files(raw_phantom)
    scores = res["cases"][case]
    assert set(res) >= {"model", "encoder_passes", "seconds", "cases", "mean"}
    assert set(res["mean"]) == {"dice_one_box", "dice_every_slice_box", "hd95_one_box"}
    present = {o for o in np.unique(np.asarray(nib.load(str(label)).dataobj)) if o}
    assert {ORGAN_ID[o] for o in scores} == present
    assert res["encoder_passes"] == res["visited_slices"] > 0  # each visited slice encoded once
    assert scores["liver"]["dice_one_box"] > 0.8 and scores["liver"]["dice_every_slice_box"] > 0.8
    # the written label map reloads on the image's grid and scores what the JSON says
    pred = nib.load(str(evaluated / "r1" / "volumes" / f"{case}.nii.gz"))
    assert pred.shape == nib.load(str(image)).shape and np.allclose(pred.affine, nib.load(str(image)).affine)
    gt = np.asarray(nib.load(str(label)).dataobj)
    p = np.asarray(pred.dataobj)
    dice = 2 * ((p == 6) & (gt == 6)).sum() / ((p == 6).sum() + (gt == 6).sum())
    assert dice == pytest.approx(scores["liver"]["dice_one_box"])
    assert_figure(evaluated / "r1" / "figures" / f"volume_3d_{case}.png")
    # the second run on the same CT, into another folder, encoded nothing (its liver is alone: no overlaps)
    printed = (evaluated / "r2" / "stdout.txt").read_text()
    assert "0 encoder passes; wrote" in printed, printed
    assert float(re.search(r"liver: .* 3D Dice ([0-9.]+)", printed).group(1)) > 0.8


def _largest_slice_box(case, organ):
    k = int(np.argmax((case.label == organ).sum(axis=(1, 2))))
    rows, cols = np.nonzero(case.label[k] == organ)
    box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
    return k, box, [int(np.median(cols)), int(np.median(rows))]


def test_user_prompts_box_points_and_box3d(raw_phantom, tmp_path):
    """A box (liver), a point (left kidney) and a 3D box in the file's voxel indices (spleen), MobileSAM."""
    _, image, label = _case_files(raw_phantom)
    case = volume.load_case("c", image, label, (-160, 240))
    k_liver, liver_box, _ = _largest_slice_box(case, 6)
    k_kidney, _, kidney_point = _largest_slice_box(case, 3)
    gt = np.asarray(nib.load(str(label)).dataobj)
    spleen = np.argwhere(gt == 1)  # voxel indices of the file as stored
    box3d = [*spleen.min(0).tolist(), *spleen.max(0).tolist()]
    prompts = {"liver": {"slice": k_liver, "box": liver_box},
               "left_kidney": {"slice": k_kidney, "points": [kidney_point], "labels": [1]},
               "spleen": {"box3d": box3d}}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    out = tmp_path / "pred.nii.gz"
    segment_volume.main(["--image", str(image), "--prompts", str(path), "--out", str(out), "--model", "mobilesam",
                         "--cache-dir", str(tmp_path / "cache")])
    pred = np.asarray(nib.load(str(out)).dataobj)
    for organ in (6, 3, 1):
        assert 2 * ((pred == organ) & (gt == organ)).sum() / ((pred == organ).sum() + (gt == organ).sum()) > 0.7, organ
    inside = np.argwhere(pred == 1)
    assert (inside >= spleen.min(0)).all() and (inside <= spleen.max(0)).all()  # bounded by its 3D box


@pytest.mark.parametrize("spec,needle", [
    ({"liver": {"slice": 2, "box": [5, 5, 500, 20]}}, "prompts['liver']['box']"),
    ({"liver": {"slice": 2, "box": [5, 5, 500, 20]}}, "outside"),
    ({"liver": {"slice": 2, "box": [5, 5, 5, 20]}}, "zero size"),
    ({"liver": {"slice": 999, "box": [5, 5, 10, 20]}}, "slice index"),
    ({"livr": {"slice": 2, "box": [5, 5, 10, 20]}}, "unknown organ 'livr'"),
    ({"liver": {"slice": 2}}, "needs a 'box'"),
    ("not json", "cannot read the prompts file"),
])
def test_bad_prompts_exit_2_with_one_line_and_write_nothing(raw_phantom, tmp_path, capsys, spec, needle):
    _, image, _ = _case_files(raw_phantom)
    path = tmp_path / "prompts.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    out = tmp_path / "pred.nii.gz"
    line = fails(capsys, segment_volume.main, ["--image", image, "--prompts", path, "--out", out,
                                               "--cache-dir", tmp_path / "cache"])
    assert needle in line
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bad_volumes_fail_cleanly(raw_phantom, flat, tmp_path):
    _, image, label = _case_files(raw_phantom)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"liver": {"slice": 0, "box": [1, 1, 5, 5]}}))
    for given in (["--label", str(label)], ["--prompts", str(prompts)]):
        with pytest.raises(PipelineError, match="not a 3D volume"):
            segment_volume.main(["--image", str(flat), *given, "--out", str(tmp_path / "o.nii.gz")])
    shifted = tmp_path / "shifted.nii.gz"
    lab = nib.load(str(label))
    affine = lab.affine.copy()
    affine[:3, 3] += 10 * np.abs(np.diag(affine)[:3])  # ten voxels away
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), str(shifted))
    with pytest.raises(PipelineError, match="away from its image"):
        segment_volume.main(["--image", str(image), "--label", str(shifted), "--out", str(tmp_path / "o.nii.gz")])
    assert not (tmp_path / "o.nii.gz").exists()


def test_out_is_checked_before_any_work(raw_phantom, tmp_path):
    """--out never overwrites an input, is a NIfTI file name, not a folder; all checked before the CT loads."""
    _, image, label = _case_files(raw_phantom)
    before = image.read_bytes()
    for out, needle in ((image, "is an input of this run"), (label, "is an input of this run"),
                        (tmp_path, "is a folder"), (tmp_path / "pred.png", "must end with .nii.gz or .nii")):
        with pytest.raises(PipelineError, match=re.escape(needle)):
            segment_volume.main(["--image", str(image), "--label", str(label), "--out", str(out),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert image.read_bytes() == before and not (tmp_path / "cache").exists()
    with pytest.raises(PipelineError, match=re.escape(f"lies below {image}, which is a file")):
        segment_volume.main(["--image", str(image), "--label", str(label), "--out", str(image / "pred.nii.gz")])


def test_model_and_finetuned_fail_before_the_ct_is_read(raw_phantom, flat, tmp_path):
    """`flat` is an unreadable CT: had it been read first, its error would show."""
    _, _, label = _case_files(raw_phantom)
    with pytest.raises(PipelineError, match="--finetuned"):
        segment_volume.main(["--image", str(flat), "--label", str(label), "--out", str(tmp_path / "new" / "o.nii.gz"),
                             "--finetuned", str(tmp_path / "missing.pt")])
    assert not (tmp_path / "new").exists()  # --out's folder is made only when the label map is written


def test_evaluation_checks_every_case_before_any_work(raw_phantom, flat, tmp_path, monkeypatch):
    """A bad second case fails the evaluation at once: no encoder pass, no table, no cache."""
    _, image, label = _case_files(raw_phantom)
    monkeypatch.setattr(data, "find_cases",  # the one place pages list a split's cases (cli.split_cases)
                        lambda _: {"val": [("good", image, label), ("bad", flat, label)], "train": []})
    with pytest.raises(PipelineError, match="not a 3D volume"):
        segment_volume.main(["--data-dir", str(raw_phantom), "--results-dir", str(tmp_path / "r"),
                             "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("given,model,expected", [("auto", "litemedsam", 6.0), ("auto", "mobilesam", 4.0),
                                                  ("0", "mobilesam", 0.0), ("2.5", "litemedsam", 2.5)])
def test_margin_auto_or_millimetres(given, model, expected):
    assert volume.margin_mm(given, model) == expected


@pytest.mark.parametrize("given", ["nan", "inf", "-1", "wide"])
def test_bad_margins_fail_with_one_line(given):
    with pytest.raises(PipelineError, match="--margin-mm must be auto or a number"):
        segment_volume.main(["--margin-mm", given, "--data-dir", "nowhere"])


class _FixedDecoder:
    """The same mask on every slice (a stand-in for the model)."""

    def __init__(self, mask):
        self.mask, self.stack, self.hw = mask, np.full((3, *mask.shape), 100, np.uint8), mask.shape

    def decode(self, k, prompt, point_labels=None):
        return SliceMask(self.mask.copy(), np.where(self.mask, 1.0, -1.0), 0.9)


def test_a_3d_box_bounds_the_first_mask_too():
    """The prompted slice's mask is clipped to the 3D box before the size check, like every later one."""
    limit = [8, 8, 15, 15]
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True  # spills out of the box on two sides
    dec = _FixedDecoder(mask)
    out = propagate(dec, 1, 1, dec.decode(1, None), "vanish", 0, Geometry(), (0, 2), limit, stride_mm=0)
    assert set(out.slices) == {0, 1, 2}
    assert all((sm.mask & ~box_mask(mask.shape, limit)).sum() == 0 and sm.area == 16 for sm in out.slices.values())
    mostly_out = np.zeros((20, 20), bool)
    mostly_out[2:7, 2:7] = True  # outside the box
    mostly_out[8, 8:10] = True  # 2 pixels inside it
    assert (mostly_out & box_mask(mask.shape, limit)).sum() < MIN_AREA <= mostly_out.sum()
    dec = _FixedDecoder(mostly_out)
    assert propagate(dec, 1, 1, dec.decode(1, None), "vanish", 0, Geometry(), (0, 2), limit, stride_mm=0).slices == {}


def test_3d_cache_locks_one_volume_not_the_whole_folder(litemedsam, tmp_path):
    """Another run encoding one CT holds that CT's cache only: a run on another CT in the same --cache-dir
    proceeds, one on the same CT fails with one line."""
    from sambtcv.engine.propagation import VolumeDecoder
    from sambtcv.models.decoder import load_decoder

    rng = np.random.default_rng(0)
    decoder = load_decoder(litemedsam)
    a, b = (VolumeDecoder(rng.integers(0, 255, (2, 32, 32), dtype=np.uint8), litemedsam, decoder, tmp_path, "cpu")
            for _ in range(2))
    with held_by_another_process(a.cache.dir, "volume embedding cache"):
        b.embedding(0)
        assert b.encoder_passes == 1
        with pytest.raises(PipelineError, match="in use by another run"):
            a.embedding(0)
    a.embedding(0)
    assert a.encoder_passes == 1


class _ScriptedDecoder:
    """Masks given per slice (a stand-in for the model): an organ of bright pixels on a dark stack."""

    def __init__(self, masks: dict, n: int = 8, side: int = 24):
        self.masks, self.hw = masks, (side, side)
        self.stack = np.full((n, side, side), 20, np.uint8)
        for k, m in masks.items():
            self.stack[k][m] = 200

    def decode(self, k, prompt):
        mask = self.masks.get(k, np.zeros(self.hw, bool))
        return SliceMask(mask.copy(), np.where(mask, 1.0, -1.0), 0.9)


def _square(lo, hi, side=24):
    m = np.zeros((side, side), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_a_walk_says_where_and_why_it_stopped_and_where_it_was_unsure():
    from sambtcv.engine.volume import walk_report

    masks = {k: _square(6, 14) for k in range(2, 7)}
    masks[5] = _square(4, 20)  # kept (bright), but 4 times the area of its neighbour: unsure
    dec = _ScriptedDecoder(masks)
    dec.stack[7][_square(6, 14)] = 20  # slice 7: the mask lies on dark tissue, the organ has ended
    masks[7] = _square(6, 14)
    out = propagate(dec, 6, 3, dec.decode(3, None), "intensity", 1, Geometry(), guard=False, stride_mm=0)
    report = walk_report(out, len(dec.stack))
    assert report["slices"] == [2, 6]
    assert {(s["direction"], s["slice"], s["reason"]) for s in report["stops"]} == {
        ("superior", 6, "intensity"), ("inferior", 2, "vanished")}
    assert [u["slice"] for u in report["unsure"]] == [5, 6]  # jumps to 4x the area and back
    assert all("area" in u["signals"] for u in report["unsure"])
    guarded = walk_report(propagate(dec, 6, 3, dec.decode(3, None), "intensity", 1, Geometry(), stride_mm=0),
                          len(dec.stack))
    assert [(u["slice"], u["signals"]) for u in guarded["unsure"]] == [(5, ["outgrown"])]  # cut, so 6 is no jump
    edge = walk_report(propagate(dec, 6, 3, dec.decode(3, None), "vanish", 1, Geometry(), stride_mm=0), len(dec.stack))
    assert {(s["slice"], s["reason"], s["at_volume_edge"]) for s in edge["stops"]} >= {(7, "edge", True)}
