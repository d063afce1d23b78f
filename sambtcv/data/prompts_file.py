"""The prompts a user gives for a CT (a prompts file, or a request of the viewer's HTTP API), parsed strictly.

A prompts file maps organ names to one prompt each::

    {"liver": {"slice": 40, "box": [30, 60, 180, 170]},
     "spleen": {"slice": 52, "points": [[330, 120], [300, 100]], "labels": [1, 0]},
     "left_kidney": {"box3d": [300, 190, 20, 370, 260, 60]}}

Slice k and pixel x, y are in the slice frame (`sambtcv.data.btcv.axial_slice`), boxes XYXY inclusive; box3d
is ``[i0, j0, k0, i1, j1, k1]`` in voxel indices of the file as stored. Every field is checked: a value
is either used as written or refused with one line. So no NaN or infinity (JSON's extensions), no
booleans or strings for numbers, no numbers beyond what a CT can hold, whole numbers for slices and voxel
indices, no duplicate or unknown keys (a typo such as "lables" would otherwise make every point
positive), one kind of prompt per organ, and at least one organ point among points.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.core.names import ORGAN_ID, ORGANS
from sambtcv.core.prompts import Prompt

MAX_DIGITS = 9  # digits of an integer in a prompt; a CT has far fewer than 10**9 voxels along an axis
MAX_POINTS = 64
KINDS = {"box": ("slice", "box"), "points": ("slice", "points", "labels"), "box3d": ("box3d",)}
KEYS = ("slice", "box", "points", "labels", "box3d")


class _Refused(ValueError):
    """Raised inside the JSON decoder's hooks; becomes a PipelineError with the file's name."""


def _constant(name: str):
    raise _Refused(f"{name} is not a number a prompt can hold")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _Refused(f"the integer {text[:12]}... has more than {MAX_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) >= 10 ** MAX_DIGITS:
        raise _Refused(f"the number {text[:24]} is not a finite coordinate")
    return value


def _object(pairs):
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise _Refused(f"the key {dup!r} is given twice in one object")
    return dict(pairs)


def loads(text: str):
    """JSON as the prompts need it: no NaN/Infinity, no duplicate keys, no huge numbers."""
    try:
        return json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float,
                          object_pairs_hook=_object)
    except (_Refused, json.JSONDecodeError, RecursionError) as exc:
        raise PipelineError(f"not valid prompts JSON: {str(exc)[:200]}") from None


def _number(value, what: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not abs(value) < 10 ** MAX_DIGITS or not math.isfinite(value)):
        raise PipelineError(f"{what} must be a finite number below 1e{MAX_DIGITS}, got {_short(value)}")
    return float(value)


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not abs(value) < 10 ** MAX_DIGITS:
        raise PipelineError(f"{what} must be a whole number (an index) below 1e{MAX_DIGITS}, got {_short(value)}")
    return value


def _list(value, n: int | None, what: str) -> list:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        size = f"{n} " if n is not None else ""
        raise PipelineError(f"{what} must be a list of {size}values, got {_short(value)}")
    return value


def _short(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 60:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Spec:
    """One organ's prompt as given: ``slice`` + ``prompt`` (a box or points), or ``box3d`` (6 voxel indices)."""

    organ: int
    slice: int | None = None
    prompt: Prompt | None = None
    box3d: list | None = None


def organ_id(name) -> int:
    if not isinstance(name, str) or name not in ORGAN_ID:
        raise PipelineError(f"unknown organ {_short(name)}; use names from: {', '.join(ORGANS)}")
    return ORGAN_ID[name]


def parse_spec(name, spec, what: str | None = None) -> Spec:
    """One organ's prompt (a dict of the form above) -> `Spec`, every field checked (not yet against a CT)."""
    organ = organ_id(name)
    what = what or f"prompts[{name!r}]"
    if not isinstance(spec, dict):
        raise PipelineError(f"{what} must be an object with slice and box or points (+ labels), or box3d")
    unknown = [k for k in spec if k not in KEYS]
    if unknown:
        raise PipelineError(f"{what} has an unknown key {_short(unknown[0])}; use {', '.join(KEYS)}")
    kinds = [k for k in ("box", "points", "box3d") if k in spec]
    if not kinds:
        raise PipelineError(f"{what} needs a 'box' [x0, y0, x1, y1] or 'points' [[x, y], ...] (with 'slice'), "
                            f"or a 'box3d'")
    if len(kinds) > 1:
        raise PipelineError(f"{what} gives {' and '.join(kinds)}; give one of box, points or box3d")
    extra = [k for k in spec if k not in KINDS[kinds[0]]]
    if extra:
        raise PipelineError(f"{what}: {extra[0]!r} does not go with {kinds[0]!r}")
    if kinds[0] == "box3d":
        box = [_whole(v, f"{what}['box3d'] values") for v in _list(spec["box3d"], 6, f"{what}['box3d']")]
        return Spec(organ, box3d=box)
    if "slice" not in spec:
        raise PipelineError(f"{what} needs 'slice' (the slice index of its {kinds[0]})")
    k = _whole(spec["slice"], f"{what}['slice']")
    if kinds[0] == "box":
        box = [_number(v, f"{what}['box'] values") for v in _list(spec["box"], 4, f"{what}['box']")]
        return Spec(organ, k, Prompt(box=np.array(box)))
    return Spec(organ, k, _points(spec, what))


def _points(spec: dict, what: str) -> Prompt:
    points = _list(spec["points"], None, f"{what}['points']")
    if not 1 <= len(points) <= MAX_POINTS:
        raise PipelineError(f"{what}['points'] must hold 1 to {MAX_POINTS} points, got {len(points)}")
    xy = np.array([[_number(v, f"{what}['points'] coordinates") for v in _list(p, 2, f"{what}['points'] items")]
                   for p in points])
    labels = spec.get("labels", [1] * len(points))
    labels = _list(labels, len(points), f"{what}['labels'] (one per point)")
    if any(isinstance(v, bool) or v not in (0, 1) for v in labels):
        raise PipelineError(f"{what}['labels'] must be one 0 (background) or 1 (organ) per point, "
                            f"got {_short(labels)}")
    if 1 not in labels:
        raise PipelineError(f"{what} needs at least one organ point (label 1); background points alone say "
                            f"nothing about where the organ is")
    return Prompt(points=xy, labels=np.array(labels, float))


def parse_prompts(spec) -> list[Spec]:
    """A whole prompts file's content (already decoded) -> one `Spec` per organ."""
    if not isinstance(spec, dict) or not spec:
        raise PipelineError("the prompts must map organ names to prompts (README: Prompts file)")
    return [parse_spec(name, value) for name, value in spec.items()]


def read_prompts_file(path) -> list[Spec]:
    """Read and parse a prompts file; one line for anything unreadable or malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read the prompts file {path}: {exc}") from exc
    try:
        spec = loads(text)
    except PipelineError as exc:
        raise PipelineError(f"cannot read the prompts file {path}: {exc}") from None
    try:
        return parse_prompts(spec)
    except PipelineError as exc:
        raise PipelineError(f"prompts file {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------- the viewer's
SLICE_KEYS = ("slice", "box", "points", "labels", "mode")
SLICE_MODES = ("add", "new")


@dataclass
class SlicePromptRequest:
    """What one viewer request gives on one slice: a box and/or points, added to the slice's prompt (mode
    "add", the default) or starting it afresh ("new")."""

    slice: int
    box: list | None
    points: list
    labels: list
    mode: str


def parse_slice_prompt(spec, what: str = "the prompt") -> SlicePromptRequest:
    """``{"slice", "box"?, "points"?, "labels"?, "mode"?}`` checked field by field (not yet against a CT).
    Unlike a prompts file, a box and points may come together, and - points alone are allowed: they add to
    what the slice already holds."""
    if not isinstance(spec, dict):
        raise PipelineError(f"{what} must be an object with slice and a box and/or points")
    unknown = [k for k in spec if k not in SLICE_KEYS]
    if unknown:
        raise PipelineError(f"{what} has an unknown key {_short(unknown[0])}; use {', '.join(SLICE_KEYS)}")
    if "slice" not in spec:
        raise PipelineError(f"{what} needs 'slice' (the slice index of its box or points)")
    if "box" not in spec and "points" not in spec:
        raise PipelineError(f"{what} needs a 'box' [x0, y0, x1, y1] and/or 'points' [[x, y], ...]")
    if "labels" in spec and "points" not in spec:
        raise PipelineError(f"{what}: 'labels' goes with 'points'")
    mode = spec.get("mode", "add")
    if mode not in SLICE_MODES:
        raise PipelineError(f"{what}['mode'] must be one of {', '.join(SLICE_MODES)}, got {_short(mode)}")
    k = _whole(spec["slice"], f"{what}['slice']")
    box = None
    if "box" in spec:
        box = [_number(v, f"{what}['box'] values") for v in _list(spec["box"], 4, f"{what}['box']")]
    points, labels = [], []
    if "points" in spec:
        raw = _list(spec["points"], None, f"{what}['points']")
        if not 1 <= len(raw) <= MAX_POINTS:
            raise PipelineError(f"{what}['points'] must hold 1 to {MAX_POINTS} points, got {len(raw)}")
        points = [[_number(v, f"{what}['points'] coordinates") for v in _list(p, 2, f"{what}['points'] items")]
                  for p in raw]
        labels = _list(spec.get("labels", [1] * len(points)), len(points), f"{what}['labels'] (one per point)")
        if any(isinstance(v, bool) or v not in (0, 1) for v in labels):
            raise PipelineError(f"{what}['labels'] must be one 0 (background) or 1 (organ) per point, "
                                f"got {_short(labels)}")
    return SlicePromptRequest(k, box, points, list(labels), mode)
