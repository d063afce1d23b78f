"""A labelled dataset resampled to another voxel spacing (image linear, label nearest), as TotalSegmentator and
nnU-Net store CTs, so the engine can be measured at the resolutions users load.

    python tools/resample_case.py --data-dir ../shared/data/real_ct_dev --spacing 1.5 --out ../ext/dev_1.5mm
    python tools/resample_case.py --data-dir ../shared/data/real_ct_dev --spacing 3 --out ../ext/dev_3mm
    python interactive_eval.py --data-dir ../ext/dev_1.5mm --organs all     # then measure on it

Every case of DATA_DIR (both splits, any of the contract's layouts, DICOM series too) is written to OUT as
imagesTr/<case>.nii.gz (int16 HU) and labelsTr/<case>.nii.gz (uint8, BTCV ids) with a dataset_0.json listing
them all as validation; a case's entry in DATA_DIR's own dataset_0.json (its `labelled` ids, source,
licence) is carried over, with the new shape and spacing. The grid keeps the volume's orientation and outer
corner (`sambtcv.data.resample`). OUT must not exist (or be a folder this tool wrote).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sambtcv.cli import flag, parse_config, run_main  # noqa: E402
from sambtcv.core.errors import PipelineError  # noqa: E402
from sambtcv.core.files import check_replaceable, staged_dir, write_json  # noqa: E402

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # a labelled dataset in one of the contract's layouts
SPACING = "1.5"  # mm: one number (isotropic) or three (i, j, k of the stored volume), e.g. 0.8,0.8,3
OUT = None  # the dataset to write (imagesTr/, labelsTr/, dataset_0.json)
SEED = 0  # accepted for a uniform interface; nothing here is random
DEVICE = "cpu"  # accepted for a uniform interface; nothing here uses a model
# -----------------------------------------------------------------------------------------------------

MARKER = "resampled.json"
HU_RANGE = (-32768, 32767)  # int16


def source_entries(data_dir: Path) -> dict:
    """DATA_DIR's dataset_0.json entries by image path (empty without one)."""
    js = data_dir / "dataset_0.json"
    if not js.is_file():
        return {}
    spec = json.loads(js.read_text())
    return {e["image"]: e for key in ("training", "validation") for e in spec.get(key, []) if isinstance(e, dict)}


def write_case(part: Path, case: str, image: Path, label: Path, spacing, extra: dict) -> dict:
    import nibabel as nib

    from sambtcv.data.dicom import as_nifti
    from sambtcv.data.resample import resample

    im = nib.load(str(as_nifti(image)))
    lab = nib.load(str(label))
    out = resample(np.asarray(im.dataobj, np.float32), np.asarray(lab.dataobj), im.affine, spacing)
    entry = {**extra, "image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz", "case": case,
             "shape": list(out.image.shape), "spacing_mm": [float(v) for v in out.spacing],
             "resampled_from": {"image": str(image), "shape": list(im.shape),
                                "spacing_mm": [round(float(v), 4) for v in im.header.get_zooms()[:3]]}}
    for folder, data in (("imagesTr", np.clip(np.rint(out.image), *HU_RANGE).astype(np.int16)),
                         ("labelsTr", out.label.astype(np.uint8))):
        nii = nib.Nifti1Image(data, out.affine)
        nii.set_qform(out.affine, code=1)
        nii.set_sform(out.affine, code=1)
        (part / folder).mkdir(exist_ok=True)
        nib.save(nii, str(part / folder / f"{case}.nii.gz"))
    print(f"{case}: {tuple(im.shape)} -> {out.image.shape} at {','.join(f'{v:g}' for v in out.spacing)} mm, "
          f"organs {sorted(int(v) for v in np.unique(out.label) if v)}", flush=True)
    return entry


def main(argv=None):
    from sambtcv.data.btcv import check_geometry, find_cases
    from sambtcv.data.resample import parse_spacing

    cfg = parse_config(globals(), argv)
    if not cfg["data_dir"] or not cfg["out"]:
        raise PipelineError("give --data-dir (a labelled dataset) and --out (the folder to write)")
    with flag("--spacing"):
        spacing = parse_spacing(cfg["spacing"])
    data_dir, out = Path(cfg["data_dir"]), Path(cfg["out"])
    with flag("--out"):
        check_replaceable(out, MARKER, "--out")
    with flag("--data-dir"):
        found = find_cases(data_dir)
        cases = found["train"] + found["val"]
        for _, image, label in cases:
            check_geometry(image, label)
    extra = source_entries(data_dir)
    with staged_dir(out, MARKER) as part:
        entries = []
        for case, image, label in cases:
            rel = str(image.relative_to(data_dir)) if image.is_relative_to(data_dir) else str(image)
            entries.append(write_case(part, case, image, label, spacing, extra.get(rel, {})))
        write_json(part / "dataset_0.json", {"training": [], "validation": entries})
        write_json(part / MARKER, {"written_by": "tools/resample_case.py", "data_dir": str(data_dir),
                                   "spacing_mm": [float(v) for v in spacing]})
    print(f"wrote {len(entries)} cases to {out}")


if __name__ == "__main__":
    run_main(main)
