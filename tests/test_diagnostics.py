"""`karma diagnose`: metric functions on hand-built tensors, then two real tiny runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from karma.config import load_config
from recipes.cli import app
from tests.helpers import tiny_train_overrides
from training.checkpoint import read_checkpoint_info
from training.diagnostics import (
    ATTENTION_METRICS,
    JACCARD_K,
    JSON_FILE,
    LAYER_PLOT,
    MAPS_PLOT,
    attention_metrics,
    attention_pass,
    category_jaccard_at_k,
    diagnose_setup,
    mean_pairwise_cosine,
    normalized_entropy,
    participation_ratio,
    random_item_jaccard,
    row_consistency,
    shared_h_hit_rates,
    top_column_mass,
    top_k_items,
    uniform_causal_attention,
)
from training.evaluation import eval_targets
from training.setup import build_setup, embed_users
from training.trainer import CHECKPOINT_DIR, run_dir, train

# ---- metric functions ----------------------------------------------------------------------------


def test_uniform_row_has_entropy_one_and_one_hot_has_zero() -> None:
    valid = torch.tensor([[True, True, True, True, False]])
    uniform = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]])
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    assert normalized_entropy(uniform, valid).item() == pytest.approx(1.0, abs=1e-6)
    assert normalized_entropy(one_hot, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(normalized_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])).item())


def test_top_column_mass_one_hot_is_one_and_uniform_is_one_over_n() -> None:
    history = torch.tensor([[False, True, True, True, True]])
    one_hot = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0]])  # all of the history attention on one column
    uniform = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]])
    assert top_column_mass(one_hot, history).item() == pytest.approx(1.0)
    assert top_column_mass(uniform, history).item() == pytest.approx(0.25)
    assert math.isnan(top_column_mass(torch.tensor([[1.0, 0, 0, 0, 0]]), history).item())  # no history mass


def test_row_consistency_identical_rows_one_disjoint_rows_zero() -> None:
    keys = torch.ones(3, dtype=torch.bool)
    rows = torch.ones(3, dtype=torch.bool)
    stripes = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    diagonal = torch.eye(3)
    assert row_consistency(stripes, rows, keys).item() == pytest.approx(1.0)
    assert row_consistency(diagonal, rows, keys).item() == pytest.approx(0.0)
    single = torch.tensor([False, False, True])
    assert math.isnan(row_consistency(stripes, single, keys).item())


def test_attention_metrics_on_hand_built_layer() -> None:
    # layout: [q0][pad][h0 h1 h2][EMB]; S = 6
    valid = torch.tensor([[True, False, True, True, True, True]])
    history = torch.tensor([[False, False, True, True, True, False]])
    uniform = uniform_causal_attention(valid)  # (1, 1, 6, 6)
    rows = uniform[0, 0][valid[0]]
    assert torch.allclose(rows.sum(-1), torch.ones(5))
    m = attention_metrics(uniform, valid, history)
    assert set(m) == set(ATTENTION_METRICS)
    assert m["emb_top_column_mass"].item() == pytest.approx(1 / 3)
    assert m["emb_entropy"].item() == pytest.approx(1.0, abs=1e-6)
    assert m["emb_first_token_mass"].item() == pytest.approx(1 / 5)
    # R = {h0, h1, h2, EMB}; their mass on q0 is 1/2, 1/3, 1/4, 1/5
    assert m["rows_first_token_mass"].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    # column totals over R: h0 = 1/2+1/3+1/4+1/5, h1 = 1/3+1/4+1/5, h2 = 1/4+1/5
    totals = [1 / 2 + 1 / 3 + 1 / 4 + 1 / 5, 1 / 3 + 1 / 4 + 1 / 5, 1 / 4 + 1 / 5]
    assert m["rows_top_column_mass"].item() == pytest.approx(totals[0] / sum(totals))

    # A one-hot "barcode": every row of R puts all its attention on h1 (rows before h1 on q0).
    sink = torch.zeros(1, 1, 6, 6)
    sink[0, 0, :3, 0] = 1.0
    sink[0, 0, 3:, 3] = 1.0
    m = attention_metrics(sink, valid, history)
    assert m["emb_top_column_mass"].item() == pytest.approx(1.0)
    assert m["emb_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["emb_first_token_mass"].item() == pytest.approx(0.0)
    assert m["rows_first_token_mass"].item() == pytest.approx(0.25)  # only the h0 row
    # rows h1, h2, EMB are identical; h0 is orthogonal to them: 6 of 12 ordered pairs have cos 1
    assert m["row_consistency"].item() == pytest.approx(0.5)


def test_per_head_metrics_keep_their_heads() -> None:
    valid = torch.tensor([[True, True, True]])
    history = torch.tensor([[False, True, False]])
    attn = torch.zeros(1, 2, 3, 3)
    attn[0, :, 0, 0] = 1.0
    attn[0, :, 1, :2] = 0.5
    attn[0, 0, 2] = torch.tensor([1.0, 0.0, 0.0])  # head 0: [EMB] all on the first token
    attn[0, 1, 2] = torch.tensor([0.0, 0.0, 1.0])  # head 1: [EMB] all on itself
    m = attention_metrics(attn, valid, history)
    assert m["emb_first_token_mass"].tolist() == [[1.0, 0.0]]
    assert m["rows_first_token_mass"].tolist() == [[0.75, 0.25]]


def test_participation_ratio_bounds() -> None:
    gen = torch.Generator().manual_seed(0)
    isotropic = torch.randn(4000, 8, generator=gen)
    assert participation_ratio(isotropic) == pytest.approx(8.0, rel=0.05)
    rank_one = torch.randn(100, 1, generator=gen) * torch.randn(1, 8, generator=gen)
    assert participation_ratio(rank_one) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(participation_ratio(torch.zeros(1, 8)))


def test_mean_pairwise_cosine_one_for_identical_users_zero_for_random() -> None:
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(1, 16, generator=gen).expand(50, 16) * torch.rand(50, 1, generator=gen)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert abs(mean_pairwise_cosine(torch.randn(2000, 64, generator=gen))) < 0.01
    h = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen), dim=1)
    pairs = [float(h[i] @ h[j]) for i in range(7) for j in range(7) if i != j]
    assert mean_pairwise_cosine(h) == pytest.approx(np.mean(pairs))
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 4)))


def test_category_jaccard_and_random_reference() -> None:
    # categories: 0 = {a}, 1 = {a, b}, 2 = {b}, 3 = {} ; target item 0 ({a})
    multi_hot = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    top = torch.tensor([[0, 1, 2, -1], [2, 3, 3, 3]])
    targets = torch.tensor([0, 3])
    per_user = category_jaccard_at_k(top, targets, multi_hot)
    assert per_user[0].item() == pytest.approx((1 + 0.5 + 0) / 3)  # the -1 slot is skipped
    assert math.isnan(per_user[1].item())  # target without a category
    ref = random_item_jaccard(torch.tensor([0]), multi_hot)
    assert ref.item() == pytest.approx((1 + 0.5 + 0 + 0) / 4)


# ---- two real tiny runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("diag")
    out = {}
    for preset in ("action-only", "karma"):
        overrides = [*tiny_train_overrides(tmp), f"loss.preset={preset}", f"train.run_name=tiny-{preset}"]
        config = load_config(overrides=overrides, environ={})
        train(config, progress=False)
        out[preset] = run_dir(config) / CHECKPOINT_DIR
    return out


def test_attention_hook_rows_sum_to_one_and_h_matches_the_tower(runs: dict[str, Path]) -> None:
    info = read_checkpoint_info(runs["karma"])
    setup = build_setup(info.config, checkpoint=runs["karma"], progress=False)
    decoder = setup.model.query_tower.decoder
    before = decoder.config._attn_implementation
    positions = eval_targets(setup.split, "test", max_users=12).positions
    p = attention_pass(setup, positions)
    assert decoder.config._attn_implementation == before  # restored
    assert len(p.attentions) == info.config.model.tiny_layers
    valid = p.valid
    for a in p.attentions:
        b, h, s, _ = a.shape
        assert (b, h, s) == (12, info.config.model.tiny_heads, valid.shape[1])
        on_valid = (a * valid[:, None, None, :]).sum(-1)  # (B, H, S)
        rows = valid[:, None, :].expand(b, h, s)
        assert torch.allclose(on_valid[rows], torch.ones(int(rows.sum())), atol=1e-5)
        leaked = (a * ~valid[:, None, None, :]).abs().amax(-1)  # (B, H, S): mass on padding keys per row
        assert leaked[rows].max() < 1e-6  # no real position attends to padding (padding rows are never read)
        causal_future = torch.ones(s, s, dtype=torch.bool).triu(1)
        assert (a * causal_future).abs().amax(-1)[rows].max() < 1e-6  # real positions never see the future
    assert torch.allclose(p.h, embed_users(setup, positions), atol=1e-5)


def test_diagnostics_are_finite_and_in_range(runs: dict[str, Path]) -> None:
    for preset, ckpt in runs.items():
        info = read_checkpoint_info(ckpt)
        setup = build_setup(info.config, checkpoint=ckpt, progress=False)
        d = diagnose_setup(setup, ckpt, n_users=48, batch_size=16)
        assert d.protocol["users"] == 48
        for name in ATTENTION_METRICS:
            values = d.per_layer[name]
            assert values.shape == (info.config.model.tiny_layers, info.config.model.tiny_heads)
            assert np.isfinite(values).all(), name
            assert ((values >= -1e-6) & (values <= 1 + 1e-6)).all(), name
        summary = d.summary()
        assert all(math.isfinite(v) for v in summary.values()), summary
        dim = info.config.model.embed_dim
        assert 1.0 - 1e-6 <= summary["effective_rank"] <= dim + 1e-6
        assert -1.0 / 47 - 1e-6 <= summary["h_mean_cosine"] <= 1.0 + 1e-6
        assert 0.0 <= summary["recon_token_accuracy"] <= 1.0 and summary["recon_loss"] > 0
        assert 0.0 <= summary[f"category_jaccard@{JACCARD_K}"] <= 1.0
        assert 0.0 <= summary["hr@200_own_h"] <= 1.0 and 0.0 <= summary["hr@200_shared_h"] <= 1.0
        assert d.recon_trained == (preset == "karma")
        assert any("head untrained" in n for n in d.notes) == (preset == "action-only")
        assert len(d.maps) == 2 and all(len(m.layers) == info.config.model.tiny_layers for m in d.maps)
        for m in d.maps:
            assert m.layers[0].shape == (m.n_query + m.n_history + 1,) * 2


def test_top_k_excludes_history_but_keeps_the_target(runs: dict[str, Path]) -> None:
    info = read_checkpoint_info(runs["action-only"])
    setup = build_setup(info.config, checkpoint=runs["action-only"], progress=False)
    targets = eval_targets(setup.split, "test", True, 20)
    n = setup.dataset.catalog.n_items
    users = torch.zeros(20, 4)
    items = torch.zeros(n, 4)
    items[:, 0] = torch.linspace(1.0, 0.0, n)  # item 0 scores highest for every user
    users[:, 0] = 1.0
    top = top_k_items(users, items, targets, k=n)
    for u in range(20):
        lo, hi = targets.exclude_offsets[u], targets.exclude_offsets[u + 1]
        excluded = set(targets.exclude_items[lo:hi].tolist()) - {int(targets.items[u])}
        kept = [i for i in top[u].tolist() if i >= 0]
        assert not excluded & set(kept)
        assert int(targets.items[u]) in kept
        assert len(kept) == n - len(excluded)


def test_cli_writes_json_and_pngs_and_compares_side_by_side(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    single = runner.invoke(app, ["diagnose", str(runs["karma"]), "--users", "24"])
    assert single.exit_code == 0, single.output
    default_out = runs["karma"].parent / "diagnostics"
    assert "Collapse diagnostics" in single.output and "users=24" in single.output
    report = json.loads((default_out / JSON_FILE).read_text())
    assert list(report["models"]) == ["tiny-karma (karma)"]
    assert report["figures"][MAPS_PLOT]["side_by_side"] is False
    for png in (LAYER_PLOT, MAPS_PLOT):
        assert (default_out / png).stat().st_size > 5000

    out = tmp_path / "compare"
    both = runner.invoke(
        app, ["diagnose", str(runs["karma"]), "--other", str(runs["action-only"]), "--users", "24", "--out", str(out)]
    )
    assert both.exit_code == 0, both.output
    assert "head untrained" in both.output
    report = json.loads((out / JSON_FILE).read_text())
    assert list(report["models"]) == ["tiny-karma (karma)", "tiny-action-only (action-only)"]
    maps = report["figures"][MAPS_PLOT]
    assert maps["side_by_side"] is True and maps["grid"][1] == 2 * len(maps["users"])
    a = report["models"]["tiny-karma (karma)"]
    b = report["models"]["tiny-action-only (action-only)"]
    assert a["map_users"] == b["map_users"]  # the same users in both columns
    assert len(a["per_layer"]["emb_entropy"]) == 2
    wide = matplotlib.image.imread(out / MAPS_PLOT)
    narrow = matplotlib.image.imread(default_out / MAPS_PLOT)
    assert wide.shape[1] > 1.5 * narrow.shape[1]


def test_shared_h_hit_rates_separate_personal_from_global_rankings() -> None:
    """Each user's h = its target's embedding: own HR@1 = 1; one shared h can hit at most one target."""
    from training.evaluation.protocol import EvalTargets

    items = torch.nn.functional.normalize(torch.eye(6)[:, :4] + 0.01, dim=-1)  # 6 items, 4 distinct directions
    target_items = np.array([0, 1, 2, 3])
    targets = EvalTargets(
        which="test",
        positions=np.arange(4),
        users=np.arange(4),
        items=target_items,
        history_start=np.zeros(4, dtype=np.int64),
        history_end=np.arange(4),
        exclude_offsets=None,
        exclude_items=None,
        exclude_history=False,
        max_history=20,
    )
    own, shared = shared_h_hit_rates(items[target_items], items, targets, k=1)
    assert own == 1.0 and shared <= 0.25
    same = items[[0, 0, 0, 0]]
    assert shared_h_hit_rates(same, items, targets, k=1) == (0.25, 0.25)  # a shared h: no gap at all
