"""MAGE conditioned on a representation: RCG's headline image generator (docs/paper.md#image-generators).

MAGE (Li et al., "MAGE: MAsked Generative Encoder", CVPR 2023) is a masked token model over the ids
of a VQGAN tokenizer: an MAE-style ViT encoder sees the kept tokens, a ViT decoder sees every
position, and an MLM head scores the codebook. RCG (paper section 3.3) conditions it by overwriting
the whole position-0 embedding with ``Linear(rep_dim -> D)(rep)``; during training a learned
``fake_latent`` replaces the representation for ``rep_drop_prob`` of the samples, and it is the
negative of classifier-free guidance at generation time (docs/paper.md#guidance).

``condition="label"`` puts a class embedding in the same slot; ``condition="none"`` leaves
position 0 to the embedded fake-class id, the unconditional MAGE baseline (paper Table 9a). Unlike
the official label-conditioned MAGE, labels are dropped to a learned null class with
``rep_drop_prob`` as the project's DiT does, so the label baseline can be guided too.

Differences from the official code, on purpose, none of which changes what the model computes:
the vocabulary is ``codebook_size + 2`` (codes, the fake-class id, the mask id) instead of
codes + 1000 class ids + mask, because the class ids are never embedded and the logits are cut to
the codebook anyway; the MLM head scores only the codebook; the never-used leftovers (frozen sin-cos
positions, patch embedding, pixel head, cls / mask tokens) are left out; attention goes through
fused ``scaled_dot_product_attention`` (its softmax subtracts the max, as the reference's fp32
attention does); all randomness (mask ratio, masks, representation dropout, decoding noise) is drawn
with torch from one optional ``torch.Generator``, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg import layers

CONDITIONS = ("rep", "none", "label")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the generator's device (so a CPU generator works for any device)."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise -log(-log u); u = 0 gives -inf, a choice that is never taken."""
    return -torch.log(-torch.log(_rand(shape, generator, device)))


def token_masks(n: int, t: int, n_drop: int, n_mask: int, generator: torch.Generator | None,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """MAGE's masks (MAGE paper section 3.1): per row, the n_drop tokens of smallest uniform noise
    are dropped from the encoder and the n_mask smallest are masked, so drop is a subset of mask.

    Ranking by a stable argsort gives exact counts even when two noise values tie (the official
    code draws again instead). Returns (drop, mask), both [n, t] bool.
    """
    noise = _rand((n, t), generator, device)  # (N, T)
    rank = noise.argsort(dim=1, stable=True).argsort(dim=1)  # (N, T): 0 = smallest noise
    return rank < n_drop, rank < n_mask


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (qkv bias) with dropout on the weights and after the projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, d)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p)  # (N, H, T, d)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(n, t, d)))  # (N, T, D)


class Block(nn.Module):
    """Pre-LN ViT block (LayerNorm eps 1e-6, GELU MLP, dropout 0.1 in both branches, no drop-path)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        return x + self.mlp(self.norm2(x))  # (N, T, D)


class TokenEmbedding(nn.Module):
    """BERT-style input: word embedding + learned position embedding, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, dim: int, positions: int, dropout: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, positions, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.word(ids) + self.pos[:, : ids.shape[1]]  # (N, T+1, D)
        return self.drop(self.norm(h))  # (N, T+1, D)


class MlmHead(nn.Module):
    """Linear -> GELU -> LayerNorm, then scores against the (detached) word embeddings plus a bias.

    The LayerNorm keeps torch's default eps (1e-5), as the official head does.
    """

    def __init__(self, dim_in: int, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim_in, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(codebook_size))

    def forward(self, x: Tensor, codes: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.fc(x)))  # (N, T, D)
        return h @ codes.t().to(h.dtype) + self.bias  # (N, T, K)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MAGE(nn.Module):
    """MAGE over `num_tokens` VQGAN ids, conditioned at position 0 on a rep, a label or nothing.

    ``forward(ids, rep=None, label=None, drop=None, keep=None)`` returns codebook logits [N, T, K]
    of token ids [N, T] in which masked tokens hold ``mask_id``; ``drop`` (N,) bool puts the null
    condition (fake_latent / null class) in slot 0 (``condition="none"`` ignores it); ``keep``
    [N, T] bool lists the tokens the encoder sees (the same count in every row; None: all).
    ``loss`` is the training objective and ``generate`` the iterative decoding (MAGE paper
    section 3; RCG paper section 3.3).
    """

    def __init__(
        self,
        num_tokens: int = 256,
        codebook_size: int = 1024,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        condition: str = "rep",
        rep_dim: int = 256,
        num_classes: int = 1000,
        rep_drop_prob: float = 0.1,
        dropout: float = 0.1,
        mask_ratio_min: float = 0.5,
        mask_ratio_max: float = 1.0,
        mask_ratio_mu: float = 0.75,
        mask_ratio_std: float = 0.25,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if not 0.0 < mask_ratio_min <= mask_ratio_mu <= mask_ratio_max <= 1.0 or mask_ratio_std <= 0:
            raise ValueError("mask ratios need 0 < min <= mu <= max <= 1 and std > 0")
        self.num_tokens, self.codebook_size = num_tokens, codebook_size
        self.condition, self.rep_drop_prob, self.num_classes = condition, rep_drop_prob, num_classes
        self.mask_ratio = (mask_ratio_min, mask_ratio_max, mask_ratio_mu, mask_ratio_std)
        self.label_smoothing = label_smoothing
        # Vocabulary: the codes, then the fake-class id that fills position 0, then the mask id.
        self.cls_id, self.mask_id = codebook_size, codebook_size + 1

        self.token_emb = TokenEmbedding(codebook_size + 2, embed_dim, num_tokens + 1, dropout)
        if condition == "rep":
            self.latent_prior_proj = nn.Linear(rep_dim, embed_dim)
            self.fake_latent = nn.Parameter(torch.zeros(1, rep_dim))  # the null representation
        elif condition == "label":
            self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # index num_classes = null class
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_tokens + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, dropout) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.mlm = MlmHead(decoder_embed_dim, embed_dim, codebook_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAGE init: xavier-uniform Linears with zero bias, LayerNorms (1, 0), the word and both
        position embeddings and fake_latent ~ N(0, 0.02), the MLM bias 0.

        The class table keeps N(0, 1) (torch's default, which the official label-conditioned MAGE
        never changes): its vectors take the place of LayerNorm'd, unit-scale token embeddings.
        """

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        for p in (self.token_emb.word.weight, self.token_emb.pos, self.decoder_pos):
            nn.init.normal_(p, std=0.02)
        if self.condition == "rep":
            nn.init.normal_(self.fake_latent, std=0.02)
        elif self.condition == "label":
            nn.init.normal_(self.class_emb.weight, std=1.0)
        nn.init.zeros_(self.mlm.bias)

    # -- forward --------------------------------------------------------------------------------

    def condition_embedding(self, rep: Tensor | None, label: Tensor | None, drop: Tensor | None) -> Tensor | None:
        """What overwrites position 0: Linear(rep or fake_latent), class_emb(label or null), or None
        (the unconditional model keeps its embedded fake-class id)."""
        if self.condition == "rep":
            if rep is None:
                raise ValueError("this MAGE is conditioned on representations: pass rep=")
            if drop is not None:
                rep = torch.where(drop.to(rep.device)[:, None], self.fake_latent.to(rep.dtype), rep)  # (N, R)
            return self.latent_prior_proj(rep)  # (N, D)
        if self.condition == "label":
            if label is None:
                raise ValueError("this MAGE is conditioned on class labels: pass label=")
            if drop is not None:
                label = torch.where(drop.to(label.device), torch.full_like(label, self.num_classes), label)
            return self.class_emb(label)  # (N, D)
        return None

    def forward(
        self,
        ids: Tensor,
        rep: Tensor | None = None,
        label: Tensor | None = None,
        drop: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        n = ids.shape[0]
        cls = torch.full((n, 1), self.cls_id, dtype=ids.dtype, device=ids.device)
        seq = torch.cat([cls, ids], dim=1)  # (N, T+1)
        h = self.token_emb(seq)  # (N, T+1, D)
        slot = self.condition_embedding(rep, label, drop)  # (N, D) or None
        if slot is not None:  # replaces the whole embedding: no position, LayerNorm or dropout
            h = torch.cat([slot[:, None].to(h.dtype), h[:, 1:]], dim=1)  # (N, T+1, D)
        idx = None
        if keep is not None:  # the kept positions in order, position 0 first
            keep = torch.cat([torch.ones_like(keep[:, :1], dtype=torch.bool), keep.bool()], dim=1)  # (N, T+1)
            lo, hi = torch.stack(keep.sum(1).aminmax()).tolist()
            if lo != hi:
                raise ValueError(f"keep must keep the same number of tokens in every row, got {lo}..{hi}")
            idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :hi]  # (N, L)
            h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))  # (N, L, D)
        for block in self.blocks:
            h = block(h)  # (N, L, D)
        h = self.norm(h)  # (N, L, D)
        return self.decode(h, idx, seq == self.mask_id)  # (N, T, K)

    def decode(self, h: Tensor, idx: Tensor | None, masked: Tensor) -> Tensor:
        """Decoder: every position starts as the decoded position-0 token, the kept unmasked tokens
        go back to their places; learned positions, blocks, MLM head. Logits over the codebook."""
        x = self.decoder_embed(h)  # (N, L, Dd)
        fill = x[:, :1].expand(-1, masked.shape[1], -1)  # (N, T+1, Dd)
        if idx is not None:
            x = fill.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)  # (N, T+1, Dd)
        x = torch.where(masked[..., None], fill, x) + self.decoder_pos  # (N, T+1, Dd)
        for block in self.decoder_blocks:
            x = block(x)  # (N, T+1, Dd)
        x = self.decoder_norm(x)  # (N, T+1, Dd)
        codes = self.token_emb.word.weight[: self.codebook_size].detach()  # (K, D): no gradient via the head
        return self.mlm(x[:, 1:], codes)  # (N, T, K)

    # -- training -------------------------------------------------------------------------------

    def sample_mask_ratio(self, generator: torch.Generator | None = None) -> float:
        """One masking ratio from the normal(mu, std) truncated to [min, max], by inverting its CDF
        (MAGE paper section 3.1; RCG trains with mu 0.75, std 0.25 on [0.5, 1])."""
        lo, hi, mu, std = self.mask_ratio
        a, b = (torch.special.ndtr(torch.tensor((v - mu) / std, dtype=torch.float64)) for v in (lo, hi))
        gdev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((), generator=generator, device=gdev, dtype=torch.float64).cpu()
        ratio = mu + std * torch.special.ndtri(a + u * (b - a))
        return float(ratio.clamp(lo, hi))

    def loss(
        self,
        ids: Tensor,
        rep: Tensor | None = None,
        label: Tensor | None = None,
        generator: torch.Generator | None = None,
        forward: nn.Module | None = None,
    ) -> Tensor:
        """MAGE's training loss on token grids ids [N, T] (int64): one mask ratio for the batch,
        ceil(T min_ratio) tokens dropped from the encoder, ceil(T ratio) masked; label-smoothed
        cross-entropy over the codebook, averaged over every masked (dropped included) token.

        In training mode `rep_drop_prob` of the samples get the null condition (fake_latent / null
        class). Every random draw but dropout's comes from `generator` (torch's global RNG if None).
        `forward` is what computes the logits: this model (None) or its DDP wrapper, through which
        the gradients must flow to be averaged over the ranks.
        """
        n, t = ids.shape
        ratio = self.sample_mask_ratio(generator)
        n_drop, n_mask = math.ceil(t * self.mask_ratio[0]), math.ceil(t * ratio)
        dropped, masked = token_masks(n, t, n_drop, n_mask, generator, ids.device)  # (N, T) each
        drop = None
        if self.training and self.rep_drop_prob > 0 and self.condition != "none":
            drop = _rand((n,), generator, ids.device) < self.rep_drop_prob  # (N,)
        net = self if forward is None else forward
        logits = net(ids.masked_fill(masked, self.mask_id), rep, label, drop=drop, keep=~dropped)  # (N, T, K)
        return F.cross_entropy(logits[masked].float(), ids[masked], label_smoothing=self.label_smoothing)

    # -- generation -----------------------------------------------------------------------------

    def guided_logits(self, ids: Tensor, rep: Tensor | None, label: Tensor | None, w: float) -> Tensor:
        """Codebook logits [N, T, K] in fp32; with w > 0, cond + w (cond - uncond), the null
        condition as uncond (one doubled batch). The unconditional model has nothing to guide."""
        if w <= 0 or self.condition == "none":
            return self(ids, rep, label).float()  # (N, T, K)
        n = ids.shape[0]
        drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(ids.device)
        out = self(
            torch.cat([ids, ids]),
            rep=None if rep is None else torch.cat([rep, rep]),
            label=None if label is None else torch.cat([label, label]),
            drop=drop,
        ).float()  # (2N, T, K)
        cond, uncond = out[:n], out[n:]
        return cond + w * (cond - uncond)  # (N, T, K)

    def decode_step(
        self,
        ids: Tensor,
        step: int,
        num_iter: int,
        rep: Tensor | None = None,
        label: Tensor | None = None,
        choice_temperature: float = 6.0,
        cfg: float = 0.0,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "linear",
    ) -> tuple[Tensor, Tensor]:
        """One iteration of MAGE's parallel decoding (MaskGIT's schedule): sample every unknown
        token, keep the known ones, then re-mask the floor(T cos(pi/2 r)) least confident
        (clamped to [1, unknown - 1]); confidence = log p + temperature (1 - r) Gumbel, known
        tokens +inf. Guidance weight cfg r (`linear`, the reference's) or cfg (`constant`).
        Returns (sampled ids with every token filled, ids for the next step)."""
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")
        r = (step + 1) / num_iter
        logits = self.guided_logits(ids, rep, label, cfg * r if cfg_schedule == "linear" else cfg)  # (N, T, K)
        sampled = (logits + _gumbel(tuple(logits.shape), generator, ids.device)).argmax(-1)  # (N, T)
        unknown = ids == self.mask_id  # (N, T)
        sampled = torch.where(unknown, sampled, ids)  # (N, T)
        logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]  # (N, T)
        noise = _gumbel(tuple(ids.shape), generator, ids.device)  # (N, T)
        conf = torch.where(unknown, logp + choice_temperature * (1 - r) * noise, math.inf)  # (N, T)
        n_next = math.floor(self.num_tokens * math.cos(math.pi / 2 * r))
        n_next = unknown.sum(1, keepdim=True).sub(1).clamp(max=n_next).clamp(min=1)  # (N, 1)
        remask = conf.argsort(dim=1, stable=True).argsort(dim=1) < n_next  # (N, T): the least confident
        return sampled, sampled.masked_fill(remask, self.mask_id)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        rep: Tensor | None = None,
        label: Tensor | None = None,
        num_iter: int = 20,
        choice_temperature: float = 6.0,
        cfg: float = 0.0,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "linear",
    ) -> Tensor:
        """n token grids [n, T] by `num_iter` steps of iterative decoding from all-masked, with
        guidance weight cfg (s + 1) / num_iter at step s (docs/paper.md#guidance; `constant`: cfg).

        Call it in eval mode (dropout off); given `generator` the result is deterministic.
        """
        device = self.decoder_pos.device
        ids = torch.full((n, self.num_tokens), self.mask_id, dtype=torch.long, device=device)  # (n, T)
        sampled = ids
        for step in range(num_iter):
            sampled, ids = self.decode_step(ids, step, num_iter, rep, label, choice_temperature, cfg, generator,
                                            cfg_schedule)
        return sampled  # (n, T): the last step's samples, every token filled


# --------------------------------------------------------------------------------------------------
# Sizes (MAGE paper; RCG uses MAGE-B and MAGE-L) and small presets for CPU
# --------------------------------------------------------------------------------------------------

# MAGE-B / MAGE-L on the 16x16 ids of a 1024-code VQGAN at 256 px. `mage_tiny` makes the tests run
# in seconds (4x4 tokens); `mage_fmnist` is sized for Fashion-MNIST 28 px on a 2-core CPU (7x7 ids of
# a 256-code tokenizer, 128 wide, 6 + 4 blocks).
MAGE_ARCHS: dict[str, dict[str, int]] = {
    "MAGE-B": dict(num_tokens=256, codebook_size=1024, embed_dim=768, depth=12, num_heads=12,
                   decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=16),
    "MAGE-L": dict(num_tokens=256, codebook_size=1024, embed_dim=1024, depth=24, num_heads=16,
                   decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16),
    "mage_tiny": dict(num_tokens=16, codebook_size=32, embed_dim=32, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "mage_fmnist": dict(num_tokens=49, codebook_size=256, embed_dim=128, depth=6, num_heads=4,
                        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
}


def build_mage(name: str, **kwargs: Any) -> MAGE:
    """The MAGE of named size `name` (`MAGE_ARCHS`); `kwargs` (condition, rep_dim, num_tokens,
    codebook_size, ...) complete or override its entry."""
    return MAGE(**{**layers.lookup_arch(MAGE_ARCHS, name, "MAGE size"), **kwargs})
