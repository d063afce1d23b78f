"""What every task computes on 2D slices: the contract's names, prompts, Dice and IoU, DiceTable, SliceSet.

Conventions used throughout:

* A 2D slice is an ``(H, W)`` ``uint8`` image (the HU window of `preprocess.py` mapped to 0..255)
  with an ``(H, W)`` ``uint8`` label of BTCV ids 0..13, at the slice's own in-plane size.
* Points are ``(N, 2)`` arrays of ``(x, y)`` = (column, row) pixel coordinates; boxes are XYXY
  ``(x0, y0, x1, y1)`` with inclusive pixel coordinates. Both are in the original slice frame until
  `models.InputFrame` maps them into a model's input frame.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from cli import PipelineError
from files import markdown_table, read_json

# ----------------------------------------------------------------------------------------------
# Names (see CONTRACT.md)
ORGANS = [
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_veins", "pancreas", "right_adrenal_gland",
    "left_adrenal_gland",
]
NUM_ORGANS = len(ORGANS)  # label ids 1..13, 0 is background
ORGAN_ID = {name: i + 1 for i, name in enumerate(ORGANS)}
PROMPT_TYPES = ["one_central_point", "one_random_point", "three_random_points", "bound_box", "larger_box"]
POINT_PROMPTS = {"one_central_point": 1, "one_random_point": 1, "three_random_points": 3}
BOX_MARGIN = 5  # pixels of the original slice added on each side for the larger box
PREPROCESS_FILE = "preprocess.json"  # written by preprocess.py next to the slices
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")


def organ_name(organ_id: int) -> str:
    assert 1 <= organ_id <= NUM_ORGANS, f"organ id {organ_id} outside 1..{NUM_ORGANS}"
    return ORGANS[organ_id - 1]


# ----------------------------------------------------------------------------------------------
# Prompts, in the original slice frame
def prompt_rng(seed: int, case: str, z: int, organ: int, prompt_type: str, epoch: int = 0):
    """A generator that depends only on (seed, case, slice, organ, prompt type, epoch).

    So the same seed gives the same prompts whatever order slices and organs are processed in.
    """
    key = [seed, zlib.crc32(case.encode()), int(z), int(organ), PROMPT_TYPES.index(prompt_type), int(epoch)]
    return np.random.default_rng(key)


def central_point(mask: np.ndarray) -> np.ndarray:
    """(1, 2) XY of the mask pixel farthest from the background (argmax of cv2.distanceTransform)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # the image border counts as background
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[col, row]], dtype=np.float64)


def random_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) XY of pixels drawn uniformly from the mask (without replacement where it has n pixels)."""
    rows, cols = np.nonzero(mask)
    assert rows.size > 0, "cannot draw points from an empty mask"
    pick = rng.choice(rows.size, size=n, replace=rows.size < n)
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)


def bound_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box (inclusive pixel coordinates) of a non-empty mask, float64 (4,)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert rows.size > 0, "cannot box an empty mask"
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def grow_box(box, margin: float, bounds) -> np.ndarray:
    """An XYXY box moved out by `margin` pixels on each side, clipped to the XYXY `bounds`."""
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = bounds
    return np.array([max(x0 - margin, bx0), max(y0 - margin, by0), min(x1 + margin, bx1), min(y1 + margin, by1)],
                    dtype=np.float64)


def larger_box(mask: np.ndarray, margin: int = BOX_MARGIN) -> np.ndarray:
    """The bound box moved out by `margin` pixels on each side, clipped to the image."""
    h, w = mask.shape
    return grow_box(bound_box(mask), margin, (0, 0, w - 1, h - 1))


def present_organs(label: np.ndarray) -> list[int]:
    """The BTCV organ ids (1..NUM_ORGANS) that a label slice or volume holds, ascending."""
    return [int(o) for o in np.unique(label) if 1 <= o <= NUM_ORGANS]


@dataclass
class Prompt:
    """One prompt in the slice frame: ``points`` (n, 2) XY (all foreground) or ``box`` (4,) XYXY."""

    points: np.ndarray | None = None
    box: np.ndarray | None = None


def make_prompt(mask: np.ndarray, prompt_type: str, rng: np.random.Generator | None) -> Prompt:
    """Prompt of `prompt_type` for a non-empty binary (H, W) mask, in the slice frame (`rng` draws the
    random points; unused for the other types)."""
    if prompt_type == "one_central_point":
        return Prompt(points=central_point(mask))
    if prompt_type in POINT_PROMPTS:
        return Prompt(points=random_points(mask, POINT_PROMPTS[prompt_type], rng))
    if prompt_type == "bound_box":
        return Prompt(box=bound_box(mask))
    if prompt_type == "larger_box":
        return Prompt(box=larger_box(mask))
    raise PipelineError(f"unknown prompt type {prompt_type!r}; choose from {', '.join(PROMPT_TYPES)}")


def prompt_types_arg(value: str) -> list[str]:
    """'all' or one prompt name (or a comma list) -> list of prompt names, in the report's order."""
    if value == "all":
        return list(PROMPT_TYPES)
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in PROMPT_TYPES:
            raise PipelineError(f"unknown prompt type {name!r}; choose 'all' or one of {', '.join(PROMPT_TYPES)}")
    return [p for p in PROMPT_TYPES if p in names]


# ----------------------------------------------------------------------------------------------
# Dice and IoU: one definition on pixel counts, with numpy and torch views. Two empty masks agree
# perfectly (1.0); that case never reaches the tables, which score only organs in the ground truth.
def dice_from_counts(inter, size_a, size_b):
    """2|A n B| / (|A| + |B|) from counts (python numbers, numpy or torch arrays); 1 where both are empty."""
    total = size_a + size_b
    if isinstance(total, torch.Tensor):
        return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), torch.ones_like(total, dtype=torch.float32))
    if np.ndim(total):
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    return 2.0 * inter / total if total else 1.0


def iou_from_counts(inter, size_a, size_b):
    """|A n B| / |A u B| from counts; 1 where both are empty."""
    union = size_a + size_b - inter
    if isinstance(union, torch.Tensor):
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union, dtype=torch.float32))
    return inter / union if union else 1.0


def overlap_counts(pred, gt):
    """(|A n B|, |A|, |B|) of binary masks: python ints for numpy (H, W) masks, (B,) float tensors
    for torch (B, ...) masks (counted per sample over the trailing dimensions)."""
    if isinstance(pred, torch.Tensor):
        pred, gt = pred.bool().flatten(1), gt.bool().flatten(1)
        return (pred & gt).sum(1).float(), pred.sum(1).float(), gt.sum(1).float()
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    return int(np.logical_and(pred, gt).sum()), int(pred.sum()), int(gt.sum())


def dice_score(pred, gt):
    """Dice of two binary masks: a float for numpy (H, W), a (B,) tensor for torch (B, ...)."""
    return dice_from_counts(*overlap_counts(pred, gt))


def iou_score(pred, gt):
    """IoU of two binary masks: a float for numpy (H, W), a (B,) tensor for torch (B, ...)."""
    return iou_from_counts(*overlap_counts(pred, gt))


class DiceTable:
    """Accumulates slice Dice and volume overlaps per (row, organ) and turns them into tables; a row is a
    prompt type (Tasks 1-3) or a model name (the baselines).

    Slice Dice per organ = mean over the slices where the organ is in the ground truth; mDice = mean
    of per-organ Dice over organs present. Volume Dice: per organ and case on the stacked slices,
    then the mean over cases.
    """

    def __init__(self):
        self.slice_dice = {}  # (prompt, organ) -> list of Dice
        self.volume = {}  # (prompt, organ, case) -> [intersection, pred sum, gt sum]
        self.decoder_seconds = 0.0  # time spent in decoder forward passes while filling the table

    def add(self, prompt: str, organ: int, case: str, pred: np.ndarray, gt: np.ndarray) -> float:
        inter, ps, gs = overlap_counts(pred, gt)
        d = dice_from_counts(inter, ps, gs)
        self.slice_dice.setdefault((prompt, organ), []).append(d)
        acc = self.volume.setdefault((prompt, organ, case), [0, 0, 0])
        acc[0] += inter
        acc[1] += ps
        acc[2] += gs
        return d

    def prompts(self):
        """The table's rows: prompt types in the report's order, then other keys (model names) as added."""
        return report_order(dict.fromkeys(k[0] for k in self.slice_dice))

    def per_organ(self) -> dict:
        out = {}
        for (prompt, organ), values in sorted(self.slice_dice.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            out.setdefault(prompt, {})[organ_name(organ)] = float(np.mean(values))
        return {p: dict(sorted(out[p].items(), key=lambda kv: ORGAN_ID[kv[0]])) for p in self.prompts()}

    def mdice(self) -> dict:
        return {p: float(np.mean(list(v.values()))) for p, v in self.per_organ().items()}

    def volume_dice(self) -> dict:
        per = {}
        for (prompt, organ, _case), (inter, ps, gs) in self.volume.items():
            per.setdefault((prompt, organ), []).append(dice_from_counts(inter, ps, gs))
        out = {p: {} for p in self.prompts()}
        for (prompt, organ), values in sorted(per.items(), key=lambda kv: kv[0][1]):
            out[prompt][organ_name(organ)] = float(np.mean(values))
        return out

    def counts(self) -> dict:
        return {organ_name(o): len(v) for (p, o), v in sorted(self.slice_dice.items(), key=lambda kv: kv[0][1])
                if p == self.prompts()[0]}


def report_order(keys) -> list:
    """Table keys: prompt types in the report's order, then any other keys (model names) in their order."""
    keys = list(keys)
    return [p for p in PROMPT_TYPES if p in keys] + [k for k in keys if k not in PROMPT_TYPES]


def per_organ_markdown(per_organ: dict, title: str) -> str:
    """Markdown table: one row per organ, one column per key of `per_organ` ({column: {organ: Dice}}):
    prompt types in the report's order, then other keys (model names) as given."""
    columns = report_order(per_organ)
    organs = [o for o in ORGANS if any(o in per_organ[c] for c in columns)]
    rows = [[o] + [per_organ[c].get(o) for c in columns] for o in organs]
    return f"{title}\n\n" + markdown_table(["organ"] + columns, rows)


# ----------------------------------------------------------------------------------------------
# Slices written by preprocess.py
def load_preprocess_params(slices_dir) -> dict:
    """The parameters preprocess.py used (HU window, orientation, split), read back from disk."""
    slices_dir = Path(slices_dir)
    if not slices_dir.is_dir():
        raise PipelineError(f"slices folder {slices_dir} does not exist; run preprocess.py --out-dir {slices_dir} first")
    return read_json(slices_dir / PREPROCESS_FILE, what="preprocessing record (run preprocess.py first)")


class SliceSet:
    """The 2D slices of one split: ``SLICES/<split>/manifest.json`` plus one ``.npz`` per slice.

    ``records[i]`` = ``{"file", "case", "z", "height", "width", "organs": {organ_id(str): {"area", "bbox"}}}``
    with ``bbox`` XYXY inclusive. ``items`` lists every (slice index, organ id) pair, in slice order.
    """

    def __init__(self, slices_dir, split: str):
        self.root = Path(slices_dir)
        self.split = split
        self.params = load_preprocess_params(slices_dir)
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        manifest = read_json(self.root / split / MANIFEST_FILE, what=f"{split} manifest")
        self.records = manifest["slices"]
        self.items = [(i, int(o)) for i, r in enumerate(self.records) for o in sorted(r["organs"], key=int)]

    def __len__(self):
        return len(self.records)

    @property
    def signature(self) -> str:
        """Identity of this split's slices: changes when they are written again or differ (keys the
        embedding cache, and tells whether a saved table was computed on these slices)."""
        text = json.dumps([self.params.get("created_id"), [(r["file"], r["height"], r["width"]) for r in self.records]])
        return f"{self.params.get('created_id')}-{zlib.crc32(text.encode()):08x}"

    def path(self, i: int) -> Path:
        return self.root / self.split / self.records[i]["file"]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W), label uint8 (H, W)) of slice i."""
        with np.load(self.path(i)) as npz:
            return npz["image"], npz["label"]

    def load_label(self, i: int) -> np.ndarray:
        with np.load(self.path(i)) as npz:
            return npz["label"]
