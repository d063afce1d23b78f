"""Prompts, Dice, configuration and safe writes."""
import cv2
import numpy as np
import pytest

from sambtcv.cli import parse_config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import staged_dir
from utils import (
    BOX_MARGIN,
    DiceTable,
    bound_box,
    central_point,
    dice_score,
    larger_box,
    make_prompt,
    prompt_rng,
    prompt_types_arg,
    random_points,
)


def l_shape(h=60, w=80):
    mask = np.zeros((h, w), np.uint8)
    mask[10:50, 10:25] = 1
    mask[35:50, 10:70] = 1
    return mask


def test_central_point_is_distance_transform_argmax_and_inside():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:31, 20:41] = 1  # 21 x 21 square: its centre is (30, 20)
    assert central_point(mask).tolist() == [[30.0, 20.0]]
    m = l_shape()
    (x, y), = central_point(m).astype(int)
    assert m[y, x] == 1
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    assert dist[y, x] == dist.max()


def test_central_point_treats_image_border_as_background():
    mask = np.zeros((30, 30), np.uint8)
    mask[:, :10] = 1  # touches the left border: the centre must be ~5 px in, not at column 0
    (x, _y), = central_point(mask)
    assert 3 <= x <= 6


def test_random_points_inside_and_deterministic_whatever_the_order():
    m = l_shape()
    a = random_points(m, 3, prompt_rng(0, "img0001", 5, 6, "three_random_points"))
    _ = random_points(m, 3, prompt_rng(0, "img0001", 6, 6, "three_random_points"))  # another slice first
    b = random_points(m, 3, prompt_rng(0, "img0001", 5, 6, "three_random_points"))
    assert np.array_equal(a, b)
    assert all(m[int(y), int(x)] for x, y in a)
    assert len({tuple(p) for p in a.tolist()}) == 3  # drawn without replacement
    c = random_points(m, 3, prompt_rng(1, "img0001", 5, 6, "three_random_points"))
    assert not np.array_equal(a, c)
    d = random_points(m, 3, prompt_rng(0, "img0001", 5, 6, "three_random_points", epoch=1))
    assert not np.array_equal(a, d)


def test_boxes_tight_margin_and_clipped():
    m = l_shape()
    assert bound_box(m).tolist() == [10, 10, 69, 49]
    assert larger_box(m).tolist() == [10 - BOX_MARGIN, 10 - BOX_MARGIN, 69 + BOX_MARGIN, 49 + BOX_MARGIN]
    edge = np.zeros((20, 20), np.uint8)
    edge[0:3, 15:20] = 1
    assert larger_box(edge).tolist() == [10, 0, 19, 7]


def test_make_prompt_kinds_and_unknown():
    m = l_shape()
    rng = prompt_rng(0, "c", 0, 1, "one_random_point")
    assert make_prompt(m, "one_random_point", rng).points.shape == (1, 2)
    assert make_prompt(m, "bound_box", rng).points is None
    with pytest.raises(PipelineError):
        make_prompt(m, "two_points", rng)
    assert prompt_types_arg("all")[0] == "one_central_point"
    assert prompt_types_arg("larger_box,bound_box") == ["bound_box", "larger_box"]
    with pytest.raises(PipelineError):
        prompt_types_arg("nope")


def test_dice_edge_cases():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    assert dice_score(a, b) == 1.0
    b[1, 1] = True
    assert dice_score(a, b) == 0.0
    a[1, 1] = True
    assert dice_score(a, b) == 1.0
    a[1, 2] = True
    assert dice_score(a, b) == pytest.approx(2 / 3)


def test_dice_table_slice_and_volume_means():
    t = DiceTable()
    gt = np.zeros((4, 4), bool)
    gt[:2] = True  # 8 px
    half = np.zeros((4, 4), bool)
    half[0] = True  # 4 px inside gt: Dice 2*4/12
    t.add("bound_box", 6, "c1", gt, gt)
    t.add("bound_box", 6, "c1", half, gt)
    t.add("bound_box", 8, "c1", np.zeros((4, 4), bool), gt)
    per = t.per_organ()["bound_box"]
    assert per["liver"] == pytest.approx((1 + 8 / 12) / 2)
    assert per["aorta"] == 0.0
    assert t.mdice()["bound_box"] == pytest.approx(((1 + 8 / 12) / 2 + 0) / 2)
    # volume Dice: liver stacked = 2*(8+4)/(12+16)
    assert t.volume_dice()["bound_box"]["liver"] == pytest.approx(24 / 28)


SCRIPT = """
OUTSIDE = 1  # not a flag: outside the block
# ------------------------------------------------------------ config
A_NUMBER = 3  # how many (>= 1)
RESUME = False  # continue
NAME = None  # a name with a '#' in "quotes"
LR = 0.1  # learning rate
# ------------------------------------------------------------
LATER = 2
"""


def _script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    return {"__file__": str(script), "OUTSIDE": 1, "A_NUMBER": 3, "RESUME": False, "NAME": None, "LR": 0.1, "LATER": 2}


def test_parse_config_flags_come_from_the_block_only(tmp_path):
    g = _script(tmp_path)
    cfg = parse_config(g, ["--a-number", "5", "--resume", "--lr", "1e-3"])
    assert cfg == {"a_number": 5, "resume": True, "name": None, "lr": 1e-3, "profile": ""}  # + every page's --profile
    assert parse_config(g, ["--resume", "false"])["resume"] is False
    assert parse_config(g, [], defaults={"a_number": 7})["a_number"] == 7  # a new default ...
    assert parse_config(g, ["--a-number", "3"], defaults={"a_number": 7})["a_number"] == 3  # ... a given flag wins
    for argv in (["--outside", "2"], ["--later", "1"], ["--a-num", "5"]):  # not in the block; no abbreviations
        with pytest.raises(SystemExit):
            parse_config(g, argv)


def test_parse_config_help_shows_comments_and_bounds_are_checked(tmp_path, capsys):
    g = _script(tmp_path)
    with pytest.raises(SystemExit):
        parse_config(g, ["--help"])
    out = capsys.readouterr().out
    assert "how many (>= 1)" in out and "learning rate" in out and "a '#' in \"quotes\"" in out
    with pytest.raises(PipelineError, match="--a-number must be >= 1, got 0"):
        parse_config(g, ["--a-number", "0"])
    for value in ("nan", "inf", "-inf"):  # a NaN passes every `<` bound; no float flag means it
        with pytest.raises(PipelineError, match="--lr must be a finite number"):
            parse_config(g, [f"--lr={value}"])


def test_staged_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(final, "marker") as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(final, "marker") as tmp:
        (tmp / "a").write_text("x")
    assert (final / "a").read_text() == "x"
