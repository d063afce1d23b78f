"""Nothing silently wrong, round two: a killed report leaves no writer, the prompts file and the data's JSON
files are parsed strictly (examples and a generated sweep), spacing comes from the affine, a cache heals,
a corrupt best.pt is rebuilt, our own temporary files are cleaned up, and odd flags get one clear line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import baselines
import segment_volume
from conftest import ROOT, fails
from sambtcv.core import files
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results
from sambtcv.data.btcv import find_cases
from sambtcv.data.prompts_file import loads, parse_prompts, read_prompts_file
from sambtcv.data.slices import check_manifest
from sambtcv.engine.volume import load_case
from test_faults import TINY_EPOCHS, fake_cache, fake_rows, run_state, tiny_fit


# ---------------------------------------------------------------------------------------------- 1. a killed report
def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                found.append(int(proc.name))
    return found


def _start_report(tmp_path: Path, name: str):
    results = tmp_path / name
    args = [sys.executable, "run_report.py", "--profile", "smoke", "--results-dir", str(results), "--work-dir",
            str(tmp_path / f"work_{name}"), "--compare-models", "", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1"))
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until a stage that writes into the results folder is running
        if line.startswith("[task 1: zero-shot] $"):
            time.sleep(2)
            return proc, results
        assert time.time() < deadline, "the report never reached Task 1"
    raise AssertionError(proc.stderr.read()[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_report_leaves_no_stage_writing(tmp_path, sig):
    proc, results = _start_report(tmp_path, f"r{int(sig)}")
    assert _processes_naming(str(results)), "the stage should be running"
    os.kill(proc.pid, sig)
    proc.wait(60)
    deadline = time.time() + 30
    while _processes_naming(str(results)) and time.time() < deadline:
        time.sleep(0.5)
    assert not _processes_naming(str(results)), "a stage outlived the report"
    listing = sorted(str(p) for p in results.rglob("*"))
    time.sleep(3)
    assert sorted(str(p) for p in results.rglob("*")) == listing  # nothing writes there any more
    files.exclusive(results, "results folder").acquire().release()  # and a new run may take the folder
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert proc.returncode == 2 and "stopped by signal" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- 2-3. prompts files
BAD_PROMPTS = {
    "a 330-digit integer": '{"liver": {"slice": 1, "box": [1, 2, %s, 4]}}' % ("9" * 330),
    "a 5000-digit integer": '{"liver": {"slice": %s, "box": [1, 2, 3, 4]}}' % ("1" * 5000),
    "Infinity in box3d": '{"liver": {"box3d": [0, 0, 0, Infinity, 5, 5]}}',
    "NaN in a box": '{"liver": {"slice": 1, "box": [NaN, 0, 5, 5]}}',
    "1e999": '{"liver": {"slice": 1, "box": [1e999, 0, 5, 5]}}',
    "a boolean slice": '{"liver": {"slice": true, "box": [1, 2, 3, 4]}}',
    "a boolean coordinate": '{"liver": {"slice": 1, "box": [true, 2, 3, 4]}}',
    "box3d floats": '{"liver": {"box3d": [0.9, 0, 0, 1.5, 40, 8]}}',
    "box and box3d": '{"liver": {"slice": 1, "box": [1, 2, 3, 4], "box3d": [0, 0, 0, 5, 5, 5]}}',
    "box and points": '{"liver": {"slice": 1, "box": [1, 2, 3, 4], "points": [[2, 2]]}}',
    "a duplicate organ": '{"liver": {"slice": 1, "box": [1, 2, 3, 4]}, "liver": {"slice": 2, "box": [1, 2, 3, 4]}}',
    "a duplicate key": '{"liver": {"slice": 1, "slice": 2, "box": [1, 2, 3, 4]}}',
    "a typo in a key": '{"liver": {"slice": 1, "points": [[5, 5], [6, 6]], "lables": [1, 0]}}',
    "background points only": '{"liver": {"slice": 1, "points": [[5, 5]], "labels": [0]}}',
    "labels as booleans": '{"liver": {"slice": 1, "points": [[5, 5]], "labels": [true]}}',
    "an unknown organ": '{"livre": {"slice": 1, "box": [1, 2, 3, 4]}}',
    "a list": '[1, 2]',
    "nesting": '{"liver": {"slice": 1, "box": [[1, 2], [3, 4], 5, 6]}}',
    "deep nesting": '{"liver": ' + "[" * 5000 + "]" * 5000 + '}',
}


@pytest.mark.parametrize("text", BAD_PROMPTS.values(), ids=BAD_PROMPTS.keys())
def test_bad_prompts_file_is_one_line(tmp_path, text):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(PipelineError) as exc:
        read_prompts_file(path)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400


def test_bad_prompts_fail_before_any_work(raw_phantom, tmp_path, capsys):
    image, label = find_cases(raw_phantom)["val"][0][1:]
    prompts = tmp_path / "p.json"
    prompts.write_text(BAD_PROMPTS["a typo in a key"])
    out = tmp_path / "o" / "pred.nii.gz"
    line = fails(capsys, segment_volume.main, ["--image", image, "--prompts", prompts, "--out", out])
    assert "unknown key 'lables'" in line and not out.parent.exists()
    prompts.write_text('{"liver": {"slice": 99, "box": [1, 2, 30, 40]}}')  # well formed, outside the CT
    line = fails(capsys, segment_volume.main, ["--image", image, "--prompts", prompts, "--out", out,
                                               "--model", "litemedsam"])
    assert "['slice'] 99 must be a slice index" in line and not out.parent.exists()


def test_good_prompts_do_what_they_say():
    specs = parse_prompts(loads('{"spleen": {"slice": 3, "points": [[5, 6.5], [7, 8]], "labels": [1, 0]},'
                                ' "liver": {"box3d": [0, 1, 2, 3, 4, 5]}}'))
    assert specs[0].prompt.point_labels().tolist() == [1.0, 0.0] and specs[0].prompt.points[0, 1] == 6.5
    assert specs[1].box3d == [0, 1, 2, 3, 4, 5]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=5), max_leaves=20)
KEYS = st.sampled_from(["slice", "box", "points", "labels", "box3d", "lables", "liver", "spleen", "image", "label",
                        "training", "validation", "slices", "file", "case", "z", "height", "width", "organs",
                        "area", "bbox", "6", "0", ""])
FIELDS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.integers(
    min_value=10**20, max_value=10**400), lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
    KEYS, inner, max_size=6), max_leaves=24)


def _one_line_or_value(fn, *args):
    try:
        return fn(*args)
    except PipelineError as exc:
        assert "\n" not in str(exc)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["liver", "spleen", "aorta", "nose"]), FIELDS, max_size=3) | JSON)
def test_prompts_parser_sweep(value):
    """Random JSON values: a valid parse or the pipeline's one-line error, never another exception."""
    _one_line_or_value(parse_prompts, value)
    text = json.dumps(value, allow_nan=True)
    _one_line_or_value(lambda t: parse_prompts(loads(t)), text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(FIELDS | st.dictionaries(st.sampled_from(["training", "validation"]), FIELDS, max_size=2))
def test_dataset_json_and_manifest_sweep(tmp_path, value):
    """dataset_0.json (which defines the split) and manifest.json with random content."""
    (tmp_path / "dataset_0.json").write_text(json.dumps(value, allow_nan=True))
    _one_line_or_value(find_cases, tmp_path)
    _one_line_or_value(check_manifest, value, tmp_path / "manifest.json")
    _one_line_or_value(check_manifest, {"slices": value}, tmp_path / "manifest.json")


# ---------------------------------------------------------------------------------------------- 4. spacing
def test_spacing_comes_from_the_affine_not_pixdim(raw_phantom, tmp_path):
    image, label = find_cases(raw_phantom)["val"][0][1:]
    out = []
    for src in (image, label):
        im = nib.load(str(src))
        affine = np.diag([-6.0, -6.0, 6.0, 1.0])
        new = nib.Nifti1Image(np.asarray(im.dataobj), affine, im.header.copy())
        new.set_sform(affine, code=1)
        new.set_qform(affine, code=0)
        new.header.set_zooms((1.0, 1.0, 1.0))  # pixdim says 1 mm, the affine 6 mm
        path = tmp_path / src.name
        nib.save(new, str(path))
        out.append(path)
    assert nib.load(str(out[0])).header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    case = load_case("c", out[0], out[1], (-160, 240))
    assert case.spacing == (6.0, 6.0, 6.0) and case.pixel_mm == 6.0


# ---------------------------------------------------------------------------------------------- 5. caches heal
@pytest.mark.parametrize("resave", ["float32", "fortran"])
def test_a_resaved_cache_file_heals(tmp_path, resave):
    folder = tmp_path / "emb"
    assert fake_cache(folder).fill("cpu", progress=False, encode=fake_rows) == 6
    path = folder / "val.npy"
    rows = np.load(path)
    np.save(path, rows.astype(np.float32) if resave == "float32" else np.asfortranarray(rows))
    cache = fake_cache(folder)
    assert cache.fill("cpu", progress=False, encode=fake_rows) == 6  # all encoded again, into a sound file
    again = fake_cache(folder)
    assert again.fill("cpu", progress=False, encode=fake_rows) == 0
    assert np.array_equal(again.read(2), fake_rows([2])[0].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------- 6. best.pt
def test_corrupt_best_beside_a_healthy_last_is_rebuilt(tmp_path):
    reference = tmp_path / "reference"
    tiny_fit(reference, resume=False)
    run = tmp_path / "run"
    tiny_fit(run, resume=False)
    Results.best(run).write_bytes(b"not a checkpoint")
    tiny_fit(run, resume=True)  # nothing left to train (TINY_EPOCHS done): only the repair
    state, ref = run_state(run), run_state(reference)
    assert state["best_epoch"] == ref["best_epoch"] and state["last_epoch"] == TINY_EPOCHS
    assert all(np.array_equal(state["best_model"][k], ref["best_model"][k]) for k in ref["best_model"])


# ---------------------------------------------------------------------------------------------- 7. leftovers, messages
def test_dead_writers_temporaries_are_removed_and_organs_listed_once(raw_phantom, tmp_path, capsys):
    image, label = find_cases(raw_phantom)["val"][0][1:]
    out = tmp_path / "pred.nii.gz"
    dead = tmp_path / ".pred.nii.gz.p999999999-abcdefgh.tmp"  # a killed write's leftover (no such pid)
    alive = tmp_path / f".pred.nii.gz.p{os.getppid()}-abcdefgh.tmp"  # a running writer's: kept
    other = tmp_path / ".other.nii.gz.p999999999-abcdefgh.tmp"  # another file's: kept
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    segment_volume.main(["--image", image, "--label", label, "--organs", "liver,liver", "--out", out,
                         "--model", "litemedsam", "--cache-dir", tmp_path / "cache"])
    printed = capsys.readouterr().out
    assert [line.startswith("liver:") for line in printed.splitlines()].count(True) == 1 and out.is_file()
    assert not dead.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("main,args,needle", [
    (segment_volume.main, ["--organs", ""], "--organs must be 'all' or a comma list"),
    (segment_volume.main, ["--margin-mm", "1_0"], "--margin-mm must be auto or a number of mm >= 0, got '1_0'"),
    (segment_volume.main, ["--margin-mm", "inf"], "--margin-mm must be auto or a number"),
    (segment_volume.main, ["--image", "/dev/zero", "--label", "/dev/zero", "--out", "x.nii.gz"],
     "--image /dev/zero is not a regular file"),
    (baselines.main, ["--model", "all,unet"], "--model: 'all' cannot be combined with other names"),
])
def test_odd_flags_get_a_plain_line(tmp_path, capsys, main, args, needle):
    line = fails(capsys, main, [*args, "--results-dir", tmp_path / "r"])
    assert needle in line, line
    assert not (tmp_path / "r").exists()
