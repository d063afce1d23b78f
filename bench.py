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
   on this machine (`sambtcv.precision`); met when it picks the faster.
4. Memory: peak RSS of one Task 2 epoch (a `finetune_task2.py` subprocess) with N and 4N training
   slices (the 4N set repeats the N set's volumes under new case names).
5. Scaling: wall time of Task 1 (a `segmentation_task1.py` subprocess, cold cache) on 1x, 2x, 4x
   validation slices.
6. 3D: `segment_volume.py`'s one-box propagation on the validation volumes (cold cache): seconds per
   organ-volume and encoder passes per visited slice.
7. Baselines: training samples/s and inference slices/s of each Table 3 model (`sambtcv.baseline_nets.measure_speed`).
6c. The challenge's interactive protocol (`tools/segfm_loop.py`: `predict_segfm.py` in a new process per
   step) on a 512 x 512 CT: seconds per organ of the box step and of each click step.
6d. 3D Slicer's protocol: `slicer_server.py` with two clients of the unmodified `nninteractive-client`, each
   with its own 512 x 512 CT (INTERACTIVE_SHAPE phantoms or INTERACTIVE_CT's first two val cases): seconds of
   set_image, of a box on the liver and of 3 clicks at the largest error, and the server's peak RSS.
6e. Fewer encoder passes: the challenge's 3D box per organ walked through a CT of thin slices (a STRIDE_SHAPE phantom at
   STRIDE_SLICE_MM, or STRIDE_CT's val split) every slice and with a STRIDE_MM stride, each from a cold
   cache: passes, seconds and each organ's DSC (the stepped walk within 0.005 of the every-slice walk).
8. The stage times of the last `./run.sh report` (REPORT_RESULTS/stages.json), if one ran.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sambtcv import config, precision, records
from sambtcv.backbones import encode_images, load_backbone
from sambtcv.cli import flag, parse_config, run_main, start_run
from sambtcv.data import parse_window
from sambtcv.decoder import PromptedDecoder, decode_batch, load_decoder, pick
from sambtcv.device import autocast, sync
from sambtcv.embeddings import EmbeddingCache, open_split
from sambtcv.errors import PipelineError
from sambtcv.evaluation import EVAL_EPOCH, PromptDataset, evaluate
from sambtcv.files import Results, check_replaceable, markdown_table, write_json, write_text
from sambtcv.metrics import dice_score
from sambtcv.names import ORGAN_ID, POINT_PROMPTS, organ_name, prompt_types_arg
from sambtcv.prompts import Prompt, bound_box, make_prompt, present_organs, prompt_rng
from sambtcv.propagation import VolumeDecoder
from sambtcv.slices import SliceSet
from sambtcv.training import epoch_order, mask_losses
from sambtcv.volume import WalkSettings, label_prompts, load_case, margin_mm, segment, stride_mm

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
WORK_MARKER = "bench_work.json"  # marks WORK_DIR as bench.py's, so that it may be rebuilt
TARGETS = {"viewer_prompt_median_s": 0.10, "viewer_click_median_s": 0.10, "viewer_prompt_first_s": 1.0,
           "openvino_encoder_speedup": 1.8,
           "openvino_agreement": 0.999, "openvino_decoder_speedup": 1.5,
           "zero_shot_speedup": 10.0, "encoder_bf16_speedup": 1.3, "encoder_bf16_mask_agreement": 0.99,
           "decoder_batched_speedup": 3.0, "peak_rss_ratio_4x": 1.2, "zero_shot_dice_max_abs_diff": 1e-4,
           "task1_linear_slack": 1.1, "volume_passes_per_visited_slice": 1.0, "report_minutes": 20,
           "interactive_first_step_s_per_organ": 90.0, "interactive_later_step_s_per_organ": 15.0,
           "stride_dsc_change": 0.005,
           "slicer_set_image_s": 600.0, "slicer_interaction_s": 60.0}  # slicer: nninteractive-client's timeouts
# A child Python that runs a script as __main__ and reports its own peak RSS (KiB) at exit: VmHWM of
# /proc/self/status, the high-water mark of this process's memory alone. (getrusage's ru_maxrss is not:
# Linux carries the parent's peak into a child started by vfork + exec, as subprocess starts it.)
_RSS_RUNNER = ("import json, resource, runpy, sys\n"
               "def peak_kb():\n"
               "    try:\n"
               "        with open('/proc/self/status') as f:\n"
               "            return int(next(v for v in f if v.startswith('VmHWM:')).split()[1])\n"
               "    except (OSError, StopIteration, ValueError):\n"
               "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
               "sys.argv = json.loads(sys.argv[1])\n"
               "try:\n"
               "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n"
               "    print('BENCH_MAXRSS_KB', peak_kb(), flush=True)\n")


def machine_info(device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    found = precision.support(device)
    info["bf16"] = {"native": found.native, "detail": found.detail}
    return info


# ---------------------------------------------------------------------------------------------- data
def make_set(work: Path, name: str, volumes: list, train: list, val: list, seed: int, shape) -> Path:
    """Preprocess a slice set whose splits list phantom volumes by index, repeats allowed (each repeat
    is a symlink under a new case name). Written through a dataset_0.json; returns the slices folder."""
    from sambtcv.data import preprocess

    root = work / "sets" / name / "raw"  # the data dir: links to phantom volumes and a dataset_0.json
    raw = root / "volumes"
    raw.mkdir(parents=True, exist_ok=True)
    spec = {}
    for key, picks in (("training", train), ("validation", val)):
        entries, seen = [], {}
        for v in picks:
            copy_no = seen[v] = seen.get(v, -1) + 1
            image, label = volumes[v]
            entry = {}
            for what, src in (("image", image), ("label", label)):
                link = raw / f"{what}{v + 1:04d}r{copy_no}.nii.gz"
                if not link.exists():
                    os.symlink(src.resolve(), link)
                entry[what] = str(link.relative_to(root))
            entries.append(entry)
        spec[key] = entries
    write_json(root / "dataset_0.json", spec)
    out = root.parent / "slices"
    preprocess(root, out, seed=seed, synthetic={"volumes": len(volumes), "seed": seed, "shape": list(shape)})
    return out


def build_data(cfg: dict) -> dict:
    from sambtcv.data import phantom_shape
    from sambtcv.phantom import write_phantom

    work = Path(cfg["work_dir"]).resolve()
    with flag("--work-dir"):
        check_replaceable(work, WORK_MARKER)  # rebuilt whole: only a folder bench.py wrote
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_json(work / WORK_MARKER, {"written_by": "bench.py"})
    shape = phantom_shape(cfg["phantom_shape"])
    n_train, n_val = cfg["train_volumes"], cfg["val_volumes"]
    print(f"bench: writing {n_train + n_val} phantom volumes {shape} to {work / 'raw'}", flush=True)
    images = write_phantom(work / "raw", n_train + n_val, cfg["seed"], shape=shape)
    volumes = [(p, p.parent.parent / "label" / p.name.replace("img", "label", 1)) for p in images]
    train, val = list(range(n_train)), list(range(n_train, n_train + n_val))
    sets = {"base": make_set(work, "base", volumes, train, val, cfg["seed"], shape),
            "rss4": make_set(work, "rss4", volumes, train * 4, val, cfg["seed"], shape)}
    for s in scales_arg(cfg["scales"]):
        sets[f"task1_x{s}"] = make_set(work, f"task1_x{s}", volumes, [], val * s, cfg["seed"], shape)
    sets["val_volumes"] = [volumes[v] for v in val]  # (image, label) NIfTI paths for the 3D measurement
    return sets


SECTION_NAMES = {  # in the order they run
    "zero_shot": "1. zero-shot, pipeline against SamPredictor", "encoder": "2. image encoder fp32 / bf16",
    "runtimes": "2b. runtimes: PyTorch and OpenVINO", "training": "3. decoder training",
    "precision": "3b. fp32 against bf16, and what auto picks (needs encoder and training)",
    "memory": "4. memory of a Task 2 epoch", "task1_scaling": "5. Task 1 scaling", "volume_3d": "6. 3D propagation",
    "viewer": "6b. the viewer's server", "interactive": "6c. the challenge's protocol, a process per step",
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


def scales_arg(text: str) -> list[int]:
    try:
        scales = [int(v) for v in text.split(",") if v.strip()]
        assert scales and min(scales) >= 1
    except (ValueError, AssertionError):
        raise PipelineError(f"--scales must be a comma list of positive integers like 1,2,4, got {text!r}") from None
    return scales


def fill_by_copy(cache: EmbeddingCache, sources: list) -> int:
    """Fill rows of `cache` whose slice image is byte-identical to a cached row of `sources` by copying
    that row (what the encoder would compute for the same input); returns the rows copied."""
    def key(image):
        return hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()

    index = {}
    for src in sources:
        for j in np.flatnonzero(src.done):
            index.setdefault(key(src.image(int(j))), (src, int(j)))
    todo = [i for i in cache.missing() if key(cache.image(i)) in index]
    if not todo:
        return 0

    def copy_rows(idx):
        return np.stack([index[key(cache.image(i))][0].read(index[key(cache.image(i))][1]) for i in idx])

    return cache.fill("cpu", batch_size=len(todo), rows=todo, progress=False, encode=copy_rows)


def run_script(script: str, args: list, log: Path) -> dict:
    """Run `script` in a fresh Python; returns wall seconds and the child's peak RSS (MiB)."""
    argv = [script, *[str(a) for a in args]]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_RUNNER, json.dumps(argv)], cwd=HERE, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PipelineError(f"{script} failed (exit {proc.returncode}, log {log}): {' | '.join(tail)}")
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("BENCH_MAXRSS_KB")]
    return {"seconds": seconds, "peak_rss_mib": rss[-1] / 1024 if rss else None}


# ---------------------------------------------------------------------------------------------- 1. zero-shot
def spread(n_total: int, n: int) -> list[int]:
    """n evenly spread indices of range(n_total) (all of them when n >= n_total)."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int)).tolist()


def naive_predictor_loop(backbone, slices: SliceSet, items: list, prompt_type: str, seed: int, device,
                         point_mask: str = config.POINT_MASK):
    """What users write around SamPredictor: set the image (re-encode) and predict, one prompt at a time;
    a point keeps the mask `point_mask` keeps in the pipeline (sambtcv.decoder.pick on SamPredictor's
    low-resolution logits, as the pipeline picks on its decoder's).

    The input tensor is the pipeline's `InputFrame.image` given through `set_torch_image`.
    Returns (per-item Dice, seconds, max |apply_coords - InputFrame.coords_to_input|)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(backbone.sam)
    frame = backbone.frame
    dices, coord_diff = [], 0.0
    sync(device)
    t0 = time.perf_counter()
    for i, organ in items:
        rec = slices.records[i]
        image, label = slices.load(i)
        mask = label == organ
        prompt = make_prompt(mask, prompt_type, prompt_rng(seed, rec["case"], rec["z"], organ, prompt_type, EVAL_EPOCH))
        predictor.set_torch_image(frame.image(image)[None].to(device), image.shape)
        if prompt_type in POINT_PROMPTS:
            pts = prompt.points
            coord_diff = max(coord_diff, float(np.abs(predictor.transform.apply_coords(pts, image.shape)
                                                      - frame.coords_to_input(pts, image.shape)).max()))
            masks, iou, low_res = predictor.predict(point_coords=pts, point_labels=np.ones(len(pts)),
                                                    multimask_output=True)
            pred = masks[int(pick(torch.from_numpy(low_res)[None], torch.from_numpy(iou)[None], point_mask)[0])]
        else:
            box = prompt.box
            coord_diff = max(coord_diff, float(np.abs(predictor.transform.apply_boxes(box, image.shape).reshape(4)
                                                      - frame.prompt(prompt, image.shape).box).max()))
            masks, _, _ = predictor.predict(box=box, multimask_output=False)
            pred = masks[0]
        dices.append(dice_score(pred, mask))
    sync(device)
    return dices, time.perf_counter() - t0, coord_diff


def per_organ_mean(items: list, dices: list) -> dict:
    out = {}
    for (_, organ), d in zip(items, dices):
        out.setdefault(organ, []).append(d)
    return {organ_name(o): float(np.mean(v)) for o, v in sorted(out.items())}


def bench_zero_shot(cfg, backbone, slices_dir: Path, device) -> dict:
    prompts = prompt_types_arg(cfg["zero_shot_prompt"])
    shutil.rmtree(slices_dir / "embeddings", ignore_errors=True)  # cold cache
    encode_images(backbone, [SliceSet(slices_dir, "val").load(0)[0]], device)  # warm-up, not timed
    subset = set()
    kept = {p: {} for p in prompts}

    def collect(prompt_type, items, decoded, preds):
        for item, pred in zip(items, preds):
            if item in subset:
                kept[prompt_type][item] = pred

    sync(device)
    t0 = time.perf_counter()
    data = open_split(slices_dir, "val", backbone, "fp32", device, 1)
    slices, passes, t_fill = data.slices, data.encoder_passes, data.seconds
    items = [slices.items[k] for k in spread(len(slices.items), cfg["naive_items"])]
    subset.update(items)
    table = evaluate(PromptedDecoder.from_backbone(backbone), data, prompts, cfg["seed"], device, "fp32",
                     cfg["decode_batch"], on_batch=collect, point_mask=config.POINT_MASK)
    sync(device)
    pipe_seconds = time.perf_counter() - t0
    n_pipe = len(slices.items) * len(prompts)
    naive_seconds, diffs, per_sample_diff, coord_diff, per_prompt = 0.0, [], 0.0, 0.0, {}
    for p in prompts:
        print(f"bench: naive SamPredictor loop, {p}, {len(items)} prompts", flush=True)
        naive_dice, secs, cdiff = naive_predictor_loop(backbone, slices, items, p, cfg["seed"], device)
        naive_seconds += secs
        coord_diff = max(coord_diff, cdiff)
        pipe_dice = [dice_score(kept[p][(i, organ)], slices.load_label(i) == organ) for i, organ in items]
        a, b = per_organ_mean(items, pipe_dice), per_organ_mean(items, naive_dice)
        diff = max(abs(a[o] - b[o]) for o in a)
        diffs.append(diff)
        per_sample_diff = max(per_sample_diff, float(np.max(np.abs(np.subtract(pipe_dice, naive_dice)))))
        per_prompt[p] = {"pipeline_mdice_subset": float(np.mean(list(a.values()))),
                         "naive_mdice_subset": float(np.mean(list(b.values()))), "per_organ_max_abs_diff": diff,
                         "naive_seconds": round(secs, 3)}
    n_naive = len(items) * len(prompts)
    pipe_pp, naive_pp = pipe_seconds / n_pipe, naive_seconds / n_naive
    return {
        "zero_shot_speedup": naive_pp / pipe_pp,
        "zero_shot_dice_max_abs_diff": max(diffs),
        "zero_shot": {
            "prompt_types": prompts, "n_slices": len(slices), "pipeline_prompts": n_pipe,
            "pipeline_seconds": round(pipe_seconds, 3), "pipeline_encoder_passes": passes,
            "pipeline_encode_seconds": round(t_fill, 3), "pipeline_seconds_per_prompt": pipe_pp,
            "naive_prompts": n_naive, "naive_items_per_prompt_type": len(items),
            "naive_seconds": round(naive_seconds, 3),
            "naive_seconds_per_prompt": naive_pp, "per_sample_dice_max_abs_diff": per_sample_diff,
            "coords_max_abs_diff_apply_coords_vs_coords_to_input": coord_diff,
            "pipeline_mdice_all": table.mdice(), "per_prompt": per_prompt,
            "note": ("pipeline: cold embedding cache fill (fp16 rows) + evaluate() over every (slice, organ) of the "
                     "val split; naive: SamPredictor.set_torch_image(image_to_input(...)) + predict() per prompt "
                     "on evenly spread items; speed-up = naive s/prompt / pipeline s/prompt; Dice compared on the "
                     "naive items only"),
        },
    }


# ---------------------------------------------------------------------------------------------- 2. encoder
def time_encoder(backbone, images, device, dtype: str, channels_last: bool):
    """(slices/s, embeddings) of the image encoder in one memory format and precision, batch 1."""
    backbone.channels_last = channels_last
    backbone.sam.image_encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    encode_images(backbone, images[:1], device, dtype)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    emb = [encode_images(backbone, [im], device, dtype) for im in images]
    sync(device)
    rate = len(images) / (time.perf_counter() - t0)
    layout = "channels_last" if channels_last else "contiguous"
    print(f"bench: encoder {dtype} {layout}: {rate:.2f} slices/s", flush=True)
    return rate, emb


def mask_agreement(backbone, slices: SliceSet, picks, emb_a, emb_b, device) -> tuple[float, list]:
    """Pixel agreement and per-mask Dice of bound-box masks decoded (fp32) from two sets of embeddings."""
    decoder = PromptedDecoder.from_backbone(backbone).eval()
    agree = total = 0
    dices = []
    with torch.no_grad():
        for n, i in enumerate(picks):
            label = slices.load_label(i)
            organs = present_organs(label)
            boxes = torch.tensor(np.stack([backbone.frame.prompt(make_prompt(label == o, "bound_box", None),
                                                                 label.shape).box for o in organs]),
                                 dtype=torch.float32, device=device)
            preds = []
            for emb in (emb_a, emb_b):
                logits = decoder(emb[n].expand(len(organs), -1, -1, -1), boxes=boxes, multimask=False)[0][:, 0]
                preds.append((backbone.frame.to_slice(logits, label.shape) > 0).cpu().numpy())
            agree += int((preds[0] == preds[1]).sum())
            total += preds[0].size
            dices += [dice_score(a, b) for a, b in zip(*preds)]
    return agree / total, dices


def bench_encoder(cfg, backbone, slices_dir: Path, device) -> dict:
    """Slices/s in fp32 and bf16, each contiguous and channels_last; the bf16 speed-up is the best bf16
    format against the best fp32 format, with the agreement of their masks."""
    slices = SliceSet(slices_dir, "val")
    picks = spread(len(slices), cfg["encoder_slices"])
    images = [slices.load(i)[0] for i in picks]
    default_format = backbone.channels_last
    rates, embs = {}, {}
    for dtype in ("fp32", "bf16"):
        for fmt in (False, True):
            rates[(dtype, fmt)], embs[(dtype, fmt)] = time_encoder(backbone, images, device, dtype, fmt)
    time_encoder(backbone, images[:1], device, "fp32", default_format)  # back to the backbone's own format
    best = {dtype: max((False, True), key=lambda f: rates[(dtype, f)]) for dtype in ("fp32", "bf16")}
    agreement, dices = mask_agreement(backbone, slices, picks, embs[("fp32", best["fp32"])],
                                      embs[("bf16", best["bf16"])], device)
    name = {False: "contiguous", True: "channels_last"}
    return {"encoder_bf16_speedup": rates[("bf16", best["bf16"])] / rates[("fp32", best["fp32"])],
            "encoder_bf16_mask_agreement": agreement,
            "encoder": {"model": backbone.name, "slices": len(images),
                        "slices_per_second": {f"{d}_{name[f]}": r for (d, f), r in rates.items()},
                        "fp32_slices_per_second": rates[("fp32", best["fp32"])],
                        "bf16_slices_per_second": rates[("bf16", best["bf16"])],
                        "best_format": {d: name[f] for d, f in best.items()},
                        "model_default_format": name[default_format], "masks_compared": len(dices),
                        "fp32_vs_bf16_mask_dice_mean": float(np.mean(dices)),
                        "fp32_vs_bf16_mask_dice_min": float(np.min(dices)),
                        "note": "batch 1 per encoder pass; bound-box masks of every organ, decoded in fp32 "
                                "from each embedding; agreement = equal pixels / all pixels"}}


RUNTIME_PATHS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and OpenVINO's first compile of a shape)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_runtimes(cfg, backbone, slices_dir: Path, work: Path, device) -> dict:
    """PyTorch against OpenVINO on this CPU, side by side in one process: the encoder per slice (fp32, bf16)
    with the agreement and Dice of bound-box masks decoded in PyTorch fp32 from each path's embeddings
    against PyTorch fp32's; one prompt's decoder time per runtime and precision; peak RSS of a Task 1 run
    per runtime (subprocess, cold cache)."""
    if torch.device(device).type != "cpu":
        return {"runtimes": {"note": "OpenVINO runs on the CPU only; not measured on " + str(device)}}
    from sambtcv.openvino_runtime import OpenVinoEncoder

    slices = SliceSet(slices_dir, "val")
    picks = spread(len(slices), cfg["encoder_slices"])
    images = [slices.load(i)[0] for i in picks]
    cache = work / "model_cache"
    encoders = {("torch", d): None for d in ("fp32", "bf16")}
    encoders.update({("openvino", d): OpenVinoEncoder(backbone, d, cache) for d in ("fp32", "bf16")})
    enc, embs = {}, {}
    for rt, dtype in RUNTIME_PATHS:
        encoder = encoders[(rt, dtype)]
        enc[f"{rt}_{dtype}"] = _median_seconds(lambda: encode_images(backbone, images[:1], device, dtype, encoder),
                                               cfg["encoder_slices"])
        embs[(rt, dtype)] = [encode_images(backbone, [im], device, dtype, encoder) for im in images]
        print(f"bench: encoder {rt} {dtype}: {enc[f'{rt}_{dtype}']:.3f} s/slice", flush=True)
    agreement = {}
    for path in RUNTIME_PATHS[1:]:
        agree, dices = mask_agreement(backbone, slices, picks, embs[("torch", "fp32")], embs[path], device)
        agreement[f"{path[0]}_{path[1]}"] = {"mask_agreement": agree, "dice_mean": float(np.mean(dices)),
                                             "dice_min": float(np.min(dices))}
    dec = bench_runtime_decoders(backbone, embs[("torch", "fp32")][0], cache, device)
    rss = {rt: bench_runtime_rss(cfg, slices_dir, work, rt) for rt in ("torch", "openvino")}
    return {"runtimes": {"encoder_seconds_per_slice": enc, "agreement_vs_torch_fp32": agreement,
                         "decoder_seconds": dec, "task1_runs": rss, "threads": torch.get_num_threads(),
                         "openvino_encoder_speedup_vs_torch_bf16": enc["torch_bf16"] / enc["openvino_bf16"],
                         "openvino_encoder_speedup_vs_torch_fp32": enc["torch_fp32"] / enc["openvino_fp32"],
                         "note": "median seconds over ENCODER_SLICES calls after a warm-up, batch 1; agreement = "
                                 "equal pixels of bound-box masks (PyTorch fp32 decoder) / all pixels"}}


def bench_runtime_decoders(backbone, embedding, cache: Path, device, repeats: int = 20) -> dict:
    """Median seconds of one box and one point prompt per runtime and precision on one embedding."""
    from sambtcv.openvino_runtime import OpenVinoDecoder

    size = backbone.img_size
    box = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]])
    point, label = torch.tensor([[[size * 0.45, size * 0.45]]]), torch.ones(1, 1)
    out = {}
    for rt, dtype in RUNTIME_PATHS:
        decoder = PromptedDecoder.from_backbone(backbone, copy_modules=True).eval()
        if rt == "openvino":
            decoder = OpenVinoDecoder(decoder, f"{backbone.key}-pretrained", dtype, cache)
        with torch.no_grad(), autocast(device, dtype if rt == "torch" else "fp32"):
            out[f"{rt}_{dtype}_box"] = _median_seconds(lambda: decoder(embedding, boxes=box), repeats)
            out[f"{rt}_{dtype}_point"] = _median_seconds(
                lambda: decoder(embedding, points=point, point_labels=label, multimask=True), repeats)
    return out


def bench_runtime_rss(cfg, slices_dir: Path, work: Path, runtime: str) -> dict:
    """A Task 1 run (bound box) in a subprocess with `runtime` and a cold embedding cache: wall time, peak RSS."""
    cold = work / f"runtime_{runtime}"
    shutil.rmtree(cold, ignore_errors=True)
    shutil.copytree(slices_dir, cold / "slices", ignore=shutil.ignore_patterns("embeddings"))
    r = run_script("segmentation_task1.py", ["--slices", cold / "slices", "--results-dir", cold / "results",
                                             "--model", cfg["model"], "--prompt", "bound_box", "--runtime", runtime,
                                             "--encoder-dtype", "bf16", "--dtype", "bf16", "--device", "cpu"],
                   cold / "log.txt")
    return {"seconds": round(r["seconds"], 2), "peak_rss_mib": r["peak_rss_mib"], "encoder_dtype": "bf16"}


def bench_encoder_batches(cfg, backbone, slices_dir: Path, device) -> dict:
    """Slices/s of the image encoder at each batch size of ENCODER_BATCHES, fp32 and bf16, the backbone's
    own memory format (encode_batch of the pages)."""
    slices = SliceSet(slices_dir, "val")
    sizes = [int(v) for v in str(cfg["encoder_batches"]).split(",") if v.strip()]
    images = [slices.load(i % len(slices))[0] for i in range(max(sizes) * 2)]
    out = {}
    for dtype in ("fp32", "bf16"):
        for size in sizes:
            encode_images(backbone, images[:size], device, dtype)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, len(images), size):
                encode_images(backbone, images[start:start + size], device, dtype)
            sync(device)
            out[f"{dtype}_batch{size}"] = round(len(images) / (time.perf_counter() - t0), 2)
            print(f"bench: encoder {dtype} batch {size}: {out[f'{dtype}_batch{size}']} slices/s", flush=True)
    return {"encoder_batches": {"model": backbone.name, "slices_per_second": out, "images": len(images)}}


# ---------------------------------------------------------------------------------------------- 3. decoder training
def bench_training(cfg, backbone, data, device) -> dict:
    prompt_type = cfg["train_prompt"]
    ds = PromptDataset(data, prompt_type, cfg["seed"], epoch=1)
    order = epoch_order(len(ds), cfg["seed"], 1, cfg["train_samples"])
    samples = [ds[int(k)] for k in order]
    n = len(samples)
    multimask = prompt_type in POINT_PROMPTS
    pretrained = PromptedDecoder.from_backbone(backbone)

    def run(batch_size: int, dtype: str) -> float:
        torch.manual_seed(cfg["seed"])
        module = copy.deepcopy(pretrained).to(device).train()
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=config.FINETUNE_LR,
                              momentum=config.FINETUNE_MOMENTUM,
                              weight_decay=config.FINETUNE_WEIGHT_DECAY)
        batches = [torch.utils.data.default_collate(samples[s:s + batch_size]) for s in range(0, n, batch_size)]

        def step(batch):
            with autocast(device, dtype):
                out = decode_batch(module, batch, prompt_type, device)
            losses = mask_losses(out.masks, out.iou, batch["target"].to(device), 1.0 if multimask else 0.0)
            opt.zero_grad(set_to_none=True)
            (losses.sum() / len(losses)).backward()
            opt.step()

        step(batches[0])  # warm-up, not timed
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(device)
        rate = n / (time.perf_counter() - t0)
        print(f"bench: decoder training {dtype} batch {batch_size}: {rate:.2f} samples/s", flush=True)
        return rate

    rates = {dtype: {"batched": run(cfg["train_batch"], dtype), "one_at_a_time": run(1, dtype)}
             for dtype in ("fp32", "bf16")}
    return {"decoder_batched_speedup": rates["fp32"]["batched"] / rates["fp32"]["one_at_a_time"],
            "decoder_training": {
                "prompt_type": prompt_type, "samples": n, "batch": cfg["train_batch"],
                "fp32_samples_per_second_batched": rates["fp32"]["batched"],
                "fp32_samples_per_second_one_at_a_time": rates["fp32"]["one_at_a_time"],
                "bf16_samples_per_second_batched": rates["bf16"]["batched"],
                "bf16_samples_per_second_one_at_a_time": rates["bf16"]["one_at_a_time"],
                "bf16_batched_speedup": rates["bf16"]["batched"] / rates["bf16"]["one_at_a_time"],
                "note": "forward + mask_losses + backward + SGD step (finetune_task2's recipe) on samples read "
                        "before timing; one warm-up step per run not timed"}}


# ---------------------------------------------------------------------------------------------- 3b. precision
def bench_precision(res: dict, device) -> dict:
    """fp32 against bf16 on this machine (the encoder's seconds per slice, one decoder training step of
    TRAIN_BATCH samples) beside what DTYPE = "auto" picks here (`sambtcv.precision`)."""
    enc, tr = res.get("encoder"), res.get("decoder_training")
    found = {rt: precision.support(device, rt) for rt in ("torch", "openvino")}
    out = {"auto": {rt: {"picks": "bf16" if f.native else "fp32", "why": f.detail} for rt, f in found.items()}}
    faster = {}
    if enc:
        out["encoder_seconds_per_slice"] = {d: 1.0 / enc[f"{d}_slices_per_second"] for d in ("fp32", "bf16")}
        faster["encoder"] = min(out["encoder_seconds_per_slice"], key=out["encoder_seconds_per_slice"].get)
    if tr:
        out["decoder_step_seconds"] = {d: tr["batch"] / tr[f"{d}_samples_per_second_batched"] for d in ("fp32", "bf16")}
        faster["decoder_step"] = min(out["decoder_step_seconds"], key=out["decoder_step_seconds"].get)
    out["faster"] = faster
    out["auto_picks_the_faster"] = all(v == out["auto"]["torch"]["picks"] for v in faster.values())
    print(f"bench: precision auto picks {out['auto']['torch']['picks']} ({found['torch'].detail}); faster: {faster}",
          flush=True)
    return {"precision": out}


# ---------------------------------------------------------------------------------------------- 4. memory
def bench_memory(cfg, backbone, sets: dict, device, work: Path) -> dict:
    base_train = EmbeddingCache.for_split(SliceSet(sets["base"], "train"), backbone, "fp32")
    base_val = EmbeddingCache.for_split(SliceSet(sets["base"], "val"), backbone, "fp32")
    copied = 0
    for split in ("train", "val"):
        cache = EmbeddingCache.for_split(SliceSet(sets["rss4"], split), backbone, "fp32")
        copied += fill_by_copy(cache, [base_train, base_val])
        cache.fill(device, 1, progress=False)
    runs = {}
    for name, scale in (("base", 1), ("rss4", 4)):
        args = ["--slices", sets[name], "--results-dir", work / "out" / f"task2_{name}", "--prompt", "bound_box",
                "--epochs", 1, "--samples-per-epoch", cfg["rss_samples_per_epoch"], "--val-samples",
                cfg["rss_val_samples"], "--model", cfg["model"], "--seed", cfg["seed"], "--dtype", "fp32"]
        args += backbone_flags(cfg)
        print(f"bench: Task 2 epoch on {scale}x training slices (subprocess)", flush=True)
        r = run_script("finetune_task2.py", args, work / "logs" / f"task2_{name}.log")
        slices = SliceSet(sets[name], "train")
        r.update(train_slices=len(slices), train_samples=len(slices.items),
                 cache_mib=round(len(slices) * int(np.prod(base_train.shape[1:])) * 2 / 2**20, 1))
        runs[f"{scale}x"] = r
    return {"peak_rss_ratio_4x": runs["4x"]["peak_rss_mib"] / runs["1x"]["peak_rss_mib"],
            "memory": {"runs": runs, "samples_per_epoch_cap": cfg["rss_samples_per_epoch"] or "all samples",
                       "val_samples_cap": cfg["rss_val_samples"] or "all", "rows_copied_into_4x_cache": copied,
                       "note": ("finetune_task2.py --prompt bound_box --epochs 1 in a fresh Python each; peak RSS = "
                                "ru_maxrss of that process; caches filled before (the 4x set repeats the 1x volumes "
                                "under new case names, its rows copied from the 1x cache for identical images)")}}


def backbone_flags(cfg: dict) -> list:
    """--checkpoint / --device of a script subprocess, as this run was given them."""
    return ((["--checkpoint", Path(cfg["checkpoint"]).resolve()] if cfg["checkpoint"] else [])
            + (["--device", cfg["device"]] if cfg["device"] else []))


# ---------------------------------------------------------------------------------------------- 5. scaling
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


# ---------------------------------------------------------------------------------------------- 6. 3D
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
                          "note": "one box per organ on its largest slice, propagated (sambtcv.volume.segment); "
                                  "cold cache; includes loading each volume"}}


def measure_viewer(backbone, image: Path, label: Path, cache_dir: Path, device="cpu", organ: str = "spleen",
                   repeats: int = 20, dtype: str = config.DTYPE, encoder_dtype: str = config.DTYPE,
                   point_backbone=None) -> dict:
    """What bench.py reports for the viewer (server side, no HTTP, no background encoding), in a new
    `cache_dir`: the first prompt of the process (cold start: also the decoder's first run), the first
    prompt on an unencoded slice once warm, the median of `repeats` prompts on that encoded slice, and a
    walk from a cold cache: encoder passes per visited slice. `label` gives the organ's tight box on its
    largest slice."""
    import torch

    from sambtcv.interactive import load_engine
    from sambtcv.sessions import Sessions

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
    on an unencoded slice, and a walk's encoder passes per visited slice (`sambtcv.interactive`)."""
    image, label = sets["val_volumes"][0]
    dtype = precision.resolve(cfg["viewer_dtype"], precision.support(device, "torch")).used
    point = load_backbone(cfg["viewer_point_model"], None, device) if cfg["viewer_point_model"] else None
    out = measure_viewer(backbone, image, label, work / "viewer", device, organ="spleen", repeats=20,
                         dtype=dtype, encoder_dtype=dtype, point_backbone=point)
    print(f"bench: viewer prompt median {out['prompt_encoded_median_s']:.3f} s, first {out['prompt_first_s']:.3f} s, "
          f"{out['walk_passes_per_visited_slice']:.2f} passes per visited slice", flush=True)
    return {"viewer": {**out, "dtype": dtype, "model": backbone.name,
                       "note": "bench.measure_viewer: server-side seconds of VolumeSession.prompt, no "
                               "HTTP, no background encoding; first = warm process, slice not yet encoded"}}


def bench_interactive(cfg, work: Path) -> dict:
    """The challenge's protocol (`tools/segfm_loop.py`): `predict_segfm.py` in a new process per step on a
    512 x 512 CT (the phantom at INTERACTIVE_SHAPE, or INTERACTIVE_CT's val split), spleen, kidneys and
    liver, cold embedding cache: seconds per organ of step 1 and of the click steps (the largest), DSC."""
    from sambtcv.data import phantom_shape
    from sambtcv.phantom import write_phantom

    data = Path(cfg["interactive_ct"]) if cfg["interactive_ct"] else work / "interactive_raw"
    if not cfg["interactive_ct"]:
        with flag("--interactive-shape"):
            shape = phantom_shape(cfg["interactive_shape"])
        write_phantom(data, 1, cfg["seed"], shape=shape)
        write_json(data / "dataset_0.json", {"training": [], "validation": [
            {"image": "RawData/Training/img/img0001.nii.gz", "label": "RawData/Training/label/label0001.nii.gz"}]})
    loop = work / "interactive_loop"
    run = run_script(str(HERE / "tools" / "segfm_loop.py"),
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


def _slicer_cts(cfg, work: Path) -> list:
    """Two 512 x 512 CTs as Slicer sends them: (name, HU [1, K, J, I] int16, spacing [sk, sj, si], label [K, J, I])."""
    import nibabel as nib

    from sambtcv.data import find_cases, phantom_shape
    from sambtcv.phantom import write_phantom

    if cfg["interactive_ct"]:
        cases = find_cases(Path(cfg["interactive_ct"]))["val"][:2]
    else:
        with flag("--interactive-shape"):
            shape = phantom_shape(cfg["interactive_shape"])
        write_phantom(work / "slicer_raw", 2, cfg["seed"], shape=shape)
        found = find_cases(work / "slicer_raw")
        cases = (found["train"] + found["val"])[:2]
    out = []
    for name, image, label in cases:
        img = nib.load(str(image))
        hu = np.ascontiguousarray(np.asarray(img.dataobj).astype(np.int16).transpose(2, 1, 0)[None])
        lab = np.ascontiguousarray(np.asarray(nib.load(str(label)).dataobj).astype(np.uint8).transpose(2, 1, 0))
        si, sj, sk = (float(v) for v in img.header.get_zooms()[:3])
        out.append((name, hu, [sk, sj, si], lab))
    return out


def _largest_error_click(pred: np.ndarray, gt: np.ndarray) -> tuple:
    """([k, j, i], positive) of the challenge's next click (`sambtcv.segfm.next_click`) in the client's axes."""
    from sambtcv import segfm

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
        server = subprocess.Popen([sys.executable, str(HERE / "slicer_server.py"), "--port", str(port), "--cache-dir",
                                   str(work / "slicer_cache"), "--max-sessions", "2"], cwd=HERE, stdout=out,
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


def _stride_cases(cfg, work: Path) -> list:
    """(name, image, label) of the stride measurement: STRIDE_CT's val split, or one phantom at STRIDE_SHAPE
    with STRIDE_SLICE_MM slices."""
    from sambtcv.data import find_cases, phantom_shape
    from sambtcv.phantom import DEFAULT_SPACING, write_phantom

    if cfg["stride_ct"]:
        return find_cases(Path(cfg["stride_ct"]))["val"]
    with flag("--stride-shape"):
        shape = phantom_shape(cfg["stride_shape"])
    with flag("--stride-slice-mm"):
        if not float(cfg["stride_slice_mm"]) > 0:
            raise PipelineError(f"{{subject}} must be a number of mm > 0, got {cfg['stride_slice_mm']!r}", "mm")
    write_phantom(work / "stride_raw", 1, cfg["seed"], shape=shape,
                  spacing=(*DEFAULT_SPACING[:2], float(cfg["stride_slice_mm"])))
    found = find_cases(work / "stride_raw")
    return (found["train"] + found["val"])[:1]


def compared_stride(cfg) -> float:
    """--stride-mm: the stride (mm > 0) the stride section compares with every slice."""
    with flag("--stride-mm"):
        step = stride_mm(cfg["stride_mm"])
        if step <= 0:
            raise PipelineError(f"{{subject}} must be a number of mm > 0 (every slice is the other walk), got {step!r}",
                                "mm")
    return step


def bench_stride(cfg, backbone, work: Path, device) -> dict:
    """The challenge's 3D box per organ (`sambtcv.protocol.first_boxes`) walked through each case twice from a
    cold cache: every slice, and with a STRIDE_MM stride: encoder passes, seconds, and each organ's DSC
    against the label (the target: the mean change within 0.005)."""
    from sambtcv.protocol import first_boxes
    from sambtcv.volume import OrganPrompt

    step = compared_stride(cfg)
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
                       "note": "bench_stride: the challenge's 3D box per organ, walked (sambtcv.volume.segment) "
                               "from a cold cache each time"}}


def bench_baselines(cfg, sets: dict, device) -> dict:
    """Table 3's trained baselines: training samples/s and inference slices/s at the quick profile's input."""
    from sambtcv.baseline_nets import BASELINES, measure_speed

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


# ---------------------------------------------------------------------------------------------- report
def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def speed_rows(res: dict) -> list:
    rows = []
    if "zero_shot" in res:
        rows += zero_shot_rows(res)
    if "encoder" in res:
        rows += encoder_rows(res)
    if "decoder_training" in res:
        rows += training_rows(res)
    if "precision" in res:
        rows += precision_rows(res)
    return rows


def precision_rows(res: dict) -> list:
    p = res["precision"]
    parts = []
    if "encoder_seconds_per_slice" in p:
        e = p["encoder_seconds_per_slice"]
        parts.append(f"encoder {e['fp32']:.3f} / {e['bf16']:.3f} s per slice")
    if "decoder_step_seconds" in p:
        d = p["decoder_step_seconds"]
        parts.append(f"decoder training step {d['fp32']:.2f} / {d['bf16']:.2f} s")
    auto = p["auto"]["torch"]
    return [["precision fp32 / bf16 here; what `auto` picks", f"{'; '.join(parts)}; auto: {auto['picks']} "
             f"({auto['why']}; OpenVINO: {p['auto']['openvino']['picks']})", "auto picks the faster",
             _met(p["auto_picks_the_faster"])]]


def zero_shot_rows(res: dict) -> list:
    t, zs = TARGETS, res["zero_shot"]
    return [
        ["zero-shot speed-up (naive SamPredictor s/prompt / pipeline s/prompt)",
         f"{res['zero_shot_speedup']:.1f}x ({zs['naive_seconds_per_prompt']:.3f} vs "
         f"{zs['pipeline_seconds_per_prompt']:.4f} s/prompt)", f">= {t['zero_shot_speedup']:g}x",
         _met(res["zero_shot_speedup"] >= t["zero_shot_speedup"])],
        ["zero-shot Dice max abs diff (per organ, per prompt type)", f"{res['zero_shot_dice_max_abs_diff']:.2e}",
         f"<= {t['zero_shot_dice_max_abs_diff']:g}",
         _met(res["zero_shot_dice_max_abs_diff"] <= t["zero_shot_dice_max_abs_diff"])]]


def encoder_rows(res: dict) -> list:
    t, enc = TARGETS, res["encoder"]
    return [
        [f"image encoder bf16 speed-up, {enc['model']} (mask agreement)",
         f"{res['encoder_bf16_speedup']:.2f}x ({enc['fp32_slices_per_second']:.2f} {enc['best_format']['fp32']} -> "
         f"{enc['bf16_slices_per_second']:.2f} {enc['best_format']['bf16']} slices/s; agreement "
         f"{res['encoder_bf16_mask_agreement']:.4f})",
         f">= {t['encoder_bf16_speedup']:g}x, agreement >= {t['encoder_bf16_mask_agreement']:g}",
         _met(res["encoder_bf16_speedup"] >= t["encoder_bf16_speedup"]
              and res["encoder_bf16_mask_agreement"] >= t["encoder_bf16_mask_agreement"])]]


def training_rows(res: dict) -> list:
    t, tr = TARGETS, res["decoder_training"]
    return [
        [f"decoder training, batch {tr['batch']} vs 1 (fp32)",
         f"{res['decoder_batched_speedup']:.2f}x ({tr['fp32_samples_per_second_one_at_a_time']:.1f} -> "
         f"{tr['fp32_samples_per_second_batched']:.1f} samples/s; bf16 {tr['bf16_batched_speedup']:.2f}x)",
         f">= {t['decoder_batched_speedup']:g}x", _met(res["decoder_batched_speedup"] >= t["decoder_batched_speedup"])],
    ]


def scale_rows(res: dict) -> list:
    t, rows = TARGETS, []
    if "memory" in res:
        mem = res["memory"]["runs"]
        rows.append(["peak RSS of a Task 2 epoch, 4N / N training slices",
                     f"{res['peak_rss_ratio_4x']:.3f} ({mem['1x']['peak_rss_mib']:.0f} -> "
                     f"{mem['4x']['peak_rss_mib']:.0f} MiB; N = {mem['1x']['train_slices']})",
                     f"<= {t['peak_rss_ratio_4x']:g}", _met(res["peak_rss_ratio_4x"] <= t["peak_rss_ratio_4x"])])
    if "task1_seconds_by_scale" in res:
        sc = res["task1_seconds_by_scale"]
        lo, hi = min(sc, key=int), max(sc, key=int)
        linear_ok = sc[hi] <= t["task1_linear_slack"] * (int(hi) / int(lo)) * sc[lo]
        rows.append(["Task 1 wall time by scale (cold cache)", ", ".join(f"{k}x: {v:.1f} s" for k, v in sc.items()),
                     f"linear ({hi}x <= {t['task1_linear_slack']:.1f} x {int(hi) // int(lo)} x {lo}x)",
                     _met(linear_ok)])
    if "volume_3d" in res:
        vol = res["volume_3d"]
        rows.append(["3D: encoder passes per visited slice (one box per organ, cold cache)",
                     f"{vol['passes_per_visited_slice']:.2f} ({vol['encoder_passes']} / {vol['visited_slices']}); "
                     f"{vol['seconds_per_organ_volume']:.1f} s per organ-volume",
                     f"= {t['volume_passes_per_visited_slice']:g}",
                     _met(vol["passes_per_visited_slice"] == t["volume_passes_per_visited_slice"])])
    rt = res.get("runtimes", {})
    if "encoder_seconds_per_slice" in rt:
        enc, dec, agree = rt["encoder_seconds_per_slice"], rt["decoder_seconds"], rt["agreement_vs_torch_fp32"]
        ov = agree["openvino_bf16"]["mask_agreement"]
        rows.append(["encoder: OpenVINO bf16 vs PyTorch bf16 (s/slice; mask agreement with PyTorch fp32)",
                     f"{rt['openvino_encoder_speedup_vs_torch_bf16']:.2f}x ({enc['torch_bf16']:.3f} -> "
                     f"{enc['openvino_bf16']:.3f} s; agreement {ov:.5f}); fp32 "
                     f"{rt['openvino_encoder_speedup_vs_torch_fp32']:.2f}x",
                     f">= {t['openvino_encoder_speedup']:g}x, agreement >= {t['openvino_agreement']:g}",
                     _met(rt["openvino_encoder_speedup_vs_torch_bf16"] >= t["openvino_encoder_speedup"]
                          and ov >= t["openvino_agreement"])])
        speed = {p: dec[f"torch_{p}_box"] / dec[f"openvino_{p}_box"] for p in ("fp32", "bf16")}
        rows.append(["decoder, one box: OpenVINO vs PyTorch, same precision",
                     f"bf16 {speed['bf16']:.2f}x ({dec['torch_bf16_box'] * 1e3:.0f} -> "
                     f"{dec['openvino_bf16_box'] * 1e3:.0f} ms); fp32 {speed['fp32']:.2f}x",
                     f">= {t['openvino_decoder_speedup']:g}x", _met(speed["bf16"] >= t["openvino_decoder_speedup"])])
        mem = rt["task1_runs"]
        rows.append(["peak RSS of a Task 1 run (bf16), PyTorch vs OpenVINO",
                     f"{mem['torch']['peak_rss_mib']:.0f} -> {mem['openvino']['peak_rss_mib']:.0f} MiB "
                     f"({mem['torch']['seconds']:.0f} -> {mem['openvino']['seconds']:.0f} s)", "lower",
                     _met(mem["openvino"]["peak_rss_mib"] < mem["torch"]["peak_rss_mib"])])
    view = res.get("viewer")
    if view:
        rows += [[f"viewer: prompt on an encoded slice, median of {view['prompts']} ({view['dtype']})",
                  f"{view['prompt_encoded_median_s']:.3f} s", f"<= {t['viewer_prompt_median_s']:g} s",
                  _met(view["prompt_encoded_median_s"] <= t["viewer_prompt_median_s"])],
                 ["viewer: a click on an encoded slice (median; the point model's local correction)",
                  f"{view['click_median_s']:.3f} s", f"<= {t['viewer_click_median_s']:g} s",
                  _met(view["click_median_s"] <= t["viewer_click_median_s"])],
                 ["viewer: a correction, a click on a walked slice (carried to its neighbours; median of "
                  f"{view.get('corrections', 0)})", f"{view['correction_median_s']:.3f} s"
                  if view.get("correction_median_s") is not None else "-", f"<= {t['viewer_click_median_s']:g} s",
                  _met((view.get("correction_median_s") or 0) <= t["viewer_click_median_s"])],
                 ["viewer: a box with + and - points on an encoded slice, decoded together (median)",
                  f"{view['box_and_points_median_s']:.3f} s", f"<= {t['viewer_click_median_s']:g} s",
                  _met(view["box_and_points_median_s"] <= t["viewer_click_median_s"])],
                 ["viewer: first prompt on an unencoded slice", f"{view['prompt_first_s']:.3f} s",
                  f"<= {t['viewer_prompt_first_s']:g} s", _met(view["prompt_first_s"] <= t["viewer_prompt_first_s"])],
                 ["viewer: a walk's encoder passes per visited slice",
                  f"{view['walk_passes_per_visited_slice']:.2f} "
                  f"({view['walk_encoder_passes']} / {view['walk_visited']})",
                  f"<= {t['volume_passes_per_visited_slice']:g}",
                  _met(view["walk_passes_per_visited_slice"] <= t["volume_passes_per_visited_slice"])]]
    inter = res.get("interactive")
    if inter:
        rows += [["interactive protocol: step 1 (3D box), seconds per organ, largest case (a process per step)",
                  f"{inter['seconds_per_class_step1_max']:.1f} s", f"<= {t['interactive_first_step_s_per_organ']:g} s",
                  _met(inter["seconds_per_class_step1_max"] <= t["interactive_first_step_s_per_organ"])],
                 ["interactive protocol: each click step, seconds per organ, largest",
                  f"{inter['seconds_per_class_later_steps_max']:.1f} s (final DSC {inter['dsc_final_mean']:.3f})",
                  f"<= {t['interactive_later_step_s_per_organ']:g} s",
                  _met(inter["seconds_per_class_later_steps_max"] <= t["interactive_later_step_s_per_organ"])]]
    sl = res.get("slicer")
    if sl:
        first = {n: v[0] for n, v in sl["liver_dsc"].items()}
        rows += [["3D Slicer protocol: set_image of a 512 x 512 CT, cold cache (largest of two clients)",
                  f"{sl['set_image_s_max']:.1f} s", f"<= {t['slicer_set_image_s']:g} s",
                  _met(sl["set_image_s_max"] <= t["slicer_set_image_s"])],
                 ["3D Slicer protocol: a box and its walk, or a click (largest)",
                  f"{sl['interaction_s_max']:.1f} s (liver DSC after the box "
                  f"{', '.join(f'{v:.3f}' for v in first.values())})", f"<= {t['slicer_interaction_s']:g} s",
                  _met(sl["interaction_s_max"] <= t["slicer_interaction_s"])],
                 [f"3D Slicer protocol: the server's peak RSS with {sl['leases']} leases on 512 x 512 CTs",
                  f"{sl['peak_rss_mib']:.0f} MiB", "measured", "-"]]
    st = res.get("stride")
    if st:
        e, s = st["every_slice"], st["stepped"]
        rows.append([f"a 3D box's walk, every slice -> a {st['stride_mm']:g} mm stride ({st['data']}): encoder "
                     "passes, seconds, DSC change (mean, lowest organ)",
                     f"{e['encoder_passes']} -> {s['encoder_passes']} passes, "
                     f"{e['seconds']:.0f} -> {s['seconds']:.0f} s, "
                     f"{st['dsc_change_mean']:+.4f} ({st['dsc_change_lowest']:+.4f})",
                     f"fewer passes, DSC within {t['stride_dsc_change']:g}",
                     _met(s["encoder_passes"] < e["encoder_passes"]
                          and abs(st["dsc_change_mean"]) <= t["stride_dsc_change"])])
    for model in res.get("baselines", {}).get("models", {}).values():
        rows.append([f"baseline {model['name']}: training / inference speed",
                     f"{model['train_samples_per_second']:.1f} samples/s / "
                     f"{model['infer_slices_per_second']:.1f} slices/s",
                     "measured", "-"])
    if res.get("report_stages"):
        rs = res["report_stages"]
        rows.append([f"`./run.sh report` ({rs['model']}, {rs['profile']} profile), stages that ran",
                     f"{rs['seconds']:.0f} s ({rs['seconds'] / 60:.1f} min)", f"<= {t['report_minutes']:g} min",
                     _met(rs["seconds"] <= 60 * t["report_minutes"])])
    return rows


def report(res: dict) -> str:
    rows = speed_rows(res) + scale_rows(res)
    m = res["machine"]
    return ("## Benchmarks (`python bench.py" + (f" --profile {res['profile']}" if res["profile"] else "") + "`)\n\n"
            + markdown_table(["measure", "measured", "target", "met"], rows)
            + f"\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}, bf16 "
              f"{'native' if m['bf16']['native'] else 'not native'} ({m['bf16']['detail']}); phantom slices "
              f"{res['phantom_shape']}. Full numbers in bench.json.\n")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--sections"):
        wanted = sections_arg(cfg["sections"])
    if "stride" in wanted:
        compared_stride(cfg)
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
    train = None
    for name in SECTION_NAMES:
        if name not in wanted:
            continue
        print(f"bench: {name}: {SECTION_NAMES[name]}", flush=True)
        if name == "zero_shot":
            res.update(timed(name, bench_zero_shot, cfg, backbone, sets["base"], device))
        elif name == "encoder":
            res.update(timed(name, bench_encoder, cfg, backbone, sets["base"], device))
        elif name == "runtimes":
            res.update(timed(name, bench_runtimes, cfg, backbone, sets["base"], work, device))
            if str(cfg["encoder_batches"]).strip() not in ("", "1"):
                res.update(timed("encoder_batches", bench_encoder_batches, cfg, backbone, sets["base"], device))
        elif name == "training":
            train = timed("train_cache_fill", open_split, sets["base"], "train", backbone, "fp32", device)
            res.update(timed(name, bench_training, cfg, backbone, train, device))
        elif name == "precision":
            res.update(timed(name, bench_precision, res, device))
        elif name == "memory":
            res.update(timed(name, bench_memory, cfg, backbone, sets, device, work))
        elif name == "task1_scaling":
            res.update(timed(name, bench_task1_scaling, cfg, sets, work))
        elif name == "volume_3d":
            res.update(timed(name, bench_volume, cfg, backbone, sets, work, device))
        elif name == "viewer":
            res.update(timed(name, bench_viewer, cfg, backbone, sets, work, device))
        elif name == "interactive":
            res.update(timed(name, bench_interactive, cfg, work))
        elif name == "slicer":
            res.update(timed(name, bench_slicer, cfg, work))
        elif name == "stride":
            res.update(timed(name, bench_stride, cfg, backbone, work, device))
        elif name == "baselines":
            res.update(timed(name, bench_baselines, cfg, sets, device))
    res.update(report_stages(cfg))
    res["section_seconds"] = sections
    res["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    res["config"] = cfg
    keys = ["zero_shot_speedup", "zero_shot_dice_max_abs_diff", "encoder_bf16_speedup", "encoder_bf16_mask_agreement",
            "decoder_batched_speedup", "peak_rss_ratio_4x", "task1_seconds_by_scale", "machine"]
    res = {**{k: res[k] for k in keys if k in res}, **{k: v for k, v in res.items() if k not in keys}}
    out = Results(cfg["results_dir"])
    md = report(res)
    write_json(out.table("bench", "json"), res)
    write_text(out.table("bench", "md"), md)
    print(md, end="")
    print(f"bench: {res['bench_seconds']} s; wrote {out.table('bench', 'json')} and {out.table('bench', 'md')}")


if __name__ == "__main__":
    run_main(main)
