"""bench.py compares like with like: its naive SamPredictor loop keeps, for a point, the mask the pipeline
keeps, so the zero-shot Dice of the two agree (the speed-up is then of the same computation)."""
import pytest

from conftest import slices_copy


@pytest.mark.slow
def test_naive_loop_and_pipeline_keep_the_same_point_mask(mobilesam, tiny_slices, tmp_path):
    from sambtcv.bench.zero_shot import bench_zero_shot

    cfg = {"zero_shot_prompt": "one_central_point", "naive_items": 4, "seed": 0, "decode_batch": 8}
    got = bench_zero_shot(cfg, mobilesam, slices_copy(tiny_slices, tmp_path / "slices"), "cpu")
    assert got["zero_shot"]["naive_items_per_prompt_type"] == 4
    assert got["zero_shot"]["per_sample_dice_max_abs_diff"] <= 1e-4, got["zero_shot"]["per_prompt"]


def test_a_childs_peak_memory_is_its_own(tmp_path):
    """sambtcv.bench.common.run_script's peak RSS is the child's alone, not the (much larger) memory of the process that
    started it: Linux's ru_maxrss carries the parent's peak into a child started by vfork + exec."""
    import numpy as np

    from sambtcv.bench.common import run_script

    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # 600 MiB touched in this process
    script = tmp_path / "small.py"
    script.write_text("x = bytearray(50 * 2**20)\n")  # the child itself needs about 60 MiB
    got = run_script(str(script), [], tmp_path / "log.txt")
    assert ballast.sum() > 0 and 50 <= got["peak_rss_mib"] < 300, got


def test_the_stride_section_refuses_a_stride_of_nothing_before_any_work(tmp_path):
    """--sections stride compares a stride with every slice: a stride of 0 is refused before the phantom is built."""
    import pytest

    import bench
    from sambtcv.core.errors import PipelineError

    with pytest.raises(PipelineError, match="--stride-mm"):
        bench.main(["--sections", "stride", "--stride-mm", "0", "--work-dir", str(tmp_path / "work"),
                    "--results-dir", str(tmp_path / "res")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("read", ["-5", "0", "nan"])
def test_the_first_walk_section_refuses_a_reading_time_of_nothing_before_any_work(tmp_path, read):
    """--sections first_walk measures a box after VIEWER_READ_S s beside one sent at once: 0, a negative or a NaN
    time is refused before anything is built or written (-5 ran as a second box at once, labelled "after -5 s")."""
    import bench
    from sambtcv.core.errors import PipelineError

    with pytest.raises(PipelineError, match="--viewer-read-s must be (a number of seconds > 0|a finite number)"):
        bench.main(["--sections", "first_walk", "--viewer-read-s", read, "--work-dir", str(tmp_path / "work"),
                    "--results-dir", str(tmp_path / "res")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "res").exists()


@pytest.mark.slow  # two walks from a cold cache and a wait for the background
def test_first_walk_measures_what_reading_time_saves(litemedsam, raw_phantom, tmp_path):
    """bench.py's first box + P from opening: a box sent at once finds few slices encoded and its walk encodes; a box
    after the background has encoded the CT finds every slice ready and the walk makes no pass; the same masks."""
    from sambtcv.bench.viewer import first_walk
    from sambtcv.data.btcv import find_cases
    from sambtcv.engine.interactive import load_engine

    _, image, label = find_cases(raw_phantom)["val"][0]
    engine = load_engine(device="cpu", cache_dir=tmp_path / "unused", backbone=litemedsam, runtime="torch",
                         dtype="fp32", encoder_dtype="fp32")
    at_once = first_walk(engine, image, label, "liver", 0.0, tmp_path / "at_once")
    read = first_walk(engine, image, label, "liver", 15.0, tmp_path / "read")
    assert at_once["encoded_at_box"] < at_once["slices"] and at_once["walk_encoder_passes"] > 0
    assert read["encoded_at_box"] == read["slices"] and read["walk_encoder_passes"] == 0
    assert read["open_to_walk_s"] >= 15.0 > read["box_to_walk_s"]
    assert at_once["dsc"] == read["dsc"] > 0.5 and at_once["walk_visited"] == read["walk_visited"]
