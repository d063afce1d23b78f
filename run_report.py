"""The whole report in one command: phantom (or your data), Tasks 1-3, baselines, 3D, REPORT.md.

    python run_report.py                          # quick profile on the embedded default (MobileSAM + phantom)
    python run_report.py --model litemedsam       # the same report on LiteMedSAM
    python run_report.py --profile full --device cuda
    python run_report.py --data-dir /path/to/BTCV --model vit_h \
        --checkpoint checkpoints/sam_vit_h_4b8939.pth --profile full

Runs, in order, each as the shell command a user would type, each with ``--profile PROFILE``
(profiles/<PROFILE>.toml says what that sets for each page): preprocessing (writing the synthetic
phantom first when DATA_DIR is empty), segmentation_task1.py (for MODEL, and for each of
COMPARE_MODELS on the same slices), finetune_task2.py --prompt all, baselines.py (U-Net, ResU-Net,
DeepLabV3, SwinUNETR trained on the same slices for Table 3), classify_train_task3.py,
classify_val_task3.py and segment_volume.py on the validation volumes. Each stage writes records
(RESULTS_DIR/records/); the report writes its own record listing them, and RESULTS_DIR/REPORT.md is built
from those records alone, with Tables 1 to 4, Figures 1 to 3, the 3D section, the models, the data,
seeds, package versions and the time of each stage. Stages are restartable: a stage whose inputs
(command, slices, code and profiles) are unchanged and whose records exist is skipped
(RESULTS_DIR/stages.json); pass --force to redo all. A stage never outlives the report: killing the
report (kill -9, a closed terminal, an out-of-memory kill, Ctrl-C) stops the stage that was running.
"""
from __future__ import annotations

import time
from pathlib import Path

from sambtcv.cli import flag, parse_config, results_folder, run_main, start_run
from sambtcv.core import config, names
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, read_json
from sambtcv.data.slices import PREPROCESS_FILE
from sambtcv.models import precision
from sambtcv.models.backbones import check_model_name
from sambtcv.study import records
from sambtcv.study.report import write_report
from sambtcv.study.stages import Stages

# ---------------------------------------------------------------------------------------------- config
PROFILE = "quick"  # quick (minutes on a 2-core CPU) | full (the report's settings; for a GPU) | smoke (tests)
DATA_DIR = None  # a BTCV download (any layout of docs/CONTRACT.md); empty: the synthetic phantom
MODEL = config.MODEL  # model of Tasks 1-3: mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights for vit_* (default checkpoints/<official name>)
COMPARE_MODELS = "mobilesam,litemedsam"  # zero-shot models shown beside MODEL in Table 1 (comma list; empty: none)
RESULTS_DIR = config.RESULTS_DIR  # REPORT.md, tables, records and figures go here
WORK_DIR = "data"  # phantom volumes and slices go below this folder
PHANTOM_VOLUMES = 4  # without DATA_DIR: phantom volumes to write (>= 2)
PHANTOM_SHAPE = "160,160,32"  # without DATA_DIR: voxels of each phantom volume
SEED = config.SEED  # phantom, prompts and training order (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
FORCE = False  # redo every stage
SKIP = ""  # stages to leave out, comma list of: baselines, 3d, interactive (their report sections then say so)
# -----------------------------------------------------------------------------------------------------

OPTIONAL_STAGES = ("baselines", "3d", "interactive")


def optional_stages(cfg) -> list[str]:
    """The stages --skip leaves out (checked before any work)."""
    if not cfg["skip"].strip():
        return []
    with flag("--skip"):
        return names.name_list(cfg["skip"], OPTIONAL_STAGES, "stage", allow_all=False)


def compare_models(cfg) -> list[str]:
    """The zero-shot models beside MODEL in Table 1 (each a known model; checked before any work)."""
    listed = [m.strip() for m in cfg["compare_models"].split(",")]
    if listed == [""]:
        return []
    for name in listed:
        with flag("--compare-models"):
            check_model_name(name)
    return [m for m in dict.fromkeys(listed) if m != cfg["model"]]


def prepare_slices(cfg, stages: Stages, common: list) -> tuple[Path, Path]:
    """The preprocessing stage (the phantom first when no data is given); returns (raw data, slices)."""
    work = Path(cfg["work_dir"])
    if cfg["data_dir"]:
        raw, slices = Path(cfg["data_dir"]), work / "slices_user"
        stages.run("preprocess", ["preprocess.py", "--data-dir", str(raw), "--out-dir", str(slices), *common],
                   None, outputs=[slices / PREPROCESS_FILE])
    else:
        raw, slices = work / f"phantom_{cfg['profile']}", work / f"slices_{cfg['profile']}"
        stages.run("phantom + preprocess",
                   ["preprocess.py", "--synthetic", str(cfg["phantom_volumes"]), "--phantom-shape",
                    cfg["phantom_shape"], "--data-dir", str(raw), "--out-dir", str(slices), *common],
                   None, outputs=[slices / PREPROCESS_FILE])
    return raw, slices


def run_stages(cfg, res: Results, device, others: list[str], skip: list[str]) -> Stages:
    stages = Stages(res, cfg["force"])
    common = ["--seed", str(cfg["seed"]), "--device", str(device), "--profile", cfg["profile"]]
    model = ["--model", cfg["model"]] + (["--checkpoint", cfg["checkpoint"]] if cfg["checkpoint"] else [])
    raw, slices = prepare_slices(cfg, stages, common)
    base = ["--slices", str(slices), *common]
    main = [*base, "--results-dir", str(res.root), *model]
    stages.run("task 1: zero-shot", ["segmentation_task1.py", *main], slices)
    for other in others:
        out = res.zero_shot_of(other)
        stages.run(f"task 1: zero-shot, {other}", ["segmentation_task1.py", *base, "--results-dir", str(out.root),
                                                   "--model", other], slices, folders=[out.root])
    stages.run("task 2: finetune", ["finetune_task2.py", *main, "--prompt", "all"], slices,
               outputs=[res.figure("fig1"), res.figure("fig2")])
    if "baselines" not in skip:
        stages.run("baselines (Table 3)", ["baselines.py", "--slices", str(slices), "--results-dir", str(res.root),
                                           *common], slices)
    stages.run("task 3: classify (train)", ["classify_train_task3.py", *main], slices,
               outputs=[Results.best(res.classifier_run)])
    stages.run("task 3: classify (validate)", ["classify_val_task3.py", *main], slices, outputs=[res.figure("fig3")])
    if "interactive" not in skip:
        stages.run("Table 5: interactive 3D (box + clicks)",
                   ["interactive_eval.py", "--data-dir", str(raw), "--split", "val", "--results-dir", str(res.root),
                    *common, "--cache-dir", str(Path(cfg["work_dir"]) / "embeddings_3d")], slices)
    if "3d" not in skip:
        stages.run("3D: one box per organ", ["segment_volume.py", "--data-dir", str(raw), "--split", "val",
                                             "--results-dir", str(res.root), *model, *common, "--cache-dir",
                                             str(Path(cfg["work_dir"]) / "embeddings_3d")], slices)
    stages.slices = slices
    return stages


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    check_model_name(cfg["model"])
    others = compare_models(cfg)
    skip = optional_stages(cfg)
    if cfg["phantom_volumes"] < 2:
        raise PipelineError(f"--phantom-volumes must be >= 2 (a training and a validation case), got "
                            f"{cfg['phantom_volumes']}")
    res = Results(cfg["results_dir"])
    t0 = time.perf_counter()
    with results_folder(res.root):
        stages = run_stages(cfg, res, device, others, skip)
        params = read_json(stages.slices / PREPROCESS_FILE, "preprocessing record")
        settings = {k: cfg[k] for k in ("profile", "data_dir", "model", "checkpoint", "seed", "phantom_volumes",
                                        "phantom_shape")}
        settings.update(compare_models=others, skip=skip, device=str(device))
        result = {"stages": stages.times, "seconds": round(sum(v["seconds"] for v in stages.times.values()), 1),
                  "profile": config.load_profile(cfg["profile"]), "machine": precision.machine(device),
                  "data": {k: params[k] for k in ("synthetic", "data_dir", "split_source", "counts", "hu_window",
                                                  "orientation")}}
        report = records.write_record(res.root, "report", settings, result, {"id": params["created_id"],
                                                                            "data": str(stages.slices)})
        path = write_report(res.root, report)
    print(f"all stages finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {path.resolve()}")


if __name__ == "__main__":
    run_main(main)
