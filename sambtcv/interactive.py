"""The viewer's engine: one `VolumeSession` per open CT, prompts, propagation, corrections, undo, label maps.

No web code here (`sambtcv.server` is the HTTP layer). Everything that segments calls the engine that
segment_volume.py uses: `sambtcv.volume.load_case` reads the CT (a server-owned copy of it), a
`sambtcv.propagation.VolumeDecoder` decodes prompts through the 3D embedding cache (slices encoded
lazily, at most once per volume content, model and encoder dtype), `sambtcv.propagation.propagate`
walks an organ through the volume, `sambtcv.propagation.merge` and `sambtcv.volume.label_map_bytes`
make the label map on the input file's own grid, and prompts are parsed by
`sambtcv.prompts_file.parse_spec` and checked by `sambtcv.volume.organ_prompt`.

Coordinates are the slice frame of the prompts file: slice k, pixel x (column) and y (row) of
``case.stack[k]``.

Per organ a session keeps its masks (slice -> `SliceMask`), the slice it was first prompted on (its
*anchor*) and, after a prompt on an organ that was already propagated, that slice (*pending*): the next
`propagate` walks outward from it, away from the anchor (both ways when it is the anchor), and replaces
only what lies beyond it. Every change can be undone (`HISTORY` steps per volume).

Concurrency: each session has a lock for its state; a propagation runs in a thread of its own (a client
that goes away leaves it running) and other changes to that volume meanwhile raise `Busy`. All model
use in the process (encoder and decoder) goes through one `ModelGate`: the embedding cache's file lock
is per process, so two threads must never fill a cache at once, and on a CPU two models running at once
only slow each other. Prompts and walks wait for the gate in turn (first come, first served); the
background encoder (slices near the last prompted one, while a volume is idle) takes it only when no
one else waits and holds it for one slice, so a prompt never waits for more than that one slice.
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sambtcv import config
from sambtcv.data import check_geometry, orientation_change, parse_window, read_header
from sambtcv.errors import PipelineError
from sambtcv.metrics import dice_score
from sambtcv.names import ORGAN_ID, check_choice, organ_name
from sambtcv.prompts import Prompt, bound_box, present_organs
from sambtcv.prompts_file import parse_spec
from sambtcv.propagation import STOP_RULES, Candidates, OrganMasks, SliceMask, VolumeDecoder, merge, propagate
from sambtcv.volume import (
    WalkSettings,
    affine_spacing,
    label_map_bytes,
    label_stack,
    load_case,
    margin_mm,
    organ_prompt,
    walk_report,
)

HISTORY = 30  # undo steps kept per volume
MAX_VOXELS = 2 ** 28  # an uploaded CT may hold at most this many voxels (512 x 512 x 1024)
SPACING_MM = (0.01, 100.0)  # a sane voxel size, mm, along every axis
IMAGE_GZIP_LEVEL = 1  # the CT served to the page: fast to compress, the page inflates it
REFERENCE_LOGIT = 1e-3  # the logit of a reference label's voxels: any SAM mask of another organ wins there
ID_PATTERN = r"^[0-9a-f]{32}$"  # volume ids (uuid4 hex), made by the server
PROMPT = "the prompt"  # how messages name a prompt request ("the prompt['box'] values must be ...")


class Busy(PipelineError):
    """The volume is being propagated; the change must wait for it (HTTP 409)."""


class NotFound(PipelineError):
    """No such volume (HTTP 404)."""


def rle(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary (H, W) mask in row-major (C) order, starting with a run of 0s (possibly
    empty): ``[n0, n1, n0, n1, ...]``."""
    flat = np.asarray(mask, bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] + counts) if flat.size and flat[0] else counts


def unrle(counts, shape) -> np.ndarray:
    """The (H, W) bool mask of `rle` counts."""
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)


# ---------------------------------------------------------------------------------------------- the model gate
class ModelGate:
    """One model user at a time in this process: foreground users in arrival order, the background only
    when no foreground user waits."""

    def __init__(self):
        self._cv = threading.Condition()
        self._busy = False
        self._queue = collections.deque()

    @contextlib.contextmanager
    def use(self, background: bool = False):
        with self._cv:
            if background:
                while self._busy or self._queue:
                    self._cv.wait()
            else:
                ticket = object()
                self._queue.append(ticket)
                while self._busy or self._queue[0] is not ticket:
                    self._cv.wait()
                self._queue.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()


class SessionDecoder(VolumeDecoder):
    """The engine's `VolumeDecoder` with its model use behind the process's `ModelGate`, a hook that
    sees each decoded slice (a walk's progress), and background prefetching of embeddings."""

    def __init__(self, *args, gate: ModelGate, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate
        self.watch = None  # called with (k, SliceMask) after each decode (a walk in progress)
        self.paused = False  # set while a walk runs: the background leaves this volume alone
        self.read_lock = threading.Lock()

    def embedding(self, k: int):
        with self.read_lock:  # the cache's lazily opened file descriptor is shared
            return super().embedding(k)

    def decode(self, k: int, prompt: Prompt) -> SliceMask:
        with self.gate.use():
            out = super().decode(k, prompt)
        if self.watch is not None:
            self.watch(k, out)
        return out

    def candidates(self, k: int, prompt: Prompt) -> Candidates:
        with self.gate.use():
            return super().candidates(k, prompt)

    def prefetch(self, k: int) -> bool:
        """Encode slice k (lower priority) unless it is encoded or a walk is running; True if it did."""
        with self.gate.use(background=True):
            if self.paused or k in self.visited:
                return False
            self.embedding(k)
            return True


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class Engine:
    """What every session shares: the models, where embeddings are cached, the walk's settings."""

    backbone: object
    decoder: object
    device: object
    dtype: str = config.DTYPE
    encoder_dtype: str = config.DTYPE
    cache_dir: Path = Path(config.CACHE_DIR_3D)
    walk: WalkSettings = WalkSettings("intensity", 4.0)
    window: tuple = (-160.0, 240.0)
    gate: ModelGate = field(default_factory=ModelGate)
    runtime: object = None  # sambtcv.runtime.Runtime (None: PyTorch)

    @property
    def model(self) -> str:
        return self.backbone.name


def walk_settings(stop: str, margin, model: str) -> WalkSettings:
    check_choice(stop, STOP_RULES, "stop rule")
    return WalkSettings(stop, margin_mm(margin, model))


def load_engine(model: str = config.MODEL, checkpoint=None, finetuned=None, device=None, dtype: str = config.DTYPE,
                encoder_dtype: str = config.DTYPE, cache_dir=config.CACHE_DIR_3D, stop: str = config.STOP,
                margin="auto", window=config.WINDOW_HU, backbone=None, runtime: str = config.RUNTIME) -> Engine:
    """The models and settings (as segment_volume.py loads them); `backbone` reuses a loaded one; `runtime`
    (auto | torch | openvino) runs the encoder and the decoder."""
    import torch

    from sambtcv import runtime as runtimes
    from sambtcv.backbones import load_backbone
    from sambtcv.decoder import load_decoder
    from sambtcv.device import check_precision, pick_device

    device = pick_device(device) if not isinstance(device, torch.device) else device
    check_precision(dtype)
    check_precision(encoder_dtype)
    walk = walk_settings(stop, margin, backbone.name if backbone is not None else model)
    if backbone is None:
        backbone = load_backbone(model, checkpoint, device)
    rt = runtimes.make(runtime, backbone, device, encoder_dtype, dtype)
    decoder = rt.decoder(load_decoder(backbone, finetuned).to(device), "finetuned" if finetuned else "pretrained")
    return Engine(backbone, decoder, device, dtype, encoder_dtype, Path(cache_dir), walk,
                  parse_window(window) if isinstance(window, str) else tuple(window), runtime=rt)


# ---------------------------------------------------------------------------------------------- organ state
@dataclass(frozen=True)
class OrganState:
    """One organ's masks in a session. Replaced whole on every change (undo keeps the old one)."""

    organ: int
    slices: dict  # slice k -> SliceMask
    anchor: int  # the slice it was first prompted on
    propagated: bool = False
    pending: int | None = None  # the slice of a prompt made since the last walk
    stops: tuple = ()  # Stop per direction walked
    unsure: tuple = ()  # Unsure slices of the walks
    visited: int = 0  # slices the walks visited
    candidates: tuple = ()  # SAM's masks for the last prompt (slice `pending`), to cycle through
    chosen: int = 0
    from_reference: bool = False

    def masks(self, slices=None) -> OrganMasks:
        """As `sambtcv.propagation.OrganMasks` (what merge and walk_report take)."""
        return OrganMasks(self.organ, dict(self.slices if slices is None else slices), self.visited,
                          list(self.stops), list(self.unsure))

    @property
    def range(self):
        return [min(self.slices), max(self.slices)] if self.slices else None


def _span(*states) -> list | None:
    """[first, last] slice that any of the states (None allowed) has a mask on."""
    ks = [k for s in states if s is not None for k in s.slices]
    return [min(ks), max(ks)] if ks else None


def _sign(v: int) -> int:
    return 1 if v > 0 else -1


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """A walk in progress (or done): what the page shows while it runs."""

    organ: int
    start: int
    directions: tuple
    base: dict  # the masks kept while the walk replaces the rest
    started: float = field(default_factory=time.perf_counter)
    visited: int = 0
    current: int | None = None
    kept: list = field(default_factory=list)  # slices confirmed so far, in the order the walk kept them
    live: dict = field(default_factory=dict)  # their masks
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None
    status: int = 0  # HTTP-like status of an error: 4xx (a PipelineError) or 500
    _last: tuple | None = None

    def saw(self, k: int, sm: SliceMask) -> None:
        """A slice was decoded: the previous one in the same direction was kept by the walk."""
        self.visited += 1
        self.current = k
        d = _sign(k - self.start)
        if self._last is not None and self._last[0] == k - d:
            self.kept.append(self._last[0])
            self.live[self._last[0]] = self._last[1]
        self._last = (k, sm)

    def view(self) -> dict:
        return {"organ": organ_name(self.organ), "start": self.start, "running": not self.done.is_set(),
                "directions": [_direction(d) for d in self.directions], "visited": self.visited,
                "current": self.current, "kept": list(self.kept),
                "seconds": round(time.perf_counter() - self.started, 2), "result": self.result, "error": self.error}


def _direction(d: int) -> str:
    return "superior" if d > 0 else "inferior"


# ---------------------------------------------------------------------------------------------- a session
class VolumeSession:
    """One open CT: its slices, decoder, organs, history and the walk running on it."""

    def __init__(self, vid: str, case, engine: Engine, folder: Path):
        self.id, self.case, self.engine, self.folder = vid, case, engine, folder
        self.dec = SessionDecoder(case.stack, engine.backbone, engine.decoder, engine.cache_dir, engine.device,
                                  engine.dtype, engine.encoder_dtype, engine.runtime, gate=engine.gate)
        self.lock = threading.RLock()
        self.organs: dict[int, OrganState] = {}
        self.history: list[tuple[int, OrganState | None]] = []
        self.version = 0
        self.job: Job | None = None
        self.focus: int | None = None
        self.touched = time.monotonic()
        self.closed = False
        self._image: bytes | None = None
        self._cache: dict = {}  # (what, version) -> value
        self.on_touch = None  # called when the focus moves (wakes the background encoder)

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> list[int]:
        return list(self.case.stack.shape)

    @property
    def n_slices(self) -> int:
        return int(self.case.stack.shape[0])

    def busy(self) -> bool:
        return self.job is not None and not self.job.done.is_set()

    def _check_idle(self) -> None:
        if self.closed:
            raise NotFound("this volume was closed")
        if self.busy():
            raise Busy(f"{organ_name(self.job.organ)} is being propagated on this volume; wait for it to finish")

    def _commit(self, organ: int, new: OrganState | None) -> None:
        """Replace an organ's state (None: erase it), remembering the old one for undo."""
        self.history.append((organ, self.organs.get(organ)))
        del self.history[:-HISTORY]
        self._set(organ, new)

    def _set(self, organ: int, new: OrganState | None) -> None:
        if new is None:
            self.organs.pop(organ, None)
        else:
            self.organs[organ] = new
        self.version += 1
        self._cache.clear()

    def touch(self, k: int | None = None) -> None:
        """The user works here (slice k): the background encodes near it next."""
        self.touched = time.monotonic()
        if k is not None and 0 <= k < self.n_slices:
            self.focus = k
            if self.on_touch is not None:
                self.on_touch()

    # ------------------------------------------------------------------ prompts
    def prompt(self, organ_name_: str, body) -> dict:
        """Decode one prompt (``{"slice", "box"}`` or ``{"slice", "points", "labels"}``) on its slice."""
        spec = parse_spec(organ_name_, body, PROMPT)
        if spec.box3d is not None:
            raise PipelineError("the viewer takes a slice with a box or points, not box3d")
        op = organ_prompt(spec.organ, spec.slice, spec.prompt, self.case.stack.shape[1:], self.n_slices, PROMPT)
        with self.lock:
            self._check_idle()
            self.touch(op.k)
            t0 = time.perf_counter()
            found = self.dec.candidates(op.k, op.prompt)  # shown first: the mask decode() would keep
            cands, pick = found.masks, found.kept
            old = self.organs.get(op.organ)
            if old is None or not old.propagated:  # a new organ, or one not walked yet: this slice anew
                new = OrganState(op.organ, {op.k: cands[pick]}, op.k, pending=op.k, candidates=tuple(cands),
                                 chosen=pick)
            else:  # a correction: this slice now, the walk outward from it on `propagate`
                new = replace(old, slices={**old.slices, op.k: cands[pick]}, pending=op.k, candidates=tuple(cands),
                              chosen=pick, from_reference=False)
            self._commit(op.organ, new)
            seconds = time.perf_counter() - t0
            return {**self._mask_reply(new, op.k, pick), "seconds": round(seconds, 4), "changed": [op.k, op.k],
                    "propagated": new.propagated}

    def _mask_reply(self, state: OrganState, k: int, pick: int) -> dict:
        sm = state.slices[k]
        return {"organ": organ_name(state.organ), "slice": k, "area": sm.area, "iou": round(sm.iou, 4),
                "candidate": pick, "candidates": [{"iou": round(c.iou, 4), "area": c.area} for c in state.candidates],
                "mask": {"shape": list(sm.mask.shape), "order": "C", "counts": rle(sm.mask)}, "version": self.version}

    def choose(self, organ: int, index) -> dict:
        """Show SAM's candidate `index` of the organ's last prompt instead of the one shown."""
        with self.lock:
            self._check_idle()
            old = self.organs.get(organ)
            if old is None or old.pending is None or not old.candidates:
                raise PipelineError(f"{organ_name(organ)} has no prompt to choose a mask of; prompt it first")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(old.candidates):
                raise PipelineError(f"candidate must be a whole number 0..{len(old.candidates) - 1}, got {index!r}")
            new = replace(old, slices={**old.slices, old.pending: old.candidates[index]}, chosen=index)
            self._commit(organ, new)
            return {**self._mask_reply(new, old.pending, index), "changed": [old.pending, old.pending]}

    # ------------------------------------------------------------------ propagation
    def start_propagation(self, organ: int) -> Job:
        """Start the organ's walk in a thread of its own: from its pending slice outward (away from the
        anchor; both ways when it is the anchor or the organ was never walked), replacing what lies beyond."""
        with self.lock:
            self._check_idle()
            state = self.organs.get(organ)
            if state is None or not state.slices:
                raise PipelineError(f"{organ_name(organ)} has no mask yet; prompt it on a slice first")
            start = state.pending if state.pending is not None else state.anchor
            if start not in state.slices:
                raise PipelineError(f"{organ_name(organ)} has no mask on slice {start}; prompt it there first")
            if not state.propagated or start == state.anchor:
                directions, base = (1, -1), {start: state.slices[start]}
            else:
                d = _sign(start - state.anchor)
                directions = (d,)
                base = {k: v for k, v in state.slices.items() if (k - start) * d <= 0}
            job = Job(organ, start, directions, base)
            self.job = job
            self.touch(start)
            self.dec.paused = True
        threading.Thread(target=self._walk, args=(job, state), name=f"propagate-{self.id[:8]}", daemon=True).start()
        return job

    def _walk(self, job: Job, state: OrganState) -> None:
        walk, first = self.engine.walk, job.base[job.start]
        passes0 = self.dec.encoder_passes
        try:
            self.dec.watch = job.saw
            om = propagate(self.dec, job.organ, job.start, SliceMask(first.mask.copy(), first.logits, first.iou),
                           walk.stop, walk.margin_mm / self.case.pixel_mm, directions=job.directions)
            with self.lock:
                # the other direction's stop and unsure slices stay as the last walk found them
                stops = {s.direction: s for s in state.stops if s.direction not in job.directions}
                stops.update({s.direction: s for s in om.stops})
                kept = [u for u in state.unsure if all((u.k - job.start) * d < 0 for d in job.directions)]
                new = replace(state, slices={**job.base, **{k: v for k, v in om.slices.items() if k != job.start}},
                              propagated=True, pending=None, stops=tuple(stops[d] for d in sorted(stops, reverse=True)),
                              unsure=tuple(sorted(kept + list(om.unsure), key=lambda u: u.k)), visited=om.visited,
                              from_reference=False)
                self._commit(job.organ, new)
                rng = new.range
                labels = self.label_slices(*rng) if rng else None
                job.result = {"organ": organ_name(job.organ), "slices": rng,
                              "voxels": int((labels == job.organ).sum()) if labels is not None else 0,
                              "encoder_passes": self.dec.encoder_passes - passes0, "visited": om.visited,
                              "seconds": round(time.perf_counter() - job.started, 3),
                              "directions": [_direction(d) for d in job.directions],
                              **{k: v for k, v in walk_report(new.masks(), self.n_slices).items()
                                 if k in ("stops", "unsure")},
                              "changed": _span(state, new), "version": self.version}
        except PipelineError as exc:
            job.error, job.status = str(exc), 422
        except Exception as exc:  # noqa: BLE001 - the page gets one line, the log the traceback
            traceback.print_exc(file=sys.stderr)
            job.error, job.status = f"the walk failed: {type(exc).__name__}: {str(exc)[:200]}", 500
        finally:
            self.dec.watch = None
            self.dec.paused = False
            job.done.set()

    def propagate(self, organ: int, timeout: float | None = None) -> dict:
        """Walk and wait for the result (raises the walk's error)."""
        job = self.start_propagation(organ)
        job.done.wait(timeout)
        return job_result(job)

    # ------------------------------------------------------------------ undo, erase
    def undo(self) -> dict:
        with self.lock:
            self._check_idle()
            if not self.history:
                raise PipelineError("nothing to undo")
            organ, old = self.history.pop()
            changed = _span(self.organs.get(organ), old)
            self._set(organ, old)
            return {"organ": organ_name(organ), "changed": changed, "version": self.version,
                    "undo_steps": len(self.history)}

    def erase(self, organ: int) -> dict:
        with self.lock:
            self._check_idle()
            old = self.organs.get(organ)
            if old is None:
                return {"organ": organ_name(organ), "changed": None, "version": self.version}
            self._commit(organ, None)
            return {"organ": organ_name(organ), "changed": _span(old), "version": self.version}

    # ------------------------------------------------------------------ reference label
    def open_reference(self, label: Path, edit: bool = True) -> dict:
        """A label map on the CT's grid: the reference for Dice and, with `edit`, the organs' masks."""
        check_geometry(self.case.image_path, label)
        ref = label_stack(label)  # the CT is loaded already
        with self.lock:
            self._check_idle()
            self.case.label = ref
            self._cache.clear()
            changed, found = [], present_organs(ref)
            if edit:
                for organ in found:
                    present = np.flatnonzero((ref == organ).any(axis=(1, 2)))
                    logits = np.broadcast_to(np.float32(REFERENCE_LOGIT), ref.shape[1:])  # one value, no copies
                    slices = {int(k): SliceMask(ref[k] == organ, logits, 1.0) for k in present}
                    anchor = max(slices, key=lambda k: slices[k].area)
                    self._commit(organ, OrganState(organ, slices, anchor, propagated=True, from_reference=True))
                    changed += [int(present[0]), int(present[-1])]
            self.version += 1
            return {"organs": [organ_name(o) for o in found],
                    "changed": [min(changed), max(changed)] if changed else None, "version": self.version}

    def dice(self) -> dict | None:
        """Per organ (in the reference or segmented), 3D Dice of the label map against the reference."""
        if self.case.label is None:
            return None
        key = ("dice", self.version)
        if key not in self._cache:
            labels, ref = self.labels(), self.case.label
            organs = sorted(set(self.organs) | set(present_organs(ref)))
            self._cache[key] = {organ_name(o): round(float(dice_score(labels == o, ref == o)), 4) for o in organs}
        return self._cache[key]

    # ------------------------------------------------------------------ label maps
    def _organ_masks(self, live: bool) -> list[OrganMasks]:
        out = []
        job = self.job if live and self.busy() else None
        for organ, state in self.organs.items():
            if job is not None and organ == job.organ:
                out.append(state.masks({**job.base, **job.live}))
            else:
                out.append(state.masks())
        if job is not None and job.organ not in self.organs:
            out.append(OrganMasks(job.organ, {**job.base, **job.live}))
        return out

    def labels(self) -> np.ndarray:
        """The (K, H, W) label map (BTCV ids) of the committed masks, in the slice frame."""
        key = ("labels", self.version)
        if key not in self._cache:
            with self.lock:
                self._cache[key] = merge([s.masks() for s in self.organs.values()], self.case.stack.shape)
        return self._cache[key]

    def label_slices(self, first: int, last: int, live: bool = False) -> np.ndarray:
        """Slices first..last of the label map ((n, H, W) uint8, slice frame); with `live`, the walk in
        progress shows the slices it has kept so far."""
        if not (0 <= first <= last < self.n_slices):
            raise PipelineError(f"slices {first}..{last} are not inside 0..{self.n_slices - 1}")
        with self.lock:
            organs = [OrganMasks(om.organ, {k - first: v for k, v in om.slices.items() if first <= k <= last})
                      for om in self._organ_masks(live)]
        return merge(organs, (last - first + 1, *self.case.stack.shape[1:]))

    def label_map_nifti(self) -> bytes:
        """The label map as .nii.gz bytes with the uploaded file's exact shape, affine and orientation."""
        key = ("nifti", self.version)
        if key not in self._cache:
            self._cache[key] = label_map_bytes(self.labels(), self.case)
        return self._cache[key]

    def image_nifti(self) -> bytes:
        """The CT as .nii.gz reoriented to the slice frame's canonical axes (config.ORIENTATION): voxel
        (i, j, k) is pixel (x = i, y = j) of slice k. HU as stored, for the page's own windowing."""
        if self._image is None:
            import nibabel as nib

            img = nib.load(str(self.case.image_path))
            canon = img.as_reoriented(orientation_change(self.case.image_path, config.ORIENTATION, to_stored=False))
            self._image = gzip.compress(canon.to_bytes(), compresslevel=IMAGE_GZIP_LEVEL, mtime=0)
        return self._image

    # ------------------------------------------------------------------ what the page shows
    def info(self) -> dict:
        return {"id": self.id, "shape": self.shape, "spacing": [round(float(s), 6) for s in self.case.spacing],
                "name": self.case.name}

    def status(self) -> dict:
        with self.lock:
            organs = {}
            for organ, s in sorted(self.organs.items()):
                rep = walk_report(s.masks(), self.n_slices)
                organs[organ_name(organ)] = {
                    "slices": s.range, "anchor": s.anchor, "pending": s.pending, "propagated": s.propagated,
                    "from_reference": s.from_reference, "stops": rep["stops"], "unsure": rep["unsure"],
                    "candidate": s.chosen if s.candidates else None,
                    "candidates": [{"iou": round(c.iou, 4), "area": c.area} for c in s.candidates]}
            return {**self.info(), "version": self.version, "organs": organs, "dice": self.dice(),
                    "reference": self.case.label is not None, "undo_steps": len(self.history),
                    "job": self.job.view() if self.job is not None else None,
                    "encoded": len(self.dec.visited), "model": self.engine.model}

    def close(self) -> None:
        with self.lock:
            self._check_idle()
            self.closed = True
        self.dec.cache.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def job_result(job: Job) -> dict:
    """The result of a finished walk, or its error raised (PipelineError for a user's problem)."""
    if not job.done.is_set():
        raise Busy("the walk is still running")
    if job.error is not None:
        err = PipelineError(job.error)
        err.status = job.status
        raise err
    return job.result


# ---------------------------------------------------------------------------------------------- uploads
def _said_of(exc: PipelineError, path: Path, what: str) -> PipelineError:
    """The same message with the server's own temporary path replaced by what the client knows."""
    return PipelineError(str(exc).replace(str(path), what))


def check_volume_file(path: Path, what: str = "the uploaded file") -> None:
    """A CT as preprocess.py takes it, checked before it is read whole: a 3D NIfTI of a sane size with a
    finite affine of sane voxel sizes (its voxels are checked finite when it is read)."""
    try:
        img = read_header(path)
    except PipelineError as exc:
        raise _said_of(exc, path, what) from None
    shape = tuple(int(n) for n in img.shape)
    if min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise PipelineError(f"{what} has {' x '.join(map(str, shape))} voxels; the viewer takes at most {MAX_VOXELS} "
                            f"(e.g. 512 x 512 x {MAX_VOXELS // 512 // 512})")
    affine = np.asarray(img.affine, float)
    spacing = affine_spacing(affine)
    if not np.isfinite(affine).all() or not ((spacing >= SPACING_MM[0]) & (spacing <= SPACING_MM[1])).all():
        raise PipelineError(f"{what} has voxel sizes {np.round(spacing, 4).tolist()} mm; each must be a finite "
                            f"{SPACING_MM[0]}..{SPACING_MM[1]} mm (is its affine right?)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PipelineError(f"{what} has a degenerate affine (its axes are not independent)")


def nifti_suffix(data: bytes) -> str:
    return ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"


class Sessions:
    """The open volumes by id, the server's own folder for their files, and the background encoder."""

    def __init__(self, engine: Engine, max_volumes: int = 8, background_slices: int = 16, root=None):
        self.engine = engine
        self.max_volumes = max_volumes
        self.background_slices = background_slices
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="sam-btcv-viewer-")) if root is None else Path(root)
        self._by_id: dict[str, VolumeSession] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.background_error: str | None = None
        self._thread = None
        if background_slices > 0:
            self._thread = threading.Thread(target=self._background, name="background-encoder", daemon=True)
            self._thread.start()

    def get(self, vid: str) -> VolumeSession:
        with self._lock:
            session = self._by_id.get(vid)
        if session is None or session.closed:
            raise NotFound("no volume with this id (it was closed, or the server restarted)")
        return session

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._by_id)

    def open_bytes(self, data: bytes, name: str = "upload", label: bytes | None = None,
                   what: str = "the uploaded file") -> VolumeSession:
        """A CT from its NIfTI bytes (kept in the server's own folder), checked and loaded; `label`: a
        reference label map opened for editing. Errors name the file as `what`."""
        with self._lock:
            if len(self._by_id) >= self.max_volumes:
                raise PipelineError(f"{len(self._by_id)} volumes are open, the most this server keeps; close one "
                                    f"(DELETE /api/volumes/ID) first")
        vid = uuid.uuid4().hex
        folder = self.root / vid
        folder.mkdir(parents=True)
        try:
            path = folder / f"image{nifti_suffix(data)}"
            path.write_bytes(data)
            check_volume_file(path, what)
            try:
                case = load_case(name, path, None, self.engine.window)
            except PipelineError as exc:
                raise _said_of(exc, path, what) from None
            session = VolumeSession(vid, case, self.engine, folder)
            session.on_touch = self.wake
            if label is not None:
                self.open_reference(session, label, edit=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self._by_id[vid] = session
        return session

    def open_reference(self, session: VolumeSession, data: bytes, edit: bool = True) -> dict:
        path = session.folder / f"reference{nifti_suffix(data)}"
        path.write_bytes(data)
        try:
            check_volume_file(path, "the reference label")
            return session.open_reference(path, edit)
        except Busy:
            raise
        except PipelineError as exc:
            raise _said_of(_said_of(exc, path, "the reference label"), session.case.image_path, "the CT") from None

    def close(self, vid: str) -> None:
        session = self.get(vid)
        session.close()
        with self._lock:
            self._by_id.pop(vid, None)

    def wake(self) -> None:
        self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for session in list(self._by_id.values()):  # the volumes' files are the server's own copies
            session.dec.cache.close()
            shutil.rmtree(session.folder, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # when empty

    # ------------------------------------------------------------------ background encoding
    def _next_prefetch(self):
        with self._lock:
            sessions = sorted(self._by_id.values(), key=lambda s: s.touched, reverse=True)
        for s in sessions:
            if s.closed or s.busy() or s.focus is None:
                continue
            for d in range(self.background_slices + 1):
                for k in (s.focus + d, s.focus - d):
                    if 0 <= k < s.n_slices and k not in s.dec.visited:
                        return s, k
        return None

    def _background(self) -> None:
        while not self._stop.is_set():
            target = self._next_prefetch()
            if target is None:
                self._wake.wait(timeout=2.0)
                self._wake.clear()
                continue
            session, k = target
            try:
                if not session.dec.prefetch(k):
                    time.sleep(0.05)  # a walk runs there: look again shortly
            except Exception as exc:  # noqa: BLE001 - the background must never stop the server
                self.background_error = f"background encoding of slice {k} failed: {type(exc).__name__}: {exc}"
                print(f"viewer: {self.background_error}", file=sys.stderr, flush=True)
                session.focus = None  # leave that volume alone until the next prompt


# ---------------------------------------------------------------------------------------------- bench
def measure_speed(backbone, image: Path, label: Path, cache_dir: Path, device="cpu", organ: str = "spleen",
                  repeats: int = 20, dtype: str = config.DTYPE, encoder_dtype: str = config.DTYPE) -> dict:
    """What bench.py reports for the viewer (server side, no HTTP, no background encoding), in a new
    `cache_dir`: the first prompt of the process (cold start: also the decoder's first run), the first
    prompt on an unencoded slice once warm, the median of `repeats` prompts on that encoded slice, and a
    walk from a cold cache: encoder passes per visited slice. `label` gives the organ's tight box on its
    largest slice."""
    import torch

    engine = load_engine(device=torch.device(device), dtype=dtype, encoder_dtype=encoder_dtype, cache_dir=cache_dir,
                         backbone=backbone)
    sessions = Sessions(engine, background_slices=0, root=Path(cache_dir) / "sessions")
    try:
        session = sessions.open_bytes(Path(image).read_bytes(), Path(image).name)
        ref = load_case("ref", session.case.image_path, Path(label), engine.window).label
        gt = ref == ORGAN_ID[organ]
        k = int(np.argmax(gt.sum(axis=(1, 2))))
        box = bound_box(gt[k]).tolist()
        cold = session.prompt(organ, {"slice": (k + session.n_slices // 2) % session.n_slices, "box": box})["seconds"]
        first = session.prompt(organ, {"slice": k, "box": box})["seconds"]
        times = [session.prompt(organ, {"slice": k, "box": box})["seconds"] for _ in range(repeats)]
    finally:
        sessions.shutdown()
    walks = Sessions(replace(engine, cache_dir=Path(cache_dir) / "cold"), background_slices=0,
                     root=Path(cache_dir) / "sessions-cold")
    try:  # a walk from a cold cache (another cache folder): the prompted slice's pass, then the walk's
        s2 = walks.open_bytes(Path(image).read_bytes(), Path(image).name)
        s2.prompt(organ, {"slice": k, "box": box})
        res = s2.propagate(ORGAN_ID[organ])
    finally:
        walks.shutdown()
    passes = res["encoder_passes"] + 1
    return {"prompt_encoded_median_s": statistics.median(times), "prompt_first_s": first, "prompt_cold_start_s": cold,
            "prompts": repeats, "slice": k, "shape": list(ref.shape), "walk_visited": res["visited"],
            "walk_encoder_passes": passes, "walk_passes_per_visited_slice": passes / max(res["visited"], 1),
            "walk_seconds": res["seconds"]}
