"""One eager pass of the query tower that keeps every attention map, and the per-user maps cut from it."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from karma.errors import KarmaError
from training.setup import Setup, to_device

log = logging.getLogger("training.diagnostics")

# ---- running a model -------------------------------------------------------------------------


@contextmanager
def eager_attention(decoder: torch.nn.Module):
    """Switch a HF decoder to eager attention (so it returns attention weights), restore it after."""
    config = decoder.config
    original = getattr(config, "_attn_implementation", None)
    setter = getattr(decoder, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            config._attn_implementation = "eager"
        if config._attn_implementation != "eager":
            raise KarmaError(f"could not switch {type(decoder).__name__} to eager attention")
        yield
    finally:
        if original is not None:
            if setter is not None:
                setter(original)
            else:
                config._attn_implementation = original


@dataclass
class AttentionPass:
    """One eager pass of the query tower: `h_t`, per-layer attention, masks and segment layout."""

    h: Tensor  # (B, D) unit h_t, identical to the served query tower's output
    attentions: tuple[Tensor, ...]  # per layer (B, H, S, S)
    valid: Tensor  # (B, S) bool
    history: Tensor  # (B, S) bool: history-item positions that are valid
    hist_len: int  # L: the history block is positions [0, L), then the query, then [EMB]


@torch.inference_mode()
def attention_pass(setup: Setup, positions: np.ndarray) -> AttentionPass:
    """Run the query tower with eager attention on split `positions`, keeping every attention map.

    Same sequence, mask and position ids as `QueryTower.forward` (tests check `h` matches it).
    """
    setup.model.eval()
    qt = setup.model.query_tower
    inputs = to_device(setup.batcher.encoder_inputs(positions), setup.device)
    embeds, mask = qt.build_sequence(**inputs)
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # as QueryTower.run_decoder
    with eager_attention(qt.decoder):
        out = qt.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            output_attentions=True,
        )
    if not out.attentions:
        raise KarmaError(f"{type(qt.decoder).__name__} returned no attention weights with output_attentions=True")
    hist_len = inputs["hist_mask"].shape[1]
    history = torch.zeros_like(mask, dtype=torch.bool)
    history[:, :hist_len] = inputs["hist_mask"].bool()
    return AttentionPass(
        h=qt.head(out.last_hidden_state[:, -1]),
        attentions=tuple(a.float() for a in out.attentions),
        valid=mask.bool(),
        history=history,
        hist_len=hist_len,
    )


@dataclass
class AttentionMap:
    """Head-averaged attention of one user for every layer, restricted to valid positions."""

    user: int
    position: int  # split position of the user's test target
    n_query: int  # valid query tokens
    n_history: int  # valid history items; [EMB] is the last position
    layers: list[np.ndarray]  # per layer (n, n), n = n_query + n_history + 1
    history_first: bool = True  # block order: history, query, [EMB] (False: maps of the older query-first tower)


def attention_map(p: AttentionPass, row: int, user: int, position: int) -> AttentionMap:
    keep = p.valid[row].nonzero().squeeze(-1)
    n_query = int(p.valid[row, p.hist_len : -1].sum())
    n_history = int(p.history[row].sum())
    layers = [a[row].mean(0)[keep][:, keep].cpu().numpy() for a in p.attentions]
    return AttentionMap(user=user, position=position, n_query=n_query, n_history=n_history, layers=layers)
