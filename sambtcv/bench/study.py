"""Sections 7 and 8: Table 3's baselines' speed; the stage times of the last report."""
from __future__ import annotations

from sambtcv.core import config
from sambtcv.models import precision
from sambtcv.study import records


def bench_baselines(cfg, sets: dict, device) -> dict:
    """Table 3's trained baselines: training samples/s and inference slices/s at the quick profile's input."""
    from sambtcv.study.baseline_nets import BASELINES, measure_speed

    quick = config.load_profile("quick")
    size = quick["baselines"]["input_size"]
    dtype = precision.resolve(quick["all"]["dtype"], precision.support(device)).used  # as the quick report runs
    speeds = measure_speed(list(BASELINES), sets["base"], device, cfg["baseline_samples"], cfg["baseline_batch"],
                           size, dtype, cfg["seed"])
    return {"baselines": {"input_size": size, "dtype": dtype, "batch": cfg["baseline_batch"],
                          "samples": cfg["baseline_samples"], "models": speeds,
                          "note": "baseline_nets.measure_speed: AdamW + DiceCE steps after one warm-up step; "
                                  "inference = forward passes alone"}}


def report_stages(cfg) -> dict:
    """The stage times of the newest report record in REPORT_RESULTS (the last `./run.sh report`), if any."""
    report = records.latest(cfg["report_results"], "report")
    if report is None:
        return {}
    stages = report.result["stages"]
    return {"report_stages": {"model": report.settings["model"], "profile": report.settings["profile"],
                              "results": str(cfg["report_results"]), "record": report.id,
                              "stages": {k: round(v["seconds"], 1) for k, v in stages.items()},
                              "seconds": round(sum(v["seconds"] for v in stages.values()), 1)}}
