"""Section 6b: the viewer's server side (no HTTP): prompts, clicks, corrections and a walk's passes."""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import ORGAN_ID
from sambtcv.core.prompts import bound_box
from sambtcv.engine.volume import load_case
from sambtcv.models import precision
from sambtcv.models.backbones import load_backbone


def measure_viewer(backbone, image: Path, label: Path, cache_dir: Path, device="cpu", organ: str = "spleen",
                   repeats: int = 20, dtype: str = config.DTYPE, encoder_dtype: str = config.DTYPE,
                   point_backbone=None) -> dict:
    """What bench.py reports for the viewer (server side, no HTTP, no background encoding), in a new
    `cache_dir`: the first prompt of the process (cold start: also the decoder's first run), the first
    prompt on an unencoded slice once warm, the median of `repeats` prompts on that encoded slice, and a
    walk from a cold cache: encoder passes per visited slice. `label` gives the organ's tight box on its
    largest slice."""

    from sambtcv.engine.interactive import load_engine
    from sambtcv.servers.sessions import Sessions

    engine = load_engine(device=torch.device(device), dtype=dtype, encoder_dtype=encoder_dtype, cache_dir=cache_dir,
                         backbone=backbone, point_backbone=point_backbone)
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
        ys, xs = np.nonzero(gt[k])
        inside = [float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]
        outside = [float(max(box[0] - 3, 0)), float(max(box[1] - 3, 0))]
        session.prompt(organ, {"slice": k, "points": [inside], "labels": [1]})  # the point model's first use
        clicks = [session.prompt(organ, {"slice": k, "points": [outside if i % 2 else inside], "labels": [i % 2 ^ 1]})
                  ["seconds"] for i in range(repeats)]
        joint = [session.prompt(organ, {"slice": k, "box": box, "points": [inside, outside], "labels": [1, 0],
                                        "mode": "new"})["seconds"] for _ in range(repeats)]
    finally:
        sessions.shutdown()
    walks = Sessions(replace(engine, cache_dir=Path(cache_dir) / "cold"), background_slices=0,
                     root=Path(cache_dir) / "sessions-cold")
    try:  # a walk from a cold cache (another cache folder): the prompted slice's pass, then the walk's
        s2 = walks.open_bytes(Path(image).read_bytes(), Path(image).name)
        s2.prompt(organ, {"slice": k, "box": box})
        res = s2.propagate(ORGAN_ID[organ])
        corrections = correction_seconds(s2, organ, gt, k, repeats)
    finally:
        walks.shutdown()
    passes = res["encoder_passes"] + 1
    return {"prompt_encoded_median_s": statistics.median(times), "prompt_first_s": first, "prompt_cold_start_s": cold,
            "click_median_s": statistics.median(clicks), "box_and_points_median_s": statistics.median(joint),
            "prompts": repeats, "slice": k, "shape": list(ref.shape), "walk_visited": res["visited"],
            "walk_encoder_passes": passes, "walk_passes_per_visited_slice": passes / max(res["visited"], 1),
            "walk_seconds": res["seconds"], "corrections": len(corrections),
            "correction_median_s": statistics.median(corrections) if corrections else None}


def correction_seconds(session, organ: str, gt: np.ndarray, k: int, repeats: int) -> list[float]:
    """Server seconds of clicks on walked slices of `organ` (corrections: carried to the neighbours that share
    their error, gated by intensity), a + click inside the organ on each walked slice near k in turn."""
    masks = session.organs[ORGAN_ID[organ]].slices
    walked = [j for j in range(session.n_slices) if j != k and gt[j].any() and j in masks]
    out = []
    for j in sorted(walked, key=lambda j: abs(j - k))[:repeats]:
        ys, xs = np.nonzero(gt[j])
        out.append(session.prompt(organ, {"slice": j, "points": [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]],
                                          "labels": [1]})["seconds"])
    return out


def viewer_dtype(cfg, device) -> str:
    """VIEWER_DTYPE resolved on `device` (auto: bf16 where PyTorch computes it natively)."""
    return precision.resolve(cfg["viewer_dtype"], precision.support(device, "torch")).used


def bench_viewer(cfg, backbone, sets: dict, work: Path, device) -> dict:
    """The viewer's server side (no HTTP): a prompt on an encoded slice (median of 20), the first prompt
    on an unencoded slice, and a walk's encoder passes per visited slice (`sambtcv.engine.interactive`)."""
    image, label = sets["val_volumes"][0]
    dtype = viewer_dtype(cfg, device)
    point = load_backbone(cfg["viewer_point_model"], None, device) if cfg["viewer_point_model"] else None
    out = measure_viewer(backbone, image, label, work / "viewer", device, organ="spleen", repeats=20,
                         dtype=dtype, encoder_dtype=dtype, point_backbone=point)
    print(f"bench: viewer prompt median {out['prompt_encoded_median_s']:.3f} s, first {out['prompt_first_s']:.3f} s, "
          f"{out['walk_passes_per_visited_slice']:.2f} passes per visited slice", flush=True)
    return {"viewer": {**out, "dtype": dtype, "model": backbone.name,
                       "note": "sambtcv.bench.viewer.measure_viewer: server-side seconds of VolumeSession.prompt, no "
                               "HTTP, no background encoding; first = warm process, slice not yet encoded"}}


def reading_seconds(value) -> float:
    """VIEWER_READ_S: seconds a user reads before the box (a finite number > 0; the box at once is the other run)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise PipelineError(f"{{subject}} must be a number of seconds > 0 (the box sent at once is the other run), got "
                            f"{value!r}", "the reading time")
    return seconds


def first_walk(engine, image: Path, label: Path, organ: str, read_s: float, root: Path) -> dict:
    """The viewer's first box + P on a CT from its opening, as a user meets it (server side, no HTTP; the
    background encoder on, every slice; a cold cache under `root`): the CT opened, `read_s` s of the user reading
    it, a tight box on the organ's largest slice, then the walk. Seconds from the opening and from the box to the
    walk's end, the slices encoded when the box came, and the walk's encoder passes."""
    from sambtcv.servers.server import Settings
    from sambtcv.servers.sessions import Sessions

    gt = load_case("ref", image, label, engine.window).label == ORGAN_ID[organ]
    k = int(np.argmax(gt.sum(axis=(1, 2))))
    sessions = Sessions(replace(engine, cache_dir=root / "cache"), background_slices=Settings().background_slices,
                        root=root / "sessions")
    try:
        t0 = time.perf_counter()
        session = sessions.open_bytes(Path(image).read_bytes(), Path(image).name)
        time.sleep(max(read_s - (time.perf_counter() - t0), 0.0))
        t1, encoded = time.perf_counter(), len(session.dec.visited)
        session.prompt(organ, {"slice": k, "box": bound_box(gt[k]).tolist()})
        walk = session.propagate(ORGAN_ID[organ])
        t2 = time.perf_counter()
        dsc = float(dice_score(session.labels() == ORGAN_ID[organ], gt))
    finally:
        sessions.shutdown()
    return {"read_s": read_s, "open_to_walk_s": round(t2 - t0, 2), "box_to_walk_s": round(t2 - t1, 2),
            "encoded_at_box": encoded, "slices": int(len(gt)), "walk_encoder_passes": walk["encoder_passes"],
            "walk_visited": walk["visited"], "dsc": round(dsc, 4)}


def bench_first_walk(cfg, backbone, work: Path, device) -> dict:
    """The viewer's first box + P on the interactive measurement's first 512 x 512 CT (`first_walk`), the box sent
    at once and after VIEWER_READ_S s of reading, each from a cold cache."""
    from sambtcv.bench.protocols import interactive_cases
    from sambtcv.engine.interactive import load_engine

    name, image, label = interactive_cases(cfg, work)[0]
    dtype = viewer_dtype(cfg, device)
    engine = load_engine(device=torch.device(device), dtype=dtype, encoder_dtype=dtype, cache_dir=work / "first_walk",
                         backbone=backbone)
    runs = [first_walk(engine, image, label, "liver", read, work / "first_walk" / f"read_{read:g}")
            for read in (0.0, reading_seconds(cfg["viewer_read_s"]))]
    for r in runs:
        print(f"bench: viewer first box + P on {name}, box after {r['read_s']:g} s: {r['open_to_walk_s']:.1f} s from "
              f"opening, {r['box_to_walk_s']:.1f} s from the box ({r['walk_encoder_passes']} passes)", flush=True)
    return {"viewer_first_walk": {"case": name, "model": backbone.name, "dtype": dtype, "organ": "liver", "runs": runs,
                                  "note": "sambtcv.bench.viewer.first_walk: server side, background encoder on, cold "
                                          "cache; the box on the liver's largest slice, then P"}}
