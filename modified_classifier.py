"""Task 3's model: SAM's mask decoder with a class token and a `class_prediction_head`; shows and checks it.

    python modified_classifier.py                      # MobileSAM's decoder: parts, parameters, a check
    python modified_classifier.py --model litemedsam --prompt bound_box

The model itself lives in `sambtcv.models.classifier` (classify_train_task3.py and classify_val_task3.py use it
from there): `ClassifyingMaskDecoder` extends `segment_anything`'s `MaskDecoder` with a learned class
token, a two-way transformer for it (`class_transformer`, initialised as a copy of the decoder's own) and
`class_prediction_head`, an MLP from the class token's output to 13 organ logits. The class token runs
through `class_transformer` with the IoU, mask and prompt tokens and cross-attends with the image
embedding, as the mask tokens do. The mask and IoU outputs still come from the original transformer and
heads, so training the class branch cannot change the masks.

This page builds the model on the chosen backbone's decoder, prints its parts and parameter counts
(what Task 3 trains and what stays frozen), and runs one batch of random embeddings with prompts of
PROMPT through both the plain decoder and the classifier: the masks must be identical and the class
logits (B, 13).
"""
from __future__ import annotations

import torch

from sambtcv.cli import flag, parse_config, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import markdown_table
from sambtcv.core.names import NUM_ORGANS, POINT_PROMPTS, one_prompt_type
from sambtcv.models.backbones import load_backbone
from sambtcv.models.classifier import (  # noqa: F401 (users import them from here)
    ClassifyingDecoder,
    ClassifyingMaskDecoder,
    build_classifier,
)
from sambtcv.models.decoder import PromptedDecoder

# ---------------------------------------------------------------------------------------------- config
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights; default: the packaged ones, or checkpoints/<official name> for vit_*
PROMPT = "one_central_point"  # prompt type of the check batch
BATCH = 4  # samples in the check batch (>= 1)
SEED = config.SEED  # random embeddings and prompts of the check (>= 0)
DEVICE = "cpu"  # cpu | cuda
# -----------------------------------------------------------------------------------------------------


def parts(model: ClassifyingDecoder) -> list[list]:
    """[part, parameters, trained in Task 3] rows."""
    dec = model.mask_decoder
    trained = {id(p) for p in dec.class_parameters()}
    rows = []
    for name, module in [("prompt encoder", model.prompt_encoder), ("mask transformer", dec.transformer),
                         ("IoU + mask tokens, heads, upscaling", None), ("class token", dec.class_token),
                         ("class transformer", dec.class_transformer),
                         ("class_prediction_head", dec.class_prediction_head)]:
        if module is None:
            params = [p for n, p in dec.named_parameters() if not n.startswith(("class_", "transformer."))]
        else:
            params = list(module.parameters())
        rows.append([name, sum(p.numel() for p in params), "yes" if all(id(p) in trained for p in params) else "no"])
    return rows


@torch.no_grad()
def check(backbone, model: ClassifyingDecoder, prompt_type: str, batch: int, device) -> dict:
    """Masks of the plain decoder and the classifier on one random batch: identical; logits (B, 13)."""
    plain = PromptedDecoder.from_backbone(backbone).to(device).eval()
    model.eval()
    e = backbone.sam.prompt_encoder.image_embedding_size
    emb = torch.randn(batch, 256, *e, device=device)
    size = backbone.img_size
    if prompt_type in POINT_PROMPTS:
        kw = {"points": torch.rand(batch, POINT_PROMPTS[prompt_type], 2, device=device) * size,
              "point_labels": torch.ones(batch, POINT_PROMPTS[prompt_type], device=device), "multimask": True}
    else:
        xy = torch.rand(batch, 2, device=device) * size / 2
        kw = {"boxes": torch.cat([xy, xy + size / 4], dim=1), "multimask": False}
    masks, iou = plain(emb, **kw)
    c_masks, c_iou, logits = model(emb, **kw)
    return {"max_mask_difference": float((masks - c_masks).abs().max()),
            "max_iou_difference": float((iou - c_iou).abs().max()), "logits_shape": list(logits.shape)}


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--prompt"):
        prompt_type = one_prompt_type(cfg["prompt"])
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    model = build_classifier(backbone).to(device)
    model.freeze_all_but_class_branch()
    print(markdown_table(["part", "parameters", "trained in Task 3"], parts(model)), end="")
    out = check(backbone, model, prompt_type, cfg["batch"], device)
    print(f"check on {cfg['batch']} random embeddings with {prompt_type} prompts: masks differ by at most "
          f"{out['max_mask_difference']:.2e}, IoU by {out['max_iou_difference']:.2e}; class logits "
          f"{tuple(out['logits_shape'])}")
    if out["max_mask_difference"] != 0 or out["logits_shape"] != [cfg["batch"], NUM_ORGANS]:
        raise PipelineError("the classifier changed the masks or its logits have the wrong shape")


if __name__ == "__main__":
    run_main(main)
