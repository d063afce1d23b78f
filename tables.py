"""The study's own numbers, quoted beside ours, and Table 3, which gathers several scripts' results.

Table 3 is written by whichever of finetune_task2.py (the SAM row) and baselines.py (the measured
baselines) ran last, from their JSON outputs, so it always shows every row available.
"""
from __future__ import annotations

from files import Results, fixed, markdown_table, read_json, write_json, write_text

REPORT_SOURCE = "quoted from the report (Table 3), BTCV"
# SAM ViT-H on BTCV, the report's Tables 1 and 2
REPORT_ZERO_SHOT = {"one_central_point": 0.6124, "one_random_point": 0.5929, "three_random_points": 0.6437,
                    "bound_box": 0.8649, "larger_box": 0.8267}
REPORT_FINETUNED = {"one_central_point": 0.8556, "one_random_point": 0.8535, "three_random_points": 0.8532,
                    "bound_box": 0.9158, "larger_box": 0.9161}
# the report's Table 3 (Avg mDice on BTCV), with the reference numbers it gives
QUOTED_TABLE3 = [("U-Net", 0.921, "[7]"), ("ResU-Net", 0.924, "[8]"), ("DeepLabV3", 0.892, "[9]"),
                 ("PIPO-FAN", 0.936, "[10]"), ("SAM ViT-H, finetuned, bound box", 0.916, "")]


def data_description(params: dict) -> str:
    """One line naming the data a slices folder came from (its preprocess.json)."""
    if params.get("synthetic"):
        s = params["synthetic"]
        return f"synthetic abdominal CT phantom ({s['volumes']} volumes, seed {s['seed']}), not BTCV"
    return f"CT volumes from {params['data_dir']}"


def table3_rows(res: Results) -> list[dict]:
    """Measured rows (Task 2's bound-box decoder, the trained baselines) then the report's quoted rows."""
    rows = []
    t2_path, base_path = res.table("table2", "json"), res.table("baselines", "json")
    t2 = read_json(t2_path) if t2_path.is_file() else {}
    if "bound_box" in t2.get("mdice_finetuned", {}):
        rows.append({"model": f"{t2['model']} decoder finetuned, bound box", "source": f"measured here on {t2['data']}",
                     "mdice": t2["mdice_finetuned"]["bound_box"], "needs_prompt": True,
                     "params": t2.get("trainable_params"), "train_seconds": t2["train_seconds"].get("bound_box"),
                     "infer_seconds": t2.get("eval_seconds", {}).get("bound_box")})
    if base_path.is_file():
        base = read_json(base_path)
        rows += [{"model": name, "source": f"measured here on {base['data']}", "mdice": r["mdice"],
                  "needs_prompt": False, "params": r["params"], "train_seconds": r["train_seconds"],
                  "infer_seconds": r["infer_seconds"]} for name, r in base["models"].items()]
    rows += [{"model": name, "source": f"{REPORT_SOURCE} {ref}".strip(), "mdice": value,
              "needs_prompt": "SAM" in name, "params": None, "train_seconds": None, "infer_seconds": None}
             for name, value, ref in QUOTED_TABLE3]
    return rows


def write_table3(res: Results) -> None:
    rows = table3_rows(res)
    body = markdown_table(
        ["model", "mDice", "prompt at test time", "parameters", "train s", "inference s", "source"],
        [[r["model"], r["mdice"], "yes (box from the ground truth)" if r["needs_prompt"] else "no",
          f"{r['params'] / 1e6:.1f} M" if r["params"] else None, fixed(r["train_seconds"], 0),
          fixed(r["infer_seconds"], 1), r["source"]] for r in rows])
    write_json(res.table("table3", "json"), {"rows": rows})
    write_text(res.table("table3", "md"),
               "## Table 3: performance comparison (mDice, validation split)\n\n" + body
               + "\nMeasured rows were trained and scored here, on the data named, with the project's one Dice "
                 "(per organ over the slices where it is present, mean over organs). Quoted rows are the report's "
                 "numbers on BTCV and were not re-run here, so compare them with care.\n")
