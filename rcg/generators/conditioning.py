"""What the image generator is conditioned on, for the DiT and the U-Net (docs/paper.md#image-generators).

``Conditioner`` builds the vector every block is modulated by: ``c = t_emb + Linear(rep)`` for RCG,
with a learned ``fake_latent`` swapped in for ``rep_drop_prob`` of the samples during training (and
on demand, as the negative of classifier-free guidance); ``c = t_emb + class_emb(label)`` with a null
class for the label baseline; ``c = t_emb`` for the unconditional baseline (paper Table 9a).

``Guided`` adds ``forward_with_cfg`` to a generator with that conditioning interface.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rcg.layers import timestep_embedding

CONDITIONS = ("rep", "none", "label")


class Conditioner(nn.Module):
    """t (+ rep | label) -> c (N, D). See the module docstring."""

    def __init__(
        self,
        hidden: int,
        condition: str = "rep",
        rep_dim: int = 256,
        num_classes: int = 1000,
        rep_drop_prob: float = 0.1,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        self.condition, self.rep_drop_prob, self.freq_dim = condition, rep_drop_prob, freq_dim
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if condition == "rep":
            self.rep_embedder = nn.Linear(rep_dim, hidden)
            self.fake_latent = nn.Parameter(torch.empty(1, rep_dim))  # the null representation
        elif condition == "label":
            self.num_classes = num_classes
            self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # index num_classes = null class
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every non-default init of the conditioning: the rep embedder xavier (as the reference's,
        not zero), fake_latent ~ N(0, 0.02), the label table and the t-MLP ~ N(0, 0.02) (DiT).

        Called at the end of __init__, so these draws come right after the Conditioner's own default
        inits and before its owner constructs its later layers: the owner must not call it again.
        """
        with torch.no_grad():
            if self.condition == "rep":
                nn.init.xavier_uniform_(self.rep_embedder.weight)
                nn.init.zeros_(self.rep_embedder.bias)
                self.fake_latent.copy_(torch.randn(self.fake_latent.shape) * 0.02)
            elif self.condition == "label":
                nn.init.normal_(self.y_embedder.weight, std=0.02)
            for lin in (self.t_embedder[0], self.t_embedder[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def _drop_mask(self, n: int, device: torch.device, drop: Tensor | None) -> Tensor | None:
        """Which samples get the null condition: forced ones, plus random ones while training."""
        mask = drop.to(device=device, dtype=torch.bool) if drop is not None else None
        if self.training and self.rep_drop_prob > 0:
            rand = torch.rand(n, device=device) < self.rep_drop_prob
            mask = rand if mask is None else (mask | rand)
        return mask

    def forward(self, t: Tensor, rep: Tensor | None = None, label: Tensor | None = None, drop: Tensor | None = None) -> Tensor:
        c = self.t_embedder(timestep_embedding(t, self.freq_dim))  # (N, D)
        n = t.shape[0]
        if self.condition == "rep":
            if rep is None:
                raise ValueError("this generator is conditioned on representations: pass rep=")
            mask = self._drop_mask(n, t.device, drop)
            if mask is not None:
                rep = torch.where(mask[:, None], self.fake_latent.to(rep.dtype), rep)  # (N, R)
            c = c + self.rep_embedder(rep)  # (N, D)
        elif self.condition == "label":
            if label is None:
                raise ValueError("this generator is conditioned on class labels: pass label=")
            mask = self._drop_mask(n, t.device, drop)
            if mask is not None:
                label = torch.where(mask, torch.full_like(label, self.num_classes), label)
            c = c + self.y_embedder(label)  # (N, D)
        return c


class Guided:
    """Mixin: classifier-free guidance for a module with forward(x, t, rep, label, drop)."""

    condition: str

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor,
        cfg_scale: float | Tensor,
        rep: Tensor | None = None,
        label: Tensor | None = None,
    ) -> Tensor:
        """out = cond + w * (cond - uncond), uncond from the null condition (fake_latent / null class).

        The batch is doubled; the second half is forced onto the null condition. ``cfg_scale`` may be
        a per-sample tensor (N,), e.g. for the linearly increasing schedule. w = 0 is no guidance (the
        MAGE convention, docs/paper.md#guidance; DiT's scale s is 1 + w). Applied to every channel.
        """
        if self.condition == "none":
            return self(x, t)  # type: ignore[operator]
        n = x.shape[0]
        drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(x.device)
        out = self(  # type: ignore[operator]
            torch.cat([x, x]),
            torch.cat([t, t]),
            rep=None if rep is None else torch.cat([rep, rep]),
            label=None if label is None else torch.cat([label, label]),
            drop=drop,
        ).float()  # (2N, C, H, W)
        cond, uncond = out[:n], out[n:]
        w = torch.as_tensor(cfg_scale, dtype=cond.dtype, device=cond.device)
        if w.ndim == 1:
            w = w.view(-1, *([1] * (cond.ndim - 1)))
        return cond + w * (cond - uncond)
