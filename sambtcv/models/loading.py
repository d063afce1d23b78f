"""Settings to loaded models, in one place: every page (through `sambtcv.cli`), the viewer's server and the
Slicer server turn MODEL, CHECKPOINT, FINETUNED, RUNTIME, DTYPE, ENCODER_DTYPE and POINT_MODEL into models
here, and the resolved settings travel down from here (nothing below asks again).

The order is fixed: the precisions (`auto` -> what the device and the resolved runtime compute natively,
`sambtcv.models.precision`), the backbone (`sambtcv.models.backbones`), its runtime (`sambtcv.models.runtime`:
PyTorch, or OpenVINO's converted encoder), the prompt decoder (FINETUNED's, else the pretrained one,
`sambtcv.models.decoder`) wrapped by the runtime; then the same for the point model when it is another.

`about(setting)` is the caller's way to say an error of one step in its own words: a page passes one that
names the flag (`sambtcv.cli`: "runtime" -> --runtime), a server the plain setting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from sambtcv.core import config
from sambtcv.models import precision
from sambtcv.models import runtime as runtimes

SETTINGS = ("model", "checkpoint", "finetuned", "runtime", "dtype", "encoder_dtype", "point_model")


def plainly(setting: str):
    """The default `about`: errors stay as the package says them."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ModelSettings:
    """What to load. `dtype` / `encoder_dtype`: auto | fp32 | bf16 (decoder / image encoder); `runtime`:
    auto | torch | openvino; `point_model`: the model that answers clicks (empty: `model`)."""

    model: str = config.MODEL
    checkpoint: str | None = None
    finetuned: str | None = None
    runtime: str = config.RUNTIME
    dtype: str = config.DTYPE
    encoder_dtype: str = config.DTYPE
    point_model: str = ""

    @classmethod
    def of(cls, cfg: dict) -> "ModelSettings":
        """The settings a page's config holds (keys of SETTINGS; absent ones keep their defaults)."""
        return cls(**{k: cfg[k] for k in SETTINGS if k in cfg})


@dataclass
class Loaded:
    """One model as it runs: its backbone, its decoder wrapped by the runtime, and the runtime."""

    backbone: object
    decoder: object
    runtime: object


@dataclass
class Models:
    """The box model (boxes and walks), the point model (clicks; None when it is the box model), and the
    settings they were loaded with (precisions resolved)."""

    box: Loaded
    point: Loaded | None
    settings: ModelSettings


def precision_choices(settings: ModelSettings, device, about=plainly) -> dict:
    """{"dtype": Choice, "encoder_dtype": Choice} (`sambtcv.models.precision`): `auto` becomes what `device`
    computes natively with the runtime that will run the model."""
    for key in ("dtype", "encoder_dtype"):
        with about(key):
            precision.check_setting(getattr(settings, key))
    found = None
    if precision.AUTO in (settings.dtype, settings.encoder_dtype):
        with about("runtime"):
            found = precision.support(device, runtimes.resolve(settings.runtime, device))
    return {k: precision.resolve(getattr(settings, k), found) for k in ("dtype", "encoder_dtype")}


def resolved(settings: ModelSettings, device, about=plainly) -> ModelSettings:
    """`settings` with `auto` precisions replaced by what runs here."""
    choices = precision_choices(settings, device, about)
    return replace(settings, dtype=choices["dtype"].used, encoder_dtype=choices["encoder_dtype"].used)


def runtime_for(settings: ModelSettings, backbone, device, about=plainly):
    """The runtime (`sambtcv.models.runtime.Runtime`) of `backbone` under `settings` (precisions resolved)."""
    with about("runtime"):
        return runtimes.make(settings.runtime, backbone, device, settings.encoder_dtype, settings.dtype)


def load_one(settings: ModelSettings, device, about=plainly, backbone=None) -> Loaded:
    """`settings.model`'s backbone (or the loaded `backbone`), runtime and decoder."""
    from sambtcv.models.backbones import check_model_name, load_backbone
    from sambtcv.models.decoder import load_decoder

    if backbone is None:
        with about("model"):
            check_model_name(settings.model)
        backbone = load_backbone(settings.model, settings.checkpoint, device)
    rt = runtime_for(settings, backbone, device, about)
    with about("finetuned"):
        decoder = load_decoder(backbone, settings.finetuned).to(device)
    return Loaded(backbone, rt.decoder(decoder, "finetuned" if settings.finetuned else "pretrained"), rt)


def load(settings: ModelSettings, device, about=plainly, backbone=None, point_backbone=None) -> Models:
    """The box model and, when `settings.point_model` (or `point_backbone`) names another, the point model
    (pretrained, packaged weights); `backbone` / `point_backbone` reuse loaded ones. Precisions are resolved
    first, so a bad setting fails before any weights are read."""
    from sambtcv.models.backbones import check_model_name

    settings = resolved(settings, device, about)
    if backbone is not None:
        settings = replace(settings, model=backbone.name)
    name = point_backbone.name if point_backbone is not None else settings.point_model
    if name:
        with about("point_model"):
            check_model_name(name)
    box = load_one(settings, device, about, backbone)
    point = None
    if name and name != box.backbone.name:
        point = load_one(replace(settings, model=name, checkpoint=None, finetuned=None), device, about,
                         point_backbone)
    return Models(box, point, settings)
