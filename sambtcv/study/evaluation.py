"""Evaluation of a prompt decoder on a split: the (embedding, prompt, target) dataset and the Dice loop."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from sambtcv.core import config
from sambtcv.core.config import EVAL_BATCH
from sambtcv.core.device import autocast
from sambtcv.core.metrics import DiceTable, overlap_counts
from sambtcv.core.prompts import make_prompt, prompt_rng
from sambtcv.models.decoder import Decoded, PromptedDecoder, decode_batch
from sambtcv.models.embeddings import SplitData

EVAL_EPOCH = 0  # prompt generator salt used by every evaluation; training epochs use 1, 2, ...


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


@torch.no_grad()
def evaluate(decoder: PromptedDecoder, data: SplitData, prompt_types, seed: int, device, dtype="fp32",
             batch_size: int = EVAL_BATCH, table: DiceTable | None = None, on_batch=None, progress=True,
             env=None, point_mask: str = config.POINT_MASK) -> DiceTable:
    """Slice and volume Dice of `decoder` on every (slice, organ) of the split, per prompt type.

    Predictions are mapped back to each slice's own size before Dice. ``on_batch(prompt_type, items,
    decoded, preds)`` lets a caller collect more: items are the batch's (slice index, organ) pairs,
    decoded the `sambtcv.models.decoder.Decoded` outputs (Task 3's class logits), preds the binary slice masks.
    Under several processes (`env`, a `sambtcv.core.distributed.DistEnv`) the batches (the same ones a single
    process makes) are dealt out over the ranks, `on_batch` sees this rank's, and the table, filled in
    the single process's order, is complete on rank 0 (the other ranks return an empty one).
    """
    table = table if table is not None else DiceTable()
    decoder.eval()
    frame = data.cache.backbone.frame
    counts = []  # (prompt index, item index, organ, case, |A n B|, |A|, |B|) of this rank's items
    for p_index, prompt_type in enumerate(prompt_types):
        ds = PromptDataset(data, prompt_type, seed, EVAL_EPOCH)
        batches = [list(range(s, min(s + batch_size, len(ds)))) for s in range(0, len(ds), batch_size)]
        if env is not None:
            batches = env.mine(batches)
        for idx in tqdm(batches, desc=f"decode {prompt_type}", disable=None if progress else True, leave=False):
            batch = torch.utils.data.default_collate([ds[k] for k in idx])
            t0 = time.perf_counter()
            with autocast(device, dtype):
                decoded: Decoded = decode_batch(decoder, batch, prompt_type, device, point_mask)
            table.decoder_seconds += time.perf_counter() - t0
            items = [ds.items[k] for k in idx]
            preds = []
            for b, (k, (i, organ)) in enumerate(zip(idx, items)):
                gt = ds.label(i) == organ
                pred = (frame.to_slice(decoded.best[b:b + 1].float(), gt.shape)[0] > 0).cpu().numpy()
                counts.append((p_index, k, organ, data.slices.records[i]["case"], *overlap_counts(pred, gt)))
                preds.append(pred)
            if on_batch is not None:
                on_batch(prompt_type, items, decoded, preds)
    gathered = [counts] if env is None else env.gather(counts)
    for p_index, _k, organ, case, inter, ps, gs in sorted(c for part in (gathered or []) for c in part):
        table.add_counts(prompt_types[p_index], organ, case, inter, ps, gs)
    return table


def evaluation_settings(backbone, finetuned, split: str, prompts, seed: int, dtype: str, encoder_dtype: str,
                        runtime: str = "torch", point_mask: str = config.POINT_MASK) -> dict:
    """What an evaluation of a decoder on a split computes: Task 1's record settings, which Task 2 also
    builds to find a Task 1 record it can reuse (`sambtcv.study.records.reusable`)."""
    return {"model": backbone.name, "backbone": backbone.key, "checkpoint": backbone.checkpoint,
            "finetuned": finetuned, "split": split, "prompts": list(prompts), "seed": seed, "dtype": dtype,
            "encoder_dtype": encoder_dtype, "runtime": runtime, "point_mask": point_mask}
