"""slicer_server.py: the nnInteractive remote protocol (3D Slicer's SlicerNNInteractive) on this engine, driven by
the unmodified `nninteractive-client` on a real uvicorn server, on the tiny phantom; leases, keys, bad requests;
the NNIA framing against the client's own."""
from __future__ import annotations

import json

import httpx
import nibabel as nib
import numpy as np
import pytest

import slicer_server
from conftest import fails, serve
from sambtcv import cli
from sambtcv.core.errors import PipelineError
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import ORGAN_ID
from sambtcv.data.btcv import find_cases
from sambtcv.data.prompts_file import loads, parse_prompts
from sambtcv.engine import interactive
from sambtcv.engine.propagation import merge
from sambtcv.engine.volume import case_prompt, load_case, segment
from sambtcv.models.loading import Loaded
from sambtcv.servers import nnia
from sambtcv.servers.slicer import Leases
from sambtcv.servers.slicer_app import SlicerSettings, create_slicer_app

remote = pytest.importorskip("nnInteractive.inference.remote")
serialization = pytest.importorskip("nnInteractive.inference.remote.serialization")
KEY = "test-key"


@pytest.fixture(scope="module")
def engine(litemedsam, mobilesam, tmp_path_factory):
    return interactive.load_engine(device="cpu", cache_dir=tmp_path_factory.mktemp("slicer") / "cache",
                                   backbone=litemedsam, point_backbone=mobilesam, runtime="torch", dtype="fp32",
                                   encoder_dtype="fp32")


@pytest.fixture(scope="module")
def ct(raw_phantom):
    """The phantom's validation CT as Slicer sends it: HU [1, K, J, I] int16, spacing [sk, sj, si], label [K, J, I]."""
    _, image, label = find_cases(raw_phantom)["val"][0]
    img = nib.load(str(image))
    hu = np.asarray(img.dataobj).astype(np.int16).transpose(2, 1, 0)[None]
    lab = np.asarray(nib.load(str(label)).dataobj).astype(np.uint8).transpose(2, 1, 0)
    si, sj, sk = (float(v) for v in img.header.get_zooms()[:3])
    return np.ascontiguousarray(hu), [sk, sj, si], np.ascontiguousarray(lab)


def _box(lab: np.ndarray, organ: int):
    """The organ's largest slice k and its tight half-open box there, [[k, k + 1], [j0, j1], [i0, i1]]."""
    k = int(np.argmax((lab == organ).sum(axis=(1, 2))))
    js, is_ = np.nonzero(lab[k] == organ)
    return k, [[k, k + 1], [int(js.min()), int(js.max()) + 1], [int(is_.min()), int(is_.max()) + 1]]


def _inside(bbox, changed: np.ndarray) -> bool:
    """Every changed voxel lies inside the half-open bbox the server answered."""
    if not changed.any():
        return True
    if bbox is None:
        return False
    inside = np.zeros_like(changed)
    inside[tuple(slice(lo, hi) for lo, hi in bbox)] = True
    return not (changed & ~inside).any()


def _session(base, **kw):
    return remote.nnInteractiveRemoteInferenceSession(base, api_key=KEY, **kw)


@pytest.mark.slow
def test_the_unmodified_client_segments_corrects_and_undoes(engine, ct):
    """Slicer's sequence through the real client: a box on the spleen's slice is walked through the CT (the buffer
    holds the spleen, Dice >= 0.8); a - point, a lasso, a scribble and a box on another plane change it, each
    answer covering every voxel it changed; undo restores; an initial segmentation is taken as given and refined;
    reset empties."""
    hu, spacing, lab = ct
    spleen = lab == ORGAN_ID["spleen"]
    with serve(create_slicer_app(engine, SlicerSettings(api_key=KEY))) as base, _session(base) as s:
        assert s.ping() and s.supports_undo and s.supported_interactions["bbox3d"] and "Apache-2.0" in s.license
        s.set_image(hu, {"spacing": spacing})
        assert s.original_image_shape == hu.shape
        tb = np.zeros(hu.shape[1:], np.uint8)
        s.set_target_buffer(tb)
        s.set_do_autozoom(False)
        k, box = _box(lab, ORGAN_ID["spleen"])
        before = tb.copy()
        answered = s.add_bbox_interaction(box, include_interaction=True)
        assert dice_score(tb > 0, spleen) >= 0.8, dice_score(tb > 0, spleen)
        assert (tb > 0).any(axis=(1, 2)).sum() > 1  # walked beyond the box's slice
        assert _inside(answered, tb != before)
        walked = tb.copy()
        z, y, x = np.argwhere(tb > 0)[len(np.argwhere(tb > 0)) // 2]
        answered = s.add_point_interaction([int(z), int(y), int(x)], include_interaction=False)
        assert tb[z, y, x] == 0 and _inside(answered, tb != walked)
        assert s.undo() and np.array_equal(tb, walked)
        # a lasso on another slice (the spleen's section there, drawn by hand) and a scribble on the background
        k2 = next(j for j in range(len(lab)) if spleen[j].any() and j != k)
        lasso = spleen[k2][None].astype(np.uint8)
        before = tb.copy()
        answered = s.add_lasso_interaction(lasso, True, interaction_bbox=[[k2, k2 + 1], [0, lab.shape[1]],
                                                                          [0, lab.shape[2]]])
        assert np.array_equal(tb[k2] > 0, spleen[k2] | (before[k2] > 0)) and _inside(answered, tb != before)
        before = tb.copy()
        stroke = np.zeros((1, 1, 5), np.uint8)
        stroke[0, 0] = 1
        s.add_scribble_interaction(stroke, False, interaction_bbox=[[k, k + 1], [2, 3], [2, 7]])
        assert not tb[k, 2, 2:7].any()
        # a box drawn on a coronal plane (one row thick): the organ starts from its centre, inside its slices
        s.reset_interactions()
        assert not tb.any()
        ks = np.flatnonzero(spleen.any(axis=(1, 2)))
        js, is_ = np.nonzero(spleen[k])
        row = int(np.median(js))
        cols = np.flatnonzero(spleen[k, row])
        answered = s.add_bbox_interaction([[int(ks[0]), int(ks[-1]) + 1], [row, row + 1],
                                           [int(cols[0]), int(cols[-1]) + 1]], include_interaction=True)
        assert tb.any() and dice_score(tb > 0, spleen) > 0.5 and _inside(answered, tb.astype(bool))
        # an initial segmentation is the organ as given, then refined by a click
        s.reset_interactions()
        liver = (lab == ORGAN_ID["liver"]).astype(np.uint8)
        assert s.add_initial_seg_interaction(liver, run_prediction=False) is None and np.array_equal(tb, liver)
        before = tb.copy()
        z, y, x = np.argwhere(liver)[0]
        answered = s.add_point_interaction([int(z), int(y), int(x)], include_interaction=False)
        assert tb[z, y, x] == 0 and _inside(answered, tb != before)
        lease = s.lease_status()
        assert 0 < lease["remaining_seconds"] <= lease["idle_timeout_seconds"]


def test_a_box_gives_the_label_map_segment_volume_gives_for_it(engine, ct, raw_phantom):
    """A box on an axial slice through the client gives, voxel for voxel, what segment_volume.py's walk gives for
    the same box in a prompts file (the phantom is stored in the slice frame's axes: x = I, y = J)."""
    hu, spacing, lab = ct
    k, box = _box(lab, ORGAN_ID["spleen"])
    with serve(create_slicer_app(engine, SlicerSettings(api_key=KEY))) as base, _session(base) as s:
        s.set_image(hu, {"spacing": spacing})
        tb = np.zeros(hu.shape[1:], np.uint8)
        s.set_target_buffer(tb)
        s.add_bbox_interaction(box, include_interaction=True)
    _, image, _ = find_cases(raw_phantom)["val"][0]
    case = load_case(image.name, image, None, engine.window)
    xyxy = [box[2][0], box[1][0], box[2][1] - 1, box[1][1] - 1]
    spec = parse_prompts(loads(json.dumps({"spleen": {"slice": k, "box": xyxy}})))
    models = Loaded(engine.backbone, engine.decoder, engine.runtime)
    dec = cli.volume_decoder(case, models, {"cache_dir": engine.cache_dir, "dtype": engine.dtype,
                                            "encoder_dtype": engine.encoder_dtype}, engine.device)
    walk = cli.walk_settings({"stop": engine.walk.stop, "margin_mm": "auto", "model": engine.model})
    labels = merge(segment(dec, [case_prompt(sp, case) for sp in spec], walk, case.geometry), case.stack.shape)
    assert np.array_equal(tb > 0, labels == ORGAN_ID["spleen"]) and tb.any()


def test_too_many_slices_are_refused_before_any_encoding(engine):
    from sambtcv.servers.slicer import MAX_SLICES, SlicerSession

    with pytest.raises(PipelineError, match="slices"):
        SlicerSession(engine, np.zeros((1, MAX_SLICES + 1, 16, 16), np.int16), None)
    with pytest.raises(PipelineError, match="px a side"):
        SlicerSession(engine, np.zeros((1, 4, 2, 2), np.int16), None)


def test_a_3d_box_is_walked_inside_its_slices(engine, ct):
    hu, spacing, lab = ct
    kidney = lab == ORGAN_ID["left_kidney"]
    ks = np.flatnonzero(kidney.any(axis=(1, 2)))
    js, is_ = np.nonzero(kidney.any(axis=0))
    with serve(create_slicer_app(engine, SlicerSettings(api_key=KEY))) as base, _session(base) as s:
        s.set_image(hu, {"spacing": spacing})
        tb = np.zeros(hu.shape[1:], np.uint8)
        s.set_target_buffer(tb)
        s.add_bbox_interaction([[int(ks[0]), int(ks[-1]) + 1], [int(js.min()), int(js.max()) + 1],
                                [int(is_.min()), int(is_.max()) + 1]], include_interaction=True)
        assert dice_score(tb > 0, kidney) >= 0.7
        assert not tb[: ks[0]].any() and not tb[ks[-1] + 1:].any()
        if ks[-1] + 1 < len(lab):  # a box on a slice past the 3D box widens the organ's slices to it
            s.add_bbox_interaction([[int(ks[-1]) + 1, int(ks[-1]) + 2], [0, 8], [0, 8]], include_interaction=True)


def test_leases_keys_and_capacity_as_the_client_expects(engine):
    """A wrong key is 401 (the client refuses to start); past --max-sessions a claim is 503 with Retry-After; a
    released or timed-out lease is 410 (SessionExpiredError); healthz needs no key."""
    now = [0.0]
    leases = Leases(1, idle_s=100.0, liveness_s=30.0, clock=lambda: now[0])
    with serve(create_slicer_app(engine, SlicerSettings(api_key=KEY), leases)) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        with pytest.raises(httpx.HTTPStatusError) as wrong:
            remote.nnInteractiveRemoteInferenceSession(base, api_key="not-the-key")
        assert wrong.value.response.status_code == 401
        assert httpx.post(f"{base}/claim").status_code == 401
        s = _session(base)
        full = httpx.post(f"{base}/claim", headers={"Authorization": f"Bearer {KEY}"})
        assert full.status_code == 503 and int(full.headers["Retry-After"]) > 0 and full.json()["detail"]
        with pytest.raises(remote.ServerAtCapacityError):
            _session(base)
        now[0] += 31.0  # no heartbeat for longer than the liveness timeout
        with pytest.raises(remote.SessionExpiredError):
            s.lease_status()
        s.close()
        s = _session(base)
        s.heartbeat()
        s.close()  # released: the next claim succeeds at once
        with _session(base) as again:
            now[0] += 101.0  # no interaction for longer than the idle timeout, heartbeats or not
            with pytest.raises(remote.SessionExpiredError):
                again.heartbeat()


def test_bad_requests_get_4xx_and_the_server_keeps_serving(engine, ct):
    hu, spacing, lab = ct
    with serve(create_slicer_app(engine, SlicerSettings())) as base:
        token = httpx.post(f"{base}/claim").json()["lease_token"]
        h = {"X-Lease-Token": token}

        def post(path, **kw):
            return httpx.post(f"{base}{path}", headers={**h, **kw.pop("headers", {})}, timeout=60, **kw)

        assert post("/add_point_interaction", json={"coordinates": [0, 0, 0], "include_interaction": True,
                                                    "run_prediction": True}).status_code == 400  # no image yet
        assert post("/set_image", content=b"NNIA\x01garbage").status_code == 400
        bomb = nnia.pack(np.zeros((1, 2, 2, 2), np.uint8))
        bomb = bomb[:8 + 5] + np.array([1, 100000, 100000, 100000], "<i8").tobytes() + bomb[8 + 5 + 32:]
        assert post("/set_image", content=bomb).status_code in (400, 413)
        assert post("/set_image", content=nnia.pack(hu), headers={"X-Meta": "{not json"}).status_code == 400
        meta = json.dumps({"image_properties": {"spacing": spacing}})
        assert post("/set_image", content=nnia.pack(hu), headers={"X-Meta": meta}).status_code == 200
        assert post("/set_target_buffer", json={"shape": [1, 2, 3], "dtype": "uint8"}).status_code == 400
        assert post("/set_target_buffer", json={"shape": list(lab.shape), "dtype": "float32"}).status_code == 400
        assert post("/set_target_buffer", json={"shape": list(lab.shape), "dtype": "uint8"}).status_code == 200
        outside = {"coordinates": [lab.shape[0], 0, 0], "include_interaction": True, "run_prediction": True}
        r = post("/add_point_interaction", json=outside)
        assert r.status_code == 400 and "outside the image" in r.json()["detail"]
        assert post("/add_bbox_interaction", json={"bbox_coords": [[0, 0], [0, 5], [0, 5]],
                                                   "include_interaction": True}).status_code == 400
        assert post("/add_point_interaction", content=b"[1, 2", headers={"Content-Type": "application/json"}
                    ).status_code == 400
        assert post("/no_such_thing", json={}).status_code == 404
        huge = {"coordinates": [1e999, 0, 0], "include_interaction": True, "run_prediction": True}
        assert post("/add_point_interaction", content=json.dumps(huge).replace("inf", "1e999"),
                    headers={"Content-Type": "application/json"}).status_code == 400
        assert post("/add_point_interaction", content=b"[" * 20000 + b"]" * 20000).status_code == 400
        assert post("/set_target_buffer", json={}, headers={"Host": "evil.example"}).status_code == 400
        assert httpx.post(f"{base}/heartbeat", headers={"X-Lease-Token": "0" * 32}).status_code == 410
        assert post("/predict", json={}).status_code == 200  # nothing to send yet, no error
        k, box = _box(lab, ORGAN_ID["spleen"])
        past_edge = [box[0], [box[1][0], lab.shape[1] + 40], [-7, box[2][1]]]  # a drag that ends past the edges
        ok = post("/add_bbox_interaction", json={"bbox_coords": past_edge, "include_interaction": True,
                                                 "run_prediction": True})
        sent = json.loads(ok.headers["X-Meta"])["bbox"]
        assert ok.status_code == 200 and sent is not None
        assert all(0 <= lo < hi <= n for (lo, hi), n in zip(sent, lab.shape))
        again = json.loads(post("/predict", json={}).headers["X-Meta"])["bbox"]  # the last reply, in case it was lost
        assert again == sent
        assert post("/add_bbox_interaction", json={"bbox_coords": [[k, k + 1], [lab.shape[1] + 1, lab.shape[1] + 9],
                                                                   [0, 5]], "include_interaction": True}
                    ).status_code == 400  # wholly outside


@pytest.mark.parametrize("array", [np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 30,
                                   np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32),
                                   np.array([[True, False, True]]), np.full((7,), 255, np.uint8)])
def test_nnia_arrays_round_trip_with_the_clients_own_framing(array):
    assert np.array_equal(serialization.unpack_array(nnia.pack(array)), array)
    assert np.array_equal(nnia.unpack(serialization.pack_array(array), 2 ** 20), array)


@pytest.mark.parametrize("cut", ["truncated", "magic", "dtype", "huge"])
def test_broken_nnia_messages_are_one_line(cut):
    data = nnia.pack(np.zeros((4, 4, 4), np.uint8))
    broken = {"truncated": data[:-3], "magic": b"XXIA" + data[4:], "dtype": data[:8] + b"objec" + data[13:],
              "huge": data[:13] + np.array([10 ** 6] * 3, "<i8").tobytes() + data[37:]}[cut]
    with pytest.raises(PipelineError) as err:
        nnia.unpack(broken, 2 ** 20, "the image")
    assert "\n" not in str(err.value) and "the image" in str(err.value)


@pytest.mark.parametrize("argv,needle", [(["--host", "0.0.0.0"], "--api-key"), (["--model", "nope"], "--model"),
                                         (["--port", "0"], "--port"), (["--window-hu", "200,100"], "--window-hu")])
def test_bad_flags_fail_before_any_model_loads(capsys, argv, needle):
    assert needle in fails(capsys, slicer_server.main, argv)
