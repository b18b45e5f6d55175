"""The training-time KARMA model: served towers + train-only heads, and every loss term.

    L = L_act + λ_gen·L_gen + λ_recon·L_recon + λ_img·L_img

One decoder pass over a packed window (`training.model.sequences`: the history once, then a
`[query][EMB]` slot per supervised position) gives `h_t` at every position; the regularised slots
carry their target's text after [EMB] (causal: `h_t` is unaffected) for the history-conditioned
generation loss `L_gen`. A second, short pass over `[proj(h_t)][target text]` gives `L_recon`,
whose gradient reaches `h_t`. `L_img` regresses the target's frozen visual (or, where the data
has no visual vectors, text-embedding) features from `h_t` with a flow-matching head. The
regularizers run on at most `loss.reg_positions` slots per window, so their cost stays bounded.

Presets only change the λs and the visual head; the served architecture is identical for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from karma.config import KarmaConfig, LossConfig
from karma.errors import KarmaError
from training.losses import (
    IGNORE_INDEX,
    catalog_softmax_loss,
    lm_loss,
    pairwise_logistic_from_scores,
    sampled_softmax_loss,
    token_accuracy,
)
from training.model.backbone import Backbone
from training.model.batches import TextTargets
from training.model.heads import TrainOnlyHeads
from training.model.towers import ItemTower, QueryTower, init_id_table

# preset -> (λ_gen, λ_recon, λ_img, visual head)
PRESETS: dict[str, tuple[float, float, float, str]] = {
    "action-only": (0.0, 0.0, 0.0, "none"),
    "gen": (0.5, 0.0, 0.0, "none"),
    "recon": (0.0, 0.5, 0.0, "none"),
    "karma-text": (0.5, 0.5, 0.0, "none"),
    "karma": (0.5, 0.5, 0.5, "flow"),
    "img-mse": (0.5, 0.5, 0.5, "mse"),
}


@dataclass(frozen=True)
class LossWeights:
    gen: float
    recon: float
    img: float
    visual_head: str  # "flow" | "mse" | "none"

    @classmethod
    def from_config(cls, cfg: LossConfig) -> LossWeights:
        gen, recon, img, head = PRESETS[cfg.preset]
        img = cfg.lambda_img if cfg.lambda_img is not None else img
        if img > 0 and head == "none":
            head = "flow"
        return cls(
            gen=cfg.lambda_gen if cfg.lambda_gen is not None else gen,
            recon=cfg.lambda_recon if cfg.lambda_recon is not None else recon,
            img=img,
            visual_head=head,
        )


class KarmaModel(nn.Module):
    """`query_tower` and `item_tower` are served; `heads` is dropped at export."""

    def __init__(
        self,
        backbone: Backbone,
        feature_dim: int,
        content_dim: int,
        config: KarmaConfig,
        id_buckets: int = 0,
        exact_ids: bool = False,
    ):
        super().__init__()
        m = config.model
        hidden = backbone.hidden_size
        self.weights = LossWeights.from_config(config.loss)
        self.loss_config = config.loss
        self.id_dropout = m.id_dropout
        # Learned softmax temperature (train-only: scores rank the same at any scale, so export drops it).
        self.log_scale = (
            nn.Parameter(torch.tensor(math.log(1.0 / config.loss.temperature)))
            if config.loss.learn_temperature
            else None
        )
        # Set by restrict_lm_vocab (loss.lm_vocab=catalog); None = full-vocabulary softmax.
        self.register_buffer("lm_vocab", None, persistent=False)
        self.register_buffer("lm_vocab_index", None, persistent=False)
        self.query_tower = QueryTower(
            backbone.decoder, feature_dim, hidden, m.embed_dim, id_buckets, center_emb=m.center_emb
        )
        self.item_tower = ItemTower(feature_dim, m.item_tower_hidden, m.embed_dim, id_buckets)
        for table in (self.query_tower.id_embedding, self.item_tower.id_embedding):
            init_id_table(table, m.id_init_std, exact_ids)
        cond_dim = m.embed_dim if config.loss.img_condition == "h" else hidden
        self.heads = TrainOnlyHeads(
            lm_head=backbone.lm_head,
            embed_dim=m.embed_dim,
            hidden=hidden,
            visual_dim=content_dim,
            visual_kind=self.weights.visual_head,
            cond_dim=cond_dim,
            flow_hidden=config.loss.flow_hidden,
        )

    # ---- pieces -------------------------------------------------------------------------------

    def decode_text_loss(self, prefix: torch.Tensor, text: TextTargets) -> tuple[torch.Tensor, float]:
        """LM loss of `text` given soft prefix tokens (B, P, H); the last prefix position predicts t_1."""
        qt = self.query_tower
        token_embeds = qt.decoder.get_input_embeddings()(text.input_ids).to(prefix.dtype)
        embeds = torch.cat([prefix, token_embeds], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=text.input_mask.dtype, device=prefix.device)
        mask = torch.cat([ones, text.input_mask], dim=1)
        hidden = qt.run_decoder(embeds, mask)
        return self.text_loss(hidden[:, prefix.shape[1] - 1 :], text.labels)

    def text_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """LM cross-entropy (and token accuracy) of `labels` (B, T) from hidden states (B, T, H).

        The LM head runs only on positions with a label: with SmolLM2's 49k vocabulary the logits
        of padding positions would otherwise dominate the step time.
        """
        valid = labels != IGNORE_INDEX
        picked = labels[valid]
        if self.lm_vocab is None:
            logits = self.heads.lm_head(hidden[valid])
        else:  # loss.lm_vocab=catalog: softmax over the catalog's tokens only (see restrict_lm_vocab)
            head = self.heads.lm_head
            bias = head.bias[self.lm_vocab] if getattr(head, "bias", None) is not None else None
            logits = F.linear(hidden[valid], head.weight[self.lm_vocab], bias)
            picked = self.lm_vocab_index[picked]
            if picked.numel() and int(picked.min()) < 0:
                raise KarmaError("loss.lm_vocab=catalog: a target token is outside the catalog vocabulary")
        logits, picked = logits.unsqueeze(0), picked.unsqueeze(0)
        return lm_loss(logits, picked), token_accuracy(logits.detach(), picked)

    def restrict_lm_vocab(self, token_ids: torch.Tensor, vocab_size: int) -> None:
        """Score text only against `token_ids` (every token of every item text, plus EOS).

        The text targets are catalog texts, so the correct token is always in the set; what is
        dropped is the competition from the rest of the vocabulary (~90% of SmolLM2's 49k rows,
        and most of the LM head's step time). Buffers are not persistent: `build_setup` derives the
        same set from the data on every load, and export never sees them.
        """
        ids = torch.unique(token_ids.to(torch.long))
        index = torch.full((vocab_size,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        self.lm_vocab = ids.to(self.heads.lm_head.weight.device)
        self.lm_vocab_index = index.to(self.heads.lm_head.weight.device)

    def semantic_warmup_loss(
        self, item_inputs: dict[str, torch.Tensor], text: TextTargets
    ) -> tuple[torch.Tensor, float]:
        """Decode an item's own text from its continuous token (the warm-up stage)."""
        tokens = self.query_tower.item_tokens(item_inputs["features"], item_inputs.get("id_buckets"))
        return self.decode_text_loss(tokens.unsqueeze(1), text)

    # ---- the training objective ---------------------------------------------------------------

    def logit_scale(self) -> torch.Tensor:
        """1/τ of the action softmax: learned and capped at 1/min_temperature, or the fixed config value."""
        if self.log_scale is None:
            return torch.tensor(1.0 / self.loss_config.temperature)
        return self.log_scale.exp().clamp(max=1.0 / self.loss_config.min_temperature)

    def id_keep(
        self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor | None:
        """Training-time ID dropout mask (1 = keep the ID vector), None when there is nothing to drop.

        Applied alike to history tokens, positives and negatives: dropped on positives only, a
        missing ID would become a sign of the clicked item, and cold items would be over-ranked.
        """
        p = self.id_dropout
        if not self.training or p <= 0 or self.query_tower.id_embedding is None:
            return None
        return (torch.rand(shape, generator=generator, device=device) >= p).float()

    def encode_packed(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed rows through the query tower: hidden states (B, T, H) and `h` at every supervised slot (M, D)."""
        qt = self.query_tower
        keep = self.id_keep(batch["hist_valid"].shape, batch["hist_valid"].device, generator)
        hist_tokens = qt.item_tokens(batch["hist_features"], batch.get("hist_buckets"), keep)
        words = qt.decoder.get_input_embeddings()(batch["block_ids"])
        words = torch.where(batch["block_is_emb"].unsqueeze(-1), qt.emb_token.to(words.dtype), words)
        embeds = torch.cat([hist_tokens.to(words.dtype), words], dim=1)
        hidden = qt.run_packed(embeds, batch["allowed"], batch["position_ids"])
        return hidden, qt.head(hidden[batch["slot_row"], batch["slot_col"]])

    def forward(
        self,
        batch: dict,
        mode: str = "action",
        negatives: torch.Tensor | None = None,
        negative_inputs: dict[str, torch.Tensor] | None = None,
        log_q: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        catalog: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms for one packed batch (`Batcher.training_batch`); `total` is what to backpropagate.

        One decoder pass over the packed rows gives `h` at every supervised [EMB] (M of them) and the
        L_gen logits of the regularised slots; L_recon and L_img use the regularised slots' `h`.
        Negatives: `catalog` = {"cols": (N,) item -> pool column, and "inputs" (pool item inputs, run
        through the item tower now) or "emb" (a no-grad cache) with "item_inputs" (pool columns ->
        item-tower inputs, for the batch's fresh columns)}; else `negatives`/`negative_inputs`
        (sampled ids and their inputs) with `log_q`. `mode="warmup"` runs the semantic warm-up
        objective instead (batch: item_inputs, text); it goes through `forward` so that
        DistributedDataParallel sees it.
        """
        if mode == "warmup":
            loss, acc = self.semantic_warmup_loss(batch["item_inputs"], batch["text"])
            return {"warmup": loss, "warmup_acc": torch.tensor(acc), "total": loss}
        w = self.weights
        hist_valid = batch["hist_valid"]
        device = hist_valid.device
        hidden, h = self.encode_packed(batch, generator)

        targets = batch["target_items"]
        scale = self.logit_scale().to(device)
        out: dict[str, torch.Tensor] = {"h": h, "logit_scale": scale.detach()}

        def positives() -> torch.Tensor:  # fresh embeddings of each slot's clicked item (its own ID dropout)
            keep = self.id_keep(targets.shape, device, generator)
            return self.item_tower(**batch["target_item_inputs"], id_keep=keep)

        if self.loss_config.act == "pairwise":
            out["act"] = self.pairwise_act(h, positives(), targets, batch, scale)
        elif catalog is not None:
            cols = catalog["cols"][targets]
            if "emb" in catalog:
                # A no-grad cache for the rest of the catalog, but this batch's clicked items fresh in
                # their columns for every row (as positives and as negatives): with fresh positives
                # alone nothing pushes items apart and the item tower collapsed (synthetic HR@200
                # 0.76 -> 0.06 at catalog_refresh_every=20).
                unique = torch.unique(cols)
                fresh = self.item_tower(
                    **catalog["item_inputs"](unique), id_keep=self.id_keep(unique.shape, device, generator)
                )
                pool = catalog["emb"].index_copy(0, unique, fresh.to(catalog["emb"].dtype))
                out["act"] = catalog_softmax_loss(h, pool, cols, None, scale)
            else:  # ID dropout on negatives too: "no ID" must not come to mean "positive"
                pos_emb = positives()
                n_pool = catalog["inputs"]["features"].shape[0]
                pool = self.item_tower(**catalog["inputs"], id_keep=self.id_keep((n_pool,), device, generator))
                out["act"] = catalog_softmax_loss(h, pool, cols, pos_emb, scale)
        else:
            pos_emb = positives()
            neg_emb = None
            if negative_inputs is not None:
                n_neg = negative_inputs["features"].shape[0]
                neg_emb = self.item_tower(**negative_inputs, id_keep=self.id_keep((n_neg,), device, generator))
            out["act"] = sampled_softmax_loss(h, pos_emb, targets, neg_emb, negatives, log_q, 1.0 / scale)
        total = out["act"]
        reg = batch["reg"]
        if w.gen > 0:
            out["gen"], _ = self.text_loss(hidden, batch["gen_labels"])
            total = total + w.gen * out["gen"]
        if w.recon > 0:
            prefix = self.heads.recon_prefix(h[reg]).unsqueeze(1).to(hidden.dtype)
            out["recon"], acc = self.decode_text_loss(prefix, batch["reg_text"])
            out["recon_acc"] = torch.tensor(acc)
            total = total + w.recon * out["recon"]
        if w.img > 0 and self.heads.visual is not None:
            if self.loss_config.img_condition == "h":
                cond = h[reg]
            else:  # mean history state of each slot's prefix: conditions on the history rather than on h_t
                lh = hist_valid.shape[1]
                sums = (hidden[:, :lh] * hist_valid.unsqueeze(-1).to(hidden.dtype)).cumsum(dim=1)
                seen = batch["slot_hist"][reg]
                cond = sums[batch["slot_row"][reg], seen - 1] / seen.unsqueeze(-1).to(hidden.dtype)
            out["img"] = self.heads.visual.loss(batch["reg_content"], cond.float(), generator=generator)
            total = total + w.img * out["img"]
        out["total"] = total
        return out

    def pairwise_act(
        self, h: torch.Tensor, pos_emb: torch.Tensor, targets: torch.Tensor, batch: dict, scale: torch.Tensor
    ) -> torch.Tensor:
        """The paper's pairwise form: each position's exposed-unclicked items plus every other position's positive."""
        exposed = batch["exposed_items"]
        exposed_emb = self.item_tower(**batch["exposed_inputs"]).view(*exposed.shape, -1)
        s_pos = (h * pos_emb).sum(-1).float()
        s_exposed = torch.einsum("md,mkd->mk", h, exposed_emb).float()
        s_batch = (h @ pos_emb.T).float()  # (M, M): in-batch negatives without materialising them
        batch_mask = targets.unsqueeze(0) != targets.unsqueeze(1)  # accidental hits (and the diagonal) out
        scores = torch.cat([s_exposed, s_batch], dim=1)
        mask = torch.cat([batch["exposed_mask"], batch_mask], dim=1)
        zero = (h.sum() + pos_emb.sum()) * 0.0
        return pairwise_logistic_from_scores(s_pos, scores, mask, 1.0 / self.loss_config.temperature, zero)


def popularity_log_q(split_items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Empirical target distribution of the training set: sampling probs and their logs.

    In-batch negatives arrive in proportion to how often items are targets, and the extra
    negatives are drawn from the same distribution, so one `log q` corrects every column.
    Items never seen in training get probability 0 (they are never sampled as negatives).
    """
    counts = np.bincount(split_items, minlength=n_items).astype(np.float64)
    probs = counts / counts.sum()
    with np.errstate(divide="ignore"):
        log_q = np.where(probs > 0, np.log(probs), -1e9)
    return probs, log_q.astype(np.float32)
