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

from sambtcv.core.errors import PipelineError

TEMP_PATTERN = re.compile(r"^\..+\.(p\d+-)?[a-z0-9_]{8}\.(tmp|partial)$")  # our own temporary files/folders
OWN_TEMP = re.compile(r"^\.(?P<name>.+)\.p(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")  # a temp file naming its writer
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}-", suffix=".tmp", dir=path.parent)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(path) -> list[Path]:
    """Delete the temporary files that writes of `path` left beside it when their process was killed
    mid-write (our own name pattern for that file only, writer no longer running)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = []
    for p in path.parent.iterdir():
        m = OWN_TEMP.match(p.name)
        if m and m["name"] == path.name and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


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
def check_replaceable(final, marker: str, what: str = "output folder") -> None:
    """Refuse, before any work, to replace `final` unless this project wrote it (it holds `marker`) or
    it is an empty folder."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise PipelineError(f"{{subject}} {final} is a file, not a folder; choose another {{subject}}", what)
    if not (final / marker).is_file() and any(final.iterdir()):
        raise PipelineError(f"{{subject}} {final} exists and was not written by this project (no {marker}); "
                            f"choose another {{subject}} or empty that folder yourself", what)


@contextlib.contextmanager
def staged_dir(final, marker: str):
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` whole.

    `final` is replaced only when this project wrote it (`check_replaceable`). On any error the
    temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    check_replaceable(final, marker)
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


def ensure_writable_dir(folder, what: str = "folder") -> Path:
    """Create `folder` if needed and prove it writable now, before any expensive work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(f"{{subject}} {folder} is not writable ({exc.strerror}); choose a folder you can write",
                            what) from exc
    return folder


def check_can_create(path, what: str = "output file") -> None:
    """Prove now, creating nothing, that the file `path` can be written later: its nearest existing folder
    is a folder and writable (missing folders below it are made when the file is written)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PipelineError(f"{{subject}} {path} lies below {folder}, which is a file; choose another path", what)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(f"{{subject}} {path} cannot be written ({folder}: {exc.strerror}); choose a folder you "
                            f"can write", what) from exc


class FolderLock:
    """An exclusive lock on `folder` (a ``.lock`` file in it), held from `acquire` to `release` (or for a
    ``with`` block, which acquires it if it is not held yet).

    A second process fails at once with one line naming the holder. A child stage that run_report.py
    starts inherits its parent's locks (LOCKS_ENV), so it proceeds. Temporary files that a killed run
    left in the folder are removed once the lock is held. A folder this lock created, which is still
    empty when a failed block releases it, is removed again.
    """

    def __init__(self, folder, what: str):
        self.folder, self.what = Path(folder), what
        self._fd = None
        self._held = None  # LOCKS_ENV before we added our token (None: not held by us)
        self._created = False

    def acquire(self) -> "FolderLock":
        self._created = not self.folder.exists()
        ensure_writable_dir(self.folder, "folder")
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip()
            os.close(fd)
            token = holder.split(" ", 1)[0]
            if token and token in os.environ.get(LOCKS_ENV, "").split(","):
                return self  # our parent holds it for us
            raise PipelineError(f"{self.what} {self.folder} is in use by another run ({holder.split(' ', 1)[-1]}); "
                                f"wait for it to finish or use another {{subject}}", "folder") from None
        self._fd = fd
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        os.ftruncate(fd, 0)
        os.write(fd, f"{token} pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n".encode())
        os.fsync(fd)
        for sub in ("", *CLEANED_SUBFOLDERS):
            remove_stale_temps(self.folder / sub)
        self._held = os.environ.get(LOCKS_ENV, "")
        os.environ[LOCKS_ENV] = ",".join([t for t in self._held.split(",") if t] + [token])
        return self

    def release(self, failed: bool = False) -> None:
        if self._fd is None:
            return
        os.environ[LOCKS_ENV] = self._held
        if failed and self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            (self.folder / LOCK_FILE).unlink()  # a run that wrote nothing leaves no folder
            self.folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)


def check_input_file(path) -> Path:
    """An existing regular file (not a folder or a device), or one line saying which."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{{subject}} {path} not found", "input file")
    if not path.is_file():
        raise PipelineError(f"{{subject}} {path} is not a regular file (a folder or a device?); give a file",
                            "input file")
    return path


def exclusive(folder, what: str) -> FolderLock:
    """`FolderLock` of `folder` (use as ``with exclusive(folder, "cache"):``)."""
    return FolderLock(folder, what)


def results_lock(root) -> FolderLock | contextlib.nullcontext:
    """The results folder's lock for this process: taken by the main process (rank 0 under torchrun),
    which alone writes; a no-op on the other ranks."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return FolderLock(root, "results folder")


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, kind: str, state: dict) -> Path:
    """Write a checkpoint of `kind` (see CHECKPOINT_KINDS): tensors, numbers, strings, lists and dicts
    only, so that it loads with ``weights_only=True``."""
    assert kind in CHECKPOINT_KINDS, kind
    payload = {"format": CHECKPOINT_FORMAT, "kind": kind, **state}
    return _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, kind: str) -> dict:
    """A checkpoint this project wrote, of `kind`, loaded safely; anything else fails with one line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{{subject}} not found: {path}", "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding code objects (refused)
        raise PipelineError(f"{{subject}} {path} is not a checkpoint this project can read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
                            "checkpoint") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{{subject}} {path} is not a sam-btcv checkpoint (model weights or another program's "
                            f"file?); pass the best.pt that the matching script wrote", "checkpoint")
    if state.get("kind") != kind:
        raise PipelineError(f"{{subject}} {path} is a {state.get('kind')} checkpoint, not a {kind} checkpoint",
                            "checkpoint")
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
              "baselines": "baselines", "study_3d": "study_3d", "interactive_3d": "interactive_3d"}
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
