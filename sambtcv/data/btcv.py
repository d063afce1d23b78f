"""Data: BTCV's layouts, one MONAI loading path (load, channel first, reorientation, HU window), the axial
slice frame, and the 2D slices and organ records that preprocess.py writes.

Each volume goes through one MONAI pipeline: load, channel first, reorientation to an orientation
(whatever the file's affine says), HU window mapped to [0, 1]. Axial slices with at least one organ are
written per split as ``OUT/<split>/<case>_z<k>.npz`` (``image`` uint8 = round(255 x windowed),
``label`` uint8 BTCV ids, native in-plane size), with ``manifest.json`` (case, slice, organs with area
and XYXY box) and ``organs.csv`` (one row per organ per slice). The parameters are written to
``OUT/preprocess.json`` and read back by every other page (`sambtcv.data.slices`).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import check_replaceable, staged_dir, write_csv, write_json
from sambtcv.core.names import NUM_ORGANS, SPLITS, organ_name
from sambtcv.data.slices import MANIFEST_FILE, PREPROCESS_FILE

LAYOUTS = ("RawData/Training/img + label", "dataset_0.json", "imagesTr + labelsTr")
MIN_PHANTOM_SIDE = 6  # voxels per side; 6 slices still hold 11-12 organs on 4 slices (profiles/smoke.toml)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def case_name(path: Path) -> str:
    name = path.name
    for ext in NIFTI_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def case_images(folder: Path) -> list[Path]:
    """A folder layout's images, in natural order: NIfTI files, and DICOM series (a folder of one series'
    files, or a .zip of one; `sambtcv.data.dicom`)."""
    found = [p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) or p.suffix.lower() == ".zip"
             or (p.is_dir() and not p.name.startswith("."))]
    return sorted(found, key=lambda p: _natural_key(p.name))


def label_name(image: Path) -> str:
    """The label file's name for an image: the same NIfTI name, or <case>.nii.gz for a DICOM series."""
    return image.name if image.name.endswith(NIFTI_SUFFIXES) else case_name(image) + ".nii.gz"


def _json_split(data_dir: Path, js: Path) -> dict:
    """The cases listed by a MONAI dataset_0.json (which defines the split)."""
    try:
        spec = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot parse {js}: {exc}") from exc
    if not isinstance(spec, dict):
        raise PipelineError(f"{js} must hold an object with \"training\" and \"validation\" lists")
    out = {"source": "dataset_0.json"}
    for split, key in (("train", "training"), ("val", "validation")):
        entries = spec.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(k), str) and e[k].strip() and "\0" not in e[k]
                                            for k in ("image", "label"))
                for e in entries):
            raise PipelineError(f"{js}: '{key}' must be a list of {{\"image\": path, \"label\": path}} entries "
                                f"with paths as strings")
        out[split] = [(case_name(Path(e["image"])), data_dir / e["image"], data_dir / e["label"]) for e in entries]
    if not out["train"] and not out["val"]:
        raise PipelineError(f"{js} lists no training or validation cases")
    return out


def find_cases(data_dir: Path, val_fraction: float = config.VAL_FRACTION) -> dict:
    """{'train': [(case, image, label)], 'val': [...], 'source': str} for the layout found in data_dir."""
    if not data_dir.is_dir():
        raise PipelineError(f"data dir {data_dir} does not exist")
    js = data_dir / "dataset_0.json"
    if js.is_file():
        out = _json_split(data_dir, js)
        _check_pairs(out["train"] + out["val"])
        return out
    if (data_dir / "RawData" / "Training" / "img").is_dir():
        img_dir, lab_dir = data_dir / "RawData" / "Training" / "img", data_dir / "RawData" / "Training" / "label"
        pairs = [(case_name(p), p, lab_dir / label_name(p).replace("img", "label", 1)) for p in case_images(img_dir)]
    elif (data_dir / "imagesTr").is_dir():
        pairs = [(case_name(p), p, data_dir / "labelsTr" / label_name(p)) for p in case_images(data_dir / "imagesTr")]
    else:
        raise PipelineError(f"no BTCV data found in {data_dir}: expected one of the layouts {', '.join(LAYOUTS)}")
    if not pairs:
        raise PipelineError(f"data dir {data_dir} has the folder layout but no .nii.gz images or DICOM series")
    _check_pairs(pairs)
    n_val = max(1, int(round(len(pairs) * val_fraction)))
    return {"source": f"last {val_fraction:.0%} of cases by sorted id", "train": pairs[:-n_val], "val": pairs[-n_val:]}


def _check_pairs(pairs):
    """Every file present; case names (which name the slice files) unique; no case in two splits."""
    seen = {}
    for case, image, label in pairs:
        try:
            image.is_file() and label.is_file()
        except (OSError, ValueError) as exc:
            raise PipelineError(f"cannot look up the case files {image} / {label}: {exc}") from None
        if not image.is_file() and not image.is_dir():
            raise PipelineError(f"image file missing: {image}")
        if not label.is_file():
            raise PipelineError(f"image {image} has no label file (expected {label})")
        if case in seen:
            same = seen[case].resolve() == image.resolve()
            again = " again" if same else f" and {image}"
            raise PipelineError(f"case {case} is listed twice ({seen[case]}{again})"
                                f"{': a case cannot be in both training and validation' if same else ''}; "
                                f"slice files are named by case, so each case must be listed once under its own name")
        seen[case] = image


def check_out_dir(data_dir: Path, out_dir: Path) -> None:
    """Refuse an out dir that is, contains or lies inside the data dir, or that this project did not write."""
    data, out = data_dir.resolve(), out_dir.resolve()
    if out == data or data.is_relative_to(out) or out.is_relative_to(data):
        raise PipelineError(f"{{subject}} {out_dir} is, contains or lies inside the data folder {data_dir}; it is "
                            f"replaced whole, so choose a folder beside the data", "output folder")
    check_replaceable(out_dir, PREPROCESS_FILE)


def read_header(path: Path):
    """The NIfTI header of a 3D volume, or one line saying why it cannot be one."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise PipelineError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if len(img.shape) != 3:
        raise PipelineError(f"{path} is not a 3D volume (shape {img.shape})")
    return img


def check_geometry(image: Path, label: Path) -> None:
    """The label must lie on the image's voxel grid (a DICOM series': `sambtcv.data.dicom.as_nifti`): same shape,
    orientation, and corners within a voxel."""
    import nibabel as nib

    from sambtcv.data.dicom import as_nifti

    image = as_nifti(image)
    im, lab = read_header(image), read_header(label)
    if im.shape != lab.shape:
        raise PipelineError(f"label {label} has shape {lab.shape} but its image {image} has shape {im.shape}")
    if nib.aff2axcodes(im.affine) != nib.aff2axcodes(lab.affine):
        raise PipelineError(f"label {label} is oriented {''.join(nib.aff2axcodes(lab.affine))} but its image is "
                            f"{''.join(nib.aff2axcodes(im.affine))}; write both with the same affine")
    corners = np.array([[0, 0, 0, 1], [*(np.array(im.shape) - 1), 1]], dtype=float).T
    shift = np.linalg.norm((im.affine @ corners - lab.affine @ corners)[:3], axis=0).max()
    voxel = float(min(im.header.get_zooms()[:3]))
    if shift > voxel:
        raise PipelineError(f"label {label} is {shift:.1f} mm away from its image {image} (more than a voxel, "
                            f"{voxel:.1f} mm); write both with the same affine")


def _load(path: Path):
    """One file through MONAI's LoadImage (channel first), or one line saying which file is unreadable."""
    from monai.transforms import LoadImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise PipelineError(f"cannot read {path} (truncated or corrupt?): {type(root).__name__}: "
                            f"{str(root).splitlines()[0][:160] if str(root) else ''}") from exc


ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axcodes name the direction each axis increases to


def _reorient(data: dict, orientation: str) -> dict:
    from monai.transforms import Orientationd

    return Orientationd(keys=list(data), axcodes=orientation, labels=ORIENTATION_LABELS)(data)


def load_image(image: Path, orientation: str, window) -> np.ndarray:
    """MONAI: load, channel first, reorient, HU window -> image float32 in [0, 1], axes (i, j, k) of
    `orientation`. NaN/inf voxels are refused with one line."""
    from monai.transforms import ScaleIntensityRanged

    data = _reorient({"image": _load(image)}, orientation)
    bad = int((~np.isfinite(np.asarray(data["image"]))).sum())
    if bad:
        raise PipelineError(f"image {image} has {bad} NaN or infinite voxels; fix or crop the volume (no HU value "
                            f"can be assumed for them)")
    data = ScaleIntensityRanged(keys=["image"], a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)(data)
    return np.asarray(data["image"])[0].astype(np.float32)


def load_label(label: Path, orientation: str) -> np.ndarray:
    """MONAI: load, channel first, reorient -> uint8 BTCV ids; values outside 0..13 are refused."""
    lab_f = np.asarray(_reorient({"label": _load(label)}, orientation)["label"])[0]
    if not np.allclose(lab_f, np.round(lab_f)) or lab_f.min() < 0 or lab_f.max() > NUM_ORGANS:
        bad_values = np.unique(lab_f[(lab_f < 0) | (lab_f > NUM_ORGANS) | (lab_f != np.round(lab_f))])[:5]
        raise PipelineError(f"label {label} has values outside 0..{NUM_ORGANS} (e.g. {bad_values.tolist()})")
    return np.round(lab_f).astype(np.uint8)


def load_volume(image: Path, label: Path, orientation: str, window) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [0, 1], label uint8) of one case, both reoriented to `orientation`, axes (i, j, k);
    a label off the image's grid is refused with one line."""
    from sambtcv.data.dicom import as_nifti

    image = as_nifti(image)  # a DICOM series (folder or .zip) as NIfTI on its own grid
    check_geometry(image, label)
    return load_image(image, orientation, window), load_label(label, orientation)


def orientation_change(image: Path, orientation: str, to_stored: bool):
    """nibabel's axis flips/permutation between the file's stored axes and `orientation` (the same that
    MONAI's Orientationd applies on load), or back when `to_stored`."""
    import nibabel as nib

    stored = nib.orientations.io_orientation(read_header(image).affine)
    target = nib.orientations.axcodes2ornt(tuple(orientation), labels=ORIENTATION_LABELS)
    transform = nib.orientations.ornt_transform
    return transform(target, stored) if to_stored else transform(stored, target)


def to_stored_axes(volume: np.ndarray, image: Path, orientation: str) -> np.ndarray:
    """A volume in `orientation` (as `load_image` returns it) put back in the axes of `image` as stored,
    so that it overlays the image with the image's own affine."""
    import nibabel as nib

    return nib.orientations.apply_orientation(volume, orientation_change(image, orientation, to_stored=True))


def from_stored_axes(volume: np.ndarray, image: Path, orientation: str) -> np.ndarray:
    """The inverse of `to_stored_axes` (for arrays in the file's own axes, such as a voxel box mask)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(volume, orientation_change(image, orientation, to_stored=False))


def axial_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice k of a reoriented (i, j, k) volume in the frame slices are written in: rows = j, columns = i."""
    return np.ascontiguousarray(volume[:, :, k].T)


def organ_stats(label2d: np.ndarray) -> dict:
    """{organ_id(str): {"area": pixels, "bbox": [x0, y0, x1, y1]}} for every organ in a 2D label."""
    out = {}
    for organ in np.unique(label2d):
        if organ == 0:
            continue
        rows, cols = np.nonzero(label2d == organ)
        out[str(int(organ))] = {"area": int(rows.size),
                                "bbox": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]}
    return out


def to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image01, 0.0, 1.0) * 255.0).astype(np.uint8)


def window(hu: np.ndarray, window_hu) -> np.ndarray:
    """HU (any shape) through the HU window as `load_image` maps it (MONAI's ScaleIntensityRange, clipped), as
    the uint8 slices the models see."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = window_hu
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(np.asarray(hu, np.float32))
    return to_uint8(np.asarray(scaled))


def augmentation(seed: int):
    """The report's augmentation as MONAI transforms on a {"image", "label"} dict of (1, H, W) arrays
    (image in [0, 1]): random flip, random rotation (nearest for the label), random intensity shift,
    to tensor. Orientation and intensity scaling are part of `load_volume`."""
    from monai.transforms import Compose, RandFlipd, RandRotated, RandShiftIntensityd, ToTensord

    aug = Compose([
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        RandRotated(keys=["image", "label"], range_x=np.pi / 12, prob=0.5, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandShiftIntensityd(keys=["image"], offsets=0.05, prob=0.5),
        ToTensord(keys=["image", "label"]),
    ])
    aug.set_random_state(seed=seed)
    return aug


def write_split(out: Path, split: str, cases, orientation, window, augment_copies: int, seed: int) -> dict:
    from tqdm import tqdm

    (out / split).mkdir(parents=True)
    records, organ_rows, case_info = [], [], []
    aug = augmentation(seed) if augment_copies and split == "train" else None
    for case, image, label in tqdm(cases, desc=f"preprocess {split}", unit="case", disable=not cases):
        img, lab = load_volume(image, label, orientation, window)
        kept = [k for k in range(lab.shape[2]) if lab[:, :, k].any()]
        case_info.append({"case": case, "image": str(image), "label": str(label), "shape": list(img.shape),
                          "slices_total": int(lab.shape[2]), "slices_kept": len(kept)})
        for k in kept:
            views = [(case, axial_slice(img, k), axial_slice(lab, k))]
            for c in range(augment_copies if aug is not None else 0):
                d = aug({"image": axial_slice(img, k)[None], "label": axial_slice(lab, k)[None].astype(np.float32)})
                views.append((f"{case}#aug{c + 1}", np.asarray(d["image"])[0], np.asarray(d["label"])[0]))
            for name, im2, lab2 in views:
                lab2 = np.round(np.asarray(lab2)).astype(np.uint8)
                organs = organ_stats(lab2)
                if not organs:
                    continue
                file = f"{name.replace('#', '_')}_z{k:03d}.npz"
                np.savez_compressed(out / split / file, image=to_uint8(np.asarray(im2)), label=lab2)
                records.append({"file": file, "case": name, "z": k, "height": int(lab2.shape[0]),
                                "width": int(lab2.shape[1]), "organs": organs})
                organ_rows += [[file, name, k, int(o), organ_name(int(o)), s["area"], *s["bbox"]]
                               for o, s in organs.items()]
    write_json(out / split / MANIFEST_FILE, {"split": split, "cases": case_info, "slices": records})
    write_csv(out / split / "organs.csv", ["file", "case", "z", "organ_id", "organ", "area", "x0", "y0", "x1", "y1"],
              organ_rows)
    return {"cases": len(cases), "slices": len(records), "organ_records": len(organ_rows)}


def parse_window(text: str):
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise PipelineError(f"{{subject}} must be 'LOW,HIGH' in HU, got {text!r}", "HU window") from None
    if not lo < hi:
        raise PipelineError(f"{{subject}} needs LOW < HIGH, got {text!r}", "HU window")
    return lo, hi


def preprocess(data_dir, out_dir, val_fraction=config.VAL_FRACTION, window_hu=config.WINDOW_HU,
               orientation=config.ORIENTATION, augment_copies=0, seed=config.SEED, synthetic=None) -> dict:
    """Write the slices of every case in data_dir to out_dir (replaced whole, atomically)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    window = parse_window(window_hu)
    check_out_dir(data_dir, out_dir)
    cases = find_cases(data_dir, val_fraction)
    params = {"data_dir": str(data_dir.resolve()), "split_source": cases["source"],
              "split": {s: [c for c, _, _ in cases[s]] for s in SPLITS},
              "hu_window": list(window), "orientation": orientation,
              "slice": "vol[:, :, k].T of the reoriented volume: rows = 2nd axis, columns = 1st axis",
              "intensity": "uint8 = round(255 * clip((HU - lo) / (hi - lo), 0, 1))",
              "augment_copies": augment_copies, "seed": seed, "synthetic": synthetic}
    with staged_dir(out_dir, PREPROCESS_FILE) as tmp:
        counts = {s: write_split(tmp, s, cases[s], orientation, window, augment_copies, seed) for s in SPLITS}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        for s in SPLITS:
            digest.update((tmp / s / MANIFEST_FILE).read_bytes())
        params.update(counts=counts, created_id=digest.hexdigest()[:16])
        write_json(tmp / PREPROCESS_FILE, params)
    return params


def phantom_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < MIN_PHANTOM_SIDE:
        raise PipelineError(f"{{subject}} must be three sizes >= {MIN_PHANTOM_SIDE} like 256,256,64, got {text!r}",
                            "phantom shape")
    return shape
