"""MAGE training step: rcg's MAGE against a plain PyTorch MAGE of the same size, in the same run.

rcg's MAGE (rcg.generators.mage, paper section 3.3) is timed as train_generator runs it:
`MAGE.loss` (one mask ratio per batch, half the tokens dropped from the encoder, masked
label-smoothed cross-entropy) under the precision rcg.precision picks, backward, gradient clipping
3.0, AdamW (betas 0.9, 0.95, weight decay 0.05 off biases and norms): the MAGE recipe of
README.md's MAGE run and of bench_token_cache.py.

The baseline is the same model written straightforwardly, as the official MAGE code does it: word
embedding + learned positions (LayerNorm, dropout), the representation's Linear overwriting
position 0, the kept tokens picked with a boolean index, torch's own `nn.TransformerEncoderLayer`
(norm_first, GELU, eps 1e-6, dropout 0.1) for the encoder and decoder blocks, the decoder input
padded back with copies of position 0's token by an index assignment, an MLM head on the detached
word embeddings, and the masked label-smoothed (0.1) cross-entropy (baseline `torch`). Baseline
`explicit` is the same with each block written out (softmax(QK^T)V attention, no fused kernel);
`--baselines` picks them (default both; the headline ratio is against `torch`).

Identical on both sides: the parameter count and layout (the baseline is loaded from rcg's weights
with a strict state dict, so both start from the same weights), the batches (random token ids and
representations: the speed does not depend on their values), the mask ratio, masks and
representation drops of every step (drawn in the same order from generators of the same seed:
checked below), the loss, optimiser, clipping and precision. Checked: with dropout off both compute
the same logits (fp32, max difference printed). Not identical: the dropout masks (each side draws
its own), hence the training losses after the first step (their means are printed; they stay
close); the code paths (rcg: fused SDPA, a gather/scatter over a stable argsort; baseline:
nn.MultiheadAttention, boolean indexing).

After warm-up the sides alternate step by step (ABAB), `--rounds` rounds of `--steps` steps each;
each round gives the ratio baseline seconds / rcg seconds of its mean step times.

    .venv/bin/python benchmarks/bench_mage.py [--arch mage_fmnist] [--batch 128] [--rounds 6] [--steps 5]
        [--warmup 2] [--threads 1] [--precision auto|bf16|fp32] [--baselines torch,explicit]
    .venv/bin/python benchmarks/bench_mage.py --arch MAGE-B --batch 8 --rounds 5 --steps 1 --warmup 1 --precision bf16

`--rcg-attention explicit` times a what-if instead of rcg's code: its MAGE with the attention
written out (softmax(QK^T)V) in place of scaled_dot_product_attention.

The last line prints baseline time / rcg time per step (>= 0.9 is the target: rcg at least 0.9x
the plain PyTorch transformer's speed), the median over rounds against the `torch` baseline.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import spread, timed
from torch import Tensor, nn

from rcg.generators import build_generator
from rcg.generators.mage import MAGE, _rand, token_masks
from rcg.generators.tokens import weight_decay_groups
from rcg.precision import MARGIN, probe
from rcg.training import adamw, autocast

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.95), 0.05, 3.0  # the MAGE recipe (README.md's MAGE run)


class ExplicitLayer(nn.Module):
    """A pre-LN transformer block written out: softmax(QK^T)V attention, GELU MLP, dropout as
    nn.TransformerEncoderLayer places it (attention weights, after each branch, after the GELU)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.in_proj, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.linear1, self.linear2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.in_proj(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.drop(((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1))
        x = x + self.drop(self.out_proj((attn @ v).transpose(1, 2).reshape(n, t, d)))
        return x + self.drop(self.linear2(self.drop(F.gelu(self.linear1(self.norm2(x))))))


def make_layer(kind: str, d: int, heads: int, dropout: float) -> nn.Module:
    if kind == "torch":
        return nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, activation="gelu", layer_norm_eps=1e-6,
                                          batch_first=True, norm_first=True)
    if kind == "explicit":
        return ExplicitLayer(d, heads, dropout)
    raise ValueError(f"unknown baseline {kind!r} (torch or explicit)")


class PlainMAGE(nn.Module):
    """A representation-conditioned MAGE written straightforwardly (module docstring)."""

    def __init__(self, kind: str, num_tokens: int, codebook_size: int, embed_dim: int, depth: int, num_heads: int,
                 decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, rep_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.kind, self.codebook_size = kind, codebook_size
        self.word = nn.Embedding(codebook_size + 2, embed_dim)  # codes, the position-0 id, the mask id
        self.pos = nn.Parameter(torch.zeros(1, num_tokens + 1, embed_dim))
        self.emb_norm, self.emb_drop = nn.LayerNorm(embed_dim, eps=1e-6), nn.Dropout(dropout)
        self.rep_proj = nn.Linear(rep_dim, embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, rep_dim))
        self.encoder = nn.ModuleList(make_layer(kind, embed_dim, num_heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.dec_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.dec_pos = nn.Parameter(torch.zeros(1, num_tokens + 1, decoder_embed_dim))
        self.decoder = nn.ModuleList(make_layer(kind, decoder_embed_dim, decoder_num_heads, dropout)
                                     for _ in range(decoder_depth))
        self.dec_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.head_fc, self.head_norm = nn.Linear(decoder_embed_dim, embed_dim), nn.LayerNorm(embed_dim)
        self.head_bias = nn.Parameter(torch.zeros(codebook_size))

    def forward(self, ids: Tensor, rep: Tensor, drop: Tensor, dropped: Tensor, masked: Tensor) -> Tensor:
        """Codebook logits [N, T, K] of ids [N, T] (masked ones hold the mask id)."""
        n, t = ids.shape
        seq = torch.cat([torch.full((n, 1), self.codebook_size, dtype=ids.dtype), ids], dim=1)
        h = self.emb_drop(self.emb_norm(self.word(seq) + self.pos))
        cond = self.rep_proj(torch.where(drop[:, None], self.fake_latent, rep))
        h = torch.cat([cond[:, None].to(h.dtype), h[:, 1:]], dim=1)
        keep = torch.cat([torch.ones(n, 1, dtype=torch.bool), ~dropped], dim=1)
        h = h[keep].reshape(n, -1, h.shape[-1])  # the kept tokens, in order
        for layer in self.encoder:
            h = layer(h)
        x = self.dec_embed(self.norm(h))
        pad = x[:, :1].repeat(1, t + 1, 1)  # every position starts as position 0's token
        pad[keep] = x.reshape(-1, x.shape[-1])
        masked = torch.cat([torch.zeros(n, 1, dtype=torch.bool), masked], dim=1)
        x = torch.where(masked[..., None], x[:, :1], pad) + self.dec_pos
        for layer in self.decoder:
            x = layer(x)
        h = self.head_norm(F.gelu(self.head_fc(self.dec_norm(x)[:, 1:])))
        return h @ self.word.weight[: self.codebook_size].detach().t().to(h.dtype) + self.head_bias


def layer_keys(kind: str) -> dict[str, str]:
    """rcg Block parameter name -> the baseline layer's."""
    attn = {"torch": ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj"),
            "explicit": ("in_proj.weight", "in_proj.bias", "out_proj")}[kind]
    return {"attn.qkv.weight": attn[0], "attn.qkv.bias": attn[1], "attn.proj.weight": attn[2] + ".weight",
            "attn.proj.bias": attn[2] + ".bias", "mlp.0.weight": "linear1.weight", "mlp.0.bias": "linear1.bias",
            "mlp.3.weight": "linear2.weight", "mlp.3.bias": "linear2.bias", "norm1.weight": "norm1.weight",
            "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}


def plain_from_rcg(model: MAGE, kind: str, arch: dict[str, int]) -> PlainMAGE:
    """A PlainMAGE holding `model`'s weights; a strict load, so every parameter has its counterpart."""
    plain = PlainMAGE(kind, **arch)
    top = {"token_emb.word.weight": "word.weight", "token_emb.pos": "pos", "token_emb.norm.weight": "emb_norm.weight",
           "token_emb.norm.bias": "emb_norm.bias", "latent_prior_proj.weight": "rep_proj.weight",
           "latent_prior_proj.bias": "rep_proj.bias", "fake_latent": "fake_latent", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias", "decoder_embed.weight": "dec_embed.weight", "decoder_embed.bias": "dec_embed.bias",
           "decoder_pos": "dec_pos", "decoder_norm.weight": "dec_norm.weight", "decoder_norm.bias": "dec_norm.bias",
           "mlm.fc.weight": "head_fc.weight", "mlm.fc.bias": "head_fc.bias", "mlm.norm.weight": "head_norm.weight",
           "mlm.norm.bias": "head_norm.bias", "mlm.bias": "head_bias"}
    sub, stacks = layer_keys(kind), {"blocks": "encoder", "decoder_blocks": "decoder"}
    state = {}
    for name, value in model.state_dict().items():
        if name in top:
            state[top[name]] = value
            continue
        group, i, rest = name.split(".", 2)  # blocks.<i>.<rest> / decoder_blocks.<i>.<rest>
        state[f"{stacks[group]}.{i}.{sub[rest]}"] = value
    plain.load_state_dict(state, strict=True)
    return plain


def plain_draws(n: int, t: int, g: torch.Generator, mask_ratio: tuple[float, float, float, float],
                rep_drop_prob: float) -> tuple[Tensor, Tensor, Tensor]:
    """The baseline's random draws, in MAGE.loss's order: a mask ratio from the truncated normal
    (inverse CDF), the uniform noise whose smallest half is dropped and smallest `ratio` masked, the
    representation drops. Returns (dropped [N, T], masked [N, T], drop [N])."""
    lo, hi, mu, std = mask_ratio
    a, b = (torch.special.ndtr(torch.tensor((v - mu) / std, dtype=torch.float64)) for v in (lo, hi))
    u = torch.rand((), generator=g, dtype=torch.float64)
    ratio = float((mu + std * torch.special.ndtri(a + u * (b - a))).clamp(lo, hi))
    rank = torch.rand((n, t), generator=g).argsort(dim=1, stable=True).argsort(dim=1)
    dropped, masked = rank < math.ceil(t * lo), rank < math.ceil(t * ratio)
    return dropped, masked, torch.rand((n,), generator=g) < rep_drop_prob


def check_same(model: MAGE, plains: dict[str, PlainMAGE], ids: Tensor, rep: Tensor) -> None:
    """Same draws as MAGE.loss; same logits with dropout off (fp32)."""
    n, t = ids.shape
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ratio = model.sample_mask_ratio(g1)  # MAGE.loss's draws, in its order
    dropped, masked = token_masks(n, t, math.ceil(t * model.mask_ratio[0]), math.ceil(t * ratio), g1, ids.device)
    drop = _rand((n,), g1, ids.device) < model.rep_drop_prob
    p_dropped, p_masked, p_drop = plain_draws(n, t, g2, model.mask_ratio, model.rep_drop_prob)
    same = torch.equal(dropped, p_dropped) and torch.equal(masked, p_masked) and torch.equal(drop, p_drop)
    print(f"draws (mask ratio, masks, rep drops) of the baseline and of MAGE.loss identical: {same}")
    if not same:
        raise SystemExit("the baseline's draws differ from MAGE.loss's: the comparison would not be like for like")
    x = ids.masked_fill(masked, model.mask_id)
    model.eval()
    with torch.no_grad():
        ref = model(x, rep, drop=drop, keep=~dropped)
        for kind, plain in plains.items():
            out = plain.eval()(x, rep, drop, dropped, masked)
            print(f"  {kind}: max |logit difference| with dropout off (fp32): {(out - ref).abs().max():.2e} "
                  f"(logits up to {ref.abs().max():.1f})")
            plain.train()
    model.train()


def rcg_step(model: MAGE, batches: list[tuple[Tensor, Tensor]], bf16: bool, losses: list[float]) -> Callable[[int], None]:
    """`step(i)`: train_generator's step on batch i (rcg.training._train_step with MAGE.loss)."""
    opt = adamw(weight_decay_groups(model, WEIGHT_DECAY), LR, betas=BETAS, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        ids, rep = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), bf16):
            loss = model.loss(ids, rep=rep, generator=g)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())

    return step


def plain_step(model: PlainMAGE, batches: list[tuple[Tensor, Tensor]], bf16: bool, mask_ratio: tuple,
               rep_drop_prob: float, losses: list[float]) -> Callable[[int], None]:
    """`step(i)`: the baseline's training step on batch i."""
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and not name.endswith("bias")]
    rest = [p for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)
    g = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        ids, rep = batches[i % len(batches)]
        dropped, masked, drop = plain_draws(*ids.shape, g, mask_ratio, rep_drop_prob)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids.masked_fill(masked, model.codebook_size + 1), rep, drop, dropped, masked)
            loss = F.cross_entropy(logits[masked].float(), ids[masked], label_smoothing=0.1)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())

    return step


def explicit_rcg_attention() -> None:
    """What-if for `--rcg-attention explicit`: rcg's Attention computes softmax(QK^T)V itself
    instead of calling scaled_dot_product_attention (same function, same dropout placement)."""
    from rcg.generators import mage

    def forward(self: mage.Attention, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        y = F.dropout(attn, self.dropout, self.training) @ v
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(n, t, d)))

    mage.Attention.forward = forward


def choose_precision(choice: str, model: MAGE, batch: tuple[Tensor, Tensor]) -> bool:
    """Whether both sides run under bf16 autocast: given, or what rcg.precision would choose for
    this MAGE on this machine (its probe: fastest forward + backward in each precision)."""
    if choice != "auto":
        return choice == "bf16"
    g = torch.Generator().manual_seed(1)
    seconds = probe(model, lambda m, b, _: m.loss(b[0], rep=b[1], generator=g), batch, 0, torch.device("cpu"))
    bf16 = seconds["fp32"] * MARGIN >= seconds["bf16"]
    print(f"rcg.precision probe: bf16 {seconds['bf16'] * 1e3:.0f} ms, fp32 {seconds['fp32'] * 1e3:.0f} ms per "
          f"forward + backward -> {'bf16 autocast' if bf16 else 'fp32'} (bf16 unless fp32 is {MARGIN}x faster)")
    return bf16



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mage_fmnist", help="a MAGE size (rcg.generators.mage.MAGE_ARCHS)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per round and side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--pool", type=int, default=4, help="distinct batches, cycled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="both sides' precision; auto: what rcg.precision picks for rcg's MAGE here")
    ap.add_argument("--baselines", default="torch,explicit", help="comma list of torch, explicit")
    ap.add_argument("--rcg-attention", choices=("sdpa", "explicit"), default="sdpa",
                    help="explicit: a what-if, rcg's MAGE with its attention written out (not rcg's code)")
    args = ap.parse_args()
    if args.rcg_attention == "explicit":
        explicit_rcg_attention()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from rcg.generators.mage import MAGE_ARCHS

    arch = dict(MAGE_ARCHS[args.arch])
    model = build_generator(args.arch, condition="rep", rep_dim=256).train()
    kinds = [k.strip() for k in args.baselines.split(",") if k.strip()]
    plains = {k: plain_from_rcg(model, k, arch).train() for k in kinds}
    n_params = sum(p.numel() for p in model.parameters())
    t, k = arch["num_tokens"], arch["codebook_size"]
    print(f"{args.arch}: {t} tokens of {k} codes, {arch['depth']} + {arch['decoder_depth']} blocks, "
          f"{arch['embed_dim']} / {arch['decoder_embed_dim']} wide; parameters: rcg {n_params:,}, "
          + ", ".join(f"{kind} {sum(p.numel() for p in m.parameters()):,}" for kind, m in plains.items()))
    batches = [(torch.randint(0, k, (args.batch, t)), torch.randn(args.batch, 256)) for _ in range(args.pool)]
    check_same(model, plains, *batches[0])
    bf16 = choose_precision(args.precision, model, batches[0])

    losses: dict[str, list[float]] = {"rcg": [], **{kind: [] for kind in plains}}
    sides = {"rcg": rcg_step(model, batches, bf16, losses["rcg"]),
             **{kind: plain_step(m, batches, bf16, model.mask_ratio, model.rep_drop_prob, losses[kind])
                for kind, m in plains.items()}}
    for i in range(args.warmup):
        for fn in sides.values():
            fn(i)
    per_step: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}  # CPU seconds per step, per round
    for r in range(args.rounds):  # step by step ABAB: adjacent steps see about the same neighbours' load
        wall = dict.fromkeys(sides, 0.0)
        used: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.warmup + r * args.steps, args.warmup + (r + 1) * args.steps):
            for name, fn in sides.items():
                wall[name] += timed(lambda fn=fn: fn(i), used[name])
        for name in sides:
            per_step[name].append(wall[name] / args.steps)
            cpu[name].append(sum(used[name]) / args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1] * 1e3:.0f} ms" for name, v in per_step.items())
              + "; baseline/rcg " + ", ".join(f"{kind} {per_step[kind][-1] / per_step['rcg'][-1]:.3f}"
                                              for kind in plains), flush=True)

    timed_losses = {name: v[args.warmup:] for name, v in losses.items()}
    what = " (what-if: rcg's attention written out)" if args.rcg_attention == "explicit" else ""
    print(f"MAGE {args.arch}{what}, batch {args.batch}, {args.threads} thread(s), {'bf16 autocast' if bf16 else 'fp32'} "
          f"on both sides; {args.rounds} ABAB rounds of {args.steps} steps after {args.warmup} warm-up steps "
          "(shared CPU: expect noise)")
    for name, v in per_step.items():
        print(f"  {name:9s} ms/step: {spread([s * 1e3 for s in v], '{:.0f}')}  "
              f"CPU-ms/step: {spread([s * 1e3 for s in cpu[name]], '{:.0f}')}  "
              f"({args.batch / statistics.median(v):.0f} img/s); mean training loss {statistics.mean(timed_losses[name]):.3f}")
    ratios = {}
    for kind in plains:
        ratios[kind] = [b / a for a, b in zip(per_step["rcg"], per_step[kind])]
        cpu_ratios = [b / a for a, b in zip(cpu["rcg"], cpu[kind])]
        print(f"baseline ({kind}) / rcg per round, wall: {' '.join(f'{x:.3f}' for x in ratios[kind])}; "
              f"{spread(ratios[kind])}")
        print(f"baseline ({kind}) / rcg per round, CPU seconds: {' '.join(f'{x:.3f}' for x in cpu_ratios)}; "
              f"{spread(cpu_ratios)}")
    head = "torch" if "torch" in ratios else kinds[0]
    print(f"speed ratio rcg / plain PyTorch MAGE ({head}) training step, baseline time / rcg time: "
          f"{statistics.median(ratios[head]):.3f} (min {min(ratios[head]):.3f}, max {max(ratios[head]):.3f}; "
          "target >= 0.9)")


if __name__ == "__main__":
    main()
