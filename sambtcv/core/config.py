"""One home for configuration: the defaults that the package and several pages share, and the profiles.

A page's constants block names these defaults (``MODEL = config.MODEL  # ...``); library functions take
their defaults from here too, so a default is written once. A *profile* is a small TOML file in
``profiles/`` (``quick.toml``, ``full.toml``, ``smoke.toml``): its ``[all]`` table sets constants that
every page has (a page ignores the ones it lacks), and a table named after a page (``[finetune_task2]``)
sets that page's own constants. Every page takes ``--profile NAME``; `sambtcv.cli.parse_config` applies
it (profile over the page's constants, flags given on the command line over both).
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from sambtcv.core.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]  # the repository: pages, profiles/, checkpoints/, data/
PROFILES_DIR = ROOT / "profiles"

# ---------------------------------------------------------------------------------------------- shared defaults
MODEL = "mobilesam"  # the default backbone (sambtcv.models.backbones.BACKBONES)
SLICES = "data/slices"
RESULTS_DIR = "results"
SEED = 0
DEVICE = ""  # empty: cuda when present, else cpu
DTYPE = "fp32"
PRECISIONS = ("fp32", "bf16")  # decoder autocast (--dtype) and encoder autocast (--encoder-dtype)
ENCODE_BATCH = 1  # slices per image-encoder pass
DECODE_BATCH = 8  # prompts per decoder pass
EVAL_BATCH = 32  # prompts per decoder pass when a library caller does not say
# preprocessing
WINDOW_HU = "-160,240"  # abdominal window W400/L40, as MedSAM/LiteMedSAM were trained (MONAI's BTCV: -175,250)
ORIENTATION = "LPS"  # canonical axes; a slice is vol[:, :, k].T: anterior up, patient right on the left
VAL_FRACTION = 0.2  # without dataset_0.json: the last 20% of cases by sorted id are validation
# the report's finetuning recipe (Task 2): SGD
FINETUNE_LR = 0.1
FINETUNE_MOMENTUM = 0.9
FINETUNE_WEIGHT_DECAY = 1e-4
BASELINE_WEIGHT_DECAY = 1e-4  # AdamW weight decay of Table 3's baselines
# 3D
CACHE_DIR_3D = "data/embeddings_3d"  # image embeddings of whole volumes, by content, model and dtype
STOP = "intensity"  # the rule that ends a 3D walk (engine.propagation.STOP_RULES; MEASUREMENTS 6)
STRIDE_MM = 0.0  # > 0: a 3D box's first walk encodes a slice every this many mm, fills the rest; off (MEASUREMENTS 13)
POINT_MASK = "smallest"  # which of SAM's three masks a point prompt keeps (sambtcv.models.decoder.POINT_MASK_RULES)
RUNTIME = "auto"  # inference runtime of the encoder and the prompt decoder: auto | torch | openvino
OPENVINO_CACHE = "data/model_cache"  # OpenVINO models converted from the weights (sambtcv.models.openvino_runtime)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name: str) -> dict:
    """The profile ``profiles/<name>.toml`` as a dict of tables; one line for an unknown or broken one."""
    path = PROFILES_DIR / f"{name}.toml"
    if not name or "/" in name or not path.is_file():
        raise PipelineError(f"unknown {{subject}} {name!r}; use one of {', '.join(profile_names())}",
                            subject="profile")
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"cannot read the profile {path}: {exc}") from exc


def profile_section(profile: dict, page: str) -> tuple[dict, dict]:
    """(values for `page`'s constants, nested tables of its section) from a loaded profile: ``[all]``
    first, then ``[<page>]``."""
    values = {k: v for k, v in profile.get("all", {}).items() if not isinstance(v, dict)}
    own = profile.get(page, {})
    values.update({k: v for k, v in own.items() if not isinstance(v, dict)})
    tables = {k: v for k, v in own.items() if isinstance(v, dict)}
    return values, tables
