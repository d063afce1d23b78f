"""The interactive protocol of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical
Image Segmentation" (SEGFM3D), and its file format, for `predict_segfm.py` and `interactive_eval.py`.

The protocol, as the challenge's public evaluation code runs it (JunMa11/CVPR-MedSegFMCompetition,
``get_boxes.py`` and ``CVPR25_iter_eval.py``; re-implemented here, none of it copied):

* step 1 gives each class a 3D box (`challenge_box`): ``z_min``, ``z_max``, the slice ``z_mid`` (the
  slice of the class's middle voxel, counting voxels in C order) and the class's 2D box there, each side
  moved out by 0-5 px per 256 px (one draw per class from a generator seeded with BOX_SEED);
* steps 2-6 each add one click per class (`next_click`): the voxel farthest from the background (the
  maximum of the Euclidean distance transform, ties broken by a generator seeded with CLICK_SEED) of the
  largest 26-connected error component of the previous prediction; foreground where the prediction
  misses the class there, background where it claims it wrongly;
* after each step: DSC and NSD at NSD_TOLERANCE_MM (MONAI's surface Dice; NSD counts as 0 where DSC <=
  NSD_MIN_DSC, as the challenge does); AUCs are the trapezoid areas over the five click steps.

Arrays are ``(D, H, W)``: ``imgs[z]`` is one slice, a point is ``(z, y, x)``; in the project's slice frame
that is slice k = z, row y, column x, so a 2D box is XYXY ``(x_min, y_min, x_max, y_max)``.

Files (`read_case`): the challenge's ``.npz`` with ``imgs`` (D, H, W) uint8, ``spacing`` (3,) mm in the
same axis order, optional ``boxes`` (one dict per class), ``clicks`` (one ``{"fg": [...], "bg": [...]}``
per class), ``clicks_order`` and ``prev_pred`` (D, H, W), and for evaluation ``gts``. ``boxes`` and
``clicks`` are pickled object arrays: they are read by an unpickler that admits only containers and
numbers (`SafeUnpickler`), so a crafted file runs no code.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from sambtcv.core.errors import PipelineError

BOX_SEED = 2025  # get_boxes.py seeds numpy's generator with this
BOX_JITTER = 6  # a side moves out by randint(0, BOX_JITTER) px per JITTER_SCALE px
JITTER_SCALE = 256
CLICK_SEED = 42  # the click generator is re-seeded with this before every draw
CLICK_STEPS = 5  # steps 2..6
NSD_TOLERANCE_MM = 2.0
NSD_MIN_DSC = 0.2  # at or under this DSC the challenge does not compute NSD and counts it as 0
EDT_PAD = 0.25  # the error component's crop is padded by this fraction of its size before the EDT
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
MAX_CLASSES = 255  # segs is uint8


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Box3D:
    """A class's 3D box: slices z_min..z_max (inclusive) and the XYXY box on slice z_mid."""

    z_min: int
    z_max: int
    z_mid: int
    box: tuple  # (x_min, y_min, x_max, y_max), inclusive pixels of slice z_mid

    @classmethod
    def from_dict(cls, d: dict, shape, what: str) -> Box3D:
        """From the challenge's dict, checked against the volume's (D, H, W) `shape`."""
        if not isinstance(d, dict) or set(BOX_KEYS) - set(d):
            raise PipelineError(f"{what} must be a dict with {', '.join(BOX_KEYS)}")
        v = {k: _whole(d[k], f"{what}[{k!r}]") for k in BOX_KEYS}
        depth, h, w = shape
        if not (0 <= v["z_min"] <= v["z_mid"] <= v["z_max"] < depth):
            raise PipelineError(f"{what} needs 0 <= z_min <= z_mid <= z_max < {depth}, got {v['z_min']}, "
                                f"{v['z_mid']}, {v['z_max']}")
        if not (0 <= v["z_mid_x_min"] <= v["z_mid_x_max"] < w and 0 <= v["z_mid_y_min"] <= v["z_mid_y_max"] < h):
            raise PipelineError(f"{what}'s 2D box lies outside the {w} x {h} slices or has x_max < x_min")
        return cls(v["z_min"], v["z_max"], v["z_mid"],
                   (v["z_mid_x_min"], v["z_mid_y_min"], v["z_mid_x_max"], v["z_mid_y_max"]))

    def to_dict(self) -> dict:
        x0, y0, x1, y1 = self.box
        return {"z_min": self.z_min, "z_max": self.z_max, "z_mid": self.z_mid, "z_mid_x_min": x0,
                "z_mid_y_min": y0, "z_mid_x_max": x1, "z_mid_y_max": y1}


@dataclass(frozen=True)
class Click:
    """One click: voxel (z, y, x); `positive` = the class is there (foreground), else background."""

    z: int
    y: int
    x: int
    positive: bool


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise PipelineError(f"{what} must be a whole number, got {type(value).__name__}")
    if not float(value).is_integer():
        raise PipelineError(f"{what} must be a whole number, got {value}")
    return int(value)


def challenge_box(gt: np.ndarray, rng: np.random.RandomState) -> Box3D:
    """The challenge's 3D box of a non-empty (D, H, W) class mask; `rng` draws the 2D box's jitter."""
    per_slice = gt.sum(axis=(1, 2))
    zs = np.flatnonzero(per_slice)
    # the slice of the middle voxel in C order (get_boxes.py's z_indices[len // 2]), not the middle slice
    z_mid = int(np.searchsorted(np.cumsum(per_slice), int(per_slice.sum()) // 2, side="right"))
    ys, xs = np.nonzero(gt[z_mid])
    h, w = gt.shape[1:]
    shift = int(rng.randint(0, BOX_JITTER, 1)[0])
    sx, sy = int(shift * w / JITTER_SCALE), int(shift * h / JITTER_SCALE)
    box = (max(0, int(xs.min()) - sx), max(0, int(ys.min()) - sy), min(w - 1, int(xs.max()) + sx),
           min(h - 1, int(ys.max()) + sy))
    return Box3D(int(zs[0]), int(zs[-1]), z_mid, box)


def next_click(gt: np.ndarray, seg: np.ndarray) -> Click | None:
    """The challenge's next click for one class: the centre of the largest 26-connected error component
    of `seg` against `gt` (both (D, H, W) bool); None when the prediction is exact."""
    error = gt != seg
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    component = labels == int(np.argmax(sizes))
    edt = _padded_edt(component) * component
    if not edt.any():
        edt = component.astype(float)
    peaks = np.argwhere(edt == edt.max())
    z, y, x = (int(v) for v in peaks[np.random.RandomState(CLICK_SEED).choice(len(peaks))])
    return Click(z, y, x, bool(gt[z, y, x]))


def _padded_edt(component: np.ndarray) -> np.ndarray:
    """EDT of the component in its bounding box padded by EDT_PAD of its size (at least 1 voxel) on each
    side, so the volume's border counts as background, as the challenge computes it."""
    coords = np.argwhere(component)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    pad = np.maximum(((hi - lo) * EDT_PAD).astype(int), 1)
    crop = np.pad(component[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], [(p, p) for p in pad])
    dist = ndimage.distance_transform_edt(crop)
    out = np.zeros(component.shape, float)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = dist[pad[0]:pad[0] + hi[0] - lo[0], pad[1]:pad[1] + hi[1] - lo[1],
                                                      pad[2]:pad[2] + hi[2] - lo[2]]
    return out


# ---------------------------------------------------------------------------------------------- scores
def dsc(gt: np.ndarray, seg: np.ndarray) -> float:
    """Dice of two (D, H, W) bool masks (1.0 when both are empty, as the challenge's)."""
    from sambtcv.core.metrics import dice_score

    if not gt.any() and not seg.any():
        return 1.0
    return float(dice_score(seg, gt))


def nsd(gt: np.ndarray, seg: np.ndarray, spacing, tolerance: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice at `tolerance` mm (MONAI's ``compute_surface_dice``, sub-voxel surfaces) of
    two (D, H, W) bool masks with voxel `spacing` (mm, same axis order); computed inside the box of both
    masks (with room for the tolerance), which gives the same value faster."""
    import torch
    from monai.metrics import compute_surface_dice

    both = gt | seg
    if not both.any():
        return 1.0
    if not gt.any() or not seg.any():
        return 0.0
    coords = np.argwhere(both)
    room = [int(np.ceil(tolerance / s)) + 2 for s in spacing]
    lo = np.maximum(coords.min(axis=0) - room, 0)
    hi = np.minimum(coords.max(axis=0) + 1 + np.array(room), gt.shape)
    cut = tuple(slice(a, b) for a, b in zip(lo, hi))

    def onehot(m):
        m = torch.from_numpy(np.ascontiguousarray(m[cut]))
        return torch.stack([~m, m])[None].float()

    value = compute_surface_dice(onehot(seg), onehot(gt), [tolerance], spacing=[float(s) for s in spacing],
                                 use_subvoxels=True)
    return float(value.reshape(-1)[0])


def auc(values: list[float]) -> float:
    """Area under the curve of the click steps' scores (the last CLICK_STEPS values), trapezoid rule with
    unit steps, as the challenge's DSC_AUC / NSD_AUC."""
    v = np.asarray(values[-CLICK_STEPS:], float)
    return float(((v[1:] + v[:-1]) / 2).sum())


# ---------------------------------------------------------------------------------------------- files
class SafeUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers (numpy object arrays and scalars included), nothing
    that names other code: a crafted ``boxes`` or ``clicks`` cannot run anything."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
               ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed here (only lists, dicts and numbers)")


def _npz_member(zf: zipfile.ZipFile, name: str):
    """One array of an .npz; object arrays through `SafeUnpickler`, others without pickle."""
    with zf.open(name) as f:
        data = f.read()
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        _, _, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        _, _, dtype = np.lib.format.read_array_header_2_0(buf)
    if dtype.hasobject:
        obj = SafeUnpickler(buf).load()
        return obj.tolist() if isinstance(obj, np.ndarray) else obj
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_npz(path: Path) -> dict:
    """The arrays of an .npz, object arrays as plain Python (lists, dicts, numbers)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] if n.endswith(".npy") else n: _npz_member(zf, n) for n in zf.namelist()}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, pickle.UnpicklingError, AttributeError,
            TypeError, IndexError, KeyError) as exc:
        raise PipelineError(f"{path.name} is not a readable .npz ({type(exc).__name__}: {str(exc)[:160]})") from None


@dataclass
class ChallengeCase:
    """One challenge file, checked: the slices, spacing and the prompts given so far."""

    name: str
    imgs: np.ndarray  # (D, H, W) uint8
    spacing: tuple  # (3,) mm, (z, y, x)
    boxes: list | None  # [Box3D] per class
    clicks: list = field(default_factory=list)  # [[Click, ...] in the order given] per class
    prev_pred: np.ndarray | None = None
    gts: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.clicks)


def read_case(path: Path) -> ChallengeCase:
    """A challenge .npz, every part checked (one line naming the file and what is wrong)."""
    path = Path(path)
    arrays = read_npz(path)
    what = path.name
    imgs = arrays.get("imgs")
    if not isinstance(imgs, np.ndarray) or imgs.ndim != 3 or imgs.dtype != np.uint8 or min(imgs.shape) < 1:
        raise PipelineError(f"{what}: imgs must be a (D, H, W) uint8 array, got "
                            f"{getattr(imgs, 'shape', None)} {getattr(imgs, 'dtype', type(imgs).__name__)}")
    spacing = np.asarray(arrays.get("spacing", []), float).reshape(-1) if "spacing" in arrays else None
    if spacing is None or spacing.shape != (3,) or not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise PipelineError(f"{what}: spacing must be three positive numbers (mm, z y x)")
    boxes = None
    if "boxes" in arrays:
        raw = arrays["boxes"]
        if not isinstance(raw, list) or not raw or len(raw) > MAX_CLASSES:
            raise PipelineError(f"{what}: boxes must be a list of 1..{MAX_CLASSES} dicts")
        boxes = [Box3D.from_dict(d, imgs.shape, f"{what}: boxes[{i}]") for i, d in enumerate(raw)]
    clicks = _read_clicks(arrays, imgs.shape, what)
    if boxes is None and not clicks:
        raise PipelineError(f"{what}: holds neither boxes nor clicks; nothing says what to segment")
    if boxes is not None and clicks and len(clicks) != len(boxes):
        raise PipelineError(f"{what}: {len(boxes)} boxes but clicks for {len(clicks)} classes")
    prev = arrays.get("prev_pred")
    if prev is not None and (not isinstance(prev, np.ndarray) or prev.shape != imgs.shape):
        raise PipelineError(f"{what}: prev_pred must have the shape of imgs {imgs.shape}")
    gts = arrays.get("gts")
    if gts is not None and (not isinstance(gts, np.ndarray) or gts.shape != imgs.shape):
        raise PipelineError(f"{what}: gts must have the shape of imgs {imgs.shape}")
    return ChallengeCase(path.stem, imgs, tuple(float(s) for s in spacing), boxes, clicks, prev, gts)


def _read_clicks(arrays: dict, shape, what: str) -> list:
    raw = arrays.get("clicks")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_CLASSES:
        raise PipelineError(f"{what}: clicks must be a list with one dict per class")
    order = arrays.get("clicks_order")
    if order is not None and (not isinstance(order, list) or len(order) != len(raw)):
        raise PipelineError(f"{what}: clicks_order must be a list with one list per class")
    out = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict) or set(d) - {"fg", "bg"}:
            raise PipelineError(f"{what}: clicks[{i}] must be a dict with fg and bg lists")
        pts = {}
        for kind in ("fg", "bg"):
            items = d.get(kind, [])
            if not isinstance(items, list):
                raise PipelineError(f"{what}: clicks[{i}][{kind!r}] must be a list of [z, y, x]")
            pts[kind] = [_voxel(p, shape, f"{what}: clicks[{i}][{kind!r}][{j}]") for j, p in enumerate(items)]
        out.append(_in_order(pts, None if order is None else order[i], f"{what}: clicks_order[{i}]"))
    return out


def _voxel(p, shape, what: str) -> tuple:
    if not isinstance(p, (list, tuple, np.ndarray)) or len(p) != 3:
        raise PipelineError(f"{what} must be [z, y, x]")
    z, y, x = (_whole(v, what) for v in p)
    if not all(0 <= a < n for a, n in zip((z, y, x), shape)):
        raise PipelineError(f"{what} = {[z, y, x]} lies outside the volume {list(shape)}")
    return z, y, x


def _in_order(pts: dict, order, what: str) -> list:
    """The clicks of one class in the order they were given: by clicks_order when present (its "fg"/"bg"
    entries take the next click of that kind; None marks a step without a click), else fg then bg."""
    if order is None:
        return [Click(*p, True) for p in pts["fg"]] + [Click(*p, False) for p in pts["bg"]]
    if not all(o in ("fg", "bg", None) for o in order):
        raise PipelineError(f"{what} may hold only 'fg', 'bg' and None")
    taken = {"fg": 0, "bg": 0}
    out = []
    for o in order:
        if o is None:
            continue
        if taken[o] >= len(pts[o]):
            raise PipelineError(f"{what} names more {o} clicks than clicks holds")
        out.append(Click(*pts[o][taken[o]], o == "fg"))
        taken[o] += 1
    if taken != {k: len(v) for k, v in pts.items()}:
        raise PipelineError(f"{what} does not name every click of clicks")
    return out


def write_segs(path: Path, segs: np.ndarray) -> Path:
    """``segs`` (D, H, W) uint8 as the challenge reads it, written atomically."""
    from sambtcv.core.files import write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, segs=segs.astype(np.uint8))
    return write_bytes(path, buf.getvalue())


def write_case(path: Path, imgs: np.ndarray, spacing, boxes=None, clicks=None, clicks_order=None, prev_pred=None,
               gts=None) -> Path:
    """A challenge .npz as the evaluation hands it to a submission (boxes and clicks as object arrays)."""
    from sambtcv.core.files import write_bytes

    arrays = {"imgs": imgs, "spacing": np.asarray(spacing, float)}
    if boxes is not None:
        arrays["boxes"] = np.array([b.to_dict() for b in boxes], dtype=object)
    if clicks is not None:
        arrays["clicks"] = np.array(clicks, dtype=object)
        arrays["clicks_order"] = np.array(clicks_order, dtype=object) if clicks_order is not None else None
    if prev_pred is not None:
        arrays["prev_pred"] = prev_pred
    if gts is not None:
        arrays["gts"] = gts
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v for k, v in arrays.items() if v is not None})
    return write_bytes(path, buf.getvalue())
