"""DICOM in and DICOM SEG out: a phantom written as a DICOM series (pydicom) in two orientations reads as
the NIfTI it came from and as SimpleITK's series reader reads it; segment_volume.py takes the folder or a
zip and writes a SEG whose masks (read back with highdicom) are the NIfTI label map's; bad series are one
line; the viewer opens a zipped series and saves a SEG; a real CT from ../shared/data round-trips."""
from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

import segment_volume
from conftest import fails, real_data
from dicom_series import flipped, write_series, zipped
from sambtcv.core.names import ORGAN_ID
from sambtcv.core.prompts import bound_box
from sambtcv.data import dicom
from sambtcv.data.btcv import find_cases
from sambtcv.engine.volume import load_case

WINDOW = (-160, 240)


@pytest.fixture(scope="module")
def phantom(raw_phantom):
    _, image, label = find_cases(raw_phantom)["val"][0]
    img = nib.load(str(image))
    return image, label, np.asarray(img.dataobj).astype(np.int16), img.affine


def sitk_volume(folder):
    """SimpleITK's own series reader on the folder: (array in nibabel's (i, j, k) order, RAS affine)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    im = reader.Execute()
    direction = np.array(im.GetDirection()).reshape(3, 3) * np.array(im.GetSpacing())
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = direction, im.GetOrigin()
    return sitk.GetArrayFromImage(im).transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ aff


@pytest.mark.parametrize("axes", [(), (0, 1)])
def test_a_series_reads_as_its_nifti_and_as_simpleitk_reads_it(phantom, tmp_path, axes):
    image, _, volume, affine = phantom
    vol, aff = flipped(volume, affine, axes)  # the same CT stored in another orientation
    write_series(tmp_path / "s", vol, aff)
    converted = nib.load(str(dicom.as_nifti(tmp_path / "s")))
    theirs, their_affine = sitk_volume(tmp_path / "s")
    assert np.array_equal(np.asarray(converted.dataobj), theirs) and np.allclose(converted.affine, their_affine)
    assert np.array_equal(np.asarray(converted.dataobj), vol) and np.allclose(converted.affine, aff, atol=1e-4)
    # whatever the orientation, the slices the models see are the original's
    stack = load_case("a", tmp_path / "s", None, WINDOW).stack
    assert np.array_equal(stack, load_case("b", image, None, WINDOW).stack)


def test_rescale_is_applied(phantom, tmp_path):
    _, _, volume, affine = phantom
    write_series(tmp_path / "s", volume, affine, slope=2.0, intercept=-2000.0)
    got = np.asarray(nib.load(str(dicom.as_nifti(tmp_path / "s"))).dataobj)
    assert np.abs(got - volume).max() <= 1  # stored (HU + 2000) / 2, read back as HU


@pytest.mark.slow
def test_segment_volume_takes_a_series_and_writes_a_seg(phantom, tmp_path, capsys):
    """--image FOLDER (and a .zip of it), --out seg.dcm: the SEG's masks are the NIfTI label map's; a
    series without FrameOfReferenceUID gets one in the SEG and the run says so."""
    import highdicom as hd

    image, label, volume, affine = phantom
    ref = load_case("ref", image, label, WINDOW).label
    spleen = ORGAN_ID["spleen"]
    k = int(np.argmax((ref == spleen).sum(axis=(1, 2))))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"spleen": {"slice": k, "box": bound_box(ref[k] == spleen).astype(int).tolist()}}))
    vol, aff = flipped(volume, affine, (0, 1))
    write_series(tmp_path / "s", vol, aff, frame_of_reference=False)
    base = ["--prompts", prompts, "--model", "litemedsam", "--runtime", "torch", "--cache-dir", tmp_path / "c",
            "--device", "cpu"]
    segment_volume.main(["--image", tmp_path / "s", "--out", tmp_path / "pred.nii.gz", *base])
    segment_volume.main(["--image", zipped(tmp_path / "s", tmp_path / "s.zip"), "--out", tmp_path / "seg.dcm", *base])
    out = capsys.readouterr().out
    assert "no FrameOfReferenceUID" in out and "the SEG gets a new one" in out
    pred = np.asarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj)
    assert pred.shape == vol.shape and (pred == spleen).sum() > 50
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID
    desc = seg.get_segment_description(1)
    assert desc.segment_label == "spleen" and desc.segmented_property_type.value == "78961009"
    assert "litemedsam" in desc.algorithm_identification[0].AlgorithmName
    series = dicom.read_series(tmp_path / "s")
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= {str(h.SOPInstanceUID) for h in series.headers}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    masks = dicom.read_seg_masks(tmp_path / "seg.dcm", series)
    assert set(masks) == {"spleen"} and np.array_equal(masks["spleen"], pred == spleen)


@pytest.mark.parametrize("as_zip", [False, True])
def test_preprocess_takes_a_case_that_is_a_series(raw_phantom, tmp_path, as_zip):
    """A case of a folder layout may be a DICOM series (a folder, or a .zip of one): preprocess.py writes the
    slices its NIfTI gives."""
    import shutil

    from sambtcv.data.btcv import preprocess

    raw = shutil.copytree(raw_phantom, tmp_path / "raw")
    img_dir = raw / "RawData" / "Training" / "img"
    image = img_dir / "img0003.nii.gz"
    img = nib.load(str(image))
    vol, aff = flipped(np.asarray(img.dataobj).astype(np.int16), img.affine, (1,))
    write_series(tmp_path / "img0003", vol, aff, frame_of_reference=False)
    grid = nib.load(str(dicom.as_nifti(tmp_path / "img0003")))  # the series' grid, as the reader orders it
    label = raw / "RawData" / "Training" / "label" / "label0003.nii.gz"  # made on that grid, as a user's is
    lab = nib.load(str(label))
    on_grid = lab.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(lab.affine),
                                                                nib.io_orientation(grid.affine)))
    assert on_grid.shape == grid.shape and np.allclose(on_grid.affine, grid.affine, atol=1e-3)
    nib.save(nib.Nifti1Image(np.asarray(on_grid.dataobj), grid.affine), str(label))
    if as_zip:
        zipped(tmp_path / "img0003", img_dir / "img0003.zip")
    else:
        shutil.copytree(tmp_path / "img0003", img_dir / "img0003")
    image.unlink()
    assert [c[0] for c in find_cases(raw)["val"]] == ["img0003"]
    preprocess(raw_phantom, tmp_path / "from_nifti")
    preprocess(raw, tmp_path / "from_dicom")
    want = sorted(p.name for p in (tmp_path / "from_nifti" / "val").iterdir())
    assert want and sorted(p.name for p in (tmp_path / "from_dicom" / "val").iterdir()) == want
    a, b = (tmp_path / d / "val" / "organs.csv" for d in ("from_nifti", "from_dicom"))
    assert a.read_text() == b.read_text()
    for name in (n for n in want if n.endswith(".npz")):
        a, b = np.load(tmp_path / "from_nifti" / "val" / name), np.load(tmp_path / "from_dicom" / "val" / name)
        assert set(a.files) == set(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), (name, key)


def test_bad_series_are_one_line(phantom, tmp_path, capsys):
    _, _, volume, affine = phantom
    write_series(tmp_path / "two", volume, affine)
    write_series(tmp_path / "two", volume, affine, names="other{:04d}.dcm")
    write_series(tmp_path / "gap", volume, affine, skip=(3,))
    write_series(tmp_path / "mixed", volume, affine, iop_jitter={2: [0, 1, 0, 1, 0, 0]})
    write_series(tmp_path / "mr", volume, affine, modality="MR")
    write_series(tmp_path / "tilt", volume, affine, tilt_mm=2.0)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("not DICOM")
    (tmp_path / "p.json").write_text('{"spleen": {"slice": 1, "box": [1, 1, 5, 5]}}')
    cases = {"two": "holds 2 series", "gap": "uneven slice spacing", "mixed": "mixes slice orientations",
             "mr": "not CT", "tilt": "gantry tilt", "none": "holds no DICOM image files"}
    for name, needle in cases.items():
        out = tmp_path / f"{name}.nii.gz"
        line = fails(capsys, segment_volume.main, ["--image", tmp_path / name, "--prompts", tmp_path / "p.json",
                                                   "--out", out])
        assert needle in line, (name, line)
        assert not out.exists()
    line = fails(capsys, segment_volume.main, ["--image", tmp_path / "two", "--prompts", tmp_path / "p.json",
                                               "--out", tmp_path / "x.nii.gz"])
    assert "pick one with --series UID" in line
    uid = line.split("(")[1].split(" ")[0]
    got = dicom.read_series(str(tmp_path / "two"), uid)  # a path given as text reads too
    assert got.uid == uid and len(got.files) == volume.shape[2]
    line = fails(capsys, segment_volume.main, ["--image", tmp_path / "gap", "--prompts", tmp_path / "p.json",
                                               "--out", tmp_path / "x.dcm", "--label", tmp_path / "p.json"])
    assert "error:" in line
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(nifti))
    line = fails(capsys, segment_volume.main, ["--image", nifti, "--prompts", tmp_path / "p.json",
                                               "--out", tmp_path / "x.dcm"])
    assert "needs a DICOM series" in line


def test_the_viewer_opens_a_zipped_series_and_saves_a_seg(phantom, litemedsam, tmp_path):
    import highdicom as hd
    from fastapi.testclient import TestClient

    from sambtcv.engine import interactive
    from sambtcv.servers.server import Settings, create_app

    image, label, volume, affine = phantom
    ref = load_case("ref", image, label, WINDOW).label
    spleen = ORGAN_ID["spleen"]
    k = int(np.argmax((ref == spleen).sum(axis=(1, 2))))
    write_series(tmp_path / "s", volume, affine)
    data = zipped(tmp_path / "s", tmp_path / "s.zip").read_bytes()
    engine = interactive.load_engine(device="cpu", cache_dir=tmp_path / "cache", backbone=litemedsam, runtime="torch")
    with TestClient(create_app(Settings(background_slices=0), engine=engine), base_url="http://127.0.0.1") as c:
        r = c.post("/api/volumes", content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["dicom"] and info["shape"] == list(ref.shape)
        vid = info["id"]
        box = bound_box(ref[k] == spleen).astype(int).tolist()
        assert c.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box}).status_code == 200
        r = c.get(f"/api/volumes/{vid}/seg.dcm")
        assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
        (tmp_path / "seg.dcm").write_bytes(r.content)
        labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(
            c.get(f"/api/volumes/{vid}/labels.nii.gz").content)).dataobj)
        (tmp_path / "none").mkdir()
        (tmp_path / "none" / "notes.txt").write_text("not DICOM")
        bad = c.post("/api/volumes", content=zipped(tmp_path / "none", tmp_path / "n.zip").read_bytes(),
                     headers={"Content-Type": "application/octet-stream"})
        assert bad.status_code == 422 and "no DICOM image files" in bad.json()["error"]
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    masks = dicom.read_seg_masks(tmp_path / "seg.dcm", dicom.read_series(tmp_path / "s"))
    assert seg.get_segment_description(1).segment_label == "spleen"
    assert np.array_equal(masks["spleen"], labels == spleen) and masks["spleen"].sum() > 20


def test_a_real_ct_as_a_series(tmp_path):
    """The CHAOS CT of ../shared/data written as a DICOM series (512 x 512 x 78, int16 HU) reads back as
    the NIfTI it came from: the same voxels, grid and slices."""
    root = real_data("real_ct_dev")
    image = root / "RawData/Training/img/img0301.nii.gz"
    img = nib.load(str(image))
    volume = np.asarray(img.dataobj).astype(np.int16)
    write_series(tmp_path / "chaos", volume, img.affine)
    converted = nib.load(str(dicom.as_nifti(zipped(tmp_path / "chaos", tmp_path / "chaos.zip"))))
    assert np.array_equal(np.asarray(converted.dataobj), volume)
    assert np.allclose(converted.affine, img.affine, atol=1e-3)
    stack = load_case("d", tmp_path / "chaos", None, WINDOW).stack
    assert np.array_equal(stack, load_case("n", image, None, WINDOW).stack)
