"""The command line of the pages: each page's constants block as flags, profiles, start-up, one-line errors.

This is the one module of the package that deals with flags; everything else raises `PipelineError`
about values, and a page names the flag with ``with cli.flag("--name"): ...``.

A page's configurable constants live in one fenced block at its top::

    # ------------------------------------------------------------------------------------ config
    EPOCHS = 50  # passes over the training samples (>= 1)
    # --------------------------------------------------------------------------------------------

Every ``NAME = value  # comment`` line of that block (and only that block) becomes a flag ``--name``;
the comment is the flag's ``--help`` text, and a bound written in it as ``(>= N)`` is checked before
any work. Every page also takes ``--profile NAME`` (`sambtcv.core.config`): the profile's values replace the
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
from pathlib import Path

from sambtcv.core import config
from sambtcv.core.errors import PipelineError

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
    """Hold a `sambtcv.core.files.FolderLock` for the block; a failure to take it is said of `flag_name` (the
    block's own errors are not)."""
    with flag(flag_name):
        if hasattr(lock, "acquire"):
            lock.acquire()
    with lock:
        yield lock


def results_folder(root):
    """The results folder's lock (`sambtcv.core.files.results_lock`) held for the block, errors said of
    --results-dir."""
    from sambtcv.core.files import results_lock

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
def about_flag(setting: str):
    """`sambtcv.models.loading`'s `about`: a loading step's error said of the page's flag for `setting`."""
    return flag("--" + setting.replace("_", "-"))


def make_runtime(cfg, backbone, device):
    """The page's RUNTIME for `backbone` (`sambtcv.models.loading.runtime_for`), its errors said of --runtime."""
    from sambtcv.models import loading

    return loading.runtime_for(loading.ModelSettings.of(cfg), backbone, device, about_flag)


def input_file(path, name: str) -> Path:
    """An existing, readable input file given by the flag `name` (`sambtcv.core.files.check_input_file`)."""
    from sambtcv.core import files

    with flag(name):
        return files.check_input_file(path)


def ct_input(path, name: str) -> Path:
    """A CT given by the flag `name`: a NIfTI file, or a DICOM series (a folder of its files, or a .zip)."""
    from sambtcv.core import files
    from sambtcv.data import dicom

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
    from sambtcv.engine.volume import check_label_map_path

    with flag("--out"):
        return check_label_map_path(out, inputs)


def walk_settings(cfg, in_range: bool = False):
    """STOP, MARGIN_MM (for MODEL; `in_range`: walks inside a 3D box's slices), GUARD (default on) and STRIDE_MM as
    a `sambtcv.engine.volume.WalkSettings`."""
    from sambtcv.core.names import check_choice
    from sambtcv.engine.propagation import STOP_RULES
    from sambtcv.engine.volume import WalkSettings, margin_mm, stride_mm

    with flag("--stop"):
        check_choice(cfg["stop"], STOP_RULES, "stop rule")
    with flag("--stride-mm"):
        stride = stride_mm(cfg.get("stride_mm", config.STRIDE_MM))
    with flag("--margin-mm"):
        return WalkSettings(cfg["stop"], margin_mm(cfg["margin_mm"], cfg["model"], in_range),
                            bool(cfg.get("guard", True)), stride)


def load_models(cfg, device):
    """A page's models for inference (`sambtcv.models.loading.Loaded`: MODEL / CHECKPOINT's backbone, FINETUNED's
    decoder, RUNTIME); a bad model, --finetuned or --runtime fails here, before any data is read."""
    from sambtcv.models import loading

    return loading.load_one(loading.ModelSettings.of(cfg), device, about_flag)


def volume_decoder(case, models, cfg, device):
    """`sambtcv.engine.propagation.VolumeDecoder` of a loaded CT (`sambtcv.engine.volume.Case`) with the page's models,
    CACHE_DIR, DTYPE and ENCODER_DTYPE."""
    return stack_decoder(case.stack, models, cfg, device)


def stack_decoder(stack, models, cfg, device):
    """`sambtcv.engine.propagation.VolumeDecoder` of a (K, H, W) uint8 slice stack with the page's models,
    CACHE_DIR, DTYPE and ENCODER_DTYPE."""
    from sambtcv.engine.propagation import VolumeDecoder

    return VolumeDecoder(stack, models.backbone, models.decoder, cfg["cache_dir"], device, cfg["dtype"],
                         cfg["encoder_dtype"], models.runtime)


def load_editor_models(cfg, device):
    """MODEL and POINT_MODEL (empty: MODEL) for `editor` (`sambtcv.models.loading.Models`); a bad name fails here,
    before any data is read."""
    from sambtcv.models import loading

    return loading.load(loading.ModelSettings.of(cfg), device, about_flag)


def edit_rules(cfg, geo, in_range: bool):
    """STOP, MARGIN_MM (for MODEL; `in_range`: walks inside a 3D box's slices), MASK_INPUT, CLICK,
    AFTER_CLICK, CARRY, GATE, GUARD and REPAIR (default on) as `sambtcv.engine.editor.EditRules`
    for a CT of voxel size `geo` (`sambtcv.engine.guard.Geometry`)."""
    from sambtcv.core.names import check_choice
    from sambtcv.engine.editor import AFTER_CLICK, CLICK_RULES, EditRules

    walk = walk_settings(cfg, in_range).rules(geo)
    with flag("--click"):
        check_choice(cfg["click"], CLICK_RULES, "click rule")
    with flag("--after-click"):
        check_choice(cfg["after_click"], AFTER_CLICK, "after-click rule")
    return EditRules(walk, bool(cfg["mask_input"]), cfg["click"], cfg["after_click"], bool(cfg.get("carry", True)),
                     bool(cfg.get("gate", True)), bool(cfg.get("repair", True)))


def editor(stack, models, cfg, device, geo, in_range: bool = True):
    """The engine (`sambtcv.engine.editor.Editor`) on a (K, H, W) slice stack with the page's models and rules."""
    from sambtcv.engine.editor import Editor

    point = stack_decoder(stack, models.point, cfg, device) if models.point is not None else None
    return Editor(stack_decoder(stack, models.box, cfg, device), edit_rules(cfg, geo, in_range), point)


PRECISION_FLAGS = ("dtype", "encoder_dtype")  # DTYPE / ENCODER_DTYPE: auto | fp32 | bf16


def start_run(cfg: dict):
    """What every page does first: check the precision flags (before any work), allocator tuning,
    seeds, device, and `resolve_precision`. Returns the torch.device."""
    from sambtcv.core import device as dev
    from sambtcv.models import precision

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
    RUNTIME; PyTorch for pages without one) computes natively (`sambtcv.models.loading.precision_choices`);
    note the choices for the records, print them once. Returns {"dtype": Choice, ...}."""
    from sambtcv.models import loading, precision

    keys = [k for k in PRECISION_FLAGS if k in cfg]
    asked = loading.ModelSettings(**{k: cfg.get(k, "fp32") for k in PRECISION_FLAGS},
                                  runtime=cfg.get("runtime", "torch"))
    choices = {k: v for k, v in loading.precision_choices(asked, device, about_flag).items() if k in keys}
    for k, choice in choices.items():
        cfg[k] = choice.used
    precision.note(choices)
    auto = [c for c in choices.values() if c.asked == precision.AUTO]
    if auto:
        print(f"precision: {'/'.join(sorted({c.used for c in choices.values()}))} (auto: {auto[0].reason})",
              flush=True)
    return choices


def split_cases(cfg) -> tuple[list, tuple]:
    """--data-dir's --split cases [(case, image, label)] and --window-hu, checked: the split named, not
    empty, every case readable and on its label's grid, before any work."""
    from sambtcv.core.names import SPLITS, check_choice
    from sambtcv.data.btcv import check_geometry, find_cases, parse_window

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
