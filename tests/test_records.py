"""Results are records: a partial rerun never mixes settings in one table, rows from other data never sit
beside the rest, and a view is rebuilt from records, never merged into; profiles are applied by one mechanism."""
import json
import shutil

import pytest

import baselines
import finetune_task2
from sambtcv.cli import parse_config
from sambtcv.core.config import load_profile
from sambtcv.core.errors import PipelineError
from sambtcv.data.btcv import preprocess
from sambtcv.study import records, tables

SMALL = ["--samples-per-epoch", "4", "--batch-size", "4", "--val-samples", "4", "--device", "cpu"]


@pytest.mark.slow
def test_partial_finetune_rerun_rows_state_their_own_settings(tiny_slices, tmp_path):
    """Two prompts trained for 1 epoch, then one of them again for 2 epochs at another lr: Table 2 shows
    both rows, each with its own epochs and lr and its own run, and no footer claims one setting for all."""
    base = ["--slices", str(tiny_slices), "--results-dir", str(tmp_path), *SMALL]
    finetune_task2.main([*base, "--prompt", "one_central_point,bound_box", "--epochs", "1"])
    first = json.loads((tmp_path / "table2_finetune.json").read_text())
    finetune_task2.main([*base, "--prompt", "bound_box", "--epochs", "2", "--lr", "0.05"])
    view = json.loads((tmp_path / "table2_finetune.json").read_text())
    rows = {r["prompt"]: r for r in view["rows"]}
    assert (rows["one_central_point"]["epochs"], rows["one_central_point"]["lr"]) == (1, 0.1)
    assert (rows["bound_box"]["epochs"], rows["bound_box"]["lr"]) == (2, 0.05)
    assert "epochs" not in view and "lr" not in view  # no single value claimed for rows that differ
    assert view["mdice_finetuned"]["one_central_point"] == first["mdice_finetuned"]["one_central_point"]
    assert rows["bound_box"]["record"] != rows["one_central_point"]["record"]
    md = (tmp_path / "table2_finetune.md").read_text()
    assert "Epochs:" not in md and md.count(rows["bound_box"]["record"]) == 1
    bb = [line for line in md.splitlines() if line.startswith("| bound_box |")][0].split(" | ")
    assert bb[5:8] == ["2", "4", "0.05"]  # epochs, batch, lr of that run
    # every record is kept as written: three finetuning runs, none edited
    assert len(records.records(tmp_path, "task2")) == 3


@pytest.fixture(scope="module")
def other_slices(raw_phantom, tmp_path_factory):
    """The same phantom preprocessed with another HU window: other slices, another identity."""
    out = tmp_path_factory.mktemp("other") / "slices"
    preprocess(raw_phantom, out, window_hu="-100,200")
    return out


def test_baselines_on_other_slices_never_sit_beside_the_rest(tiny_slices, other_slices, tmp_path):
    """U-Net and ResU-Net on the slices, then U-Net alone on other slices: no table puts rows of the two
    data sets together, and no earlier row is dropped."""
    common = ["--results-dir", str(tmp_path), "--profile", "smoke", "--device", "cpu"]
    baselines.main(["--slices", str(tiny_slices), "--model", "unet,resunet", *common])
    baselines.main(["--slices", str(other_slices), "--model", "unet", *common])
    t3 = json.loads((tmp_path / "table3_comparison.json").read_text())
    groups = [set(g["models"]) for g in t3["groups"]]
    assert groups == [{"U-Net"}, {"U-Net", "ResU-Net"}]  # newest data first; each data set on its own
    assert len({g["slices_id"] for g in t3["groups"]}) == 2
    md = (tmp_path / "table3_comparison.md").read_text()
    main, other = md.split("### Measured on other data")
    measured = [line.split(" | ")[0] for line in main.splitlines() if "measured here" in line]
    assert measured == ["| U-Net"]  # and the report's quoted rows
    assert sorted(line.split(" | ")[0] for line in other.splitlines() if "measured here" in line) == [
        "| ResU-Net", "| U-Net"] and "not comparable" in other
    view = json.loads((tmp_path / "baselines.json").read_text())
    assert list(view["models"]) == ["U-Net"] and [list(g["models"]) for g in view["other_data"]] == [
        ["U-Net", "ResU-Net"]]


def test_a_changed_view_is_not_read_back(tmp_path):
    """Views are rebuilt from records: an edited table1_zero_shot.json does not survive the next rebuild."""
    settings = {"model": "m", "checkpoint": "c", "finetuned": None, "split": "val", "seed": 0, "dtype": "fp32",
                "encoder_dtype": "fp32"}
    result = {"n_slices": 2, "encoder_passes": 2, "seconds": 1.0, "timing": {}, "mdice": {"bound_box": 0.7},
              "per_organ": {"bound_box": {"liver": 0.7}}, "volume_dice": {"bound_box": {"liver": 0.7}},
              "n_per_organ": {"liver": 2}}
    rec = records.write_record(tmp_path, "task1", settings, result, {"id": "s"})
    view = tables.write_table1(tmp_path)
    assert view["mdice"] == {"bound_box": 0.7} and view["record"] == rec.id
    path = tmp_path / "table1_zero_shot.json"
    path.write_text(json.dumps(dict(view, mdice={"bound_box": 0.1234})))
    assert tables.write_table1(tmp_path)["mdice"] == {"bound_box": 0.7}
    assert json.loads(rec.path.read_text()) == rec.data  # the record itself is never rewritten


def test_reuse_compares_settings_as_a_whole(tmp_path):
    s = {"model": "m", "backbone": "m-1", "seed": 0, "prompts": ["bound_box", "larger_box"], "decode_batch": 8}
    records.write_record(tmp_path, "task1", s, {}, {"id": "A"})
    assert records.reusable(tmp_path, "task1", dict(s, prompts=["bound_box"]), "A", covers=("prompts",))
    assert records.reusable(tmp_path, "task1", dict(s, decode_batch=64), "A", covers=("prompts",))  # speed only
    assert not records.reusable(tmp_path, "task1", dict(s, seed=1), "A", covers=("prompts",))
    assert not records.reusable(tmp_path, "task1", dict(s, extra=1), "A", covers=("prompts",))  # a new setting
    assert not records.reusable(tmp_path, "task1", s, "B", covers=("prompts",))


def test_profiles_are_applied_by_one_mechanism(tmp_path, capsys):
    quick = load_profile("quick")
    cfg = parse_config(vars(finetune_task2), ["--profile", "quick", "--epochs", "3"])
    assert cfg["epochs"] == 3 and "epochs" in cfg.given  # a flag on the command line wins
    assert cfg["lr"] == quick["finetune_task2"]["lr"] and cfg["dtype"] == quick["all"]["dtype"]
    assert parse_config(vars(finetune_task2), [])["lr"] == finetune_task2.LR  # no profile: the page's constants
    with pytest.raises(PipelineError, match="unknown --profile 'fast'"):
        parse_config(vars(finetune_task2), ["--profile", "fast"])
    broken = tmp_path / "profiles"
    shutil.copytree(load_profile.__globals__["PROFILES_DIR"], broken)
    (broken / "typo.toml").write_text("[finetune_task2]\nepoch = 3\n")
    import sambtcv.core.config as config

    old = config.PROFILES_DIR
    config.PROFILES_DIR = broken
    try:
        with pytest.raises(PipelineError, match="sets epoch, which finetune_task2.py has no constant for"):
            parse_config(vars(finetune_task2), ["--profile", "typo"])
    finally:
        config.PROFILES_DIR = old


def test_table4_says_why_frozen_masks_can_differ_under_openvino():
    """Under OpenVINO the classifier and the plain decoder are two compiled graphs: a last-digit difference
    in their mask mDice is said to be arithmetic; under PyTorch nothing is added (they must be equal)."""
    view = {"mask_mdice_after_classification_training": 0.7731, "mask_mdice_before_classification_training": 0.7738}
    said = tables.frozen_masks_note(dict(view, runtime="openvino"))
    assert "0.7731 after" in said and "0.7738 before" in said and "two graphs" in said
    assert "two graphs" not in tables.frozen_masks_note(dict(view, runtime="torch"))
    same = dict(view, mask_mdice_before_classification_training=0.7731, runtime="openvino")
    assert "two graphs" not in tables.frozen_masks_note(same)
