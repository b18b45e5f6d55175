"""The training-time KARMA model: served towers + train-only heads, and every loss term.

    L = L_act + λ_gen·L_gen + λ_recon·L_recon + λ_img·L_img

One decoder pass over `[query][history][EMB][target text]` gives both `h_t` (at [EMB]; causal
attention means the appended text cannot influence it) and the history-conditioned generation
logits (`L_gen`). A second, short pass over `[proj(h_t)][target text]` gives `L_recon`, whose
gradient reaches `h_t`. `L_img` regresses the target's frozen visual (or, where the data has no
visual vectors, text-embedding) features from `h_t` with a flow-matching head.

Presets only change the λs and the visual head; the served architecture is identical for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from karma.config import KarmaConfig, LossConfig
from karma.errors import KarmaError
from training.losses import (
    IGNORE_INDEX,
    in_batch_negatives,
    lm_loss,
    pairwise_logistic_loss,
    sampled_softmax_loss,
    token_accuracy,
)
from training.model.backbone import Backbone
from training.model.batches import TextTargets
from training.model.heads import TrainOnlyHeads
from training.model.towers import ItemTower, QueryTower

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

    def __init__(self, backbone: Backbone, feature_dim: int, content_dim: int, config: KarmaConfig):
        super().__init__()
        m = config.model
        hidden = backbone.hidden_size
        id_buckets = config.features.hashed_id_buckets if m.id_embedding else 0
        self.weights = LossWeights.from_config(config.loss)
        self.loss_config = config.loss
        # Set by restrict_lm_vocab (loss.lm_vocab=catalog); None = full-vocabulary softmax.
        self.register_buffer("lm_vocab", None, persistent=False)
        self.register_buffer("lm_vocab_index", None, persistent=False)
        self.query_tower = QueryTower(
            backbone.decoder, feature_dim, hidden, m.embed_dim, id_buckets, center_emb=m.center_emb
        )
        self.item_tower = ItemTower(feature_dim, m.item_tower_hidden, m.embed_dim, id_buckets)
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

    def forward(
        self,
        batch: dict,
        mode: str = "action",
        negatives: torch.Tensor | None = None,
        negative_inputs: dict[str, torch.Tensor] | None = None,
        log_q: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms for one batch; `total` is what to backpropagate. Values are tensors.

        `mode="warmup"` runs the semantic warm-up objective instead (batch: item_inputs, text); it
        goes through `forward` so that DistributedDataParallel sees it.
        """
        if mode == "warmup":
            loss, acc = self.semantic_warmup_loss(batch["item_inputs"], batch["text"])
            return {"warmup": loss, "warmup_acc": torch.tensor(acc), "total": loss}
        w = self.weights
        qt = self.query_tower
        enc = batch["encoder"]
        text: TextTargets = batch["target_text"]
        embeds, mask = qt.build_sequence(
            enc["query_ids"], enc["query_mask"], enc["hist_features"], enc["hist_mask"], enc.get("hist_buckets")
        )
        emb_pos = embeds.shape[1] - 1
        if w.gen > 0:  # append the target text after [EMB]: same pass, causal, h_t unaffected
            text_embeds = qt.decoder.get_input_embeddings()(text.input_ids).to(embeds.dtype)
            embeds = torch.cat([embeds, text_embeds], dim=1)
            mask = torch.cat([mask, text.input_mask.to(mask.dtype)], dim=1)
        hidden = qt.run_decoder(embeds, mask)
        h = qt.head(hidden[:, emb_pos])

        pos_emb = self.item_tower(**batch["target_item_inputs"])
        out: dict[str, torch.Tensor] = {"h": h}
        if self.loss_config.act == "softmax":
            neg_emb = self.item_tower(**negative_inputs) if negative_inputs is not None else None
            out["act"] = sampled_softmax_loss(
                h, pos_emb, batch["target_items"], neg_emb, negatives, log_q, self.loss_config.temperature
            )
        else:
            # The paper's form: exposed-but-unclicked items plus the other rows' positives.
            exposed = batch["exposed_items"]
            exposed_emb = self.item_tower(**batch["exposed_inputs"]).view(*exposed.shape, -1)
            in_neg, in_mask = in_batch_negatives(pos_emb, batch["target_items"])
            neg = torch.cat([exposed_emb, in_neg], dim=1)
            neg_mask = torch.cat([batch["exposed_mask"], in_mask], dim=1)
            out["act"] = pairwise_logistic_loss(h, pos_emb, neg, neg_mask)
        total = out["act"]
        if w.gen > 0:
            out["gen"], _ = self.text_loss(hidden[:, emb_pos:], text.labels)
            total = total + w.gen * out["gen"]
        if w.recon > 0:
            prefix = self.heads.recon_prefix(h).unsqueeze(1).to(embeds.dtype)
            out["recon"], acc = self.decode_text_loss(prefix, text)
            out["recon_acc"] = torch.tensor(acc)
            total = total + w.recon * out["recon"]
        if w.img > 0 and self.heads.visual is not None:
            if self.loss_config.img_condition == "h":
                cond = h
            else:  # mean history token: conditions on the history rather than on h_t
                hist_mask = enc["hist_mask"].unsqueeze(-1).to(hidden.dtype)
                start = enc["query_ids"].shape[1]
                hist_hidden = hidden[:, start : start + hist_mask.shape[1]]
                cond = (hist_hidden * hist_mask).sum(1) / hist_mask.sum(1).clamp(min=1.0)
            out["img"] = self.heads.visual.loss(batch["target_content"], cond.float(), generator=generator)
            total = total + w.img * out["img"]
        out["total"] = total
        return out


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
