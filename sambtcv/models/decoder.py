"""SAM's prompt encoder + mask decoder over batches of (embedding, prompt) pairs, and finetuned decoders."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import load_checkpoint
from sambtcv.core.names import POINT_PROMPTS
from sambtcv.models.backbones import Backbone


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
    def from_backbone(cls, backbone: Backbone, copy_modules: bool = False):
        """The backbone's own modules (shared), or deep copies of them when `copy_modules`."""
        sam = backbone.sam
        if copy_modules:
            return cls(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder))
        return cls(sam.prompt_encoder, sam.mask_decoder)

    def embed_prompts(self, points=None, point_labels=None, boxes=None, mask_input=None):
        """points (B, N, 2) + labels (B, N) and/or boxes (B, 4), input frame, and optionally the previous
        low-res mask logits (B, 1, LOWRES, LOWRES) as SAM's dense mask prompt -> sparse, dense."""
        pts = None if points is None else (points, point_labels)
        return self.prompt_encoder(points=pts, boxes=boxes, masks=mask_input)

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

    def forward(self, embeddings, points=None, point_labels=None, boxes=None, multimask: bool = False,
                mask_input=None):
        """-> (low-res mask logits (B, K, LOWRES, LOWRES), IoU predictions (B, K)); K = 3 if multimask else 1.
        `mask_input` (B, 1, LOWRES, LOWRES): a previous prediction's low-res logits (SAM's refinement input)."""
        sparse, dense = self.embed_prompts(points, point_labels, boxes, mask_input)
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
    (a memory-bound step of the decoder on a CPU). Other layouts run as they are."""
    from segment_anything.modeling.common import LayerNorm2d

    layers = list(output_upscaling)
    if len(layers) != 5 or not isinstance(layers[1], LayerNorm2d):
        return output_upscaling(src)
    conv1, norm, act1, conv2, act2 = layers
    x = conv1(src).contiguous(memory_format=torch.channels_last)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    return act2(conv2(act1(x)))


@dataclass
class Decoded:
    """Decoder outputs of one batch: ``best`` (B, L, L) logits of the mask each sample keeps, all
    ``masks`` (B, K, L, L) and their predicted ``iou`` (B, K) (None when masks were not asked for),
    and ``class_logits`` (B, 13) from Task 3's classifier (else None)."""

    best: torch.Tensor | None
    masks: torch.Tensor | None
    iou: torch.Tensor | None
    class_logits: torch.Tensor | None = None


POINT_MASK_RULES = {
    "smallest": "the smallest of SAM's three masks (better than the highest predicted IoU for a point on real CT "
                "and on the phantom: docs/MEASUREMENTS.md)",
    "iou": "the mask with the highest predicted IoU (segment_anything's SamPredictor)",
}


def pick(masks: torch.Tensor, iou: torch.Tensor, rule: str = config.POINT_MASK) -> torch.Tensor:
    """(B, K, L, L) mask logits, (B, K) predicted IoUs -> (B,) the index of the mask each sample keeps by
    `rule` (POINT_MASK_RULES); 0 when K = 1 (box prompts: one mask)."""
    if masks.shape[1] == 1:
        return torch.zeros(masks.shape[0], dtype=torch.long, device=masks.device)
    if rule == "smallest":
        return (masks > 0).flatten(2).sum(-1).argmin(dim=1)
    return iou.argmax(dim=1)


def best_mask(masks: torch.Tensor, iou: torch.Tensor, rule: str = config.POINT_MASK) -> torch.Tensor:
    """(B, K, L, L), (B, K) -> (B, L, L): each sample's mask kept by `rule` (POINT_MASK_RULES)."""
    idx = pick(masks, iou, rule)
    return masks[torch.arange(masks.shape[0], device=masks.device), idx]


def decode_batch(decoder: PromptedDecoder, batch: dict, prompt_type: str, device, point_mask: str = config.POINT_MASK,
                 **forward_kwargs) -> Decoded:
    """Decode one collated `sambtcv.study.evaluation.PromptDataset` batch. Points: multimask output, the mask kept
    by `point_mask` (POINT_MASK_RULES); boxes: single-mask output. forward_kwargs go to the decoder's forward."""
    emb = batch["embedding"].to(device, non_blocking=True)
    if prompt_type in POINT_PROMPTS:
        pts = batch["points"].to(device)
        out = decoder(emb, points=pts, point_labels=torch.ones(pts.shape[:2], device=device), multimask=True,
                      **forward_kwargs)
    else:
        out = decoder(emb, boxes=batch["box"].to(device), multimask=False, **forward_kwargs)
    masks, iou = out[0], out[1]
    return Decoded(best=None if masks is None else best_mask(masks, iou, point_mask), masks=masks, iou=iou,
                   class_logits=out[2] if len(out) > 2 else None)


def load_decoder(backbone: Backbone, finetuned=None) -> PromptedDecoder:
    """A copy of the backbone's prompt encoder + mask decoder, with the weights of a Task 2 checkpoint
    (``finetune_task2.py``'s best.pt) when `finetuned` is given. A checkpoint of another backbone, or a
    file that is not a Task 2 checkpoint, is refused with one line."""
    decoder = PromptedDecoder.from_backbone(backbone, copy_modules=True)
    if finetuned:
        state = load_checkpoint(finetuned, "finetune")
        trained_on = state.get("config", {}).get("backbone")
        if trained_on != backbone.key:
            raise PipelineError(f"{{subject}} {finetuned} was finetuned from {trained_on}, not {backbone.key}; use "
                                f"the matching model and backbone weights, or another {{subject}}", "checkpoint")
        decoder.load_state_dict(state["model"])
    return decoder
