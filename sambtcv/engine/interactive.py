"""The viewer's engine settings: the models every open volume shares, where embeddings are cached, and the
rules of walks and clicks (`Engine`, made by `load_engine` as segment_volume.py and predict_segfm.py load
their models).

The rest of the viewer lives by job: `sambtcv.engine.anchors` (what was given per slice, anchors),
`sambtcv.engine.editor` and `sambtcv.engine.walks` (what a box, a click, a stroke and a walk do),
`sambtcv.engine.background` (the model gate and background encoding), and above the engine
`sambtcv.servers.sessions` (open volumes, undo, the walk thread) and `sambtcv.servers.server` (HTTP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sambtcv.core import config
from sambtcv.core.names import check_choice
from sambtcv.data.btcv import parse_window
from sambtcv.engine.background import ModelGate
from sambtcv.engine.propagation import STOP_RULES
from sambtcv.engine.volume import WalkSettings, margin_mm, stride_mm


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
    runtime: object = None  # sambtcv.models.runtime.Runtime (None: PyTorch)
    point: PointModel | None = None
    click: str = "local"  # sambtcv.engine.editor.CLICK_RULES
    mask_input: bool = True

    @property
    def model(self) -> str:
        return self.backbone.name

    @property
    def point_model(self) -> str:
        return self.point.backbone.name if self.point is not None else self.model

    def rules(self, geo):
        """The editor's rules for a CT of voxel size `geo` (`sambtcv.engine.guard.Geometry`;
        `sambtcv.engine.editor.EditRules`)."""
        from sambtcv.engine.editor import EditRules

        return EditRules(self.walk.rules(geo), self.mask_input, self.click)


def walk_settings(stop: str, margin, model: str, stride=config.STRIDE_MM) -> WalkSettings:
    check_choice(stop, STOP_RULES, "stop rule")
    return WalkSettings(stop, margin_mm(margin, model), stride_mm=stride_mm(stride))


def load_engine(model: str = config.MODEL, checkpoint=None, finetuned=None, device=None, dtype: str = config.DTYPE,
                encoder_dtype: str = config.DTYPE, cache_dir=config.CACHE_DIR_3D, stop: str = config.STOP,
                margin="auto", window=config.WINDOW_HU, backbone=None, runtime: str = config.RUNTIME,
                point_model: str = "", point_backbone=None, click: str = "local", mask_input: bool = True,
                stride=config.STRIDE_MM) -> Engine:
    """The models (`sambtcv.models.loading.load`, as the pages load theirs) and the walk's and clicks' settings;
    `backbone` / `point_backbone` reuse loaded ones; `runtime` (auto | torch | openvino) runs the encoders and
    decoders; `point_model` (empty: the box model) answers clicks; `stride` (mm, 0: every slice) is a first
    walk's step (`sambtcv.engine.walks.WalkRules`)."""
    import torch

    from sambtcv.core.device import pick_device
    from sambtcv.engine.editor import CLICK_RULES
    from sambtcv.models import loading

    device = pick_device(device) if not isinstance(device, torch.device) else device
    settings = loading.ModelSettings(model, checkpoint, finetuned, runtime, dtype, encoder_dtype, point_model)
    check_choice(click, CLICK_RULES, "click rule")
    walk = walk_settings(stop, margin, backbone.name if backbone is not None else model, stride)
    models = loading.load(settings, device, backbone=backbone, point_backbone=point_backbone)
    box, point = models.box, models.point
    point = PointModel(point.backbone, point.decoder, point.runtime) if point is not None else None
    return Engine(box.backbone, box.decoder, device, models.settings.dtype, models.settings.encoder_dtype,
                  Path(cache_dir), walk, parse_window(window) if isinstance(window, str) else tuple(window),
                  runtime=box.runtime, point=point, click=click, mask_input=mask_input)
