"""The challenge's interactive protocol (`sambtcv.engine.segfm`) run in one process through the engine
(`sambtcv.engine.editor.Editor`): a 3D box per organ, then clicks at the largest error, scored after each step.

`run_case` is what `interactive_eval.py` runs on every case of a dataset; `predict_segfm.py` makes the
same calls from the challenge's files, one process per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sambtcv.core.names import organ_name
from sambtcv.core.prompts import bound_box
from sambtcv.engine import segfm
from sambtcv.engine.editor import Editor
from sambtcv.engine.propagation import merge


@dataclass
class Step:
    """One step of a case: per organ its DSC, NSD, seconds and the click given before it (None at step 1,
    or where the prediction was exact)."""

    dsc: dict = field(default_factory=dict)
    nsd: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    clicks: dict = field(default_factory=dict)


@dataclass
class CaseRun:
    """One case through the protocol: its steps (step 1 = the box, then one per click). A step's seconds
    per organ include encoding the slices it reaches first (as the challenge counts a step's time)."""

    name: str
    organs: list  # label values (BTCV ids, or a challenge file's classes)
    steps: list = field(default_factory=list)
    name_of: object = organ_name  # label value -> the name tables use

    def series(self, metric: str, organ: str) -> list[float]:
        return [getattr(s, metric)[organ] for s in self.steps]

    def summary(self) -> dict:
        """Per organ: DSC and NSD per step, their AUCs over the click steps, final values, seconds per step."""
        out = {}
        for o in (self.name_of(v) for v in self.organs):
            dsc, nsd = self.series("dsc", o), self.series("nsd", o)
            out[o] = {"dsc": dsc, "nsd": nsd, "dsc_auc": segfm.auc(dsc), "nsd_auc": segfm.auc(nsd),
                      "dsc_final": dsc[-1], "nsd_final": nsd[-1], "seconds": self.series("seconds", o),
                      "clicks": [s.clicks.get(o) for s in self.steps[1:]]}
        return out


def class_name(value: int) -> str:
    """How tables name a class of a challenge file (its label value)."""
    return f"class_{int(value)}"


def score(gt: np.ndarray, segs: np.ndarray, organs: list, spacing, step: Step, nsd: bool = True,
          name_of=organ_name) -> None:
    """DSC and NSD of each organ into `step`; NSD is 0 where DSC <= NSD_MIN_DSC, as the challenge counts."""
    for o in organs:
        g, s = gt == o, segs == o
        d = segfm.dsc(g, s)
        step.dsc[name_of(o)] = d
        step.nsd[name_of(o)] = segfm.nsd(g, s, spacing) if nsd and d > segfm.NSD_MIN_DSC else 0.0


FIRST_STEPS = {"box3d": "the challenge's 3D box (z range and a jittered 2D box on the middle voxel's slice), walked "
                        "inside its z range",
               "box": "the viewer's box and P: the organ's tight 2D box on its largest slice, walked until the stop "
                      "rule ends it (no z range)"}


def first_boxes(gt: np.ndarray, organs: list, first: str) -> dict:
    """Each organ's step-1 box (`segfm.Box3D`) by `first` (FIRST_STEPS): the challenge's (one generator seeded
    with BOX_SEED, one draw per organ in id order), or the tight box on the organ's largest slice with the
    volume's whole z range (walked without a range: see `run_case`)."""
    if first == "box3d":
        rng = np.random.RandomState(segfm.BOX_SEED)
        return {o: segfm.challenge_box(gt == o, rng) for o in organs}
    out = {}
    for o in organs:
        g = gt == o
        k = int(np.argmax(g.sum(axis=(1, 2))))
        out[o] = segfm.Box3D(0, len(gt) - 1, k, tuple(int(v) for v in bound_box(g[k])))
    return out


def run_case(editor: Editor, name: str, gt: np.ndarray, spacing, organs: list, clicks: int = segfm.CLICK_STEPS,
             nsd: bool = True, name_of=organ_name, first: str = "box3d") -> CaseRun:
    """The protocol on one CT: `gt` (K, H, W) BTCV ids on the editor's slices, `spacing` (z, y, x) mm; the
    organs scored are `organs` (those present); step 1 by `first` (FIRST_STEPS), then `clicks` click steps."""
    organs = [o for o in sorted(organs) if (gt == o).any()]
    run = CaseRun(name, organs, name_of=name_of)
    boxes = first_boxes(gt, organs, first)
    states, step = {}, Step()
    for o in organs:
        b = boxes[o]
        t = time.perf_counter()
        if first == "box3d":
            states[o] = editor.box3d(o, b.z_min, b.z_max, b.z_mid, b.box)
        else:
            states[o] = editor.walk(editor.prompt(None, o, b.z_mid, box=b.box))
        step.seconds[name_of(o)] = time.perf_counter() - t
    segs = merge([s.masks() for s in states.values()], gt.shape)
    score(gt, segs, organs, spacing, step, nsd, name_of)
    run.steps.append(step)
    for _ in range(clicks):
        step = Step()
        for o in organs:
            c = segfm.next_click(gt == o, segs == o)
            step.clicks[name_of(o)] = None if c is None else [c.z, c.y, c.x, "fg" if c.positive else "bg"]
            t = time.perf_counter()
            if c is not None:
                states[o] = editor.correct(states[o], c.z, c.x, c.y, c.positive)
            step.seconds[name_of(o)] = time.perf_counter() - t
        segs = merge([s.masks() for s in states.values()], gt.shape)
        score(gt, segs, organs, spacing, step, nsd, name_of)
        run.steps.append(step)
    return run


def predict(editor: Editor, case, store=None, settings: str = "") -> np.ndarray:
    """A challenge file's `segs` (D, H, W uint8; class i + 1 for the i-th box / clicks entry): each class's
    box walked and every click given so far applied in order, as `run_case` applies them, so a step run in
    a new process gives what one long session gives (embeddings come from the content-keyed cache). With
    a `store` (`sambtcv.engine.states.StateStore`) each class starts from the state saved for the longest prefix
    of its clicks (under the engine's `settings`), and its new state is saved for the next step."""
    from sambtcv.engine.propagation import volume_identity
    from sambtcv.engine.states import state_key

    volume = volume_identity(case.imgs) if store is not None else ""
    states = []
    for i in range(case.n_classes):
        box = case.boxes[i] if case.boxes is not None else None
        clicks = case.clicks[i] if case.clicks else []
        state, done = None, 0
        if store is not None:
            for m in range(len(clicks), -1, -1):
                state = store.get(state_key(settings, volume, i + 1, box, clicks[:m]))
                if state is not None:
                    done = m
                    break
        loaded = state is not None
        state = replay(editor, i + 1, box, clicks[done:], state)
        if store is not None and state is not None and (done < len(clicks) or not loaded):
            store.put(state_key(settings, volume, i + 1, box, clicks), state)
            if loaded:  # the challenge never goes back: the earlier step's state is spent
                store.drop(state_key(settings, volume, i + 1, box, clicks[:done]))
        states.append(state)
    return merge([s.masks() for s in states if s is not None], case.imgs.shape)


def replay(editor: Editor, organ: int, box, clicks: list, state=None):
    """One class's state after its 3D box (`sambtcv.engine.segfm.Box3D`, or None) and its clicks in order, or, from
    a saved `state` (the box and earlier clicks already applied), after the `clicks` that follow. Without a
    box the first + click starts the organ (points only, walked without a z range); - clicks before it
    have nothing to remove."""
    if state is None and box is not None:
        state = editor.box3d(organ, box.z_min, box.z_max, box.z_mid, box.box)
    for c in clicks:
        if state is None:
            if c.positive:
                state = editor.walk(editor.prompt(None, organ, c.z, points=[(c.x, c.y)], labels=[1]))
            continue
        state = editor.correct(state, c.z, c.x, c.y, c.positive)
    return state
