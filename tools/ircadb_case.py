"""One 3D-IRCADb-01 patient (DICOM CT + DICOM masks) converted to a dataset the project's pages read (imagesTr/,
labelsTr/, dataset_0.json; BTCV ids: the liver, its tumours counted as liver, = 6).

    python tools/ircadb_case.py --source PATIENT_FOLDER --out ../ext/ircadb17          # PATIENT_DICOM/, MASKS_DICOM/
    python tools/ircadb_case.py --git-dir MIRROR --out ../ext/ircadb17                 # patient 17 at a pinned commit
    python interactive_eval.py --data-dir ../ext/ircadb17 --organs liver               # then measure on it

3D-IRCADb-01 (IRCAD, Strasbourg) is CC BY-NC-ND 4.0: evaluation only, never in a repository. Patient 17
(512 x 512 x 119, 0.743 x 0.743 x 1.6 mm, two large liver tumours) is in the public repository
alireza-da/TraumaDetectionProject at commit 23e58c4; `--git-dir` reads it from a bare clone of that
repository. The CT series is read with the project's DICOM reader (`sambtcv.data.dicom`: its files carry no
FrameOfReferenceUID and their positions start at 0); each mask folder is a series on the same grid.
OUT must not exist (or be a folder this tool wrote).
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
SOURCE = None  # a 3D-IRCADb patient folder holding PATIENT_DICOM/ and MASKS_DICOM/<structure>/
GIT_DIR = None  # or: a bare clone of alireza-da/TraumaDetectionProject (patient 17 at COMMIT)
COMMIT = "23e58c4"  # the commit of GIT_DIR that holds patient 17
CASE = "ircadb17"  # the case's name in OUT
OUT = None  # the dataset to write (imagesTr/, labelsTr/, dataset_0.json)
SEED = 0  # accepted for a uniform interface; nothing here is random
DEVICE = "cpu"  # accepted for a uniform interface; nothing here uses a model
# -----------------------------------------------------------------------------------------------------

LIVER = ("liver", "livertumor1", "livertumor2")  # mask folders that make the liver (tumours lie inside it)
LIVER_ID = 6
MARKER = "provenance.json"


def export(git_dir: Path, commit: str, dst: Path) -> Path:
    """PATIENT_DICOM/ and MASKS_DICOM/ of the bare clone at `commit`, into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit, "PATIENT_DICOM", "MASKS_DICOM"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise PipelineError(f"{git_dir} has no PATIENT_DICOM / MASKS_DICOM at {commit} "
                            f"({archive.stderr.decode(errors='replace').strip()[:160]})")
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
    return dst


def read_grid(folder: Path):
    """(SimpleITK image, its (k, j, i) array) of a DICOM series folder, through the project's reader."""
    import SimpleITK as sitk

    from sambtcv.data import dicom

    series = dicom.read_series(folder)
    nii = dicom.to_nifti(series, Path(tempfile.mkdtemp(prefix="ircadb-")) / "v.nii.gz")
    image = sitk.ReadImage(str(nii))
    return image, sitk.GetArrayFromImage(image)


def convert(source: Path, out: Path, case: str) -> dict:
    import SimpleITK as sitk

    ct, ct_arr = read_grid(source / "PATIENT_DICOM")
    label = np.zeros(ct_arr.shape, np.uint8)
    for name in LIVER:
        folder = source / "MASKS_DICOM" / name
        if not folder.is_dir():
            raise PipelineError(f"{folder} is missing; give a 3D-IRCADb patient folder")
        mask, arr = read_grid(folder)
        if arr.shape != ct_arr.shape or not np.allclose(mask.GetOrigin(), ct.GetOrigin()):
            raise PipelineError(f"{folder} is not on the CT's grid")
        label[arr > 0] = LIVER_ID
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(ct)
    for sub, img in (("imagesTr", ct), ("labelsTr", lab)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(out / sub / f"{case}.nii.gz"))
    print(f"{case}: {ct_arr.shape[::-1]} voxels, liver {int((label > 0).sum())} voxels", flush=True)
    return {"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "labelled": [LIVER_ID],
            "present": [LIVER_ID], "lesion_in_liver": ["livertumor1", "livertumor2"]}


def main(argv=None):
    cfg = parse_config(globals(), argv)
    if bool(cfg["source"]) == bool(cfg["git_dir"]) or not cfg["out"]:
        raise PipelineError("give --out DIR and one of --source PATIENT_FOLDER or --git-dir BARE_CLONE")
    out = Path(cfg["out"])
    check_replaceable(out, MARKER, "--out")
    with tempfile.TemporaryDirectory() as tmp, staged_dir(out, MARKER) as part:
        source = Path(cfg["source"]) if cfg["source"] else export(Path(cfg["git_dir"]), cfg["commit"], Path(tmp))
        entry = convert(source, part, cfg["case"])
        write_json(part / "dataset_0.json", {"training": [], "validation": [entry]})
        write_json(part / MARKER, {"written_by": "tools/ircadb_case.py", "licence": "CC BY-NC-ND 4.0 (3D-IRCADb-01, "
                                   "IRCAD): evaluation only, not for redistribution",
                                   "source": str(cfg["source"] or f"{cfg['git_dir']}@{cfg['commit']}")})
    print(f"wrote {out}; python interactive_eval.py --data-dir {out} --organs liver")


if __name__ == "__main__":
    run_main(main)
