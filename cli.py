"""Command line and run start-up: each script's constants block as flags, seeds, device, one-line errors.

A script's configurable constants live in one fenced block at its top::

    # ------------------------------------------------------------------------------------ config
    EPOCHS = 50  # passes over the training samples (>= 1)
    # --------------------------------------------------------------------------------------------

Every ``NAME = value  # comment`` line of that block (and only that block) becomes a flag
``--name``; the comment is the flag's ``--help`` text, and a bound written in it as ``(>= N)`` is
checked before any work. The defaults that several scripts share are defined here once
(``DEFAULT_*``) and named in each script's own block.
"""
from __future__ import annotations

import argparse
import io
import math
import random
import re
import sys
import tokenize
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------- shared defaults
DEFAULT_MODEL = "mobilesam"
DEFAULT_SLICES = "data/slices"
DEFAULT_RESULTS_DIR = "results"
DEFAULT_SEED = 0
DEFAULT_DEVICE = ""  # empty: cuda when present, else cpu
DEFAULT_DTYPE = "fp32"
DEFAULT_ENCODE_BATCH = 1
DEFAULT_DECODE_BATCH = 8
PRECISIONS = ("fp32", "bf16")  # values of --dtype (decoder) and --encoder-dtype (encoder pass)

CONFIG_OPEN = re.compile(r"^# -+ config\s*$")
CONFIG_CLOSE = re.compile(r"^# -+\s*$")
BOUND = re.compile(r"\(>= (-?\d+(?:\.\d+)?)\)")


class PipelineError(Exception):
    """A user-facing problem: printed as one line by `run_main`, exit status 2."""


def run_main(main) -> None:
    """Run a script's main(); PipelineError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------- config
def config_block(source: str) -> list[tuple[str, str]]:
    """[(NAME, comment)] of the assignments inside a script's fenced config block, in order."""
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


def parse_config(module_globals: dict, argv=None, defaults: dict | None = None) -> dict:
    """The script's config block as flags -> ``{lower_case_name: value}``.

    ``DATA_DIR = None`` becomes ``--data-dir`` (read as a string); a bool constant becomes a flag given
    bare (``--resume``) or with a value (``--resume false``); other types follow the default's type.
    `defaults` ({lower_case_name: value}) replaces some defaults (bench.py's --quick sizes); flags on
    the command line still win. Abbreviated flags are refused.
    """
    block = config_block(Path(module_globals["__file__"]).read_text())
    doc = (module_globals.get("__doc__") or "").strip()
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bounds = {}
    for name, comment in block:
        value = module_globals[name]
        if defaults and name.lower() in defaults:
            value = defaults[name.lower()]
        flag = "--" + name.lower().replace("_", "-")
        kwargs = {"dest": name.lower(), "default": value, "help": comment or " "}
        if isinstance(value, bool):
            parser.add_argument(flag, nargs="?", const=True, type=_str2bool, **kwargs)
        else:
            parser.add_argument(flag, type=str if value is None else type(value), **kwargs)
        bound = BOUND.search(comment)
        if bound:
            bounds[name.lower()] = float(bound.group(1))
    cfg = vars(parser.parse_args(argv))
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PipelineError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    for key, low in bounds.items():
        if cfg[key] is not None and cfg[key] < low:
            raise PipelineError(f"--{key.replace('_', '-')} must be >= {low:g}, got {cfg[key]}")
    return cfg


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# ---------------------------------------------------------------------------------------------- start-up
def start_run(cfg: dict) -> torch.device:
    """What every script does first: check the precision flags (before any work), allocator tuning,
    seeds, device."""
    for key in ("dtype", "encoder_dtype"):
        if key in cfg:
            check_precision(cfg[key], "--" + key.replace("_", "-"))
    tune_allocator()
    seed_everything(cfg["seed"])
    return pick_device(cfg.get("device"))


def tune_allocator() -> None:
    """Keep freed tensor memory in the process instead of returning it to the OS after every op.

    With glibc's default (mmap/munmap for every large tensor) page faults dominate the encoder's time
    on small CPUs; `bench.py` measures the encoder with this setting. No effect on results.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 33)
        libc.mallopt(m_top_pad, 1 << 28)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    """'cuda' when present unless told otherwise; asking for cuda without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown --device {name!r}; use cpu or cuda")
    return torch.device(name)


def check_precision(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in PRECISIONS:
        raise PipelineError(f"unknown {flag} {dtype!r}; use {' or '.join(PRECISIONS)}")


def check_choice(value: str, choices, flag: str) -> str:
    """One of `choices`, or a one-line error naming the flag."""
    if value not in choices:
        raise PipelineError(f"unknown {flag} {value!r}; use {' or '.join(map(str, choices))}")
    return value
