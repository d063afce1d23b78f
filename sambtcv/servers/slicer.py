"""3D Slicer on this engine: the sessions of the nnInteractive remote protocol (`nninteractive-client` 2.x, what
the SlicerNNInteractive extension speaks), mapped onto `sambtcv.engine.editor` (the HTTP side is
`sambtcv.servers.slicer_app`).

A client claims a *lease* (`Leases`), sends one image and a target buffer, then interactions; each answer is the
part of the target buffer that changed since the client last heard (`SlicerSession.reply`). The mapping:

* image: ``[1, K, J, I]`` in its own dtype (HU for a CT) with ``spacing`` ``[sk, sj, si]`` mm. Slices are
  ``image[0, k]`` (rows j, columns i): Slicer's K axis, the axial one for CT stored as it is acquired. HU are
  windowed as every page windows CT (WINDOW_HU, `sambtcv.data.btcv.window`); a uint8 image is taken as windowed.
  The box model's embeddings of every slice are made (or read from the content-keyed cache) while `set_image`
  runs, so boxes and walks answer in seconds; clicks encode their slices with the point model on first use.
* a box on an axial slice (size 1 along K): the box prompt there, walked as the viewer's P walks (`Editor.walk`);
  a box with depth (bbox3d): the organ bounded to its slices, its 2D box on the middle slice, walked inside
  (`Editor.box3d`, the challenge's 3D box); a box drawn on a coronal or sagittal plane (size 1 along J or I): its
  slices bound the organ and a + point at its centre on its middle slice starts it. A negative box erases the
  organ inside it.
* a point: on an empty target a point prompt and a walk; later a correction click as the protocol engine
  applies it (`Editor.correct`: carried, gated, repaired, anchored).
* a scribble: up to SCRIBBLE_CLICKS clicks spread along it; a lasso on an axial slice: that slice's mask with the
  lasso added (or cut, negative) as a painted anchor, then a walk from it; a lasso on another plane: a scribble.
* an initial segmentation: the organ's starting masks (no anchors), corrected by later interactions.
* undo: the state before the last change (any number of steps); reset: nothing.

Arrays here are numpy, axes ``(K, J, I)`` = the client's; boxes from the client are half-open per axis.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from sambtcv.core.errors import PipelineError
from sambtcv.engine.anchors import OrganState
from sambtcv.engine.editor import EDGE_LOGIT, PAINTED_LOGIT, Editor
from sambtcv.engine.guard import Geometry
from sambtcv.engine.propagation import MIN_AREA, SliceMask

ORGAN = 1  # the target buffer holds one segment: its organ id inside the engine
SCRIBBLE_CLICKS = 5  # clicks spread along a scribble
MAX_HISTORY = 64  # undo steps kept per session
MAX_SLICES = 2048  # an image with more slices is refused (each is encoded once, about 2 MB of cache per model)
MIN_SIDE = 8  # ... and one whose slices are smaller than this many pixels on a side
ENCODE_BATCH = 4  # set_image encodes this many slices at a time, so other leases' clicks get the models between
CAPABILITIES = {
    "supported_interactions": {"points": True, "bbox2d": True, "bbox3d": True, "scribble": True, "lasso": True},
    # the client requires these two; this engine has no interaction channels, so they only name nnInteractive's
    "channel_mapping": {"prev_seg": 0, "bbox2d": [1, 2], "bbox3d": [1, 2], "lasso": [1, 2], "points": [3, 4],
                        "scribble": [5, 6]},
    "num_interaction_channels": 7,
    "supports_initial_label": True,
    "supports_zero_shot_label_refinement": True,
    "preferred_scribble_thickness": [1, 2, 2],
    "interaction_decay": None,
    "supports_undo": True,
    "do_autozoom": False,
    "patch_size": None,
}


class AtCapacity(PipelineError):
    """Every lease is held (HTTP 503)."""


class Expired(PipelineError):
    """An unknown, released or timed-out lease (HTTP 410)."""


# ---------------------------------------------------------------------------------------------- leases
@dataclass
class Lease:
    """One client's hold on the server: its token, clocks (monotonic s) and session. `work` serialises its
    interactions; heartbeats only touch the clocks."""

    token: str
    last_seen: float
    last_active: float
    session: SlicerSession | None = None
    work: threading.Lock = field(default_factory=threading.Lock)


class Leases:
    """The leases a server holds: at most `max_sessions`; one is dropped after `liveness_s` without any request
    or `idle_s` without an interaction (checked on every request)."""

    def __init__(self, max_sessions: int, idle_s: float, liveness_s: float, clock=time.monotonic):
        self.max_sessions, self.idle_s, self.liveness_s, self.clock = max_sessions, idle_s, liveness_s, clock
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def _sweep(self, now: float) -> None:
        for token, lease in list(self._held.items()):
            if now - lease.last_seen > self.liveness_s or now - lease.last_active > self.idle_s:
                del self._held[token]

    def claim(self) -> Lease:
        with self._lock:
            now = self.clock()
            self._sweep(now)
            if len(self._held) >= self.max_sessions:
                raise AtCapacity(f"all {self.max_sessions} sessions are in use; try again when one is released")
            lease = Lease(secrets.token_hex(16), now, now)
            self._held[lease.token] = lease
            return lease

    def get(self, token: str | None, active: bool = False, touch: bool = True) -> Lease:
        """The lease of `token`, its clocks refreshed (`active`: an interaction; `touch` False: neither)."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            lease = self._held.get(token or "")
            if lease is None:
                raise Expired("lease expired or unknown; claim a new one" if token else "lease token missing")
            if touch:
                lease.last_seen = now
                if active:
                    lease.last_active = now
            return lease

    def remaining(self, lease: Lease) -> float:
        return max(0.0, self.idle_s - (self.clock() - lease.last_active))

    def release(self, token: str | None) -> None:
        with self._lock:
            self._held.pop(token or "", None)

    def __len__(self) -> int:
        return len(self._held)


# ---------------------------------------------------------------------------------------------- one session
@dataclass
class Reply:
    """What an interaction answers: whether a prediction ran, the half-open box of the target buffer it changed
    (None: nothing) and that box's contents."""

    ran: bool
    bbox: list | None = None
    values: np.ndarray | None = None


def _hull(changed: np.ndarray) -> list | None:
    """Half-open [[lo, hi], ...] of the True voxels (None when there are none)."""
    if not changed.any():
        return None
    out = []
    for ax in range(changed.ndim):
        hits = np.flatnonzero(changed.any(axis=tuple(a for a in range(changed.ndim) if a != ax)))
        out.append([int(hits[0]), int(hits[-1]) + 1])
    return out


class SlicerSession:
    """One lease's image, target and organ state on the engine (`sambtcv.engine.interactive.Engine`)."""

    def __init__(self, engine, image: np.ndarray, spacing):
        from sambtcv.data.btcv import window
        from sambtcv.engine.background import SessionDecoder

        if image.ndim != 4 or image.shape[0] < 1 or min(image.shape[1:]) < 1:
            raise PipelineError(f"the image must be [C, K, J, I] with C >= 1, got shape {list(image.shape)}")
        if image.shape[1] > MAX_SLICES or min(image.shape[2:]) < MIN_SIDE:
            raise PipelineError(f"the image's {image.shape[1]} slices of {image.shape[2]} x {image.shape[3]} are not a "
                                f"CT this server takes (at most {MAX_SLICES} slices, at least {MIN_SIDE} px a side)")
        if image.dtype.kind == "f" and not np.isfinite(image[0]).all():
            raise PipelineError("the image has NaN or infinite voxels; no HU value can be assumed for them")
        self.shape = image.shape
        self.stack = image[0] if image.dtype == np.uint8 else window(image[0], engine.window)
        self.geo = Geometry.of(spacing) if spacing is not None else Geometry(1.0, 1.0)
        make = [(engine.backbone, engine.decoder, engine.runtime)]
        if engine.point is not None:
            make.append((engine.point.backbone, engine.point.decoder, engine.point.runtime))
        decs = [SessionDecoder(self.stack, b, d, engine.cache_dir, engine.device, engine.dtype, engine.encoder_dtype,
                               r, gate=engine.gate) for b, d, r in make]
        self.editor = Editor(decs[0], engine.rules(self.geo), decs[-1] if len(decs) > 1 else None)
        self.state: OrganState | None = None
        self.history: list[OrganState | None] = []
        self.target: np.ndarray | None = None
        self.client_view: np.ndarray | None = None  # what the client's target buffer holds, by our replies
        self.last_sent: list | None = None  # the last reply's box: sent again with the next (it may have been lost)

    def encode(self) -> int:
        """Every slice's embedding for the box model (walks), from the cache where it is there; passes made."""
        dec, passes = self.editor.dec, 0
        for first in range(0, len(self.stack), ENCODE_BATCH):
            with dec.gate.use():
                rows = list(range(first, min(first + ENCODE_BATCH, len(self.stack))))
                passes += dec.cache.fill(dec.device, rows=rows, progress=False)
        return passes

    # ------------------------------------------------------------------ the target buffer
    def set_target(self, shape, dtype: str) -> None:
        shape = tuple(shape)
        if shape != tuple(self.shape[1:]):
            raise PipelineError(f"the target buffer must have the image's shape {list(self.shape[1:])}, got "
                                f"{list(shape)}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "biu":
            raise PipelineError(f"the target buffer's dtype must be a bool or integer type, got {dtype!r}")
        self.target = np.zeros(shape, dt)
        self.client_view = self.target.copy()
        self._render()

    def _need_target(self) -> None:
        if self.target is None:
            raise PipelineError("set the target buffer (set_target_buffer) before interacting")

    def _render(self) -> None:
        self.target[...] = 0
        if self.state is not None:
            for k, sm in self.state.slices.items():
                self.target[k][sm.mask] = 1

    def reply(self, ran: bool = True) -> Reply:
        """The target buffer's part that differs from what the client holds (which it now holds), with the last
        reply's part again: a client that timed out never got it, and a reply overwrites, so resending is safe."""
        if self.target is None:
            return Reply(ran)
        changed = self.target != self.client_view
        if self.last_sent is not None:
            changed[tuple(slice(lo, hi) for lo, hi in self.last_sent)] = True
        bbox = _hull(changed)
        self.last_sent = bbox
        if bbox is None:
            return Reply(ran)
        sub = tuple(slice(lo, hi) for lo, hi in bbox)
        self.client_view[sub] = self.target[sub]
        return Reply(ran, bbox, self.target[sub].copy())

    def _change(self, new: OrganState | None) -> None:
        self.history = [*self.history[-(MAX_HISTORY - 1):], self.state]
        self.state = new
        self._render()

    # ------------------------------------------------------------------ interactions
    def reset(self) -> None:
        """Nothing given, nothing segmented; the client zeroes its buffer itself."""
        self.state, self.history, self.last_sent = None, [], None
        if self.target is not None:
            self._render()
            self.client_view[...] = 0

    def undo(self) -> bool:
        """The state before the last change; False when there is none."""
        if not self.history:
            return False
        self.state = self.history.pop()
        self._render()
        return True

    def initial(self, seg: np.ndarray) -> None:
        """The organ's starting masks from a segmentation of the image's shape (no anchors); the client copies it
        into its own buffer."""
        self._need_target()
        if seg.shape != self.target.shape:
            raise PipelineError(f"the initial segmentation must have the image's shape {list(self.target.shape)}, "
                                f"got {list(seg.shape)}")
        slices = {int(k): _mask(seg[k] > 0) for k in np.flatnonzero((seg > 0).any(axis=(1, 2)))}
        self.history, self.last_sent = [], None
        self.state = OrganState(ORGAN, slices, walked=True) if slices else None
        self._render()
        self.client_view[...] = seg.astype(self.target.dtype)  # the client copies the values as sent

    def bbox(self, box, positive: bool) -> None:
        self._need_target()
        (k0, k1), (j0, j1), (i0, i1) = self._box(box)
        if not positive:
            self._erase(k0, k1, j0, j1, i0, i1)
            return
        ed, km = self.editor, (k0 + k1 - 1) // 2
        if k1 - k0 == 1:  # an axial box: the viewer's box and P
            start = ed.prompt(_reaching(self.state, k0), ORGAN, k0, box=(i0, j0, i1 - 1, j1 - 1), fresh=True)
            self._change(ed.walk(start, k0))
        elif j1 - j0 > 1 and i1 - i0 > 1:  # a 3D box: the challenge's
            self._change(ed.box3d(ORGAN, k0, k1 - 1, km, (i0, j0, i1 - 1, j1 - 1)))
        else:  # drawn on a coronal or sagittal plane: its slices, and a + point at its centre
            state = OrganState(ORGAN, z_range=(k0, k1 - 1))
            x, y = (i0 + i1 - 1) / 2, (j0 + j1 - 1) / 2
            self._change(ed.walk(ed.prompt(state, ORGAN, km, points=[(x, y)], labels=[1])))

    def point(self, coords, positive: bool) -> None:
        self._need_target()
        k, y, x = self._voxel(coords)
        self._change(self._click(self.state, k, x, y, positive))

    def _click(self, state: OrganState | None, k: int, x: float, y: float, positive: bool) -> OrganState | None:
        ed = self.editor
        if state is None or not any(sm.area >= MIN_AREA for sm in state.slices.values()):
            if not positive:
                return state
            return ed.walk(ed.prompt(None, ORGAN, k, points=[(x, y)], labels=[1]))
        if state.z_range is not None and not state.in_range(k, ed.n_slices) and not positive:
            return state
        return ed.correct(state, k, x, y, positive)

    def scribble(self, mask: np.ndarray, positive: bool) -> None:
        self._need_target()
        voxels = np.argwhere(mask)
        if len(voxels) == 0:
            raise PipelineError("the scribble holds no voxel")
        pick = voxels[np.unique(np.linspace(0, len(voxels) - 1, min(len(voxels), SCRIBBLE_CLICKS)).round().astype(int))]
        state = self.state
        for k, y, x in pick:
            state = self._click(state, int(k), float(x), float(y), positive)
        self._change(state)

    def lasso(self, mask: np.ndarray, positive: bool) -> None:
        self._need_target()
        ks = np.flatnonzero(mask.any(axis=(1, 2)))
        if len(ks) == 0:
            raise PipelineError("the lasso holds no voxel")
        if len(ks) > 1:  # drawn on a coronal or sagittal plane
            self.scribble(mask, positive)
            return
        k = int(ks[0])
        old = self.state.slices.get(k) if self.state is not None else None
        drawn = mask[k] > 0
        now = (old.mask | drawn) if (old is not None and positive) else (drawn if positive else
                                                                         (old.mask & ~drawn if old is not None
                                                                          else np.zeros_like(drawn)))
        ed = self.editor
        painted = ed.paint(_reaching(self.state, k), ORGAN, k, now)
        self._change(ed.walk(painted, k) if painted.slices[k].area >= MIN_AREA else painted)

    def full_mask(self, data: np.ndarray, bbox) -> np.ndarray:
        """A scribble's or lasso's crop placed in the image (`bbox` half-open, or None: `data` is whole)."""
        shape = self.shape[1:]
        if data.ndim != 3:
            raise PipelineError(f"a mask must have 3 axes, got shape {list(data.shape)}")
        if bbox is None:
            if data.shape != shape:
                raise PipelineError(f"a mask without interaction_bbox must have the image's shape {list(shape)}")
            return data > 0
        (k0, k1), (j0, j1), (i0, i1) = self._box(bbox)
        if data.shape != (k1 - k0, j1 - j0, i1 - i0):
            raise PipelineError(f"the mask's shape {list(data.shape)} is not its interaction_bbox's "
                                f"{[k1 - k0, j1 - j0, i1 - i0]}")
        out = np.zeros(shape, bool)
        out[k0:k1, j0:j1, i0:i1] = data > 0
        return out

    # ------------------------------------------------------------------ checks and helpers
    def _box(self, box) -> tuple:
        """Three half-open [first, end) pairs, rounded and clipped to the image (a drag that ends past its edge
        is the box up to the edge); a box wholly outside it is refused."""
        try:
            pairs = [(int(round(float(lo))), int(round(float(hi)))) for lo, hi in box]
        except (TypeError, ValueError, OverflowError):
            raise PipelineError("a box is three [first, end) pairs of voxel indices") from None
        if len(pairs) != 3 or any(hi <= lo for lo, hi in pairs):
            raise PipelineError(f"the box {box} is not three [first, end) pairs with first < end")
        out = []
        for (lo, hi), n in zip(pairs, self.shape[1:]):
            if hi <= 0 or lo >= n:
                raise PipelineError(f"the box {box} lies outside the image {list(self.shape[1:])}")
            lo, hi = max(lo, 0), min(hi, n)
            out.append((lo, hi))
        return tuple(out)

    def _voxel(self, coords) -> tuple[int, int, int]:
        try:
            k, j, i = (int(round(float(v))) for v in coords)
        except (TypeError, ValueError, OverflowError):
            raise PipelineError("a point is three voxel indices [k, j, i]") from None
        if not all(0 <= v < n for v, n in zip((k, j, i), self.shape[1:])):
            raise PipelineError(f"the point {list(coords)} lies outside the image {list(self.shape[1:])}")
        return k, j, i

    def _erase(self, k0, k1, j0, j1, i0, i1) -> None:
        if self.state is None:
            self._change(None)  # an undo step all the same: Slicer counts every box
            return
        slices = dict(self.state.slices)
        for k in range(k0, k1):
            if k in slices:
                sm = slices[k]
                cut = np.zeros_like(sm.mask)
                cut[j0:j1, i0:i1] = True
                slices[k] = SliceMask(sm.mask & ~cut, np.where(cut, -PAINTED_LOGIT, sm.logits).astype(np.float32),
                                      sm.iou, None)
        self._change(replace(self.state, slices=slices))


def _reaching(state: OrganState | None, k: int) -> OrganState | None:
    """`state` with its slice range (from a 3D box) widened to slice k: a box or lasso there says the organ is
    there too."""
    if state is None or state.z_range is None:
        return state
    lo, hi = state.z_range
    return replace(state, z_range=(min(lo, k), max(hi, k)))


def _mask(m: np.ndarray) -> SliceMask:
    return SliceMask(m.copy(), np.where(m, np.float32(EDGE_LOGIT), np.float32(-EDGE_LOGIT)), 1.0, None)
