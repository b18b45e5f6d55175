"""Turn split positions into model-ready tensors.

One `Batcher` serves training, the warm-up and evaluation, so the history a model is trained on
and the history it is evaluated (and later served) with are built from the same arrays, the same
tokenizer call and the same truncation: newest `max_history` events, oldest first. Evaluation
feeds the served layout (`encoder_inputs`); training packs every position of a window into one
row (`training_batch`, `training.model.sequences`), whose last slot is that same served input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from karma.config import KarmaConfig
from karma.contracts import (
    HIST_FEATURES_INPUT,
    ITEM_BUCKETS_INPUT,
    ITEM_INPUT,
    QUERY_BUCKETS_INPUT,
)
from karma.featurize import pad_histories, query_encoder_feeds
from karma.tokenization import TextTokenizer
from training.data.schema import Dataset
from training.data.split import Split, Windows
from training.features import ItemFeatures
from training.losses import IGNORE_INDEX
from training.model.sequences import pack_rows, pick_reg_slots


@dataclass
class TextTargets:
    """Target-text tokens laid out for 'prefix + text' decoding.

    The decoder input after the conditioning position is `[t_1 … t_m]`; the label at the
    conditioning position is `t_1`, at `t_i` it is `t_{i+1}`, and at `t_m` it is EOS. So
    `labels` is one longer than `input_ids` (the extra first column belongs to the prefix).
    """

    input_ids: torch.Tensor  # (B, T) text tokens fed after the prefix
    input_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T + 1) next-token labels from the prefix position on, -100 = ignore


def text_targets(rows: list[list[int]], pad_id: int, eos_id: int) -> TextTargets:
    length = max(1, max(len(r) for r in rows))
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    labels = np.full((len(rows), length + 1), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = row
        labels[i, len(row)] = eos_id
    return TextTargets(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))


class Batcher:
    """Builds query/history/target tensors for positions of a `Split`."""

    def __init__(
        self, dataset: Dataset, split: Split, features: ItemFeatures, tokenizer: TextTokenizer, config: KarmaConfig
    ):
        self.dataset = dataset
        self.split = split
        self.tokenizer = tokenizer
        self.features = torch.from_numpy(np.ascontiguousarray(features.matrix, dtype=np.float32))
        self.id_buckets = torch.from_numpy(features.id_buckets) if features.id_buckets is not None else None
        self.max_query_tokens = config.model.max_query_tokens
        self.item_text_ids = tokenizer.ids(dataset.catalog.item_text(), config.model.max_text_tokens)
        self.visual_target = self.features[:, content_target_slice(features)]
        self.queries = dataset.interactions.query

    def history(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(items (B, L), mask (B, L)), left-padded, newest last; L >= 1 (same code as the service)."""
        starts, ends = self.split.history_bounds(positions)
        rows = [self.split.seq_items[start:end] for start, end in zip(starts, ends, strict=True)]
        items, mask = pad_histories(rows, self.split.max_history)
        return torch.from_numpy(items), torch.from_numpy(mask)

    def query_texts(self, positions: np.ndarray) -> list[str]:
        if self.queries is None:
            return [""] * len(positions)
        return [q or "" for q in self.queries[self.split.seq_events[positions]]]

    def encoder_inputs(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """What the served query tower takes, built by the service's own `query_encoder_feeds` (query ids/mask,
        history features/mask, + buckets): training and serving cannot drift apart."""
        starts, ends = self.split.history_bounds(positions)
        rows = [self.split.seq_items[start:end] for start, end in zip(starts, ends, strict=True)]
        feeds = query_encoder_feeds(
            self.tokenizer,
            self.features.numpy(),  # shares memory with the tensor
            self.query_texts(positions),
            rows,
            self.max_query_tokens,
            self.split.max_history,
            None if self.id_buckets is None else self.id_buckets.numpy(),
        )
        return {name: torch.from_numpy(value) for name, value in feeds.items()}

    def item_inputs(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {ITEM_INPUT: self.features[items]}
        if self.id_buckets is not None:
            inputs[ITEM_BUCKETS_INPUT] = self.id_buckets[items]
        return inputs

    def texts_of(self, items: np.ndarray) -> TextTargets:
        return text_targets(
            [self.item_text_ids[i] for i in items], self.tokenizer.meta.pad_id, self.tokenizer.meta.eos_id
        )

    def exposed(self, positions: np.ndarray, limit: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Shown-but-not-clicked items of each target event, (B, K) + mask (K >= 1)."""
        inter = self.dataset.interactions
        rows = [inter.exposed_of(int(e))[:limit] for e in self.split.seq_events[positions]]
        width = max(1, max((len(r) for r in rows), default=0))
        items = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):
            items[i, : len(r)] = r
            mask[i, : len(r)] = True
        return torch.from_numpy(items), torch.from_numpy(mask)

    def training_batch(
        self,
        windows: Windows,
        index: np.ndarray,
        rng: np.random.Generator,
        reg_positions: int,
        gen_text: bool,
        exposed: bool = False,
    ) -> dict[str, object]:
        """Packed every-position rows for windows `index` (see `training.model.sequences`).

        Each supervised position gets a slot `[query of its target][EMB]`; up to `reg_positions`
        slots per row (the last always) are marked for the regularizers, and with `gen_text` the
        target's text follows their [EMB] for L_gen. Queries go through the same tokenizer call,
        truncation and id buckets as `karma.featurize.query_encoder_feeds` serves.
        """
        starts, ends, firsts = windows.starts[index], windows.ends[index], windows.first_target[index]
        histories, queries, supervised, reg_rows, texts, target_pos = [], [], [], [], [], []
        for start, end, first in zip(starts, ends, firsts, strict=True):
            positions = np.arange(start + 1, end)  # target of slot j is positions[j]
            sup = positions >= first
            reg = pick_reg_slots(sup, reg_positions, rng)
            histories.append(self.split.seq_items[start : end - 1].astype(np.int64))
            queries.append(self.tokenizer.ids(self.query_texts(positions), self.max_query_tokens))
            supervised.append(sup)
            reg_rows.append(reg[sup])
            targets = self.split.seq_items[positions]
            texts.append({int(j): self.item_text_ids[targets[j]] for j in np.flatnonzero(reg)} if gen_text else {})
            target_pos.append(positions[sup])
        meta = self.tokenizer.meta
        layout = pack_rows(histories, queries, supervised, texts, meta.pad_id, meta.eos_id)
        slot_pos = np.concatenate(target_pos)
        targets = torch.from_numpy(self.split.seq_items[slot_pos].astype(np.int64))
        reg = torch.from_numpy(np.concatenate(reg_rows))
        hist_items = torch.from_numpy(layout.hist_items)
        batch: dict[str, object] = {
            HIST_FEATURES_INPUT: self.features[hist_items],
            "hist_valid": torch.from_numpy(layout.hist_valid),
            "block_ids": torch.from_numpy(layout.block_ids),
            "block_is_emb": torch.from_numpy(layout.block_is_emb),
            "allowed": torch.from_numpy(layout.allowed),
            "position_ids": torch.from_numpy(layout.position_ids),
            "gen_labels": torch.from_numpy(layout.gen_labels),
            "slot_row": torch.from_numpy(layout.slot_row),
            "slot_col": torch.from_numpy(layout.slot_col),
            "slot_hist": torch.from_numpy(layout.slot_hist),
            "target_items": targets,
            "target_item_inputs": self.item_inputs(targets),
            "reg": reg,
            "reg_text": self.texts_of(targets[reg].numpy()),
            "reg_content": self.visual_target[targets[reg]],
        }
        if self.id_buckets is not None:
            batch[QUERY_BUCKETS_INPUT] = self.id_buckets[hist_items]
        if exposed:
            items, mask = self.exposed(slot_pos)
            batch.update(exposed_items=items, exposed_mask=mask, exposed_inputs=self.item_inputs(items.reshape(-1)))
        return batch


def content_target_slice(features: ItemFeatures) -> slice:
    """What L_img reconstructs: the visual block if the data has one, else the text-embedding block."""
    names = [b.name for b in features.layout.blocks]
    visual = [n for n in names if n.startswith("visual:")]
    return features.layout.slice_of(visual[0] if visual else names[0])
