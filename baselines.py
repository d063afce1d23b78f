"""Table 3's baselines, measured here: U-Net, ResU-Net, DeepLabV3 and SwinUNETR trained on the slices.

    python baselines.py --slices S --results-dir R [--model unet,resunet,deeplabv3,swinunetr|all] [--resume]
    python baselines.py --slices data/slices --results-dir results                      # all four, full recipe
    python baselines.py --slices data/slices --results-dir results --model unet,resunet --profile quick
    python baselines.py --slices data/slices --results-dir results --model all --resume
    python baselines.py --slices data/slices --results-dir results --model unet --resume --eval-slices data/real_slices

Each model is a 14-class 2D segmenter (background + the 13 BTCV organs, no prompt) built by a maintained
library (`sambtcv.study.baseline_nets`: MONAI ``UNet`` for U-Net and ResU-Net, torchvision's
``deeplabv3_resnet50`` with random weights, MONAI ``SwinUNETR(spatial_dims=2)``). Every model trains from
scratch on the training split of SLICES (augmented copies that preprocess.py wrote are training slices
like the others): each slice resized to a square INPUT_SIZE, intensities uint8 / 255, MONAI's
``DiceCELoss``, AdamW, seeded order, with the project's one training loop (`sambtcv.study.training.fit`: epoch
0 = the starting weights, best/last checkpoints in RESULTS_DIR/baselines/<model>/ with epochs.csv, exact
``--resume``, a NaN loss stops the run). The best epoch is chosen by validation mDice on the validation
split, which is also where the table's numbers come from (the report's train/validation-only design), so
read them as optimistic. Scoring uses the project's one Dice. Each model's run writes one record
(RESULTS_DIR/records/baselines/); baselines.json / .md and Table 3 (table3_comparison.json / .md) are
rebuilt from the records, each model's newest run per data set, data sets never mixed in one table.

Settings: the constants below are the recipe for BTCV on a GPU (the ``full`` profile): input 512 x 512
(BTCV's own size, so small organs keep their pixels), 100 epochs over every training slice, batch 16,
AdamW lr 1e-3, weight decay 1e-4, fp32, validation on every validation slice after each epoch;
PER_MODEL gives SwinUNETR batch 8 and lr 1e-4 (MONAI's BTCV tutorial). A profile's ``[baselines]`` table
replaces the constants for every model and its ``[baselines.models.<model>]`` tables replace them for one
model (``profiles/quick.toml``: what the quick report runs on a 2-core CPU, sized to fit its time budget);
a flag given on the command line applies to every model and wins over both.

``--eval-slices S2`` also scores each trained model's best checkpoint on the validation split of
another slices folder (real CT, for the phantom-to-real gap); with ``--resume`` on finished runs it
trains nothing and only scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from sambtcv.cli import flag, parse_config, results_folder, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, fixed, markdown_table
from sambtcv.data.slices import SliceSet
from sambtcv.models import precision
from sambtcv.study import records, tables
from sambtcv.study.baseline_nets import (
    BASELINES,
    SIZE_MULTIPLE,
    Settings,
    check_packages,
    eval_entry,
    load_best,
    model_entry,
    model_keys,
    nonempty_split,
    run_config,
    score,
    train_model,
)
from sambtcv.study.training import check_some_to_resume, precheck_resume

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # output of preprocess.py: models train on its train split and are scored on its val split
RESULTS_DIR = config.RESULTS_DIR  # baselines.json/.md, Table 3, records and baselines/<model>/ checkpoints go here
MODEL = "all"  # all, or a comma list of unet, resunet, deeplabv3, swinunetr
EPOCHS = 100  # passes over each model's training samples (>= 1)
BATCH_SIZE = 16  # slices per optimiser step (>= 1)
LR = 1e-3  # AdamW learning rate (>= 0)
SAMPLES_PER_EPOCH = 0  # training slices per epoch; 0: all of them (>= 0)
VAL_SLICES = 0  # evenly spread validation slices for the per-epoch validation; 0: all (>= 0)
INPUT_SIZE = 512  # side of the square model input in pixels, a multiple of 32 (>= 32)
DTYPE = "fp32"  # auto | fp32 | bf16 autocast of training and inference
WEIGHT_DECAY = config.BASELINE_WEIGHT_DECAY  # AdamW weight decay (>= 0)
EVAL_BATCH = 8  # slices per forward pass when scoring (>= 1)
EVAL_SLICES = None  # also score each best checkpoint on the val split of this slices folder (e.g. real CT)
SEED = config.SEED  # weight initialisation and training order (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
RESUME = False  # continue each model's run from its last.pt (a model without one starts fresh)
# -----------------------------------------------------------------------------------------------------

PER_MODEL = {"swinunetr": {"batch_size": 8, "lr": 1e-4}}  # the transformer's recipe (MONAI's BTCV tutorial)


def resolve_settings(cfg, key: str) -> Settings:
    """The settings `key` trains with: the constants (after the profile's [baselines] table), then
    PER_MODEL and the profile's [baselines.models.<key>] table, then the flags given on the command line."""
    names = [f.name for f in fields(Settings)]
    values = {n: cfg[n] for n in names}
    values.update(PER_MODEL.get(key, {}))
    values.update(cfg.tables.get("models", {}).get(key, {}))
    values.update({n: cfg[n] for n in names if n in cfg.given})
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise PipelineError(f"the profile's [baselines.models.{key}] sets {', '.join(unknown)}; use {', '.join(names)}")
    if values["input_size"] % SIZE_MULTIPLE:
        raise PipelineError(f"--input-size must be a multiple of {SIZE_MULTIPLE} (SwinUNETR's patch merging), "
                            f"got {values['input_size']}")
    with flag("--dtype"):
        precision.check_setting(values["dtype"])
    return Settings(**values)


@dataclass
class Inputs:
    """Everything checked before any work: models, their settings, and the slices."""

    keys: list
    settings: dict  # key -> Settings
    train: SliceSet
    val: SliceSet
    other: SliceSet | None  # --eval-slices' val split
    precision: dict  # key -> how its DTYPE was chosen ({"used", "asked", "reason"})


def check_inputs(cfg, device) -> Inputs:
    """Every user error of the command line, as one line, before the results folder is touched. A model's
    DTYPE "auto" becomes the precision `device` computes natively (`sambtcv.models.precision`)."""
    with flag("--model"):
        keys = model_keys(cfg["model"])
    settings = {k: resolve_settings(cfg, k) for k in keys}
    page_choice = precision.noted().get("dtype")  # start_run's choice for the page's own DTYPE
    found = precision.support(device) if any(s.dtype == precision.AUTO for s in settings.values()) else None
    choices = {}
    for k, s in settings.items():
        if s.dtype == cfg["dtype"] and page_choice is not None:
            choices[k] = page_choice  # the page's DTYPE, as start_run resolved it
        else:  # a per-model setting
            choices[k] = asdict(precision.resolve(s.dtype, found))
        settings[k] = replace(s, dtype=choices[k]["used"])
    check_packages(keys)
    train = nonempty_split(cfg["slices"], "train", "the baselines need training cases")
    val = nonempty_split(cfg["slices"], "val", "the baselines are chosen and scored on validation cases")
    other = None
    if cfg["eval_slices"]:
        other = nonempty_split(cfg["eval_slices"], "val", "--eval-slices scores its val split")
    return Inputs(keys, settings, train, val, other, choices)


def run_models(cfg, inp: Inputs, res: Results, device, resume: dict) -> None:
    """Train and score each model; one record per model."""
    data = tables.slices_of(inp.val)
    for key in inp.keys:
        s, name = inp.settings[key], BASELINES[key].name
        run = train_model(key, s, inp.train, inp.val, res, device, resume[key], cfg["eval_batch"])
        module = load_best(key, run.best, device)
        scores = score(module, inp.val, name, s.input_size, device, s.dtype, cfg["eval_batch"])
        result = {"name": name, "n_val_slices": len(inp.val), "device": str(device),
                  "entry": model_entry(key, s, run, scores, module)}
        print(f"{name}: mDice {result['entry']['mdice']:.4f} (best epoch {run.best_epoch}), "
              f"train {run.train_seconds:.0f} s, inference {scores.seconds:.1f} s for {scores.n_slices} slices",
              flush=True)
        if inp.other is not None:
            other = score(module, inp.other, name, s.input_size, device, s.dtype, cfg["eval_batch"])
            result["eval_slices"] = {"data": tables.data_description(inp.other.params), "slices": cfg["eval_slices"],
                                     "slices_id": inp.other.signature, "entry": eval_entry(key, other)}
            print(f"{name} on {cfg['eval_slices']}: mDice {result['eval_slices']['entry']['mdice']:.4f}", flush=True)
        settings = {k: v for k, v in run_config(key, s, inp.train, resume[key]).items() if k != "resume"}
        settings.update(profile=cfg["profile"], eval_batch=cfg["eval_batch"])
        records.write_record(res.root, "baselines", settings, result, data, precision={"dtype": inp.precision[key]})


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    inp = check_inputs(cfg, device)
    res = Results(cfg["results_dir"])
    with results_folder(res.root):
        resume = {k: cfg["resume"] and precheck_resume(res.baseline_run(k), "baseline",
                                                        run_config(k, inp.settings[k], inp.train, True))
                  for k in inp.keys}
        if cfg["resume"]:
            check_some_to_resume(resume, {k: res.baseline_run(k) for k in inp.keys})
        run_models(cfg, inp, res, device, resume)
        view = tables.write_baselines(res.root)
        tables.write_table3(res.root)
    rows = [[n, m["mdice"], fixed(m["train_seconds"], 0), fixed(m["infer_seconds"], 1)]
            for n, m in view["models"].items()]
    print(markdown_table(["model", "mDice", "train s", "inference s"], rows), end="")
    print(f"wrote {res.table('baselines', 'md')} and {res.table('table3', 'md')}")


if __name__ == "__main__":
    run_main(main)
