"""The viewer's HTTP API (sambtcv.servers.server over sambtcv.engine.interactive) with FastAPI's TestClient on the tiny
phantom, LiteMedSAM: upload, box -> mask, propagate, labels.nii.gz as segment_volume.py writes it, a
correction, undo, erase, a reference label, bad inputs (one-line 4xx), 409 while a volume propagates,
a client that leaves mid-walk, and viewer.py's checks before it serves."""
from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time

import nibabel as nib
import numpy as np
import pytest

import viewer
from conftest import fails, serve, wait_for
from sambtcv import cli
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import ORGAN_ID
from sambtcv.core.prompts import bound_box
from sambtcv.data.btcv import find_cases
from sambtcv.data.prompts_file import loads, parse_prompts
from sambtcv.engine import editor, interactive
from sambtcv.engine.propagation import merge
from sambtcv.engine.volume import case_prompt, load_case, segment, write_label_map
from sambtcv.models.loading import Loaded
from sambtcv.servers import sessions
from sambtcv.servers.server import Settings, create_app

BASE = "http://127.0.0.1"  # the Host the server accepts (it refuses others)
SPLEEN = ORGAN_ID["spleen"]


@pytest.fixture(scope="module")
def ct(raw_phantom):
    """(image path, label path, reference label stack in the slice frame) of the phantom's validation CT."""
    _, image, label = find_cases(raw_phantom)["val"][0]
    return image, label, load_case("ref", image, label, (-160, 240)).label


@pytest.fixture(scope="module")
def engine(litemedsam, tmp_path_factory):
    return interactive.load_engine(device="cpu", cache_dir=tmp_path_factory.mktemp("viewer") / "cache",
                                   backbone=litemedsam)


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(background_slices=2, max_upload_mb=2), engine=engine), base_url=BASE) as c:
        yield c


def upload(client, data: bytes) -> str:
    r = client.post("/api/volumes", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def largest(ref, organ):
    k = int(np.argmax((ref == organ).sum(axis=(1, 2))))
    return k, bound_box(ref[k] == organ).astype(int).tolist()


def labels_of(client, vid) -> nib.Nifti1Image:
    r = client.get(f"/api/volumes/{vid}/labels.nii.gz")
    assert r.status_code == 200, r.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(r.content))


def raw_slices(client, vid, first, last) -> np.ndarray:
    r = client.get(f"/api/volumes/{vid}/labels.raw", params={"first": first, "last": last})
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.uint8).reshape([int(v) for v in r.headers["X-Shape"].split(",")])


def one_line_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and body["error"], body
    text = body["error"]
    assert "\n" not in text and "Traceback" not in text and "sam-btcv-viewer-" not in text, text
    return text


def test_box_propagate_and_save_match_segment_volume(client, ct, tmp_path):
    """The same box gives the same label map (and so the same Dice) as segment_volume.py, on the input's
    exact grid; the mask comes back as run lengths; the served CT is the slice frame's volume."""
    image, label, ref = ct
    vid = upload(client, image.read_bytes())
    info = client.get(f"/api/volumes/{vid}").json()
    assert info["shape"] == list(ref.shape) and len(info["spacing"]) == 3
    k, box = largest(ref, SPLEEN)
    r = client.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["slice"] == k and p["area"] > 20 and 0 < p["iou"] <= 1.5 and p["seconds"] >= 0 and p["changed"] == [k, k]
    mask = sessions.unrle(p["mask"]["counts"], p["mask"]["shape"])
    assert mask.sum() == p["area"] and dice_score(mask, ref[k] == SPLEEN) > 0.8
    assert (raw_slices(client, vid, k, k)[0] == SPLEEN).sum() == p["area"]
    r = client.post(f"/api/volumes/{vid}/organs/spleen/propagate", json={})
    assert r.status_code == 200, r.text
    w = r.json()
    assert w["slices"][0] <= k <= w["slices"][1] and w["voxels"] > p["area"] and w["encoder_passes"] <= w["visited"]
    assert {s["direction"] for s in w["stops"]} == {"superior", "inferior"}

    got = labels_of(client, vid)
    src = nib.load(str(image))
    assert got.shape == src.shape and np.array_equal(got.affine, src.affine) and got.get_data_dtype() == np.uint8
    # segment_volume.py's own path (segment_image: case_prompt, segment, merge, write_label_map), same prompt
    engine = client.app.state.sessions.engine
    case = load_case(image.name, image, None, engine.window)
    spec = parse_prompts(loads(json.dumps({"spleen": {"slice": k, "box": box}})))
    models = Loaded(engine.backbone, engine.decoder, engine.runtime)
    dec = cli.volume_decoder(case, models, {
        "cache_dir": engine.cache_dir, "dtype": engine.dtype, "encoder_dtype": engine.encoder_dtype}, engine.device)
    walk = cli.walk_settings({"stop": "intensity", "margin_mm": "auto", "model": "litemedsam"})
    labels = merge(segment(dec, [case_prompt(sp, case) for sp in spec], walk, case.geometry), case.stack.shape)
    out = write_label_map(labels, case, tmp_path / "sv.nii.gz")
    theirs, ours = np.asarray(nib.load(str(out)).dataobj), np.asarray(got.dataobj)
    gt = np.asarray(nib.load(str(label)).dataobj) == SPLEEN
    assert np.array_equal(ours, theirs)
    assert dice_score(ours == SPLEEN, gt) == dice_score(theirs == SPLEEN, gt) > 0.8

    # the served CT: the file reoriented to the slice frame's axes (the phantom is stored so already)
    served = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/api/volumes/{vid}/image.nii.gz").content))
    assert np.array_equal(np.asarray(served.dataobj), np.asarray(src.dataobj))
    assert nib.aff2axcodes(served.affine) == ("L", "P", "S")


def test_any_stored_orientation_round_trips(client, ct, tmp_path):
    """A CT stored RAS: the page gets it in the slice frame's axes (same voxels as the LPS original), the
    label map comes back in the RAS file's own shape and affine."""
    image, label, ref = ct
    src = nib.load(str(image))
    ras = src.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(src.affine),
                                                            nib.orientations.axcodes2ornt(("R", "A", "S"))))
    vid = upload(client, gzip.compress(ras.to_bytes()))
    served = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/api/volumes/{vid}/image.nii.gz").content))
    assert np.array_equal(np.asarray(served.dataobj), np.asarray(src.dataobj))
    assert np.allclose(served.affine, src.affine)
    k, box = largest(ref, SPLEEN)
    assert client.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box}).status_code == 200
    got = labels_of(client, vid)
    assert got.shape == ras.shape and np.allclose(got.affine, ras.affine)
    back = nib.Nifti1Image(np.asarray(got.dataobj), got.affine).as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(got.affine), nib.io_orientation(src.affine)))
    assert (np.asarray(back.dataobj)[:, :, k].T == SPLEEN).sum() > 20  # slice k of the slice frame
    assert client.delete(f"/api/volumes/{vid}").status_code == 200
    one_line_error(client.get(f"/api/volumes/{vid}"), 404)


def test_correction_undo_erase(client, ct):
    """Spoil a slice beyond the prompted one, propagate (the walk goes on from the bad mask), correct it
    with the right box: its Dice rises, and the walk from it stops at the first prompted slice (an anchor),
    so the slices on that side stay as they were. Undo walks back step by step; erase removes the organ
    and undo brings it back."""
    image, _, ref = ct
    vid = upload(client, image.read_bytes())
    k, box = largest(ref, SPLEEN)
    spleen_slices = np.flatnonzero((ref == SPLEEN).any(axis=(1, 2)))
    c = k + 1 if k + 1 in spleen_slices else k - 1
    assert c in spleen_slices
    url = f"/api/volumes/{vid}/organs/spleen"
    client.post(f"{url}/prompt", json={"slice": k, "box": box})
    client.post(f"{url}/propagate", json={})
    good = raw_slices(client, vid, 0, len(ref) - 1)
    h, w = ref.shape[1:]
    wrong = [0, 0, w // 4, h // 4]  # a corner of the image: not the spleen
    r = client.post(f"{url}/prompt", json={"slice": c, "box": wrong}).json()
    assert r["propagated"] is True  # a correction of a walked organ
    client.post(f"{url}/propagate", json={})
    spoiled = raw_slices(client, vid, 0, len(ref) - 1)
    d_spoiled = dice_score(spoiled[c] == SPLEEN, ref[c] == SPLEEN)
    status = client.get(f"/api/volumes/{vid}").json()["organs"]["spleen"]
    assert [a["slice"] for a in status["anchors"]] == sorted([k, c]) and status["pending"] is None
    assert {a["given"] for a in status["anchors"]} == {"box"}
    r = client.post(f"{url}/prompt", json={"slice": c, "box": bound_box(ref[c] == SPLEEN).astype(int).tolist()})
    assert r.status_code == 200 and client.get(f"/api/volumes/{vid}").json()["organs"]["spleen"]["pending"] == c
    w_ = client.post(f"{url}/propagate", json={}).json()
    assert {"reason": "anchor", "slice": c, "direction": "inferior" if c > k else "superior",
            "at_volume_edge": c in (0, len(ref) - 1)} in w_["stops"]
    fixed = raw_slices(client, vid, 0, len(ref) - 1)
    assert dice_score(fixed[c] == SPLEEN, ref[c] == SPLEEN) > d_spoiled + 0.3
    side = [j for j in range(len(ref)) if (j - c) * (c - k) < 0]  # the prompted side of c
    assert np.array_equal(fixed[side], spoiled[side]) and np.array_equal(fixed[side], good[side])

    others = [j for j in range(len(ref)) if j != c]
    for expected, exact in ((spoiled, False), (spoiled, True), (good, False), (good, True)):
        r = client.post(f"/api/volumes/{vid}/undo")  # the correcting walk, its prompt, the spoiling walk, its prompt
        assert r.status_code == 200, r.text
        now = raw_slices(client, vid, 0, len(ref) - 1)
        assert np.array_equal(now, expected) if exact else np.array_equal(now[others], expected[others])
    r = client.delete(url)
    assert r.status_code == 200 and not raw_slices(client, vid, 0, len(ref) - 1).any()
    assert "spleen" not in client.get(f"/api/volumes/{vid}").json()["organs"]
    client.post(f"/api/volumes/{vid}/undo")
    assert np.array_equal(raw_slices(client, vid, 0, len(ref) - 1), good)


def test_point_candidates_and_reference(client, ct):
    """A point gives SAM's three candidates, the one the point rule keeps (the smallest) first chosen;
    another can be chosen. A reference label opens for editing (Dice 1) or only scores (edit=0)."""
    image, label, ref = ct
    vid = upload(client, image.read_bytes())
    k, box = largest(ref, SPLEEN)
    point = [(box[0] + box[2]) // 2, (box[1] + box[3]) // 2]
    p = client.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "points": [point]}).json()
    assert len(p["candidates"]) == 3
    assert p["candidate"] == int(np.argmin([c["area"] for c in p["candidates"]]))
    other = (p["candidate"] + 1) % 3
    r = client.post(f"/api/volumes/{vid}/organs/spleen/candidate", json={"index": other})
    assert r.status_code == 200 and r.json()["area"] == p["candidates"][other]["area"]
    assert (raw_slices(client, vid, k, k)[0] == SPLEEN).sum() == p["candidates"][other]["area"]

    data = label.read_bytes()
    r = client.post(f"/api/volumes/{vid}/reference", params={"edit": "false"}, content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    dice = client.get(f"/api/volumes/{vid}").json()["dice"]
    assert set(dice) >= {"liver", "spleen"} and dice["liver"] == 0.0
    r = client.post(f"/api/volumes/{vid}/reference", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    dice = client.get(f"/api/volumes/{vid}").json()["dice"]
    assert all(v == 1.0 for v in dice.values()), dice
    assert np.array_equal(np.asarray(labels_of(client, vid).dataobj), np.asarray(nib.load(str(label)).dataobj))
    wrong = nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4))
    text = one_line_error(client.post(f"/api/volumes/{vid}/reference", content=wrong.to_bytes(),
                                      headers={"Content-Type": "application/octet-stream"}), 422)
    assert "shape" in text


def test_started_volume_label_and_save_to_out(engine, ct, tmp_path):
    """--image with --label: the page's volume opens with the label's organs (Dice 1); Save writes --out
    (only for that volume), the same map labels.nii.gz serves."""
    from fastapi.testclient import TestClient

    image, label, ref = ct
    out = tmp_path / "out" / "pred.nii"
    settings = Settings(image=image, label=label, out=out, background_slices=0)
    with TestClient(create_app(settings, engine=engine), base_url=BASE) as c:
        vid = c.get("/api/config").json()["volume"]
        st = c.get(f"/api/volumes/{vid}").json()
        assert st["reference"] and set(st["dice"].values()) == {1.0} and st["organs"]["liver"]["from_reference"]
        k, box = largest(ref, SPLEEN)
        assert c.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box}).status_code == 200
        r = c.post(f"/api/volumes/{vid}/save")
        assert r.status_code == 200 and r.json()["written"] == str(out)
        written = nib.load(str(out))  # .nii: uncompressed, as its name says
        assert out.read_bytes()[:2] != b"\x1f\x8b"
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(labels_of(c, vid).dataobj))
        other = upload(c, image.read_bytes())
        one_line_error(c.post(f"/api/volumes/{other}/save"), 409)


def _nifti(data, affine=None) -> bytes:
    """NIfTI bytes; `affine` goes into the sform as given (even one nibabel would not build an image of)."""
    if affine is None:
        return nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.5, 1])).to_bytes()
    header = nib.Nifti1Image(data, np.eye(4)).header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    return nib.Nifti1Image(data, None, header=header).to_bytes()


@pytest.mark.parametrize("data,status,needle", [
    (b"", 422, "empty"),
    (b"hello, not a volume", 422, "cannot read"),
    (gzip.compress(b"\0" * 400), 422, "cannot read"),
    (_nifti(np.zeros((8, 8, 4, 2), np.int16)), 422, "not a 3D volume"),
    (_nifti(np.full((8, 8, 4), np.nan, np.float32)), 422, "NaN"),
    (_nifti(np.zeros((8, 8, 4), np.int16), np.diag([1.0, 1.0, 0.0, 1])), 422, "voxel sizes"),
    (_nifti(np.zeros((8, 8, 4), np.int16), np.diag([1.0, 1.0, 1e6, 1])), 422, "voxel sizes"),
    (b"\0" * (3 * 2 ** 20), 413, "more than this server takes"),
], ids=["empty", "not-nifti", "gzip-not-nifti", "4d", "nan", "zero-spacing", "huge-spacing", "too-large"])
def test_bad_uploads_are_one_line_4xx(client, data, status, needle):
    r = client.post("/api/volumes", content=data, headers={"Content-Type": "application/octet-stream"})
    assert needle in one_line_error(r, status)
    assert client.get("/api/config").status_code == 200  # still serving


def test_bad_requests_are_one_line_4xx(client, ct):
    image, _, ref = ct
    vid = upload(client, image.read_bytes())
    k, box = largest(ref, SPLEEN)
    url = f"/api/volumes/{vid}/organs/spleen"
    cases = [
        (client.post(f"/api/volumes/{'0' * 32}/organs/spleen/prompt", json={"slice": k, "box": box}), 404, "no volume"),
        (client.post("/api/volumes/..%2F..%2Fetc/organs/spleen/prompt", json={"slice": k, "box": box}), 404, ""),
        (client.get("/api/volumes/not-an-id"), 404, "no volume"),
        (client.post(f"/api/volumes/{vid}/organs/brain/prompt", json={"slice": k, "box": box}), 404, "unknown organ"),
        (client.post(f"{url}/prompt", json={"slice": k, "box": box[:3]}), 422, "list of 4"),
        (client.post(f"{url}/prompt", json={"slice": k, "box": [5, 5, 5, 20]}), 422, "zero size"),
        (client.post(f"{url}/prompt", json={"slice": 999, "box": box}), 422, "must be a slice index"),
        (client.post(f"{url}/prompt", json={"slice": True, "box": box}), 422, "whole number"),
        (client.post(f"{url}/prompt", json={"slice": k, "points": [[5, 5]], "lables": [1]}), 422, "unknown key"),
        (client.post(f"{url}/prompt", json={"slice": k, "points": [[5, 5]], "labels": [0]}), 422, "organ point"),
        (client.post(f"{url}/prompt", json={"slice": k, "box": box, "mode": "replace"}), 422, "mode"),
        (client.post(f"{url}/prompt", json={"slice": k, "box": box, "labels": [1]}), 422, "goes with 'points'"),
        (client.post(f"{url}/prompt", json={"box3d": [0, 0, 0, 5, 5, 5]}), 422, "unknown key 'box3d'"),
        (client.post(f"{url}/paint", json={"slice": k, "mask": {"counts": [1, 2]}}), 422, "add up to 3"),
        (client.post(f"{url}/paint", json={"slice": k, "mask": {"counts": [-1]}}), 422, ">= 0"),
        (client.post(f"{url}/paint", json={"slice": k}), 422, "send {"),
        (client.delete(f"{url}/slices/999"), 422, "slice must be"),
        (client.post(f"{url}/prompt", content='{"slice": NaN, "box": [1, 2, 3, 4]}',
                     headers={"Content-Type": "application/json"}), 400, "NaN"),
        (client.post(f"{url}/prompt", content="{", headers={"Content-Type": "application/json"}), 400,
         "not valid JSON"),
        (client.post(f"{url}/prompt", content=json.dumps({"slice": k, "box": box}),
                     headers={"Content-Type": "text/plain"}), 415, "JSON"),
        (client.post(f"{url}/propagate", json={}), 422, "no mask yet"),
        (client.post(f"{url}/propagate", json={"organ": "liver"}), 422, "no fields"),
        (client.post(f"{url}/candidate", json={"index": 1}), 422, "no points prompt"),
        (client.get(f"/api/volumes/{vid}/labels.raw", params={"first": 5, "last": 2}), 422, "not inside"),
        (client.get(f"/api/volumes/{vid}/labels.raw", params={"first": "x"}), 422, "first"),
        (client.post(f"/api/volumes/{vid}/undo"), 422, "nothing to undo"),
        (client.post(f"/api/volumes/{vid}/save"), 409, "writes no file"),
        (client.put(f"/api/volumes/{vid}/focus", json={"slice": -1}), 422, "slice"),
        (client.get("/../sambtcv/servers/server.py"), 404, ""),
        (client.get("/web/app.js"), 404, ""),
        (client.delete("/api/volumes"), 405, ""),
        (client.get("/api/config", headers={"Host": "evil.example:8765"}), 400, "answers only"),
    ]
    for r, status, needle in cases:
        assert needle in one_line_error(r, status), (status, needle)
    r = client.post(f"{url}/prompt", json={"slice": k, "box": box})
    assert r.status_code == 200  # still serving, the volume intact
    assert client.post(f"{url}/candidate", json={"index": 5}).status_code == 422


def test_static_files(client):
    assert "<canvas" in client.get("/").text and client.get("/app.js").status_code == 200
    assert client.get("/style.css").status_code == 200
    niivue = client.get("/node_modules/@niivue/niivue/dist/index.js")
    assert niivue.status_code in (200, 404)
    if niivue.status_code == 404:
        assert "run.sh" in niivue.json()["error"]
    assert client.get("/node_modules/@niivue/niivue/package.json").status_code == 404


@contextlib.contextmanager
def held_walks(monkeypatch):
    """Walks wait for the returned event before they start (a long propagation, on demand)."""
    gate = threading.Event()
    real = editor.walk

    def slow(*args, **kwargs):
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(editor, "walk", slow)
    try:
        yield gate
    finally:
        gate.set()


def test_changes_while_propagating_get_409_and_other_volumes_go_on(client, ct, monkeypatch):
    image, _, ref = ct
    vid, other = upload(client, image.read_bytes()), upload(client, image.read_bytes())
    k, box = largest(ref, SPLEEN)
    for v in (vid, other):
        client.post(f"/api/volumes/{v}/organs/spleen/prompt", json={"slice": k, "box": box})
    with held_walks(monkeypatch) as gate:
        answer = {}
        walker = threading.Thread(target=lambda: answer.setdefault(
            "r", client.post(f"/api/volumes/{vid}/organs/spleen/propagate", json={})))
        walker.start()
        wait_for(lambda: (client.get(f"/api/volumes/{vid}").json()["job"] or {}).get("running"))
        url = f"/api/volumes/{vid}/organs"
        for r in (client.post(f"{url}/spleen/prompt", json={"slice": k, "box": box}),
                  client.post(f"{url}/liver/prompt", json={"slice": k, "box": box}),
                  client.post(f"{url}/spleen/propagate", json={}), client.delete(f"{url}/spleen"),
                  client.post(f"/api/volumes/{vid}/undo"), client.delete(f"/api/volumes/{vid}")):
            assert "being propagated" in one_line_error(r, 409)
        assert client.get(f"/api/volumes/{vid}/labels.nii.gz").status_code == 200  # reads go on
        r = client.post(f"/api/volumes/{other}/organs/liver/prompt", json={"slice": k, "box": box})
        assert r.status_code == 200  # another volume is not blocked
        gate.set()
        walker.join(120)
    assert answer["r"].status_code == 200 and answer["r"].json()["voxels"] > 0


@pytest.fixture
def fresh_engine(litemedsam, tmp_path):
    """An engine of its own, with an empty embedding cache under tmp_path / "cache"."""
    return interactive.load_engine(device="cpu", cache_dir=tmp_path / "cache", backbone=litemedsam)


def encoded_and_boxed(c, ct) -> str:
    """The phantom CT uploaded, encoded whole by the background, then its spleen boxed on its largest slice."""
    image, _, ref = ct
    vid = upload(c, image.read_bytes())
    wait_for(lambda: c.get(f"/api/volumes/{vid}").json()["encoded"] == len(ref))
    k, box = largest(ref, SPLEEN)
    c.post(f"/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box})
    return vid


def test_background_encodes_from_opening_nearest_the_slice_in_view_first(fresh_engine, ct, tmp_path):
    """From the moment a CT opens, before any prompt, the slices nearest the middle one (what the page shows
    first) are encoded while the volume is idle; moving the focus moves where it encodes next (once each)."""
    from fastapi.testclient import TestClient

    image, _, ref = ct
    mid = len(ref) // 2
    with TestClient(create_app(Settings(background_slices=1), engine=fresh_engine), base_url=BASE) as c:
        vid = upload(c, image.read_bytes())
        wait_for(lambda: c.get(f"/api/volumes/{vid}").json()["encoded"] == 3)  # mid - 1, mid, mid + 1
        assert c.put(f"/api/volumes/{vid}/focus", json={"slice": 0}).status_code == 200
        wait_for(lambda: c.get(f"/api/volumes/{vid}").json()["encoded"] == len({mid - 1, mid, mid + 1, 0, 1}))
    assert len(list((tmp_path / "cache").rglob("slices.npy"))) == 1  # one cache, each slice once


def test_a_walk_after_the_background_finished_makes_no_encoder_pass(fresh_engine, ct):
    """With every slice in reach (the viewer's default), an idle CT is encoded whole before the user's box: the
    walk then only decodes."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(), engine=fresh_engine), base_url=BASE) as c:
        vid = encoded_and_boxed(c, ct)
        w = c.post(f"/api/volumes/{vid}/organs/spleen/propagate", json={}).json()
        assert w["visited"] > 1 and w["encoder_passes"] == 0


@pytest.mark.slow  # a held walk and a 3 s watch
def test_the_background_waits_while_any_walk_runs(fresh_engine, ct, tmp_path, monkeypatch):
    """A walk on one CT has the models to itself: the background encodes no other CT meanwhile (it once filled
    the walk's gaps between slices with another volume's, and a walk on a 512 x 512 CT took 8 s longer), and
    goes on once the walk ends."""
    from fastapi.testclient import TestClient

    image, _, ref = ct
    nii = nib.load(str(image))
    other = tmp_path / "other.nii.gz"  # another CT (other content, so another cache)
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj) + 1, nii.affine, nii.header), str(other))
    with TestClient(create_app(Settings(), engine=fresh_engine), base_url=BASE) as c:
        vid = encoded_and_boxed(c, ct)
        with held_walks(monkeypatch) as gate:
            walker = threading.Thread(target=lambda: c.post(f"/api/volumes/{vid}/organs/spleen/propagate", json={}))
            walker.start()
            wait_for(lambda: (c.get(f"/api/volumes/{vid}").json().get("job") or {}).get("running"))
            second = upload(c, other.read_bytes())
            time.sleep(3)
            during = c.get(f"/api/volumes/{second}").json()["encoded"]
            gate.set()
            walker.join(120)
        assert during == 0
        wait_for(lambda: c.get(f"/api/volumes/{second}").json()["encoded"] == len(ref))


def test_a_client_that_leaves_mid_walk_leaves_it_running(engine, ct, monkeypatch):
    import httpx

    image, _, ref = ct
    k, box = largest(ref, SPLEEN)
    with serve(create_app(Settings(background_slices=0), engine=engine)) as base, held_walks(monkeypatch) as gate:
        vid = httpx.post(f"{base}/api/volumes", content=image.read_bytes()).json()["id"]
        httpx.post(f"{base}/api/volumes/{vid}/organs/spleen/prompt", json={"slice": k, "box": box})
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base}/api/volumes/{vid}/organs/spleen/propagate", json={}, timeout=1.0)
        gate.set()
        wait_for(lambda: not httpx.get(f"{base}/api/volumes/{vid}").json()["job"]["running"])
        st = httpx.get(f"{base}/api/volumes/{vid}").json()
        assert st["job"]["result"]["voxels"] > 0 and st["organs"]["spleen"]["propagated"]


# ---------------------------------------------------------------------------------------------- viewer.py
def test_viewer_checks_everything_before_serving(capsys, ct, tmp_path):
    image, label, _ = ct
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        for argv, needle in (
                (["--image", tmp_path / "missing.nii.gz"], "not found"),
                (["--image", image, "--out", image], "is an input of this run"),
                (["--image", image, "--out", tmp_path / "x.png"], "must end with .nii.gz or .nii"),
                (["--out", tmp_path / "o.nii.gz"], "--out needs --image"),
                (["--label", label], "--label needs --image"),
                (["--image", image, "--model", "bogus"], "unknown --model 'bogus'"),
                (["--image", image, "--stop", "never"], "--stop"),
                (["--image", image, "--margin-mm", "-2"], "--margin-mm"),
                (["--image", image, "--port", port], "cannot serve on 127.0.0.1"),
                (["--image", image, "--device", "tpu"], "--device")):
            assert needle in fails(capsys, viewer.main, argv), argv
        from sambtcv import cli

        with pytest.raises(SystemExit) as exc:
            cli.run_main(lambda: viewer.main(["--image", str(image), "--host", "127.0.0.2", "--port", str(port),
                                              "--model", "bogus2"]))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "warning: --host 127.0.0.2" in err and "no login" in err
    finally:
        busy.close()


def test_default_ct_is_the_phantoms_validation_volume(tmp_path, monkeypatch):
    monkeypatch.setattr(viewer, "PHANTOM_DIR", tmp_path / "phantom")
    monkeypatch.setattr(viewer, "PHANTOM", {"n": 2, "seed": 0, "shape": (32, 32, 8)})
    image, label = viewer.default_ct()
    assert image.name == "img0002.nii.gz" and label.is_file()
    assert viewer.default_ct() == (image, label)  # written once


@pytest.mark.slow
def test_measure_speed_for_bench(litemedsam, mobilesam, ct, tmp_path):
    """bench.py's numbers come from one call: prompt and click times and a cold walk's passes per visited
    slice."""
    from sambtcv.bench.viewer import measure_viewer
    from sambtcv.core.names import organ_name

    image, label, ref = ct
    extent = {o: int((ref == o).any(axis=(1, 2)).sum()) for o in range(1, 14) if (ref == o).any()}
    organ = min(extent, key=extent.get)  # the shortest walk: the fewest encoder passes in a test
    r = measure_viewer(litemedsam, image, label, tmp_path / "bench", organ=organ_name(organ), repeats=1,
                             point_backbone=mobilesam)
    assert r["prompts"] == 1 and 0 < r["prompt_encoded_median_s"] and 0 < r["prompt_first_s"]
    assert 0 < r["click_median_s"] and 0 < r["box_and_points_median_s"]
    assert r["walk_visited"] >= 1 and r["walk_passes_per_visited_slice"] == 1.0
    assert not (tmp_path / "bench" / "sessions").exists()  # the server-owned copies are gone


def test_clicks_add_to_the_box_paint_and_anchors(client, ct):
    """A - click after a box keeps the box and shrinks the slice's mask where it clicked; a painted slice is
    an anchor that a walk leaves as painted and the label map holds; clearing a slice drops its anchor."""
    image, _, ref = ct
    vid = upload(client, image.read_bytes())
    k, box = largest(ref, SPLEEN)
    url = f"/api/volumes/{vid}/organs/spleen"
    first = client.post(f"{url}/prompt", json={"slice": k, "box": box}).json()
    mask = sessions.unrle(first["mask"]["counts"], first["mask"]["shape"])
    ys, xs = np.nonzero(mask)
    inside = [int(xs[0]), int(ys[0])]  # a pixel on the mask's edge
    r = client.post(f"{url}/prompt", json={"slice": k, "points": [inside], "labels": [0]})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["prompt"]["box"] == [float(v) for v in box] and p["prompt"]["labels"] == [0]
    assert p["prompt"]["given"] == "box + 1 point (1 -)"
    after = sessions.unrle(p["mask"]["counts"], p["mask"]["shape"])
    assert not after[inside[1], inside[0]] and after.sum() < mask.sum() and (after & ~mask).sum() == 0
    # paint two slices away, then walk from k: the painted slice is kept as it was painted
    spleen = np.flatnonzero((ref == SPLEEN).any(axis=(1, 2)))
    j = max(spleen) if max(spleen) != k else min(spleen)
    painted = np.zeros(ref.shape[1:], bool)
    painted[box[1]:box[1] + 4, box[0]:box[0] + 5] = True
    r = client.post(f"{url}/paint", json={"slice": int(j), "mask": {"counts": sessions.rle(painted)}})
    assert r.status_code == 200, r.text
    client.post(f"{url}/propagate", json={})
    now = raw_slices(client, vid, 0, len(ref) - 1)
    assert np.array_equal(now[j] == SPLEEN, painted)
    anchors = client.get(f"/api/volumes/{vid}").json()["organs"]["spleen"]["anchors"]
    assert [(a["slice"], a["given"]) for a in anchors] == sorted([(k, "box + 1 point (1 -)"), (int(j), "painted")])
    saved = np.asarray(labels_of(client, vid).dataobj)
    assert (saved == SPLEEN).sum() == (now == SPLEEN).sum()
    r = client.delete(f"{url}/slices/{int(j)}")
    assert r.status_code == 200 and r.json()["changed"] == [int(j), int(j)]
    anchors = client.get(f"/api/volumes/{vid}").json()["organs"]["spleen"]["anchors"]
    assert [a["slice"] for a in anchors] == [k]
    undo = client.post(f"/api/volumes/{vid}/undo").json()  # undo brings the painted anchor back
    assert undo["changed"] is not None
    anchors = client.get(f"/api/volumes/{vid}").json()["organs"]["spleen"]["anchors"]
    assert [a["slice"] for a in anchors] == sorted([k, int(j)])
