"""Model use in the viewer's process: one user of the models at a time, and the background encoder.

All model use in the process (encoder and decoder) goes through one `ModelGate`: the embedding cache's file
lock is per process, so two threads must never fill a cache at once, and on a CPU two models running at
once only slow each other. Prompts and walks wait for the gate in turn (first come, first served); the
background encoder (`BackgroundEncoder`: slices near the last prompted one, while a volume is idle) takes
it only when no one else waits and holds it for one slice, so a prompt never waits for more than that one
slice.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time

from sambtcv.core.prompts import Prompt
from sambtcv.engine.propagation import Candidates, SliceMask, VolumeDecoder


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

    def decode(self, k: int, prompt: Prompt, mask_input=None, embedding=None) -> SliceMask:
        with self.gate.use():
            out = super().decode(k, prompt, mask_input, embedding)
        if self.watch is not None:
            self.watch(k, out)
        return out

    def candidates(self, k: int, prompt: Prompt, mask_input=None) -> Candidates:
        with self.gate.use():
            return super().candidates(k, prompt, mask_input)

    def prefetch(self, k: int) -> bool:
        """Encode slice k (lower priority) unless it is encoded or a walk is running; True if it did."""
        with self.gate.use(background=True):
            if self.paused or k in self.visited:
                return False
            self.embedding(k)
            return True


class BackgroundEncoder:
    """A thread that encodes the slices near each open volume's focus while every volume is idle (no walk runs
    on any): the most recently touched volume first, nearest slices first, up to `slices` away. `sessions()`
    lists the open volumes (objects with `touched`, `closed`, `busy()`, `focus`, `n_slices` and `decoders`)."""

    def __init__(self, sessions, slices: int):
        self.sessions, self.slices = sessions, slices
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="background-encoder", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _next(self):
        sessions = self.sessions()
        if any(s.busy() for s in sessions):  # a walk runs: its gaps between slices are not the background's
            return None
        for s in sorted(sessions, key=lambda s: s.touched, reverse=True):
            if s.closed or s.focus is None:
                continue
            for d in range(self.slices + 1):
                for k in (s.focus + d, s.focus - d):
                    for dec in s.decoders:
                        if 0 <= k < s.n_slices and k not in dec.visited:
                            return s, dec, k
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            target = self._next()
            if target is None:
                self._wake.wait(timeout=2.0)
                self._wake.clear()
                continue
            session, dec, k = target
            try:
                if not dec.prefetch(k):
                    time.sleep(0.05)  # a walk runs there: look again shortly
            except Exception as exc:  # noqa: BLE001 - the background must never stop the server
                self.error = f"background encoding of slice {k} failed: {type(exc).__name__}: {exc}"
                print(f"viewer: {self.error}", file=sys.stderr, flush=True)
                session.focus = None  # leave that volume alone until the next prompt
