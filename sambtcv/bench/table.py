"""bench.md's table: a row per measure, its target (bench.py's TARGETS) and whether it is met."""
from __future__ import annotations

from sambtcv.core.files import markdown_table


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def speed_rows(res: dict, t: dict) -> list:
    rows = []
    if "zero_shot" in res:
        rows += zero_shot_rows(res, t)
    if "encoder" in res:
        rows += encoder_rows(res, t)
    if "decoder_training" in res:
        rows += training_rows(res, t)
    if "precision" in res:
        rows += precision_rows(res, t)
    return rows


def precision_rows(res: dict, t: dict) -> list:
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


def zero_shot_rows(res: dict, t: dict) -> list:
    zs = res["zero_shot"]
    return [
        ["zero-shot speed-up (naive SamPredictor s/prompt / pipeline s/prompt)",
         f"{res['zero_shot_speedup']:.1f}x ({zs['naive_seconds_per_prompt']:.3f} vs "
         f"{zs['pipeline_seconds_per_prompt']:.4f} s/prompt)", f">= {t['zero_shot_speedup']:g}x",
         _met(res["zero_shot_speedup"] >= t["zero_shot_speedup"])],
        ["zero-shot Dice max abs diff (per organ, per prompt type)", f"{res['zero_shot_dice_max_abs_diff']:.2e}",
         f"<= {t['zero_shot_dice_max_abs_diff']:g}",
         _met(res["zero_shot_dice_max_abs_diff"] <= t["zero_shot_dice_max_abs_diff"])]]


def encoder_rows(res: dict, t: dict) -> list:
    enc = res["encoder"]
    return [
        [f"image encoder bf16 speed-up, {enc['model']} (mask agreement)",
         f"{res['encoder_bf16_speedup']:.2f}x ({enc['fp32_slices_per_second']:.2f} {enc['best_format']['fp32']} -> "
         f"{enc['bf16_slices_per_second']:.2f} {enc['best_format']['bf16']} slices/s; agreement "
         f"{res['encoder_bf16_mask_agreement']:.4f})",
         f">= {t['encoder_bf16_speedup']:g}x, agreement >= {t['encoder_bf16_mask_agreement']:g}",
         _met(res["encoder_bf16_speedup"] >= t["encoder_bf16_speedup"]
              and res["encoder_bf16_mask_agreement"] >= t["encoder_bf16_mask_agreement"])]]


def training_rows(res: dict, t: dict) -> list:
    tr = res["decoder_training"]
    return [
        [f"decoder training, batch {tr['batch']} vs 1 (fp32)",
         f"{res['decoder_batched_speedup']:.2f}x ({tr['fp32_samples_per_second_one_at_a_time']:.1f} -> "
         f"{tr['fp32_samples_per_second_batched']:.1f} samples/s; bf16 {tr['bf16_batched_speedup']:.2f}x)",
         f">= {t['decoder_batched_speedup']:g}x", _met(res["decoder_batched_speedup"] >= t["decoder_batched_speedup"])],
    ]


def memory_rows(res: dict, t: dict) -> list:
    rows = []
    if "memory" in res:
        mem = res["memory"]["runs"]
        rows.append(["peak RSS of a Task 2 epoch, 4N / N training slices",
                     f"{res['peak_rss_ratio_4x']:.3f} ({mem['1x']['peak_rss_mib']:.0f} -> "
                     f"{mem['4x']['peak_rss_mib']:.0f} MiB; N = {mem['1x']['train_slices']})",
                     f"<= {t['peak_rss_ratio_4x']:g}", _met(res["peak_rss_ratio_4x"] <= t["peak_rss_ratio_4x"])])
    return rows


def task1_scaling_rows(res: dict, t: dict) -> list:
    rows = []
    if "task1_seconds_by_scale" in res:
        sc = res["task1_seconds_by_scale"]
        lo, hi = min(sc, key=int), max(sc, key=int)
        linear_ok = sc[hi] <= t["task1_linear_slack"] * (int(hi) / int(lo)) * sc[lo]
        rows.append(["Task 1 wall time by scale (cold cache)", ", ".join(f"{k}x: {v:.1f} s" for k, v in sc.items()),
                     f"linear ({hi}x <= {t['task1_linear_slack']:.1f} x {int(hi) // int(lo)} x {lo}x)",
                     _met(linear_ok)])
    return rows


def volume_3d_rows(res: dict, t: dict) -> list:
    rows = []
    if "volume_3d" in res:
        vol = res["volume_3d"]
        rows.append(["3D: encoder passes per visited slice (one box per organ, cold cache)",
                     f"{vol['passes_per_visited_slice']:.2f} ({vol['encoder_passes']} / {vol['visited_slices']}); "
                     f"{vol['seconds_per_organ_volume']:.1f} s per organ-volume",
                     f"= {t['volume_passes_per_visited_slice']:g}",
                     _met(vol["passes_per_visited_slice"] == t["volume_passes_per_visited_slice"])])
    return rows


def runtimes_rows(res: dict, t: dict) -> list:
    rows = []
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
    return rows


def viewer_rows(res: dict, t: dict) -> list:
    rows = []
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
    return rows


def first_walk_rows(res: dict, t: dict) -> list:
    first = res.get("viewer_first_walk")
    if not first:
        return []
    rows = []
    for r in first["runs"]:
        shape = f"{r['slices']} slices"
        if r["read_s"] == 0:
            rows.append([f"viewer: first box + P from opening, the box at once ({first['case']}, {shape}, cold cache)",
                         f"{r['open_to_walk_s']:.1f} s ({r['walk_encoder_passes']} passes, DSC {r['dsc']:.3f})",
                         f"<= {t['viewer_first_walk_s']:g} s", _met(r["open_to_walk_s"] <= t["viewer_first_walk_s"])])
        else:
            rows.append([f"viewer: the same, the box after {r['read_s']:g} s of reading: seconds from the box",
                         f"{r['box_to_walk_s']:.1f} s ({r['encoded_at_box']} of {r['slices']} slices encoded by then, "
                         f"{r['walk_encoder_passes']} passes)", "-", "-"])
    return rows


def interactive_rows(res: dict, t: dict) -> list:
    rows = []
    inter = res.get("interactive")
    if inter:
        rows += [["interactive protocol: step 1 (3D box), seconds per organ, largest case (a process per step)",
                  f"{inter['seconds_per_class_step1_max']:.1f} s", f"<= {t['interactive_first_step_s_per_organ']:g} s",
                  _met(inter["seconds_per_class_step1_max"] <= t["interactive_first_step_s_per_organ"])],
                 ["interactive protocol: each click step, seconds per organ, largest",
                  f"{inter['seconds_per_class_later_steps_max']:.1f} s (final DSC {inter['dsc_final_mean']:.3f})",
                  f"<= {t['interactive_later_step_s_per_organ']:g} s",
                  _met(inter["seconds_per_class_later_steps_max"] <= t["interactive_later_step_s_per_organ"])]]
    return rows


def slicer_rows(res: dict, t: dict) -> list:
    rows = []
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
    return rows


def stride_rows(res: dict, t: dict) -> list:
    rows = []
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
    return rows


def baselines_rows(res: dict, t: dict) -> list:
    rows = []
    for model in res.get("baselines", {}).get("models", {}).values():
        rows.append([f"baseline {model['name']}: training / inference speed",
                     f"{model['train_samples_per_second']:.1f} samples/s / "
                     f"{model['infer_slices_per_second']:.1f} slices/s",
                     "measured", "-"])
    return rows


def report_stages_rows(res: dict, t: dict) -> list:
    rows = []
    if res.get("report_stages"):
        rs = res["report_stages"]
        rows.append([f"`./run.sh report` ({rs['model']}, {rs['profile']} profile), stages that ran",
                     f"{rs['seconds']:.0f} s ({rs['seconds'] / 60:.1f} min)", f"<= {t['report_minutes']:g} min",
                     _met(rs["seconds"] <= 60 * t["report_minutes"])])
    return rows


SCALE_ROWS = (memory_rows, task1_scaling_rows, volume_3d_rows, runtimes_rows, viewer_rows, first_walk_rows,
              interactive_rows,
              slicer_rows, stride_rows, baselines_rows, report_stages_rows)  # in bench.md's order


def scale_rows(res: dict, t: dict) -> list:
    """The rows of every section past training that ran (each function says nothing of a section that did not)."""
    return [row for rows in SCALE_ROWS for row in rows(res, t)]


def report(res: dict, t: dict) -> str:
    rows = speed_rows(res, t) + scale_rows(res, t)
    m = res["machine"]
    return ("## Benchmarks (`python bench.py" + (f" --profile {res['profile']}" if res["profile"] else "") + "`)\n\n"
            + markdown_table(["measure", "measured", "target", "met"], rows)
            + f"\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}, bf16 "
              f"{'native' if m['bf16']['native'] else 'not native'} ({m['bf16']['detail']}); phantom slices "
              f"{res['phantom_shape']}. Full numbers in bench.json.\n")
