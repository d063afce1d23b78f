"""baselines.py: the four trained baselines, their scoring at each slice's own size, Table 3, resume, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import baselines
from conftest import fails
from sambtcv.core.files import load_checkpoint, write_json
from sambtcv.data.btcv import organ_stats
from sambtcv.study.baseline_nets import measure_speed, predict_label, score
from sambtcv.study.tables import data_description
from utils import MANIFEST_FILE, NUM_ORGANS, ORGANS, PREPROCESS_FILE, SliceSet

SMOKE = ["--profile", "smoke", "--device", "cpu"]


@pytest.fixture(scope="module")
def smoke_run(tiny_slices, tmp_path_factory):
    """All four models, smoke profile, on the tiny phantom; returns the results folder."""
    out = tmp_path_factory.mktemp("baselines") / "results"
    baselines.main(["--slices", str(tiny_slices), "--results-dir", str(out), "--model", "all", *SMOKE])
    return out


@pytest.mark.slow
def test_all_four_models_train_and_fill_table3(smoke_run, tiny_slices):
    res = json.loads((smoke_run / "baselines.json").read_text())
    assert list(res["models"]) == ["U-Net", "ResU-Net", "DeepLabV3", "SwinUNETR"]
    val = SliceSet(tiny_slices, "val")
    assert res["data"] == data_description(val.params) and res["profile"] == "smoke"
    n_val = len(val)
    params = {}
    for name, m in res["models"].items():
        assert 0.0 <= m["mdice"] <= 1.0 and m["n_slices"] == n_val
        assert set(m["per_organ"]) <= set(ORGANS) and m["per_organ"]
        assert m["mdice"] == pytest.approx(np.mean(list(m["per_organ"].values())))
        assert m["train_seconds"] > 0 and m["infer_seconds"] > 0 and m["train_samples_per_second"] > 0
        assert m["best_epoch"] in (0, 1) and m["settings"]["epochs"] == 1
        ck = load_checkpoint(m["checkpoint"], "baseline")  # kind "baseline", weights_only
        assert ck["epoch"] == m["best_epoch"] and ck["config"]["model"] == m["key"]
        rows = (smoke_run / "baselines" / m["key"] / "epochs.csv").read_text().splitlines()
        assert len(rows) == 3  # header, epoch 0 (the starting weights), epoch 1
        params[name] = m["params"]
    assert params["U-Net"] < params["ResU-Net"] < params["SwinUNETR"] < params["DeepLabV3"]
    assert params["DeepLabV3"] == pytest.approx(39.6e6, rel=0.01)  # torchvision's ResNet-50 DeepLabV3, 14 classes
    rows = json.loads((smoke_run / "table3_comparison.json").read_text())["rows"]
    measured = [r for r in rows if r["source"] == f"measured here on {res['data']}"]
    assert [r["model"] for r in measured] == list(res["models"])
    assert all(not r["needs_prompt"] and r["mdice"] == res["models"][r["model"]]["mdice"] for r in measured)
    quoted = [r for r in rows if r["source"].startswith("quoted from")]
    assert len(quoted) + len(measured) == len(rows) and {"U-Net", "PIPO-FAN"} <= {r["model"] for r in quoted}
    assert all(0.0 <= r["mdice"] <= 1.0 for r in rows)
    assert "SwinUNETR" in (smoke_run / "table3_comparison.md").read_text()
    assert "| DeepLabV3 |" in (smoke_run / "baselines.md").read_text()


@pytest.mark.slow
def test_one_model_again_keeps_the_other_rows_and_scores_other_slices(smoke_run, tiny_slices, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    shutil.copytree(smoke_run / "records", out / "records")  # the earlier run's results
    baselines.main(["--slices", str(tiny_slices), "--results-dir", str(out), "--model", "unet", *SMOKE, "--epochs", "2",
                    "--eval-slices", str(tiny_slices)])
    res = json.loads((out / "baselines.json").read_text())
    assert list(res["models"]) == ["U-Net", "ResU-Net", "DeepLabV3", "SwinUNETR"]
    assert res["models"]["U-Net"]["settings"]["epochs"] == 2 and res["models"]["ResU-Net"]["settings"]["epochs"] == 1
    # the same checkpoint scored on the same val split through --eval-slices gives the same table
    other = res["eval_slices"]["models"]["U-Net"]
    assert other["per_organ"] == res["models"]["U-Net"]["per_organ"] and list(res["eval_slices"]["models"]) == ["U-Net"]
    assert "Best checkpoints on other slices" in (out / "baselines.md").read_text()


def test_resume_equals_uninterrupted(tiny_slices, tmp_path):
    args = ["--slices", str(tiny_slices), "--model", "unet", *SMOKE, "--samples-per-epoch", "6", "--batch-size", "3"]
    baselines.main([*args, "--results-dir", str(tmp_path / "a"), "--epochs", "2"])
    baselines.main([*args, "--results-dir", str(tmp_path / "b"), "--epochs", "1"])
    baselines.main([*args, "--results-dir", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    a, b = (load_checkpoint(tmp_path / d / "baselines/unet/last.pt", "baseline") for d in "ab")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    ja, jb = (json.loads((tmp_path / d / "baselines.json").read_text())["models"]["U-Net"] for d in "ab")
    assert ja["mdice"] == pytest.approx(jb["mdice"], abs=1e-6) and ja["best_epoch"] == jb["best_epoch"]


# ---------------------------------------------------------------------------------------------- bad input
def _no_training_cases(cold):
    write_json(cold / "train" / MANIFEST_FILE, {"split": "train", "cases": [], "slices": []})
    return cold


@pytest.mark.parametrize("args,needles", [
    (["--model", "unet,vgg16"], ["unknown --model 'vgg16'", "swinunetr"]),
    (["--model", "unet,resunet", "--resume"], ["no checkpoint to resume"]),
    ("no training cases", ["train split", "no slices"]),
])
def test_bad_input_is_one_line_and_writes_nothing(cold, tmp_path, capsys, args, needles):
    slices = _no_training_cases(cold) if args == "no training cases" else cold
    results = tmp_path / "r"
    line = fails(capsys, baselines.main, ["--slices", slices, "--results-dir", results, *SMOKE,
                                          *([] if isinstance(args, str) else args)])
    assert all(n in line for n in needles), line
    assert not results.exists()  # nothing written, not even the folder


# ---------------------------------------------------------------------------------------------- scoring
def _blocks_slices(root):
    """Three validation slices of different sizes (64x64, 32x32, 32x64) whose organs are blocks aligned to
    the 32-pixel input's grid, so that resizing to the input and back is exact; image = 10 x label."""
    specs = [((64, 64), [(1, (8, 24, 8, 24)), (6, (32, 64, 0, 32))]),
             ((32, 32), [(1, (16, 32, 16, 32))]),
             ((32, 64), [(6, (0, 16, 16, 48)), (3, (16, 24, 48, 64))])]
    (root / "val").mkdir(parents=True)
    (root / "train").mkdir()
    records = []
    for z, (shape, organs) in enumerate(specs):
        label = np.zeros(shape, np.uint8)
        for organ, (r0, r1, c0, c1) in organs:
            label[r0:r1, c0:c1] = organ
        name = f"case{z % 2}_z{z}.npz"
        np.savez_compressed(root / "val" / name, image=label * 10, label=label)
        records.append({"file": name, "case": f"case{z % 2}", "z": z, "height": shape[0], "width": shape[1],
                        "organs": organ_stats(label)})
    write_json(root / "val" / MANIFEST_FILE, {"split": "val", "cases": [], "slices": records})
    write_json(root / "train" / MANIFEST_FILE, {"split": "train", "cases": [], "slices": []})
    write_json(root / PREPROCESS_FILE, {"created_id": "blocks", "data_dir": str(root)})
    return SliceSet(root, "val")


class Decoder(nn.Module):
    """A fake model reading the label back from the image (10 x label), minus the organs in `drop`."""

    def __init__(self, drop=()):
        super().__init__()
        self.drop = list(drop)

    def forward(self, x):
        label = torch.round(x[:, 0] * 255 / 10).long().clamp(0, NUM_ORGANS)
        for organ in self.drop:
            label[label == organ] = 0
        return 20.0 * nn.functional.one_hot(label, NUM_ORGANS + 1).permute(0, 3, 1, 2).float()


def test_scoring_is_per_organ_at_each_slice_own_size(tmp_path):
    val = _blocks_slices(tmp_path / "blocks")
    cpu = torch.device("cpu")
    perfect = score(Decoder(), val, "oracle", 32, cpu, "fp32", batch_size=2)
    assert perfect.n_slices == 3
    assert perfect.table.per_organ() == {"oracle": {"spleen": 1.0, "left_kidney": 1.0, "liver": 1.0}}
    assert perfect.mdice("oracle") == 1.0 and perfect.table.volume_dice()["oracle"]["liver"] == 1.0
    # overlaps were counted at each slice's own size (native pixel areas), not at the 32-pixel input
    gt_pixels = {(o, c): g for (_, o, c), (_, _, g) in perfect.table.volume.items()}
    assert gt_pixels == {(1, "case0"): 16 * 16, (1, "case1"): 16 * 16, (6, "case0"): 32 * 32 + 16 * 32,
                         (3, "case0"): 8 * 16}
    assert perfect.table.counts() == {"spleen": 2, "left_kidney": 1, "liver": 2}
    background = score(Decoder(drop=range(1, NUM_ORGANS + 1)), val, "empty", 32, cpu, "fp32", 2)
    assert background.mdice("empty") == 0.0
    assert set(background.table.per_organ()["empty"].values()) == {0.0}
    no_spleen = score(Decoder(drop=[1]), val, "no spleen", 32, cpu, "fp32", 2)
    assert no_spleen.table.per_organ()["no spleen"] == {"spleen": 0.0, "left_kidney": 1.0, "liver": 1.0}
    assert no_spleen.mdice("no spleen") == pytest.approx(2 / 3)


def test_predictions_come_back_at_the_slice_size():
    logits = torch.zeros(NUM_ORGANS + 1, 32, 32)
    logits[0] = 2.5
    logits[6, 8:24, 8:24] = 5.0
    pred = predict_label(logits, (64, 32))
    assert pred.shape == (64, 32) and set(np.unique(pred)) == {0, 6}
    assert (pred[16:48, 8:24] == 6).all() and (pred == 6).sum() == 32 * 16


def test_model_names_and_settings():
    from sambtcv.cli import parse_config
    from sambtcv.core.config import load_profile

    assert baselines.model_keys("all") == ["unet", "resunet", "deeplabv3", "swinunetr"]
    assert baselines.model_keys("swinunetr, unet") == ["unet", "swinunetr"]
    page = vars(baselines)
    cfg = parse_config(page, ["--profile", "quick"])
    s = baselines.resolve_settings(cfg, "unet")
    assert (s.input_size, s.dtype) == (160, "auto")  # resolved per machine in check_inputs
    assert s.epochs == load_profile("quick")["baselines"]["models"]["unet"]["epochs"]
    cfg = parse_config(page, ["--profile", "quick", "--epochs", "3", "--samples-per-epoch", "0", "--dtype", "fp32"])
    s = baselines.resolve_settings(cfg, "deeplabv3")
    assert (s.epochs, s.samples_per_epoch, s.dtype) == (3, 0, "fp32")
    assert (baselines.resolve_settings(parse_config(page, []), "swinunetr").batch_size, s.batch_size) == (8, 4)
    with pytest.raises(baselines.PipelineError, match="multiple of 32"):
        baselines.resolve_settings(parse_config(page, ["--profile", "quick", "--input-size", "100"]), "unet")


def test_measure_speed_for_bench(tiny_slices):
    speed = measure_speed(["unet"], tiny_slices, "cpu", n_samples=4, batch_size=2, input_size=64)
    assert speed["unet"]["name"] == "U-Net" and speed["unet"]["params"] > 0
    assert speed["unet"]["train_samples_per_second"] > 0 and speed["unet"]["infer_slices_per_second"] > 0
