"""3D rules side by side: each stop rule on each case, one box per organ against a box on every slice.

    python study_3d.py --data-dir RAW --split val --results-dir results/study_3d
    python study_3d.py --data-dir RAW --rules intensity,agree --organs spleen,right_kidney,left_kidney,liver
    python study_3d.py --synthetic-lesions 3 --results-dir results/study_3d     # a diseased phantom (liver lesions)

For every case of the split: the case is loaded and cut into slices as segment_volume.py does, the
upper bound (a ground-truth box on every slice that holds the organ) is decoded once, and then each
rule of RULES (sambtcv.engine.propagation.STOP_RULES) walks from one tight box on the organ's largest slice.
Slices are encoded once for all rules (the 3D embedding cache). Each case is reported on its own, per
organ (a mean hides a collapse), with the slices the walk kept while unsure and why it stopped.
Writes one record (RESULTS_DIR/records/study_3d/) and study_3d.json / .md built from it. The data
must be labelled for the organs asked; other labelled organs are not prompted.

Without DATA_DIR, SYNTHETIC_LESIONS > 0 writes a diseased phantom (SYNTHETIC_VOLUMES volumes whose livers
hold that many hypodense lesions, the first large) into WORK_DIR and studies all its volumes.
"""
from __future__ import annotations

import time
from pathlib import Path

from sambtcv.cli import flag, load_models, parse_config, results_folder, run_main, start_run, volume_decoder
from sambtcv.core import config, names
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, markdown_table, write_json, write_text
from sambtcv.data.btcv import check_geometry, find_cases, parse_window
from sambtcv.engine.propagation import STOP_RULES, merge
from sambtcv.engine.volume import WalkSettings, evaluate_case, every_slice_boxes, load_case, margin_mm
from sambtcv.study import records

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # a dataset in one of the contract's layouts; empty: a diseased phantom (SYNTHETIC_LESIONS)
SPLIT = "val"  # val | train | all: the cases studied
RULES = "intensity,continuity,adaptive,agree"  # stop rules to compare, comma list (propagation.STOP_RULES) or all
ORGANS = "spleen,right_kidney,left_kidney,liver"  # organs prompted where labelled (comma list or all)
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint whose decoder is used instead of the pretrained one
MARGIN_MM = "auto"  # mm added on each side of the previous box, >= 0; auto: per model
RESULTS_DIR = "results/study_3d"  # study_3d.json / .md and the record go here
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings by (volume content, model, encoder dtype)
WORK_DIR = "data/study_3d"  # where the diseased phantom is written
SYNTHETIC_VOLUMES = 2  # without DATA_DIR: phantom volumes (>= 1)
SYNTHETIC_LESIONS = 3  # without DATA_DIR: liver lesions per phantom volume (>= 1)
SYNTHETIC_SHAPE = "160,160,32"  # without DATA_DIR: voxels of each phantom volume
WINDOW_HU = config.WINDOW_HU  # HU window, as preprocess.py
SEED = config.SEED  # the phantom's seed (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------


def study_cases(cfg) -> list[tuple]:
    """(case, image, label) of the cases to study: the split of DATA_DIR, or a diseased phantom."""
    if not cfg["data_dir"]:
        from sambtcv.data.btcv import phantom_shape
        from sambtcv.data.phantom import write_phantom

        with flag("--synthetic-shape"):
            shape = phantom_shape(cfg["synthetic_shape"])
        raw = Path(cfg["work_dir"]) / f"lesions{cfg['synthetic_lesions']}_seed{cfg['seed']}"
        with flag("--work-dir"):
            images = write_phantom(raw, cfg["synthetic_volumes"], cfg["seed"], shape=shape,
                                   lesions=cfg["synthetic_lesions"])
        return [(f"lesions_{p.name.split('.')[0]}", p, p.parent.parent / "label" / p.name.replace("img", "label", 1))
                for p in images]
    found = find_cases(Path(cfg["data_dir"]))
    if cfg["split"] == "all":
        return found["train"] + found["val"]
    with flag("--split"):
        names.check_choice(cfg["split"], (*names.SPLITS, "all"), "split")
    return found[cfg["split"]]


def markdown(view: dict) -> str:
    rows = []
    for case, per_rule in view["cases"].items():
        for organ in view["organs"]:
            bound = next((r[organ]["dice_every_slice_box"] for r in per_rule.values() if organ in r), None)
            if bound is None:
                continue
            rows.append([case, organ, bound, *[per_rule[rule].get(organ, {}).get("dice_one_box")
                                               for rule in view["rules"]]])
    means = [["**mean**", "", None, *[view["mean"][rule] for rule in view["rules"]]]]
    return (f"## 3D stop rules side by side ({view['model']}, margin {view['margin_mm']} mm)\n\n"
            + markdown_table(["case", "organ", "upper bound (box on every slice)",
                              *[f"one box, {rule}" for rule in view["rules"]]], rows + means)
            + "\n3D Dice per case and organ. Upper bound = a ground-truth box on every slice; one box = a tight box "
              "on the organ's largest slice, propagated by the rule. Mean over all (case, organ) pairs. "
              f"Record: {view['record']}.\n")


def run(cfg, device, res: Results) -> dict:
    with flag("--rules"):
        rules = names.name_list(cfg["rules"], list(STOP_RULES), "stop rule")
    with flag("--organs"):
        organs = names.organ_ids_arg(cfg["organs"])
    with flag("--window-hu"):
        window = parse_window(cfg["window_hu"])
    cases = study_cases(cfg)
    if not cases:
        raise PipelineError("no cases to study; check --data-dir and --split")
    for _, image, label in cases:
        check_geometry(image, label)
    models = load_models(cfg, device)
    backbone = models.backbone
    with flag("--margin-mm"):
        margin = margin_mm(cfg["margin_mm"], backbone.name)
    t0, out, walks = time.perf_counter(), {}, {}
    for name, image, label in cases:
        case = load_case(name, image, label, window)
        present = [o for o in organs if (case.label == o).any()]
        dec = volume_decoder(case, models, cfg, device)
        every = merge(every_slice_boxes(dec, case, present), case.stack.shape)
        out[name], walks[name] = {}, {}
        for rule in rules:
            result = evaluate_case(case, dec, WalkSettings(rule, margin), present, every)
            out[name][rule], walks[name][rule] = result.scores, result.walks
            print(f"{name} {rule}: " + ", ".join(f"{o} {s['dice_one_box']:.3f} (bound {s['dice_every_slice_box']:.3f})"
                                                 for o, s in result.scores.items()), flush=True)
    pairs = [(c, o) for c in out for o in out[c][rules[0]]]
    mean = {rule: sum(out[c][rule][o]["dice_one_box"] for c, o in pairs) / max(len(pairs), 1) for rule in rules}
    result = {"model": backbone.name, "margin_mm": margin, "rules": rules,
              "organs": [names.organ_name(o) for o in organs],
              "cases": out, "walks": walks, "mean": mean, "seconds": round(time.perf_counter() - t0, 1)}
    settings = {"model": backbone.name, "backbone": backbone.key, "finetuned": cfg["finetuned"], "rules": rules,
                "organs": result["organs"], "margin_mm": margin, "window_hu": list(window), "dtype": cfg["dtype"],
                "encoder_dtype": cfg["encoder_dtype"], "runtime": models.runtime.name,
                "cases": [[n, str(i), str(lab)] for n, i, lab in cases]}
    rec = records.write_record(res.root, "study_3d", settings, result,
                               {"id": None, "data": cfg["data_dir"] or "diseased phantom"})
    view = {**rec.result, "record": rec.id}
    write_json(res.table("study_3d", "json"), view)
    write_text(res.table("study_3d", "md"), markdown(view))
    return view


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    res = Results(cfg["results_dir"])
    with results_folder(res.root):
        view = run(cfg, device, res)
    print(markdown(view), end="")
    print(f"wrote {res.table('study_3d', 'md')}")


if __name__ == "__main__":
    run_main(main)
