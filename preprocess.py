"""Load BTCV 3D CT with MONAI, keep the slices that show an organ, write 2D slices and organ records.

    python preprocess.py --data-dir RAW --out-dir data/slices
    python preprocess.py --synthetic 6 --seed 0 --data-dir data/phantom --out-dir data/slices  # phantom first

Reads any of the three layouts of docs/CONTRACT.md (BTCV's RawData/Training, MONAI's dataset_0.json,
imagesTr/labelsTr). Each volume goes through one MONAI pipeline: load, channel first, reorientation
to ORIENTATION (whatever the file's affine says), HU window WINDOW_HU mapped to [0, 1]. Axial slices
with at least one organ are written per split as ``OUT/<split>/<case>_z<k>.npz`` (``image`` uint8 =
round(255 x windowed), ``label`` uint8 BTCV ids, native in-plane size), with ``manifest.json`` (case,
slice, organs with area and XYXY box) and ``organs.csv`` (one row per organ per slice: the per-organ
records used for classification). The parameters are written to ``OUT/preprocess.json`` and read back
by every other script. The output folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

from pathlib import Path

from sambtcv.cli import flag, parse_config, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.data.btcv import check_out_dir, parse_window, phantom_shape, preprocess
from sambtcv.data.phantom import write_phantom

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # raw data folder in one of the contract's layouts (required)
OUT_DIR = config.SLICES  # where the 2D slices go; replaced whole, only if preprocess.py wrote it
SYNTHETIC = 0  # > 0: first write this many phantom volumes into DATA_DIR (BTCV layout) (>= 0)
SEED = config.SEED  # phantom and augmentation seed (>= 0)
PHANTOM_SHAPE = "256,256,64"  # voxels (i, j, k) of each phantom volume; same body, coarser spacing if smaller
VAL_FRACTION = config.VAL_FRACTION  # without dataset_0.json: the last 20% of cases by sorted id are validation (>= 0)
WINDOW_HU = config.WINDOW_HU  # HU window LOW,HIGH mapped to [0, 1] (abdomen W400/L40; MONAI's BTCV: -175,250)
ORIENTATION = config.ORIENTATION  # canonical axes; a slice is vol[:, :, k].T: anterior up, patient right on the left
AUGMENT_COPIES = 0  # MONAI-augmented copies of every training slice: flip, rotate, intensity shift (>= 0)
DEVICE = "cpu"  # accepted for a uniform interface; preprocessing runs on the CPU
# -----------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(globals(), argv)
    start_run(cfg)
    if not cfg["data_dir"]:
        raise PipelineError("--data-dir is required (the raw BTCV folder, or where --synthetic writes the phantom)")
    with flag("--window-hu"):
        parse_window(cfg["window_hu"])
    with flag("--out-dir"):
        check_out_dir(Path(cfg["data_dir"]), Path(cfg["out_dir"]))  # before writing anything
    synthetic = None
    if cfg["synthetic"] > 0:
        with flag("--phantom-shape"):
            shape = phantom_shape(cfg["phantom_shape"])
        with flag("--data-dir"):
            write_phantom(cfg["data_dir"], cfg["synthetic"], cfg["seed"], shape=shape)
        synthetic = {"volumes": cfg["synthetic"], "seed": cfg["seed"], "shape": list(shape)}
    with flag("--out-dir"):
        params = preprocess(cfg["data_dir"], cfg["out_dir"], cfg["val_fraction"], cfg["window_hu"],
                            cfg["orientation"], cfg["augment_copies"], cfg["seed"], synthetic)
    c = params["counts"]
    print(f"wrote {c['train']['slices']} train and {c['val']['slices']} val slices "
          f"({c['train']['cases']} + {c['val']['cases']} cases) to {cfg['out_dir']}")


if __name__ == "__main__":
    run_main(main)
