"""Load BTCV 3D CT with MONAI, keep the slices that show an organ, write 2D slices and organ records.

    python preprocess.py --data-dir RAW --out-dir data/slices
    python preprocess.py --synthetic 6 --seed 0 --data-dir data/phantom --out-dir data/slices  # phantom first

Reads any of the three layouts of CONTRACT.md (BTCV's RawData/Training, MONAI's dataset_0.json,
imagesTr/labelsTr). Each volume goes through one MONAI pipeline: load, channel first, reorientation
to ORIENTATION (whatever the file's affine says), HU window WINDOW_HU mapped to [0, 1]. Axial slices
with at least one organ are written per split as ``OUT/<split>/<case>_z<k>.npz`` (``image`` uint8 =
round(255 x windowed), ``label`` uint8 BTCV ids, native in-plane size), with ``manifest.json`` (case,
slice, organs with area and XYXY box) and ``organs.csv`` (one row per organ per slice: the per-organ
records used for classification). The parameters are written to ``OUT/preprocess.json`` and read back
by every other script. The output folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from utils import (MANIFEST_FILE, NUM_ORGANS, PREPROCESS_FILE, PipelineError, organ_name, parse_config, run_main,
                   start_run, staged_dir, write_csv, write_json)

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # raw data folder in one of the contract's layouts (required)
OUT_DIR = "data/slices"  # where the 2D slices go
SYNTHETIC = 0  # > 0: first write this many phantom volumes into DATA_DIR (BTCV layout)
SEED = 0  # phantom and augmentation seed
PHANTOM_SHAPE = "256,256,64"  # voxels (i, j, k) of each phantom volume; same body, coarser spacing if smaller
VAL_FRACTION = 0.2  # without dataset_0.json: the last 20% of cases by sorted id are validation
WINDOW_HU = "-160,240"  # abdominal window W400/L40, as MedSAM/LiteMedSAM were trained (MONAI's BTCV: -175,250)
ORIENTATION = "LPS"  # canonical axes; a slice is vol[:, :, k].T: anterior up, patient right on the left
AUGMENT_COPIES = 0  # MONAI-augmented copies of every training slice (flip, rotate, intensity shift)
DEVICE = "cpu"  # accepted for a uniform interface; preprocessing runs on the CPU
# -----------------------------------------------------------------------------------------------------

LAYOUTS = ("RawData/Training/img + label", "dataset_0.json", "imagesTr + labelsTr")


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def case_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def find_cases(data_dir: Path, val_fraction: float = 0.2) -> dict:
    """{'train': [(case, image, label)], 'val': [...], 'source': str} for the layout found in data_dir."""
    if not data_dir.is_dir():
        raise PipelineError(f"data dir {data_dir} does not exist")
    js = data_dir / "dataset_0.json"
    if js.is_file():
        try:
            spec = json.loads(js.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"cannot parse {js}: {exc}") from exc
        out = {"source": "dataset_0.json"}
        for split, key in (("train", "training"), ("val", "validation")):
            entries = spec.get(key, [])
            if not isinstance(entries, list) or any(not {"image", "label"} <= set(e) for e in entries):
                raise PipelineError(f"{js}: '{key}' must be a list of {{\"image\", \"label\"}} entries")
            out[split] = [(case_name(Path(e["image"])), data_dir / e["image"], data_dir / e["label"]) for e in entries]
        if not out["train"] and not out["val"]:
            raise PipelineError(f"{js} lists no training or validation cases")
        _check_pairs(out["train"] + out["val"])
        return out
    if (data_dir / "RawData" / "Training" / "img").is_dir():
        img_dir, lab_dir = data_dir / "RawData" / "Training" / "img", data_dir / "RawData" / "Training" / "label"
        images = sorted(img_dir.glob("*.nii*"), key=lambda p: _natural_key(p.name))
        pairs = [(case_name(p), p, lab_dir / p.name.replace("img", "label", 1)) for p in images]
    elif (data_dir / "imagesTr").is_dir():
        images = sorted((data_dir / "imagesTr").glob("*.nii*"), key=lambda p: _natural_key(p.name))
        pairs = [(case_name(p), p, data_dir / "labelsTr" / p.name) for p in images]
    else:
        raise PipelineError(f"no BTCV data found in {data_dir}: expected one of the layouts {', '.join(LAYOUTS)}")
    if not pairs:
        raise PipelineError(f"data dir {data_dir} has the folder layout but no .nii.gz images")
    _check_pairs(pairs)
    n_val = max(1, int(round(len(pairs) * val_fraction)))
    return {"source": f"last {val_fraction:.0%} of cases by sorted id", "train": pairs[:-n_val], "val": pairs[-n_val:]}


def _check_pairs(pairs):
    for case, image, label in pairs:
        if not image.is_file():
            raise PipelineError(f"image file missing: {image}")
        if not label.is_file():
            raise PipelineError(f"image {image} has no label file (expected {label})")


def load_volume(image: Path, label: Path, orientation: str, window) -> tuple[np.ndarray, np.ndarray]:
    """MONAI: load, channel first, reorient, HU window -> (image float32 [0, 1], label uint8), axes (i, j, k)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

    pipeline = Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ScaleIntensityRanged(keys=["image"], a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
    ])
    import nibabel as nib

    shapes = {}
    for path in (image, label):
        try:
            shapes[path] = tuple(nib.load(str(path)).shape)
        except Exception as exc:
            raise PipelineError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        if len(shapes[path]) != 3:
            raise PipelineError(f"{path} is not a 3D volume (shape {shapes[path]})")
    if shapes[image] != shapes[label]:
        raise PipelineError(f"label {label} has shape {shapes[label]} but its image {image} has shape {shapes[image]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = pipeline({"image": str(image), "label": str(label)})
    except Exception as exc:
        raise PipelineError(f"cannot load {image} / {label}: {type(exc).__name__}: {exc}") from exc
    img = np.asarray(data["image"])[0].astype(np.float32)
    lab_f = np.asarray(data["label"])[0]
    if not np.allclose(lab_f, np.round(lab_f)) or lab_f.min() < 0 or lab_f.max() > NUM_ORGANS:
        bad = np.unique(lab_f[(lab_f < 0) | (lab_f > NUM_ORGANS) | (lab_f != np.round(lab_f))])[:5]
        raise PipelineError(f"label {label} has values outside 0..{NUM_ORGANS} (e.g. {bad.tolist()})")
    return img, np.round(lab_f).astype(np.uint8)


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
            views = [(case, img[:, :, k].T, lab[:, :, k].T)]
            for c in range(augment_copies if aug is not None else 0):
                d = aug({"image": img[None, :, :, k].T.copy(), "label": lab[None, :, :, k].T.astype(np.float32)})
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
        raise PipelineError(f"--window-hu must be 'LOW,HIGH' in HU, got {text!r}") from None
    if not lo < hi:
        raise PipelineError(f"--window-hu needs LOW < HIGH, got {text!r}")
    return lo, hi


def preprocess(data_dir, out_dir, val_fraction=VAL_FRACTION, window_hu=WINDOW_HU, orientation=ORIENTATION,
               augment_copies=AUGMENT_COPIES, seed=SEED, synthetic=None) -> dict:
    """Write the slices of every case in data_dir to out_dir (replaced whole, atomically)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    window = parse_window(window_hu)
    cases = find_cases(data_dir, val_fraction)
    params = {"data_dir": str(data_dir.resolve()), "split_source": cases["source"],
              "split": {s: [c for c, _, _ in cases[s]] for s in ("train", "val")},
              "hu_window": list(window), "orientation": orientation,
              "slice": "vol[:, :, k].T of the reoriented volume: rows = 2nd axis, columns = 1st axis",
              "intensity": "uint8 = round(255 * clip((HU - lo) / (hi - lo), 0, 1))",
              "augment_copies": augment_copies, "seed": seed, "synthetic": synthetic}
    with staged_dir(out_dir) as tmp:
        counts = {s: write_split(tmp, s, cases[s], orientation, window, augment_copies, seed) for s in ("train", "val")}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        for s in ("train", "val"):
            digest.update((tmp / s / MANIFEST_FILE).read_bytes())
        params.update(counts=counts, created_id=digest.hexdigest()[:16])
        write_json(tmp / PREPROCESS_FILE, params)
    return params


def main(argv=None):
    cfg = parse_config(globals(), argv)
    start_run(cfg)
    if not cfg["data_dir"]:
        raise PipelineError("--data-dir is required (the raw BTCV folder, or where --synthetic writes the phantom)")
    synthetic = None
    if cfg["synthetic"] > 0:
        from phantom import DEFAULT_SHAPE, DEFAULT_SPACING, write_phantom

        try:
            shape = tuple(int(v) for v in cfg["phantom_shape"].split(","))
            assert len(shape) == 3 and min(shape) >= 8
        except (ValueError, AssertionError):
            raise PipelineError(f"--phantom-shape must be three sizes >= 8 like 256,256,64, got {cfg['phantom_shape']!r}")
        spacing = tuple(sp * d / n for sp, d, n in zip(DEFAULT_SPACING, DEFAULT_SHAPE, shape))
        write_phantom(cfg["data_dir"], cfg["synthetic"], cfg["seed"], shape=shape, spacing=spacing)
        synthetic = {"volumes": cfg["synthetic"], "seed": cfg["seed"], "shape": list(shape)}
    params = preprocess(cfg["data_dir"], cfg["out_dir"], cfg["val_fraction"], cfg["window_hu"], cfg["orientation"],
                        cfg["augment_copies"], cfg["seed"], synthetic)
    c = params["counts"]
    print(f"wrote {c['train']['slices']} train and {c['val']['slices']} val slices "
          f"({c['train']['cases']} + {c['val']['cases']} cases) to {cfg['out_dir']}")


if __name__ == "__main__":
    run_main(main)
