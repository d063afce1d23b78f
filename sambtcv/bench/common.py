"""What the sections share: the machine, phantom slice sets, scripts in a child Python with their peak RSS."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sambtcv.core.config import ROOT
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import check_replaceable, write_json
from sambtcv.models import precision
from sambtcv.models.embeddings import EmbeddingCache

WORK_MARKER = "bench_work.json"  # marks WORK_DIR as bench.py's, so that it may be rebuilt


# A child Python that runs a script as __main__ and reports its own peak RSS (KiB) at exit: VmHWM of
# /proc/self/status, the high-water mark of this process's memory alone. (getrusage's ru_maxrss is not:
# Linux carries the parent's peak into a child started by vfork + exec, as subprocess starts it.)
_RSS_RUNNER = ("import json, resource, runpy, sys\n"
               "def peak_kb():\n"
               "    try:\n"
               "        with open('/proc/self/status') as f:\n"
               "            return int(next(v for v in f if v.startswith('VmHWM:')).split()[1])\n"
               "    except (OSError, StopIteration, ValueError):\n"
               "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
               "sys.argv = json.loads(sys.argv[1])\n"
               "try:\n"
               "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n"
               "    print('BENCH_MAXRSS_KB', peak_kb(), flush=True)\n")


def machine_info(device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    found = precision.support(device)
    info["bf16"] = {"native": found.native, "detail": found.detail}
    return info


# ---------------------------------------------------------------------------------------------- data


def make_set(work: Path, name: str, volumes: list, train: list, val: list, seed: int, shape) -> Path:
    """Preprocess a slice set whose splits list phantom volumes by index, repeats allowed (each repeat
    is a symlink under a new case name). Written through a dataset_0.json; returns the slices folder."""
    from sambtcv.data.btcv import preprocess

    root = work / "sets" / name / "raw"  # the data dir: links to phantom volumes and a dataset_0.json
    raw = root / "volumes"
    raw.mkdir(parents=True, exist_ok=True)
    spec = {}
    for key, picks in (("training", train), ("validation", val)):
        entries, seen = [], {}
        for v in picks:
            copy_no = seen[v] = seen.get(v, -1) + 1
            image, label = volumes[v]
            entry = {}
            for what, src in (("image", image), ("label", label)):
                link = raw / f"{what}{v + 1:04d}r{copy_no}.nii.gz"
                if not link.exists():
                    os.symlink(src.resolve(), link)
                entry[what] = str(link.relative_to(root))
            entries.append(entry)
        spec[key] = entries
    write_json(root / "dataset_0.json", spec)
    out = root.parent / "slices"
    preprocess(root, out, seed=seed, synthetic={"volumes": len(volumes), "seed": seed, "shape": list(shape)})
    return out


def build_data(cfg: dict) -> dict:
    from sambtcv.data.btcv import phantom_shape
    from sambtcv.data.phantom import write_phantom

    work = Path(cfg["work_dir"]).resolve()
    check_replaceable(work, WORK_MARKER)  # rebuilt whole: only a folder bench.py wrote
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_json(work / WORK_MARKER, {"written_by": "bench.py"})
    shape = phantom_shape(cfg["phantom_shape"])
    n_train, n_val = cfg["train_volumes"], cfg["val_volumes"]
    print(f"bench: writing {n_train + n_val} phantom volumes {shape} to {work / 'raw'}", flush=True)
    images = write_phantom(work / "raw", n_train + n_val, cfg["seed"], shape=shape)
    volumes = [(p, p.parent.parent / "label" / p.name.replace("img", "label", 1)) for p in images]
    train, val = list(range(n_train)), list(range(n_train, n_train + n_val))
    sets = {"base": make_set(work, "base", volumes, train, val, cfg["seed"], shape),
            "rss4": make_set(work, "rss4", volumes, train * 4, val, cfg["seed"], shape)}
    for s in scales_arg(cfg["scales"]):
        sets[f"task1_x{s}"] = make_set(work, f"task1_x{s}", volumes, [], val * s, cfg["seed"], shape)
    sets["val_volumes"] = [volumes[v] for v in val]  # (image, label) NIfTI paths for the 3D measurement
    return sets


def scales_arg(text: str) -> list[int]:
    try:
        scales = [int(v) for v in text.split(",") if v.strip()]
        assert scales and min(scales) >= 1
    except (ValueError, AssertionError):
        raise PipelineError(f"{{subject}} must be a comma list of positive integers like 1,2,4, got {text!r}",
                            "scales") from None
    return scales


def fill_by_copy(cache: EmbeddingCache, sources: list) -> int:
    """Fill rows of `cache` whose slice image is byte-identical to a cached row of `sources` by copying
    that row (what the encoder would compute for the same input); returns the rows copied."""
    def key(image):
        return hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()

    index = {}
    for src in sources:
        for j in np.flatnonzero(src.done):
            index.setdefault(key(src.image(int(j))), (src, int(j)))
    todo = [i for i in cache.missing() if key(cache.image(i)) in index]
    if not todo:
        return 0

    def copy_rows(idx):
        return np.stack([index[key(cache.image(i))][0].read(index[key(cache.image(i))][1]) for i in idx])

    return cache.fill("cpu", batch_size=len(todo), rows=todo, progress=False, encode=copy_rows)


def run_script(script: str, args: list, log: Path) -> dict:
    """Run `script` in a fresh Python; returns wall seconds and the child's peak RSS (MiB)."""
    argv = [script, *[str(a) for a in args]]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_RUNNER, json.dumps(argv)], cwd=ROOT, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PipelineError(f"{script} failed (exit {proc.returncode}, log {log}): {' | '.join(tail)}")
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("BENCH_MAXRSS_KB")]
    return {"seconds": seconds, "peak_rss_mib": rss[-1] / 1024 if rss else None}


def spread(n_total: int, n: int) -> list[int]:
    """n evenly spread indices of range(n_total) (all of them when n >= n_total)."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int)).tolist()


def backbone_flags(cfg: dict) -> list:
    """--checkpoint / --device of a script subprocess, as this run was given them."""
    return ((["--checkpoint", Path(cfg["checkpoint"]).resolve()] if cfg["checkpoint"] else [])
            + (["--device", cfg["device"]] if cfg["device"] else []))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and OpenVINO's first compile of a shape)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
