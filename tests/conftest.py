"""Shared fixtures: a tiny phantom written and preprocessed once per test session."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest


def _share_the_cores_between_workers():
    """Under pytest-xdist (`-n N`) each worker, and every process it starts, computes on its share of the
    cores: N workers of all-core thread pools on one CPU would slow each other many times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


_share_the_cores_between_workers()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
from sambtcv.cli import quiet_libraries  # noqa: E402

quiet_libraries()
TINY_SHAPE = (80, 80, 8)  # voxels of each test phantom volume: few slices, fast to encode
TINY_VOLUMES = 3  # two training cases and one validation case


@pytest.fixture(scope="session")
def raw_phantom(tmp_path_factory):
    from sambtcv.data.phantom import write_phantom

    raw = tmp_path_factory.mktemp("raw")
    write_phantom(raw, TINY_VOLUMES, seed=3, shape=TINY_SHAPE)
    return raw


@pytest.fixture(scope="session")
def tiny_slices(raw_phantom, tmp_path_factory):
    from sambtcv.data.btcv import preprocess

    out = tmp_path_factory.mktemp("slices") / "slices"
    preprocess(raw_phantom, out)
    return out


def slices_copy(slices: Path, dst: Path) -> Path:
    """A copy of a slices folder without its embedding cache (so the next run encodes from cold)."""
    import shutil

    shutil.copytree(slices, dst, ignore=shutil.ignore_patterns("embeddings"))
    return dst


@pytest.fixture
def cold(tiny_slices, tmp_path) -> Path:
    """A private copy of the tiny slices without any embedding cache."""
    return slices_copy(tiny_slices, tmp_path / "slices")


@pytest.fixture(scope="session")
def litemedsam():
    from sambtcv.core.device import tune_allocator
    from sambtcv.models.backbones import load_backbone

    tune_allocator()
    return load_backbone("litemedsam")


@pytest.fixture(scope="session")
def mobilesam():
    from sambtcv.core.device import tune_allocator
    from sambtcv.models.backbones import load_backbone

    tune_allocator()
    return load_backbone("mobilesam")


def real_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real CT sample {path} is absent (it lives in ../shared/data beside the repository)")
    return path


def run_script(args, cwd=ROOT, env=None, timeout=600):
    """Run a project script in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_figure(path, min_side: int = 200):
    """A PNG that reads back as an image of some size with real content (not one flat colour)."""
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(str(path))
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side, (path, image.shape)
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 16, f"{path} is nearly blank"


PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar (transient on a terminal)


def error_line(stderr: str) -> str:
    """The one line a failed run printed (progress bars aside); fails unless it is exactly one `error:` line."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def fails(capsys, main, argv) -> str:
    """Run a script's main in-process as its `__main__` does: exit status 2 and one line, returned."""
    from sambtcv import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run_main(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return error_line(err)


@contextlib.contextmanager
def held_by_another_process(folder, what: str):
    """`files.exclusive(folder)` held by a forked process (an unrelated run) for the block; yields its pid."""
    from sambtcv.core import files

    fork = multiprocessing.get_context("fork")
    ours, theirs = fork.Pipe()

    def hold():
        os.environ.pop(files.LOCKS_ENV, None)
        with files.exclusive(folder, what):
            theirs.send("held")
            theirs.recv()
        os._exit(0)

    holder = fork.Process(target=hold)
    holder.start()
    try:
        assert ours.poll(30) and ours.recv() == "held"
        yield holder.pid
    finally:
        ours.send("done")
        holder.join(30)


def wait_for(predicate, timeout=60.0):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """The app on a real uvicorn server (127.0.0.1, a free port) in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


LONGEST_FIRST = ("test_report.py", "test_distributed.py", "test_viewer_browser.py", "test_records.py")  # measured


def pytest_collection_modifyitems(items):
    """The longest tests first, dealt across LONGEST_FIRST's files in turn (each file's first test, then each
    one's second, ...), then the other slow tests, then the quick ones. `./run.sh test` hands tests to its
    workers one or two at a time in this order, so the long ones start at once on every worker and the quick
    ones fill the gaps at the end, instead of a report running alone after everything else."""
    seen = {}

    def rank(item):
        name = item.path.name
        if name in LONGEST_FIRST:
            seen[name] = seen.get(name, -1) + 1
            return (0, seen[name], LONGEST_FIRST.index(name))
        return (1 if item.get_closest_marker("slow") is not None else 2, 0, 0)

    items.sort(key=rank)
