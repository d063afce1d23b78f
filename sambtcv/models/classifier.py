"""SAM's mask decoder with a class token and a `class_prediction_head` (the model of Task 3 only).

`ClassifyingMaskDecoder` extends `segment_anything`'s `MaskDecoder`: beside the IoU token and the
mask tokens it has a learned class token, a two-way transformer for it (`class_transformer`,
initialised as a copy of the decoder's own) and `class_prediction_head`, an MLP from the class
token's output to 13 organ logits. The class token runs through `class_transformer` together with
the IoU, mask and prompt tokens and cross-attends with the image embedding, as the mask tokens do.
The mask and IoU outputs still come from the original transformer and heads, so they equal the
plain decoder's for the same weights, and training the class branch cannot change the masks.

`ClassifyingDecoder` is the batched prompt-encoder + decoder of `sambtcv.models.decoder.PromptedDecoder` with
this decoder; it returns (masks, IoU predictions, class logits). ``modified_classifier.py`` shows the
architecture and checks that the masks are unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder

from sambtcv.core.names import NUM_ORGANS
from sambtcv.models.backbones import Backbone
from sambtcv.models.decoder import PromptedDecoder, load_decoder

CLASS_HEAD_DEPTH = 3


class ClassifyingMaskDecoder(MaskDecoder):
    """MaskDecoder + class token + class_transformer + class_prediction_head (num_classes logits)."""

    def __init__(self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
                 activation=nn.GELU, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
                 num_classes: int = NUM_ORGANS, class_head_depth: int = CLASS_HEAD_DEPTH):
        super().__init__(transformer_dim=transformer_dim, transformer=transformer,
                         num_multimask_outputs=num_multimask_outputs, activation=activation,
                         iou_head_depth=iou_head_depth, iou_head_hidden_dim=iou_head_hidden_dim)
        self.num_classes = num_classes
        self.class_token = nn.Embedding(1, transformer_dim)
        self.class_transformer = copy.deepcopy(transformer)
        self.class_prediction_head = MLP(transformer_dim, transformer_dim, num_classes, class_head_depth)

    @classmethod
    def from_mask_decoder(cls, decoder: MaskDecoder, num_classes: int = NUM_ORGANS) -> "ClassifyingMaskDecoder":
        """Same architecture and weights as `decoder`; the class branch starts from its transformer."""
        new = cls(transformer_dim=decoder.transformer_dim, transformer=copy.deepcopy(decoder.transformer),
                  num_multimask_outputs=decoder.num_multimask_outputs,
                  iou_head_depth=decoder.iou_prediction_head.num_layers,
                  iou_head_hidden_dim=decoder.iou_prediction_head.layers[0].out_features, num_classes=num_classes)
        missing, unexpected = new.load_state_dict(decoder.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("class_",)) for k in missing), (missing, unexpected)
        new.class_transformer.load_state_dict(decoder.transformer.state_dict())
        return new.to(next(decoder.parameters()).device)

    def class_parameters(self):
        """The trainable part in Task 3: class token, class transformer, class head."""
        return [*self.class_token.parameters(), *self.class_transformer.parameters(),
                *self.class_prediction_head.parameters()]


class ClassifyingDecoder(PromptedDecoder):
    """Batched prompt encoder + `ClassifyingMaskDecoder`: forward -> (masks, iou, class logits (B, C))."""

    def forward(self, embeddings, points=None, point_labels=None, boxes=None, multimask: bool = False,
                with_masks: bool = True):
        sparse, dense = self.embed_prompts(points, point_labels, boxes)
        dec = self.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, dec.class_token.weight], dim=0)
        hs, _ = self.run_tokens(dec.class_transformer, embeddings, sparse, dense, tokens)
        logits = dec.class_prediction_head(hs[:, 1 + dec.num_mask_tokens])
        if not with_masks:
            return None, None, logits
        masks, iou = self.mask_outputs(embeddings, sparse, dense, multimask)
        return masks, iou, logits

    def freeze_all_but_class_branch(self) -> list:
        """Freeze the prompt encoder and the mask/IoU parts; return the trainable parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = self.mask_decoder.class_parameters()
        for p in trainable:
            p.requires_grad_(True)
        return trainable


def build_classifier(backbone: Backbone, finetuned=None) -> ClassifyingDecoder:
    """ClassifyingDecoder on the backbone's decoder, with a Task 2 checkpoint's weights when `finetuned`
    is given (`sambtcv.models.decoder.load_decoder`); the class branch starts from its transformer, the class token and
    head from random initialisation."""
    base = load_decoder(backbone, finetuned)
    return ClassifyingDecoder(base.prompt_encoder, ClassifyingMaskDecoder.from_mask_decoder(base.mask_decoder))


def load_classifier(backbone: Backbone, checkpoint: dict) -> ClassifyingDecoder:
    """A trained classifier from a `classify_train_task3.py` checkpoint (a
    `sambtcv.core.files.load_checkpoint` dict)."""
    model = build_classifier(backbone)
    model.load_state_dict(checkpoint["model"])
    return model
