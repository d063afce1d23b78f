"""OpenVINO inference runtime (CPU) for the image encoder and the prompt decoder (``--runtime openvino``).

`OpenVinoEncoder` replaces ``backbone.sam.image_encoder`` and `OpenVinoDecoder` replaces a
`sambtcv.models.decoder.PromptedDecoder` for inference: same inputs, same outputs (float32 CPU tensors). The
PyTorch modules are converted with ``openvino.convert_model`` (from a ``torch.jit.trace``) once and kept
on disk; everything around them (slice resize and normalisation before the encoder, the crop/resize of
the decoder's low-res masks to the slice after it) stays in `sambtcv.models.backbones.InputFrame`.

Graphs:

* encoder: one graph of input ``(1, 3, S, S)``; a batch is encoded one image at a time. (TinyViT's code
  takes the batch size as a Python int, ``len(x)``, so a traced graph cannot have a dynamic batch; on
  a CPU one image per call is as fast per image as a batch.)
* decoder: one graph per prompt kind that is used (``box``, ``points``, ``points-box``; each single- or
  multimask), converted when first needed, each with a dynamic batch (and a dynamic number of points);
  input shapes that recur also get a graph compiled for exactly them (`_DecoderGraph`: faster).
  While tracing, the prompt encoder's point and box embedding run as an equivalent without in-place
  boolean-index writes (which OpenVINO cannot convert); the arithmetic is the same, so the masks are
  the decoder's own (`_traceable_prompts`).

Precision: "fp32" compiles with ``INFERENCE_PRECISION_HINT = f32`` (OpenVINO's default on a CPU with
bf16 instructions is bf16, which is not fp32), "bf16" with ``INFERENCE_PRECISION_HINT = bf16``. The
files on disk always hold float32 weights (``compress_to_fp16=False``). Other compile settings
(`compile_config`): ``PERFORMANCE_HINT = LATENCY`` (one stream, all threads on one request, as the
pipeline makes one call at a time) and ``INFERENCE_NUM_THREADS`` = ``torch.get_num_threads()`` (by
default every core, as PyTorch; OMP_NUM_THREADS or ``torch.set_num_threads`` set both runtimes). CPU
pinning and the rest are OpenVINO's defaults.

Disk cache: ``<cache_dir>/openvino/<kind>-<key>/`` holds ``model.xml``, ``model.bin`` and ``meta.json``
(what the model is, the OpenVINO version, and the size and SHA-256 of both files). One folder per
(weights identity, precision, input size, graph kind). A conversion holds the folder's lock
(`sambtcv.core.files.exclusive`), writes into a temporary folder inside it, moves the two files into place
and writes ``meta.json`` last; loading reads both files once, checks them against ``meta.json`` and
compiles exactly those bytes, so a half-written, truncated or edited file is found and converted again
(with a printed note).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sambtcv.core.device import check_precision
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import exclusive, write_json

FORMAT = 1  # bump when the graphs built here change: cached models of another format are converted again
SUBFOLDER = "openvino"
HINTS = {"fp32": "f32", "bf16": "bf16"}  # project precision -> OpenVINO INFERENCE_PRECISION_HINT
OPENVINO_PIN = "openvino==2026.4.1"  # as requirements.txt
FILES = ("model.xml", "model.bin")
META = "meta.json"


# ---------------------------------------------------------------------------------------------- openvino itself
def check_openvino() -> None:
    """Raise PipelineError (one line, how to fix) unless OpenVINO imports and has its CPU device."""
    try:
        ov = load_openvino()
        devices = _core().available_devices
    except Exception as exc:  # ImportError, a broken install (missing shared libraries), plugin errors
        text = str(exc).strip()
        detail = f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__
        raise PipelineError(f"{{subject}} openvino needs the openvino package, which does not load ({detail}); "
                            f"install it (pip install {OPENVINO_PIN}, as requirements.txt) or use {{subject}} torch",
                            "runtime") from None
    if "CPU" not in devices:
        raise PipelineError(f"{{subject}} openvino found no CPU device (openvino {ov.__version__} lists "
                            f"{', '.join(devices) or 'none'}); reinstall {OPENVINO_PIN} or use {{subject}} torch",
                            "runtime")


@contextlib.contextmanager
def _no_telemetry():
    """OpenVINO's converter reports usage (``openvino_telemetry``: on import and at each conversion step, each
    message from a background thread that forks the process to reach the internet for up to 3 s, and
    files under ~/intel/). A forked child holds copies of every open file, the folder locks included,
    so a lock released here stays taken until the child ends (another run, or this one, then finds
    the folder "in use"). Its own switch for CI jobs turns it off: ``CI=true`` while it decides."""
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


def load_openvino():
    """The openvino module, imported with its telemetry off (`_no_telemetry`)."""
    with _no_telemetry():
        import openvino
    return openvino


_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        _CORE = load_openvino().Core()
    return _CORE


def _version() -> str:
    return load_openvino().__version__


def cpu_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (``BF16`` where it computes bf16 natively)."""
    return [str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def threads() -> int:
    """Inference threads: PyTorch's own number (all cores by default; OMP_NUM_THREADS or
    ``torch.set_num_threads`` change both runtimes at once, so torchrun's ranks do not oversubscribe)."""
    return max(1, torch.get_num_threads())


def compile_model(model, precision: str):
    """`model` compiled for the CPU with `compile_config`."""
    return _core().compile_model(model, "CPU", compile_config(precision))


def compile_config(precision: str) -> dict:
    """The properties every model here is compiled with (see the module's docstring)."""
    if precision not in HINTS:
        check_precision(precision)  # the project's one message for an unknown precision
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads()}


# ---------------------------------------------------------------------------------------------- disk cache
def _safe(text: str, limit: int = 80) -> str:
    """A folder-name-safe form of `text` (long or odd ones shortened with a hash)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"
    if len(clean) > limit or clean != text:
        clean = f"{clean[:limit - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return clean


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _note(text: str) -> None:
    print(f"openvino: {text}", flush=True)


class CachedModel:
    """One converted graph on disk: ``<root>/<SUBFOLDER>/<kind>-<key>/`` (see the module's docstring).

    `model(convert)` returns the ``openvino.Model``, converting with ``convert()`` (-> an
    ``openvino.Model``) when the files are missing, corrupt or of another format. ``converted`` says
    whether this object converted (False: loaded from the cache).
    """

    def __init__(self, root, kind: str, key: str, describe: str, meta: dict, progress: bool = True):
        self.folder = Path(root) / SUBFOLDER / f"{kind}-{_safe(key)}"
        self.kind, self.describe, self.progress = kind, describe, progress
        self.meta = {"format": FORMAT, "kind": kind, "key": key, "openvino": _version(), **meta}
        self.converted = False
        self.seconds = 0.0  # conversion time (0 when loaded)

    def _read(self):
        """(xml bytes, bin bytes) when the files are there and match meta.json, else (None, reason)."""
        try:
            meta = json.loads((self.folder / META).read_text())
        except FileNotFoundError:
            return None, "not converted yet"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None, f"{META} is unreadable"
        files = meta.pop("files", None) if isinstance(meta, dict) else None
        if meta != self.meta:
            changed = sorted(k for k in set(meta) | set(self.meta) if meta.get(k) != self.meta.get(k))
            return None, f"it was made with other settings ({', '.join(changed)})"
        payload = []
        for name in FILES:
            try:
                data = (self.folder / name).read_bytes()
            except OSError:
                return None, f"{name} is missing"
            want = (files or {}).get(name, {})
            if len(data) != want.get("bytes") or _digest(data) != want.get("sha256"):
                return None, f"{name} does not match its checksum (corrupt or changed)"
            payload.append(data)
        return tuple(payload), None

    def model(self, convert):
        """The ``openvino.Model``: read from the cache when its files check out, else converted and stored."""
        ov = load_openvino()

        payload, _ = self._read()
        if payload is None:
            with exclusive(self.folder, f"OpenVINO model cache ({self.describe})"):
                payload, reason = self._read()  # another run may have converted it meanwhile
                if payload is None:
                    return self._convert(convert, reason)
        xml, weights = payload
        return _core().read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, np.uint8)))

    def _convert(self, convert, reason: str):
        ov = load_openvino()

        first = reason == "not converted yet"
        _note(f"converting the {self.describe} for OpenVINO into {self.folder}"
              + ("" if first else f" ({reason}; converting it again)") + " ...")
        t0 = time.perf_counter()
        with warnings.catch_warnings(), _no_telemetry():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints in the models' code
            model = convert()
        tmp = Path(tempfile.mkdtemp(prefix=".model.", suffix=".partial", dir=self.folder))
        try:
            ov.save_model(model, tmp / FILES[0], compress_to_fp16=False)
            files = {}
            for name in FILES:
                data = (tmp / name).read_bytes()
                files[name] = {"bytes": len(data), "sha256": _digest(data)}
            (self.folder / META).unlink(missing_ok=True)  # files and meta.json never disagree unnoticed
            for name in FILES:
                os.replace(tmp / name, self.folder / name)
            write_json(self.folder / META, {**self.meta, "files": files})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.converted = True
        self.seconds = time.perf_counter() - t0
        if self.progress:
            _note(f"{self.describe} converted in {self.seconds:.1f} s")
        return model


# ---------------------------------------------------------------------------------------------- encoder
class OpenVinoEncoder:
    """Callable: (B, 3, S, S) float32 tensor, already normalised exactly as backbone.sam.preprocess makes it
    (the input to sam.image_encoder) -> (B, 256, E, E) float32 torch tensor on the CPU.

    The graph is cached under ``<cache_dir>/openvino/encoder-<backbone.key>-<precision>-<S>/``.
    ``converted`` is True when this construction converted the model (False: loaded from the cache).
    """

    def __init__(self, backbone, precision: str, cache_dir, progress: bool = True):
        check_precision(precision)
        check_openvino()
        self.size = int(backbone.img_size)
        self.precision = precision
        self.cache = CachedModel(cache_dir, "encoder", f"{backbone.key}-{precision}-{self.size}",
                                 f"image encoder of {backbone.name}", {"precision": precision, "input": self.size},
                                 progress)
        encoder = backbone.sam.image_encoder
        self._compiled = compile_model(self.cache.model(lambda: _convert_encoder(encoder, self.size)), precision)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one call at a time

    @property
    def converted(self) -> bool:
        return self.cache.converted

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"expected a (B, 3, {self.size}, {self.size}) batch, got {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        out = []
        with self._lock:
            for i in range(x.shape[0]):
                self._request.infer({0: x[i:i + 1]})
                out.append(torch.from_numpy(self._request.get_output_tensor(0).data.copy()))
        return torch.cat(out)


@contextlib.contextmanager
def _no_autocast():
    """Tracing inside a caller's bf16 autocast would record autocast ops OpenVINO cannot convert; the graph
    is traced in fp32 (autocast off, and the tracer's own autocast pass off) and OpenVINO applies the
    precision itself."""
    jit_mode = torch._C._jit_set_autocast_mode(False)
    try:
        with torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch._C._jit_set_autocast_mode(jit_mode)


def _convert_encoder(encoder: nn.Module, size: int):
    """The encoder traced as it is (channels_last weights trace in 2/3 of the time of contiguous ones, same
    graph) on one zero image; a CPU copy in eval mode if it is training or on another device."""
    ov = load_openvino()

    on_cpu = next(encoder.parameters()).device.type == "cpu"
    module = encoder if on_cpu and not encoder.training else copy.deepcopy(encoder).cpu().eval()
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), _no_autocast():
        traced = torch.jit.trace(module, example, check_trace=False)
        return ov.convert_model(traced, example_input=example, input=[ov.PartialShape([1, 3, size, size])])


# ---------------------------------------------------------------------------------------------- decoder
def _embed_points(self, points, labels, pad):
    """segment_anything's PromptEncoder._embed_points without in-place boolean-index writes: where
    replaces ``x[labels == -1] = 0; x[labels == -1] += w`` and the adds, value for value."""
    points = points + 0.5  # shift to the centre of the pixel
    if pad:
        points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
    emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
    lab = labels[..., None]
    emb = torch.where(lab == -1, self.not_a_point_embed.weight.expand_as(emb), emb)
    emb = torch.where(lab == 0, emb + self.point_embeddings[0].weight, emb)
    return torch.where(lab == 1, emb + self.point_embeddings[1].weight, emb)


def _embed_boxes(self, boxes):
    """segment_anything's PromptEncoder._embed_boxes without in-place slice writes (same values)."""
    coords = (boxes + 0.5).reshape(-1, 2, 2)
    emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
    return emb + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])


@contextlib.contextmanager
def _traceable_prompts(prompt_encoder: nn.Module):
    """The prompt encoder's point/box embedding as `_embed_points` / `_embed_boxes` for the block."""
    prompt_encoder._embed_points = types.MethodType(_embed_points, prompt_encoder)
    prompt_encoder._embed_boxes = types.MethodType(_embed_boxes, prompt_encoder)
    try:
        yield
    finally:
        del prompt_encoder._embed_points, prompt_encoder._embed_boxes


class _Graph(nn.Module):
    """decoder(embeddings, <prompt tensors>, multimask) with the prompt inputs of one kind as arguments."""

    def __init__(self, decoder: nn.Module, names: tuple, multimask: bool):
        super().__init__()
        self.decoder, self.names, self.multimask = decoder, names, multimask

    def forward(self, embeddings, *prompts):
        out = self.decoder(embeddings, multimask=self.multimask, **dict(zip(self.names, prompts)))
        return tuple(out)


STATIC_AFTER = 2  # calls with one set of input shapes before a graph compiled for exactly those shapes runs them
STATIC_KEEP = 4  # such graphs kept per prompt kind (the least recently used goes)


class _DecoderGraph:
    """One prompt kind's decoder graph: compiled for dynamic shapes, and compiled again for exactly one set
    of input shapes (batch, points) once those shapes come back: OpenVINO's CPU plugin runs static shapes
    faster (MobileSAM, one box, one core: 61 ms static, 97 ms dynamic). A shape seen once (an interactive
    click with one more point) runs on the dynamic graph, with no compile wait."""

    def __init__(self, model, precision: str):
        self.model, self.precision = model, precision
        self.dynamic = compile_model(model, precision).create_infer_request()
        self.seen = collections.Counter()
        self.static = collections.OrderedDict()  # shapes -> infer request

    def request(self, shapes: tuple):
        if shapes in self.static:
            self.static.move_to_end(shapes)
            return self.static[shapes]
        self.seen[shapes] += 1
        if self.seen[shapes] < STATIC_AFTER:
            return self.dynamic
        fixed = self.model.clone()
        fixed.reshape({port: load_openvino().PartialShape(list(shape)) for port, shape in zip(fixed.inputs, shapes)})
        self.static[shapes] = compile_model(fixed, self.precision).create_infer_request()
        if len(self.static) > STATIC_KEEP:
            self.static.popitem(last=False)
        return self.static[shapes]


PROMPT_INPUTS = {"box": ("boxes",), "points": ("points", "point_labels"),
                 "points-box": ("points", "point_labels", "boxes")}
PROMPT_INPUTS.update({f"{kind}-mask": (*names, "mask_input") for kind, names in list(PROMPT_INPUTS.items())})
INPUT_SHAPES = {"points": [-1, -1, 2], "point_labels": [-1, -1], "boxes": [-1, 4], "mask_input": [-1, 1, -1, -1]}


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class OpenVinoDecoder:
    """Same call as sambtcv.models.decoder.PromptedDecoder.forward(embeddings, points=None, point_labels=None,
    boxes=None, multimask=False) -> (low-res mask logits (B, K, 256, 256), iou (B, K)) as float32 torch
    tensors on the CPU; K = 3 if multimask else 1. Inputs are input-frame coordinates, exactly what
    PromptedDecoder gets. A subclass whose forward takes the same arguments converts too, and returns
    what its forward returns (`sambtcv.models.classifier.ClassifyingDecoder`: masks, IoU and class logits).

    Each prompt kind (box / points / points and box, single- or multimask) is its own graph, converted
    (or loaded from ``<cache_dir>/openvino/decoder-<kind>-<identity>-<precision>-<S>-<weights>/``) on its
    first call. `identity` names the decoder's weights (e.g. the backbone's key, plus the finetuned
    checkpoint); a digest of the weights themselves is part of the folder name too, so other weights
    under one identity never load a stale graph. ``conversions`` lists the graphs this object
    converted (empty: all came from the cache). The decoder is copied at construction: graphs converted
    later hold the weights it had then. ``eval()`` and ``to()`` are there so callers that treat it as a
    module need no branch. Calls are serialised (one infer request per graph).
    """

    def __init__(self, decoder, identity: str, precision: str, cache_dir, progress: bool = True):
        check_precision(precision)
        check_openvino()
        self.decoder = copy.deepcopy(decoder).float().cpu().eval()  # the weights as they are now, for later graphs
        self.identity, self.precision, self.cache_dir, self.progress = identity, precision, cache_dir, progress
        pe = self.decoder.prompt_encoder
        self.size = int(pe.input_image_size[0])
        self.embed_hw = tuple(int(v) for v in pe.image_embedding_size)
        self.weights = _weights_digest(self.decoder)
        self.conversions: list[str] = []
        self._graphs = {}  # (kind, multimask) -> _DecoderGraph
        self._lock = threading.Lock()  # one infer request per graph: one call at a time

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def graph(self, kind: str, multimask: bool) -> _DecoderGraph:
        """The graph of one prompt kind (converted or loaded, and compiled, on first use)."""
        name = f"{kind}{'-multi' if multimask else ''}"
        if (kind, multimask) not in self._graphs:
            cache = CachedModel(self.cache_dir, f"decoder-{name}",
                                f"{self.identity}-{self.precision}-{self.size}-{self.weights}",
                                f"prompt decoder ({name} prompts) of {self.identity}",
                                {"precision": self.precision, "input": self.size, "weights": self.weights},
                                self.progress)
            model = cache.model(lambda: self._convert(kind, multimask))
            if cache.converted:
                self.conversions.append(name)
            self._graphs[kind, multimask] = _DecoderGraph(model, self.precision)
        return self._graphs[kind, multimask]

    def _convert(self, kind: str, multimask: bool):
        ov = load_openvino()

        names = PROMPT_INPUTS[kind]
        module = self.decoder
        b, n = 2, 3
        lowres = 4 * self.embed_hw[0]
        example = {"boxes": torch.tensor([[8.0, 16.0, 100.0, 120.0], [40.0, 30.0, 200.0, 210.0]]) * self.size / 256,
                   "points": torch.rand(b, n, 2, generator=torch.Generator().manual_seed(0)) * self.size,
                   "point_labels": torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
                   "mask_input": torch.randn(b, 1, lowres, lowres, generator=torch.Generator().manual_seed(0))}
        args = (torch.zeros(b, 256, *self.embed_hw), *(example[k] for k in names))
        shapes = [ov.PartialShape([-1, 256, *self.embed_hw])] + [ov.PartialShape(INPUT_SHAPES[k]) for k in names]
        with torch.no_grad(), _no_autocast():
            with _traceable_prompts(module.prompt_encoder):
                traced = torch.jit.trace(_Graph(module, names, multimask), args, check_trace=False)
            return ov.convert_model(traced, example_input=args, input=shapes)

    def __call__(self, embeddings, points=None, point_labels=None, boxes=None, multimask: bool = False,
                 mask_input=None):
        return self.forward(embeddings, points, point_labels, boxes, multimask, mask_input)

    def forward(self, embeddings, points=None, point_labels=None, boxes=None, multimask: bool = False,
                mask_input=None):
        if points is not None and point_labels is None:
            raise ValueError("points need point_labels")
        if points is None and boxes is None:
            raise ValueError("the OpenVINO decoder needs points or boxes")
        kind = "box" if points is None else ("points" if boxes is None else "points-box")
        kind += "" if mask_input is None else "-mask"
        given = {"points": points, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        inputs = [_array(embeddings)] + [_array(given[k]) for k in PROMPT_INPUTS[kind]]
        if inputs[0].ndim != 4 or inputs[0].shape[1:] != (256, *self.embed_hw):
            raise ValueError(f"expected (B, 256, {self.embed_hw[0]}, {self.embed_hw[1]}) embeddings, "
                             f"got {inputs[0].shape}")
        with self._lock:
            request = self.graph(kind, bool(multimask)).request(tuple(a.shape for a in inputs))
            request.infer(inputs)
            return tuple(torch.from_numpy(request.get_output_tensor(i).data.copy())
                         for i in range(len(request.model_outputs)))


def _array(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu", torch.float32)
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))
