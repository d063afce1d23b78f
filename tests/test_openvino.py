"""The OpenVINO runtime (sambtcv.models.openvino_runtime): conversion, the disk cache and its checks, and agreement
with the PyTorch image encoder and PromptedDecoder (LiteMedSAM, 256 input, on the tiny phantom)."""
import json
import sys

import numpy as np
import pytest
import torch

from sambtcv.core.errors import PipelineError
from sambtcv.core.prompts import bound_box
from sambtcv.data.slices import SliceSet
from sambtcv.models import openvino_runtime as ovr
from sambtcv.models.decoder import PromptedDecoder

openvino = ovr.load_openvino()  # imported with its telemetry off (no forked sender holding our locks)

ENCODER_ATOL = 1e-4  # measured: max |openvino fp32 - torch fp32| of LiteMedSAM embeddings 1e-6..1e-5 (|values| < 1)
LOGIT_ATOL = 1e-3  # measured: max |difference| of mask logits 3e-5 (|logits| up to ~30); IoU 3e-7


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_cache")


@pytest.fixture(scope="module")
def phantom(tiny_slices, litemedsam):
    """The phantom slice with the most organs: encoder input (1, 3, 256, 256), its torch fp32 embedding,
    and input-frame boxes (P, 4) and two points each (P, 2, 2) of up to 3 of its organs."""
    sam, frame = litemedsam.sam, litemedsam.frame
    slices = SliceSet(tiny_slices, "train")
    image, label = max((slices.load(i) for i in range(len(slices))), key=lambda s: len(np.unique(s[1])))
    with torch.no_grad():
        batch = sam.preprocess(frame.image(image)[None])
        embedding = sam.image_encoder(batch.contiguous(memory_format=torch.channels_last)).float()
    boxes, points = [], []
    for organ in [o for o in np.unique(label) if o][:3]:
        mask = label == organ
        boxes.append(frame.coords_to_input(bound_box(mask).reshape(2, 2), mask.shape).reshape(4))
        ys, xs = np.nonzero(mask)
        pick = np.linspace(0, len(xs) - 1, 2).astype(int)
        points.append(frame.coords_to_input(np.stack([xs[pick], ys[pick]], 1), mask.shape))
    return {"batch": batch, "embedding": embedding, "boxes": torch.tensor(np.array(boxes), dtype=torch.float32),
            "points": torch.tensor(np.array(points), dtype=torch.float32)}


def test_encoder_converts_once_caches_and_matches_torch(litemedsam, ov_cache, phantom, monkeypatch):
    enc = ovr.OpenVinoEncoder(litemedsam, "fp32", ov_cache, progress=False)
    assert enc.converted
    assert enc._compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32  # not the CPU's bf16 default
    out = enc(phantom["batch"].expand(2, -1, -1, -1))  # a batch of two, one image at a time
    assert out.dtype == torch.float32 and out.shape == (2, 256, 64, 64)
    assert (out - phantom["embedding"]).abs().max() < ENCODER_ATOL
    folder = enc.cache.folder
    assert folder.parent == ov_cache / "openvino" and litemedsam.key in folder.name and "fp32-256" in folder.name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["precision"] == "fp32" and set(meta["files"]) == {"model.xml", "model.bin"}

    def no_conversion(*args):
        raise AssertionError("converted although the cache holds the model")

    monkeypatch.setattr(ovr, "_convert_encoder", no_conversion)
    again = ovr.OpenVinoEncoder(litemedsam, "fp32", ov_cache, progress=False)
    assert not again.converted
    assert torch.equal(again(phantom["batch"]), out[:1])


def test_decoder_matches_prompted_decoder_for_boxes_and_points(litemedsam, ov_cache, phantom):
    torch_dec = PromptedDecoder.from_backbone(litemedsam).eval()
    dec = ovr.OpenVinoDecoder(torch_dec, litemedsam.key, "fp32", ov_cache, progress=False)
    emb = phantom["embedding"].expand(len(phantom["boxes"]), -1, -1, -1)
    cases = [dict(boxes=phantom["boxes"]),  # single mask
             dict(points=phantom["points"], point_labels=torch.tensor([[1.0, 0.0]]).expand(len(emb), -1),
                  multimask=True),
             dict(points=phantom["points"][:1, :1], point_labels=torch.ones(1, 1), multimask=True)]  # other B, N
    for kwargs in cases:
        e = emb[:len(next(v for v in kwargs.values() if torch.is_tensor(v)))]
        with torch.no_grad():
            ref_masks, ref_iou = torch_dec(e, **kwargs)
        k = 3 if kwargs.get("multimask") else 1
        for _ in range(ovr.STATIC_AFTER):  # the dynamic-shape graph, then one compiled for these shapes
            masks, iou = dec(e, **kwargs)
            assert masks.shape == (len(e), k, 256, 256) and iou.shape == (len(e), k) and masks.dtype == torch.float32
            assert torch.allclose(masks, ref_masks, atol=LOGIT_ATOL, rtol=0)
            assert ((masks > 0) == (ref_masks > 0)).float().mean() > 0.9999
            assert torch.allclose(iou, ref_iou, atol=1e-4)
    assert sorted(dec.conversions) == ["box", "points-multi"]  # the second points call reused its graph
    assert len(dec.graph("box", False).static) == 1 and len(dec.graph("points", True).static) == 2


def test_decoder_first_called_inside_bf16_autocast_converts(litemedsam, tmp_path, phantom):
    """A page decodes under its --dtype bf16 autocast, which is when a decoder graph is first converted:
    the graph is still traced in fp32 (autocast ops have no OpenVINO conversion)."""
    from sambtcv.core.device import autocast

    dec = ovr.OpenVinoDecoder(PromptedDecoder.from_backbone(litemedsam).eval(), "autocast", "bf16", tmp_path,
                              progress=False)
    with torch.no_grad(), autocast("cpu", "bf16"):
        masks, iou = dec(phantom["embedding"], boxes=phantom["boxes"][:1])
    assert masks.shape == (1, 1, 256, 256) and dec.conversions == ["box"]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.layer(x)) + 1.0


def test_cached_model_detects_damage_and_converts_again(tmp_path, capsys):
    """The checks of every cached graph (`CachedModel`), on a toy graph that converts in a moment."""
    torch.manual_seed(0)
    toy = Toy().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = toy(x).numpy()

    def convert():
        return openvino.convert_model(toy, example_input=x)

    def load():
        cache = ovr.CachedModel(tmp_path, "toy", "toy-fp32", "toy model", {"precision": "fp32"}, progress=False)
        out = ovr.compile_model(cache.model(convert), "fp32")(x.numpy())[0]
        assert np.allclose(out, ref, atol=1e-6)
        return cache

    assert load().converted
    folder = tmp_path / "openvino" / "toy-toy-fp32"
    assert not load().converted
    meta = json.loads((folder / "meta.json").read_text())

    def flip_byte(name):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))

    damage = {"model.bin does not match its checksum": lambda: flip_byte("model.bin"),
              "model.xml does not match its checksum": lambda: (folder / "model.xml").write_text("<net"),
              "model.bin is missing": lambda: (folder / "model.bin").unlink(),
              "made with other settings (format, openvino)": lambda: (folder / "meta.json").write_text(
                  json.dumps({**meta, "format": 0, "openvino": "2020.1"})),
              "meta.json is unreadable": lambda: (folder / "meta.json").write_text("{")}
    for note, harm in damage.items():
        harm()
        capsys.readouterr()
        assert load().converted, note
        assert note in capsys.readouterr().out
        assert not load().converted  # whole again
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "meta.json", "model.bin", "model.xml"]


def test_missing_openvino_and_unknown_precision_are_one_line_errors(litemedsam, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="unknown precision 'fp16'"):
        ovr.OpenVinoEncoder(litemedsam, "fp16", tmp_path)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setattr(ovr, "_CORE", None)
    with pytest.raises(PipelineError) as err:
        ovr.check_openvino()
    message = str(err.value.about("--runtime"))
    assert "\n" not in message and "--runtime openvino needs the openvino package" in message
    assert "pip install openvino==" in message and "--runtime torch" in message
    with pytest.raises(PipelineError, match="openvino package"):
        ovr.OpenVinoDecoder(PromptedDecoder.from_backbone(litemedsam), litemedsam.key, "fp32", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
