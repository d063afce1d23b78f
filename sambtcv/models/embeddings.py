"""The embedding cache: image embeddings stored once per (backbone, encoder dtype, images), read row by row.

Each slice is encoded at most once per (backbone, encoder dtype, slices): embeddings are stored in
float16 rows on disk, each with a checksum, and read back row by row, so Tasks 2 and 3 never run the
image encoder and their memory does not grow with the number of slices.
"""
from __future__ import annotations

import errno
import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

from sambtcv.core.errors import PipelineError
from sambtcv.core.files import exclusive, write_json
from sambtcv.data.slices import SliceSet
from sambtcv.models.backbones import PROMPT_EMBED_DIM, Backbone, encode_images

NOT_DONE = -1  # checksum value of a row not encoded yet
SHARED_ROUND = 8  # batches each rank encodes before rank 0 writes them (bounds rank 0's memory)


def folder_name(backbone: Backbone, dtype: str, runtime=None) -> str:
    """The cache folder of a backbone's embeddings in a precision and a runtime (PyTorch: no suffix)."""
    suffix = "" if runtime is None or runtime.encoder is None else f"-{runtime.name}"
    return f"{backbone.key}-{dtype}{suffix}"


class EmbeddingCache:
    """float16 image embeddings of N images for one backbone, as rows of one ``.npy`` file.

    Files in `folder`: ``<name>.npy`` (N, 256, E, E), ``<name>.crc.npy`` (N,) the CRC-32 of each row
    (NOT_DONE for rows not encoded yet) and ``<name>.json`` (what the rows are: backbone, encoder
    dtype, identity of the images). A row whose checksum does not match, a truncated file or other
    metadata make those rows (or the whole file) be encoded again. Rows are read with positional reads,
    never loaded whole. Filling holds the folder's lock, so two runs never fill one cache at once.
    `image(i)` returns the (H, W) uint8 image of row i.
    """

    def __init__(self, folder, name: str, n_rows: int, image: Callable[[int], np.ndarray], backbone: Backbone,
                 dtype: str, identity: str, what: str = "embedding cache", runtime=None):
        self.dir = folder
        self.encoder = None if runtime is None else runtime.encoder
        self.image = image
        self.backbone = backbone
        self.dtype = dtype
        self.what = what
        e_h, e_w = backbone.sam.prompt_encoder.image_embedding_size
        self.shape = (n_rows, PROMPT_EMBED_DIM, e_h, e_w)
        self.path = folder / f"{name}.npy"
        self.crc_path = folder / f"{name}.crc.npy"
        self.meta_path = folder / f"{name}.json"
        self.meta = {"backbone": backbone.key, "dtype": dtype, "images": identity, "shape": list(self.shape)}
        if self.encoder is not None:  # another runtime's embeddings differ a little: a cache of their own
            self.meta["runtime"] = runtime.name
        self._fd = None
        self.crc = self._load_checksums()

    @classmethod
    def for_split(cls, slices: SliceSet, backbone: Backbone, dtype: str = "fp32", runtime=None) -> "EmbeddingCache":
        """The cache of one split of a slices folder: ``SLICES/embeddings/<backbone>-<dtype>[-<runtime>]/<split>.*``
        (PyTorch's embeddings without a suffix; `runtime` a `sambtcv.models.runtime.Runtime` or None for PyTorch)."""
        return cls(slices.root / "embeddings" / folder_name(backbone, dtype, runtime), slices.split, len(slices),
                   lambda i: slices.load(i)[0], backbone, dtype, slices.signature, runtime=runtime)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * 2

    def _load_checksums(self) -> np.ndarray:
        try:
            meta = json.loads(self.meta_path.read_text())
            crc = np.load(self.crc_path)
            stored = np.load(self.path, mmap_mode="r")
            if (meta == self.meta and crc.shape == (self.shape[0],) and crc.dtype == np.int64
                    and stored.shape == self.shape and stored.dtype == np.float16
                    and stored.flags.c_contiguous):  # re-saved in another dtype or order: start again
                return crc
        except (OSError, ValueError):  # absent, truncated or unreadable: start again
            pass
        return np.full(self.shape[0], NOT_DONE, dtype=np.int64)

    @property
    def done(self) -> np.ndarray:
        return self.crc != NOT_DONE

    def missing(self, rows=None) -> list[int]:
        rows = range(self.shape[0]) if rows is None else rows
        return [int(i) for i in rows if self.crc[i] == NOT_DONE]

    def verify(self, rows=None) -> int:
        """Mark the stored rows (default: all) whose bytes no longer match their checksum as not done;
        returns how many."""
        rows = np.flatnonzero(self.done) if rows is None else [i for i in rows if self.crc[i] != NOT_DONE]
        bad = [int(i) for i in rows if zlib.crc32(self._read_bytes(int(i))) != self.crc[i]]
        self.crc[bad] = NOT_DONE
        return len(bad)

    def fill(self, device, batch_size: int = 1, rows=None, progress: bool = True, encode=None) -> int:
        """Encode the rows (default: all) that have no valid embedding yet; returns the encoder passes.
        `encode(row indices)` -> (n, 256, E, E) embeddings replaces the image encoder (bench.py copies
        rows it has already computed)."""
        if not self.missing(rows) and not self.verify(rows):  # all there: still check their bytes
            return 0
        with exclusive(self.dir, self.what):
            self.crc = self._load_checksums()  # another run may have filled it meanwhile
            bad = self.verify(rows)
            if bad:
                print(f"{self.what}: {bad} rows of {self.path} failed their checksum; encoding them again", flush=True)
            todo = self.missing(rows)
            if not todo:
                return 0
            if not self.done.any():
                self._create()
            arr = np.load(self.path, mmap_mode="r+")
            bar = tqdm(total=len(todo), desc=f"encode ({self.backbone.name})", disable=None if progress else True,
                       unit="slice",
                       leave=False)
            for start in range(0, len(todo), batch_size):
                idx = todo[start:start + batch_size]
                if encode is None:
                    emb = encode_images(self.backbone, [self.image(i) for i in idx], device, self.dtype,
                                        self.encoder).cpu().numpy()
                else:
                    emb = encode(idx)
                rows_f16 = np.asarray(emb).astype(np.float16)
                arr[idx] = rows_f16
                arr.flush()
                self.crc[idx] = [zlib.crc32(r.tobytes()) for r in rows_f16]
                self._save_checksums()
                bar.update(len(idx))
            bar.close()
            del arr
        return len(todo)

    def _create(self) -> None:
        """A new rows file with its full size reserved on disk now, so a full disk fails here with one
        line instead of a crash while writing rows."""
        self.close()
        np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=self.shape).flush()
        size = self.path.stat().st_size
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.path.unlink(missing_ok=True)  # leave no half-reserved file behind
                raise PipelineError(f"no space left for the {self.what} in {self.dir} ({size / 2**20:.0f} MiB "
                                    f"needed); free disk space or move it") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        finally:
            os.close(fd)
        write_json(self.meta_path, self.meta)
        self.crc[:] = NOT_DONE
        self._save_checksums()

    def _save_checksums(self) -> None:
        tmp = self.crc_path.with_name(self.crc_path.name + ".tmp.npy")
        np.save(tmp, self.crc)
        os.replace(tmp, self.crc_path)

    def _read_bytes(self, i: int) -> bytes:
        if self._fd is None:
            self._offset = np.load(self.path, mmap_mode="r").offset
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, self.row_bytes, self._offset + i * self.row_bytes)

    def read(self, i: int) -> np.ndarray:
        """Row i as float32 (256, E, E), read from disk and checked against its checksum."""
        assert self.crc[i] != NOT_DONE, f"row {i} has no cached embedding; call fill() first"
        buf = self._read_bytes(i)
        if zlib.crc32(buf) != self.crc[i]:
            raise PipelineError(f"{self.what} row {i} in {self.path} changed on disk; run again to re-encode it "
                                f"(or delete {self.dir})")
        return np.frombuffer(buf, dtype=np.float16).reshape(self.shape[1:]).astype(np.float32)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):  # DataLoader workers open their own descriptor
        state = self.__dict__.copy()
        state["_fd"] = None
        state["encoder"] = None  # compiled OpenVINO models do not pickle; workers only read rows
        return state


@dataclass
class SplitData:
    """One split of a slices folder with its filled embedding cache."""

    slices: SliceSet
    cache: EmbeddingCache
    encoder_passes: int  # passes made to fill it in this run
    seconds: float  # time spent opening and filling


def open_split(slices_dir, split: str, backbone: Backbone, dtype: str, device, encode_batch: int = 1,
               env=None, runtime=None) -> SplitData:
    """Open a split and fill its embedding cache. Under several processes (`env`, a
    `sambtcv.core.distributed.DistEnv`) the ranks share the encoding and rank 0 alone writes the cache."""
    slices = SliceSet(slices_dir, split)
    if len(slices) == 0:
        raise PipelineError(f"split {split!r} of {slices_dir} has no slices; preprocess more cases")
    t0 = time.perf_counter()
    cache = EmbeddingCache.for_split(slices, backbone, dtype, runtime)
    if env is None or env.world == 1:
        passes = cache.fill(device, encode_batch)
    else:
        passes = fill_shared(cache, env, device, encode_batch)
    cache = EmbeddingCache.for_split(slices, backbone, dtype, runtime)
    if cache.missing():
        raise PipelineError(f"the embedding cache of {slices_dir} ({split}) is incomplete; run again")
    return SplitData(slices, cache, passes, time.perf_counter() - t0)


def fill_shared(cache: EmbeddingCache, env, device, batch_size: int, rows_per_rank: int = SHARED_ROUND) -> int:
    """Fill `cache` with the encoder passes shared out over the ranks of `env`: rank 0 checks the cache and
    says which rows are missing; in rounds, each rank encodes its batches (the same batches a single
    process would make) and rank 0 writes them. Returns the passes of this rank."""
    todo = None
    if env.main:
        cache.verify()  # rows whose bytes changed on disk are encoded again
        todo = cache.missing()
    todo = env.broadcast(todo)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    per_round = rows_per_rank * env.world
    passes = 0
    for start in range(0, len(batches), per_round):
        chunk = batches[start:start + per_round]
        mine = {}
        for idx in env.mine(chunk):
            emb = encode_images(cache.backbone, [cache.image(i) for i in idx], device, cache.dtype,
                                cache.encoder).cpu().numpy()
            mine.update(zip(idx, emb.astype(np.float16)))
            passes += len(idx)
        gathered = env.gather(mine)
        if env.main:
            rows = {i: e for part in gathered for i, e in part.items()}
            order = sorted(rows)
            cache.fill(device, batch_size=len(order), rows=order, progress=False,
                       encode=lambda idx: np.stack([rows[i] for i in idx]))
        env.barrier()
    return passes
