"""The embedding cache, the (embedding, prompt, target) dataset and the evaluation loop of Tasks 1-3.

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
import torch
from tqdm import tqdm

from cli import PipelineError
from files import exclusive, write_json
from models import PROMPT_EMBED_DIM, Backbone, Decoded, PromptedDecoder, autocast, decode_batch, encode_images
from utils import DiceTable, SliceSet, make_prompt, prompt_rng

EVAL_EPOCH = 0  # prompt generator salt used by every evaluation; training epochs use 1, 2, ...
NOT_DONE = -1  # checksum value of a row not encoded yet


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
                 dtype: str, identity: str, what: str = "embedding cache"):
        self.dir = folder
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
        self._fd = None
        self.crc = self._load_checksums()

    @classmethod
    def for_split(cls, slices: SliceSet, backbone: Backbone, dtype: str = "fp32") -> "EmbeddingCache":
        """The cache of one split of a slices folder: ``SLICES/embeddings/<backbone>-<dtype>/<split>.*``."""
        return cls(slices.root / "embeddings" / f"{backbone.key}-{dtype}", slices.split, len(slices),
                   lambda i: slices.load(i)[0], backbone, dtype, slices.signature)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * 2

    def _load_checksums(self) -> np.ndarray:
        try:
            meta = json.loads(self.meta_path.read_text())
            crc = np.load(self.crc_path)
            stored = np.load(self.path, mmap_mode="r")
            if meta == self.meta and crc.shape == (self.shape[0],) and stored.shape == self.shape:
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
        with exclusive(self.dir, self.what, "--slices or --cache-dir"):
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
            bar = tqdm(total=len(todo), desc=f"encode ({self.backbone.name})", disable=None if progress else True, unit="slice",
                       leave=False)
            for start in range(0, len(todo), batch_size):
                idx = todo[start:start + batch_size]
                if encode is None:
                    emb = encode_images(self.backbone, [self.image(i) for i in idx], device, self.dtype).cpu().numpy()
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
        return state


@dataclass
class SplitData:
    """One split of a slices folder with its filled embedding cache."""

    slices: SliceSet
    cache: EmbeddingCache
    encoder_passes: int  # passes made to fill it in this run
    seconds: float  # time spent opening and filling


def open_split(slices_dir, split: str, backbone: Backbone, dtype: str, device, encode_batch: int = 1,
               is_main: bool = True, barrier=None) -> SplitData:
    """Open a split and fill its embedding cache. Under several processes only the main one encodes;
    the others wait at `barrier()` and then read."""
    slices = SliceSet(slices_dir, split)
    if len(slices) == 0:
        raise PipelineError(f"split {split!r} of {slices_dir} has no slices; preprocess more cases")
    t0 = time.perf_counter()
    passes = EmbeddingCache.for_split(slices, backbone, dtype).fill(device, encode_batch) if is_main else 0
    if barrier is not None:
        barrier()
    cache = EmbeddingCache.for_split(slices, backbone, dtype)
    if cache.missing():
        raise PipelineError(f"the embedding cache of {slices_dir} ({split}) is incomplete; run again")
    return SplitData(slices, cache, passes, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- dataset
class PromptDataset(torch.utils.data.Dataset):
    """One sample per (slice, organ) of a split: the slice's cached embedding, one prompt of
    `prompt_type` drawn from the organ's mask (seeded by seed, slice, organ and `epoch`), mapped to
    the input frame, and the organ's mask in the decoder's low-res frame.

    Item: ``{"embedding": (256, E, E), "points": (n, 2), "box": (4,), "target": (1, L, L),
    "organ": int, "index": int}``; points are (0, 2) for boxes and box is zeros for points.
    """

    def __init__(self, data: SplitData, prompt_type: str, seed: int, epoch: int = EVAL_EPOCH):
        self.slices = data.slices
        self.cache = data.cache
        self.prompt_type = prompt_type
        self.seed = seed
        self.epoch = epoch
        self.items = list(self.slices.items)
        self.frame = data.cache.backbone.frame
        self._label = (None, None)

    def __len__(self):
        return len(self.items)

    def label(self, i: int) -> np.ndarray:
        if self._label[0] != i:
            self._label = (i, self.slices.load_label(i))
        return self._label[1]

    def __getitem__(self, k: int) -> dict:
        i, organ = self.items[k]
        rec = self.slices.records[i]
        mask = self.label(i) == organ
        rng = prompt_rng(self.seed, rec["case"], rec["z"], organ, self.prompt_type, self.epoch)
        prompt = self.frame.prompt(make_prompt(mask, self.prompt_type, rng), mask.shape)
        points = prompt.points if prompt.points is not None else np.zeros((0, 2))
        box = prompt.box if prompt.box is not None else np.zeros(4)
        return {
            "embedding": torch.from_numpy(self.cache.read(i)),
            "points": torch.from_numpy(points.astype(np.float32)),
            "box": torch.from_numpy(box.astype(np.float32)),
            "target": torch.from_numpy(self.frame.lowres_target(mask))[None],
            "organ": organ,
            "index": k,
        }


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(decoder: PromptedDecoder, data: SplitData, prompt_types, seed: int, device, dtype="fp32",
             batch_size: int = 32, table: DiceTable | None = None, on_batch=None, progress=True) -> DiceTable:
    """Slice and volume Dice of `decoder` on every (slice, organ) of the split, per prompt type.

    Predictions are mapped back to each slice's own size before Dice. ``on_batch(prompt_type, items,
    decoded, preds)`` lets a caller collect more: items are the batch's (slice index, organ) pairs,
    decoded the `models.Decoded` outputs (Task 3's class logits), preds the binary slice masks.
    """
    table = table if table is not None else DiceTable()
    decoder.eval()
    frame = data.cache.backbone.frame
    for prompt_type in prompt_types:
        ds = PromptDataset(data, prompt_type, seed, EVAL_EPOCH)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
        for batch in tqdm(loader, desc=f"decode {prompt_type}", disable=None if progress else True, leave=False):
            t0 = time.perf_counter()
            with autocast(device, dtype):
                decoded: Decoded = decode_batch(decoder, batch, prompt_type, device)
            table.decoder_seconds += time.perf_counter() - t0
            items = [ds.items[k] for k in batch["index"].tolist()]
            preds = []
            for b, (i, organ) in enumerate(items):
                gt = ds.label(i) == organ
                pred = (frame.to_slice(decoded.best[b:b + 1].float(), gt.shape)[0] > 0).cpu().numpy()
                table.add(prompt_type, organ, data.slices.records[i]["case"], pred, gt)
                preds.append(pred)
            if on_batch is not None:
                on_batch(prompt_type, items, decoded, preds)
    return table
