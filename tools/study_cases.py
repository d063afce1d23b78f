"""The real CT cases of docs/MEASUREMENTS.md, section 6b, fetched from public repositories and converted
to a dataset that study_3d.py and segment_volume.py read (imagesTr/, labelsTr/, dataset_0.json; BTCV ids).

    python tools/study_cases.py --out data/study_cases                 # clones two repositories (needs git + network)
    python tools/study_cases.py --out data/study_cases --git-root DIR  # bare clones already in DIR/<owner>+<name>
    python study_3d.py --data-dir data/study_cases --model litemedsam --rules intensity,continuity

The cases stay outside the repository (their licences allow evaluation; see MEASUREMENTS 6b):
- ts_example_ct_3mm, ts_example_ct_sm_partial, ts_petct_dicom_slab_512: TotalSegmentator's test CTs
  (github.com/wasserth/TotalSegmentator, Apache-2.0) with its reference outputs as labels: a model's
  output, not manual labels. The DICOM slab needs `pip install pydicom`; without it that case is left out.
- sbme_lits_liver_lesion_lowres: one LiTS CT with its liver + tumour annotation, resized to 64 x 64
  in-plane by github.com/Graduation-project-SBME-2023/liver-imaging-analysis (MIT; LiTS: CC BY-SA 4.0);
  the in-plane spacing its header kept from before the resize (0.664 mm) is corrected to 5.3125 mm.
Files are read at pinned commits; OUT must not exist (or be a folder this tool wrote).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sambtcv.cli import parse_config, run_main  # noqa: E402
from sambtcv.core.errors import PipelineError  # noqa: E402
from sambtcv.core.files import check_replaceable, staged_dir, write_json  # noqa: E402

# ---------------------------------------------------------------------------------------------- config
OUT = "data/study_cases"  # the dataset to write (imagesTr/, labelsTr/, dataset_0.json, provenance.json)
GIT_ROOT = None  # a folder of bare clones named <owner>+<name>; empty: clone from GitHub into a temporary folder
SEED = 0  # accepted for a uniform interface; nothing here is random
DEVICE = "cpu"  # accepted for a uniform interface; nothing here uses a model
# -----------------------------------------------------------------------------------------------------

TS = ("wasserth", "TotalSegmentator")
SBME = ("Graduation-project-SBME-2023", "liver-imaging-analysis")
TS_HEAD = "0e65a448d557382b1e925276212b3bec7f5aff83"
TS_V1_SEG = "5de6e4dcf702d525e0b2813683575b2c9e998aee"
SBME_COMMIT = "35af03721af116d40a0d7f7d6916a39b7c6d74ef"
MARKER = "provenance.json"
TS_NAME_TO_BTCV = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
                   "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10,
                   "pancreas": 11, "adrenal_gland_right": 12, "adrenal_gland_left": 13}
TS_V2_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}
SM_CLIP_HU = (-1100, 1207)  # example_ct_sm.nii.gz is example_ct's slices, clipped to this by its authors


class Repo:
    """Files of a bare git clone at given commits."""

    def __init__(self, git_dir: Path):
        self.git_dir = git_dir

    def read(self, commit: str, path: str, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as f:
            subprocess.run(["git", "--git-dir", str(self.git_dir), "show", f"{commit}:{path}"], stdout=f,
                           check=True)
        return dst

    def list(self, commit: str, folder: str) -> list[str]:
        out = subprocess.run(["git", "--git-dir", str(self.git_dir), "ls-tree", "--name-only", commit, folder],
                             capture_output=True, text=True, check=True)
        return out.stdout.split()


def open_repo(owner_name: tuple[str, str], git_root: Path | None, tmp: Path) -> Repo:
    if git_root is not None:
        found = [p for p in (git_root / "+".join(owner_name), git_root / "+".join(owner_name) / "repo") if
                 (p / "HEAD").is_file()]
        if not found:
            raise PipelineError(f"no bare clone of {'/'.join(owner_name)} in {git_root} (<owner>+<name>)")
        return Repo(found[-1])
    dst = tmp / "+".join(owner_name)
    url = f"https://github.com/{'/'.join(owner_name)}.git"
    print(f"cloning {url} (files are fetched as they are read) ...", flush=True)
    subprocess.run(["git", "clone", "--quiet", "--bare", "--filter=blob:none", url, str(dst)], check=True)
    return Repo(dst)


def map_ids(arr: np.ndarray, table: dict) -> np.ndarray:
    out = np.zeros(arr.shape, np.uint8)
    for src, dst in table.items():
        out[arr == src] = dst
    return out


def hu(a) -> np.ndarray:
    return np.rint(np.asarray(a, np.float64)).clip(-32768, 32767).astype(np.int16)


def save(out: Path, case: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict:
    import nibabel as nib

    for folder, data in (("imagesTr", image.astype(np.int16)), ("labelsTr", label.astype(np.uint8))):
        nii = nib.Nifti1Image(data, affine)
        nii.set_qform(affine, code=1)
        nii.set_sform(affine, code=1)
        (out / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nii, str(out / folder / f"{case}.nii.gz"))
    print(f"{case}: {image.shape}, organs {sorted(int(v) for v in np.unique(label) if v)}", flush=True)
    return {"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz"}


def ts_3mm(repo: Repo, raw: Path, out: Path) -> dict:
    import nibabel as nib

    ct = nib.load(str(repo.read(TS_HEAD, "tests/reference_files/example_ct.nii.gz", raw / "example_ct.nii.gz")))
    label = np.zeros(ct.shape, np.uint8)
    for name, bid in TS_NAME_TO_BTCV.items():
        m = nib.load(str(repo.read(TS_V1_SEG, f"tests/reference_files/example_seg/{name}.nii.gz",
                                   raw / f"v1_{name}.nii.gz")))
        label[(np.asarray(m.dataobj) > 0) & (label == 0)] = bid
    return save(out, "ts_example_ct_3mm", hu(ct.dataobj), label, ct.affine)


def ts_partial(repo: Repo, raw: Path, out: Path) -> dict:
    import nibabel as nib

    ct = nib.load(str(repo.read(TS_HEAD, "tests/reference_files/example_ct_sm.nii.gz", raw / "example_ct_sm.nii.gz")))
    seg = nib.load(str(repo.read(TS_HEAD, "tests/reference_files/example_seg.nii.gz", raw / "example_seg.nii.gz")))
    image = hu(ct.dataobj)
    full = np.asarray(nib.load(str(raw / "example_ct.nii.gz")).dataobj).astype(np.int64)
    n = image.shape[2]
    offsets = [o for o in range(full.shape[2] - n + 1)
               if np.array_equal(np.clip(full[:, :, o:o + n], *SM_CLIP_HU), image.astype(np.int64))]
    if len(offsets) != 1:
        raise PipelineError("example_ct_sm.nii.gz is no longer a crop of example_ct.nii.gz at the pinned commit")
    affine = ct.affine.copy()  # the source header kept the uncropped origin
    affine[:3, 3] = ct.affine[:3, 3] + ct.affine[:3, 2] * offsets[0]
    return save(out, "ts_example_ct_sm_partial", image, map_ids(np.asarray(seg.dataobj).astype(int), TS_V2_TO_BTCV),
                affine)


def ts_dicom_slab(repo: Repo, raw: Path, out: Path) -> dict | None:
    import nibabel as nib

    try:
        import pydicom
    except ImportError:
        print("pydicom is not installed (pip install pydicom): ts_petct_dicom_slab_512 left out", flush=True)
        return None
    paths = repo.list(TS_HEAD, "tests/reference_files/example_ct_dicom/")
    ds = [pydicom.dcmread(repo.read(TS_HEAD, p, raw / "dicom" / Path(p).name)) for p in paths]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ds.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    pos = np.array([np.array(d.ImagePositionPatient, float) for d in ds])
    spacing = [float(x) for x in ds[0].PixelSpacing]  # row spacing, column spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * spacing[1], col * spacing[0]
    lps[:3, 2], lps[:3, 3] = (pos[-1] - pos[0]) / (len(ds) - 1), pos[0]
    affine = np.diag([-1, -1, 1, 1]) @ lps  # DICOM's LPS patient frame -> NIfTI's RAS
    volume = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds], axis=-1)
    image = hu(np.transpose(volume, (1, 0, 2)))  # (rows, columns, k) -> (i, j, k)
    seg = nib.load(str(repo.read(TS_HEAD, "tests/reference_files/example_seg_dicom.nii.gz", raw / "seg_dicom.nii.gz")))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(seg.affine), nib.io_orientation(affine))
    label = nib.orientations.apply_orientation(np.asarray(seg.dataobj), ornt)
    if label.shape != image.shape:
        raise PipelineError("example_seg_dicom.nii.gz is not on the DICOM series' grid at the pinned commit")
    return save(out, "ts_petct_dicom_slab_512", image, map_ids(label.astype(int), TS_V2_TO_BTCV), affine)


def sbme_lits(repo: Repo, raw: Path, out: Path) -> dict:
    import nibabel as nib

    base = "tests/testdata/data/resized_liver"
    v = nib.load(str(repo.read(SBME_COMMIT, f"{base}/volume/resized_liver.nii", raw / "resized_liver.nii")))
    m = nib.load(str(repo.read(SBME_COMMIT, f"{base}/mask/resized_mask.nii", raw / "resized_mask.nii")))
    affine, factor = v.affine.copy(), 512 / 64  # resized 512 -> 64 in-plane; the header kept 0.664 mm
    for ax in (0, 1):
        step = affine[:3, ax].copy()
        affine[:3, ax] = step * factor
        affine[:3, 3] += step * (factor - 1) / 2  # the centre of the first resized voxel
    label = np.where(np.rint(np.asarray(m.dataobj)) > 0, 6, 0).astype(np.uint8)  # liver and tumour: liver
    return save(out, "sbme_lits_liver_lesion_lowres", hu(v.dataobj), label, affine)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    out = Path(cfg["out"])
    check_replaceable(out, MARKER, "--out")
    git_root = Path(cfg["git_root"]) if cfg["git_root"] else None
    with tempfile.TemporaryDirectory() as tmp, staged_dir(out, MARKER) as part:
        tmp = Path(tmp)
        ts, sbme = open_repo(TS, git_root, tmp), open_repo(SBME, git_root, tmp)
        entries = [ts_3mm(ts, tmp, part), ts_partial(ts, tmp, part), ts_dicom_slab(ts, tmp, part),
                   sbme_lits(sbme, tmp, part)]
        entries = [e for e in entries if e]
        write_json(part / "dataset_0.json", {"training": [], "validation": entries})
        write_json(part / MARKER, {"written_by": "tools/study_cases.py", "commits": {
            "/".join(TS): [TS_HEAD, TS_V1_SEG], "/".join(SBME): [SBME_COMMIT]}})
    print(f"wrote {len(entries)} cases to {out}; python study_3d.py --data-dir {out}")


if __name__ == "__main__":
    run_main(main)
