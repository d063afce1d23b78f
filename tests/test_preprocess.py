"""Layouts, splits, slice and organ counts, orientation and bad input of preprocess.py."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY_SHAPE, real_data, run_script
from sambtcv.core.errors import PipelineError
from sambtcv.data.btcv import augmentation, find_cases, preprocess
from utils import SliceSet


def label_counts(label_path):
    """(slices with an organ, organ records) straight from a label volume."""
    lab = np.asarray(nib.load(str(label_path)).dataobj).astype(int)
    slices = [lab[:, :, k] for k in range(lab.shape[2]) if lab[:, :, k].any()]
    return len(slices), sum(len(np.unique(s)) - 1 for s in slices)


def test_counts_match_label_volumes(raw_phantom, tiny_slices):
    params = json.loads((tiny_slices / "preprocess.json").read_text())
    assert params["split"] == {"train": ["img0001", "img0002"], "val": ["img0003"]}
    for split, cases in params["split"].items():
        s = SliceSet(tiny_slices, split)
        for case in cases:
            label = raw_phantom / "RawData/Training/label" / (case.replace("img", "label") + ".nii.gz")
            n_slices, n_organs = label_counts(label)
            mine = [r for r in s.records if r["case"] == case]
            assert len(mine) == n_slices
            assert sum(len(r["organs"]) for r in mine) == n_organs
        rows = (tiny_slices / split / "organs.csv").read_text().strip().splitlines()[1:]
        assert len(rows) == len(s.items)
    image, label = SliceSet(tiny_slices, "val").load(0)
    assert image.dtype == np.uint8 and label.dtype == np.uint8 and image.shape == label.shape == TINY_SHAPE[:2]


def test_three_layouts_give_the_same_slices(raw_phantom, tmp_path):
    imgs = sorted((raw_phantom / "RawData/Training/img").glob("*.nii.gz"))
    flat = tmp_path / "flat"
    (flat / "imagesTr").mkdir(parents=True)
    (flat / "labelsTr").mkdir()
    entries = []
    for p in imgs:
        shutil.copy(p, flat / "imagesTr" / p.name)
        shutil.copy(raw_phantom / "RawData/Training/label" / p.name.replace("img", "label"), flat / "labelsTr" / p.name)
        entries.append({"image": f"imagesTr/{p.name}", "label": f"labelsTr/{p.name}"})
    a = preprocess(raw_phantom, tmp_path / "a")
    b = preprocess(flat, tmp_path / "b")
    assert a["counts"] == b["counts"] and a["split"] == b["split"]
    js = tmp_path / "js"
    shutil.copytree(flat, js)
    (js / "dataset_0.json").write_text(json.dumps({"training": entries[1:], "validation": entries[:1]}))
    c = preprocess(js, tmp_path / "c")
    assert c["split"] == {"train": ["img0002", "img0003"], "val": ["img0001"]}
    assert c["split_source"] == "dataset_0.json"
    ia, la = SliceSet(tmp_path / "a", "val").load(0)
    ib, lb = SliceSet(tmp_path / "b", "val").load(0)
    assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_default_split_is_last_fifth(tmp_path):
    d = tmp_path / "RawData/Training"
    (d / "img").mkdir(parents=True)
    (d / "label").mkdir()
    for i in list(range(1, 11)) + list(range(21, 41)):  # BTCV's 30 training ids
        (d / "img" / f"img{i:04d}.nii.gz").touch()
        (d / "label" / f"label{i:04d}.nii.gz").touch()
    cases = find_cases(tmp_path)
    assert [c for c, _, _ in cases["val"]] == [f"img{i:04d}" for i in range(35, 41)]
    assert len(cases["train"]) == 24


def _ras_copy(src_img, src_lab, dst):
    """The same body stored with an RAS affine: flip the first two array axes, fix the affine."""
    (dst / "RawData/Training/img").mkdir(parents=True)
    (dst / "RawData/Training/label").mkdir(parents=True)
    for src, sub in ((src_img, "img"), (src_lab, "label")):
        im = nib.load(str(src))
        ornt = nib.orientations.io_orientation(im.affine)
        target = nib.orientations.axcodes2ornt(("R", "A", "S"))
        new = im.as_reoriented(nib.orientations.ornt_transform(ornt, target))
        assert nib.aff2axcodes(new.affine) == ("R", "A", "S")
        nib.save(new, str(dst / "RawData/Training" / sub / src.name))


def _assert_same_slices(dir_a, dir_b):
    for split in ("train", "val"):
        a, b = SliceSet(dir_a, split), SliceSet(dir_b, split)
        assert [r["organs"] for r in a.records] == [r["organs"] for r in b.records]
        for i in range(len(a)):
            ia, la = a.load(i)
            ib, lb = b.load(i)
            assert np.array_equal(la, lb) and np.array_equal(ia, ib)


def test_orientation_is_handled_phantom(raw_phantom, tmp_path):
    img = raw_phantom / "RawData/Training/img/img0001.nii.gz"
    lab = raw_phantom / "RawData/Training/label/label0001.nii.gz"
    lps = tmp_path / "lps"
    (lps / "RawData/Training/img").mkdir(parents=True)
    (lps / "RawData/Training/label").mkdir(parents=True)
    shutil.copy(img, lps / "RawData/Training/img")
    shutil.copy(lab, lps / "RawData/Training/label")
    _ras_copy(img, lab, tmp_path / "ras")
    preprocess(lps, tmp_path / "s_lps")
    preprocess(tmp_path / "ras", tmp_path / "s_ras")
    _assert_same_slices(tmp_path / "s_lps", tmp_path / "s_ras")
    # anatomy: liver (6) on the image's left half = patient's right, spleen (1) on the right half
    s = SliceSet(tmp_path / "s_lps", "val")
    liver = [r["organs"]["6"]["bbox"] for r in s.records if "6" in r["organs"]]
    spleen = [r["organs"]["1"]["bbox"] for r in s.records if "1" in r["organs"]]
    centre = [np.mean([(b[0] + b[2]) / 2 for b in boxes]) for boxes in (liver, spleen)]
    assert centre[0] < TINY_SHAPE[0] / 2 < centre[1]


def test_orientation_is_handled_real_ct(tmp_path):
    root = real_data("real_ct_aorta")
    img = root / "RawData/Training/img/img0101.nii.gz"
    lab = root / "RawData/Training/label/label0101.nii.gz"
    _ras_copy(img, lab, tmp_path / "ras")
    a = preprocess(root, tmp_path / "a")
    preprocess(tmp_path / "ras", tmp_path / "b")
    _assert_same_slices(tmp_path / "a", tmp_path / "b")
    n_slices, n_organs = label_counts(lab)
    assert a["counts"]["val"]["slices"] == n_slices == 152 and a["counts"]["val"]["organ_records"] == n_organs
    assert a["split"]["val"] == ["img0101"] and a["split"]["train"] == []  # one case: it is validation


def _bad_layout(tmp_path, img_data, lab_data, affine=np.eye(4)):
    d = tmp_path / "RawData/Training"
    (d / "img").mkdir(parents=True)
    (d / "label").mkdir(parents=True)
    nib.save(nib.Nifti1Image(img_data, affine), str(d / "img/img0001.nii.gz"))
    if lab_data is not None:
        nib.save(nib.Nifti1Image(lab_data, affine), str(d / "label/label0001.nii.gz"))
    return tmp_path


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("empty", "no BTCV data found"),
    ("no_label", "has no label file"),
    ("shape", "has shape"),
    ("values", "outside 0..13"),
    ("garbage", "cannot read"),
])
def test_bad_input_fails_cleanly(tmp_path, case, needle):
    img = np.zeros((8, 8, 4), np.int16)
    lab = np.zeros((8, 8, 4), np.uint8)
    lab[2:4, 2:4, 1] = 6
    raw = tmp_path / "raw"
    if case == "empty":
        raw.mkdir()
    elif case == "no_label":
        _bad_layout(raw, img, None)
    elif case == "shape":
        _bad_layout(raw, img, np.zeros((8, 8, 5), np.uint8))
    elif case == "values":
        bad = lab.copy()
        bad[0, 0, 0] = 14
        _bad_layout(raw, img, bad)
    elif case == "garbage":
        _bad_layout(raw, img, lab)
        (raw / "RawData/Training/img/img0001.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=needle):
        preprocess(raw, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_input_cli_one_line_nonzero_exit(tmp_path):
    out = tmp_path / "out"
    res = run_script(["preprocess.py", "--data-dir", tmp_path / "nothing", "--out-dir", out])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: data dir")
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_augmentation_is_seeded_and_changes_the_slice():
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    label = np.zeros((1, 32, 32), np.float32)
    label[0, 5:12, 3:20] = 6
    outs = []
    for _ in range(2):
        aug = augmentation(seed=5)
        outs.append([aug({"image": image, "label": label}) for _ in range(4)])
    for a, b in zip(*outs):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    changed = [not np.array_equal(np.asarray(o["image"]), image) for o in outs[0]]
    assert any(changed)
    assert set(np.unique(np.asarray(outs[0][0]["label"]))) <= {0.0, 6.0}
