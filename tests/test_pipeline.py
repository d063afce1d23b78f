"""End to end on a tiny phantom: Task 1, Task 2 (checkpoints, resume, NaN, torchrun), Task 3."""
import json

import numpy as np
import pytest
import torch

import classify_train_task3
import classify_val_task3
import finetune_task2
import segmentation_task1
from conftest import assert_figure, fails, run_script, slices_copy
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import load_checkpoint
from sambtcv.study.training import mask_losses
from utils import ORGANS, PROMPT_TYPES, SliceSet

pytestmark = pytest.mark.slow  # whole pages, trained checkpoints or several processes

TINY_TRAIN = ["--epochs", "2", "--samples-per-epoch", "16", "--batch-size", "8", "--val-samples", "8"]


@pytest.fixture(scope="module")
def cold_slices(tiny_slices, tmp_path_factory):
    """A copy of the tiny slices without any cached embeddings."""
    return slices_copy(tiny_slices, tmp_path_factory.mktemp("cold") / "slices")


@pytest.fixture(scope="module")
def task1(cold_slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    segmentation_task1.main(["--slices", str(cold_slices), "--results-dir", str(out)])
    return out


def test_task1_contract_outputs_and_cache(task1, cold_slices):
    res = json.loads((task1 / "table1_zero_shot.json").read_text())
    n_val = len(SliceSet(cold_slices, "val"))
    assert res["model"] == "mobilesam" and res["split"] == "val" and res["n_slices"] == n_val
    assert res["encoder_passes"] == n_val  # cold cache: one pass per slice
    assert list(res["mdice"]) == PROMPT_TYPES
    for prompt in PROMPT_TYPES:
        assert 0.0 <= res["mdice"][prompt] <= 1.0
        assert set(res["per_organ"][prompt]) <= set(ORGANS) and set(res["volume_dice"][prompt]) <= set(ORGANS)
        assert_figure(task1 / "figures" / f"task1_overlay_{prompt}.png")
    assert res["mdice"]["bound_box"] > res["mdice"]["one_central_point"]  # box beats point, zero-shot
    md = (task1 / "table1_zero_shot.md").read_text()
    assert "Table 1" in md and "highest predicted IoU" in md and "volume Dice" in md
    # warm cache: no encoder pass, same numbers (same random points too)
    again = task1 / "again"
    segmentation_task1.main(["--slices", str(cold_slices), "--results-dir", str(again), "--prompt",
                             "one_random_point,bound_box"])
    res2 = json.loads((again / "table1_zero_shot.json").read_text())
    assert res2["encoder_passes"] == 0 and res2["mdice"] == {p: res["mdice"][p] for p in res2["mdice"]}
    assert list(res2["mdice"]) == ["one_random_point", "bound_box"]


def test_task1_other_seed_other_random_points(task1, cold_slices, tmp_path):
    segmentation_task1.main(["--slices", str(cold_slices), "--results-dir", str(tmp_path), "--seed", "1",
                             "--prompt", "one_random_point,bound_box"])
    a = json.loads((task1 / "table1_zero_shot.json").read_text())["mdice"]
    b = json.loads((tmp_path / "table1_zero_shot.json").read_text())["mdice"]
    assert b["bound_box"] == a["bound_box"] and b["one_random_point"] != a["one_random_point"]


def test_decoder_dtype_reuses_the_encoder_cache(task1, cold_slices, tmp_path):
    """--dtype is the decoder's: a bf16 decode reads the fp32 encoder's cache; --encoder-dtype bf16 re-encodes."""
    n_val = len(SliceSet(cold_slices, "val"))
    base = ["--slices", str(cold_slices), "--prompt", "bound_box"]
    segmentation_task1.main([*base, "--results-dir", str(tmp_path / "a"), "--dtype", "bf16"])
    segmentation_task1.main([*base, "--results-dir", str(tmp_path / "b"), "--encoder-dtype", "bf16"])
    a, b = (json.loads((tmp_path / k / "table1_zero_shot.json").read_text()) for k in "ab")
    assert (a["encoder_passes"], a["dtype"], a["encoder_dtype"]) == (0, "bf16", "fp32")
    assert (b["encoder_passes"], b["dtype"], b["encoder_dtype"]) == (n_val, "fp32", "bf16")
    assert abs(a["mdice"]["bound_box"] - b["mdice"]["bound_box"]) < 0.05


@pytest.fixture(scope="module")
def task2(task1, cold_slices):
    finetune_task2.main(["--slices", str(cold_slices), "--results-dir", str(task1),
                         "--prompt", "one_central_point,bound_box", *TINY_TRAIN])
    return task1


def test_task2_outputs_and_checkpoints(task2):
    res = json.loads((task2 / "table2_finetune.json").read_text())
    assert set(res) >= {"model", "mdice_original", "mdice_finetuned", "improved_pct"}
    assert list(res["mdice_finetuned"]) == ["one_central_point", "bound_box"]
    t1 = json.loads((task2 / "table1_zero_shot.json").read_text())
    assert res["mdice_original"]["bound_box"] == pytest.approx(t1["mdice"]["bound_box"])
    for prompt in ("one_central_point", "bound_box"):
        run = task2 / "finetune" / prompt
        last, best = load_checkpoint(run / "last.pt", "finetune"), load_checkpoint(run / "best.pt", "finetune")
        assert last["epoch"] == 2 and set(last) >= {"model", "optimizer", "epoch", "best_metric", "config"}
        assert last["config"]["lr"] == 0.1 and last["config"]["prompt"] == prompt
        assert best["best_metric"] == max(r["val_metric"] for r in last["history"])
        assert res["best_epoch"][prompt] == best["epoch"] == last["best_epoch"]
        assert len((run / "epochs.csv").read_text().strip().splitlines()) == 4  # header, epochs 0 (start), 1, 2
    for fig in ("fig1_curve_one_central_point.png", "fig2_curve_bound_box.png"):
        assert_figure(task2 / "figures" / fig)
    t3 = json.loads((task2 / "table3_comparison.json").read_text())["rows"]
    assert [r["source"].startswith("quoted from") for r in t3].count(True) == 5
    sam_row = [r for r in t3 if r["source"].startswith("measured here")]
    assert len(sam_row) == 1 and sam_row[0]["mdice"] == res["mdice_finetuned"]["bound_box"]
    assert sam_row[0]["needs_prompt"] and sam_row[0]["params"] > 0


def test_task1_scores_a_finetuned_decoder_on_any_slices(task2, cold_slices, tmp_path, capsys):
    """--finetuned: Task 1 scores a Task 2 decoder (Table 2's number on the same slices); another backbone's
    decoder is refused with one line."""
    best = task2 / "finetune" / "bound_box" / "best.pt"
    segmentation_task1.main(["--slices", str(cold_slices), "--results-dir", str(tmp_path), "--prompt", "bound_box",
                             "--finetuned", str(best)])
    res = json.loads((tmp_path / "table1_zero_shot.json").read_text())
    t2 = json.loads((task2 / "table2_finetune.json").read_text())
    assert res["finetuned"] == str(best) and res["mdice"]["bound_box"] == t2["mdice_finetuned"]["bound_box"]
    last = task2 / "finetune" / "bound_box" / "last.pt"  # two SGD epochs at lr 0.1 away from the pretrained decoder
    segmentation_task1.main(["--slices", str(cold_slices), "--results-dir", str(tmp_path / "last"), "--prompt",
                             "bound_box", "--finetuned", str(last)])
    moved = json.loads((tmp_path / "last" / "table1_zero_shot.json").read_text())["per_organ"]["bound_box"]
    assert moved != json.loads((task2 / "table1_zero_shot.json").read_text())["per_organ"]["bound_box"]
    line = fails(capsys, segmentation_task1.main, ["--slices", cold_slices, "--results-dir", tmp_path / "other",
                                                  "--model", "litemedsam", "--finetuned", best])
    assert "was finetuned from mobilesam" in line
    assert not (tmp_path / "other").exists()


def _weights(path, kind="finetune"):
    return load_checkpoint(path, kind)["model"]


def test_resume_equals_uninterrupted_and_needs_a_checkpoint(task2, cold_slices, tmp_path):
    """One epoch, then --resume to two, equals the task2 fixture's uninterrupted two epochs (TINY_TRAIN; a
    prompt's run does not depend on the other prompts trained beside it)."""
    args = ["--slices", str(cold_slices), "--prompt", "bound_box", *TINY_TRAIN[2:]]
    finetune_task2.main([*args, "--results-dir", str(tmp_path / "b"), "--epochs", "1"])
    finetune_task2.main([*args, "--results-dir", str(tmp_path / "b"), "--epochs", "2", "--resume"])
    a, b = _weights(task2 / "finetune/bound_box/last.pt"), _weights(tmp_path / "b/finetune/bound_box/last.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(PipelineError, match="no checkpoint"):
        finetune_task2.main([*args, "--results-dir", str(tmp_path / "c"), "--epochs", "1", "--resume"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cold_slices, tmp_path, monkeypatch):
    args = ["--slices", str(cold_slices), "--results-dir", str(tmp_path), "--prompt", "bound_box",
            "--samples-per-epoch", "16", "--batch-size", "8", "--val-samples", "8"]
    finetune_task2.main([*args, "--epochs", "1"])
    good = _weights(tmp_path / "finetune/bound_box/last.pt")
    real = finetune_task2.mask_losses
    monkeypatch.setattr(finetune_task2, "mask_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(PipelineError, match="loss became nan"):
        finetune_task2.main([*args, "--epochs", "2", "--resume"])
    ck = load_checkpoint(tmp_path / "finetune/bound_box/last.pt", "finetune")
    assert ck["epoch"] == 1 and all(torch.equal(ck["model"][k], v) for k, v in good.items())


def test_degenerate_organ_gives_finite_loss():
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 3, 3] = 1  # a one-pixel organ; the other sample is empty
    logits = torch.randn(2, 3, 16, 16) * 5
    for loss in ("dice", "dice_ce"):
        values = mask_losses(logits, torch.rand(2, 3), target, 1.0, loss)
        assert torch.isfinite(values).all()


def test_torchrun_two_processes_match_one(cold_slices, tmp_path):
    args = ["--slices", str(cold_slices), "--prompt", "bound_box", "--epochs", "1",
            "--samples-per-epoch", "16", "--batch-size", "8", "--val-samples", "8", "--device", "cpu"]
    finetune_task2.main([*args, "--results-dir", str(tmp_path / "one")])
    res = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                      "finetune_task2.py", *args, "--results-dir", tmp_path / "two"], env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("finetune bound_box epoch 1 |") == 1  # only rank 0 logs and writes
    one, two = (_weights(tmp_path / f"{name}/finetune/bound_box/last.pt") for name in ("one", "two"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4


def test_balanced_accuracy_selects_for_rare_organs():
    """The best-epoch metric: balanced = mean of per-organ accuracies, so a missed rare organ counts."""
    correct, organs = [1, 1, 1, 0], [6, 6, 6, 12]
    assert classify_train_task3.accuracy_metric(correct, organs, "weighted") == pytest.approx(0.75)
    assert classify_train_task3.accuracy_metric(correct, organs, "balanced") == pytest.approx(0.5)
    with pytest.raises(PipelineError, match="select-by"):
        classify_train_task3.accuracy_metric(correct, organs, "macro")


def test_task3_classification(task2, cold_slices):
    args = ["--slices", str(cold_slices), "--results-dir", str(task2)]
    classify_train_task3.main([*args, *TINY_TRAIN, "--lr", "1e-3"])
    ck = load_checkpoint(task2 / "classifier" / "best.pt", "classifier")
    assert ck["config"]["finetuned_path"].endswith("best.pt") and ck["config"]["lr"] == 1e-3
    classify_val_task3.main(args)
    res = json.loads((task2 / "table4_classification.json").read_text())
    assert set(res) >= {"accuracy", "n", "weighted_average", "prompt"} and res["prompt"] == "one_central_point"
    # n per organ straight from the validation labels; the weighted average from those counts
    counts = {}
    val = SliceSet(cold_slices, "val")
    for i in range(len(val)):
        for organ in set(np.unique(val.load_label(i)).tolist()) - {0}:
            counts[ORGANS[organ - 1]] = counts.get(ORGANS[organ - 1], 0) + 1
    assert res["n"] == counts
    confusion = np.array(res["confusion"])
    assert confusion.sum() == sum(counts.values()) and confusion.sum(1).tolist() == [counts.get(o, 0) for o in ORGANS]
    assert res["weighted_average"] == pytest.approx(np.trace(confusion) / confusion.sum())
    weighted = sum(res["accuracy"][o] * counts[o] for o in counts) / confusion.sum()
    assert res["weighted_average"] == pytest.approx(weighted)
    # the frozen mask parts: classification training leaves the finetuned masks exactly as they were
    assert res["mask_mdice_after_classification_training"] == res["mask_mdice_before_classification_training"]
    t2 = json.loads((task2 / "table2_finetune.json").read_text())
    assert res["mask_mdice_before_classification_training"] == pytest.approx(t2["mdice_finetuned"]["one_central_point"])
    for fig in ("fig3_classification_example.png", "confusion_matrix.png"):
        assert_figure(task2 / "figures" / fig)
    # a resume must keep the metric the best epoch was chosen by
    assert ck["config"]["select_by"] == "balanced"
    with pytest.raises(PipelineError, match=r"select_by: 'balanced' -> 'weighted'"):
        classify_train_task3.main([*args, *TINY_TRAIN, "--resume", "--select-by", "weighted"])


def test_scripts_fail_cleanly_on_bad_input(tmp_path, capsys):
    line = fails(capsys, segmentation_task1.main, ["--slices", tmp_path / "none", "--results-dir", tmp_path / "r"])
    assert line.startswith("error: slices folder")
    argv = ["--slices", tmp_path, "--model", "vit_q"]
    assert "unknown --model 'vit_q'" in fails(capsys, segmentation_task1.main, argv)
    assert not (tmp_path / "r").exists()


def test_bad_precision_fails_before_any_work(cold_slices, tmp_path, capsys):
    """An unknown --encoder-dtype / --dtype / --select-by is refused before the cache or results are touched."""
    caches = cold_slices / "embeddings"
    before = sorted(p.name for p in caches.iterdir()) if caches.is_dir() else []
    for flag, value in (("--encoder-dtype", "bf17"), ("--dtype", "fp16")):
        line = fails(capsys, segmentation_task1.main, ["--slices", cold_slices, "--results-dir", tmp_path / "r",
                                                      flag, value])
        assert line == f"error: unknown {flag} '{value}'; use auto, fp32, bf16"
    line = fails(capsys, classify_train_task3.main, ["--slices", cold_slices, "--results-dir", tmp_path / "r",
                                                     "--select-by", "macro"])
    assert "unknown --select-by 'macro'" in line
    assert (sorted(p.name for p in caches.iterdir()) if caches.is_dir() else []) == before
    assert not (tmp_path / "r").exists()
