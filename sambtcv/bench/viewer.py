"""Section 6b: the viewer's server side (no HTTP): prompts, clicks, corrections and a walk's passes."""
from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sambtcv.core import config
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


def bench_viewer(cfg, backbone, sets: dict, work: Path, device) -> dict:
    """The viewer's server side (no HTTP): a prompt on an encoded slice (median of 20), the first prompt
    on an unencoded slice, and a walk's encoder passes per visited slice (`sambtcv.engine.interactive`)."""
    image, label = sets["val_volumes"][0]
    dtype = precision.resolve(cfg["viewer_dtype"], precision.support(device, "torch")).used
    point = load_backbone(cfg["viewer_point_model"], None, device) if cfg["viewer_point_model"] else None
    out = measure_viewer(backbone, image, label, work / "viewer", device, organ="spleen", repeats=20,
                         dtype=dtype, encoder_dtype=dtype, point_backbone=point)
    print(f"bench: viewer prompt median {out['prompt_encoded_median_s']:.3f} s, first {out['prompt_first_s']:.3f} s, "
          f"{out['walk_passes_per_visited_slice']:.2f} passes per visited slice", flush=True)
    return {"viewer": {**out, "dtype": dtype, "model": backbone.name,
                       "note": "sambtcv.bench.viewer.measure_viewer: server-side seconds of VolumeSession.prompt, no "
                               "HTTP, no background encoding; first = warm process, slice not yet encoded"}}
