"""Tests of the synthetic BTCV phantom (phantom.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sambtcv.data import phantom  # noqa: E402

# Same physical field of view as the default, at a quarter of the voxels: fast to write twice.
SMALL_SHAPE = (96, 96, 32)
SMALL_SPACING = (4.0, 4.0, 5.0)
SEEDS = (0, 1, 2)

SPLEEN, R_KIDNEY, L_KIDNEY, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH, AORTA, IVC, VEINS, PANCREAS, \
    R_ADRENAL, L_ADRENAL = range(1, 14)

_cache: dict[int, tuple] = {}


def _volume(seed):
    if seed not in _cache:
        _cache[seed] = phantom.make_phantom_volume(seed)
    return _cache[seed]


def _centroid(label, organ):
    idx = np.argwhere(label == organ)
    assert len(idx), f"organ {organ} missing"
    return idx.mean(axis=0)  # (i: toward Left, j: toward Posterior, k: toward Superior)


def _read_all(paths):
    return {p.relative_to(p.parents[3]).as_posix(): p.read_bytes() for p in paths}


def _written_files(raw):
    return sorted((Path(raw) / "RawData" / "Training").rglob("*"))


def test_write_layout_and_determinism(tmp_path):
    paths_a = phantom.write_phantom(tmp_path / "a", n=2, seed=7, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    paths_b = phantom.write_phantom(tmp_path / "b", n=2, seed=7, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    root = tmp_path / "a" / "RawData" / "Training"
    assert paths_a == [root / "img" / "img0001.nii.gz", root / "img" / "img0002.nii.gz"]
    assert [p.relative_to(tmp_path / "b") for p in paths_b] == [p.relative_to(tmp_path / "a") for p in paths_a]
    files_a = [p for p in _written_files(tmp_path / "a") if p.is_file()]
    files_b = [p for p in _written_files(tmp_path / "b") if p.is_file()]
    names = sorted(p.relative_to(root).as_posix() for p in files_a)
    assert names == ["img/img0001.nii.gz", "img/img0002.nii.gz",
                     "label/label0001.nii.gz", "label/label0002.nii.gz"]  # no temporary leftovers
    assert _read_all(files_a) == _read_all(files_b)
    for f in files_a:  # gzip header: magic, then a zero mtime (bytes 4..7)
        head = f.read_bytes()[:8]
        assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\x00\x00\x00\x00"

    img = nib.load(str(paths_a[0]))
    lab = nib.load(str(root / "label" / "label0001.nii.gz"))
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert img.shape == SMALL_SHAPE and lab.shape == SMALL_SHAPE
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms(), SMALL_SPACING)
    np.testing.assert_allclose(img.affine, lab.affine)
    lab1 = np.asarray(lab.dataobj)
    lab2 = np.asarray(nib.load(str(root / "label" / "label0002.nii.gz")).dataobj)
    assert not np.array_equal(lab1, lab2)  # volumes within one call differ

    phantom.write_phantom(tmp_path / "c", n=1, seed=8, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    lab_c = np.asarray(nib.load(str(tmp_path / "c/RawData/Training/label/label0001.nii.gz")).dataobj)
    assert not np.array_equal(lab1, lab_c)  # a different seed gives different labels


def test_same_seed_same_arrays_different_seed_different():
    a = phantom.make_phantom_volume(3, SMALL_SHAPE, SMALL_SPACING)
    b = phantom.make_phantom_volume(3, SMALL_SHAPE, SMALL_SPACING)
    c = phantom.make_phantom_volume(4, SMALL_SHAPE, SMALL_SPACING)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(_volume(0)[1], _volume(1)[1])


@pytest.mark.parametrize("seed", SEEDS)
def test_types_labels_and_orientation(seed):
    image, label, affine = _volume(seed)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and affine.dtype == np.float64
    assert image.shape == label.shape == phantom.DEFAULT_SHAPE and affine.shape == (4, 4)
    assert label.max() <= 13
    assert set(np.unique(label)) == set(range(14))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), phantom.DEFAULT_SPACING)
    for organ in range(1, 14):  # every organ on at least two slices
        assert len(np.unique(np.nonzero(label == organ)[2])) >= 2, organ
    # air outside the body, bone in the spine
    assert image[:5, :5, :].max() < -900
    assert image.max() > 400


@pytest.mark.parametrize("seed", SEEDS)
def test_empty_end_slices_and_partial_z_extents(seed):
    label = _volume(seed)[1]
    assert label[:, :, 0].max() == 0 and label[:, :, -1].max() == 0
    per_slice = [set(np.unique(label[:, :, k])) - {0} for k in range(label.shape[2])]
    assert any(0 < len(s) < 13 for s in per_slice)  # organs are absent from some organ slices
    nz = label.shape[2]
    esophagus_slices = np.unique(np.nonzero(label == ESOPHAGUS)[2])
    assert esophagus_slices.min() > nz // 2  # top slices only


@pytest.mark.parametrize("seed", SEEDS)
def test_anatomy(seed):
    label = _volume(seed)[1]
    c = {o: _centroid(label, o) for o in range(1, 14)}
    aorta_i, aorta_j = c[AORTA][0], c[AORTA][1]
    # left/right: i increases toward the patient's left
    for right_side in (LIVER, R_KIDNEY, IVC, GALLBLADDER, R_ADRENAL):
        assert c[right_side][0] < aorta_i, right_side
    for left_side in (SPLEEN, L_KIDNEY, STOMACH, L_ADRENAL):
        assert c[left_side][0] > aorta_i, left_side
    # anterior/posterior: j increases toward the back
    assert c[R_KIDNEY][1] > aorta_j and c[L_KIDNEY][1] > aorta_j
    assert c[STOMACH][1] < aorta_j and c[GALLBLADDER][1] < aorta_j and c[PANCREAS][1] < aorta_j
    assert c[SPLEEN][1] > c[STOMACH][1]
    # superior/inferior: k increases upward
    assert c[LIVER][2] > c[R_KIDNEY][2] and c[SPLEEN][2] > c[L_KIDNEY][2]
    assert c[R_KIDNEY][2] < c[L_KIDNEY][2]  # right kidney lower
    assert c[R_ADRENAL][2] > c[R_KIDNEY][2] and c[L_ADRENAL][2] > c[L_KIDNEY][2]
    # sizes: liver largest, adrenals smallest
    counts = np.bincount(label.ravel(), minlength=14)
    assert counts[LIVER] == counts[1:].max()
    assert max(counts[R_ADRENAL], counts[L_ADRENAL]) < min(counts[o] for o in range(1, 12))
    assert min(counts[1:]) >= 50  # no organ carved to a sliver


@pytest.mark.parametrize("seed", SEEDS)
def test_hounsfield_units(seed):
    image, label, _ = _volume(seed)
    mean = {o: float(image[label == o].mean()) for o in range(1, 14)}
    assert 60 <= mean[LIVER] <= 160
    assert mean[AORTA] > mean[LIVER] - 20
    assert mean[GALLBLADDER] < 40
    assert mean[R_KIDNEY] > mean[LIVER] and mean[L_KIDNEY] > mean[LIVER]
    assert mean[PANCREAS] < mean[LIVER] + 20
    assert 0 <= mean[R_ADRENAL] <= 90 and 0 <= mean[L_ADRENAL] <= 90
    noise = image[label == LIVER].std()
    assert 5 < noise < 60  # noisy, but an organ is still homogeneous
