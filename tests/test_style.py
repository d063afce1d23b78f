"""The style rules of pyproject.toml ([tool.ruff]) hold for the whole project: the suite, and so `.ci/run`,
fails on a violation. `ruff check .` from the project folder shows them; `ruff check --fix .` mends most."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    """ruff of this environment (requirements.txt pins it)."""
    here = Path(sys.executable).with_name("ruff")
    found = str(here) if here.is_file() else shutil.which("ruff")
    assert found, "ruff is not installed: it is pinned in requirements.txt (./run.sh test installs it)"
    return [found]


def test_ruff_finds_nothing():
    r = subprocess.run([*ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_catches_a_violation(tmp_path):
    """The configuration is read and enforced: an unused import and a line over 120 columns are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = '" + "a" * 130 + "'\n")
    r = subprocess.run([*ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                        "--output-format", "concise", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "F401" in r.stdout and "E501" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow  # two pytest processes
def test_run_sh_test_runs_the_paths_given_and_else_the_suite():
    """`./run.sh test tests/one.py` runs that module alone (it ran the whole suite beside it once); with no path,
    the suite (pyproject.toml's testpaths)."""
    if not (Path(sys.prefix) / ".complete").is_file():
        pytest.skip("this environment was not made by run.sh")
    env = dict(os.environ, SAM_BTCV_VENV=sys.prefix)

    def collected(*args):
        r = subprocess.run(["bash", "run.sh", "test", "--collect-only", "-n", "0", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return {line.split("::")[0] for line in r.stdout.splitlines() if "::" in line}

    assert collected("tests/test_walk_guard.py") == {"tests/test_walk_guard.py"}
    assert {"tests/test_walk_guard.py", "tests/test_style.py", "tests/test_report.py"} <= collected()
