"""3D: a CT in the slice frame, prompts per organ (a prompts file, boxes from a label, or the viewer),
one walk per organ through the volume, the label map back on the input's grid, and 3D scores.

A CT goes through `sambtcv.data.btcv`'s own path (MONAI load, reorientation to the canonical orientation, HU
window) and is cut into the same axial slices as preprocess.py writes: ``stack[k]`` is slice k,
``(K, H, W)`` uint8. The label map is written with the input image's exact shape and affine (the
reorientation undone), so it opens over the CT in ITK-SNAP or 3D Slicer.
"""
from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import check_can_create, remove_dead_temps, write_bytes
from sambtcv.core.metrics import dice_score, hd95
from sambtcv.core.names import ORGANS, organ_name
from sambtcv.core.prompts import Prompt, bound_box, present_organs
from sambtcv.data.btcv import (
    NIFTI_SUFFIXES,
    axial_slice,
    check_geometry,
    from_stored_axes,
    load_image,
    load_label,
    read_header,
    to_stored_axes,
    to_uint8,
)
from sambtcv.engine.guard import Geometry
from sambtcv.engine.propagation import OrganMasks, VolumeDecoder, merge
from sambtcv.engine.walks import WalkRules, propagate

# The margin each model propagated best with (docs/MEASUREMENTS.md, section 6): box-trained LiteMedSAM
# gains from a looser box, SAM's decoder (MobileSAM) from a tighter one.
MARGIN_MM_BY_MODEL = {"litemedsam": 6.0, "mobilesam": 4.0}
# inside a 3D box's slices (no stop rule ends the walk there) LiteMedSAM walked best with a looser box
# (docs/MEASUREMENTS.md, section 10)
RANGE_MARGIN_MM_BY_MODEL = {"litemedsam": 9.0, "mobilesam": 4.0}
DEFAULT_MARGIN_MM = 4.0
AUTO = "auto"
NIFTI_GZIP_LEVEL = 6
SEG_SUFFIX = ".dcm"
DECIMAL = re.compile(r"^\s*[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")  # a plain number: no '_', no inf/nan


def margin_mm(text, model: str, in_range: bool = False) -> float:
    """The margin in mm: a finite number >= 0 (0 included), or for "auto" the model's own margin (of walks
    inside a 3D box's slices with `in_range`)."""
    text = str(text).strip().lower()
    if text == AUTO:
        return (RANGE_MARGIN_MM_BY_MODEL if in_range else MARGIN_MM_BY_MODEL).get(model, DEFAULT_MARGIN_MM)
    value = float(text) if DECIMAL.match(text) else math.nan
    if not (math.isfinite(value) and value >= 0):
        raise PipelineError(f"{{subject}} must be auto or a number of mm >= 0, got {text!r}", "margin")
    return value


def stride_mm(value) -> float:
    """A walk's stride in mm: a finite number >= 0 (0: every slice)."""
    text = str(value).strip()
    out = float(text) if DECIMAL.match(text) else math.nan
    if not (math.isfinite(out) and out >= 0):
        raise PipelineError(f"{{subject}} must be a number of mm >= 0 (0: every slice), got {text!r}", "stride")
    return out


@dataclass(frozen=True)
class WalkSettings:
    """How an organ is followed through the volume (`sambtcv.engine.walks.propagate`)."""

    stop: str  # propagation.STOP_RULES
    margin_mm: float  # added on each side of the previous slice's box
    guard: bool = True  # each new mask judged against the last in mm (sambtcv.engine.guard)
    stride_mm: float = config.STRIDE_MM  # a first walk encodes a slice every this many mm (0: every slice)

    def rules(self, geo) -> WalkRules:
        """A walk's rules for a CT of voxel size `geo` (`sambtcv.engine.guard.Geometry`): the margin in its pixels."""
        return WalkRules(self.stop, self.margin_mm / geo.pixel_mm, geo, self.guard, self.stride_mm)


# ---------------------------------------------------------------------------------------------- the CT
@dataclass
class Case:
    """One CT in the slice frame: uint8 slices (K, H, W), optional label (K, H, W), spacing (mm) of
    (row, column, slice) = (j, i, k) of the reoriented volume, from the image's affine."""

    name: str
    image_path: Path
    stack: np.ndarray
    label: np.ndarray | None
    spacing: tuple

    @property
    def pixel_mm(self) -> float:
        """The in-plane pixel size (mean of row and column spacing), mm."""
        return (self.spacing[0] + self.spacing[1]) / 2

    @property
    def geometry(self) -> Geometry:
        """The voxel size as walks use it (`sambtcv.engine.guard.Geometry`)."""
        return Geometry(self.pixel_mm, float(self.spacing[2]))


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along the stored axes (i, j, k), as the affine says (what every viewer shows)."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def label_stack(label: Path, orientation: str = config.ORIENTATION) -> np.ndarray:
    """A label map through the one MONAI path, cut into (K, H, W) axial slices of BTCV ids (its grid is the
    caller's to check: `sambtcv.data.btcv.check_geometry`)."""
    lv = load_label(label, orientation)
    return np.stack([axial_slice(lv, k) for k in range(lv.shape[2])])


def load_case(name: str, image: Path, label: Path | None, window,
              orientation: str = config.ORIENTATION, series: str | None = None) -> Case:
    """A CT (and its label, on the same grid) through the one MONAI path, cut into axial slices. `image` may
    be a DICOM series (a folder or a .zip; `series` picks one of several): it is read as a NIfTI on the
    series' grid (`sambtcv.data.dicom.as_nifti`), which `Case.image_path` then names."""
    import nibabel as nib

    from sambtcv.data.dicom import as_nifti

    image = as_nifti(image, series)
    header = read_header(image)  # a 3D volume, or one line
    if label is not None:
        check_geometry(image, label)
    vol = to_uint8(load_image(image, orientation, window))
    stack = np.stack([axial_slice(vol, k) for k in range(vol.shape[2])])
    lab = label_stack(label, orientation) if label is not None else None
    ornt = nib.orientations.io_orientation(header.affine)
    canon = np.empty(3)
    canon[ornt[:, 0].astype(int)] = affine_spacing(header.affine)  # along the reoriented axes (i, j, k)
    return Case(name, image, stack, lab, (float(canon[1]), float(canon[0]), float(canon[2])))


def label_map_bytes(labels: np.ndarray, case: Case, gz: bool = True,
                    orientation: str = config.ORIENTATION) -> bytes:
    """The (K, H, W) label stack as NIfTI bytes in the input image's own axes, shape and affine."""
    import nibabel as nib

    src = nib.load(str(case.image_path))
    volume = to_stored_axes(labels.transpose(2, 1, 0), case.image_path, orientation).astype(np.uint8)
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(volume, src.affine, header)
    img.header.set_slope_inter(1, 0)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=NIFTI_GZIP_LEVEL, mtime=0) if gz else raw


def check_label_map_path(out, inputs: list) -> Path:
    """Where a label map will go: a .nii.gz/.nii file name (not a folder), never one of the run's
    inputs, in a folder that can be written (checked now; nothing is created)."""
    from sambtcv.data.dicom import is_dicom_source

    out = Path(out)
    if out.is_dir():
        raise PipelineError(f"{{subject}} {out} is a folder; give a file name such as {out / 'labels.nii.gz'}",
                            "output")
    seg = out.name.lower().endswith(SEG_SUFFIX)
    if seg and not (inputs and is_dicom_source(inputs[0])):
        raise PipelineError(f"{{subject}} {out} is a DICOM SEG, which needs a DICOM series as the CT (a folder or a "
                            f".zip); write a .nii.gz label map instead", "output")
    if not seg and not out.name.endswith(NIFTI_SUFFIXES):
        raise PipelineError(f"{{subject}} {out} must end with .nii.gz or .nii (a NIfTI label map), or .dcm (a DICOM "
                            f"SEG of a DICOM series)", "output")
    for given in inputs:
        if out.exists() and Path(given).exists() and (out.samefile(given) or Path(given) in out.parents):
            raise PipelineError(f"{{subject}} {out} is an input of this run; write the label map to another file",
                                "output")
    check_can_create(out, "output")  # creates nothing: a run that fails later leaves no folder behind
    return out


def write_label_map(labels: np.ndarray, case: Case, out: Path, model: str = "", source=None,
                    series: str | None = None) -> Path:
    """The label map written to `out` (.nii.gz compressed, .nii not; .dcm: a DICOM SEG of the DICOM series
    `source`, naming `model`), atomically; temporary files that an earlier, killed write of `out` left
    beside it are removed."""
    remove_dead_temps(out)
    if str(out).lower().endswith(SEG_SUFFIX):
        import nibabel as nib

        from sambtcv.data import dicom

        volume = np.asarray(nib.Nifti1Image.from_bytes(label_map_bytes(labels, case, gz=False)).dataobj)
        found = dicom.series_of(source, series)
        note = dicom.seg_note(found)
        if note:
            print(f"note: {note}", flush=True)
        return dicom.write_seg(volume, found, out, model or "sam")
    return write_bytes(out, label_map_bytes(labels, case, gz=str(out).endswith(".gz")))


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class OrganPrompt:
    """A parsed prompt: slice k with a Prompt, or a 3D box as a slice range + XYXY box."""

    organ: int
    k: int
    prompt: Prompt
    k_range: tuple | None = None


def organ_prompt(organ: int, k: int, prompt: Prompt, hw, n_slices: int, what: str = "the prompt") -> OrganPrompt:
    """An organ's prompt on slice k, checked against the CT: the slice exists, the box or points lie inside
    it. `what` names the prompt in messages (prompts['liver'] for a prompts file)."""
    h, w = hw
    if not 0 <= k < n_slices:
        raise PipelineError(f"{what}['slice'] {k} must be a slice index in 0..{n_slices - 1} (the volume's slices)")
    if prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt.box)
        if not (0 <= x0 < x1 <= w - 1 and 0 <= y0 < y1 <= h - 1):
            raise PipelineError(f"{what}['box'] {[x0, y0, x1, y1]} is outside the {w} x {h} slice or has zero size "
                                f"(XYXY, x0 < x1, y0 < y1)")
    if prompt.points is not None:
        xy = prompt.points
        if not ((0 <= xy[:, 0]) & (xy[:, 0] <= w - 1) & (0 <= xy[:, 1]) & (xy[:, 1] <= h - 1)).all():
            raise PipelineError(f"{what}['points'] has a point outside the {w} x {h} slice")
    return OrganPrompt(organ, k, prompt)


def box3d_prompt(organ: int, box, case: Case) -> OrganPrompt:
    """A voxel box ``[i0, j0, k0, i1, j1, k1]`` (inclusive) of the stored file -> the slice range and
    XYXY box in the slice frame, prompted on its middle slice."""
    import nibabel as nib

    shape = nib.load(str(case.image_path)).shape
    i0, j0, k0, i1, j1, k1 = box
    if not all(0 <= a < b < n for a, b, n in zip((i0, j0, k0), (i1, j1, k1), shape)):
        raise PipelineError(f"box3d {list(box)} must hold i0 < i1, j0 < j1, k0 < k1 inside the image's {shape} voxels")
    mask = np.zeros(shape, bool)
    mask[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = True
    canon = from_stored_axes(mask, case.image_path, config.ORIENTATION)
    idx = [np.flatnonzero(canon.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    (ci0, ci1), (cj0, cj1), (ck0, ck1) = [(int(v[0]), int(v[-1])) for v in idx]
    xyxy = np.array([ci0, cj0, ci1, cj1], float)  # slice frame: x = i, y = j
    return OrganPrompt(organ, (ck0 + ck1) // 2, Prompt(box=xyxy), k_range=(ck0, ck1))


def label_prompts(case: Case, organs: list[int]) -> list[OrganPrompt]:
    """One tight box per organ, on the slice where the organ's label is largest."""
    out = []
    for organ in organs:
        areas = (case.label == organ).sum(axis=(1, 2))
        if areas.any():
            k = int(np.argmax(areas))
            out.append(OrganPrompt(organ, k, Prompt(box=bound_box(case.label[k] == organ))))
    return out


# ---------------------------------------------------------------------------------------------- segmenting
def segment(dec: VolumeDecoder, prompts: list[OrganPrompt], walk: WalkSettings, geo: Geometry) -> list[OrganMasks]:
    """Each organ's prompt decoded on its slice and propagated; the margin is converted to pixels with the
    in-plane pixel size."""
    out = []
    for p in prompts:
        first = dec.decode(p.k, p.prompt)
        limit = p.prompt.box if p.k_range is not None else None
        out.append(propagate(dec, p.organ, p.k, first, walk.stop, walk.margin_mm / geo.pixel_mm, geo, p.k_range,
                                 limit, guard=walk.guard, stride_mm=walk.stride_mm,
                                 box=None if p.prompt.points is not None else p.prompt.box))
    return out


def every_slice_boxes(dec: VolumeDecoder, case: Case, organs: list[int]) -> list[OrganMasks]:
    """The upper bound: a ground-truth box on every slice that holds the organ."""
    out = []
    for organ in organs:
        om = OrganMasks(organ)
        for k in np.flatnonzero((case.label == organ).any(axis=(1, 2))):
            om.slices[int(k)] = dec.decode(int(k), Prompt(box=bound_box(case.label[k] == organ)))
            om.visited += 1
        out.append(om)
    return out


# ---------------------------------------------------------------------------------------------- scores
def score_case(case: Case, one_box: np.ndarray, every_slice: np.ndarray, organs: list[int]) -> dict:
    """Per organ: 3D Dice (the project's Dice, on the stacked slices) and HD95 of both predictions."""
    out = {}
    for organ in organs:
        gt = case.label == organ
        a, b = one_box == organ, every_slice == organ
        out[organ_name(organ)] = {"dice_one_box": float(dice_score(a, gt)),
                                  "dice_every_slice_box": float(dice_score(b, gt)),
                                  "hd95_one_box": hd95(a, gt, case.spacing),
                                  "hd95_every_slice_box": hd95(b, gt, case.spacing)}
    return out


def mean_scores(cases: dict) -> dict:
    out = {}
    for key in ("dice_one_box", "dice_every_slice_box", "hd95_one_box"):
        per = {}
        for scores in cases.values():
            for organ, s in scores.items():
                if s[key] is not None:
                    per.setdefault(organ, []).append(s[key])
        out[key] = {o: float(np.mean(per[o])) for o in ORGANS if o in per}
    return out


def walk_report(om: OrganMasks, n_slices: int) -> dict:
    """Where an organ's walk stopped and why, and the slices it kept while unsure (JSON types)."""
    kept = sorted(om.slices)
    return {"slices": [kept[0], kept[-1]] if kept else None, "visited": om.visited,
            "stops": [{"slice": s.k, "direction": "superior" if s.direction > 0 else "inferior", "reason": s.reason,
                       "at_volume_edge": s.reason == "edge" or s.k in (0, n_slices - 1)} for s in om.stops],
            "unsure": [{"slice": u.k, "signals": u.signals} for u in om.unsure]}


@dataclass
class CaseResult:
    """One evaluated case: the one-box label map (K, H, W), the per-organ scores and walks."""

    one_box: np.ndarray
    scores: dict
    walks: dict  # organ name -> walk_report


def evaluate_case(case: Case, dec: VolumeDecoder, walk: WalkSettings, organs: list[int] | None = None,
                  every_slice: np.ndarray | None = None) -> CaseResult:
    """One box per organ of the label (or of `organs`), propagated, against a ground-truth box on every
    slice (`every_slice`, when the caller has it already)."""
    organs = [o for o in (organs or present_organs(case.label)) if (case.label == o).any()]
    walks = segment(dec, label_prompts(case, organs), walk, case.geometry)
    one_box = merge(walks, case.stack.shape)
    if every_slice is None:
        every_slice = merge(every_slice_boxes(dec, case, organs), case.stack.shape)
    return CaseResult(one_box, score_case(case, one_box, every_slice, organs),
                      {organ_name(om.organ): walk_report(om, len(case.stack)) for om in walks})


def case_prompt(spec, case: Case) -> OrganPrompt:
    """A parsed `sambtcv.data.prompts_file.Spec` checked against the CT: its slice, box or points inside it."""
    if spec.box3d is not None:
        return box3d_prompt(spec.organ, spec.box3d, case)
    return organ_prompt(spec.organ, spec.slice, spec.prompt, case.stack.shape[1:], len(case.stack),
                        f"prompts[{organ_name(spec.organ)!r}]")
