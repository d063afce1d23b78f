"""run_report.py end to end: the embedded default on the phantom (then a restart), and real CT with the
official-checkpoint path (a random vit_b)."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import real_data, run_script
from sambtcv.core.names import organ_name
from sambtcv.data.btcv import find_cases


@pytest.mark.slow
def test_report_on_real_ct_with_vit_b(tmp_path):
    root = real_data("real_ct_aorta")
    img = nib.load(str(root / "RawData/Training/img/img0101.nii.gz"))
    lab = nib.load(str(root / "RawData/Training/label/label0101.nii.gz"))
    data = tmp_path / "btcv"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    k = lab.shape[2] // 2  # one axial slice per case keeps the 1024-pixel vit_b affordable on a CPU
    entries = []
    for name, z in (("ct_a", k), ("ct_b", k + 1)):
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, z:z + 1], img.affine),
                 str(data / f"imagesTr/{name}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, z:z + 1].astype(np.uint8), lab.affine),
                 str(data / f"labelsTr/{name}.nii.gz"))
        entries.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
    (data / "dataset_0.json").write_text(json.dumps({"training": entries[:1], "validation": entries[1:]}))
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), ckpt)
    results = tmp_path / "results"
    args = ["run_report.py", "--profile", "smoke", "--data-dir", data, "--model", "vit_b", "--checkpoint", ckpt,
            "--compare-models", "", "--skip", "baselines,3d", "--results-dir", results, "--work-dir", tmp_path / "work",
            "--device", "cpu"]
    res = run_script(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (results / "REPORT.md").read_text()
    for needle in ("Table 1", "Table 2", "Table 3", "Table 4", "fig1_curve_one_central_point.png",
                   "fig2_curve_bound_box.png", "fig3_classification_example.png", "vit_b", "Time per stage"):
        assert needle in report
    assert "synthetic" not in report.split("**Data**")[1].splitlines()[0]
    t1 = json.loads((results / "table1_zero_shot.json").read_text())
    assert t1["model"] == "vit_b" and t1["n_slices"] == 1 and t1["encoder_passes"] == 1
    assert list(t1["per_organ"]["bound_box"]) == ["aorta"]  # only the labelled organ is scored
    for fig in ("fig1_curve_one_central_point.png", "fig2_curve_bound_box.png", "fig3_classification_example.png"):
        assert (results / "figures" / fig).is_file()
    assert "left out of this run (`--skip 3d`)" in report and "left out of this run (`--skip baselines`)" in report


@pytest.mark.slow
def test_smoke_report_on_the_embedded_default(tmp_path):
    """`run_report.py` on the phantom and the default models, as a clean clone runs it (no ../shared), on a
    CPU without native bf16 (oneDNN capped at AVX2, as an AVX2-only CPU has it): every stage runs in fp32
    and says why."""
    results = tmp_path / "results"
    args = ["run_report.py", "--profile", "smoke", "--results-dir", results, "--work-dir", tmp_path / "work",
            "--device", "cpu"]
    no_bf16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    res = run_script(args, env=no_bf16)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (results / "REPORT.md").read_text()
    assert "bf16 not native (ONEDNN_MAX_CPU_ISA=AVX2" in report
    for stage in ("task1", "task2", "baselines", "task3", "volume_3d", "interactive_3d"):
        for r in (results / "records" / stage).glob("*.json"):
            data = json.loads(r.read_text())
            assert data["settings"]["dtype"] == "fp32", (stage, data["settings"])
            assert all(c["used"] == "fp32" for c in data["precision"].values()), (stage, data["precision"])
    assert "Precision: encoder fp32, decoder fp32 (auto: ONEDNN_MAX_CPU_ISA=AVX2" in report
    side_by_side = report.split("## Table 1: zero-shot mDice of the models side by side")[1].split("##")[0]
    assert "mobilesam (here)" in side_by_side and "litemedsam (here)" in side_by_side and "SAM ViT-H" in side_by_side
    t1 = json.loads((results / "table1_zero_shot.json").read_text())
    other = json.loads((results / "zero_shot_litemedsam" / "table1_zero_shot.json").read_text())
    assert t1["model"] == "mobilesam" and other["model"] == "litemedsam"
    assert t1["slices_id"] == other["slices_id"] and t1["n_slices"] == other["n_slices"]  # the same slices
    for needle in ("Table 2", "Table 3", "Table 4", "3D: one box per organ", "A synthetic abdominal CT phantom",
                   "Table 5: interactive 3D (box + 2 clicks"):
        assert needle in report
    assert "box + 5 clicks" not in report  # the stage's row in the time table said 5 where the profile ran 2
    t5 = json.loads((results / "interactive_3d.json").read_text())
    assert t5["cases"] and all(len(o["dsc"]) == 3 for c in t5["cases"].values() for o in c["organs"].values())
    for case, image, label in find_cases(tmp_path / "work" / "phantom_smoke")["val"]:  # every organ it holds
        held = {organ_name(int(v)) for v in np.unique(nib.load(str(label)).dataobj) if v}
        assert set(t5["cases"][case]["organs"]) == held and len(held) > 4, (held, t5["cases"][case]["organs"])
    vol = json.loads((results / "volume_3d.json").read_text())
    assert vol["model"] == "mobilesam" and vol["cases"]
    for case in vol["cases"]:
        assert (results / "volumes" / f"{case}.nii.gz").is_file() and f"volume_3d_{case}.png" in report
    # a second run reuses every completed stage; with --skip 3d the report says so instead of showing the
    # first run's 3D table
    again = run_script([*args, "--skip", "3d"], env=no_bf16)
    assert again.returncode == 0, again.stderr[-2000:]
    stages = json.loads((results / "stages.json").read_text())
    assert len(stages) == 9 and again.stdout.count("up to date, skipped") == len(stages) - 1
    assert "[3D: one box per organ]" not in again.stdout and "report:" in again.stdout
    report = (results / "REPORT.md").read_text()
    assert "left out of this run (`--skip 3d`)" in report and "volume_3d_" not in report


def test_stage_keys_follow_the_code(tmp_path):
    """A profile changed in a stage's code (same command) makes the stages stale; run_report.py does not."""
    from sambtcv.study.stages import code_id

    for name in ("baselines.py", "run_report.py"):
        (tmp_path / name).write_text("PROFILES = {'quick': 1}\n")
    before = code_id(tmp_path)
    (tmp_path / "run_report.py").write_text("# edited\n")
    assert code_id(tmp_path) == before
    (tmp_path / "baselines.py").write_text("PROFILES = {'quick': 2}\n")
    assert code_id(tmp_path) != before


def test_stage_keys_follow_the_sub_packages_but_not_benchs_sections(tmp_path):
    """A module deep in the package (sambtcv/engine/walks.py) is code the stages run; bench.py's sections are not."""
    from sambtcv.study.stages import code_id

    for rel in ("sambtcv/engine/walks.py", "sambtcv/bench/viewer.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("STEP = 1\n")
    before = code_id(tmp_path)
    (tmp_path / "sambtcv/bench/viewer.py").write_text("STEP = 2\n")
    assert code_id(tmp_path) == before
    (tmp_path / "sambtcv/engine/walks.py").write_text("STEP = 2\n")
    assert code_id(tmp_path) != before
