"""What every task computes on 2D slices, in one place to read and import: the contract's names, the
prompts, the one Dice and IoU, the per-organ Dice table, and the slices that preprocess.py writes.

    python utils.py --slices data/slices        # what a slices folder holds: splits, slices, organs, a Dice check

The code lives in the package (`sambtcv.core.names`, `sambtcv.core.prompts`, `sambtcv.core.metrics`,
`sambtcv.data.slices`); this page gathers it for users who write their own loops::

    from utils import SliceSet, make_prompt, prompt_rng, dice_score
    slices = SliceSet("data/slices", "val")
    image, label = slices.load(0)

Conventions: a slice is an (H, W) uint8 image with an (H, W) uint8 label of BTCV ids 0..13; points are
(N, 2) XY = (column, row) pixels; boxes are XYXY with inclusive corners, in the slice frame (README).
"""
from __future__ import annotations

from sambtcv.cli import parse_config, run_main
from sambtcv.core import config
from sambtcv.core.files import markdown_table
from sambtcv.core.metrics import (  # noqa: F401
    DiceTable,
    dice_from_counts,
    dice_score,
    iou_from_counts,
    iou_score,
    overlap_counts,
    per_organ_markdown,
)
from sambtcv.core.names import (  # noqa: F401
    NUM_ORGANS,
    ORGAN_ID,
    ORGANS,
    POINT_PROMPTS,
    PROMPT_TYPES,
    SPLITS,
    organ_name,
    prompt_types_arg,
    report_order,
)
from sambtcv.core.prompts import (  # noqa: F401
    BOX_MARGIN,
    Prompt,
    bound_box,
    central_point,
    grow_box,
    larger_box,
    make_prompt,
    present_organs,
    prompt_rng,
    random_points,
)
from sambtcv.data.slices import MANIFEST_FILE, PREPROCESS_FILE, SliceSet, load_preprocess_params  # noqa: F401

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # a folder that preprocess.py wrote
SEED = config.SEED  # seeds the random points of the check (>= 0)
DEVICE = "cpu"  # accepted for a uniform interface; nothing here uses a model
# -----------------------------------------------------------------------------------------------------


def summary(slices_dir, seed: int) -> list[list]:
    """Per split: slices, (slice, organ) pairs and the organs present."""
    rows = []
    for split in SPLITS:
        s = SliceSet(slices_dir, split)
        organs = sorted({o for _, o in s.items})
        rows.append([split, len(s), len(s.items), ", ".join(organ_name(o) for o in organs) or "-"])
    return rows


def main(argv=None):
    cfg = parse_config(globals(), argv)
    params = load_preprocess_params(cfg["slices"])
    print(f"{cfg['slices']}: HU window {params['hu_window']}, orientation {params['orientation']}, "
          f"split from {params['split_source']}")
    print(markdown_table(["split", "slices", "(slice, organ) pairs", "organs"], summary(cfg["slices"], cfg["seed"])),
          end="")
    s = SliceSet(cfg["slices"], "val") if len(SliceSet(cfg["slices"], "val")) else SliceSet(cfg["slices"], "train")
    if len(s):
        image, label = s.load(0)
        organ = present_organs(label)[0]
        mask = label == organ
        prompt = make_prompt(mask, "one_central_point", prompt_rng(cfg["seed"], s.records[0]["case"],
                                                                   s.records[0]["z"], organ, "one_central_point"))
        x, y = prompt.points[0].astype(int)
        print(f"first {s.split} slice {s.records[0]['file']}: {image.shape[1]} x {image.shape[0]} px, "
              f"{organ_name(organ)} central point ({x}, {y}) inside the mask: {bool(mask[y, x])}; "
              f"Dice(mask, mask) = {dice_score(mask, mask):.1f}")


if __name__ == "__main__":
    run_main(main)
