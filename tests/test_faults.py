"""Issue 12: nothing lost, nothing run, nothing silently wrong.

One test (or a few) per fault: data loss, code execution from checkpoints, crash consistency,
concurrent runs, inputs that corrupt the slices, stale state, cache integrity, tracebacks instead of
one line, file modes. Every failure must be one line ``error: ...`` with exit status 2 and leave
nothing half-written. Scripts run in-process through `cli.run_main` where that is enough (fast) and
in a subprocess where the process boundary is the point.
"""
from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import shutil
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

import classify_train_task3
import classify_val_task3
import finetune_task2
import preprocess
import segmentation_task1
from conftest import fails, held_by_another_process, run_script
from sambtcv import cli
from sambtcv.core import files
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results
from sambtcv.models.embeddings import NOT_DONE, EmbeddingCache
from sambtcv.study import records, training
from sambtcv.study.evaluation import evaluation_settings
from utils import SliceSet

SCRIPTS = ("preprocess", "segmentation_task1", "finetune_task2", "classify_train_task3", "classify_val_task3")
FORK = multiprocessing.get_context("fork")


# ---------------------------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_compute(monkeypatch):
    """Loading a backbone fails the test: whatever is checked must be refused before any work."""
    from sambtcv.models import backbones as models

    def load_backbone(*args, **kwargs):
        pytest.fail("the script started its work (loaded a backbone) before refusing")

    # Task 1 loads through sambtcv.cli.load_models, which looks load_backbone up in sambtcv.models.backbones
    for module in (models, classify_val_task3):
        monkeypatch.setattr(module, "load_backbone", load_backbone)


@pytest.fixture
def raw_copy(raw_phantom, tmp_path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(raw_phantom, dst)
    return dst


# ---------------------------------------------------------------------------------------------- 1. data loss
@pytest.mark.parametrize("where", ["equals", "contains", "inside"])
def test_out_dir_equal_to_containing_or_inside_the_data_dir_is_refused(raw_phantom, tmp_path, capsys, where):
    parent = tmp_path / "parent"
    data = parent / "raw"
    shutil.copytree(raw_phantom, data)
    out = {"equals": data, "contains": parent, "inside": data / "slices"}[where]
    before = snapshot(parent)
    line = fails(capsys, preprocess.main, ["--data-dir", data, "--out-dir", out])
    assert "is, contains or lies inside the data folder" in line
    assert snapshot(parent) == before


def test_existing_folder_not_written_by_preprocess_is_not_replaced(raw_phantom, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    line = fails(capsys, preprocess.main, ["--data-dir", raw_phantom, "--out-dir", out])
    assert "was not written by this project" in line
    assert snapshot(out) == {"notes.txt": b"precious"}


def test_file_given_as_out_dir_is_left_alone(raw_phantom, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    line = fails(capsys, preprocess.main, ["--data-dir", raw_phantom, "--out-dir", target])
    assert "is a file, not a folder" in line
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]  # no .results.txt.old, no temp folder


def test_synthetic_never_overwrites_a_real_dataset(tmp_path, capsys):
    data = tmp_path / "btcv"
    img = data / "RawData" / "Training" / "img" / "img0001.nii.gz"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"a real CT volume")
    line = fails(capsys, preprocess.main, ["--synthetic", "1", "--phantom-shape", "16,16,8", "--data-dir", data,
                                           "--out-dir", tmp_path / "slices"])
    assert "no phantom.json" in line
    assert snapshot(data) == {"RawData/Training/img/img0001.nii.gz": b"a real CT volume"}
    assert not (tmp_path / "slices").exists()


# ---------------------------------------------------------------------------------------------- 2. code execution
class _Payload:
    """Unpickling this calls open(path, "w"): a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def crafted_checkpoint(path: Path, sentinel: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": files.CHECKPOINT_FORMAT, "kind": kind, "config": {"prompt": "bound_box"},
                "model": _Payload(sentinel)}, path)
    return path


@pytest.mark.parametrize("script", ["segmentation_task1", "classify_train_task3", "classify_val_task3",
                                    "finetune_task2"])
def test_crafted_pickle_is_never_run(script, cold, tmp_path, capsys, no_compute):
    sentinel, results = tmp_path / "SENTINEL", tmp_path / "results"
    argv = ["--slices", cold, "--results-dir", results, "--model", "litemedsam"]
    if script == "finetune_task2":
        path = crafted_checkpoint(Results.last(Results(results).finetune_run("bound_box")), sentinel, "finetune")
        argv += ["--prompt", "bound_box", "--resume"]
    elif script == "classify_val_task3":
        path = crafted_checkpoint(tmp_path / "evil.pt", sentinel, "classifier")
        argv += ["--classifier", path]
    else:
        path = crafted_checkpoint(tmp_path / "evil.pt", sentinel, "finetune")
        argv += ["--finetuned", path, "--prompt", "bound_box"]
    line = fails(capsys, globals()[script].main, argv)
    assert str(path) in line and "not a checkpoint this project can read" in line
    assert not sentinel.exists()
    assert not (cold / "embeddings").exists()  # refused before any work


def test_non_checkpoints_and_other_tasks_checkpoints_give_one_line(cold, tmp_path, capsys, no_compute):
    from sambtcv.models.backbones import BACKBONES

    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    backbone_file = BACKBONES["litemedsam"].weights()
    finetune_ck = files.save_checkpoint(tmp_path / "finetune_best.pt", "finetune", {"model": {}, "config": {}})
    classifier_ck = files.save_checkpoint(tmp_path / "classifier_best.pt", "classifier", {"model": {}, "config": {}})
    base = ["--slices", cold, "--results-dir", tmp_path / "results", "--model", "litemedsam"]
    for path, needle in ((junk, "not a checkpoint this project can read"), (backbone_file, "not a sam-btcv checkpoint"),
                         (finetune_ck, "is a finetune checkpoint, not a classifier checkpoint")):
        assert needle in fails(capsys, classify_val_task3.main, [*base, "--classifier", path])
    for main in (segmentation_task1.main, classify_train_task3.main):
        for path, needle in ((junk, "not a checkpoint this project can read"),
                             (backbone_file, "not a sam-btcv checkpoint"),
                             (classifier_ck, "is a classifier checkpoint, not a finetune checkpoint")):
            assert needle in fails(capsys, main, [*base, "--finetuned", path, "--prompt", "bound_box"])
    assert not (cold / "embeddings").exists()


# ---------------------------------------------------------------------------------------------- 3. crash consistency
TINY_EPOCHS = 5


def tiny_fit(out_dir, resume: bool) -> dict:
    """training.fit on a 3 -> 1 linear model and 12 fixed samples; a validation metric that goes up and
    down, so that the best epoch is neither the first nor the last."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=gen), torch.randn(12, 1, generator=gen)
    data = [{"x": x[i], "y": y[i]} for i in range(len(x))]

    def loss_fn(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).squeeze(1)

    def validate(model):
        with torch.no_grad():
            return {"val_loss": float(((model(x) - y) ** 2).mean()),
                    "val_metric": math.cos(9.0 * float(model.weight.sum()))}

    cfg = {"epochs": TINY_EPOCHS, "batch_size": 4, "seed": 0, "samples_per_epoch": 0, "lr": 0.2, "resume": resume}
    return training.fit(module=module, optimizer=optimizer, train_data=lambda epoch: data, loss_fn=loss_fn,
                        validate=validate, cfg=cfg, out_dir=out_dir, env=training.DistEnv(), what="tiny",
                        kind="finetune")


def run_state(run_dir: Path) -> dict:
    last = files.load_checkpoint(Results.last(run_dir), "finetune")
    best = files.load_checkpoint(Results.best(run_dir), "finetune")
    lines = Results.epochs_csv(run_dir).read_text().splitlines()
    cols = [lines[0].split(",").index(k) for k in ("epoch", "train_loss", "val_loss", "val_metric")]
    return {"last_epoch": last["epoch"], "last_model": last["model"], "best_epoch": best["epoch"],
            "best_model": best["model"], "last_says_best": last["best_epoch"],
            "rows": [[ln.split(",")[c] for c in cols] for ln in lines[1:]],
            "temps": sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".partial")))}


def assert_same_run(a: dict, b: dict, what: str):
    for key in ("last_epoch", "best_epoch", "last_says_best", "rows", "temps"):
        assert a[key] == b[key], (what, key, a[key], b[key])
    for key in ("last_model", "best_model"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (what, key)


def killed_fit(out_dir: Path, kill_at: int, after: bool) -> None:
    """tiny_fit in a forked child that SIGKILLs itself at its kill_at-th os.replace (a file write's
    commit), just before or just after the rename."""
    def child():
        real, count = os.replace, [0]

        def replace(src, dst):
            count[0] += 1
            if count[0] == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
            if count[0] == kill_at and after:
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
        tiny_fit(out_dir, resume=False)
        os._exit(0)

    proc = FORK.Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"write {kill_at} was never reached (exit {proc.exitcode})"


@pytest.mark.slow
def test_kill_at_every_write_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    writes = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (writes.append(Path(dst).name), real_replace(src, dst))[1])
    tiny_fit(tmp_path / "reference", resume=False)
    monkeypatch.undo()
    reference = run_state(tmp_path / "reference")
    assert 0 < reference["best_epoch"] < TINY_EPOCHS  # later epochs rely on the best weights kept in last.pt
    assert {"last.pt", "best.pt", "epochs.csv"} == set(writes)
    for n, name in enumerate(writes, start=1):
        for after in (False, True):
            run_dir = tmp_path / f"kill{n}{'after' if after else 'before'}"
            killed_fit(run_dir, n, after)
            # what a script's --resume does: resume the runs that have a last.pt, start the others fresh
            tiny_fit(run_dir, resume=Results.last(run_dir).is_file())
            when = f"killed {'after' if after else 'before'} write {n} ({name})"
            assert_same_run(run_state(run_dir), reference, when)


def test_resume_repairs_best_and_log_written_after_last(tmp_path):
    """A kill between last.pt and the files derived from it: best.pt holds an older epoch and
    epochs.csv misses rows; --resume rewrites both from last.pt."""
    tiny_fit(tmp_path, resume=False)
    reference = run_state(tmp_path)
    best_epoch = reference["best_epoch"]
    stale = files.load_checkpoint(Results.best(tmp_path), "finetune")
    stale["epoch"], stale["model"] = best_epoch - 1, {k: v + 1 for k, v in stale["model"].items()}
    torch.save(stale, Results.best(tmp_path))
    Results.epochs_csv(tmp_path).write_text("epoch\n")
    tiny_fit(tmp_path, resume=True)  # nothing left to train: only the repair
    assert_same_run(run_state(tmp_path), reference, "repaired")


# ---------------------------------------------------------------------------------------------- 4. concurrent runs
def test_second_run_into_a_locked_results_dir_fails_naming_the_holder(cold, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--slices", cold, "--results-dir", results, "--model", "litemedsam"]
    with held_by_another_process(results, "results folder") as pid:  # an unrelated run
        line = fails(capsys, classify_val_task3.main, argv)
        assert "in use by another run" in line and f"pid {pid} " in line
    # a stage of a run that holds the lock (run_report.py's stages; their processes inherit it) gets in
    with files.exclusive(results, "results folder"):
        assert "classifier checkpoint not found" in fails(capsys, classify_val_task3.main, argv)
    # released: the next run gets in
    assert "classifier checkpoint not found" in fails(capsys, classify_val_task3.main, argv)


def fake_backbone(side: int = 4):
    """What EmbeddingCache needs of a backbone: its embedding size and identity."""
    return SimpleNamespace(name="fake", key="fake-0", sam=SimpleNamespace(prompt_encoder=SimpleNamespace(
        image_embedding_size=(side, side))))


def fake_rows(idx) -> np.ndarray:
    """Deterministic 'embeddings' of rows idx (stands in for the image encoder)."""
    return np.stack([np.random.default_rng(int(i)).standard_normal((256, 4, 4)) for i in idx]).astype(np.float32)


def fake_cache(folder: Path, n: int = 6) -> EmbeddingCache:
    return EmbeddingCache(folder, "val", n, lambda i: None, fake_backbone(), "fp32", "slices-id")


def test_embedding_cache_being_filled_is_locked(tmp_path):
    folder = tmp_path / "embeddings"
    with held_by_another_process(folder, "embedding cache") as pid:
        with pytest.raises(PipelineError, match="in use by another run") as exc:
            fake_cache(folder).fill("cpu", progress=False, encode=fake_rows)
        assert f"pid {pid} " in str(exc.value) and "\n" not in str(exc.value)
    assert fake_cache(folder).fill("cpu", progress=False, encode=fake_rows) == 6


def test_nested_lock_is_inherited_by_child_processes_only(tmp_path):
    folder = tmp_path / "results"

    def try_lock(inherit: bool):
        ours, theirs = FORK.Pipe()

        def child():
            if not inherit:
                os.environ.pop(files.LOCKS_ENV, None)
            try:
                with files.exclusive(folder, "results folder"):
                    theirs.send("entered")
            except PipelineError as exc:
                theirs.send(str(exc))
            os._exit(0)

        proc = FORK.Process(target=child)
        proc.start()
        proc.join(30)
        return ours.recv()

    with files.exclusive(folder, "results folder"):
        assert try_lock(inherit=True) == "entered"
        assert "in use by another run" in try_lock(inherit=False)
    assert try_lock(inherit=False) == "entered"


# ------------------------------------------------------------------------------------ 5. inputs that corrupt the slices
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])


def write_case(folder: Path, name: str, image=None, label_affine=AFFINE) -> dict:
    """A 16 x 16 x 4 case (liver in two slices) as <folder>/img/<name>.nii.gz + <folder>/lab/<name>.nii.gz."""
    img = np.full((16, 16, 4), -50, np.int16) if image is None else image
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[3:9, 4:12, 1:3] = 6
    for sub, data, affine in (("img", img, AFFINE), ("lab", lab, label_affine)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(folder / sub / f"{name}.nii.gz"))
    return {"image": f"{folder.name}/img/{name}.nii.gz", "label": f"{folder.name}/lab/{name}.nii.gz"}


def dataset_json(data: Path, training, validation) -> Path:
    (data / "dataset_0.json").write_text(json.dumps({"training": training, "validation": validation}))
    return data


def shifted(mm: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += mm
    return affine


@pytest.mark.parametrize("case,needle", [
    ("same_name_two_folders", "listed twice"),
    ("in_both_splits", "cannot be in both training and validation"),
    ("flipped_label", "is oriented"),
    ("label_off_by_two_voxels", "mm away from its image"),
    ("label_off_by_half_a_voxel", None),  # within a voxel: accepted
    ("nan_voxels", "NaN or infinite voxels"),
    ("inf_voxels", "NaN or infinite voxels"),
])
def test_inputs_that_would_corrupt_the_slices_are_refused(tmp_path, capsys, case, needle):
    data = tmp_path / "data"
    a = write_case(data / "a", "case1")
    if case == "same_name_two_folders":
        dataset_json(data, [a, write_case(data / "b", "case1")], [write_case(data / "c", "case2")])
    elif case == "in_both_splits":
        dataset_json(data, [a, write_case(data / "b", "case2")], [a])
    elif case in ("flipped_label", "label_off_by_two_voxels", "label_off_by_half_a_voxel"):
        affine = {"flipped_label": np.diag([-1.5, 1.5, 2.5, 1.0]), "label_off_by_two_voxels": shifted(3.0),
                  "label_off_by_half_a_voxel": shifted(0.75)}[case]
        dataset_json(data, [a], [write_case(data / "b", "case2", label_affine=affine)])
    else:
        bad = np.full((16, 16, 4), -50.0, np.float32)
        bad[5, 5, 2] = np.nan if case == "nan_voxels" else np.inf
        dataset_json(data, [a], [write_case(data / "b", "case2", image=bad)])
    out = tmp_path / "slices"
    argv = ["--data-dir", data, "--out-dir", out]
    if needle is None:
        preprocess.main([str(v) for v in argv])
        assert SliceSet(out, "val").records
        return
    assert needle in fails(capsys, preprocess.main, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no slices, no temporary folder


# -------------------------------------------------------------------------------------------- 6. stale or changed state
def test_zero_shot_table_of_other_slices_is_not_reused(tmp_path, monkeypatch):
    res = Results(tmp_path)
    cfg = {"seed": 0, "dtype": "fp32", "encoder_dtype": "fp32", "decode_batch": 8, "point_mask": "smallest"}
    stale = {"bound_box": {"liver": 0.123}}
    backbone = SimpleNamespace(name="litemedsam", key="litemedsam-abc", checkpoint="lite.pth")
    settings = evaluation_settings(backbone, None, "val", ["bound_box"], 0, "fp32", "fp32")
    records.write_record(res.root, "task1", settings, {"per_organ": stale}, {"id": "slices-A"})
    fresh = {"bound_box": {"liver": 0.9}}
    monkeypatch.setattr(finetune_task2, "evaluate", lambda *a, **k: SimpleNamespace(per_organ=lambda: fresh))

    def val(signature):  # the same 6 slices count either way; only their identity differs
        return SimpleNamespace(slices=SimpleNamespace(signature=signature))

    args = (cfg, res, backbone, None)
    assert finetune_task2.zero_shot(*args, val("slices-B"), "cpu", ["bound_box"]).per_organ == fresh
    assert finetune_task2.zero_shot(*args, val("slices-A"), "cpu", ["bound_box"]).per_organ == stale  # reused
    assert finetune_task2.zero_shot(*args, val("slices-A"), "cpu", ["larger_box"]).per_organ == fresh  # not in it
    assert finetune_task2.zero_shot(dict(cfg, seed=1), res, backbone, None, val("slices-A"), "cpu",
                                    ["bound_box"]).per_organ == fresh  # other settings: not reused


class Reached(Exception):
    """Raised by a stand-in for the expensive part of a script: the checks before it all passed."""


def finetune_argv(cold, results, prompt="bound_box", **flags):
    argv = ["--slices", cold, "--results-dir", results, "--model", "litemedsam", "--prompt", prompt, "--epochs", "1",
            "--batch-size", "4", "--samples-per-epoch", "8", "--val-samples", "4"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return [str(v) for v in argv]


def save_last(results: Path, prompt: str, argv) -> Path:
    """last.pt of a finetune run started with `argv` (what train_prompt records as its config)."""
    cfg = cli.parse_config(vars(finetune_task2), argv)
    config = training.plain_config(dict(cfg, prompt=prompt, backbone="litemedsam-x", resume=False, slices_id="s"))
    return files.save_checkpoint(Results.last(Results(results).finetune_run(prompt)), "finetune",
                                 {"config": config, "epoch": 1})


def test_resume_with_changed_settings_is_refused_before_the_cache(cold, tmp_path, capsys, monkeypatch, no_compute):
    results = tmp_path / "results"
    save_last(results, "bound_box", finetune_argv(cold, results))
    line = fails(capsys, finetune_task2.main, finetune_argv(cold, results, resume="true", lr="0.5", batch_size="8",
                                                            loss="dice_ce"))
    assert "lr: 0.1 -> 0.5" in line and "batch_size: 4 -> 8" in line and "loss: 'dice' -> 'dice_ce'" in line
    assert not (cold / "embeddings").exists()  # refused before the cache is filled
    # how long and where may change
    monkeypatch.setattr(finetune_task2, "setup_training", lambda *args: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        finetune_task2.main(finetune_argv(cold, results, resume="true", epochs="3", device="cpu", decode_batch="2"))


def test_resume_over_prompts_starts_those_without_a_checkpoint_fresh(cold, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    save_last(results, "bound_box", finetune_argv(cold, results))
    resumed = {}
    setup = SimpleNamespace(env=SimpleNamespace(main=True))
    monkeypatch.setattr(finetune_task2, "setup_training", lambda *args: setup)
    monkeypatch.setattr(finetune_task2, "train_prompt", lambda _s, _c, _r, p, resume: resumed.setdefault(p, resume))
    monkeypatch.setattr(finetune_task2, "evaluate_runs", lambda *a: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        finetune_task2.main(finetune_argv(cold, results, prompt="bound_box,larger_box", resume="true"))
    assert resumed == {"bound_box": True, "larger_box": False}
    assert "larger_box: no checkpoint" in capsys.readouterr().out
    line = fails(capsys, finetune_task2.main, finetune_argv(cold, results, prompt="larger_box,one_central_point",
                                                            resume="true"))
    assert "no checkpoint to resume" in line


def test_mistyped_finetuned_path_fails(cold, tmp_path, capsys, no_compute):
    missing = tmp_path / "results" / "finetune" / "bound_box" / "bset.pt"
    base = ["--slices", cold, "--results-dir", tmp_path / "results", "--model", "litemedsam", "--prompt", "bound_box",
            "--finetuned", missing]
    for main in (classify_train_task3.main, segmentation_task1.main):
        line = fails(capsys, main, base)
        assert str(missing) in line and "not found" in line
    assert not (cold / "embeddings").exists()


# ---------------------------------------------------------------------------------------------- 7. cache integrity
def test_cache_rows_changed_on_disk_are_encoded_again(tmp_path):
    folder = tmp_path / "emb"
    clean = fake_cache(folder)
    assert clean.fill("cpu", progress=False, encode=fake_rows) == 6
    expected = [clean.read(i) for i in range(6)]
    clean.close()
    offset = np.load(clean.path, mmap_mode="r").offset
    with open(clean.path, "r+b") as fh:  # rows 1 and 4 overwritten with zeros, checksums untouched
        for i in (1, 4):
            fh.seek(offset + i * clean.row_bytes)
            fh.write(bytes(clean.row_bytes))
    encoded = []
    cache = fake_cache(folder)
    assert cache.fill("cpu", progress=False, encode=lambda idx: (encoded.extend(idx), fake_rows(idx))[1]) == 2
    assert encoded == [1, 4]
    again = fake_cache(folder)
    assert again.fill("cpu", progress=False, encode=fake_rows) == 0
    assert all(np.array_equal(again.read(i), expected[i]) for i in range(6))


def test_truncated_cache_file_is_rebuilt(tmp_path):
    folder = tmp_path / "emb"
    clean = fake_cache(folder)
    clean.fill("cpu", progress=False, encode=fake_rows)
    expected = [clean.read(i) for i in range(6)]
    clean.close()
    with open(clean.path, "r+b") as fh:
        fh.truncate(clean.path.stat().st_size // 2)
    cache = fake_cache(folder)
    assert (cache.crc == NOT_DONE).all()
    assert cache.fill("cpu", progress=False, encode=fake_rows) == 6
    assert all(np.array_equal(fake_cache(folder).read(i), expected[i]) for i in range(6))


# ----------------------------------------------------------------------------------------- 8. one line, not a traceback
@pytest.mark.parametrize("content,needle", [
    ("[]", "must hold an object"),
    ('{"training": [{"image": 1, "label": 2}], "validation": []}', "paths as strings"),
    ('{"training": [{"image": ["a"], "label": "b"}]}', "paths as strings"),
    ('{"training": "imagesTr", "validation": []}', "must be a list"),
])
def test_malformed_dataset_json_gives_one_line(tmp_path, capsys, content, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_0.json").write_text(content)
    assert needle in fails(capsys, preprocess.main, ["--data-dir", data, "--out-dir", tmp_path / "slices"])
    assert not (tmp_path / "slices").exists()


@pytest.mark.parametrize("script,flag,value", [
    ("finetune_task2", "--batch-size", "0"), ("classify_train_task3", "--batch-size", "0"),
    ("segmentation_task1", "--decode-batch", "0"), ("classify_val_task3", "--decode-batch", "0"),
    ("segmentation_task1", "--seed", "-1"), ("preprocess", "--seed", "-1"),
    ("finetune_task2", "--val-samples", "-3"), ("finetune_task2", "--epochs", "-1"),
    ("classify_train_task3", "--epochs", "-1"), ("finetune_task2", "--momentum", "-0.5"),
    ("finetune_task2", "--lr", "-1"),
])
def test_out_of_range_numbers_give_one_line_before_any_work(script, flag, value, cold, tmp_path, capsys, no_compute):
    line = fails(capsys, globals()[script].main, ["--slices" if script != "preprocess" else "--data-dir", cold,
                                                 "--results-dir" if script != "preprocess" else "--out-dir",
                                                 tmp_path / "out", "--model" if script != "preprocess" else "--device",
                                                 "litemedsam" if script != "preprocess" else "cpu", flag, value])
    assert line.startswith(f"error: {flag} must be >= ")
    assert not (tmp_path / "out").exists() and not (cold / "embeddings").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_in_a_config_block_has_a_bound(script):
    module = globals()[script]
    numeric = [(name, comment) for name, comment in cli.config_block(Path(module.__file__).read_text())
               if isinstance(getattr(module, name), (int, float)) and not isinstance(getattr(module, name), bool)]
    assert numeric
    assert [name for name, comment in numeric if not cli.BOUND.search(comment)] == []


@pytest.mark.parametrize("how", ["under_a_file", "read_only_parent"])
def test_unwritable_results_dir_fails_before_task1_computes(how, cold, tmp_path, capsys, no_compute):
    if how == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        results = tmp_path / "a_file" / "results"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the under_a_file case covers root")
        parent = tmp_path / "read_only"
        parent.mkdir(mode=0o555)
        results = parent / "results"
    line = fails(capsys, segmentation_task1.main, ["--slices", cold, "--results-dir", results, "--model", "litemedsam"])
    assert f"--results-dir {results} is not writable" in line
    assert not (cold / "embeddings").exists()


@pytest.mark.parametrize("target", ["/sys/sam-btcv-test-results", "/sys/kernel"])
def test_results_dir_in_sysfs_fails_even_for_root(target, cold, capsys, no_compute):
    """sysfs takes no new folder (the first) and no new file (the second, an existing folder) from anyone."""
    target = Path(target)
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    existed = target.exists()
    line = fails(capsys, segmentation_task1.main, ["--slices", cold, "--results-dir", target, "--model", "litemedsam"])
    assert f"--results-dir {target} is not writable" in line
    assert target.exists() == existed and not (target / files.LOCK_FILE).exists()
    assert not (cold / "embeddings").exists()


def test_unwritable_slices_dir_gives_one_line(cold):
    (cold / "embeddings").write_text("not a folder")
    cache = EmbeddingCache.for_split(SliceSet(cold, "val"), fake_backbone())
    with pytest.raises(PipelineError, match="is not writable") as exc:
        cache.fill("cpu", progress=False, encode=fake_rows)
    assert "\n" not in str(exc.value)
    assert (cold / "embeddings").read_text() == "not a folder"


def test_disk_full_while_filling_the_cache_gives_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    folder = tmp_path / "embeddings"
    with pytest.raises(PipelineError, match="no space left") as exc:
        fake_cache(folder).fill("cpu", progress=False, encode=fake_rows)
    assert "\n" not in str(exc.value)
    assert not folder.exists()  # no half-reserved rows file, no lock file
    monkeypatch.undo()
    assert fake_cache(folder).fill("cpu", progress=False, encode=fake_rows) == 6


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"task1": 3}', b'{"task1": {"key": "k"}}', b"\xff\xfe",
                                     b'{"task1": {"key": "k", "sec'])
def test_corrupt_stages_json_is_ignored_with_a_note(tmp_path, capsys, content):
    from sambtcv.study.stages import Stages

    res = Results(tmp_path)
    res.stages.write_bytes(content)
    assert Stages(res, force=False).done == {}
    assert "unreadable" in capsys.readouterr().out
    good = {"task1": {"key": "k", "seconds": 1.0, "records": []}}
    res.stages.write_text(json.dumps(good))
    assert Stages(res, force=False).done == good


def test_truncated_nifti_gives_one_line(raw_copy, tmp_path, capsys):
    image = raw_copy / "RawData" / "Training" / "img" / "img0001.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    out = tmp_path / "slices"
    line = fails(capsys, preprocess.main, ["--data-dir", raw_copy, "--out-dir", out])
    assert f"cannot read {image}" in line and "truncated or corrupt?" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no slices, no temporary folder


# ---------------------------------------------------------------------------------------------- 9. modes and flags


@pytest.mark.slow
def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        res = run_script(["preprocess.py", "--synthetic", "2", "--phantom-shape", "24,24,8", "--data-dir",
                          tmp_path / "raw", "--out-dir", tmp_path / "slices"])
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-2000:]
    paths = [p for top in ("raw", "slices") for p in [tmp_path / top, *(tmp_path / top).rglob("*")]]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert len(modes) > 10
    assert {k: m for k, m in modes.items() if m != (0o755 if (tmp_path / k).is_dir() else 0o644)} == {}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_of_the_results_writers_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    files._umask.cache_clear()  # read once per process; this test changes it
    try:
        files.write_json(tmp_path / "r" / "t.json", {})
        files.save_checkpoint(tmp_path / "r" / "finetune" / "best.pt", "finetune", {"model": {}})
        with files.staged_dir(tmp_path / "staged", "marker.json") as tmp:
            files.write_json(tmp / "marker.json", {})
        with files.exclusive(tmp_path / "locked", "results folder"):
            pass
    finally:
        os.umask(old)
        files._umask.cache_clear()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for rel, mode in (("r/t.json", file_mode), ("r/finetune/best.pt", file_mode), ("staged", dir_mode),
                      ("staged/marker.json", file_mode), ("locked/.lock", file_mode)):
        assert stat.S_IMODE((tmp_path / rel).stat().st_mode) == mode, rel


def test_abbreviated_flags_are_refused(tmp_path):
    res = run_script(["finetune_task2.py", "--epoch", "2", "--slices", tmp_path / "none", "--results-dir",
                      tmp_path / "results"])
    assert res.returncode == 2 and "unrecognized arguments: --epoch 2" in res.stderr
    assert not (tmp_path / "results").exists()
    for script in SCRIPTS:
        with pytest.raises(SystemExit):
            cli.parse_config(vars(globals()[script]), ["--see", "1"])  # --seed, abbreviated
