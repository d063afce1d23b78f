"""The viewer the way a person uses it: Debian's chromium (headless, software WebGL2) driven by Playwright
with real mouse events, on the real server (uvicorn) with the viewer's embedded default CT (the
phantom's validation volume): pick the spleen, drag a box on its largest slice, propagate, save; the
downloaded label map scores Dice >= 0.9 against the phantom's label, the page logged no JavaScript
error, and a screenshot goes to results/figures/viewer.png."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import viewer
from conftest import ROOT
from sambtcv import interactive
from sambtcv.data import find_cases
from sambtcv.metrics import dice_score
from sambtcv.names import ORGAN_ID
from sambtcv.phantom import write_phantom
from sambtcv.prompts import bound_box
from sambtcv.server import NIIVUE, Settings, create_app
from sambtcv.volume import load_case
from test_viewer_api import serve

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "results" / "figures" / "viewer.png"
SPLEEN = ORGAN_ID["spleen"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM} (Debian's chromium; .ci/run installs it)"),
    pytest.mark.skipif(not (ROOT / "web" / NIIVUE).is_file(),
                       reason="web/node_modules is absent (./run.sh installs NiiVue with npm ci)"),
]


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    """The viewer's embedded default: the quick report's phantom, its validation CT and label."""
    raw = tmp_path_factory.mktemp("phantom")
    write_phantom(raw, viewer.PHANTOM["n"], viewer.PHANTOM["seed"], shape=viewer.PHANTOM["shape"])
    _, image, label = find_cases(raw)["val"][0]
    return image, label


def test_box_propagate_save_in_the_browser(phantom_ct, litemedsam, tmp_path):
    from playwright.sync_api import sync_playwright

    image, label = phantom_ct
    ref = load_case("ref", image, label, (-160, 240)).label
    k = int(np.argmax((ref == SPLEEN).sum(axis=(1, 2))))
    x0, y0, x1, y1 = bound_box(ref[k] == SPLEEN).astype(int).tolist()
    engine = interactive.load_engine(device="cpu", cache_dir=tmp_path / "cache", backbone=litemedsam)
    app = create_app(Settings(image=image, background_slices=2), engine=engine)
    errors = []
    with serve(app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_function("window.viewer && viewer.state.ready && viewer.state.status", timeout=180_000)
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()

            page.select_option("#organ", "spleen")
            page.evaluate("k => viewer.goToSlice(k)", k)
            page.wait_for_function(f"viewer.currentSlice() === {k}")
            canvas = page.locator("#gl").bounding_box()
            start = page.evaluate("p => viewer.fileToScreen(p)", [x0, y0, k])
            end = page.evaluate("p => viewer.fileToScreen(p)", [x1, y1, k])
            page.mouse.move(canvas["x"] + start[0], canvas["y"] + start[1])
            page.mouse.down()
            page.mouse.move(canvas["x"] + (start[0] + end[0]) / 2, canvas["y"] + (start[1] + end[1]) / 2, steps=4)
            page.mouse.move(canvas["x"] + end[0], canvas["y"] + end[1], steps=4)
            page.mouse.up()
            page.wait_for_function("viewer.state.status.organs.spleen", timeout=120_000)
            assert page.evaluate("viewer.state.prompt.box") == [x0, y0, x1, y1]  # the box in the slice frame

            page.click("#propagate")
            page.wait_for_function("viewer.state.status.organs.spleen.propagated && !viewer.state.walking",
                                   timeout=600_000)
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            with page.expect_download(timeout=60_000) as download:
                page.click("#save")
            saved = tmp_path / "labels.nii.gz"
            download.value.save_as(saved)
            drawn = page.evaluate("viewer.nv.drawBitmap.reduce((n, v) => n + (v === %d), 0)" % SPLEEN)

            page.wait_for_function("document.getElementById('progress').hidden")  # Save's step has ended
            assert not page.locator("#progress").is_visible()  # and its progress line is gone from the page
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.mouse.move(2, 2)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
    got, src = nib.load(str(saved)), nib.load(str(image))
    assert got.shape == src.shape and np.array_equal(got.affine, src.affine)
    pred = np.asarray(got.dataobj) == SPLEEN
    dice = dice_score(pred, np.asarray(nib.load(str(label)).dataobj) == SPLEEN)
    assert dice >= 0.9, dice
    assert drawn == pred.sum()  # the page showed what it saved
    assert not errors, errors
    assert SCREENSHOT.stat().st_size > 10_000
