"""Backbone loading, input frames, batched decoding, the embedding cache and the classifier model."""
import copy

import numpy as np
import pytest
import torch

from modified_classifier import ClassifyingDecoder, ClassifyingMaskDecoder, build_classifier
from sambtcv.core.errors import PipelineError
from sambtcv.models.backbones import InputFrame, encode_images, load_backbone
from sambtcv.models.decoder import PromptedDecoder
from sambtcv.models.embeddings import EmbeddingCache, open_split
from sambtcv.study.evaluation import PromptDataset
from utils import SliceSet, dice_score


def test_coordinate_round_trip_and_mask_frames():
    for hw in [(512, 512), (300, 512), (512, 260), (97, 61)]:
        xy = np.array([[0.0, 0.0], [hw[1] - 1, hw[0] - 1], [hw[1] / 3, hw[0] / 2]])
        for size in (256, 1024):
            frame = InputFrame(size)
            back = frame.coords_from_input(frame.coords_to_input(xy, hw), hw)
            assert np.allclose(back, xy)
            new_h, new_w = frame.size(hw)
            assert max(new_h, new_w) == size
        mask = np.zeros(hw, bool)
        mask[hw[0] // 4: hw[0] // 2, hw[1] // 5: hw[1] // 2] = True
        # logits of the mask in the low-res frame
        low = torch.from_numpy(InputFrame.lowres_target(mask) * 20 - 10)[None]
        for size in (256, 1024):
            back = (InputFrame(size).to_slice(low, hw)[0] > 0).numpy()
            assert back.shape == hw
            assert dice_score(back, mask) > 0.9


def test_unknown_model_and_missing_checkpoint(tmp_path):
    with pytest.raises(PipelineError, match="unknown model"):
        load_backbone("vit_x")
    with pytest.raises(PipelineError, match=r"sam_vit_b_01ec64.pth.*checkpoints"):
        load_backbone("vit_b", tmp_path / "missing" / "sam_vit_b_01ec64.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="cannot read checkpoint"):
        load_backbone("litemedsam", bad)


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A randomly initialised vit_b saved like the official file: exercises the real loading path."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    return path


def test_official_vit_b_loading_path(vit_b_checkpoint, litemedsam):
    bb = load_backbone("vit_b", vit_b_checkpoint)
    assert bb.img_size == 1024 and bb.sam.prompt_encoder.image_embedding_size == (64, 64)
    assert float(bb.sam.pixel_std[0]) == pytest.approx(58.395)
    state = torch.load(vit_b_checkpoint, weights_only=True)
    assert torch.equal(bb.sam.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    # a file for another model is refused with a clear message
    with pytest.raises(PipelineError, match="does not fit model vit_l"):
        load_backbone("vit_l", vit_b_checkpoint)
    with pytest.raises(PipelineError, match="does not fit model vit_b"):
        load_backbone("vit_b", litemedsam.checkpoint)
    assert litemedsam.img_size == 256 and float(litemedsam.sam.pixel_std[0]) == 255.0


def test_mobilesam_loads_strictly_from_its_package(mobilesam, tmp_path):
    """The shipped MobileSAM weights fill segment_anything's own Sam (TinyViT encoder, SAM's prompt encoder and
    mask decoder) with every key, at 1024 input with ImageNet normalisation; another model's file is refused."""
    assert mobilesam.checkpoint.endswith("mobile_sam.pt") and mobilesam.img_size == 1024
    assert mobilesam.sam.prompt_encoder.image_embedding_size == (64, 64)
    assert [round(float(v), 3) for v in mobilesam.sam.pixel_mean.flatten()] == [123.675, 116.28, 103.53]
    state = torch.load(mobilesam.checkpoint, weights_only=True)
    assert set(state) == set(mobilesam.sam.state_dict())
    assert torch.equal(mobilesam.sam.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    from sambtcv.models.backbones import BACKBONES

    lite_file = BACKBONES["litemedsam"].weights()
    with pytest.raises(PipelineError, match=rf"checkpoint {lite_file} does not fit model mobilesam"):
        load_backbone("mobilesam", lite_file)
    assert load_backbone("litemedsam").key != mobilesam.key  # cache keys differ


def test_channels_last_encoder_matches_contiguous(litemedsam):
    """LiteMedSAM's encoder runs channels_last (faster); its embeddings equal the contiguous ones."""
    assert litemedsam.channels_last
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (90, 120), dtype=np.uint8), rng.integers(0, 256, (64, 64), dtype=np.uint8)]
    fast = encode_images(litemedsam, images, "cpu")
    assert fast.shape == (2, 256, 64, 64) and fast.is_contiguous()
    sam = litemedsam.sam
    batch = torch.cat([sam.preprocess(litemedsam.frame.image(im)[None]) for im in images])
    encoder = copy.deepcopy(sam.image_encoder).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        plain = encoder(batch.contiguous())
    assert torch.allclose(fast, plain, atol=1e-4), (fast - plain).abs().max()


def _official(sam, emb, points=None, labels=None, boxes=None, multimask=False):
    pts = None if points is None else (points, labels)
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=None)
    return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)


def test_batched_decoder_matches_official_per_sample(litemedsam):
    torch.manual_seed(0)
    sam = litemedsam.sam
    emb = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20, 100, 120], [50, 50, 60, 90], [0, 0, 255, 255]])
    points = torch.tensor([[[30.0, 40]], [[100, 100]], [[200, 10]]])
    dec = PromptedDecoder.from_backbone(litemedsam)
    with torch.no_grad():
        bm, bi = dec(emb, boxes=boxes)
        pm, pi = dec(emb, points=points, point_labels=torch.ones(3, 1), multimask=True)
        for b in range(3):
            om, oi = _official(sam, emb[b:b + 1], boxes=boxes[b:b + 1])
            assert torch.allclose(bm[b:b + 1], om, atol=1e-4) and torch.allclose(bi[b:b + 1], oi, atol=1e-5)
            om, oi = _official(sam, emb[b:b + 1], points[b:b + 1], torch.ones(1, 1), multimask=True)
            assert torch.allclose(pm[b:b + 1], om, atol=1e-4) and torch.allclose(pi[b:b + 1], oi, atol=1e-5)


def test_batched_decoder_gradients_match_official(litemedsam):
    """The channels_last layout and fused LayerNorm2d change no gradient either (training path)."""
    torch.manual_seed(1)
    sam = copy.deepcopy(litemedsam.sam)
    emb = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20, 100, 120], [50, 50, 60, 90]])
    target = (torch.rand(2, 1, 256, 256) > 0.5).float()
    params = [sam.mask_decoder.output_upscaling[1].weight, sam.mask_decoder.output_upscaling[0].weight,
              sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight]

    def grads(masks):
        loss = ((masks.sigmoid() - target) ** 2).mean()
        return torch.autograd.grad(loss, params)

    ours = grads(PromptedDecoder(sam.prompt_encoder, sam.mask_decoder)(emb, boxes=boxes)[0])
    official = grads(torch.cat([_official(sam, emb[b:b + 1], boxes=boxes[b:b + 1])[0] for b in range(2)]))
    for g, h in zip(ours, official):
        assert torch.allclose(g, h, rtol=1e-3, atol=1e-6), (g - h).abs().max()


def test_classifier_masks_equal_plain_decoder_and_only_class_branch_trains(litemedsam):
    torch.manual_seed(0)
    clf = build_classifier(litemedsam, None)
    assert isinstance(clf, ClassifyingDecoder) and isinstance(clf.mask_decoder, ClassifyingMaskDecoder)
    plain = PromptedDecoder.from_backbone(litemedsam)
    emb = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20, 100, 120], [50, 50, 60, 90]])
    trainable = clf.freeze_all_but_class_branch()
    assert {id(p) for p in trainable} == {id(p) for p in clf.parameters() if p.requires_grad}
    names = [n for n, p in clf.named_parameters() if p.requires_grad]
    assert names and all(".class_" in n for n in names)
    with torch.no_grad():
        m1, i1, logits = clf(emb, boxes=boxes)
        m2, i2 = plain(emb, boxes=boxes)
    assert torch.equal(m1, m2) and torch.equal(i1, i2)
    assert logits.shape == (2, 13)
    # a training step moves the class logits but never the masks
    opt = torch.optim.Adam(trainable, lr=1e-3)
    loss = torch.nn.functional.cross_entropy(clf(emb, boxes=boxes, with_masks=False)[2], torch.tensor([5, 7]))
    loss.backward()
    opt.step()
    with torch.no_grad():
        m3, _, logits2 = clf(emb, boxes=boxes)
    assert torch.equal(m3, m2) and not torch.allclose(logits, logits2)


def test_embedding_cache_cold_warm_and_reads(tiny_slices, litemedsam):
    data = open_split(tiny_slices, "val", litemedsam, "fp32", "cpu")
    slices = data.slices
    assert data.encoder_passes == len(slices) > 0
    data2 = open_split(tiny_slices, "val", litemedsam, "fp32", "cpu")
    assert data2.encoder_passes == 0
    direct = encode_images(litemedsam, [slices.load(1)[0]], "cpu")[0].numpy()
    assert np.allclose(data2.cache.read(1), direct, atol=2e-2, rtol=1e-2)  # float16 storage
    item = PromptDataset(data2, "bound_box", 0)[0]
    assert item["embedding"].shape == (256, 64, 64) and item["target"].shape == (1, 256, 256)
    assert item["points"].shape == (0, 2) and item["box"][2] > item["box"][0]
    # another dtype is another cache
    bf16 = EmbeddingCache.for_split(SliceSet(tiny_slices, "val"), litemedsam, "bf16")
    assert bf16.missing() == list(range(len(slices)))
