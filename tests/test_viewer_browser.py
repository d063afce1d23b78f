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
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import ORGAN_ID
from sambtcv.core.prompts import bound_box
from sambtcv.data.btcv import find_cases
from sambtcv.data.phantom import write_phantom
from sambtcv.engine import interactive
from sambtcv.engine.volume import load_case
from sambtcv.servers.server import Settings, create_app
from sambtcv.servers.viewer_page import NIIVUE
from test_viewer_api import serve

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "results" / "figures" / "viewer.png"
SPLEEN = ORGAN_ID["spleen"]

pytestmark = [
    pytest.mark.slow,
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
    engine = interactive.load_engine(device="cpu", cache_dir=tmp_path / "cache", backbone=litemedsam, runtime="torch")
    app = create_app(Settings(image=image, background_slices=2), engine=engine)
    errors = []
    with serve(app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = _open_page(browser, base, errors)
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
            anchors = page.evaluate("viewer.state.status.organs.spleen.anchors")
            assert anchors[0]["slice"] == k and anchors[0]["box"] == [x0, y0, x1, y1]  # the box in the slice frame

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


UI_PIXEL = """p => { const c = document.getElementById('ui'), d = window.devicePixelRatio || 1;
    return Array.from(c.getContext('2d').getImageData(Math.round(p[0] * d), Math.round(p[1] * d), 1, 1).data); }"""


def _open_page(browser, base: str, errors: list):
    """The viewer's page, loaded and ready; its console errors and uncaught exceptions go to `errors`."""
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_function("window.viewer && viewer.state.ready && viewer.state.status", timeout=180_000)
    return page


def _drag(page, canvas, points):
    """A real mouse drag through the given CSS-pixel points of the canvas."""
    page.mouse.move(canvas["x"] + points[0][0], canvas["y"] + points[0][1])
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(canvas["x"] + p[0], canvas["y"] + p[1], steps=3)
    page.mouse.up()


def _labels(base: str, vid: str, n: int) -> np.ndarray:
    import httpx

    r = httpx.get(f"{base}/api/volumes/{vid}/labels.raw", params={"first": 0, "last": n - 1}, timeout=60)
    return np.frombuffer(r.content, np.uint8).reshape([int(v) for v in r.headers["X-Shape"].split(",")])


def test_clicks_brush_and_eraser_correct_in_the_browser(phantom_ct, litemedsam, mobilesam, tmp_path):
    """A box that leaks (the spleen's box grown by 12 px), a shift-click in the leak: the slice's mask
    shrinks and the box stays drawn; P; the brush paints missed voxels of a slice and the eraser removes
    wrong ones; Save: the saved map scores higher than the box and P alone, holds the painted voxels and
    not the erased ones; no console errors."""
    import httpx
    from playwright.sync_api import sync_playwright
    from scipy import ndimage

    image, label = phantom_ct
    ref = load_case("ref", image, label, (-160, 240)).label
    gt = ref == SPLEEN
    k = int(np.argmax(gt.sum(axis=(1, 2))))
    h, w = ref.shape[1:]
    b = bound_box(gt[k]).astype(int).tolist()
    box = [max(b[0] - 12, 0), max(b[1] - 12, 0), min(b[2] + 12, w - 1), min(b[3] + 12, h - 1)]
    engine = interactive.load_engine(device="cpu", cache_dir=tmp_path / "cache", backbone=litemedsam,
                                     point_backbone=mobilesam, runtime="torch")
    app = create_app(Settings(image=image, background_slices=2), engine=engine)
    errors = []
    with serve(app) as base, sync_playwright() as pw:
        # the box and P alone, through the API on a second copy of the CT: what the corrections must beat
        other = httpx.post(f"{base}/api/volumes", content=image.read_bytes(), timeout=120).json()["id"]
        httpx.post(f"{base}/api/volumes/{other}/organs/spleen/prompt", json={"slice": k, "box": box}, timeout=120)
        httpx.post(f"{base}/api/volumes/{other}/organs/spleen/propagate", json={}, timeout=600)
        box_alone = dice_score(_labels(base, other, len(ref)) == SPLEEN, gt)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = _open_page(browser, base, errors)
            vid = page.evaluate("viewer.state.vol.id")
            page.select_option("#organ", "spleen")
            page.evaluate("k => viewer.goToSlice(k)", k)
            page.wait_for_function(f"viewer.currentSlice() === {k}")
            canvas = page.locator("#gl").bounding_box()

            def screen(x, y, z=k):
                return page.evaluate("p => viewer.fileToScreen(p)", [float(x), float(y), int(z)])

            _drag(page, canvas, [screen(box[0], box[1]), screen((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                                 screen(box[2], box[3])])
            page.wait_for_function("viewer.state.status.organs.spleen", timeout=120_000)
            first = _labels(base, vid, len(ref))[k] == SPLEEN
            leak = first & ~gt[k]
            depth = ndimage.distance_transform_edt(leak)
            ly, lx = np.unravel_index(int(np.argmax(depth)), depth.shape)
            at = screen(lx, ly)
            page.keyboard.down("Shift")
            page.mouse.click(canvas["x"] + at[0], canvas["y"] + at[1])
            page.keyboard.up("Shift")
            page.wait_for_function("viewer.state.status.organs.spleen.anchors[0].points.length === 1",
                                   timeout=120_000)
            shrunk = _labels(base, vid, len(ref))[k] == SPLEEN
            assert shrunk.sum() < first.sum() and not shrunk[ly, lx]
            anchor = page.evaluate("viewer.state.status.organs.spleen.anchors[0]")
            assert anchor["box"] == [float(v) for v in box] and anchor["labels"] == [0]
            corner = screen(box[0] - 0.5, (box[1] + box[3]) / 2)  # the box's left edge, drawn over the CT
            pixel = page.evaluate(UI_PIXEL, corner)
            assert pixel[3] > 0 and pixel[1] > 150 and pixel[2] > 150 and pixel[0] < 100, pixel  # cyan: the box

            page.keyboard.press("p")
            page.wait_for_function("viewer.state.status.organs.spleen.propagated && !viewer.state.walking",
                                   timeout=600_000)
            walked = _labels(base, vid, len(ref)) == SPLEEN
            # the brush: the slice (other than k) with the most missed spleen voxels; the eraser: the most wrong ones
            missed = (gt & ~walked).sum(axis=(1, 2))
            missed[k] = -1
            j = int(np.argmax(missed))
            my, mx = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(gt[j] & ~walked[j]))), gt[j].shape)
            page.evaluate("k => viewer.goToSlice(k)", j)
            page.wait_for_function(f"viewer.currentSlice() === {j}")
            page.fill("#pen-size", "2")
            page.focus("#gl")  # keys go to the page, not the size box
            page.keyboard.press("b")
            assert page.evaluate("viewer.state.tool") == "brush"
            _drag(page, canvas, [screen(mx, my, j), screen(mx + 0.4, my + 0.4, j)])
            page.wait_for_function(f"viewer.state.status.organs.spleen.anchors.some(a => a.slice === {j})",
                                   timeout=60_000)
            wrong = (walked & ~gt).sum(axis=(1, 2))
            wrong[[k, j]] = -1
            e = int(np.argmax(wrong))
            ey, ex = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(walked[e] & ~gt[e]))), gt[e].shape)
            page.evaluate("k => viewer.goToSlice(k)", e)
            page.wait_for_function(f"viewer.currentSlice() === {e}")
            page.keyboard.press("e")
            assert page.evaluate("viewer.state.tool") == "eraser"
            _drag(page, canvas, [screen(ex, ey, e), screen(ex + 0.4, ey + 0.4, e)])
            page.wait_for_function(f"viewer.state.status.organs.spleen.anchors.some(a => a.slice === {e})",
                                   timeout=60_000)
            page.keyboard.press("a")
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            anchors = page.evaluate("viewer.state.status.organs.spleen.anchors.map(a => [a.slice, a.given])")
            assert [j, "painted"] in anchors and [e, "painted"] in anchors
            with page.expect_download(timeout=60_000) as download:
                page.click("#save")
            saved = tmp_path / "corrected.nii.gz"
            download.value.save_as(saved)
        finally:
            browser.close()
    got, src = nib.load(str(saved)), nib.load(str(image))
    assert got.shape == src.shape and np.array_equal(got.affine, src.affine)
    pred = np.asarray(got.dataobj) == SPLEEN
    stack = np.stack([pred[:, :, z].T for z in range(pred.shape[2])])  # the phantom is stored in the slice frame
    assert stack[j, my, mx] and not stack[e, ey, ex]  # the painted voxel is there, the erased one gone
    assert dice_score(pred, np.asarray(nib.load(str(label)).dataobj) == SPLEEN) > box_alone
    assert not errors, errors
