"""Shared fixtures: a tiny phantom written and preprocessed once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_SHAPE = (80, 80, 10)  # voxels of each test phantom volume: few slices, fast to encode
TINY_VOLUMES = 3  # two training cases and one validation case


@pytest.fixture(scope="session")
def raw_phantom(tmp_path_factory):
    from phantom import write_phantom

    raw = tmp_path_factory.mktemp("raw")
    write_phantom(raw, TINY_VOLUMES, seed=3, shape=TINY_SHAPE)
    return raw


@pytest.fixture(scope="session")
def tiny_slices(raw_phantom, tmp_path_factory):
    from preprocess import preprocess

    out = tmp_path_factory.mktemp("slices") / "slices"
    preprocess(raw_phantom, out)
    return out


@pytest.fixture(scope="session")
def litemedsam():
    from cli import tune_allocator
    from models import load_backbone

    tune_allocator()
    return load_backbone("litemedsam")


@pytest.fixture(scope="session")
def mobilesam():
    from cli import tune_allocator
    from models import load_backbone

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
