"""3D from a 2D model: one prompt per organ, propagated slice by slice through a CT volume.

A volume here is a stack of axial slices in the frame `preprocess.py` writes slices in: ``(K, H, W)``
with ``stack[k] = preprocess.axial_slice(volume, k)`` (rows = 2nd axis, columns = 1st axis of the
reoriented volume). The rule, from an organ's prompted slice outward in both directions:

* the next slice's prompt is the box of the previous slice's mask (its largest connected part, holes
  filled), enlarged by MARGIN pixels on each side and clipped to the image;
* the walk stops by a rule that needs no ground truth (`STOP_RULES`; the default, "intensity", stops
  when most of the new mask does not look like the organ on its prompted slice: a box prompt makes
  SAM outline *something* even where the organ has ended);
* overlaps between organs go to the organ whose mask logit is highest at that pixel.

Each slice is encoded at most once per run, lazily (only slices the walk reaches), through an
`cache.EmbeddingCache` keyed by the volume's content, the model and the encoder dtype, in a folder of its
own (``CACHE_DIR/<model>-<dtype>/<volume>/``), so a run only locks the volume it is encoding.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cache import EmbeddingCache
from models import Backbone, PromptedDecoder, autocast, best_mask
from utils import Prompt, bound_box, grow_box, iou_score

MIN_AREA = 3  # pixels: a smaller mask counts as vanished
STOP_RULES = {
    "intensity": "the mask vanishes, or under half of its pixels lie in the organ's intensity range (5th-95th "
                 "percentile on the prompted slice)",
    "vanish": "the mask vanishes (under MIN_AREA pixels)",
    "iou": "the mask vanishes, or the decoder's predicted IoU falls under IOU_FLOOR",
    "overlap": "the mask vanishes, or it overlaps the previous slice's mask by less than OVERLAP_FLOOR (IoU)",
}
IOU_FLOOR = 0.5
OVERLAP_FLOOR = 0.2
INTENSITY_PERCENTILES = (5, 95)  # the organ's intensity range, from its mask on the prompted slice
INTENSITY_FLOOR = 0.5  # fraction of a new mask's pixels that must lie in that range


@dataclass
class SliceMask:
    """One organ's prediction on one slice: binary mask and mask logits (H, W), predicted IoU."""

    mask: np.ndarray
    logits: np.ndarray
    iou: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class OrganMasks:
    """An organ's predictions: slice index -> SliceMask, and how many slices the walk visited."""

    organ: int
    slices: dict = field(default_factory=dict)
    visited: int = 0


def volume_identity(stack: np.ndarray) -> str:
    """Content key of a uint8 slice stack (what the image encoder sees)."""
    digest = hashlib.sha256(repr(stack.shape).encode())
    digest.update(np.ascontiguousarray(stack).tobytes())
    return digest.hexdigest()[:24]


class VolumeDecoder:
    """Decode prompts on any slice of one volume; slices are encoded on first use and cached on disk."""

    def __init__(self, stack: np.ndarray, backbone: Backbone, decoder: PromptedDecoder, cache_dir, device,
                 dtype: str = "fp32", encoder_dtype: str = "fp32"):
        self.stack, self.backbone, self.decoder = stack, backbone, decoder.eval()
        self.device, self.dtype = device, dtype
        self.frame = backbone.frame
        key = volume_identity(stack)  # one folder (and lock) per volume: runs on other CTs never wait for it
        self.cache = EmbeddingCache(Path(cache_dir) / f"{backbone.key}-{encoder_dtype}" / key, "slices", len(stack),
                                    lambda k: self.stack[k], backbone, encoder_dtype, key, "volume embedding cache")
        self.encoder_passes = 0
        self.visited = set()

    @property
    def hw(self) -> tuple[int, int]:
        return self.stack.shape[1], self.stack.shape[2]

    def embedding(self, k: int) -> torch.Tensor:
        """Slice k's embedding (1, 256, E, E): encoded (or checked in the cache) on the first visit."""
        if k not in self.visited:
            self.encoder_passes += self.cache.fill(self.device, rows=[k], progress=False)
            self.visited.add(k)
        return torch.from_numpy(self.cache.read(k))[None].to(self.device)

    @torch.no_grad()
    def decode(self, k: int, prompt: Prompt, point_labels=None) -> SliceMask:
        """The mask of one prompt (slice frame) on slice k. Points: multimask output, best predicted IoU
        kept; boxes: single mask."""
        p = self.frame.prompt(prompt, self.hw)
        emb = self.embedding(k)
        with autocast(self.device, self.dtype):
            if p.points is not None:
                labels = np.ones(len(p.points)) if point_labels is None else np.asarray(point_labels, float)
                masks, iou = self.decoder(emb, points=torch.tensor(p.points[None], dtype=torch.float32, device=self.device),
                                          point_labels=torch.tensor(labels[None], dtype=torch.float32, device=self.device),
                                          multimask=True)
            else:
                masks, iou = self.decoder(emb, boxes=torch.tensor(p.box[None], dtype=torch.float32, device=self.device))
        logits = self.frame.to_slice(best_mask(masks.float(), iou.float()), self.hw)[0].cpu().numpy()
        return SliceMask(mask=logits > 0, logits=logits, iou=float(iou.float().max()))


def main_part(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask, holes filled."""
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=range(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def next_box(mask: np.ndarray, margin: float, limit=None) -> np.ndarray:
    """XYXY box of the mask's main part, enlarged by `margin` px on each side, clipped to the image (or to
    the XYXY `limit` inside it)."""
    h, w = mask.shape
    return grow_box(bound_box(main_part(mask)), margin, (0, 0, w - 1, h - 1) if limit is None else limit)


def should_stop(rule: str, prev: SliceMask, new: SliceMask, image: np.ndarray, organ_range) -> bool:
    """Whether the walk ends at `new` (on slice `image`), by `rule` (STOP_RULES)."""
    if new.area < MIN_AREA:
        return True
    if rule == "iou":
        return new.iou < IOU_FLOOR
    if rule == "overlap":
        return float(iou_score(new.mask, prev.mask)) < OVERLAP_FLOOR
    if rule == "intensity":
        values = image[new.mask]
        return float(((values >= organ_range[0]) & (values <= organ_range[1])).mean()) < INTENSITY_FLOOR
    return False


def propagate(dec: VolumeDecoder, organ: int, start: int, first: SliceMask, rule: str, margin: float,
              k_range=None, box_limit=None) -> OrganMasks:
    """Walk from slice `start` (whose mask is `first`) up and down the volume: each slice is prompted with
    the previous slice's box enlarged by `margin` pixels; stops by `rule`, at the volume's ends or outside
    `k_range` (inclusive). With `box_limit` (XYXY) boxes and masks stay inside it."""
    lo, hi = k_range if k_range is not None else (0, len(dec.stack) - 1)
    out = OrganMasks(organ, {}, 1)
    if box_limit is not None:
        first.mask &= box_mask(dec.hw, box_limit)
    if first.area < MIN_AREA:
        return out
    organ_range = np.percentile(dec.stack[start][first.mask], INTENSITY_PERCENTILES)
    out.slices[start] = first
    for step in (1, -1):
        prev, k = first, start + step
        while lo <= k <= hi:
            new = dec.decode(k, Prompt(box=next_box(prev.mask, margin, box_limit)))
            out.visited += 1
            if box_limit is not None:
                new.mask &= box_mask(dec.hw, box_limit)
            if should_stop(rule, prev, new, dec.stack[k], organ_range):
                break
            out.slices[k] = new
            prev, k = new, k + step
    return out


def box_mask(hw, box) -> np.ndarray:
    """(H, W) bool mask of an XYXY box (inclusive)."""
    out = np.zeros(hw, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return out


def merge(organs: list[OrganMasks], shape) -> np.ndarray:
    """(K, H, W) uint8 label map of BTCV ids: each pixel goes to the organ with the highest logit among
    those whose mask holds it."""
    labels = np.zeros(shape, np.uint8)
    best = np.full(shape, -np.inf, np.float32)
    for om in organs:
        for k, sm in om.slices.items():
            win = sm.mask & (sm.logits > best[k])
            labels[k][win] = om.organ
            best[k][win] = sm.logits[win]
    return labels
