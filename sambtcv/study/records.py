"""Results as records: each stage run writes one self-describing record that nothing edits afterwards.

A record is ``RESULTS/records/<stage>/<id>.json``::

    {"format": "sam-btcv-record-1", "id": ..., "stage": ..., "created": ..., "command": [...],
     "code": {"version": ..., "git": ...}, "settings": {...}, "slices": {"id": ..., "data": ...},
     "result": {...}}

``settings`` are the run's full settings (what was computed, not where or how fast), ``slices`` the
identity and description of the data it was computed on, ``result`` its numbers. A record is written
once under a new name (atomically) and never rewritten, merged or deleted by the project. The
contract's tables (``table1_zero_shot.json`` ...) and ``REPORT.md`` are views that `sambtcv.study.tables`
and `sambtcv.study.report` build from records; every row of a view says which record it comes from.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from sambtcv.core.config import ROOT
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import write_json
from sambtcv.models import precision as precision_choices

FORMAT = "sam-btcv-record-1"
RECORDS_DIR = "records"
STAGES = ("task1", "task2", "baselines", "task3_train", "task3", "volume_3d", "report", "bench", "study_3d",
          "interactive_3d")
# settings that say where or how fast a run went, never what it computed: not part of a run's identity
NOT_RESULT_SETTINGS = frozenset({"results_dir", "device", "decode_batch", "encode_batch", "eval_batch",
                                 "overlay_slices", "resume", "cache_dir", "slices", "profile"})


@dataclass(frozen=True)
class Record:
    """One record as read back (`data` is the whole JSON object)."""

    path: Path
    data: dict

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def stage(self) -> str:
        return self.data["stage"]

    @property
    def settings(self) -> dict:
        return self.data["settings"]

    @property
    def result(self) -> dict:
        return self.data["result"]

    @property
    def slices(self) -> dict:
        return self.data.get("slices") or {}

    @property
    def identity(self) -> dict:
        """The settings that decide what was computed (`NOT_RESULT_SETTINGS` left out), with the data's id."""
        ident = {k: v for k, v in self.settings.items() if k not in NOT_RESULT_SETTINGS}
        return {**ident, "slices_id": self.slices.get("id")}


def files_digest(paths, root: Path = ROOT) -> str:
    """16 hex digits of sha256 over the files' paths (relative to `root`) and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The code that made a record: a hash of the package and the pages, and the git commit when the
    project is a git checkout (with "+changes" when files differ from it)."""
    git = None
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            git = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": files_digest([*ROOT.glob("*.py"), *(ROOT / "sambtcv").rglob("*.py")]), "git": git}


def plain(obj):
    """JSON types only (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(obj, default=str))


def folder(root, stage: str) -> Path:
    return Path(root) / RECORDS_DIR / stage


def write_record(root, stage: str, settings: dict, result: dict, slices: dict | None = None,
                 precision: dict | None = None) -> Record:
    """Write a new record of `stage` into the results folder `root` and return it. `precision` says how its
    DTYPE / ENCODER_DTYPE were chosen ({"dtype": {"used", "asked", "reason"}}; default: what this process's
    `sambtcv.cli.start_run` chose)."""
    assert stage in STAGES, stage
    now = datetime.now()
    created = now.isoformat(timespec="microseconds")  # orders records written within one second
    rid = f"{now.strftime('%Y%m%d-%H%M%S')}-{stage}-{uuid.uuid4().hex[:8]}"
    data = {"format": FORMAT, "id": rid, "stage": stage, "created": created, "command": [os.path.basename(sys.argv[0]),
            *sys.argv[1:]], "code": code_version(), "settings": plain(settings), "slices": plain(slices or {}),
            "result": plain(result)}
    chosen = precision_choices.noted() if precision is None else precision
    if chosen:  # how this run's precision was chosen (settings hold the precision used, never "auto")
        data["precision"] = chosen
    path = folder(root, stage) / f"{rid}.json"
    assert not path.exists(), path  # ids are unique: a record is never rewritten
    write_json(path, data)
    return Record(path, data)


def read(path) -> Record:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read the record {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PipelineError(f"{path} is not a sam-btcv record")
    return Record(path, data)


def records(root, stage: str) -> list[Record]:
    """All records of `stage` in the results folder `root`, oldest first."""
    return sorted((read(p) for p in folder(root, stage).glob("*.json")), key=lambda r: (r.data["created"], r.id))


def latest(root, stage: str, where=None) -> Record | None:
    """The newest record of `stage` (for which `where(record)` holds, when given), or None."""
    found = [r for r in records(root, stage) if where is None or where(r)]
    return found[-1] if found else None


def reusable(root, stage: str, settings: dict, slices_id: str, covers: tuple = ()) -> Record | None:
    """The newest record of `stage` that computed what `settings` on the data `slices_id` would: the same
    identity as a whole (`Record.identity`), except that for each key in `covers` (a list, such as the
    prompt types) the record's list may hold more than asked."""
    want = {k: v for k, v in plain(settings).items() if k not in NOT_RESULT_SETTINGS}
    want["slices_id"] = slices_id

    def same(r: Record) -> bool:
        have = r.identity
        if {k: v for k, v in have.items() if k not in covers} != {k: v for k, v in want.items() if k not in covers}:
            return False
        return all(set(want.get(k, [])) <= set(have.get(k, [])) for k in covers)

    return latest(root, stage, same)
