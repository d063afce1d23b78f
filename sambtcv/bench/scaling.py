"""Section 5: Task 1's wall time on 1x, 2x, 4x the validation slices."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from sambtcv.bench.common import backbone_flags, run_script, scales_arg
from sambtcv.core.files import Results


def bench_task1_scaling(cfg, sets: dict, work: Path) -> dict:
    by_scale, detail = {}, {}
    for s in scales_arg(cfg["scales"]):
        slices_dir = sets[f"task1_x{s}"]
        shutil.rmtree(slices_dir / "embeddings", ignore_errors=True)  # cold cache
        out = work / "out" / f"task1_x{s}"
        args = ["--slices", slices_dir, "--results-dir", out, "--split", "val", "--prompt", cfg["task1_prompt"],
                "--model", cfg["model"], "--seed", cfg["seed"], "--decode-batch", cfg["decode_batch"]]
        args += backbone_flags(cfg)
        print(f"bench: Task 1 at {s}x (subprocess, cold cache)", flush=True)
        r = run_script("segmentation_task1.py", args, work / "logs" / f"task1_x{s}.log")
        t1 = json.loads(Results(out).table("table1", "json").read_text())
        by_scale[str(s)] = round(r["seconds"], 2)
        detail[str(s)] = {"wall_seconds": round(r["seconds"], 2), "in_script_seconds": t1["seconds"],
                          "n_slices": t1["n_slices"], "n_prompts": t1["timing"]["n_prompts"],
                          "wall_seconds_per_slice": r["seconds"] / t1["n_slices"], "timing": t1["timing"]}
    return {"task1_seconds_by_scale": by_scale,
            "task1_scaling": {"prompt": cfg["task1_prompt"], "runs": detail,
                              "note": "wall time of a segmentation_task1.py subprocess (includes Python start-up "
                                      "and model loading), embeddings deleted before each run"}}
