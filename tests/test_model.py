"""The KARMA model: loss terms, where their gradients go, and what export would keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from karma.config import load_config
from tests.helpers import tiny_train_overrides
from training.data.split import Windows, training_windows
from training.model.karma import PRESETS, LossWeights
from training.model.negatives import CatalogNegatives
from training.model.towers import ItemTower, QueryTower
from training.setup import Setup, build_setup, to_device


@pytest.fixture(scope="module")
def karma_setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("model")
    config = load_config(overrides=[*tiny_train_overrides(tmp), "loss.preset=karma"], environ={})
    return build_setup(config, progress=False)


def _windows(setup: Setup) -> Windows:
    return training_windows(setup.split, "every", setup.config.data.min_history)


def _batch(setup: Setup, n: int = 8) -> dict:
    """Packed every-position rows of the first `n` windows (2 regularised slots each, L_gen text on)."""
    return setup.batcher.training_batch(_windows(setup), np.arange(n), np.random.default_rng(0), 2, gen_text=True)


def _served_inputs(setup: Setup, n: int = 8) -> dict[str, torch.Tensor]:
    """What the served tower takes for the first `n` test users."""
    return setup.batcher.encoder_inputs(setup.split.test_pos[:n])


def _loss_terms(setup: Setup) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    catalog = CatalogNegatives.for_setup(setup, setup.device)
    assert catalog is not None  # 1k items: the exact softmax
    return setup.model(
        to_device(_batch(setup), setup.device),
        catalog=catalog.for_step(setup.model, 0),
        generator=torch.Generator().manual_seed(0),
    )


def _touched(model: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    """Top-level parameter families that receive a non-zero gradient from `loss`."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    families = set()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts = name.split(".")
            families.add(".".join(parts[:2]) if parts[0] in {"query_tower", "heads", "item_tower"} else parts[0])
    return families


def test_every_term_is_finite_and_present(karma_setup: Setup) -> None:
    out = _loss_terms(karma_setup)
    for key in ("act", "gen", "recon", "img", "total"):
        assert torch.isfinite(out[key]), key
    w = karma_setup.model.weights
    expected = out["act"] + w.gen * out["gen"] + w.recon * out["recon"] + w.img * out["img"]
    torch.testing.assert_close(out["total"], expected)


def test_gradients_reach_exactly_the_right_parameters(karma_setup: Setup) -> None:
    model = karma_setup.model
    out = _loss_terms(karma_setup)
    act = _touched(model, out["act"])
    gen = _touched(model, out["gen"])
    recon = _touched(model, out["recon"])
    img = _touched(model, out["img"])
    served_query = {
        "query_tower.decoder",
        "query_tower.projector",
        "query_tower.emb_token",
        "query_tower.out",
        "query_tower.id_embedding",
    }
    # L_act trains both towers (content and ID parts) and nothing train-only.
    assert act == served_query | {"item_tower.net", "item_tower.id_embedding"}
    # L_gen decodes from the history states: no item tower, no h_t projection, no recon/visual head.
    assert "item_tower.net" not in gen and "query_tower.out" not in gen
    assert {"query_tower.decoder", "query_tower.projector"} <= gen
    assert not any(f.startswith("heads.recon") or f.startswith("heads.visual") for f in gen)
    # L_recon goes through proj(h_t): the recon head, h_t's projection and the encoder.
    assert {"heads.recon_prefix", "query_tower.out", "query_tower.decoder", "query_tower.projector"} <= recon
    assert "item_tower.net" not in recon and "heads.visual" not in recon
    # L_img: the visual head and, through h_t, the query tower; never the item tower.
    assert {"heads.visual", "query_tower.out", "query_tower.decoder"} <= img
    assert "item_tower.net" not in img and "heads.recon_prefix" not in img


def test_recon_gradient_reaches_h(karma_setup: Setup) -> None:
    model = karma_setup.model
    enc = to_device(_served_inputs(karma_setup), karma_setup.device)
    h = model.query_tower(**enc).detach().requires_grad_(True)
    prefix = model.heads.recon_prefix(h).unsqueeze(1)
    targets = karma_setup.split.seq_items[karma_setup.split.test_pos[:8]]
    loss, _ = model.decode_text_loss(prefix, karma_setup.batcher.texts_of(targets))
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_dropping_train_only_heads_leaves_h_bit_identical(karma_setup: Setup) -> None:
    """Rebuild the served towers from the trained state dict alone (what export does)."""
    model = karma_setup.model.eval()
    cfg = karma_setup.config
    state = model.state_dict()
    layout = karma_setup.features.layout
    assert layout.id_buckets > 0  # the default recipe: exact item IDs
    served_q = QueryTower(
        _fresh_decoder(karma_setup),
        layout.dim,
        karma_setup.backbone.hidden_size,
        cfg.model.embed_dim,
        layout.id_buckets,
    )
    served_q.load_state_dict(
        {k.removeprefix("query_tower."): v for k, v in state.items() if k.startswith("query_tower.")}
    )
    served_i = ItemTower(layout.dim, cfg.model.item_tower_hidden, cfg.model.embed_dim, layout.id_buckets)
    served_i.load_state_dict(
        {k.removeprefix("item_tower."): v for k, v in state.items() if k.startswith("item_tower.")}
    )
    assert not any(k.startswith("heads.") for k in served_q.state_dict())
    batch = _batch(karma_setup)
    enc = _served_inputs(karma_setup)
    with torch.no_grad():
        assert torch.equal(served_q.eval()(**enc), model.query_tower(**enc))
        assert torch.equal(
            served_i.eval()(**batch["target_item_inputs"]), model.item_tower(**batch["target_item_inputs"])
        )
        # The training pass carries target text after the regularised [EMB]s; causal attention keeps
        # h_t the same: each window's last slot is the served request for that window's last target.
        out = model(batch, catalog=CatalogNegatives.for_setup(karma_setup, karma_setup.device).for_step(model, 0))
        rows = batch["slot_row"].numpy()
        last = np.flatnonzero(np.r_[rows[1:] != rows[:-1], True])
        windows = _windows(karma_setup)
        served = served_q(**karma_setup.batcher.encoder_inputs(windows.ends[:8] - 1))
        torch.testing.assert_close(out["h"][last], served, atol=1e-5, rtol=0)


def _fresh_decoder(setup: Setup) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(setup.backbone.causal_lm.config).get_decoder()


def test_padding_does_not_change_h(karma_setup: Setup) -> None:
    """Extra padding in query and history (as micro-batching with longer neighbours adds) keeps h_t."""
    model = karma_setup.model.eval()
    enc = _served_inputs(karma_setup, 4)
    padded = {
        "query_ids": torch.cat([enc["query_ids"], torch.zeros(4, 3, dtype=torch.long)], 1),
        "query_mask": torch.cat([enc["query_mask"], torch.zeros(4, 3, dtype=torch.long)], 1),
        "hist_features": torch.cat([torch.randn(4, 5, enc["hist_features"].shape[-1]), enc["hist_features"]], 1),
        "hist_mask": torch.cat([torch.zeros(4, 5, dtype=torch.long), enc["hist_mask"]], 1),
        "hist_buckets": torch.cat([torch.randint(0, 50, (4, 5)), enc["hist_buckets"]], 1),
    }
    with torch.no_grad():
        torch.testing.assert_close(model.query_tower(**padded), model.query_tower(**enc), atol=1e-5, rtol=0)


def test_semantic_warmup_loss_trains_projector_not_item_tower(karma_setup: Setup) -> None:
    model = karma_setup.model
    items = np.arange(8)
    out = model(
        {
            "item_inputs": karma_setup.batcher.item_inputs(torch.from_numpy(items)),
            "text": karma_setup.batcher.texts_of(items),
        },
        mode="warmup",
    )
    touched = _touched(model, out["total"])
    assert "query_tower.projector" in touched and "item_tower.net" not in touched


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_only_change_loss_weights(preset: str, tmp_path: Path) -> None:
    weights = LossWeights.from_config(load_config(overrides=[f"loss.preset={preset}"], environ={}).loss)
    assert (weights.gen > 0) == (preset in {"gen", "karma-text", "karma", "img-mse"})
    assert (weights.recon > 0) == (preset in {"recon", "karma-text", "karma", "img-mse"})
    assert (weights.img > 0) == (preset in {"karma", "img-mse"})
    assert weights.visual_head == {"karma": "flow", "img-mse": "mse"}.get(preset, "none")


def test_catalog_vocab_softmax_is_cross_entropy_over_the_catalog_tokens(tmp_path: Path) -> None:
    config = load_config(overrides=[*tiny_train_overrides(tmp_path), "loss.lm_vocab=catalog"], environ={})
    setup = build_setup(config, progress=False)
    model = setup.model
    vocab = model.lm_vocab
    assert vocab is not None and 0 < len(vocab) < model.heads.lm_head.weight.shape[0]
    text = setup.batcher.texts_of(np.arange(8))
    hidden = torch.randn(*text.labels.shape, setup.backbone.hidden_size)
    loss, _ = model.text_loss(hidden, text.labels)
    valid = text.labels != -100
    logits = hidden[valid] @ model.heads.lm_head.weight[vocab].T
    if getattr(model.heads.lm_head, "bias", None) is not None:
        logits = logits + model.heads.lm_head.bias[vocab]
    targets = torch.searchsorted(vocab, text.labels[valid])
    assert torch.equal(vocab[targets], text.labels[valid])  # every target token is in the set
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))
    # Only the catalog's rows of the LM head receive gradient.
    model.zero_grad(set_to_none=True)
    loss.backward()
    rows = model.heads.lm_head.weight.grad.abs().sum(1) > 0
    assert rows.any() and not rows[~torch.isin(torch.arange(len(rows)), vocab)].any()
