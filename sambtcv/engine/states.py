"""Organ states kept between the steps of `predict_segfm.py`, so that a step in a new process applies only
the click it adds.

The challenge runs a submission once per step, in a new container: step n gets the 3D box and the n - 1
clicks so far, and must answer as one long session would. Replaying the box's walk and every click each
time costs seconds per organ; instead each step saves every class's `sambtcv.engine.anchors.OrganState` under a
key of everything it depends on (the engine's settings and code, the volume's content, the class, its box
and its clicks in order), and the next step starts from the longest saved prefix of its clicks.

A state is an .npz without pickles: per slice its mask (packed bits), its logits where the mask holds
(merge reads no others), its predicted IoU and its low-res logits (SAM's mask prompt for a later click);
the anchors, stops and the rest as JSON. A file that cannot be read counts as missing (the step replays).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sambtcv.engine.anchors import OrganState, SlicePrompt
from sambtcv.engine.propagation import SliceMask, Stop, Unsure

FORMAT = 1
OUTSIDE_LOGIT = -1.0  # a loaded mask's logits outside it (never read: merge and edits read them inside)


def state_key(settings: str, volume: str, organ: int, box, clicks: list) -> str:
    """The key of one class's state: the engine's `settings` (models, rules, code), the `volume`'s content
    key, the class, its box (`sambtcv.engine.segfm.Box3D` or None) and its clicks so far
    (`sambtcv.engine.segfm.Click`)."""
    given = {"settings": settings, "volume": volume, "organ": int(organ), "format": FORMAT,
             "box": None if box is None else box.to_dict(),
             "clicks": [[c.z, c.y, c.x, bool(c.positive)] for c in clicks]}
    return hashlib.sha256(json.dumps(given, sort_keys=True, default=int).encode()).hexdigest()[:32]


def to_bytes(state: OrganState) -> bytes:
    arrays, ious = {}, {}
    for k, sm in state.slices.items():
        arrays[f"mask_{k}"] = np.packbits(sm.mask, axis=None)
        arrays[f"logits_{k}"] = sm.logits[sm.mask].astype(np.float32)
        if sm.lowres is not None:
            arrays[f"lowres_{k}"] = np.asarray(sm.lowres, np.float32)
        ious[str(k)] = float(sm.iou)
    shape = next(iter(state.slices.values())).mask.shape if state.slices else (0, 0)
    meta = {"organ": state.organ, "shape": list(shape), "ious": ious,
            "anchors": {str(k): asdict(sp) for k, sp in state.anchors.items()},
            "z_range": state.z_range, "xy_limit": state.xy_limit, "walked": state.walked, "pending": state.pending,
            "stops": [asdict(s) for s in state.stops], "unsure": [asdict(u) for u in state.unsure],
            "visited": state.visited}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def from_bytes(data: bytes) -> OrganState:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        h, w = meta["shape"]
        slices = {}
        for k_text, iou in meta["ious"].items():
            k = int(k_text)
            mask = np.unpackbits(z[f"mask_{k}"], count=h * w).astype(bool).reshape(h, w)
            logits = np.full((h, w), OUTSIDE_LOGIT, np.float32)
            logits[mask] = z[f"logits_{k}"]
            lowres = z[f"lowres_{k}"] if f"lowres_{k}" in z.files else None
            slices[k] = SliceMask(mask, logits, iou, lowres)
    anchors = {int(k): SlicePrompt(box=None if v["box"] is None else tuple(v["box"]),
                                   points=tuple(tuple(p) for p in v["points"]), labels=tuple(v["labels"]),
                                   painted=v["painted"], carried=v.get("carried", False))
               for k, v in meta["anchors"].items()}
    return OrganState(meta["organ"], slices, anchors, None if meta["z_range"] is None else tuple(meta["z_range"]),
                      None if meta["xy_limit"] is None else tuple(meta["xy_limit"]), meta["walked"], meta["pending"],
                      tuple(Stop(**s) for s in meta["stops"]), tuple(Unsure(**u) for u in meta["unsure"]),
                      meta["visited"])


class StateStore:
    """Saved states in one folder, by key (`state_key`)."""

    def __init__(self, root):
        self.root = Path(root)

    def get(self, key: str) -> OrganState | None:
        path = self.root / f"{key}.npz"
        try:
            return from_bytes(path.read_bytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, TypeError, EOFError):
            return None  # missing or damaged: the step replays instead

    def put(self, key: str, state: OrganState) -> None:
        from sambtcv.core.files import write_bytes

        self.root.mkdir(parents=True, exist_ok=True)
        write_bytes(self.root / f"{key}.npz", to_bytes(state))

    def drop(self, key: str) -> None:
        (self.root / f"{key}.npz").unlink(missing_ok=True)
