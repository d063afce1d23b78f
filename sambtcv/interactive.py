"""The viewer's engine settings: the models every open volume shares, where embeddings are cached, and the
rules of walks and clicks (`Engine`, made by `load_engine` as segment_volume.py and predict_segfm.py load
their models).

The rest of the viewer lives by job: `sambtcv.anchors` (what was given per slice, anchors),
`sambtcv.editor` and `sambtcv.walks` (what a box, a click, a stroke and a walk do), `sambtcv.sessions`
(open volumes, undo, the walk thread), `sambtcv.background` (the model gate and background encoding),
`sambtcv.server` (HTTP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sambtcv import config
from sambtcv.background import ModelGate
from sambtcv.data import parse_window
from sambtcv.names import check_choice
from sambtcv.propagation import STOP_RULES
from sambtcv.volume import WalkSettings, margin_mm, stride_mm


@dataclass
class PointModel:
    """The model that answers clicks, when it is not the box model."""

    backbone: object
    decoder: object
    runtime: object = None


@dataclass
class Engine:
    """What every session shares: the models, where embeddings are cached, the walk's and clicks' rules."""

    backbone: object
    decoder: object
    device: object
    dtype: str = config.DTYPE
    encoder_dtype: str = config.DTYPE
    cache_dir: Path = Path(config.CACHE_DIR_3D)
    walk: WalkSettings = WalkSettings("intensity", 4.0)
    window: tuple = (-160.0, 240.0)
    gate: ModelGate = field(default_factory=ModelGate)
    runtime: object = None  # sambtcv.runtime.Runtime (None: PyTorch)
    point: PointModel | None = None
    click: str = "local"  # sambtcv.editor.CLICK_RULES
    mask_input: bool = True

    @property
    def model(self) -> str:
        return self.backbone.name

    @property
    def point_model(self) -> str:
        return self.point.backbone.name if self.point is not None else self.model

    def rules(self, geo):
        """The editor's rules for a CT of voxel size `geo` (`sambtcv.guard.Geometry`; `sambtcv.editor.EditRules`)."""
        from sambtcv.editor import EditRules
        from sambtcv.walks import WalkRules

        walk = WalkRules(self.walk.stop, self.walk.margin_mm / geo.pixel_mm, geo, self.walk.guard, self.walk.stride_mm)
        return EditRules(walk, self.mask_input, self.click)


def walk_settings(stop: str, margin, model: str, stride=config.STRIDE_MM) -> WalkSettings:
    check_choice(stop, STOP_RULES, "stop rule")
    return WalkSettings(stop, margin_mm(margin, model), stride_mm=stride_mm(stride))


def load_engine(model: str = config.MODEL, checkpoint=None, finetuned=None, device=None, dtype: str = config.DTYPE,
                encoder_dtype: str = config.DTYPE, cache_dir=config.CACHE_DIR_3D, stop: str = config.STOP,
                margin="auto", window=config.WINDOW_HU, backbone=None, runtime: str = config.RUNTIME,
                point_model: str = "", point_backbone=None, click: str = "local", mask_input: bool = True,
                stride=config.STRIDE_MM) -> Engine:
    """The models and settings (as segment_volume.py loads them); `backbone` / `point_backbone` reuse loaded
    ones; `runtime` (auto | torch | openvino) runs the encoders and decoders; `point_model` (empty: the
    box model) answers clicks; `stride` (mm, 0: every slice) is a first walk's step (`sambtcv.walks.WalkRules`);
    dtype "auto" is resolved as the pages resolve it (`sambtcv.precision`)."""
    import torch

    from sambtcv import precision
    from sambtcv import runtime as runtimes
    from sambtcv.backbones import check_model_name, load_backbone
    from sambtcv.decoder import load_decoder
    from sambtcv.device import pick_device
    from sambtcv.editor import CLICK_RULES

    device = pick_device(device) if not isinstance(device, torch.device) else device
    if precision.AUTO in (dtype, encoder_dtype):
        found = precision.support(device, runtimes.resolve(runtime, device))
        dtype, encoder_dtype = (precision.resolve(v, found).used for v in (dtype, encoder_dtype))
    for v in (dtype, encoder_dtype):
        precision.check_setting(v)
    check_choice(click, CLICK_RULES, "click rule")
    walk = walk_settings(stop, margin, backbone.name if backbone is not None else model, stride)
    if backbone is None:
        backbone = load_backbone(model, checkpoint, device)
    rt = runtimes.make(runtime, backbone, device, encoder_dtype, dtype)
    decoder = rt.decoder(load_decoder(backbone, finetuned).to(device), "finetuned" if finetuned else "pretrained")
    point = None
    name = point_backbone.name if point_backbone is not None else point_model
    if name and name != backbone.name:
        check_model_name(name)
        pb = point_backbone if point_backbone is not None else load_backbone(name, None, device)
        prt = runtimes.make(runtime, pb, device, encoder_dtype, dtype)
        point = PointModel(pb, prt.decoder(load_decoder(pb).to(device), "pretrained"), prt)
    return Engine(backbone, decoder, device, dtype, encoder_dtype, Path(cache_dir), walk,
                  parse_window(window) if isinstance(window, str) else tuple(window), runtime=rt, point=point,
                  click=click, mask_input=mask_input)
