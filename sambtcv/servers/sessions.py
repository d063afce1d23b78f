"""The viewer's open volumes: one `VolumeSession` per CT, its organs' states, undo, and the walk running
on it; `Sessions` keeps them by id with the server's own folder for their files.

No web code here (`sambtcv.servers.server` is the HTTP layer) and no segmenting of its own: a session holds the
`sambtcv.engine.anchors.OrganState` of each organ and changes it only through the engine every page shares
(`sambtcv.engine.editor.Editor`, on `sambtcv.engine.background.SessionDecoder` s of the volume), so a box
gives the label map segment_volume.py gives for it and a click does what it does in predict_segfm.py.

Coordinates are the slice frame of the prompts file: slice k, pixel x (column) and y (row) of
``case.stack[k]``. What the page gives on a slice accumulates (`prompt`): a box, then + / - clicks, each
decoded with what the slice holds already; each such slice is an anchor that walks never change; P
(`start_propagation`) walks the organ from the anchor changed last up to the neighbouring anchors, stops
or convergence (`sambtcv.engine.walks`). A brush stroke (`paint`) sets one slice's mask. Every change can be
undone (HISTORY steps per volume).

Concurrency: each session has a lock for its state; a walk runs in a thread of its own (a client that
goes away leaves it running) and other changes to that volume meanwhile raise `Busy`; all model use goes
through the process's `sambtcv.engine.background.ModelGate`.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.core.names import organ_name
from sambtcv.core.prompts import Prompt, present_organs
from sambtcv.data.btcv import check_geometry, read_header
from sambtcv.data.prompts_file import organ_id, parse_slice_prompt
from sambtcv.engine.anchors import OrganState
from sambtcv.engine.background import BackgroundEncoder, SessionDecoder
from sambtcv.engine.editor import Editor
from sambtcv.engine.propagation import SliceMask
from sambtcv.engine.volume import affine_spacing, label_stack, load_case, organ_prompt, walk_report
from sambtcv.servers.jobs import Busy, Job, Walking, span
from sambtcv.servers.label_maps import LabelMaps

HISTORY = 30  # undo steps kept per volume
MAX_VOXELS = 2 ** 28  # an uploaded CT may hold at most this many voxels (512 x 512 x 1024)
SPACING_MM = (0.01, 100.0)  # a sane voxel size, mm, along every axis
REFERENCE_LOGIT = 1e-3  # the logit of a reference label's voxels: any SAM mask of another organ wins there
ID_PATTERN = r"^[0-9a-f]{32}$"  # volume ids (uuid4 hex), made by the server
ZIP_MAGIC = b"PK\x03\x04"  # an uploaded .zip: a DICOM series
PROMPT = "the prompt"  # how messages name a prompt request ("the prompt['box'] values must be ...")


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
    """The (H, W) bool mask of `rle` counts (checked: whole non-negative runs that fill the shape)."""
    if not isinstance(counts, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise PipelineError("mask counts must be a list of whole numbers >= 0 (run lengths, 0s first)")
    if sum(counts) != int(np.prod(shape)):
        raise PipelineError(f"mask counts add up to {sum(counts)}, not the slice's {shape[0]} x {shape[1]} pixels")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)


def _changed(old: OrganState | None, new: OrganState, k: int) -> list:
    """[first, last] slice whose mask differs between two states of an organ (slice k at least)."""
    before = old.slices if old is not None else {}
    ks = [j for j in set(before) | set(new.slices) if before.get(j) is not new.slices.get(j)] + [k]
    return [min(ks), max(ks)]


def _direction(d: int) -> str:
    return "superior" if d > 0 else "inferior"


# ---------------------------------------------------------------------------------------------- a session
class VolumeSession(Walking, LabelMaps):
    """One open CT: its slices, decoders, organs, history and the walk running on it (`Walking`); its label maps
    and downloads (`LabelMaps`)."""

    def __init__(self, vid: str, case, engine, folder: Path):
        self.id, self.case, self.engine, self.folder = vid, case, engine, folder
        self.dec = SessionDecoder(case.stack, engine.backbone, engine.decoder, engine.cache_dir, engine.device,
                                  engine.dtype, engine.encoder_dtype, engine.runtime, gate=engine.gate)
        self.pdec = None
        if engine.point is not None:
            self.pdec = SessionDecoder(case.stack, engine.point.backbone, engine.point.decoder, engine.cache_dir,
                                       engine.device, engine.dtype, engine.encoder_dtype, engine.point.runtime,
                                       gate=engine.gate)
        self.editor = Editor(self.dec, engine.rules(case.geometry), self.pdec)
        self.lock = threading.RLock()
        self.organs: dict[int, OrganState] = {}
        self.history: list[tuple[int, OrganState | None]] = []
        self.version = 0
        self.job: Job | None = None
        self.focus: int | None = self.n_slices // 2  # the slice a viewer shows first: encoding starts there
        self.touched = time.monotonic()
        self.closed = False
        self._image: bytes | None = None
        self._cache: dict = {}  # (what, version) -> value
        self.on_touch = None  # called when the focus moves (wakes the background encoder)
        self.series = None  # sambtcv.data.dicom.Series when the CT came as a DICOM series

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> list[int]:
        return list(self.case.stack.shape)

    @property
    def n_slices(self) -> int:
        return int(self.case.stack.shape[0])

    @property
    def decoders(self) -> list:
        """The decoders the background encoder fills (the point model's only where slices were clicked)."""
        return [self.dec]

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
        """A box and/or points on one slice (``{"slice", "box"?, "points"?, "labels"?, "mode"?}``), added to
        what that slice holds (mode "add") or starting it afresh ("new"), decoded at once. Points alone on
        an organ without masks start it (SAM's three candidates, to cycle with `choose`); points on an
        organ with masks are corrections (`sambtcv.engine.editor.Editor.click`)."""
        organ = organ_id(organ_name_)
        req = parse_slice_prompt(body, PROMPT)
        prompt = Prompt(box=None if req.box is None else np.asarray(req.box, float),
                        points=np.asarray(req.points, float).reshape(-1, 2) if req.points else None)
        op = organ_prompt(organ, req.slice, prompt, self.case.stack.shape[1:], self.n_slices, PROMPT)
        with self.lock:
            self._check_idle()
            self.touch(op.k)
            t0 = time.perf_counter()
            old = self.organs.get(organ)
            fresh = req.mode == "new"
            has_masks = old is not None and any(sm.area for sm in old.slices.values())
            if req.box is not None:
                new = self.editor.prompt(old, organ, op.k, box=req.box, points=req.points, labels=req.labels,
                                         fresh=fresh)
            elif has_masks and not fresh:  # clicks: they add to the slice's prompt and correct its mask, and the
                new = old  # neighbouring slices that share the error (P walks from a click past the organ's end)
                for (x, y), lab in zip(req.points, req.labels):
                    new = self.editor.correct(new, op.k, x, y, bool(lab), walk_ends=False)
            else:
                new = self._points_prompt(old, organ, op.k, req)
            self._commit(organ, new)
            return {**self._mask_reply(new, op.k), "seconds": round(time.perf_counter() - t0, 4),
                    "changed": _changed(old, new, op.k), "propagated": new.walked}

    def _points_prompt(self, old: OrganState | None, organ: int, k: int, req) -> OrganState:
        if 1 not in req.labels:
            raise PipelineError(f"{PROMPT} needs at least one organ point (label 1) where the organ has no mask "
                                f"yet; - points alone say nothing about where it is")
        base = self.editor.clear(old, k) if old is not None else OrganState(organ)
        new = self.editor.prompt(base, organ, k, points=req.points, labels=req.labels, fresh=True)
        found = (self.pdec or self.dec).candidates(k, new.anchors[k].prompt())
        return replace(new, slices={**new.slices, k: found.masks[found.kept]}, candidates=tuple(found.masks),
                       chosen=found.kept)

    def _mask_reply(self, state: OrganState, k: int) -> dict:
        sm = state.slices.get(k) or SliceMask(np.zeros(self.case.stack.shape[1:], bool), None, 0.0)
        sp = state.anchors.get(k)
        return {"organ": organ_name(state.organ), "slice": k, "area": sm.area, "iou": round(float(sm.iou), 4),
                "candidate": state.chosen if state.candidates else None,
                "candidates": [{"iou": round(c.iou, 4), "area": c.area} for c in state.candidates],
                "prompt": sp.as_json() if sp is not None else None,
                "mask": {"shape": list(sm.mask.shape), "order": "C", "counts": rle(sm.mask)}, "version": self.version}

    def choose(self, organ: int, index) -> dict:
        """Show SAM's candidate `index` of the organ's last points prompt instead of the one shown."""
        with self.lock:
            self._check_idle()
            old = self.organs.get(organ)
            if old is None or old.pending is None or not old.candidates:
                raise PipelineError(f"{organ_name(organ)} has no points prompt to choose a mask of; click it first")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(old.candidates):
                raise PipelineError(f"candidate must be a whole number 0..{len(old.candidates) - 1}, got {index!r}")
            new = replace(old, slices={**old.slices, old.pending: old.candidates[index]}, chosen=index)
            self._commit(organ, new)
            return {**self._mask_reply(new, old.pending), "changed": [old.pending, old.pending]}

    def paint(self, organ: int, body) -> dict:
        """One slice's mask as the user painted it (``{"slice", "mask": {"counts", "shape"?}}``): an anchor."""
        if not isinstance(body, dict) or set(body) - {"slice", "mask"} or not {"slice", "mask"} <= set(body):
            raise PipelineError('send {"slice": k, "mask": {"counts": [...]}} (run lengths of the slice, 0s first)')
        k, mask = body["slice"], body["mask"]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.n_slices:
            raise PipelineError(f"slice must be a whole number 0..{self.n_slices - 1}, got {k!r}")
        if not isinstance(mask, dict) or "counts" not in mask or set(mask) - {"counts", "shape", "order"}:
            raise PipelineError('mask must be {"counts": [...]} (run lengths in row-major order, 0s first)')
        hw = tuple(self.case.stack.shape[1:])
        if "shape" in mask and list(mask["shape"]) != list(hw):
            raise PipelineError(f"mask shape must be {list(hw)} (the slice), got {mask['shape']!r}")
        pixels = unrle(mask["counts"], hw)
        with self.lock:
            self._check_idle()
            self.touch(k)
            new = self.editor.paint(self.organs.get(organ), organ, k, pixels)
            self._commit(organ, new)
            return {**self._mask_reply(new, k), "changed": [k, k], "propagated": new.walked}

    def clear_slice(self, organ: int, k) -> dict:
        """Slice k of the organ afresh: its prompt and mask gone, not an anchor any more."""
        with self.lock:
            self._check_idle()
            old = self.organs.get(organ)
            if old is None or (k not in old.anchors and k not in old.slices):
                return {"organ": organ_name(organ), "changed": None, "version": self.version}
            self._commit(organ, self.editor.clear(old, k))
            return {"organ": organ_name(organ), "changed": [k, k], "version": self.version}

    # ------------------------------------------------------------------ undo, erase
    def undo(self) -> dict:
        with self.lock:
            self._check_idle()
            if not self.history:
                raise PipelineError("nothing to undo")
            organ, old = self.history.pop()
            changed = span(self.organs.get(organ), old)
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
            return {"organ": organ_name(organ), "changed": span(old), "version": self.version}

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
                    self._commit(organ, OrganState(organ, slices, walked=True, from_reference=True))
                    changed += [int(present[0]), int(present[-1])]
            self.version += 1
            return {"organs": [organ_name(o) for o in found],
                    "changed": [min(changed), max(changed)] if changed else None, "version": self.version}

    # ------------------------------------------------------------------ what the page shows
    def info(self) -> dict:
        return {"id": self.id, "shape": self.shape, "spacing": [round(float(s), 6) for s in self.case.spacing],
                "name": self.case.name, "dicom": self.series is not None,
                "series": self.series.uid if self.series is not None else None,
                "seg_note": None if self.series is None else self._seg_note()}

    def _seg_note(self) -> str | None:
        from sambtcv.data.dicom import seg_note

        return seg_note(self.series)

    def status(self) -> dict:
        with self.lock:
            organs = {}
            for organ, s in sorted(self.organs.items()):
                rep = walk_report(s.masks(), self.n_slices)
                organs[organ_name(organ)] = {
                    "slices": s.range, "anchor": s.first_anchor, "anchors": s.anchor_list(), "pending": s.pending,
                    "propagated": s.walked, "from_reference": s.from_reference, "stops": rep["stops"],
                    "unsure": rep["unsure"], "candidate": s.chosen if s.candidates else None,
                    "candidates": [{"iou": round(c.iou, 4), "area": c.area} for c in s.candidates]}
            return {**self.info(), "version": self.version, "organs": organs, "dice": self.dice(),
                    "reference": self.case.label is not None, "undo_steps": len(self.history),
                    "job": self.job.view() if self.job is not None else None,
                    "encoded": len(self.dec.visited), "model": self.engine.model,
                    "point_model": self.engine.point_model}

    def close(self) -> None:
        with self.lock:
            self._check_idle()
            self.closed = True
        self._release()

    def _release(self) -> None:
        """Close the caches and remove the server's own copies of this volume's files."""
        for dec in (self.dec, self.pdec):
            if dec is not None:
                dec.cache.close()
        shutil.rmtree(self.folder, ignore_errors=True)


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

    def __init__(self, engine, max_volumes: int = 8, background_slices: int = 16, root=None):
        self.engine = engine
        self.max_volumes = max_volumes
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="sam-btcv-viewer-")) if root is None else Path(root)
        self._by_id: dict[str, VolumeSession] = {}
        self._lock = threading.Lock()
        self.background = BackgroundEncoder(self._open, background_slices) if background_slices > 0 else None

    def _open(self) -> list[VolumeSession]:
        with self._lock:
            return list(self._by_id.values())

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
            series = None
            if data[:4] == ZIP_MAGIC:  # a DICOM series, zipped: read and written as NIfTI on its grid
                series, path = self._series(data, folder, what)
            else:
                path = folder / f"image{nifti_suffix(data)}"
                path.write_bytes(data)
            check_volume_file(path, what)
            try:
                case = load_case(name, path, None, self.engine.window)
            except PipelineError as exc:
                raise _said_of(exc, path, what) from None
            session = VolumeSession(vid, case, self.engine, folder)
            session.series = series
            session.on_touch = self.wake
            if label is not None:
                self.open_reference(session, label, edit=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self._by_id[vid] = session
        self.wake()  # the background encodes while the user looks for the organ
        return session

    @staticmethod
    def _series(data: bytes, folder: Path, what: str):
        """The one CT series of a zip's bytes, unpacked into `folder` and written there as image.nii.gz."""
        from sambtcv.data import dicom

        zipped = folder / "series.zip"
        zipped.write_bytes(data)
        files = folder / "series"
        try:
            dicom.unzip(zipped, files)
            series = dicom.read_series(files, where=what)
        except PipelineError as exc:
            raise _said_of(exc, zipped, what) from None
        finally:
            zipped.unlink(missing_ok=True)
        for note in series.notes:
            print(f"viewer: note: {what}: {note}", file=sys.stderr, flush=True)
        return series, dicom.to_nifti(series, folder / "image.nii.gz")

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
        if self.background is not None:
            self.background.wake()

    @property
    def background_error(self) -> str | None:
        return self.background.error if self.background is not None else None

    def shutdown(self) -> None:
        if self.background is not None:
            self.background.stop()
        for session in self._open():  # the volumes' files are the server's own copies
            session._release()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # when empty
