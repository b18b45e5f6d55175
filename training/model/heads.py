"""Train-only heads: every parameter that exists only to regularise training lives here.

Export builds the served graph from `QueryTower` and `ItemTower` alone and never constructs this
module, so none of these parameters can leak into a bundle (zero added serving cost by
construction, not by a filter that could miss something).

- `recon_prefix`: `proj(h_t)`, turning the next-interest embedding into one soft prefix token from
  which the LLM must decode the target item's text (`L_recon`).
- `lm_head`: the LLM's own output projection, used to decode text for `L_gen`, `L_recon` and the
  semantic warm-up. With tied embeddings it shares its weight with the (served) token embedding;
  the head as a *computation* is still never exported.
- `visual`: the flow-matching (or MSE ablation) head that generates the target's frozen
  visual/content vector from `h_t` (`L_img`).
"""

from __future__ import annotations

from torch import nn

from training.losses import make_content_head


class TrainOnlyHeads(nn.Module):
    def __init__(
        self,
        lm_head: nn.Module,
        embed_dim: int,
        hidden: int,
        visual_dim: int,
        visual_kind: str,  # "flow" | "mse" | "none"
        cond_dim: int,
        flow_hidden: int,
    ):
        super().__init__()
        self.lm_head = lm_head
        self.recon_prefix = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.visual: nn.Module | None = None
        if visual_kind != "none":
            self.visual = make_content_head(visual_kind, visual_dim, cond_dim, hidden=flow_hidden)
