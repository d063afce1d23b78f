"""Shared pieces of the sam-btcv scripts: names, configuration, prompts, Dice, slices, safe writes.

Everything that two task scripts need lives here (models and the embedding cache live beside it in
`sam_models.py`). Conventions used throughout:

* A 2D slice is an ``(H, W)`` ``uint8`` image (the HU window of `preprocess.py` mapped to 0..255)
  with an ``(H, W)`` ``uint8`` label of BTCV ids 0..13, at the slice's own in-plane size.
* Points are ``(N, 2)`` arrays of ``(x, y)`` = (column, row) pixel coordinates; boxes are XYXY
  ``(x0, y0, x1, y1)`` with inclusive pixel coordinates. Both are in the original slice frame until
  `sam_models` maps them into a model's input frame.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

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


class PipelineError(Exception):
    """A user-facing problem: printed as one line by `run_main`, exit status 2."""


def run_main(main) -> None:
    """Run a script's main(); PipelineError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def organ_name(organ_id: int) -> str:
    assert 1 <= organ_id <= NUM_ORGANS, f"organ id {organ_id} outside 1..{NUM_ORGANS}"
    return ORGANS[organ_id - 1]


# ----------------------------------------------------------------------------------------------
# Configuration: UPPER_CASE constants at the top of each script, overridable from the command line
def parse_config(module_globals: dict, argv=None) -> dict:
    """Turn a script's own top-level UPPER_CASE constants into command-line flags; return the config.

    The constants are those assigned at the top level of the script file itself (imported names do
    not count). ``DATA_DIR = None`` becomes ``--data-dir``; a bool constant becomes a flag that may be
    given bare (``--resume``) or with a value (``--resume false``). Types follow the default's type;
    constants whose default is None are read as strings. Returns ``{lower_case_name: value}``.
    """
    import re

    source = Path(module_globals["__file__"]).read_text()
    names = re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", source, flags=re.M)
    defaults = {n: module_globals[n] for n in dict.fromkeys(names)
                if isinstance(module_globals[n], (bool, int, float, str, type(None)))}
    doc = (module_globals.get("__doc__") or "").strip()
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, value in defaults.items():
        flag = "--" + key.lower().replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=key, nargs="?", const=True, default=value, type=_str2bool)
        elif value is None:
            parser.add_argument(flag, dest=key, default=None, type=str)
        else:
            parser.add_argument(flag, dest=key, default=value, type=type(value))
    args = parser.parse_args(argv)
    return {k.lower(): getattr(args, k) for k in defaults}


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def tune_allocator() -> None:
    """Keep freed tensor memory in the process instead of returning it to the OS after every op.

    On this project's 2-core VMs, glibc's default of mmap/munmap for every large tensor made page
    faults the main cost: the LiteMedSAM encoder took 1.35 s per slice by default and 0.71 s with this
    (bench.py measures it). No effect on results.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 33)
        libc.mallopt(m_top_pad, 1 << 28)


PRECISIONS = ("fp32", "bf16")  # values of --dtype (decoder) and --encoder-dtype (encoder pass)


def start_run(cfg: dict) -> torch.device:
    """What every script does first: check the precision flags (before any work), allocator tuning,
    seeds, device."""
    for key in ("dtype", "encoder_dtype"):
        if key in cfg:
            check_precision(cfg[key], "--" + key.replace("_", "-"))
    tune_allocator()
    seed_everything(cfg["seed"])
    return pick_device(cfg.get("device"))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    """'cuda' when present unless told otherwise; asking for cuda without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown --device {name!r}; use cpu or cuda")
    return torch.device(name)


def check_precision(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in PRECISIONS:
        raise PipelineError(f"unknown {flag} {dtype!r}; use {' or '.join(PRECISIONS)}")


def autocast(device: torch.device, dtype: str):
    """Context for the model's forward passes: bf16 autocast when dtype == 'bf16', else nothing."""
    check_precision(dtype)
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Writing files: always to a temporary name in the same folder, then an atomic rename
def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path, header, rows) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def torch_save(obj, path) -> Path:
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure atomically (PNG) and close it."""
    import matplotlib.pyplot as plt

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return _atomic_write(path, write)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def staged_dir(final):
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` whole.

    On any error the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read {what} {path}: {exc}") from exc


def markdown_table(header, rows, floatfmt: str = "{:.4f}") -> str:
    """A GitHub Markdown table; floats formatted with `floatfmt`, None shown as '-'."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if v != v else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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


def larger_box(mask: np.ndarray, margin: int = BOX_MARGIN) -> np.ndarray:
    """The bound box moved out by `margin` pixels on each side, clipped to the image."""
    h, w = mask.shape
    x0, y0, x1, y1 = bound_box(mask)
    return np.array([max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, w - 1),
                     min(y1 + margin, h - 1)], dtype=np.float64)


def make_prompt(mask: np.ndarray, prompt_type: str, rng: np.random.Generator) -> dict:
    """Prompt of `prompt_type` for a non-empty binary (H, W) mask, in the slice frame.

    Returns ``{"points": (n, 2) XY or None, "box": (4,) XYXY or None}``; all point labels are
    foreground.
    """
    if prompt_type == "one_central_point":
        return {"points": central_point(mask), "box": None}
    if prompt_type in POINT_PROMPTS:
        return {"points": random_points(mask, POINT_PROMPTS[prompt_type], rng), "box": None}
    if prompt_type == "bound_box":
        return {"points": None, "box": bound_box(mask)}
    if prompt_type == "larger_box":
        return {"points": None, "box": larger_box(mask)}
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
# Dice
def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|A n B| / (|A| + |B|) of two binary masks; 1.0 when both are empty."""
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


class DiceTable:
    """Accumulates slice Dice and volume overlaps per (prompt, organ) and turns them into tables.

    Slice Dice per organ = mean over the slices where the organ is in the ground truth; mDice = mean
    of per-organ Dice over organs present. Volume Dice: per organ and case on the stacked slices,
    then the mean over cases.
    """

    def __init__(self):
        self.slice_dice = {}  # (prompt, organ) -> list of Dice
        self.volume = {}  # (prompt, organ, case) -> [intersection, pred sum, gt sum]
        self.decoder_seconds = 0.0  # time spent in decoder forward passes while filling the table

    def add(self, prompt: str, organ: int, case: str, pred: np.ndarray, gt: np.ndarray) -> float:
        pred = pred.astype(bool)
        gt = gt.astype(bool)
        inter, ps, gs = int(np.logical_and(pred, gt).sum()), int(pred.sum()), int(gt.sum())
        d = 2.0 * inter / (ps + gs) if ps + gs else 1.0
        self.slice_dice.setdefault((prompt, organ), []).append(d)
        acc = self.volume.setdefault((prompt, organ, case), [0, 0, 0])
        acc[0] += inter
        acc[1] += ps
        acc[2] += gs
        return d

    def prompts(self):
        return [p for p in PROMPT_TYPES if any(k[0] == p for k in self.slice_dice)]

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
            per.setdefault((prompt, organ), []).append(2.0 * inter / (ps + gs) if ps + gs else 1.0)
        out = {p: {} for p in self.prompts()}
        for (prompt, organ), values in sorted(per.items(), key=lambda kv: kv[0][1]):
            out[prompt][organ_name(organ)] = float(np.mean(values))
        return out

    def counts(self) -> dict:
        return {organ_name(o): len(v) for (p, o), v in sorted(self.slice_dice.items(), key=lambda kv: kv[0][1])
                if p == self.prompts()[0]}


def per_organ_markdown(per_organ: dict, title: str) -> str:
    """Markdown table: one row per organ, one column per prompt type."""
    prompts = [p for p in PROMPT_TYPES if p in per_organ]
    organs = [o for o in ORGANS if any(o in per_organ[p] for p in prompts)]
    rows = [[o] + [per_organ[p].get(o) for p in prompts] for o in organs]
    return f"{title}\n\n" + markdown_table(["organ"] + prompts, rows)


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
        """Changes when the slices change (used to key the embedding cache)."""
        text = json.dumps([self.params.get("created_id"), [(r["file"], r["height"], r["width"]) for r in self.records]])
        return f"{zlib.crc32(text.encode()):08x}"

    def path(self, i: int) -> Path:
        return self.root / self.split / self.records[i]["file"]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W), label uint8 (H, W)) of slice i."""
        with np.load(self.path(i)) as npz:
            return npz["image"], npz["label"]

    def load_label(self, i: int) -> np.ndarray:
        with np.load(self.path(i)) as npz:
            return npz["label"]

    def organs_present(self) -> list[int]:
        return sorted({o for _, o in self.items})


# ----------------------------------------------------------------------------------------------
# The report's own numbers (SAM ViT-H on BTCV), quoted beside ours
REPORT_ZERO_SHOT = {"one_central_point": 0.6124, "one_random_point": 0.5929, "three_random_points": 0.6437,
                    "bound_box": 0.8649, "larger_box": 0.8267}
REPORT_FINETUNED = {"one_central_point": 0.8556, "one_random_point": 0.8535, "three_random_points": 0.8532,
                    "bound_box": 0.9158, "larger_box": 0.9161}
