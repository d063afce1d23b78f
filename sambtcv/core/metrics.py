"""The one Dice and IoU (numpy and torch), the table that accumulates them per organ, and HD95.

Dice = 2|A n B| / (|A| + |B|) on binary masks at the slice's own resolution. Two empty masks agree
perfectly (1.0); that case never reaches the tables, which score only organs in the ground truth.
"""
from __future__ import annotations

import numpy as np
import torch

from sambtcv.core.files import markdown_table
from sambtcv.core.names import ORGAN_ID, ORGANS, organ_name, report_order


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
        return self.add_counts(prompt, organ, case, *overlap_counts(pred, gt))

    def add_counts(self, prompt: str, organ: int, case: str, inter: int, ps: int, gs: int) -> float:
        """Add one (slice, organ) pair from its overlap counts (|A n B|, |A|, |B|); returns its Dice."""
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


def per_organ_markdown(per_organ: dict, title: str) -> str:
    """Markdown table: one row per organ, one column per key of `per_organ` ({column: {organ: Dice}}):
    prompt types in the report's order, then other keys (model names) as given."""
    columns = report_order(per_organ)
    organs = [o for o in ORGANS if any(o in per_organ[c] for c in columns)]
    rows = [[o] + [per_organ[c].get(o) for c in columns] for o in organs]
    return f"{title}\n\n" + markdown_table(["organ"] + columns, rows)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float | None:
    """95th-percentile Hausdorff distance in mm (MONAI) of two (K, H, W) masks with `spacing` = (row,
    column, slice) mm; None when the prediction or the ground truth is empty."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not gt.any():
        return None
    value = compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None]),
                                       percentile=95, spacing=[spacing[2], spacing[0], spacing[1]])
    return float(value.item())
