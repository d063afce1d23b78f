"""The report's stages: each page run as the command a user would type, skipped when nothing changed.

A stage is up to date when its key (the command, the slices' identity, the code and profiles, the
previous stage's key) is the one recorded in RESULTS/stages.json and the records it wrote are still
there. A stage runs as a child process that cannot outlive the report: on Linux the kernel kills it
when the report process dies (kill -9, a closed terminal, an out-of-memory kill), and a report that is
interrupted or terminated stops its stage first, so no orphan keeps writing into a results folder whose
lock died with the report.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from sambtcv.core.config import ROOT
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, read_json, write_json
from sambtcv.data.slices import PREPROCESS_FILE
from sambtcv.study import records as rec

PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 10  # a stage asked to stop gets this long before it is killed


def slices_id(slices: Path) -> str | None:
    path = slices / PREPROCESS_FILE
    return read_json(path, "preprocessing record").get("created_id") if path.is_file() else None


def code_id(root: Path = ROOT) -> str:
    """Content key of what stages run: the package and its sub-packages, the pages (but run_report.py, bench.py and
    bench.py's sections) and the profiles. A default or profile changed in code makes the stages stale even when
    their commands are the same."""
    files = [*root.glob("*.py"), *(root / "sambtcv").rglob("*.py"), *(root / "profiles").glob("*.toml")]
    return rec.files_digest([p for p in files if p.name not in ("run_report.py", "bench.py")
                             and p.parent != root / "sambtcv" / "bench"], root)


def _die_with_parent(parent: int):
    """preexec_fn of a stage: the kernel sends it SIGKILL when the report process dies."""
    def setup():
        libc_name = ctypes.util.find_library("c")
        if libc_name and sys.platform.startswith("linux"):
            ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the report died before prctl took effect
            os._exit(137)
    return setup


def run_child(argv: list[str], cwd) -> int:
    """Run a stage and wait for it; it never outlives this process. SIGTERM / SIGHUP / Ctrl-C stop the
    stage first (SIGTERM, then SIGKILL after STOP_GRACE_SECONDS) and then this process."""
    proc = subprocess.Popen(argv, cwd=cwd, preexec_fn=_die_with_parent(os.getpid()))
    stopping = {}

    def stop(signum, _frame):
        stopping["signal"] = signum
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if stopping:
            raise PipelineError(f"stopped by signal {stopping['signal']}; the stage that was running was stopped "
                                f"too (finished stages are kept)")


class Stages:
    """Runs stage commands, skipping those whose key and records are unchanged; remembers which records
    each stage wrote (in the results folder and in other folders it names)."""

    def __init__(self, results: Results, force: bool):
        self.root = results.root
        self.path = results.stages
        self.done = {} if force else self._load()
        self.times = {}
        self.code = code_id()
        self.chain = ""  # key of the previous stage: a redone stage makes every later one stale

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            done = json.loads(self.path.read_text())
            if isinstance(done, dict) and all(isinstance(v, dict) and {"key", "seconds", "records"} <= set(v)
                                              for v in done.values()):
                return done
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        print(f"note: {self.path} is unreadable or from an older version; every stage runs again and it is "
              f"rewritten", flush=True)
        return {}

    def _records(self, folders: list[Path]) -> set[str]:
        return {str(p.relative_to(self.root)) for f in folders for p in (f / rec.RECORDS_DIR).glob("*/*.json")}

    def run(self, name: str, cmd: list[str], slices: Path | None, folders: list[Path] = (),
            outputs: list[Path] = ()) -> None:
        """Run `cmd` (a page and its flags) unless it is up to date. `folders`: results folders it writes
        records into (default: the report's); `outputs`: files it writes besides records."""
        folders = [Path(f) for f in folders] or [self.root]
        key = hashlib.sha256(json.dumps([cmd, slices_id(slices) if slices else None, self.code,
                                         self.chain]).encode()).hexdigest()[:16]
        self.chain = key
        prev = self.done.get(name)
        if (prev and prev["key"] == key and all((self.root / p).is_file() for p in prev["records"])
                and all(Path(p).exists() for p in outputs)):
            print(f"[{name}] up to date, skipped ({prev['seconds']:.0f} s when it ran)", flush=True)
            self.times[name] = {"seconds": prev["seconds"], "skipped": True, "records": prev["records"]}
            return
        print(f"[{name}] $ {shlex.join(cmd)}", flush=True)
        before = self._records(folders)
        t0 = time.perf_counter()
        code = run_child([sys.executable, *cmd], ROOT)
        if code != 0:
            raise PipelineError(f"stage {name} failed (exit {code}); fix the error above and run again "
                                f"(finished stages are kept)")
        seconds = time.perf_counter() - t0
        wrote = sorted(self._records(folders) - before)
        self.done[name] = {"key": key, "seconds": seconds, "records": wrote}
        self.times[name] = {"seconds": seconds, "skipped": False, "records": wrote}
        write_json(self.path, self.done)
        print(f"[{name}] done in {seconds:.0f} s", flush=True)
