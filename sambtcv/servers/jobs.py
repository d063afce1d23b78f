"""A session's walk: `Job` (what the page sees while it runs), `Walking` (a `sambtcv.servers.sessions.VolumeSession`
starts it in a thread of its own and commits its result) and `job_result`. `Busy` is the error of a change asked for
while a walk runs; `span` the slices a change touched."""
from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from sambtcv.core.errors import PipelineError
from sambtcv.core.names import organ_name
from sambtcv.engine.anchors import OrganState
from sambtcv.engine.propagation import SliceMask
from sambtcv.engine.volume import walk_report


class Busy(PipelineError):
    """The volume is being propagated; the change must wait for it (HTTP 409)."""


def span(*states) -> list | None:
    """[first, last] slice that any of the states (None allowed) has a mask on, or a walk (`Job`) decoded."""
    ks = [k for s in states if s is not None for k in (s.seen if isinstance(s, Job) else s.slices)]
    return [min(ks), max(ks)] if ks else None


@dataclass
class Job:
    """A walk in progress (or done): what the page shows while it runs."""

    organ: int
    start: int
    base: dict  # the masks shown while the walk replaces some of them
    started: float = field(default_factory=time.perf_counter)
    visited: int = 0
    current: int | None = None
    kept: list = field(default_factory=list)  # slices decoded so far, in the order the walk decoded them
    live: dict = field(default_factory=dict)  # their masks
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: str | None = None
    status: int = 0  # HTTP-like status of an error: 4xx (a PipelineError) or 500
    _last: tuple | None = None
    seen: list = field(default_factory=list)  # every slice the walk decoded

    def saw(self, k: int, sm: SliceMask) -> None:
        """A slice was decoded: the previous one in the same direction was kept by the walk (the last one
        of a direction may be where it stopped, so it shows only once the walk went past it)."""
        self.visited += 1
        self.current = k
        self.seen.append(k)
        d = 1 if k > self.start else -1
        if self._last is not None and self._last[0] == k - d:
            self.kept.append(self._last[0])
            self.live[self._last[0]] = self._last[1]
        self._last = (k, sm)

    def view(self) -> dict:
        return {"organ": organ_name(self.organ), "start": self.start, "running": not self.done.is_set(),
                "directions": ["superior", "inferior"], "visited": self.visited, "current": self.current,
                "kept": list(self.kept), "seconds": round(time.perf_counter() - self.started, 2),
                "result": self.result, "error": self.error}


class Walking:
    """The walk of a `sambtcv.servers.sessions.VolumeSession` (a mixin: it uses the session's lock, decoders,
    editor, organs and `label_slices`)."""

    def start_propagation(self, organ: int) -> Job:
        """Start the organ's walk in a thread of its own, from the anchor changed last (else its first
        anchor) up to the neighbouring anchors, stops or convergence."""
        with self.lock:
            self._check_idle()
            state = self.organs.get(organ)
            if state is None or not state.slices:
                raise PipelineError(f"{organ_name(organ)} has no mask yet; prompt it on a slice first")
            start = state.pending if state.pending is not None else state.first_anchor
            if start is None or start not in state.slices:
                raise PipelineError(f"{organ_name(organ)} has no prompted slice to walk from; prompt it there first")
            job = Job(organ, start, dict(state.slices))
            self.job = job
            self.touch(start)
            self.dec.paused = True
        threading.Thread(target=self._walk, args=(job, state), name=f"propagate-{self.id[:8]}", daemon=True).start()
        return job

    def _walk(self, job: Job, state: OrganState) -> None:
        passes0 = self.dec.encoder_passes
        try:
            self.dec.watch = job.saw
            new = self.editor.walk(state, job.start)
            with self.lock:
                self._commit(job.organ, new)
                rng = new.range
                labels = self.label_slices(*rng) if rng else None
                job.result = {"organ": organ_name(job.organ), "slices": rng,
                              "voxels": int((labels == job.organ).sum()) if labels is not None else 0,
                              "encoder_passes": self.dec.encoder_passes - passes0, "visited": job.visited + 1,
                              "seconds": round(time.perf_counter() - job.started, 3),
                              "directions": ["superior", "inferior"],
                              **{k: v for k, v in walk_report(new.masks(), self.n_slices).items()
                                 if k in ("stops", "unsure")},
                              "anchors": new.anchor_list(), "changed": span(state, new, job), "version": self.version}
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


def job_result(job: Job) -> dict:
    """The result of a finished walk, or its error raised (PipelineError for a user's problem)."""
    if not job.done.is_set():
        raise Busy("the walk is still running")
    if job.error is not None:
        err = PipelineError(job.error)
        err.status = job.status
        raise err
    return job.result
