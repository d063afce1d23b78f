"""The contract's names (docs/CONTRACT.md): organs, prompt types, splits, and the checks of names."""
from __future__ import annotations

from sambtcv.core.errors import PipelineError

ORGANS = [
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_veins", "pancreas", "right_adrenal_gland",
    "left_adrenal_gland",
]
NUM_ORGANS = len(ORGANS)  # label ids 1..13, 0 is background
ORGAN_ID = {name: i + 1 for i, name in enumerate(ORGANS)}
PROMPT_TYPES = ["one_central_point", "one_random_point", "three_random_points", "bound_box", "larger_box"]
POINT_PROMPTS = {"one_central_point": 1, "one_random_point": 1, "three_random_points": 3}
SPLITS = ("train", "val")
ALL = "all"


def organ_name(organ_id: int) -> str:
    assert 1 <= organ_id <= NUM_ORGANS, f"organ id {organ_id} outside 1..{NUM_ORGANS}"
    return ORGANS[organ_id - 1]


def check_choice(value, choices, what: str):
    """`value` if it is one of `choices`, else one line: "unknown <what> 'x'; use a or b"."""
    if value not in choices:
        raise PipelineError(f"unknown {{subject}} {value!r}; use {' or '.join(map(str, choices))}", subject=what)
    return value


def name_list(text: str, choices, what: str, allow_all: bool = True) -> list[str]:
    """'all' (when allowed) or a comma list of names from `choices` -> the names in `choices`' order,
    each once. An empty list, an unknown name or 'all' inside a list is one line."""
    text = str(text).strip()
    if allow_all and text == ALL:
        return list(choices)
    names = [v.strip() for v in text.split(",")]
    listing = f"a comma list of {', '.join(choices)}"
    use = f"'{ALL}' or {listing}" if allow_all else listing
    if not text or not all(names):
        raise PipelineError(f"{{subject}} must be {use}, got {text!r}", subject=what)
    if allow_all and ALL in names:
        raise PipelineError(f"{{subject}}: '{ALL}' cannot be combined with other names in {text!r}; use '{ALL}' "
                            f"alone or {listing}", subject=what)
    for name in names:
        if name not in choices:
            raise PipelineError(f"unknown {{subject}} {name!r} in {text!r}; use {use}", subject=what)
    return [c for c in choices if c in names]


def prompt_types_arg(value: str) -> list[str]:
    """'all' or one prompt name (or a comma list) -> list of prompt names, in the report's order."""
    return name_list(value, PROMPT_TYPES, "prompt type")


def organ_ids_arg(value: str) -> list[int]:
    """'all' or a comma list of organ names -> their BTCV ids, in id order."""
    return [ORGAN_ID[n] for n in name_list(value, ORGANS, "organ")]


def one_prompt_type(value: str) -> str:
    """Exactly one prompt type (Task 3 and the classifier's check are trained on one)."""
    prompts = prompt_types_arg(value)
    if len(prompts) != 1:
        raise PipelineError(f"{{subject}} takes one prompt type, got {value!r}", subject="prompt type")
    return prompts[0]


def report_order(keys) -> list:
    """Table keys: prompt types in the report's order, then any other keys (model names) in their order."""
    keys = list(keys)
    return [p for p in PROMPT_TYPES if p in keys] + [k for k in keys if k not in PROMPT_TYPES]
