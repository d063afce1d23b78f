"""The command line of the pages: each page's constants block as flags, profiles, start-up, one-line errors.

This is the one module of the package that deals with flags; everything else raises `PipelineError`
about values, and a page names the flag with ``with cli.flag("--name"): ...``.

A page's configurable constants live in one fenced block at its top::

    # ------------------------------------------------------------------------------------ config
    EPOCHS = 50  # passes over the training samples (>= 1)
    # --------------------------------------------------------------------------------------------

Every ``NAME = value  # comment`` line of that block (and only that block) becomes a flag ``--name``;
the comment is the flag's ``--help`` text, and a bound written in it as ``(>= N)`` is checked before
any work. Every page also takes ``--profile NAME`` (`sambtcv.config`): the profile's values replace the
constants' defaults, and flags given on the command line win over both.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

from sambtcv import config
from sambtcv.errors import PipelineError

CONFIG_OPEN = re.compile(r"^# -+ config\s*$")
CONFIG_CLOSE = re.compile(r"^# -+\s*$")
BOUND = re.compile(r"\(>= (-?\d+(?:\.\d+)?)\)")
PROFILE_HELP = "apply profiles/NAME.toml (its [all] and [<this page>] tables) before the flags; empty: none"


def run_main(main) -> None:
    """Run a page's main(); PipelineError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def flag(name: str):
    """Say the package's errors about a value in the block of the flag `name` that gave it."""
    try:
        yield
    except PipelineError as exc:
        raise exc.about(name) from exc.__cause__


@contextlib.contextmanager
def holding(lock, flag_name: str):
    """Hold a `sambtcv.files.FolderLock` for the block; a failure to take it is said of `flag_name` (the
    block's own errors are not)."""
    with flag(flag_name):
        if hasattr(lock, "acquire"):
            lock.acquire()
    with lock:
        yield lock


def results_folder(root):
    """The results folder's lock (`sambtcv.files.results_lock`) held for the block, errors said of
    --results-dir."""
    from sambtcv.files import results_lock

    return holding(results_lock(root), "--results-dir")


class Config(dict):
    """A page's settings, ``{lower_case_name: value}``, with the names given on the command line
    (`given`) and the nested tables of the profile's section for this page (`tables`)."""

    given: frozenset = frozenset()
    tables: dict = {}


# ---------------------------------------------------------------------------------------------- config block
def config_block(source: str) -> list[tuple[str, str]]:
    """[(NAME, comment)] of the assignments inside a page's fenced config block, in order."""
    lines = source.splitlines()
    start = next((i for i, line in enumerate(lines) if CONFIG_OPEN.match(line)), None)
    if start is None:
        return []
    out = []
    for line in lines[start + 1:]:
        if CONFIG_CLOSE.match(line):
            break
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=", line)
        if m:
            out.append((m.group(1), _comment(line)))
    return out


def _comment(line: str) -> str:
    """The trailing comment of one assignment line ('' if none); a '#' inside a string is not one."""
    tokens = tokenize.generate_tokens(io.StringIO(line).readline)
    try:
        return next((tok.string[1:].strip() for tok in tokens if tok.type == tokenize.COMMENT), "")
    except tokenize.TokenError:
        return ""


def _parser(doc: str, block, values: dict) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bounds = {}
    for name, comment in block:
        value = values[name.lower()]
        flag_name = "--" + name.lower().replace("_", "-")
        kwargs = {"dest": name.lower(), "default": value, "help": comment or " "}
        if isinstance(value, bool):
            parser.add_argument(flag_name, nargs="?", const=True, type=_str2bool, **kwargs)
        else:
            parser.add_argument(flag_name, type=str if value is None else type(value), **kwargs)
        bound = BOUND.search(comment)
        if bound:
            bounds[name.lower()] = float(bound.group(1))
    return parser, bounds


QUIET_LOGGERS = ("monai.data.nvimgcodec_pydicom_plugin",)  # a warning at MONAI's import once pydicom is installed


def quiet_libraries() -> None:
    """Libraries' start-up warnings that say nothing about the user's run (MONAI: "nvImageCodec is not
    available") stay out of the pages' output, so an error is the one line it is meant to be."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_config(module_globals: dict, argv=None, defaults: dict | None = None) -> Config:
    """The page's config block as flags -> `Config` ``{lower_case_name: value}``.

    ``DATA_DIR = None`` becomes ``--data-dir`` (read as a string); a bool constant becomes a flag given
    bare (``--resume``) or with a value (``--resume false``); other types follow the default's type.
    Defaults: the constants, replaced by `defaults` ({lower_case_name: value}) and then by the profile
    that ``--profile`` names (a ``PROFILE`` constant of the page is its default). Abbreviated flags are
    refused; a flag given on the command line always wins.
    """
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    page = Path(module_globals["__file__"]).stem
    block = config_block(Path(module_globals["__file__"]).read_text())
    if "PROFILE" not in {name for name, _ in block}:
        block = [*block, ("PROFILE", PROFILE_HELP)]
    values = {name.lower(): module_globals.get(name, "") for name, _ in block}
    values.update(defaults or {})
    doc = (module_globals.get("__doc__") or "").strip()
    parser, bounds = _parser(doc, block, values)
    profile_name = vars(parser.parse_known_args(argv)[0])["profile"]
    tables = {}
    if profile_name:
        with flag("--profile"):
            profile = config.load_profile(profile_name)
        own, tables = config.profile_section(profile, page)
        unknown = sorted(k for k in profile.get(page, {}) if k not in values and k not in tables)
        if unknown:
            raise PipelineError(f"profiles/{profile_name}.toml [{page}] sets {', '.join(unknown)}, which "
                                f"{page}.py has no constant for; fix the profile")
        values.update({k: v for k, v in own.items() if k in values and k != "profile"})
        parser, bounds = _parser(doc, block, values)
    cfg = Config(vars(parser.parse_args(argv)))
    cfg.given = frozenset(dest for dest in cfg if _given(dest, argv))
    cfg.tables = tables
    _check_numbers(cfg, bounds)
    return cfg


def _given(dest: str, argv: list[str]) -> bool:
    name = "--" + dest.replace("_", "-")
    return any(a == name or a.startswith(name + "=") for a in argv)


def _check_numbers(cfg: dict, bounds: dict) -> None:
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PipelineError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    for key, low in bounds.items():
        if cfg[key] is not None and cfg[key] < low:
            raise PipelineError(f"--{key.replace('_', '-')} must be >= {low:g}, got {cfg[key]}")


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# ---------------------------------------------------------------------------------------------- start-up
def make_runtime(cfg, backbone, device):
    """The page's RUNTIME for `backbone` (`sambtcv.runtime.make`), its errors said of --runtime."""
    from sambtcv import runtime

    with flag("--runtime"):
        return runtime.make(cfg["runtime"], backbone, device, cfg["encoder_dtype"], cfg.get("dtype", "fp32"))


def input_file(path, name: str) -> Path:
    """An existing, readable input file given by the flag `name` (`sambtcv.files.check_input_file`)."""
    from sambtcv import files

    with flag(name):
        return files.check_input_file(path)


def ct_input(path, name: str) -> Path:
    """A CT given by the flag `name`: a NIfTI file, or a DICOM series (a folder of its files, or a .zip)."""
    from sambtcv import dicom, files

    with flag(name):
        p = Path(path)
        if p.is_dir() or (p.is_file() and p.suffix.lower() == ".zip"):
            return p
        if not p.exists():
            raise PipelineError(f"{{subject}} {p} not found", "input")
        if dicom.is_dicom_source(p):
            return p
        return files.check_input_file(p)


def label_map_out(out, inputs: list[Path]) -> Path:
    """--out: a new or replaceable .nii/.nii.gz file (or .dcm, a DICOM SEG, for a DICOM series) in a writable
    folder, never one of the inputs."""
    from sambtcv.volume import check_label_map_path

    with flag("--out"):
        return check_label_map_path(out, inputs)


def walk_settings(cfg):
    """STOP, MARGIN_MM (for MODEL), GUARD (default on) and STRIDE_MM as a `sambtcv.volume.WalkSettings`."""
    from sambtcv.names import check_choice
    from sambtcv.propagation import STOP_RULES
    from sambtcv.volume import WalkSettings, margin_mm, stride_mm

    with flag("--stop"):
        check_choice(cfg["stop"], STOP_RULES, "stop rule")
    with flag("--stride-mm"):
        stride = stride_mm(cfg.get("stride_mm", config.STRIDE_MM))
    with flag("--margin-mm"):
        return WalkSettings(cfg["stop"], margin_mm(cfg["margin_mm"], cfg["model"]), bool(cfg.get("guard", True)),
                            stride)


@dataclass
class Models:
    """The backbone of MODEL / CHECKPOINT, its decoder (FINETUNED's, else the pretrained one) wrapped by
    the runtime, and the runtime (RUNTIME) that runs them."""

    backbone: object
    decoder: object
    runtime: object


def load_models(cfg, device) -> Models:
    """A page's models for inference; a bad model, --finetuned or --runtime fails here, before any data
    is read."""
    from sambtcv.backbones import load_backbone
    from sambtcv.decoder import load_decoder

    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    rt = make_runtime(cfg, backbone, device)
    with flag("--finetuned"):
        decoder = load_decoder(backbone, cfg["finetuned"]).to(device)
    return Models(backbone, rt.decoder(decoder, "finetuned" if cfg["finetuned"] else "pretrained"), rt)


def volume_decoder(case, models: Models, cfg, device):
    """`sambtcv.propagation.VolumeDecoder` of a loaded CT (`sambtcv.volume.Case`) with the page's models,
    CACHE_DIR, DTYPE and ENCODER_DTYPE."""
    return stack_decoder(case.stack, models, cfg, device)


def stack_decoder(stack, models: Models, cfg, device):
    """`sambtcv.propagation.VolumeDecoder` of a (K, H, W) uint8 slice stack with the page's models,
    CACHE_DIR, DTYPE and ENCODER_DTYPE."""
    from sambtcv.propagation import VolumeDecoder

    return VolumeDecoder(stack, models.backbone, models.decoder, cfg["cache_dir"], device, cfg["dtype"],
                         cfg["encoder_dtype"], models.runtime)


@dataclass
class EditorModels:
    """MODEL's models (boxes and walks) and POINT_MODEL's (clicks; None when it is MODEL)."""

    box: Models
    point: Models | None


def load_editor_models(cfg, device) -> EditorModels:
    """MODEL and POINT_MODEL (empty: MODEL) for `editor`; a bad name fails here, before any data is read."""
    from sambtcv.backbones import check_model_name

    box = load_models(cfg, device)
    name = cfg.get("point_model") or cfg["model"]
    with flag("--point-model"):
        check_model_name(name)
    if name == cfg["model"]:
        return EditorModels(box, None)
    return EditorModels(box, load_models({**cfg, "model": name, "checkpoint": None, "finetuned": None}, device))


def edit_rules(cfg, geo, in_range: bool):
    """STOP, MARGIN_MM (for MODEL; `in_range`: walks inside a 3D box's slices), MASK_INPUT, CLICK,
    AFTER_CLICK, CARRY, GATE, GUARD and REPAIR (default on) as `sambtcv.editor.EditRules` for a CT of voxel size `geo`
    (`sambtcv.guard.Geometry`)."""
    from sambtcv.editor import AFTER_CLICK, CLICK_RULES, EditRules
    from sambtcv.names import check_choice
    from sambtcv.propagation import STOP_RULES
    from sambtcv.volume import margin_mm, stride_mm
    from sambtcv.walks import WalkRules

    with flag("--stop"):
        check_choice(cfg["stop"], STOP_RULES, "stop rule")
    with flag("--margin-mm"):
        margin = margin_mm(cfg["margin_mm"], cfg["model"], in_range)
    with flag("--click"):
        check_choice(cfg["click"], CLICK_RULES, "click rule")
    with flag("--after-click"):
        check_choice(cfg["after_click"], AFTER_CLICK, "after-click rule")
    with flag("--stride-mm"):
        stride = stride_mm(cfg.get("stride_mm", config.STRIDE_MM))
    walk = WalkRules(cfg["stop"], margin / geo.pixel_mm, geo, bool(cfg.get("guard", True)), stride)
    return EditRules(walk, bool(cfg["mask_input"]), cfg["click"], cfg["after_click"], bool(cfg.get("carry", True)),
                     bool(cfg.get("gate", True)), bool(cfg.get("repair", True)))


def editor(stack, models: EditorModels, cfg, device, geo, in_range: bool = True):
    """The engine (`sambtcv.editor.Editor`) on a (K, H, W) slice stack with the page's models and rules."""
    from sambtcv.editor import Editor

    point = stack_decoder(stack, models.point, cfg, device) if models.point is not None else None
    return Editor(stack_decoder(stack, models.box, cfg, device), edit_rules(cfg, geo, in_range), point)



PRECISION_FLAGS = ("dtype", "encoder_dtype")  # DTYPE / ENCODER_DTYPE: auto | fp32 | bf16


def start_run(cfg: dict):
    """What every page does first: check the precision flags (before any work), allocator tuning,
    seeds, device, and `resolve_precision`. Returns the torch.device."""
    from sambtcv import device as dev
    from sambtcv import precision

    for key in PRECISION_FLAGS:
        if key in cfg:
            with flag("--" + key.replace("_", "-")):
                precision.check_setting(cfg[key])
    dev.tune_allocator()
    dev.seed_everything(cfg["seed"])
    with flag("--device"):
        device = dev.pick_device(cfg.get("device"))
    resolve_precision(cfg, device)
    return device


def resolve_precision(cfg: dict, device) -> dict:
    """Replace ``auto`` in cfg's DTYPE / ENCODER_DTYPE by the precision that the device (and the page's
    RUNTIME) computes natively (`sambtcv.precision`); note the choices for the records, print them once.
    Returns {"dtype": Choice, ...}."""
    from sambtcv import precision

    keys = [k for k in PRECISION_FLAGS if k in cfg]
    found = None
    if any(cfg[k] == precision.AUTO for k in keys):
        found = precision.support(device, _runtime_name(cfg, device))
    choices = {k: precision.resolve(cfg[k], found) for k in keys}
    for k, choice in choices.items():
        cfg[k] = choice.used
    precision.note(choices)
    if found is not None:
        used = sorted({c.used for c in choices.values()})
        print(f"precision: {'/'.join(used)} (auto: {found.detail})", flush=True)
    return choices


def _runtime_name(cfg: dict, device) -> str:
    """The runtime that runs the page's inference ("torch" for pages without RUNTIME)."""
    if "runtime" not in cfg:
        return "torch"
    from sambtcv import runtime

    with flag("--runtime"):
        return runtime.resolve(cfg["runtime"], device)


def split_cases(cfg) -> tuple[list, tuple]:
    """--data-dir's --split cases [(case, image, label)] and --window-hu, checked: the split named, not
    empty, every case readable and on its label's grid, before any work."""
    from sambtcv.data import check_geometry, find_cases, parse_window
    from sambtcv.names import SPLITS, check_choice

    with flag("--split"):
        check_choice(cfg["split"], SPLITS, "split")
    cases = find_cases(Path(cfg["data_dir"]))[cfg["split"]]
    if not cases:
        raise PipelineError(f"the {cfg['split']} split of {cfg['data_dir']} has no cases")
    with flag("--window-hu"):
        window = parse_window(cfg["window_hu"])
    for _, image, label in cases:
        check_geometry(image, label)
    return cases, window
