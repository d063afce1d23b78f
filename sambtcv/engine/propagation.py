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

The walk itself (between anchors, with z ranges and convergence) is `sambtcv.engine.walks`; this module holds
its parts: the decoder of one volume, the next slice's box, the stop rules, the merge.

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

from sambtcv.core.device import autocast
from sambtcv.core.metrics import iou_score
from sambtcv.core.prompts import Prompt, bound_box, grow_box
from sambtcv.models.backbones import Backbone
from sambtcv.models.decoder import PromptedDecoder, pick
from sambtcv.models.embeddings import EmbeddingCache, folder_name

MIN_AREA = 3  # pixels: a smaller mask counts as vanished
STOP_RULES = {
    "intensity": "the mask vanishes, or under half of its pixels lie in the organ's intensity range (5th-95th "
                 "percentile on the prompted slice)",
    "vanish": "the mask vanishes (under MIN_AREA pixels)",
    "iou": "the mask vanishes, or the decoder's predicted IoU falls under IOU_FLOOR",
    "overlap": "the mask vanishes, or it overlaps the previous slice's mask by less than OVERLAP_FLOOR (IoU)",
    "adaptive": "the mask vanishes, or under half of its pixels lie in the organ's intensity range as the walk "
                "has seen it on the last slices it kept",
    "continuity": "as 'intensity', except where the mask keeps the previous one's shape and place (area within "
                  "CONTINUITY_AREA, at least CONTINUITY_INSIDE of it inside the previous mask, predicted IoU at "
                  "least AGREE_IOU_FLOOR): an organ whose look changes (a lesion) is followed, not dropped",
    "agree": "the mask vanishes, or at least two signals fail at once (intensity as 'adaptive', area change, "
             "overlap with the previous mask, predicted IoU); one failing signal marks the slice unsure",
}
IOU_FLOOR = 0.5
OVERLAP_FLOOR = 0.2
INTENSITY_PERCENTILES = (5, 95)  # the organ's intensity range, from its mask on the prompted slice
INTENSITY_FLOOR = 0.5  # fraction of a new mask's pixels that must lie in that range
RECENT_SLICES = 3  # 'adaptive' / 'agree': the intensity range comes from the masks of the last kept slices
AREA_RATIO_LIMIT = 2.5  # 'agree': a mask this many times larger or smaller than the previous one is a jump
INSIDE_FLOOR = 0.6  # 'agree': fraction of the new mask that must lie inside the previous mask (+ margin)
AGREE_IOU_FLOOR = 0.6  # 'agree': predicted IoU under this fails
SIGNALS = ("intensity", "area", "overlap", "iou")  # the signals 'agree' weighs
CONTINUITY_AREA = (0.75, 1.33)  # 'continuity': area ratio (new / previous) of a mask that keeps its shape
CONTINUITY_INSIDE = 0.85  # 'continuity': fraction of the new mask inside the previous mask (+ margin)


@dataclass
class SliceMask:
    """One organ's prediction on one slice: binary mask and mask logits (H, W), predicted IoU, and the
    decoder's low-res logits (LOWRES, LOWRES) it came from (None for a mask not decoded: painted, a
    reference label), which SAM takes back as `mask_input` to refine it."""

    mask: np.ndarray
    logits: np.ndarray
    iou: float
    lowres: np.ndarray | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Candidates:
    """SAM's masks for one prompt on one slice (`VolumeDecoder.candidates`) and the index of the one
    `VolumeDecoder.decode` keeps (by config.POINT_MASK; 0 for a box)."""

    masks: list  # [SliceMask]
    kept: int


@dataclass
class Stop:
    """Where and why a walk ended in one direction: `k` is the last slice it kept (the start slice when it
    kept none), `direction` +1 (superior) or -1 (inferior), `reason` one of STOP_REASONS."""

    k: int
    direction: int
    reason: str


STOP_REASONS = {"edge": "reached the volume's first or last slice", "range": "reached the end of the 3D box",
                "vanished": "the mask vanished", "intensity": "the mask left the organ's intensity range",
                "iou": "the decoder's predicted IoU fell", "overlap": "the mask stopped overlapping the previous one",
                "empty": "the prompted slice's mask was empty", "anchor": "reached a slice the user gave (an anchor)",
                "converged": "the new mask agreed with the one there before",
                "joined": "reached the organ's masks (a click beyond its end joins them)"}


@dataclass
class Unsure:
    """A slice the walk kept although one of its signals failed (`signals`, names from SIGNALS)."""

    k: int
    signals: list


@dataclass
class OrganMasks:
    """An organ's predictions: slice index -> SliceMask, how many slices the walk visited, and where and
    why it stopped in each direction."""

    organ: int
    slices: dict = field(default_factory=dict)
    visited: int = 0
    stops: list = field(default_factory=list)
    unsure: list = field(default_factory=list)


def volume_identity(stack: np.ndarray) -> str:
    """Content key of a uint8 slice stack (what the image encoder sees)."""
    digest = hashlib.sha256(repr(stack.shape).encode())
    digest.update(np.ascontiguousarray(stack).tobytes())
    return digest.hexdigest()[:24]


class VolumeDecoder:
    """Decode prompts on any slice of one volume; slices are encoded on first use and cached on disk."""

    def __init__(self, stack: np.ndarray, backbone: Backbone, decoder: PromptedDecoder, cache_dir, device,
                 dtype: str = "fp32", encoder_dtype: str = "fp32", runtime=None):
        self.stack, self.backbone, self.decoder = stack, backbone, decoder.eval()
        self.device, self.dtype = device, dtype
        self.frame = backbone.frame
        key = volume_identity(stack)  # one folder (and lock) per volume: runs on other CTs never wait for it
        self.cache = EmbeddingCache(Path(cache_dir) / folder_name(backbone, encoder_dtype, runtime) / key, "slices",
                                    len(stack), lambda k: self.stack[k], backbone, encoder_dtype, key,
                                    "volume embedding cache", runtime)
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
    def blended(self, a: int, b: int, t: float) -> torch.Tensor:
        """An embedding (1, 256, E, E) for a slice between slices a and b that is not encoded: theirs mixed
        linearly, `t` in [0, 1] from a to b."""
        return (1.0 - t) * self.embedding(a) + t * self.embedding(b)

    def _outputs(self, k: int, prompt: Prompt, mask_input=None, embedding=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's low-res masks (1, M, L, L) and predicted IoUs (1, M) for one prompt on slice k.
        Points alone: multimask output (M = 3); a box, with or without points: single mask (M = 1).
        `mask_input` (L, L): earlier low-res logits of this slice, SAM's dense prompt. `embedding`: use this
        instead of slice k's own (`blended`)."""
        p = self.frame.prompt(prompt, self.hw)
        emb = self.embedding(k) if embedding is None else embedding

        def batch(a) -> torch.Tensor:
            return torch.tensor(np.asarray(a)[None], dtype=torch.float32, device=self.device)

        extra = {} if mask_input is None else {"mask_input": batch(np.asarray(mask_input)[None])}
        points = {} if p.points is None else {"points": batch(p.points), "point_labels": batch(prompt.point_labels())}
        with autocast(self.device, self.dtype):
            if p.box is not None:
                masks, iou = self.decoder(emb, boxes=batch(p.box), **points, **extra)
            else:
                masks, iou = self.decoder(emb, multimask=True, **points, **extra)
        return masks.float(), iou.float()

    @torch.no_grad()
    def decode(self, k: int, prompt: Prompt, mask_input=None, embedding=None) -> SliceMask:
        """The mask of one prompt (slice frame) on slice k. Points alone: multimask output, the mask that
        config.POINT_MASK keeps (`sambtcv.models.decoder.pick`); a box (with or without points): single mask.
        `embedding`: decode on it instead of slice k's own (`blended`: a slice not encoded)."""
        masks, iou = self._outputs(k, prompt, mask_input, embedding)
        keep = int(pick(masks, iou)[0])
        logits = self.frame.to_slice(masks[:, keep], self.hw)[0].cpu().numpy()
        return SliceMask(mask=logits > 0, logits=logits, iou=float(iou[0, keep]), lowres=masks[0, keep].cpu().numpy())

    @torch.no_grad()
    def candidates(self, k: int, prompt: Prompt, mask_input=None) -> Candidates:
        """Every mask the decoder gives for one prompt on slice k, in its order (points: SAM's three,
        boxes: one), each with its predicted IoU (the viewer lets a user pick among them), and the one
        `decode` keeps."""
        masks, iou = self._outputs(k, prompt, mask_input)
        logits = self.frame.to_slice(masks[0], self.hw).cpu().numpy()
        return Candidates([SliceMask(mask=lg > 0, logits=lg, iou=float(v), lowres=low.cpu().numpy())
                           for lg, v, low in zip(logits, iou[0], masks[0])], int(pick(masks, iou)[0]))


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


@dataclass
class SliceCheck:
    """The signals of one visited slice: which fail (SIGNALS), and the values behind them."""

    failing: list
    values: dict


class WalkState:
    """What a walk knows about its organ: the intensity range (frozen on the prompted slice, or from the
    last kept slices) and the previous kept mask."""

    def __init__(self, image: np.ndarray, first: SliceMask, rule: str, margin: float):
        self.rule, self.margin = rule, margin
        self.recent = [image[first.mask]]
        self.frozen = np.percentile(self.recent[0], INTENSITY_PERCENTILES)

    @property
    def organ_range(self):
        if self.rule in ("adaptive", "agree"):
            return np.percentile(np.concatenate(self.recent[-RECENT_SLICES:]), INTENSITY_PERCENTILES)
        return self.frozen

    def keep(self, image: np.ndarray, mask: SliceMask) -> None:
        self.recent = [*self.recent[-(RECENT_SLICES - 1):], image[mask.mask]]

    def check(self, prev: SliceMask, new: SliceMask, image: np.ndarray) -> SliceCheck:
        lo, hi = self.organ_range
        values = image[new.mask]
        inside = float(((values >= lo) & (values <= hi)).mean())
        grown = ndimage.binary_dilation(prev.mask, iterations=max(int(round(self.margin)), 1))
        within = float((new.mask & grown).sum()) / max(new.area, 1)
        ratio = new.area / max(prev.area, 1)
        vals = {"intensity": inside, "area_ratio": ratio, "inside_previous": within, "iou": new.iou,
                "overlap_iou": float(iou_score(new.mask, prev.mask))}
        failing = [name for name, bad in (
            ("intensity", inside < INTENSITY_FLOOR),
            ("area", ratio > AREA_RATIO_LIMIT or ratio < 1 / AREA_RATIO_LIMIT),
            ("overlap", within < INSIDE_FLOOR), ("iou", new.iou < AGREE_IOU_FLOOR)) if bad]
        return SliceCheck(failing, vals)

    def stop_reason(self, prev: SliceMask, new: SliceMask, image: np.ndarray) -> tuple[str | None, SliceCheck | None]:
        """Why the walk ends at `new` (None: it goes on), and the slice's signals (a kept slice with a failing
        signal is marked unsure, whatever the rule)."""
        if new.area < MIN_AREA:
            return "vanished", None
        check = self.check(prev, new, image)
        v = check.values
        if self.rule == "agree":
            return ("+".join(check.failing) if len(check.failing) >= 2 else None), check
        intensity_fails = v["intensity"] < INTENSITY_FLOOR
        if self.rule == "continuity":
            kept_shape = (CONTINUITY_AREA[0] <= v["area_ratio"] <= CONTINUITY_AREA[1]
                          and v["inside_previous"] >= CONTINUITY_INSIDE and v["iou"] >= AGREE_IOU_FLOOR)
            return ("intensity" if intensity_fails and not kept_shape else None), check
        fails = {"iou": v["iou"] < IOU_FLOOR, "overlap": v["overlap_iou"] < OVERLAP_FLOOR,
                 "intensity": intensity_fails, "adaptive": intensity_fails}  # 'vanish': only the empty mask
        if fails.get(self.rule, False):
            return ("intensity" if self.rule == "adaptive" else self.rule), check
        return None, check


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
