"""The study's own numbers, and every table of the contract as a view built from records (`sambtcv.study.records`).

A view is rebuilt whole from records each time (never merged into): ``table1_zero_shot.*`` from the
newest Task 1 record, ``table2_finetune.*`` from the newest finetuning record of each prompt type on the
newest record's data, ``baselines.*`` and ``table3_comparison.*`` from the newest record of each model,
grouped by the data they were measured on, ``table4_classification.*`` and ``volume_3d.*`` from the newest
record of their stage. Every row names the record (run) it comes from and states its own settings; rows
measured on different data never share one table. `sambtcv.study.report` builds REPORT.md from the same
functions, on the records of one report.
"""
from __future__ import annotations

import numpy as np

from sambtcv.core.files import Results, fixed, markdown_table, write_csv, write_json, write_text
from sambtcv.core.metrics import per_organ_markdown
from sambtcv.core.names import PROMPT_TYPES
from sambtcv.study import records as rec

REPORT_SOURCE = "quoted from the report (Table 3), BTCV"
# SAM ViT-H on BTCV, the report's Tables 1 and 2
REPORT_ZERO_SHOT = {"one_central_point": 0.6124, "one_random_point": 0.5929, "three_random_points": 0.6437,
                    "bound_box": 0.8649, "larger_box": 0.8267}
REPORT_FINETUNED = {"one_central_point": 0.8556, "one_random_point": 0.8535, "three_random_points": 0.8532,
                    "bound_box": 0.9158, "larger_box": 0.9161}
# the report's Table 3 (Avg mDice on BTCV), with the reference numbers it gives
QUOTED_TABLE3 = [("U-Net", 0.921, "[7]"), ("ResU-Net", 0.924, "[8]"), ("DeepLabV3", 0.892, "[9]"),
                 ("PIPO-FAN", 0.936, "[10]"), ("SAM ViT-H, finetuned, bound box", 0.916, "")]
BASELINE_ORDER = ["U-Net", "ResU-Net", "DeepLabV3", "SwinUNETR"]
TASK2_ROW_SETTINGS = ("epochs", "batch_size", "lr", "seed", "dtype", "encoder_dtype")


def data_description(params: dict) -> str:
    """One line naming the data a slices folder came from (its preprocess.json)."""
    if params.get("synthetic"):
        s = params["synthetic"]
        return f"synthetic abdominal CT phantom ({s['volumes']} volumes, seed {s['seed']}), not BTCV"
    return f"CT volumes from {params['data_dir']}"


def slices_of(identity, described=None) -> dict:
    """A record's "slices": the identity (signature) of the slice set `identity` and a line naming the data
    of `described` (default: the same set; training runs name their training slices, keyed by validation's)."""
    return {"id": identity.signature, "data": data_description((described or identity).params)}


def precision_text(r: rec.Record) -> str:
    """The precision a record's run used, and why when ``auto`` chose it: "encoder bf16, decoder bf16 (auto:
    ...)"."""
    s, chosen = r.settings, r.data.get("precision") or {}
    used = [f"{label} {s[key]}" for key, label in (("encoder_dtype", "encoder"), ("dtype", "decoder")) if key in s]
    why = next((c["reason"] for c in chosen.values() if c.get("asked") == "auto"), None)
    return ", ".join(used) + (f" (auto: {why})" if why else "")


# ---------------------------------------------------------------------------------------------- Table 1
def table1_view(r: rec.Record) -> dict:
    """table1_zero_shot.json of one Task 1 record."""
    s, res = r.settings, r.result
    return {"model": s["model"], "checkpoint": s["checkpoint"], "finetuned": s["finetuned"], "split": s["split"],
            "n_slices": res["n_slices"], "slices_id": r.slices.get("id"), "encoder_passes": res["encoder_passes"],
            "seconds": res["seconds"], "timing": res["timing"], "mdice": res["mdice"], "per_organ": res["per_organ"],
            "volume_dice": res["volume_dice"], "n_per_organ": res["n_per_organ"], "seed": s["seed"],
            "dtype": s["dtype"], "encoder_dtype": s["encoder_dtype"], "runtime": s.get("runtime", "torch"),
            "device": res.get("device"), "point_prompt_mask": res.get("point_prompt_mask"),
            "box_prompt_mask": res.get("box_prompt_mask"), "precision": precision_text(r), "record": r.id}


def table1_markdown(view: dict) -> str:
    rows = [[p, view["mdice"][p], REPORT_ZERO_SHOT[p]] for p in view["mdice"]]
    which = f"finetuned decoder {view['finetuned']}" if view.get("finetuned") else "zero-shot"
    md = (f"## Table 1: mDice of different prompts ({which}, {view['model']}, {view['split']} split, "
          f"{view['n_slices']} slices, runtime {view['runtime']})\n\n"
          + markdown_table(["prompt type", "mDice (here)", "mDice (report, SAM ViT-H on BTCV)"], rows)
          + f"\nPoint prompts: {view['point_prompt_mask']} (the study's SamPredictor keeps the highest predicted "
            "IoU). "
            "Boxes: single-mask output. Dice at each slice's own resolution; mDice = mean over organs present. "
            f"Precision: {view['precision']}. Record: {view['record']}.\n\n")
    md += per_organ_markdown(view["per_organ"], "### Per-organ slice Dice") + "\n"
    md += per_organ_markdown(view["volume_dice"], "### Per-organ volume Dice (stacked slices, mean over cases)")
    md += f"\nSlices scored per organ: {view['n_per_organ']}\n"
    return md


def write_table1(root) -> dict | None:
    """Rebuild table1_zero_shot.json / .md / .csv from the newest Task 1 record of `root`."""
    view = _write_newest(root, "task1", "table1", table1_view, table1_markdown)
    if view is None:
        return None
    write_csv(Results(root).table("table1", "csv"), ["prompt", "organ", "slice_dice", "volume_dice"],
              [[p, o, d, view["volume_dice"][p].get(o)] for p in view["per_organ"]
               for o, d in view["per_organ"][p].items()])
    return view


def side_by_side(views: list[dict]) -> str:
    """Table 1 of several zero-shot models on the same slices, beside the report's SAM ViT-H."""
    rows = [[p, *[v["mdice"].get(p) for v in views], REPORT_ZERO_SHOT[p]] for p in PROMPT_TYPES
            if p in views[0]["mdice"]]
    header = ["prompt type", *[f"{v['model']} (here)" for v in views], "SAM ViT-H (report, BTCV)"]
    seconds = ", ".join(f"{v['model']} {v['seconds']:.0f} s (record {v['record']})" for v in views)
    return ("## Table 1: zero-shot mDice of the models side by side (same validation slices)\n\n"
            + markdown_table(header, rows) + f"\nTime of each Task 1 run, encoder passes included: {seconds}.\n\n")


# ---------------------------------------------------------------------------------------------- Table 2
def table2_records(root) -> tuple[list[rec.Record], int]:
    """The newest finetuning record of each prompt type among those on the newest record's data and
    backbone; and how many prompt types were left out because their newest run was on other data."""
    found = rec.records(root, "task2")
    if not found:
        return [], 0
    ref = found[-1]
    same = [r for r in found if r.slices.get("id") == ref.slices.get("id")
            and r.settings.get("backbone") == ref.settings.get("backbone")]
    newest = {r.settings["prompt"]: r for r in same}
    other = {r.settings["prompt"] for r in found} - set(newest)
    return [newest[p] for p in PROMPT_TYPES if p in newest], len(other)


def table2_view(runs: list[rec.Record], left_out: int = 0) -> dict:
    """table2_finetune.json of finetuning records (one per prompt type, all on the same data)."""
    res = {p: r.result for p, r in ((r.settings["prompt"], r) for r in runs)}
    out = {"model": runs[0].settings["model"],
           "mdice_original": {p: x["mdice_original"] for p, x in res.items()},
           "mdice_finetuned": {p: x["mdice_finetuned"] for p, x in res.items()},
           "improved_pct": {p: 100.0 * (x["mdice_finetuned"] - x["mdice_original"]) / max(x["mdice_original"], 1e-8)
                            for p, x in res.items()}}
    for key in ("per_organ_original", "per_organ_finetuned", "volume_dice_finetuned", "train_seconds", "eval_seconds",
                "train_samples_per_second", "best_epoch_val_mdice", "best_epoch"):
        out[key] = {p: x[key] for p, x in res.items()}
    out["trainable_params"] = runs[0].result["trainable_params"]
    out["checkpoints"] = {p: x["checkpoint"] for p, x in res.items()}
    out["rows"] = [{"prompt": r.settings["prompt"], "record": r.id,
                    **{k: r.settings[k] for k in TASK2_ROW_SETTINGS}} for r in runs]
    for k in TASK2_ROW_SETTINGS:  # a setting shared by every row is also said once
        if len({repr(row[k]) for row in out["rows"]}) == 1:
            out[k] = out["rows"][0][k]
    out["data"] = runs[0].slices.get("data")
    out["precision"] = "; ".join(dict.fromkeys(precision_text(r) for r in runs))
    out["slices_id"] = runs[0].slices.get("id")
    out["left_out_other_data"] = left_out
    return out


def table2_markdown(view: dict) -> str:
    rows = [[row["prompt"], view["mdice_original"][row["prompt"]], view["mdice_finetuned"][row["prompt"]],
             view["improved_pct"][row["prompt"]], view["best_epoch"][row["prompt"]], row["epochs"],
             row["batch_size"], f"{row['lr']:g}", REPORT_ZERO_SHOT[row["prompt"]], REPORT_FINETUNED[row["prompt"]],
             row["record"]] for row in view["rows"]]
    note = (f" {view['left_out_other_data']} prompt type(s) whose newest run was on other data are not shown."
            if view.get("left_out_other_data") else "")
    return (f"## Table 2: mDice of different prompts after finetuning ({view['model']}, validation split)\n\n"
            + markdown_table(["prompt type", "mDice (original)", "mDice (finetuned)", "improved (%)", "best epoch",
                              "epochs", "batch", "SGD lr", "report original", "report finetuned", "run (record)"],
                             rows, "{:.4f}")
            + f"\nData: {view['data']}. Each row is one finetuning run; its epochs, batch size and learning rate are "
              "its own. Dice at each slice's own resolution. Best checkpoint by validation Dice; best epoch 0 "
              f"means no epoch beat the starting weights, which were kept. Precision: {view['precision']}.{note}\n\n"
            + per_organ_markdown(view["per_organ_finetuned"], "### Per-organ Dice after finetuning"))


def write_table2(root) -> dict | None:
    runs, left_out = table2_records(root)
    if not runs:
        return None
    res, view = Results(root), table2_view(runs, left_out)
    write_json(res.table("table2", "json"), view)
    write_text(res.table("table2", "md"), table2_markdown(view))
    write_csv(res.table("table2", "csv"), ["prompt", "mdice_original", "mdice_finetuned", "improved_pct", "epochs",
                                           "batch_size", "lr", "record"],
              [[row["prompt"], view["mdice_original"][row["prompt"]], view["mdice_finetuned"][row["prompt"]],
                view["improved_pct"][row["prompt"]], row["epochs"], row["batch_size"], row["lr"], row["record"]]
               for row in view["rows"]])
    return view


# ---------------------------------------------------------------------------------------------- baselines
def baseline_groups(found: list[rec.Record]) -> list[list[rec.Record]]:
    """The newest record of each model per data set, grouped by data set, the newest data set first."""
    groups = {}
    for r in found:  # oldest first: newer records replace older ones of the same model and data
        groups.setdefault(r.slices.get("id"), {})[r.settings["model"]] = r
    order = sorted(groups, key=lambda sid: max(r.data["created"] for r in groups[sid].values()), reverse=True)
    return [sorted(groups[sid].values(), key=lambda r: _baseline_rank(r.result["name"])) for sid in order]


def _baseline_rank(name: str) -> int:
    return BASELINE_ORDER.index(name) if name in BASELINE_ORDER else len(BASELINE_ORDER)


def baselines_group_view(group: list[rec.Record]) -> dict:
    first = group[0]
    return {"data": first.slices.get("data"), "slices_id": first.slices.get("id"),
            "n_val_slices": first.result["n_val_slices"], "seed": first.settings["seed"],
            "profile": first.settings.get("profile"), "precision_note": baselines_precision(group),
            "models": {r.result["name"]: {**r.result["entry"], "record": r.id} for r in group}}


def baselines_view(groups: list[list[rec.Record]]) -> dict:
    """baselines.json: the newest data set's models, then the other data sets' (never mixed)."""
    view = baselines_group_view(groups[0])
    view["other_data"] = [baselines_group_view(g) for g in groups[1:]]
    evals = [r.result["eval_slices"] for r in groups[0] if r.result.get("eval_slices")]
    if evals:
        view["eval_slices"] = {"data": evals[-1]["data"], "slices_id": evals[-1]["slices_id"],
                               "models": {r.result["name"]: r.result["eval_slices"]["entry"] for r in groups[0]
                                          if r.result.get("eval_slices", {}).get("slices_id")
                                          == evals[-1]["slices_id"]}}
    return view


def _settings_text(s: dict) -> str:
    return (f"{s['epochs']} x {s['samples_per_epoch'] or 'all'}, batch {s['batch_size']}, lr {s['lr']:g}, "
            f"{s['dtype']}, input {s['input_size']}")


def baselines_precision(group: list[rec.Record]) -> str:
    """Why the baselines' precision, when ``auto`` chose it (one line for the group)."""
    why = {c["reason"] for r in group for c in (r.data.get("precision") or {}).values() if c.get("asked") == "auto"}
    return f" Precision chosen by auto: {'; '.join(sorted(why))}." if why else ""


def baselines_group_markdown(group: dict, title: str) -> str:
    models = group["models"]
    rows = [[n, m["mdice"], f"{m['params'] / 1e6:.2f} M", fixed(m["train_seconds"], 0), fixed(m["infer_seconds"], 1),
             fixed(m["train_samples_per_second"], 1), fixed(m["infer_slices_per_second"], 1), m["best_epoch"],
             _settings_text(m["settings"]), m["record"]] for n, m in models.items()]
    return (f"{title} ({group['data']}; validation split, {group['n_val_slices']} slices)\n\n"
            + markdown_table(["model", "mDice", "parameters", "train s", "inference s", "train samples/s",
                              "inference slices/s", "best epoch", "settings (epochs x samples)", "run (record)"],
                             rows, "{:.4f}")
            + "\nPredictions resized back to each slice's own size; per-organ Dice over the slices where the organ "
              f"is present.{group.get('precision_note', '')}\n\n"
            + per_organ_markdown({n: m["per_organ"] for n, m in models.items()}, "### Per-organ Dice"))


def baselines_markdown(view: dict) -> str:
    text = baselines_group_markdown(view, "## Baselines trained here")
    for other in view["other_data"]:
        text += "\n" + baselines_group_markdown(other, "### Baselines trained on other data")
    if "eval_slices" in view:
        other = view["eval_slices"]
        text += (f"\n### Best checkpoints on other slices: {other['data']} (val split, only labelled organs)\n\n"
                 + markdown_table(["model", "mDice", "slices"], [[n, m["mdice"], m["n_slices"]]
                                                               for n, m in other["models"].items()])
                 + "\n" + per_organ_markdown({n: m["per_organ"] for n, m in other["models"].items()},
                                              "#### Per-organ Dice on those slices"))
    return text


def write_baselines(root) -> dict | None:
    found = rec.records(root, "baselines")
    if not found:
        return None
    res, view = Results(root), baselines_view(baseline_groups(found))
    write_json(res.table("baselines", "json"), view)
    write_text(res.table("baselines", "md"), baselines_markdown(view))
    return view


# ---------------------------------------------------------------------------------------------- Table 3
def sam_row(r: rec.Record) -> dict:
    x = r.result
    return {"model": f"{r.settings['model']} decoder finetuned, bound box",
            "source": f"measured here on {r.slices.get('data')}", "mdice": x["mdice_finetuned"], "needs_prompt": True,
            "params": x["trainable_params"], "train_seconds": x["train_seconds"], "infer_seconds": x["eval_seconds"],
            "slices_id": r.slices.get("id"), "record": r.id}


def baseline_row(r: rec.Record) -> dict:
    m = r.result["entry"]
    return {"model": r.result["name"], "source": f"measured here on {r.slices.get('data')}", "mdice": m["mdice"],
            "needs_prompt": False, "params": m["params"], "train_seconds": m["train_seconds"],
            "infer_seconds": m["infer_seconds"], "slices_id": r.slices.get("id"), "record": r.id}


def quoted_rows() -> list[dict]:
    return [{"model": name, "source": f"{REPORT_SOURCE} {ref}".strip(), "mdice": value,
             "needs_prompt": "SAM" in name, "params": None, "train_seconds": None, "infer_seconds": None}
            for name, value, ref in QUOTED_TABLE3]


def table3_view(sam: rec.Record | None, baselines: list[rec.Record]) -> dict:
    """Measured rows grouped by the data they were measured on (the SAM row's data first), then the
    report's quoted rows. ``rows`` lists them all; ``groups`` says which measured rows share data."""
    measured = ([sam_row(sam)] if sam is not None else []) + [baseline_row(r) for r in baselines]
    order = list(dict.fromkeys(row["slices_id"] for row in measured))
    groups = [[row for row in measured if row["slices_id"] == sid] for sid in order]
    return {"rows": [row for g in groups for row in g] + quoted_rows(),
            "groups": [{"slices_id": g[0]["slices_id"], "source": g[0]["source"], "models": [r["model"] for r in g]}
                       for g in groups]}


def _table3_body(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "mDice", "prompt at test time", "parameters", "train s", "inference s", "source"],
        [[r["model"], r["mdice"], "yes (box from the ground truth)" if r["needs_prompt"] else "no",
          f"{r['params'] / 1e6:.1f} M" if r["params"] else None, fixed(r["train_seconds"], 0),
          fixed(r["infer_seconds"], 1), r["source"] + (f" (record {r['record']})" if r.get("record") else "")]
         for r in rows])


def table3_markdown(view: dict) -> str:
    measured = [r for r in view["rows"] if "slices_id" in r]
    quoted = [r for r in view["rows"] if "slices_id" not in r]
    first = view["groups"][0]["slices_id"] if view["groups"] else None
    main = [r for r in measured if r["slices_id"] == first]
    text = ("## Table 3: performance comparison (mDice, validation split)\n\n" + _table3_body(main + quoted)
            + "\nMeasured rows were trained and scored here, on the data named, with the project's one Dice "
              "(per organ over the slices where it is present, mean over organs). Quoted rows are the report's "
              "numbers on BTCV and were not re-run here, so compare them with care.\n")
    for group in view["groups"][1:]:
        rows = [r for r in measured if r["slices_id"] == group["slices_id"]]
        text += (f"\n### Measured on other data ({group['source'][len('measured here on '):]}), not comparable with "
                 "the rows above\n\n" + _table3_body(rows))
    return text


def table3_inputs(root) -> tuple[rec.Record | None, list[rec.Record]]:
    """The SAM row (newest bound-box finetuning of Table 2's runs) and the newest baseline of each model
    and data set."""
    runs, _ = table2_records(root)
    sam = next((r for r in runs if r.settings["prompt"] == "bound_box"), None)
    groups = baseline_groups(rec.records(root, "baselines"))
    ref = sam.slices.get("id") if sam is not None else None
    groups.sort(key=lambda g: g[0].slices.get("id") != ref)  # the SAM row's data first
    return sam, [r for g in groups for r in g]


def write_table3(root) -> dict:
    res, view = Results(root), table3_view(*table3_inputs(root))
    write_json(res.table("table3", "json"), view)
    write_text(res.table("table3", "md"), table3_markdown(view))
    return view


# ---------------------------------------------------------------------------------------------- Table 4
def table4_view(r: rec.Record) -> dict:
    return {**r.result, "runtime": r.settings.get("runtime", "torch"), "precision": precision_text(r), "record": r.id}


def frozen_masks_note(view: dict) -> str:
    """What the before/after mask mDice of Table 4 says (the classifier's mask parts are frozen)."""
    after, before = view["mask_mdice_after_classification_training"], view["mask_mdice_before_classification_training"]
    note = (f"Mask mDice of the same model: {after:.4f} after classification training, {before:.4f} before "
            f"(mask parts frozen)")
    if after != before and view["runtime"] != "torch":
        note += (f"; {view['runtime']} compiles the classifier and the plain decoder as two graphs whose "
                 f"arithmetic differs in the last digits, not their masks' weights (PyTorch gives equal numbers)")
    return note + "."


def table4_rows(view: dict) -> list[list]:
    """Table 4's rows (organ, accuracy, n), then the weighted average over all samples."""
    accuracy, counts = view["accuracy"], view["n"]
    rows = [[o.replace("_", " "), accuracy[o], counts[o]] for o in accuracy]
    return rows + [["**Weighted Average**", view["weighted_average"], sum(counts.values())]]


def table4_markdown(view: dict) -> str:
    n = sum(view["n"].values())
    return (f"## Table 4: classification accuracy of different organs ({view['prompt'].replace('_', ' ')} "
            f"prompts, {view['split']} split)\n\n" + markdown_table(["organ", "accuracy", "n"], table4_rows(view))
            + f"\nWeighted average = accuracy over all {n} (slice, organ) samples (weights = counts). "
              f"{frozen_masks_note(view)} Precision: {view['precision']}. Record: {view['record']}.\n")


def _write_newest(root, stage: str, table: str, view_of, markdown) -> dict | None:
    """<table>.json / .md rebuilt from the newest record of `stage` (None when there is none)."""
    r = rec.latest(root, stage)
    if r is None:
        return None
    res, view = Results(root), view_of(r)
    write_json(res.table(table, "json"), view)
    write_text(res.table(table, "md"), markdown(view))
    return view


def write_table4(root) -> dict | None:
    view = _write_newest(root, "task3", "table4", table4_view, table4_markdown)
    if view is None:
        return None
    write_csv(Results(root).table("table4", "csv"), ["organ", "accuracy", "n"],
              [[o, view["accuracy"][o], view["n"][o]] for o in view["accuracy"]])
    return view


# ---------------------------------------------------------------------------------------------- 3D
def volume_view(r: rec.Record) -> dict:
    return {**r.result, "precision": precision_text(r), "record": r.id}


def volume_markdown(view: dict) -> str:
    from sambtcv.engine.propagation import STOP_RULES

    stop_text = STOP_RULES.get(view["stop"], "")
    mean = view["mean"]
    organs = list(mean["dice_one_box"])
    rows = [[o, mean["dice_one_box"][o], mean["dice_every_slice_box"].get(o), mean["hd95_one_box"].get(o)]
            for o in organs]
    return (f"## 3D: one box per organ ({view['model']}, {len(view['cases'])} case(s), stop rule "
            f"'{view['stop']}', margin {view['margin_mm']} mm)\n\n"
            + markdown_table(["organ", "3D Dice, one box propagated", "3D Dice, a box on every slice (upper bound)",
                              "HD95 one box (mm)"], rows)
            + f"\nOne box = a tight box on the organ's largest slice, propagated slice by slice"
              f"{f' ({stop_text} ends the walk)' if stop_text else ''}. Upper bound = a ground-truth box on each "
              f"slice. {view['encoder_passes']} encoder passes for {view['visited_slices']} visited slices, "
              f"{view['seconds']:.0f} s. Precision: {view['precision']}. Record: {view['record']}.\n")


def write_volume(root) -> dict | None:
    return _write_newest(root, "volume_3d", "volume_3d", volume_view, volume_markdown)


# ---------------------------------------------------------------------------------------------- Table 5
def interactive_means(cases: dict) -> dict:
    """Means over every (case, organ) of interactive_eval.py's result: DSC and NSD per step, AUCs, final
    values, seconds per step (mean and largest), and the largest fall of DSC from one step to the next."""
    rows = [s for c in cases.values() for s in c["organs"].values()]
    if not rows:
        return {}
    steps = len(rows[0]["dsc"])

    def mean(key):
        return float(np.mean([r[key] for r in rows]))
    falls = [max(0.0, r["dsc"][i] - r["dsc"][i + 1]) for r in rows for i in range(steps - 1)]
    mean_falls = [float(np.mean([r["dsc"][i] - r["dsc"][i + 1] for r in rows])) for i in range(steps - 1)]
    return {"dsc": [float(np.mean([r["dsc"][i] for r in rows])) for i in range(steps)],
            "nsd": [float(np.mean([r["nsd"][i] for r in rows])) for i in range(steps)],
            "dsc_auc": mean("dsc_auc"), "nsd_auc": mean("nsd_auc"), "dsc_final": mean("dsc_final"),
            "nsd_final": mean("nsd_final"),
            "seconds_mean": [float(np.mean([r["seconds"][i] for r in rows])) for i in range(steps)],
            "seconds_max": [float(np.max([r["seconds"][i] for r in rows])) for i in range(steps)],
            "largest_fall": max(falls, default=0.0), "mean_fall_per_step": mean_falls, "organ_cases": len(rows)}


def interactive_view(r: rec.Record) -> dict:
    s = r.settings
    return {**r.result, "data": r.slices.get("data"), "click": s["click"], "after_click": s["after_click"],
            "mask_input": s["mask_input"], "carry": s.get("carry", False), "gate": s.get("gate", False),
            "guard": s.get("guard", False), "repair": s.get("repair", False),
            "first": s.get("first", "box3d"), "runtime": s["runtime"], "precision": precision_text(r), "record": r.id}


def interactive_markdown(view: dict) -> str:
    m = view["mean"]
    if not m:
        return "## Table 5: interactive 3D (box + clicks)\n\nNo labelled organ to measure.\n"
    n = len(m["dsc"])
    steps = ["box"] + [f"+{i} click{'s' if i > 1 else ''}" for i in range(1, n)]
    rows = [[f"{case} {organ}", *o["dsc"], o["dsc_auc"], o["nsd_final"], o["seconds"][0],
             max(o["seconds"][1:], default=None)]
            for case, c in view["cases"].items() for organ, o in c["organs"].items()]
    rows.append(["**mean** (seconds: mean, largest)", *m["dsc"], m["dsc_auc"], m["nsd_final"], m["seconds_mean"][0],
                 max(m["seconds_max"][1:], default=None)])
    first = ("a 3D box per organ (its z range and a jittered 2D box on its middle voxel's slice), walked inside its "
             "z range" if view["first"] == "box3d" else "the viewer's box and P (the organ's tight box on its "
             "largest slice, walked until the stop rule ends it)")
    return (f"## Table 5: interactive 3D (box + {n - 1} clicks; {view['model']} boxes, {view['point_model']} "
            f"clicks)\n\n" + markdown_table(["case, organ", *[f"DSC {s}" for s in steps], "DSC AUC (clicks)",
                                               "NSD final", "s box step", "s click step (largest)"], rows,
                                              "{:.4f}")
            + f"\nData: {view['data']}. The challenge's protocol (SEGFM3D, CVPR 2025): step 1 {first}, then one "
              "click per step at the centre of the organ's largest 26-connected error. NSD at 2 mm (MONAI's surface "
              "Dice). A step's seconds include encoding the slices it reaches first. "
              f"Mean NSD per step: {', '.join(f'{v:.4f}' for v in m['nsd'])}; NSD AUC {m['nsd_auc']:.4f}; largest "
              f"fall of DSC from one step to the next {m['largest_fall']:.4f}; seconds per step and organ (mean): "
              f"{', '.join(f'{v:.1f}' for v in m['seconds_mean'])}. Clicks: rule '{view['click']}', carried to "
              f"the slices sharing the error: {'yes' if view['carry'] else 'no'}, gated by intensity: "
              f"{'yes' if view['gate'] else 'no'}, after a click '{view['after_click']}', wrong parts removed "
              f"through their slab, missed parts and doubted slices walked: {'yes' if view['repair'] else 'no'}. "
              f"Walks guarded against masks that outgrow or leave the organ: {'yes' if view['guard'] else 'no'}. "
              f"Precision: {view['precision']}; runtime {view['runtime']}. "
              f"Record: {view['record']}.\n")


def write_interactive(root) -> dict | None:
    view = _write_newest(root, "interactive_3d", "interactive_3d", interactive_view, interactive_markdown)
    if view is None:
        return None
    write_csv(Results(root).table("interactive_3d", "csv"),
              ["case", "organ", "step", "dsc", "nsd", "seconds", "click"],
              [[case, organ, i + 1, o["dsc"][i], o["nsd"][i], o["seconds"][i], (None if i == 0 else o["clicks"][i - 1])]
               for case, c in view["cases"].items() for organ, o in c["organs"].items() for i in range(len(o["dsc"]))])
    return view
