"""Task 3 (validation): per-organ classification accuracy (report Table 4) and Figure 3.

    python classify_val_task3.py --slices data/slices --results-dir results

Loads RESULTS_DIR/classifier/best.pt (from classify_train_task3.py), decodes every (slice, organ) of
the validation split with the prompt type it was trained with, and writes
table4_classification.json / .md / .csv (accuracy and count per organ, weighted average), a
confusion matrix (figures/confusion_matrix.png) and Figure 3 (figures/fig3_classification_example.png:
a misclassified sample, the smallest one, or else the smallest organ region, beside its slice). The
mask Dice of the same model is reported beside the accuracy together with the Dice of the decoder it
started from, which the classification training must not have changed.
"""
from __future__ import annotations

import numpy as np

from sambtcv.cli import flag, make_runtime, parse_config, results_folder, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, load_checkpoint, markdown_table, save_figure
from sambtcv.core.metrics import DiceTable
from sambtcv.core.names import ORGANS, SPLITS, check_choice, organ_name
from sambtcv.models.backbones import load_backbone
from sambtcv.models.classifier import load_classifier
from sambtcv.models.decoder import load_decoder
from sambtcv.models.embeddings import open_split
from sambtcv.study import records, tables
from sambtcv.study.evaluation import evaluate

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # output of preprocess.py
RESULTS_DIR = config.RESULTS_DIR  # Table 4 and Figure 3 go here
MODEL = config.MODEL  # the backbone the classifier was trained on
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
CLASSIFIER = None  # classifier checkpoint; default RESULTS_DIR/classifier/best.pt
SPLIT = "val"  # val | train
SEED = config.SEED  # seeds the random point prompts (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
POINT_MASK = config.POINT_MASK  # which of SAM's three masks a point keeps: smallest | iou (the highest predicted IoU)
ENCODE_BATCH = config.ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = config.DECODE_BATCH  # prompts per decoder pass (>= 1)
# -----------------------------------------------------------------------------------------------------


def confusion_figure(confusion: np.ndarray, organs_present):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(ORGANS)), [o.replace("_", " ") for o in ORGANS], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(ORGANS)), [o.replace("_", " ") + ("" if i + 1 in organs_present else " (absent)")
                                       for i, o in enumerate(ORGANS)], fontsize=7)
    for t in range(len(ORGANS)):
        for p in range(len(ORGANS)):
            if confusion[t, p]:
                ax.text(p, t, int(confusion[t, p]), ha="center", va="center", fontsize=6,
                        color="white" if rows[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted organ")
    ax.set_ylabel("true organ")
    ax.set_title("Confusion matrix (counts; colour = row fraction)")
    return fig


def example_figure(image, mask, true_name, pred_name, case, z):
    """Figure 3: the raw slice (organ region boxed) beside the zoomed region with its classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    rows, cols = np.nonzero(mask)
    pad = max(8, int(0.6 * max(np.ptp(rows), np.ptp(cols))))
    y0, y1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, mask.shape[0])
    x0, x1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, mask.shape[1])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 5))
    a.imshow(image, cmap="gray")
    a.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5))
    a.set_title(f"raw slice ({case}, z={z})")
    b.imshow(image[y0:y1, x0:x1], cmap="gray")
    b.contour(mask[y0:y1, x0:x1], levels=[0.5], colors="red", linewidths=1.2)
    verdict = "correct" if true_name == pred_name else "wrong"
    b.set_title(f"region of {true_name.replace('_', ' ')} ({int(mask.sum())} px)\n"
                f"predicted: {pred_name.replace('_', ' ')} ({verdict})")
    for ax in (a, b):
        ax.axis("off")
    return fig


def classify(cfg: dict, device, ck: dict, ck_path) -> dict:
    """Decode every (slice, organ) of the split with the classifier; the Table 4 numbers and each sample's
    ((slice index, organ), predicted organ)."""
    prompt_type = ck["config"]["prompt"]
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    if ck["config"].get("backbone") != backbone.key:
        raise PipelineError(f"{ck_path} was trained on {ck['config'].get('backbone')}, not {backbone.key}; "
                            f"pass the matching --model/--checkpoint")
    rt = make_runtime(cfg, backbone, device)
    data = open_split(cfg["slices"], cfg["split"], backbone, cfg["encoder_dtype"], device, cfg["encode_batch"],
                      runtime=rt)
    model = rt.decoder(load_classifier(backbone, ck).to(device), "classifier")
    samples = []  # ((slice index, organ), predicted organ)

    def collect(_prompt, items, decoded, _preds):
        samples.extend(zip(items, (decoded.class_logits.float().argmax(1).cpu() + 1).tolist()))

    after = evaluate(model, data, [prompt_type], cfg["seed"], device, cfg["dtype"], cfg["decode_batch"], DiceTable(),
                     on_batch=collect, point_mask=cfg["point_mask"])
    # the decoder the classifier started from (its mask parts were frozen): the same Dice is expected
    start = rt.decoder(load_decoder(backbone, ck["config"].get("finetuned_path")).to(device), "finetuned")
    before = evaluate(start, data, [prompt_type], cfg["seed"], device, cfg["dtype"], cfg["decode_batch"],
                      point_mask=cfg["point_mask"])
    true = np.array([organ for (_, organ), _ in samples])
    pred = np.array([p for _, p in samples])
    present = sorted(set(true.tolist()))
    confusion = np.zeros((len(ORGANS), len(ORGANS)), dtype=np.int64)
    np.add.at(confusion, (true - 1, pred - 1), 1)
    result = {"accuracy": {organ_name(o): float(np.mean(pred[true == o] == o)) for o in present},
              "n": {organ_name(o): int(np.sum(true == o)) for o in present},
              "weighted_average": float(np.mean(pred == true)), "prompt": prompt_type, "split": cfg["split"],
              "model": backbone.name, "classifier": str(ck_path),
              "mask_mdice_after_classification_training": after.mdice()[prompt_type],
              "mask_mdice_before_classification_training": before.mdice()[prompt_type],
              "confusion": confusion.tolist(), "seed": cfg["seed"]}
    return {"result": result, "samples": samples, "slices": data.slices,
            "settings": {"classifier": str(ck_path), "classifier_config": ck["config"], "split": cfg["split"],
                         "seed": cfg["seed"], "dtype": cfg["dtype"], "encoder_dtype": cfg["encoder_dtype"],
                         "model": backbone.name, "backbone": backbone.key, "runtime": rt.name,
                         "point_mask": cfg["point_mask"]}}


def write_outputs(res: Results, out: dict) -> list:
    """The Task 3 record, Table 4 built from it, the confusion matrix and Figure 3."""
    result, samples, slices = out["result"], out["samples"], out["slices"]
    records.write_record(res.root, "task3", out["settings"], result,
                         tables.slices_of(slices))
    view = tables.write_table4(res.root)
    rows = tables.table4_rows(view)
    present = {i + 1 for i, o in enumerate(ORGANS) if o in view["n"]}
    save_figure(confusion_figure(np.array(result["confusion"]), present), res.figure("confusion"))
    # Figure 3: the smallest misclassified region, else the smallest region
    areas = [slices.records[i]["organs"][str(organ)]["area"] for (i, organ), _ in samples]
    wrong = [j for j, ((_, t), p) in enumerate(samples) if t != p]
    j = min(wrong or range(len(samples)), key=lambda q: areas[q])
    (i, t), p = samples[j]
    image, label = slices.load(i)
    save_figure(example_figure(image, label == t, organ_name(t), organ_name(p), slices.records[i]["case"],
                               slices.records[i]["z"]), res.figure("fig3"))
    return rows


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--split"):
        check_choice(cfg["split"], SPLITS, "split")
    res = Results(cfg["results_dir"])
    with results_folder(res.root):
        ck_path = cfg["classifier"] or Results.best(res.classifier_run)
        if not cfg["classifier"] and not ck_path.is_file():
            raise PipelineError(f"classifier checkpoint not found: {ck_path}; run classify_train_task3.py first")
        with flag("--classifier"):
            ck = load_checkpoint(ck_path, "classifier")
        rows = write_outputs(res, classify(cfg, device, ck, ck_path))
    print(markdown_table(["organ", "accuracy", "n"], rows), end="")
    print(f"wrote {res.table('table4', 'md')}")


if __name__ == "__main__":
    run_main(main)
