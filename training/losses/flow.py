"""Content-reconstruction heads for `L_img`: decode the target item's frozen visual/content feature from `h_t`.

Two heads with one interface (`loss(target, cond)`, `sample(cond)`), both train-only (stripped at
export, DESIGN §1):

* `FlowMatchingHead` (the default): a conditional rectified-flow / flow-matching velocity field.
  It models the whole conditional *distribution* p(v | h_t) of the content feature.
* `MSEHead` (the ablation baseline): a regression g(h_t) ≈ v. It can only learn the conditional
  *mean* E[v | h_t].

Why a flow head regularises well but generates poorly. The retrieval vector `h_t` is scored by
inner product against many plausible next items, so it must be *mean-seeking*: the best `h_t`
sits near the average of its plausible targets. A flow (like diffusion) is *mode-seeking*: its
samples land on individual modes of p(v | h_t), not between them, so using it as the generator
of a retrieval embedding would pick one interest and drop the rest. As a *regularizer*, though,
this is what we want: to drive the flow loss down, `h_t` must carry enough information to tell
the modes (the distinct plausible next items and their looks) apart, which is the semantic
content that action-only training lets collapse. The MSE head asks only for the mean, which a
collapsed `h_t` can often still supply, so it regularises more weakly (the paper's ablation).

In both heads gradients flow into `cond` (it is `h_t` in KARMA); `target` is a frozen feature and
is treated as data. Standardise targets (zero mean, unit variance per dimension over the catalog)
before passing them: the flow's noise is N(0, I), so targets on that scale train fastest.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FlowMatchingHead", "MSEHead", "make_content_head", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(tau: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1_000.0) -> Tensor:
    """Transformer-style sinusoidal features of flow times `tau` (B,) in [0, 1] → (B, dim).

    `tau` is multiplied by `scale` first (so τ ∈ [0, 1] spans the same frequency range as integer
    diffusion steps 0..1000); frequencies are geometric from 1 to 1/`max_period`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
    args = (tau.float() * scale).unsqueeze(-1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Three linear layers with LayerNorm + SiLU between them."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


def _check_target_cond(target: Tensor, cond: Tensor, target_dim: int, cond_dim: int) -> None:
    if target.dim() != 2 or target.shape[1] != target_dim:
        raise ValueError(f"target must be (B, {target_dim}); got {tuple(target.shape)}")
    if cond.dim() != 2 or cond.shape != (target.shape[0], cond_dim):
        raise ValueError(f"cond must be (B, C) = ({target.shape[0]}, {cond_dim}); got {tuple(cond.shape)}")


class FlowMatchingHead(nn.Module):
    """Conditional flow-matching (rectified-flow) head: models p(target | cond) with a velocity field.

    The velocity field `g(x_τ, τ, c)` is an MLP over `[x_τ, sinusoidal(τ), c]`. Training
    (`loss`) uses the straight-line path from noise to data::

        ε ~ N(0, I),  τ ~ U(0, 1) per row
        x_τ = (1 − τ)·ε + τ·target
        loss = mean ‖ g(x_τ, τ, c) − (target − ε) ‖²      (mean over dims and rows)

    whose minimiser is the marginal velocity that transports N(0, I) at τ = 0 onto
    p(target | c) at τ = 1. `sample` integrates it with Euler steps from fresh noise.

    Args:
        target_dim: V, the dimension of the content feature being reconstructed.
        cond_dim: C, the dimension of the condition (`h_t`, or a history summary).
        hidden: width of the MLP.
        time_embed_dim: width of the sinusoidal τ features.
    """

    def __init__(self, target_dim: int, cond_dim: int, hidden: int = 256, time_embed_dim: int = 64) -> None:
        super().__init__()
        self.target_dim = target_dim
        self.cond_dim = cond_dim
        self.time_embed_dim = time_embed_dim
        self.net = _mlp(target_dim + time_embed_dim + cond_dim, hidden, target_dim)

    def forward(self, x_tau: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        """Velocity `g(x_τ, τ, c)`: x_tau (B, V), tau (B,) in [0, 1], cond (B, C) → (B, V)."""
        t_emb = sinusoidal_time_embedding(tau, self.time_embed_dim).to(x_tau.dtype)
        return self.net(torch.cat([x_tau, t_emb, cond.to(x_tau.dtype)], dim=-1))

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow-matching loss for a batch: target (B, V), cond (B, C) → scalar.

        `generator` (optional, on the tensors' device) makes the noise and times reproducible.
        """
        _check_target_cond(target, cond, self.target_dim, self.cond_dim)
        target = target.detach().float()
        b = target.shape[0]
        eps = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        tau = torch.rand((b,), generator=generator, device=target.device, dtype=target.dtype)
        x_tau = (1.0 - tau).unsqueeze(1) * eps + tau.unsqueeze(1) * target
        v_pred = self(x_tau, tau, cond.float())
        return F.mse_loss(v_pred, target - eps)

    def sample(self, cond: Tensor, steps: int = 32, generator: torch.Generator | None = None) -> Tensor:
        """Draw one sample of the target per row of `cond` (B, C) → (B, V) by Euler integration
        from τ = 0 (noise) to τ = 1 in `steps` steps. Wrap in `torch.no_grad()` when you only
        need the samples (the graph through all steps is kept otherwise)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond = cond.float()
        b = cond.shape[0]
        x = torch.randn((b, self.target_dim), generator=generator, device=cond.device, dtype=cond.dtype)
        dt = 1.0 / steps
        for k in range(steps):
            tau = torch.full((b,), k * dt, device=cond.device, dtype=cond.dtype)
            x = x + dt * self(x, tau, cond)
        return x


class MSEHead(nn.Module):
    """Regression head (the `L_img` ablation baseline): g(c) ≈ target with a mean-squared error.

    Minimising `mean ‖g(c) − target‖²` makes g(c) the conditional mean E[target | c]; it cannot
    represent several modes (see the module docstring for why that regularises more weakly).

    Args:
        target_dim: V, the dimension of the content feature.
        cond_dim: C, the dimension of the condition.
        hidden: width of the MLP (three layers, LayerNorm + SiLU).
    """

    def __init__(self, target_dim: int, cond_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.target_dim = target_dim
        self.cond_dim = cond_dim
        self.net = _mlp(cond_dim, hidden, target_dim)

    def forward(self, cond: Tensor) -> Tensor:
        """Prediction g(c): cond (B, C) → (B, V)."""
        return self.net(cond)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MSE between g(cond) and target (B, V), mean over dims and rows. `generator` is unused
        (accepted so both heads are interchangeable)."""
        _check_target_cond(target, cond, self.target_dim, self.cond_dim)
        return F.mse_loss(self(cond.float()), target.detach().float())

    def sample(self, cond: Tensor, steps: int = 32, generator: torch.Generator | None = None) -> Tensor:
        """The deterministic prediction g(cond); `steps` and `generator` are ignored."""
        return self(cond.float())


def make_content_head(
    kind: Literal["flow", "mse"], target_dim: int, cond_dim: int, hidden: int = 256, time_embed_dim: int = 64
) -> FlowMatchingHead | MSEHead:
    """Build the `L_img` head by name: 'flow' (`FlowMatchingHead`, the default) or 'mse' (`MSEHead`)."""
    if kind == "flow":
        return FlowMatchingHead(target_dim, cond_dim, hidden=hidden, time_embed_dim=time_embed_dim)
    if kind == "mse":
        return MSEHead(target_dim, cond_dim, hidden=hidden)
    raise ValueError(f"unknown content head {kind!r}; expected 'flow' or 'mse'")
