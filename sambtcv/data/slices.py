"""The 2D slices that preprocess.py writes: their parameters (preprocess.json) and one split's slices."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.core.files import read_json
from sambtcv.core.names import NUM_ORGANS, SPLITS, check_choice

PREPROCESS_FILE = "preprocess.json"  # written by preprocess.py next to the slices
MANIFEST_FILE = "manifest.json"


def load_preprocess_params(slices_dir) -> dict:
    """The parameters preprocess.py used (HU window, orientation, split), read back from disk."""
    slices_dir = Path(slices_dir)
    if not slices_dir.is_dir():
        raise PipelineError(f"slices folder {slices_dir} does not exist; run preprocess.py --out-dir {slices_dir} "
                            f"first")
    return read_json(slices_dir / PREPROCESS_FILE, what="preprocessing record (run preprocess.py first)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record(r) -> bool:
    """A manifest entry as preprocess.py writes it (file, case, z, size, organs with area and XYXY box)."""
    if not (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("case"), str)
            and "/" not in r["file"] and "\0" not in r["file"] and r["file"] not in ("", ".", "..")
            and all(_is_int(r.get(k)) and r[k] >= 0 for k in ("z", "height", "width"))
            and isinstance(r.get("organs"), dict) and r["organs"]):
        return False
    for organ, stats in r["organs"].items():
        if not (isinstance(organ, str) and organ.isdigit() and 1 <= int(organ) <= NUM_ORGANS
                and isinstance(stats, dict) and _is_int(stats.get("area"))
                and isinstance(stats.get("bbox"), list) and len(stats["bbox"]) == 4
                and all(_is_int(v) for v in stats["bbox"])):
            return False
    return True


def check_manifest(manifest, path) -> list:
    """The slice records of a manifest.json; one line when it is not what preprocess.py writes."""
    records = manifest.get("slices") if isinstance(manifest, dict) else None
    if not isinstance(records, list) or not all(_check_record(r) for r in records):
        raise PipelineError(f"{path} is not a manifest that preprocess.py writes (edited or damaged?); run "
                            f"preprocess.py again")
    return records


class SliceSet:
    """The 2D slices of one split: ``SLICES/<split>/manifest.json`` plus one ``.npz`` per slice.

    ``records[i]`` = ``{"file", "case", "z", "height", "width", "organs": {organ_id(str): {"area", "bbox"}}}``
    with ``bbox`` XYXY inclusive. ``items`` lists every (slice index, organ id) pair, in slice order.
    """

    def __init__(self, slices_dir, split: str):
        self.root = Path(slices_dir)
        self.split = split
        self.params = load_preprocess_params(slices_dir)
        check_choice(split, SPLITS, "split")
        path = self.root / split / MANIFEST_FILE
        self.records = check_manifest(read_json(path, what=f"{split} manifest"), path)
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
