"""Sections 6 and 6e: 3D propagation from one box per organ; a 3D box's walk, every slice against a stride."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sambtcv.core import config
from sambtcv.core.device import sync
from sambtcv.core.errors import PipelineError
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import organ_name
from sambtcv.core.prompts import Prompt, present_organs
from sambtcv.data.btcv import parse_window
from sambtcv.engine.propagation import VolumeDecoder
from sambtcv.engine.volume import WalkSettings, label_prompts, load_case, margin_mm, segment
from sambtcv.models.decoder import load_decoder


def bench_volume(cfg, backbone, sets: dict, work: Path, device) -> dict:
    """segment_volume.py's one-box propagation on the validation volumes, cold embedding cache: seconds
    per organ-volume and encoder passes per visited slice (each slice encoded at most once)."""
    walk = WalkSettings("intensity", margin_mm("auto", backbone.name))
    decoder = load_decoder(backbone).to(device)
    passes = visited = organs = 0
    sync(device)
    t0 = time.perf_counter()
    for n, (image, label) in enumerate(sets["val_volumes"]):
        case = load_case(f"case{n}", image, label, parse_window(config.WINDOW_HU))
        dec = VolumeDecoder(case.stack, backbone, decoder, work / "embeddings_3d", device)
        prompts = label_prompts(case, present_organs(case.label))
        segment(dec, prompts, walk, case.geometry)
        passes, visited, organs = passes + dec.encoder_passes, visited + len(dec.visited), organs + len(prompts)
    sync(device)
    seconds = time.perf_counter() - t0
    print(f"bench: 3D {organs} organ-volumes in {seconds:.1f} s, {passes} passes / {visited} slices", flush=True)
    return {"volume_3d": {"organ_volumes": organs, "seconds": round(seconds, 2),
                          "seconds_per_organ_volume": seconds / max(organs, 1), "encoder_passes": passes,
                          "visited_slices": visited, "passes_per_visited_slice": passes / max(visited, 1),
                          "stop": walk.stop, "margin_mm": walk.margin_mm,
                          "note": "one box per organ on its largest slice, propagated (sambtcv.engine.volume.segment); "
                                  "cold cache; includes loading each volume"}}


def _stride_cases(cfg, work: Path) -> list:
    """(name, image, label) of the stride measurement: STRIDE_CT's val split, or one phantom at STRIDE_SHAPE
    with STRIDE_SLICE_MM slices."""
    from sambtcv.data.btcv import find_cases, phantom_shape
    from sambtcv.data.phantom import DEFAULT_SPACING, write_phantom

    if cfg["stride_ct"]:
        return find_cases(Path(cfg["stride_ct"]))["val"]
    shape = phantom_shape(cfg["stride_shape"])
    write_phantom(work / "stride_raw", 1, cfg["seed"], shape=shape,
                  spacing=(*DEFAULT_SPACING[:2], slice_mm(cfg["stride_slice_mm"])))
    found = find_cases(work / "stride_raw")
    return (found["train"] + found["val"])[:1]


def slice_mm(value) -> float:
    """A phantom's slice thickness in mm (> 0)."""
    try:
        mm = float(value)
    except (TypeError, ValueError):
        mm = float("nan")
    if not mm > 0:
        raise PipelineError(f"{{subject}} must be a number of mm > 0, got {value!r}", "mm")
    return mm


def bench_stride(cfg, step: float, backbone, work: Path, device) -> dict:
    """The challenge's 3D box per organ (`sambtcv.engine.protocol.first_boxes`) walked through each case twice from a
    cold cache: every slice, and with a stride of `step` mm: encoder passes, seconds, and each organ's DSC
    against the label (the target: the mean change within 0.005)."""
    from sambtcv.engine.protocol import first_boxes
    from sambtcv.engine.volume import OrganPrompt

    decoder = load_decoder(backbone).to(device)
    runs = {}
    for stride in (0.0, step):
        walk = WalkSettings("intensity", margin_mm("auto", backbone.name), stride_mm=stride)
        passes, seconds, masks = 0, 0.0, {}
        for name, image, label in _stride_cases(cfg, work):
            case = load_case(name, image, label, parse_window(config.WINDOW_HU))
            dec = VolumeDecoder(case.stack, backbone, decoder, work / f"stride_{stride:g}", device)
            boxes = first_boxes(case.label, present_organs(case.label), "box3d")
            prompts = [OrganPrompt(o, b.z_mid, Prompt(box=b.box), (b.z_min, b.z_max)) for o, b in boxes.items()]
            t0 = time.perf_counter()
            for om in segment(dec, prompts, walk, case.geometry):
                got = np.zeros(case.label.shape, bool)
                for k, sm in om.slices.items():
                    got[k] = sm.mask
                masks[(name, om.organ)] = (got, case.label == om.organ)
            seconds, passes = seconds + time.perf_counter() - t0, passes + dec.encoder_passes
        runs[stride] = {"encoder_passes": passes, "seconds": round(seconds, 2), "masks": masks}
    every, stepped = runs[0.0], runs[step]
    dsc = {s: {f"{n}/{organ_name(o)}": dice_score(m[0], m[1]) for (n, o), m in r["masks"].items()}
           for s, r in runs.items()}
    diffs = [dsc[step][k] - dsc[0.0][k] for k in dsc[0.0]]
    print(f"bench: stride passes {every['encoder_passes']} -> {stepped['encoder_passes']}, DSC change "
          f"{np.mean(diffs):+.4f} (lowest {min(diffs):+.4f})", flush=True)
    return {"stride": {"stride_mm": step, "every_slice": {k: v for k, v in every.items() if k != "masks"},
                       "stepped": {k: v for k, v in stepped.items() if k != "masks"},
                       "dsc_every_slice": dsc[0.0], "dsc_stepped": dsc[step],
                       "dsc_change_mean": float(np.mean(diffs)), "dsc_change_lowest": float(min(diffs)),
                       "data": cfg["stride_ct"] or f"phantom {cfg['stride_shape']}, {cfg['stride_slice_mm']} mm slices",
                       "note": "bench_stride: the challenge's 3D box per organ, walked (sambtcv.engine.volume.segment) "
                               "from a cold cache each time"}}
