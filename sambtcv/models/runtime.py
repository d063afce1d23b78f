"""Which runtime runs the image encoder and the prompt decoder for inference: PyTorch or OpenVINO (CPU).

`resolve(name, device)` turns the RUNTIME setting into "torch" or "openvino": "auto" is OpenVINO on a
CPU where it loads (bench.py measures it faster there, with the same masks) and PyTorch on a GPU;
"openvino" on a GPU, or an OpenVINO that does not load when asked for by name, is one line, never a
silent fallback. `Runtime` carries what the pages hand to the engine: an encoder callable for the
embedding caches (None: PyTorch) and a way to wrap a decoder. Training stays in PyTorch; what it
trains runs in either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.names import check_choice

RUNTIMES = ("auto", "torch", "openvino")


def resolve(name: str, device) -> str:
    """"torch" or "openvino" for the RUNTIME setting `name` on `device`."""
    check_choice(name, RUNTIMES, "runtime")
    on_gpu = torch.device(device).type != "cpu"
    if name == "openvino":
        if on_gpu:
            raise PipelineError("{subject} openvino runs on the CPU only; use {subject} torch (or auto) with a GPU",
                                "runtime")
        from sambtcv.models.openvino_runtime import check_openvino

        check_openvino()
        return "openvino"
    if name == "torch" or on_gpu:
        return "torch"
    try:
        from sambtcv.models.openvino_runtime import check_openvino

        check_openvino()
    except PipelineError as exc:
        print(f"note: runtime auto uses torch: {exc}", flush=True)
        return "torch"
    return "openvino"


@dataclass
class Runtime:
    """A resolved runtime for one backbone: `name` ("torch" | "openvino"), `encoder` (None for PyTorch, else
    a callable on normalised (B, 3, S, S) batches) and the precisions it was built for."""

    name: str
    backbone: object
    encoder_dtype: str
    dtype: str
    encoder: object = None
    cache_dir: str = config.OPENVINO_CACHE

    def decoder(self, decoder, identity: str):
        """`decoder` (a PromptedDecoder or subclass) as this runtime runs it; `identity` names its weights."""
        if self.name == "torch":
            return decoder
        from sambtcv.models.openvino_runtime import OpenVinoDecoder

        return OpenVinoDecoder(decoder, f"{self.backbone.key}-{identity}", self.dtype, self.cache_dir)


def make(name: str, backbone, device, encoder_dtype: str, dtype: str, cache_dir=config.OPENVINO_CACHE) -> Runtime:
    """The runtime `name` (RUNTIMES) for `backbone`: converts (once, cached in `cache_dir`) or loads the
    OpenVINO encoder when it is OpenVINO's."""
    resolved = resolve(name, device)
    encoder = None
    if resolved == "openvino":
        from sambtcv.models.openvino_runtime import OpenVinoEncoder

        encoder = OpenVinoEncoder(backbone, encoder_dtype, cache_dir)
    return Runtime(resolved, backbone, encoder_dtype, dtype, encoder, cache_dir)
