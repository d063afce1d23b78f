"""Everything the pipeline writes: atomic files, folder locks, checkpoints, Markdown, and the results
layout (every output file name, defined once).

Guarantees kept here: a file is written to a temporary name in its folder and renamed into place
(readers see the old or the new file, never half of one), with the user's umask; a folder is only
replaced when this project wrote it; one process at a time writes a results folder or fills an
embedding cache (`exclusive`); checkpoints hold plain data only and load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from cli import PipelineError

TEMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|partial)$")  # names of our own temporary files/folders
LOCK_FILE = ".lock"
LOCKS_ENV = "SAM_BTCV_HELD_LOCKS"  # lock tokens a parent process holds for its child stages
CLEANED_SUBFOLDERS = ("figures", "volumes")  # besides the folder itself; run folders clean their own
CHECKPOINT_FORMAT = "sam-btcv-checkpoint-1"
CHECKPOINT_KINDS = ("finetune", "classifier", "baseline")


# ---------------------------------------------------------------------------------------------- atomic writes
@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path, header, rows) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def write_bytes(path, payload: bytes) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure atomically (PNG) and close it."""
    import matplotlib.pyplot as plt

    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def read_json(path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read {what} {path}: {exc}; delete it or write it again") from exc


def remove_stale_temps(folder) -> list[Path]:
    """Delete the temporary files and folders this project left directly in `folder` when a run was
    killed mid-write (its own name pattern only). Call it only while holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMP_PATTERN.match(p.name)]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------------- folders
def check_replaceable(final, marker: str, flag: str) -> None:
    """Refuse, before any work, to replace `final` unless this project wrote it (it holds `marker`) or
    it is an empty folder."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise PipelineError(f"{flag} {final} is a file, not a folder; choose another {flag}")
    if not (final / marker).is_file() and any(final.iterdir()):
        raise PipelineError(f"{flag} {final} exists and was not written by this project (no {marker}); "
                            f"choose another {flag} or empty that folder yourself")


@contextlib.contextmanager
def staged_dir(final, marker: str, flag: str = "--out-dir"):
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` whole.

    `final` is replaced only when this project wrote it (`check_replaceable`). On any error the
    temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    check_replaceable(final, marker, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_writable_dir(folder, flag: str) -> Path:
    """Create `folder` if needed and prove it writable now, before any expensive work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(f"{flag} {folder} is not writable ({exc.strerror}); choose a folder you can write") from exc
    return folder


def check_can_create(path, flag: str) -> None:
    """Prove now, creating nothing, that the file `path` can be written later: its nearest existing folder
    is a folder and writable (missing folders below it are made when the file is written)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PipelineError(f"{flag} {path} lies below {folder}, which is a file; choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(f"{flag} {path} cannot be written ({folder}: {exc.strerror}); choose a folder you "
                            f"can write") from exc


@contextlib.contextmanager
def exclusive(folder, what: str, flag: str):
    """Hold an exclusive lock on `folder` (a ``.lock`` file in it) for the block.

    A second process fails at once with one line naming the holder. A child stage that run_report.py
    starts inherits its parent's locks (LOCKS_ENV), so it proceeds. Temporary files that a killed run
    left in the folder are removed once the lock is held.
    """
    created = not Path(folder).exists()
    folder = ensure_writable_dir(folder, flag)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip()
            token = holder.split(" ", 1)[0]
            if token and token in os.environ.get(LOCKS_ENV, "").split(","):
                yield  # our parent holds it for us
                return
            raise PipelineError(f"{what} {folder} is in use by another run ({holder.split(' ', 1)[-1]}); "
                                f"wait for it to finish or use another {flag}") from None
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        os.ftruncate(fd, 0)
        os.write(fd, f"{token} pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n".encode())
        os.fsync(fd)
        for sub in ("", *CLEANED_SUBFOLDERS):
            remove_stale_temps(folder / sub)
        held = [t for t in os.environ.get(LOCKS_ENV, "").split(",") if t]
        os.environ[LOCKS_ENV] = ",".join([*held, token])
        try:
            yield
        except BaseException:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # a run that wrote nothing
                path.unlink()
                folder.rmdir()
            raise
        finally:
            os.environ[LOCKS_ENV] = ",".join(held)
    finally:
        os.close(fd)


def results_lock(root):
    """The results folder's lock for this process: taken by the main process (rank 0 under torchrun),
    which alone writes; a no-op on the other ranks."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return exclusive(root, "results folder", "--results-dir")


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, kind: str, state: dict) -> Path:
    """Write a checkpoint of `kind` (see CHECKPOINT_KINDS): tensors, numbers, strings, lists and dicts
    only, so that it loads with ``weights_only=True``."""
    assert kind in CHECKPOINT_KINDS, kind
    payload = {"format": CHECKPOINT_FORMAT, "kind": kind, **state}
    return _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, kind: str, flag: str = "checkpoint") -> dict:
    """A checkpoint this project wrote, of `kind`, loaded safely; anything else fails with one line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{flag} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding code objects (refused)
        raise PipelineError(f"{flag} {path} is not a checkpoint this project can read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{flag} {path} is not a sam-btcv checkpoint (model weights or another program's "
                            f"file?); pass the best.pt that the matching script wrote")
    if state.get("kind") != kind:
        raise PipelineError(f"{flag} {path} is a {state.get('kind')} checkpoint, not a {kind} checkpoint")
    return state


# ---------------------------------------------------------------------------------------------- outputs
def fixed(value, digits: int) -> str | None:
    """`value` with `digits` decimals for a table cell; None (an empty cell) stays None."""
    return None if value is None else f"{value:.{digits}f}"


def markdown_table(header, rows, floatfmt: str = "{:.4f}") -> str:
    """A GitHub Markdown table; floats formatted with `floatfmt`, None shown as '-'."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if v != v else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Results:
    """The results folder: every output name of CONTRACT.md, defined once.

    ``Results(R).table("table1", "json")`` is ``R/table1_zero_shot.json``; ``figure("fig1")`` is
    ``R/figures/fig1_curve_one_central_point.png``; run folders hold ``best.pt``, ``last.pt``,
    ``epochs.csv``.
    """

    TABLES = {"table1": "table1_zero_shot", "table2": "table2_finetune", "table3": "table3_comparison",
              "table4": "table4_classification", "volume_3d": "volume_3d", "bench": "bench",
              "baselines": "baselines"}
    FIGURES = {"fig1": "fig1_curve_one_central_point.png", "fig2": "fig2_curve_bound_box.png",
               "fig3": "fig3_classification_example.png", "confusion": "confusion_matrix.png"}
    CURVES = {"one_central_point": "fig1", "bound_box": "fig2"}  # Figures 1 and 2: training curves per prompt

    def __init__(self, root):
        self.root = Path(root)

    def table(self, name: str, ext: str) -> Path:
        return self.root / f"{self.TABLES[name]}.{ext}"

    def figure(self, name: str) -> Path:
        return self.root / "figures" / self.FIGURES.get(name, f"{name}.png")

    def overlay(self, prompt_type: str) -> Path:
        return self.figure(f"task1_overlay_{prompt_type}")

    def finetune_run(self, prompt_type: str) -> Path:
        return self.root / "finetune" / prompt_type

    @property
    def classifier_run(self) -> Path:
        return self.root / "classifier"

    def baseline_run(self, model: str) -> Path:
        return self.root / "baselines" / model

    def zero_shot_of(self, model: str) -> "Results":
        """Where run_report.py puts Table 1 of a second model, beside the main one."""
        return Results(self.root / f"zero_shot_{model}")

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"

    @staticmethod
    def best(run_dir) -> Path:
        return Path(run_dir) / "best.pt"

    @staticmethod
    def last(run_dir) -> Path:
        return Path(run_dir) / "last.pt"

    @staticmethod
    def epochs_csv(run_dir) -> Path:
        return Path(run_dir) / "epochs.csv"
