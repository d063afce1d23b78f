"""python bench.py --profile quick: benchmarks of the pipeline on phantom slices -> RESULTS_DIR/bench.json, bench.md.

    python bench.py --profile quick       # under 10 minutes on a quiet 2-core CPU (sizes: profiles/quick.toml [bench])
    python bench.py                       # larger sizes (tens of minutes on a 2-core CPU)
    python bench.py --profile quick --sections encoder,training,precision   # fp32 vs bf16 here, in minutes

Measured in one run, on slices generated here (`preprocess.py`'s phantom, PHANTOM_SHAPE voxels):

1. Zero-shot evaluation: this pipeline (embedding cache filled on a cold cache, batched decoding by
   `cache.evaluate`) against the loop users write around ``segment_anything.SamPredictor``
   (re-encode for every prompt, one ``predict`` per prompt), same model, slices, prompts and mask
   selection. The naive loop runs on NAIVE_ITEMS evenly spread (slice, organ) items per prompt type;
   the speed-up is seconds per prompt against seconds per prompt, and both give per-organ Dice on
   that subset, which must agree.
2. Image encoder: slices per second in fp32 and under bf16 autocast, each with contiguous and
   channels_last inputs, and the fraction of pixels whose bound-box mask (decoded in fp32 from the best
   fp32 and the best bf16 embeddings) agrees.
3. Decoder training: samples per second, TRAIN_BATCH samples per SGD step against one at a time.
3b. Precision: fp32 against bf16 for the encoder and one decoder training step, and what ``auto`` picks
   on this machine (`sambtcv.models.precision`); met when it picks the faster.
4. Memory: peak RSS of one Task 2 epoch (a `finetune_task2.py` subprocess) with N and 4N training
   slices (the 4N set repeats the N set's volumes under new case names).
5. Scaling: wall time of Task 1 (a `segmentation_task1.py` subprocess, cold cache) on 1x, 2x, 4x
   validation slices.
6. 3D: `segment_volume.py`'s one-box propagation on the validation volumes (cold cache): seconds per
   organ-volume and encoder passes per visited slice.
7. Baselines: training samples/s and inference slices/s of each Table 3 model
   (`sambtcv.study.baseline_nets.measure_speed`).
6c. The challenge's interactive protocol (`tools/segfm_loop.py`: `predict_segfm.py` in a new process per
   step) on a 512 x 512 CT: seconds per organ of the box step and of each click step.
6d. 3D Slicer's protocol: `slicer_server.py` with two clients of the unmodified `nninteractive-client`, each
   with its own 512 x 512 CT (INTERACTIVE_SHAPE phantoms or INTERACTIVE_CT's first two val cases): seconds of
   set_image, of a box on the liver and of 3 clicks at the largest error, and the server's peak RSS.
6f. The viewer's first box + P (the server side, background encoder on, cold cache) on INTERACTIVE_CT's first CT
   or an INTERACTIVE_SHAPE phantom: seconds from opening and from the box to the walk's end, the box sent at once
   and after VIEWER_READ_S s of reading.
6e. Fewer encoder passes: the challenge's 3D box per organ walked through a CT of thin slices (a STRIDE_SHAPE phantom at
   STRIDE_SLICE_MM, or STRIDE_CT's val split) every slice and with a STRIDE_MM stride, each from a cold
   cache: passes, seconds and each organ's DSC (the stepped walk within 0.005 of the every-slice walk).
8. The stage times of the last `./run.sh report` (REPORT_RESULTS/stages.json), if one ran.
"""
from __future__ import annotations

import time
from pathlib import Path

from sambtcv.bench import encoder, protocols, scaling, study, table, training, viewer, volumes, zero_shot
from sambtcv.bench.common import WORK_MARKER, build_data, machine_info, scales_arg
from sambtcv.cli import flag, parse_config, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, check_replaceable, write_json, write_text
from sambtcv.engine.volume import stride_mm
from sambtcv.models.backbones import load_backbone
from sambtcv.models.embeddings import open_split

# ---------------------------------------------------------------------------------------------- config
RESULTS_DIR = "results"  # bench.json and bench.md go here
WORK_DIR = "data/bench"  # phantom volumes, slice sets and subprocess outputs (rebuilt on every run)
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights; default: the packaged ones, or checkpoints/<official name>
SEED = config.SEED  # phantom and prompt seed (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
PHANTOM_SHAPE = "128,128,24"  # voxels of each phantom volume
TRAIN_VOLUMES = 6  # phantom volumes of the 1x training split: decoder training, memory test (>= 1)
VAL_VOLUMES = 2  # phantom volumes of the 1x validation split: zero-shot, encoder, Task 1 at 1x (>= 1)
ZERO_SHOT_PROMPT = "all"  # prompt types of the zero-shot comparison
NAIVE_ITEMS = 60  # (slice, organ) items per prompt type run through the naive SamPredictor loop (>= 1)
DECODE_BATCH = config.DECODE_BATCH  # prompts per decoder pass in the pipeline (>= 1)
ENCODER_SLICES = 16  # slices timed through the image encoder, per dtype (>= 1)
ENCODER_BATCHES = "1"  # slices per encoder pass to time (comma list; a GPU profits from more than 1)
VIEWER_POINT_MODEL = "mobilesam"  # the model that answers the viewer measurement's clicks; empty: MODEL
VIEWER_DTYPE = "auto"  # auto | fp32 | bf16: encoder and decoder precision of the viewer measurement
VIEWER_READ_S = 30.0  # first_walk: seconds a user reads the CT before the box, measured beside a box sent at once (> 0)
TRAIN_PROMPT = "bound_box"  # prompt type of the decoder-training samples
TRAIN_BATCH = 32  # samples per SGD step in the batched measurement (>= 1)
TRAIN_SAMPLES = 128  # samples timed per mode (batched, one at a time) and dtype (>= 1)
RSS_SAMPLES_PER_EPOCH = 0  # cap on the Task 2 epoch of the memory test; 0: every training sample (>= 0)
RSS_VAL_SAMPLES = 0  # cap on its per-epoch validation; 0: every validation sample (>= 0)
SCALES = "1,2,4"  # Task 1 scaling: multiples of the validation volumes
TASK1_PROMPT = "all"  # --prompt of the Task 1 runs
BASELINE_SAMPLES = 16  # training slices timed per baseline model (>= 1)
BASELINE_BATCH = 4  # batch of those timed training steps and forward passes (>= 1)
INTERACTIVE_SHAPE = "512,512,48"  # the phantom CT of the interactive measurement (a 512 x 512 CT, as the target says)
INTERACTIVE_CT = None  # or: a dataset (contract layouts) whose val split is measured instead (e.g. real CT)
STRIDE_SHAPE = "256,256,120"  # the phantom of the stride measurement, at STRIDE_SLICE_MM slices
STRIDE_SLICE_MM = 1.0  # its slice thickness (thin slices: where a stride saves passes)
STRIDE_CT = None  # or: a dataset (contract layouts) whose val split is measured instead (e.g. real CT)
STRIDE_MM = 3.0  # the stride measured against every slice (config.STRIDE_MM, the pages' default, is off)
REPORT_RESULTS = "results"  # results folder of the last ./run.sh report, whose stage times are recorded
SECTIONS = "all"  # all, or a comma list of SECTION_NAMES (e.g. encoder,training,precision for a short run)
# -----------------------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
TARGETS = {"viewer_prompt_median_s": 0.10, "viewer_click_median_s": 0.10, "viewer_prompt_first_s": 1.0,
           "openvino_encoder_speedup": 1.8,
           "openvino_agreement": 0.999, "openvino_decoder_speedup": 1.5,
           "zero_shot_speedup": 10.0, "encoder_bf16_speedup": 1.3, "encoder_bf16_mask_agreement": 0.99,
           "decoder_batched_speedup": 3.0, "peak_rss_ratio_4x": 1.2, "zero_shot_dice_max_abs_diff": 1e-4,
           "task1_linear_slack": 1.1, "volume_passes_per_visited_slice": 1.0, "report_minutes": 20,
           "interactive_first_step_s_per_organ": 90.0, "interactive_later_step_s_per_organ": 15.0,
           "stride_dsc_change": 0.005, "viewer_first_walk_s": 45.0,
           "slicer_set_image_s": 600.0, "slicer_interaction_s": 60.0}  # slicer: nninteractive-client's timeouts


SECTION_NAMES = {  # in the order they run
    "zero_shot": "1. zero-shot, pipeline against SamPredictor", "encoder": "2. image encoder fp32 / bf16",
    "runtimes": "2b. runtimes: PyTorch and OpenVINO", "training": "3. decoder training",
    "precision": "3b. fp32 against bf16, and what auto picks (needs encoder and training)",
    "memory": "4. memory of a Task 2 epoch", "task1_scaling": "5. Task 1 scaling", "volume_3d": "6. 3D propagation",
    "viewer": "6b. the viewer's server",
    "first_walk": "6f. the viewer's first box + P on a 512 x 512 CT from opening (background encoder on)",
    "interactive": "6c. the challenge's protocol, a process per step",
    "slicer": "6d. 3D Slicer's protocol: two clients of slicer_server.py",
    "stride": "6e. a 3D box's walk, every slice against a stride of STRIDE_MM",
    "baselines": "7. baselines"}


def sections_arg(text: str) -> list[str]:
    """--sections: all, or a comma list of SECTION_NAMES."""
    names = [v.strip() for v in str(text).split(",") if v.strip()]
    if names == ["all"]:
        return list(SECTION_NAMES)
    unknown = [n for n in names if n not in SECTION_NAMES]
    if unknown or not names:
        raise PipelineError(f"--sections must be all or a comma list of {', '.join(SECTION_NAMES)}, got {text!r}")
    return names


def compared_stride(cfg) -> float:
    """--stride-mm: the stride (mm > 0) the stride section compares with every slice."""
    with flag("--stride-mm"):
        step = stride_mm(cfg["stride_mm"])
        if step <= 0:
            raise PipelineError(f"{{subject}} must be a number of mm > 0 (every slice is the other walk), got {step!r}",
                                "mm")
    return step


def check_flags(cfg) -> list[str]:
    """The sections asked for, and every flag a section parses checked before any work, each naming its flag."""
    from sambtcv.data.btcv import phantom_shape

    with flag("--sections"):
        wanted = sections_arg(cfg["sections"])
    with flag("--work-dir"):
        check_replaceable(Path(cfg["work_dir"]).resolve(), WORK_MARKER)  # rebuilt whole: only a folder bench.py wrote
    with flag("--scales"):
        scales_arg(cfg["scales"])
    with flag("--phantom-shape"):
        phantom_shape(cfg["phantom_shape"])
    if {"interactive", "slicer", "first_walk"} & set(wanted) and not cfg["interactive_ct"]:
        with flag("--interactive-shape"):
            phantom_shape(cfg["interactive_shape"])
    if "first_walk" in wanted:
        with flag("--viewer-read-s"):
            viewer.reading_seconds(cfg["viewer_read_s"])
    if "stride" in wanted:
        compared_stride(cfg)
        if not cfg["stride_ct"]:
            with flag("--stride-shape"):
                phantom_shape(cfg["stride_shape"])
            with flag("--stride-slice-mm"):
                volumes.slice_mm(cfg["stride_slice_mm"])
    return wanted


def run_section(name: str, cfg, backbone, sets: dict, work: Path, device, res: dict, timed) -> dict:
    """Section `name`'s results (its module in sambtcv.bench), on the run's phantom sets and backbone."""
    base = sets["base"]
    if name == "training":
        train = timed("train_cache_fill", open_split, base, "train", backbone, "fp32", device)
        return training.bench_training(cfg, backbone, train, device)
    if name == "runtimes" and str(cfg["encoder_batches"]).strip() not in ("", "1"):
        res.update(timed("encoder_batches", encoder.bench_encoder_batches, cfg, backbone, base, device))
    runners = {
        "zero_shot": lambda: zero_shot.bench_zero_shot(cfg, backbone, base, device),
        "encoder": lambda: encoder.bench_encoder(cfg, backbone, base, device),
        "runtimes": lambda: encoder.bench_runtimes(cfg, backbone, base, work, device),
        "precision": lambda: training.bench_precision(res, device),
        "memory": lambda: training.bench_memory(cfg, backbone, sets, device, work),
        "task1_scaling": lambda: scaling.bench_task1_scaling(cfg, sets, work),
        "volume_3d": lambda: volumes.bench_volume(cfg, backbone, sets, work, device),
        "viewer": lambda: viewer.bench_viewer(cfg, backbone, sets, work, device),
        "first_walk": lambda: viewer.bench_first_walk(cfg, backbone, work, device),
        "interactive": lambda: protocols.bench_interactive(cfg, work),
        "slicer": lambda: protocols.bench_slicer(cfg, work),
        "stride": lambda: volumes.bench_stride(cfg, compared_stride(cfg), backbone, work, device),
        "baselines": lambda: study.bench_baselines(cfg, sets, device)}
    return runners[name]()


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    wanted = check_flags(cfg)
    t_start = time.perf_counter()
    res = {"machine": machine_info(device), "profile": cfg["profile"], "model": cfg["model"],
           "phantom_shape": cfg["phantom_shape"]}
    work = Path(cfg["work_dir"]).resolve()
    sections = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        sections[name] = round(time.perf_counter() - t0, 1)
        return out

    sets = timed("data", build_data, cfg)
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    for name in (n for n in SECTION_NAMES if n in wanted):
        print(f"bench: {name}: {SECTION_NAMES[name]}", flush=True)
        res.update(timed(name, run_section, name, cfg, backbone, sets, work, device, res, timed))
    res.update(study.report_stages(cfg))
    res["section_seconds"] = sections
    res["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    res["config"] = cfg
    keys = ["zero_shot_speedup", "zero_shot_dice_max_abs_diff", "encoder_bf16_speedup", "encoder_bf16_mask_agreement",
            "decoder_batched_speedup", "peak_rss_ratio_4x", "task1_seconds_by_scale", "machine"]
    res = {**{k: res[k] for k in keys if k in res}, **{k: v for k, v in res.items() if k not in keys}}
    out = Results(cfg["results_dir"])
    md = table.report(res, TARGETS)
    write_json(out.table("bench", "json"), res)
    write_text(out.table("bench", "md"), md)
    print(md, end="")
    print(f"bench: {res['bench_seconds']} s; wrote {out.table('bench', 'json')} and {out.table('bench', 'md')}")


if __name__ == "__main__":
    run_main(main)
