"""Tests for training/losses: L_act (sampled softmax, pairwise), LM cross-entropy, flow / MSE content heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    IGNORE_INDEX,
    FlowMatchingHead,
    MSEHead,
    catalog_softmax_loss,
    in_batch_negatives,
    lm_loss,
    make_content_head,
    pairwise_logistic_loss,
    sampled_softmax_loss,
    shift_for_next_token,
    token_accuracy,
)


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def _ce_loop(logits: list[list[float]]) -> float:
    """Mean over rows of -log softmax(row)[row index], by explicit loops (skipping -inf columns)."""
    total = 0.0
    for i, row in enumerate(logits):
        finite = [v for v in row if v != -math.inf]
        m = max(finite)
        lse = m + math.log(sum(math.exp(v - m) for v in finite))
        total += lse - row[i]
    return total / len(logits)


# ---------------------------------------------------------------------------------------------- L_act: softmax


def test_sampled_softmax_matches_hand_computed_cross_entropy():
    torch.manual_seed(0)
    b, m, d, tau = 3, 2, 4, 0.1
    h, pos, neg = _unit(b, d), _unit(b, d), _unit(m, d)
    pos_idx = torch.tensor([0, 1, 2])
    neg_idx = torch.tensor([5, 6])
    cand = torch.cat([pos, neg])
    logits = [[float(h[i] @ cand[j]) / tau for j in range(b + m)] for i in range(b)]
    expected = _ce_loop(logits)
    got = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, temperature=tau)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_catalog_softmax_is_cross_entropy_over_every_item():
    torch.manual_seed(0)
    h, catalog = _unit(5, 8), _unit(30, 8)
    cols = torch.tensor([0, 3, 3, 29, 7])
    loss = catalog_softmax_loss(h, catalog, cols, scale=10.0)
    logits = (h @ catalog.T * 10.0).tolist()
    rows = zip(logits, cols.tolist(), strict=True)
    expected = sum(math.log(sum(math.exp(v) for v in row)) - row[c] for row, c in rows) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_catalog_softmax_takes_fresh_positives_over_a_cache():
    """With `pos_emb` the target column is h·pos_emb (fresh, with gradient); the cache's own column is unused."""
    torch.manual_seed(1)
    h, cache = _unit(4, 8), _unit(20, 8)
    cols = torch.tensor([1, 2, 3, 4])
    pos = _unit(4, 8).requires_grad_(True)
    loss = catalog_softmax_loss(h, cache, cols, pos_emb=pos, scale=5.0)
    expected = 0.0
    for row, c in enumerate(cols.tolist()):
        scores = (h[row] @ cache.T * 5.0).tolist()
        scores[c] = float(h[row] @ pos[row].detach()) * 5.0
        expected += math.log(sum(math.exp(v) for v in scores)) - scores[c]
    assert loss.item() == pytest.approx(expected / 4, rel=1e-5)
    loss.backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0  # the positives carry the item tower's gradient


def test_sampled_softmax_in_batch_only():
    torch.manual_seed(1)
    h, pos = _unit(4, 8), _unit(4, 8)
    pos_idx = torch.tensor([3, 1, 4, 9])
    tau = 0.05
    logits = [[float(h[i] @ pos[j]) / tau for j in range(4)] for i in range(4)]
    got = sampled_softmax_loss(h, pos, pos_idx, temperature=tau)
    assert float(got) == pytest.approx(_ce_loop(logits), rel=1e-5)


def test_logq_correction_equals_subtracting_log_q_from_logits():
    torch.manual_seed(2)
    b, m, d, tau = 4, 3, 6, 0.07
    h, pos, neg = _unit(b, d), _unit(b, d), _unit(m, d)
    pos_idx = torch.tensor([0, 2, 4, 6])
    neg_idx = torch.tensor([1, 3, 5])
    n_items = 8
    q = torch.rand(n_items) + 0.05
    log_q = torch.log(q / q.sum())
    ids = torch.cat([pos_idx, neg_idx])
    raw = torch.cat([h @ pos.T, h @ neg.T], dim=1) / tau
    corrected = raw - log_q[ids].unsqueeze(0)
    expected = _ce_loop(corrected.tolist())
    got = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, log_q=log_q, temperature=tau)
    plain = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, temperature=tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert abs(float(got) - float(plain)) > 1e-3  # the correction does change the loss
    # A uniform log_q shifts every logit of a row equally: no change at all.
    uniform = torch.full((n_items,), -math.log(n_items))
    same = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, log_q=uniform, temperature=tau)
    assert float(same) == pytest.approx(float(plain), rel=1e-5)


def test_accidental_hits_are_masked_in_batch_and_in_sampled_negatives():
    torch.manual_seed(3)
    d, tau = 5, 0.1
    h = _unit(3, d)
    item_emb = _unit(10, d)
    pos_idx = torch.tensor([7, 2, 7])  # rows 0 and 2 clicked the same item
    neg_idx = torch.tensor([2, 5])  # the sampled negative 2 is row 1's positive
    pos, neg = item_emb[pos_idx], item_emb[neg_idx]
    got = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, temperature=tau)

    # Reference: for each row, drop the columns (other than its own) that hold its positive item.
    ids = torch.cat([pos_idx, neg_idx]).tolist()
    cand = torch.cat([pos, neg])
    total = 0.0
    for i in range(3):
        keep = [j for j in range(5) if j == i or ids[j] != ids[i]]
        row = torch.stack([h[i] @ cand[j] for j in keep]) / tau
        total += float(torch.logsumexp(row, 0) - row[keep.index(i)])
    assert float(got) == pytest.approx(total / 3, rel=1e-5)

    # Explicitly: row 0 sees columns {0, 1, 3, 4} (column 2 is the same item 7).
    cols0 = [0, 1, 3, 4]
    row0 = torch.stack([h[0] @ cand[j] for j in cols0]) / tau
    l0 = float(torch.logsumexp(row0, 0) - row0[0])
    unmasked = torch.stack([h[0] @ cand[j] for j in range(5)]) / tau
    assert l0 < float(torch.logsumexp(unmasked, 0) - unmasked[0])


def test_sampled_softmax_decreases_when_h_moves_toward_positive():
    torch.manual_seed(4)
    h, pos, neg = _unit(8, 16), _unit(8, 16), _unit(20, 16)
    pos_idx, neg_idx = torch.arange(8), torch.arange(100, 120)
    before = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx)
    h2 = F.normalize(h + 0.5 * pos, dim=-1)
    after = sampled_softmax_loss(h2, pos, pos_idx, neg, neg_idx)
    assert float(after) < float(before)


def test_sampled_softmax_gradients_reach_all_inputs():
    torch.manual_seed(5)
    h = _unit(6, 8).requires_grad_()
    pos = _unit(6, 8).requires_grad_()
    neg = _unit(10, 8).requires_grad_()
    pos_idx = torch.tensor([0, 1, 2, 2, 3, 4])
    neg_idx = torch.tensor([1, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    log_q = torch.log(torch.full((20,), 1 / 20))
    loss = sampled_softmax_loss(h, pos, pos_idx, neg, neg_idx, log_q=log_q)
    loss.backward()
    for t in (h, pos, neg):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_sampled_softmax_validates_inputs():
    h, pos = _unit(2, 4), _unit(2, 4)
    with pytest.raises(ValueError):
        sampled_softmax_loss(h, pos, torch.tensor([0, 1]), neg_emb=_unit(3, 4))  # ids missing
    with pytest.raises(ValueError):
        sampled_softmax_loss(h, pos, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        sampled_softmax_loss(h, pos, torch.tensor([0, 1]), temperature=0.0)


# --------------------------------------------------------------------------------------------- L_act: pairwise


def test_pairwise_matches_hand_example():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    neg = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -1.0]]])
    # s+ = [0.8, 0.8]; s- = [[0, -1], [0, -1]]
    diffs = [0.8, 1.8, 0.8, 1.8]
    expected = sum(math.log1p(math.exp(-x)) for x in diffs) / 4
    assert float(pairwise_logistic_loss(h, pos, neg)) == pytest.approx(expected, rel=1e-6)
    # temperature divides the difference
    expected_t = sum(math.log1p(math.exp(-x / 0.5)) for x in diffs) / 4
    assert float(pairwise_logistic_loss(h, pos, neg, temperature=0.5)) == pytest.approx(expected_t, rel=1e-6)


def test_pairwise_mask_ignores_padding_and_empty_rows():
    torch.manual_seed(6)
    h, pos, neg = _unit(3, 4), _unit(3, 4), _unit(3, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    s_pos = (h * pos).sum(-1)
    vals = []
    for i in range(3):
        for k in range(3):
            if mask[i, k]:
                vals.append(float(F.softplus(-(s_pos[i] - h[i] @ neg[i, k]))))
    expected = sum(vals) / len(vals)
    got = pairwise_logistic_loss(h, pos, neg, mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # padded entries do not matter, whatever they hold
    neg2 = neg.clone()
    neg2[~mask] = 100.0
    assert float(pairwise_logistic_loss(h, pos, neg2, mask)) == pytest.approx(expected, rel=1e-5)


def test_pairwise_no_valid_negative_returns_zero_with_grad():
    h = _unit(2, 4).requires_grad_()
    pos, neg = _unit(2, 4), _unit(2, 3, 4)
    loss = pairwise_logistic_loss(h, pos, neg, torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert h.grad is not None and float(h.grad.abs().sum()) == 0.0


def test_in_batch_negatives_layout_and_mask():
    torch.manual_seed(7)
    pos = torch.randn(4, 3, requires_grad=True)
    pos_idx = torch.tensor([10, 11, 10, 12])
    neg, mask = in_batch_negatives(pos, pos_idx)
    assert neg.shape == (4, 3, 3) and mask.shape == (4, 3) and mask.dtype == torch.bool
    for i in range(4):
        others = [j for j in range(4) if j != i]
        assert torch.equal(neg[i], pos[others])
        assert mask[i].tolist() == [bool(pos_idx[j] != pos_idx[i]) for j in others]
    assert mask[0].tolist() == [True, False, True]  # row 2 clicked the same item as row 0
    # differentiable end to end with the pairwise loss
    h = _unit(4, 3).requires_grad_()
    pairwise_logistic_loss(h, pos, neg, mask).backward()
    assert torch.isfinite(pos.grad).all() and pos.grad.abs().sum() > 0
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_in_batch_negatives_single_row():
    neg, mask = in_batch_negatives(torch.randn(1, 5), torch.tensor([3]))
    assert neg.shape == (1, 0, 5) and mask.shape == (1, 0)
    h = _unit(1, 5).requires_grad_()
    loss = pairwise_logistic_loss(h, _unit(1, 5), neg, mask)
    assert float(loss.detach()) == 0.0
    loss.backward()


# ----------------------------------------------------------------------------------------------------- LM loss


def test_lm_loss_matches_cross_entropy_and_ignores_padding():
    torch.manual_seed(8)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 1], [0, IGNORE_INDEX, IGNORE_INDEX, 10, 2]])
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    got = lm_loss(logits, labels)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    # explicit mean over the 6 valid positions
    manual = [
        -float(torch.log_softmax(logits.detach()[b, t], -1)[labels[b, t]])
        for b in range(2)
        for t in range(5)
        if labels[b, t] != IGNORE_INDEX
    ]
    assert float(got.detach()) == pytest.approx(sum(manual) / 6, rel=1e-5)
    # changing logits at ignored positions changes nothing
    logits2 = logits.detach().clone()
    logits2[0, 0] += 50.0
    logits2[1, 2] -= 50.0
    assert float(lm_loss(logits2, labels)) == pytest.approx(float(got.detach()), rel=1e-6)
    got.backward()
    assert float(logits.grad[0, 0].abs().sum()) == 0.0 and float(logits.grad[0, 1].abs().sum()) > 0


def test_lm_loss_all_ignored_returns_zero_with_grad():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(logits.grad.abs().sum()) == 0.0


def test_shift_for_next_token():
    torch.manual_seed(9)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, 3, 4], [5, 0, IGNORE_INDEX, IGNORE_INDEX]])
    sl, sy = shift_for_next_token(logits, labels)
    assert sl.shape == (2, 3, 6) and sy.shape == (2, 3)
    assert torch.equal(sl, logits[:, :3]) and sy.tolist() == [[2, 3, 4], [0, IGNORE_INDEX, IGNORE_INDEX]]
    # the HF-style reference computation
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(lm_loss(sl, sy)) == pytest.approx(float(ref), rel=1e-6)


def test_token_accuracy():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = 1.0  # predicts 1
    logits[0, 1, 2] = 1.0  # predicts 2
    logits[0, 2, 0] = 1.0  # predicts 0
    logits[0, 3, 1] = 1.0  # predicts 1 (ignored)
    labels = torch.tensor([[1, 0, 0, IGNORE_INDEX]])
    assert token_accuracy(logits, labels) == pytest.approx(2 / 3)
    assert token_accuracy(logits, torch.full((1, 4), IGNORE_INDEX)) == 0.0


# ---------------------------------------------------------------------------------------------- L_img: heads

MU = torch.tensor([[2.0, 0.0], [-2.0, 1.0]])


@pytest.fixture
def one_thread():
    """Tiny-MLP training is fastest single-threaded; with intra-op threads on a busy 2-core box it ran 60x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.randint(0, 2, (n,), generator=g)
    return MU[c] + 0.1 * torch.randn(n, 2, generator=g), F.one_hot(c, 2).float()


def _train(head: torch.nn.Module, steps: int, g: torch.Generator, lr: float = 3e-3) -> None:
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x, c = _toy_batch(256, g)
        loss = head.loss(x, c, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_flow_head_learns_conditional_distribution(one_thread):
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(10)
    head = FlowMatchingHead(target_dim=2, cond_dim=2, hidden=64, time_embed_dim=32)
    _train(head, 800, g)
    with torch.no_grad():
        for k in range(2):
            cond = F.one_hot(torch.full((2000,), k), 2).float()
            s = head.sample(cond, steps=32, generator=g)
            assert s.shape == (2000, 2)
            assert torch.allclose(s.mean(0), MU[k], atol=0.15), (k, s.mean(0))
            std = s.std(0)
            assert ((std > 0.05) & (std < 0.2)).all(), (k, std)


def test_mse_head_learns_the_mean(one_thread):
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(11)
    head = MSEHead(target_dim=2, cond_dim=2, hidden=64)
    _train(head, 400, g)
    with torch.no_grad():
        out = head.sample(torch.eye(2))
    assert torch.allclose(out, MU, atol=0.1), out


def test_flow_is_mode_seeking_mse_is_mean_seeking(one_thread):
    """One condition, two equally likely targets ±(2, 0): flow samples land on the modes, MSE on the mean."""
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    cond1 = torch.ones(256, 1)

    def batch() -> torch.Tensor:
        sign = torch.randint(0, 2, (256,), generator=g).float() * 2 - 1
        return torch.stack([2 * sign, torch.zeros(256)], 1) + 0.1 * torch.randn(256, 2, generator=g)

    flow, mse = FlowMatchingHead(2, 1, hidden=64, time_embed_dim=32), MSEHead(2, 1, hidden=64)
    for head, steps in ((flow, 800), (mse, 200)):
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = head.loss(batch(), cond1, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        s = flow.sample(torch.ones(2000, 1), generator=g)
        m = mse.sample(torch.ones(1, 1))
    near_mode = ((s[:, 0].abs() - 2).abs() < 0.5).float().mean()
    assert near_mode > 0.85, near_mode
    assert 0.3 < float((s[:, 0] > 0).float().mean()) < 0.7  # both modes are kept
    assert float(m[0, 0].abs()) < 0.5  # the regression sits between the modes


@pytest.mark.parametrize("kind", ["flow", "mse"])
def test_gradient_flows_into_cond(kind: str):
    torch.manual_seed(13)
    head = make_content_head(kind, target_dim=5, cond_dim=8, hidden=32, time_embed_dim=16)
    cond = _unit(4, 8).requires_grad_()
    target = torch.randn(4, 5)
    loss = head.loss(target, cond, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert cond.grad is not None and torch.isfinite(cond.grad).all() and cond.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())
    assert head.sample(cond.detach(), steps=4).shape == (4, 5)


def test_flow_loss_is_reproducible_with_generator_and_checks_shapes():
    torch.manual_seed(14)
    head = FlowMatchingHead(3, 2, hidden=16, time_embed_dim=8)
    target, cond = torch.randn(6, 3), torch.randn(6, 2)
    a = head.loss(target, cond, generator=torch.Generator().manual_seed(5))
    b = head.loss(target, cond, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        head.loss(torch.randn(6, 4), cond)
    with pytest.raises(ValueError):
        head.loss(target, torch.randn(5, 2))
    with pytest.raises(ValueError):
        make_content_head("gan", 3, 2)  # type: ignore[arg-type]
