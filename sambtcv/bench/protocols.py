"""Sections 6c and 6d: the challenge's protocol (a process per step) and 3D Slicer's (two clients)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sambtcv.bench.common import run_script
from sambtcv.core.config import ROOT
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import write_json
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import ORGAN_ID


def bench_interactive(cfg, work: Path) -> dict:
    """The challenge's protocol (`tools/segfm_loop.py`): `predict_segfm.py` in a new process per step on a
    512 x 512 CT (the phantom at INTERACTIVE_SHAPE, or INTERACTIVE_CT's val split), spleen, kidneys and
    liver, cold embedding cache: seconds per organ of step 1 and of the click steps (the largest), DSC."""
    from sambtcv.data.btcv import phantom_shape
    from sambtcv.data.phantom import write_phantom

    data = Path(cfg["interactive_ct"]) if cfg["interactive_ct"] else work / "interactive_raw"
    if not cfg["interactive_ct"]:
        shape = phantom_shape(cfg["interactive_shape"])
        write_phantom(data, 1, cfg["seed"], shape=shape)
        write_json(data / "dataset_0.json", {"training": [], "validation": [
            {"image": "RawData/Training/img/img0001.nii.gz", "label": "RawData/Training/label/label0001.nii.gz"}]})
    loop = work / "interactive_loop"
    run = run_script(str(ROOT / "tools" / "segfm_loop.py"),
                     ["--data-dir", data, "--work", loop, "--predictor-args",
                      f"--cache-dir {work / 'interactive_cache'}"], work / "logs" / "interactive.log")
    out = json.loads((loop / "segfm_loop.json").read_text())
    summary = out["summary"]
    print(f"bench: interactive step 1 {summary['seconds_per_class_step1_max']:.1f} s per organ, later steps "
          f"{summary['seconds_per_class_later_steps_max']:.1f} s per organ (largest)", flush=True)
    return {"interactive": {**summary, "seconds": round(run["seconds"], 1), "data": str(data),
                            "cases": {k: {"labels": v["labels"], "steps": v["steps"]} for k, v in out["cases"].items()},
                            "note": "tools/segfm_loop.py: predict_segfm.py in a new process per step, cold embedding "
                                    "cache; a step's seconds per organ = its wall time / the organs of the case"}}


def interactive_cases(cfg, work: Path) -> list:
    """Two 512 x 512 CTs [(name, image, label)]: INTERACTIVE_CT's first two val cases, or two INTERACTIVE_SHAPE
    phantoms written under `work`."""
    from sambtcv.data.btcv import find_cases, phantom_shape
    from sambtcv.data.phantom import write_phantom

    if cfg["interactive_ct"]:
        return find_cases(Path(cfg["interactive_ct"]))["val"][:2]
    raw = work / "slicer_raw"  # written once a run (bench_slicer's and bench_first_walk's)
    if not raw.is_dir():
        write_phantom(raw, 2, cfg["seed"], shape=phantom_shape(cfg["interactive_shape"]))
    found = find_cases(raw)
    return (found["train"] + found["val"])[:2]


def _slicer_cts(cfg, work: Path) -> list:
    """Two 512 x 512 CTs as Slicer sends them: (name, HU [1, K, J, I] int16, spacing [sk, sj, si], label [K, J, I])."""
    import nibabel as nib

    out = []
    for name, image, label in interactive_cases(cfg, work):
        img = nib.load(str(image))
        hu = np.ascontiguousarray(np.asarray(img.dataobj).astype(np.int16).transpose(2, 1, 0)[None])
        lab = np.ascontiguousarray(np.asarray(nib.load(str(label)).dataobj).astype(np.uint8).transpose(2, 1, 0))
        si, sj, sk = (float(v) for v in img.header.get_zooms()[:3])
        out.append((name, hu, [sk, sj, si], lab))
    return out


def _largest_error_click(pred: np.ndarray, gt: np.ndarray) -> tuple:
    """([k, j, i], positive) of the challenge's next click (`sambtcv.engine.segfm.next_click`) in the client's axes."""
    from sambtcv.engine import segfm

    c = segfm.next_click(gt, pred)
    return [c.z, c.y, c.x], c.positive


def bench_slicer(cfg, work: Path) -> dict:
    """3D Slicer's protocol: `slicer_server.py` in a subprocess (cold embedding cache, two leases), two clients
    of the unmodified `nninteractive-client`, each with its own 512 x 512 CT: set_image, a box on the liver's
    largest axial slice, 3 clicks at the largest error; the seconds of each call, the liver's DSC, and the
    server's peak RSS (VmHWM) with both leases holding their CTs."""
    import socket

    import httpx
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    cts = _slicer_cts(cfg, work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "logs" / "slicer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "slicer_server.py"), "--port", str(port), "--cache-dir",
                                   str(work / "slicer_cache"), "--max-sessions", "2"], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    base, calls, dsc = f"http://127.0.0.1:{port}", [], {}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise PipelineError(f"slicer_server.py did not start (log {log})")
            time.sleep(0.5)
        sessions = [nnInteractiveRemoteInferenceSession(base) for _ in cts]
        for s, (name, hu, spacing, lab) in zip(sessions, cts):
            liver = lab == ORGAN_ID["liver"]
            t0 = time.perf_counter()
            s.set_image(hu, {"spacing": spacing})
            calls.append(("set_image", name, time.perf_counter() - t0))
            target = np.zeros(hu.shape[1:], np.uint8)
            s.set_target_buffer(target)
            k = int(np.argmax(liver.sum(axis=(1, 2))))
            js, is_ = np.nonzero(liver[k])
            t0 = time.perf_counter()
            box = [[k, k + 1], [int(js.min()), int(js.max()) + 1], [int(is_.min()), int(is_.max()) + 1]]
            s.add_bbox_interaction(box, include_interaction=True)
            calls.append(("box", name, time.perf_counter() - t0))
            dsc[name] = [dice_score(target > 0, liver)]
            for _ in range(3):
                where, positive = _largest_error_click(target > 0, liver)
                t0 = time.perf_counter()
                s.add_point_interaction(where, include_interaction=positive)
                calls.append(("click", name, time.perf_counter() - t0))
                dsc[name].append(dice_score(target > 0, liver))
        with open(f"/proc/{server.pid}/status") as f:
            peak_kb = int(next(v for v in f if v.startswith("VmHWM:")).split()[1])
        for s in sessions:
            s.close()
    finally:
        server.terminate()
        server.wait(30)
    set_image = max(c[2] for c in calls if c[0] == "set_image")
    interaction = max(c[2] for c in calls if c[0] != "set_image")
    print(f"bench: slicer server set_image {set_image:.1f} s, interactions at most {interaction:.1f} s, peak RSS "
          f"{peak_kb / 1024:.0f} MiB with {len(cts)} leases", flush=True)
    return {"slicer": {"set_image_s_max": set_image, "interaction_s_max": interaction, "peak_rss_mib": peak_kb / 1024,
                       "leases": len(cts), "shapes": [list(ct[1].shape) for ct in cts], "liver_dsc": dsc,
                       "calls": [{"call": c, "case": n, "seconds": round(t, 2)} for c, n, t in calls],
                       "note": "slicer_server.py in a subprocess, cold embedding cache, the unmodified "
                               "nninteractive-client; DSC of the liver after the box and each click"}}
