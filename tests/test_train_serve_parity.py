"""Train/serve parity: every position training optimises is what the exported graph serves.

Training packs a window of a user's sequence into one row (`training.model.sequences`); the
service featurises one request with `karma.featurize.query_encoder_feeds` and runs the exported
ONNX query encoder. These tests build both from the same trained checkpoint and compare `h_t`
position by position, so a change to either side that breaks the equivalence (token order,
truncation, position ids, ID rows, the query's place) fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from karma.bundle import load_bundle
from karma.featurize import query_encoder_feeds
from training.checkpoint import read_checkpoint_info
from training.data.split import training_windows
from training.model.sequences import pack_rows
from training.setup import Setup, build_setup


@pytest.fixture(scope="module")
def trained(tiny_export: tuple[Path, Path]) -> tuple[Setup, Path]:
    checkpoint, bundle = tiny_export
    setup = build_setup(read_checkpoint_info(checkpoint).config, checkpoint=checkpoint, progress=False)
    setup.model.eval()
    return setup, bundle


def packed_h(setup: Setup, batch: dict) -> torch.Tensor:
    """`h` at every supervised slot through the training code path (eval mode: no ID dropout)."""
    with torch.no_grad():
        return setup.model.encode_packed(batch)[1]


def slot_requests(setup: Setup, windows, index: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(history items, target position) of every supervised slot, in the packer's order."""
    histories, positions = [], []
    for w in index:
        start, end, first = windows.starts[w], windows.ends[w], windows.first_target[w]
        for p in range(start + 1, end):
            if p >= first:
                histories.append(setup.split.seq_items[start:p].astype(np.int64))
                positions.append(p)
    return histories, np.asarray(positions)


def test_every_training_position_equals_the_served_onnx_h(trained: tuple[Setup, Path]) -> None:
    setup, bundle_dir = trained
    bundle = load_bundle(bundle_dir)
    sessions = bundle.open_sessions()
    windows = training_windows(setup.split, "every", setup.config.data.min_history)
    index = np.arange(0, len(windows), max(1, len(windows) // 12))[:12]
    batch = setup.batcher.training_batch(windows, index, np.random.default_rng(0), 2, gen_text=True)
    h_train = packed_h(setup, batch).numpy()
    histories, positions = slot_requests(setup, windows, index)
    assert len(histories) == len(h_train) > len(index)  # more targets than windows: every position trained
    queries = setup.batcher.query_texts(positions)
    assert sum(bool(q) for q in queries) > len(queries) // 2  # the synthetic data carries a query per event
    m = bundle.manifest
    feeds = query_encoder_feeds(
        bundle.tokenizer,
        bundle.item_features,
        queries,
        histories,
        m.max_query_tokens,
        m.max_history,
        bundle.item_id_buckets if bundle.query_takes_buckets else None,
    )
    h_served = sessions.encode_query(feeds)
    np.testing.assert_allclose(h_train, h_served, atol=2e-5, rtol=0)
    # Different positions really are different requests (the comparison is not trivially constant).
    assert np.abs(h_served[0] - h_served[1:]).max() > 1e-2


def test_the_last_slot_is_the_served_request_of_that_target(trained: tuple[Setup, Path]) -> None:
    """Single-target windows (train.targets=last) hold exactly the request evaluation and serving build."""
    setup, bundle_dir = trained
    sessions = load_bundle(bundle_dir).open_sessions()
    windows = training_windows(setup.split, "last", setup.config.data.min_history)
    index = np.arange(10)
    batch = setup.batcher.training_batch(windows, index, np.random.default_rng(0), 1, gen_text=False)
    assert len(batch["target_items"]) == len(index)
    served = setup.batcher.encoder_inputs(windows.ends[index] - 1)
    h_served = sessions.encode_query({k: v.numpy() for k, v in served.items()})
    np.testing.assert_allclose(packed_h(setup, batch).numpy(), h_served, atol=2e-5, rtol=0)


def test_packed_mask_lets_each_slot_see_only_its_prefix() -> None:
    layout = pack_rows(
        histories=[np.array([5, 6, 7])],
        slot_queries=[[[11], [12, 13], []]],
        slot_supervised=[np.array([True, True, True])],
        slot_texts=[{2: [21, 22]}],
        pad_id=0,
        eos_id=1,
    )
    # Columns: h0 h1 h2 | q11 E0 | q12 q13 E1 | E2 t21 t22
    allowed = layout.allowed[0]
    emb_cols = layout.slot_col.tolist()
    assert emb_cols == [4, 7, 8]
    assert allowed[4, :5].tolist() == [True, False, False, True, True]  # E0 sees h0 and its own slot only
    assert allowed[7].tolist()[:8] == [True, True, False, False, False, True, True, True]
    assert allowed[8, :3].all() and not allowed[8, 3:8].any()  # E2: the whole history, no other slot
    assert not allowed[:3, 3:].any()  # history never sees a slot
    assert layout.position_ids[0].tolist() == [0, 1, 2, 1, 2, 2, 3, 4, 3, 4, 5]
    # L_gen: E2 predicts t21, t21 predicts t22, t22 predicts EOS; nothing else is labelled.
    assert layout.gen_labels[0].tolist() == [-100] * 8 + [21, 22, 1]
