"""The two served towers: everything in this file is exported; nothing train-only lives here.

Query tower (the continuous-token interface, DESIGN §1):

    [c(f_1) … c(f_L)]  [q_1 … q_Lq]  [EMB]   →  decoder  →  h_t = normalize(W · hidden[EMB])
     one continuous      query text    learned
     token per history   tokens        token
     item, oldest first

`c(f) = projector(f) (+ id_embedding(row))` maps an item's frozen content features to one token
in the LLM's embedding space. The history comes first and the query last: then the history's
hidden states never depend on the query, so one causal pass over a user's whole sequence can
train a `[q][EMB]` slot after every history position (`training.model.sequences`) and each slot
computes exactly what this tower serves for that prefix. Padding may sit inside the sequence
(before short histories, after short queries); the attention mask hides it and the position ids
count only real tokens, so a padded row computes the same `h_t` as the unpadded one.

Item tower: an MLP over the same content features (+ the same optional ID embedding), so a new
item needs only its features to get a vector: no retraining, no re-export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ItemProjector(nn.Module):
    """Frozen content features (F) -> one continuous token (hidden)."""

    def __init__(self, feature_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


CENTER_RATE = 0.01  # EMA rate of the [EMB] running mean once past the first 100 batches


class QueryTower(nn.Module):
    """(query ids, query mask, history features, history mask) -> unit `h_t` (B, D)."""

    def __init__(
        self,
        decoder: nn.Module,
        feature_dim: int,
        hidden: int,
        embed_dim: int,
        id_buckets: int = 0,
        center_emb: bool = False,
    ):
        super().__init__()
        self.decoder = decoder  # HF base model; its embed_tokens embeds the query text
        self.center_emb = center_emb
        if center_emb:  # running mean of hidden[EMB]: cumulative for the first 1/CENTER_RATE batches, then EMA
            self.register_buffer("emb_center", torch.zeros(hidden))
            self.register_buffer("emb_center_batches", torch.zeros((), dtype=torch.long))
        self.projector = ItemProjector(feature_dim, hidden)
        self.id_embedding = id_table(id_buckets, hidden)
        self.emb_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.out = nn.Linear(hidden, embed_dim, bias=False)

    def item_tokens(
        self, features: torch.Tensor, id_buckets: torch.Tensor | None = None, id_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Continuous tokens for items: (..., F) -> (..., hidden); `id_keep` (training) drops ID vectors."""
        tokens = self.projector(features)
        if self.id_embedding is not None and id_buckets is not None:
            tokens = tokens + with_id_dropout(self.id_embedding(id_buckets), id_keep)
        return tokens

    def build_sequence(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        hist_features: torch.Tensor,
        hist_mask: torch.Tensor,
        hist_buckets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (B, L+Lq+1, H) and attention mask (B, L+Lq+1): history, query, [EMB] last."""
        query_tokens = self.decoder.get_input_embeddings()(query_ids)
        hist_tokens = self.item_tokens(hist_features, hist_buckets)
        batch = query_ids.shape[0]
        emb = self.emb_token.to(query_tokens.dtype).expand(batch, 1, -1)
        embeds = torch.cat([hist_tokens.to(query_tokens.dtype), query_tokens, emb], dim=1)
        ones = torch.ones(batch, 1, dtype=query_mask.dtype, device=query_mask.device)
        mask = torch.cat([hist_mask.to(query_mask.dtype), query_mask, ones], dim=1)
        return embeds, mask

    def run_decoder(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states; position ids count real tokens only, so padding never shifts them."""
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def run_packed(self, embeds: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of packed training rows: `allowed` (B, T, T) says which key each query column sees.

        The decoder takes a ready 4-D additive mask as it is (transformers' custom-mask path), so
        every slot of `training.model.sequences` attends only to its own prefix and slot.
        """
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min).unsqueeze(1)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def head(self, emb_hidden: torch.Tensor) -> torch.Tensor:
        """hidden[EMB] (B, H) -> h_t (B, D), unit length (centred first when `center_emb`)."""
        if self.center_emb:
            if self.training:
                with torch.no_grad():
                    self.emb_center_batches += 1
                    rate = max(1.0 / float(self.emb_center_batches), CENTER_RATE)
                    self.emb_center.lerp_(emb_hidden.detach().float().mean(dim=0), rate)
            emb_hidden = emb_hidden - self.emb_center.to(emb_hidden.dtype)
        return F.normalize(self.out(emb_hidden).float(), dim=-1)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        hist_features: torch.Tensor,
        hist_mask: torch.Tensor,
        hist_buckets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds, mask = self.build_sequence(query_ids, query_mask, hist_features, hist_mask, hist_buckets)
        hidden = self.run_decoder(embeds, mask)
        return self.head(hidden[:, -1])


class ItemTower(nn.Module):
    """Item features (N, F) (+ ID bucket) -> unit item embeddings (N, D)."""

    def __init__(self, feature_dim: int, hidden: int, embed_dim: int, id_buckets: int = 0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, embed_dim),
        )
        self.id_embedding = id_table(id_buckets, embed_dim)

    def forward(
        self, features: torch.Tensor, id_buckets: torch.Tensor | None = None, id_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        e = self.net(features)
        if self.id_embedding is not None and id_buckets is not None:
            e = e + with_id_dropout(self.id_embedding(id_buckets), id_keep)
        return F.normalize(e, dim=-1)


def id_table(rows: int, width: int) -> nn.Embedding | None:
    """The item-ID table, zero-initialised (`init_id_table` sets the training start).

    Zero start: an item that training never reaches (a cold item's row 0, an item seen only at
    test time) keeps a zero ID vector, so it is scored from its content alone, and the ID cannot
    drown the content token before it has learned anything.
    """
    if rows <= 0:
        return None
    table = nn.Embedding(rows, width)
    nn.init.zeros_(table.weight)
    return table


def init_id_table(table: nn.Embedding | None, std: float, exact: bool) -> None:
    """Training start: N(0, std) rows (std 0 = zeros); the exact scheme's 'no ID' row 0 stays zero, untrained."""
    if table is None:
        return
    with torch.no_grad():
        if std > 0:
            table.weight.normal_(0.0, std)
        else:
            table.weight.zero_()
        if exact:
            table.weight[0].zero_()
            table.padding_idx = 0  # never receives a gradient


def with_id_dropout(vectors: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """ID vectors (..., W) times a 0/1 keep mask (...) during training; unchanged when `keep` is None."""
    return vectors if keep is None else vectors * keep.unsqueeze(-1).to(vectors.dtype)
