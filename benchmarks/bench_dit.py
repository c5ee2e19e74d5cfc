"""DiT training step: rcg's DiT against a straightforward DiT of the same size, in the same run.

The baseline is the DiT of the DiT paper written plainly: explicit softmax(QK^T)V attention, one
adaLN Linear per block, fp32. rcg's DiT adds fused scaled_dot_product_attention, one GEMM for every
block's adaLN modulation and bf16 autocast (train_generator.amp). Both get the same weights, data,
timesteps and noise; tests/test_generators.py checks that they compute the same function.

Also measured (for the train_generator.rep_source default): where the representation of a training
crop comes from, the orig/flip Parquet cache (a lookup) or the frozen encoder run on the crop.

    .venv/bin/python benchmarks/bench_dit.py [--arch dit_fmnist] [--batch 128] [--rounds 8] [--threads 1]

The last line prints the speed ratio straightforward / rcg (>= 1.0 means rcg is at least as fast),
rcg in the precision its training stage would choose on this machine (rcg.precision).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcg.generators.dit import DiT
from rcg.layers import sincos_pos_embed_2d, timestep_embedding


class NaiveBlock(nn.Module):
    """A DiT block as in the DiT paper's code, with attention written out."""

    def __init__(self, d: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, int(d * mlp_ratio)), nn.Linear(int(d * mlp_ratio), d)
        self.adaLN = nn.Linear(d, 6 * d)

    def attention(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = attn.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(F.silu(c)).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attention(self.norm1(x) * (1 + sc1.unsqueeze(1)) + s1.unsqueeze(1))
        h = self.norm2(x) * (1 + sc2.unsqueeze(1)) + s2.unsqueeze(1)
        return x + g2.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h)))


class NaiveDiT(nn.Module):
    """A rep-conditioned DiT without rcg's optimisations (same parameters, same function)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, rep_dim: int = 256, rep_drop_prob: float = 0.1) -> None:
        super().__init__()
        d = hidden_size
        self.p, self.c, self.grid, self.rep_drop_prob = patch_size, in_channels, input_size // patch_size, rep_drop_prob
        self.x_embedder = nn.Conv2d(in_channels, d, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(self.grid, d)[None], requires_grad=False)
        self.t1, self.t2 = nn.Linear(256, d), nn.Linear(d, d)
        self.rep_embedder = nn.Linear(rep_dim, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, rep_dim))
        self.blocks = nn.ModuleList(NaiveBlock(d, num_heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d, 2 * d)
        self.final_linear = nn.Linear(d, patch_size * patch_size * in_channels)

    @classmethod
    def from_fast(cls, fast: DiT) -> NaiveDiT:
        """The same weights as an rcg DiT (condition 'rep'), split per block."""
        d, depth = fast.hidden_size, fast.depth
        heads = fast.blocks[0].attn.heads
        m = cls(fast.input_size, fast.patch_size, fast.in_channels, d, depth, heads,
                fast.cond.fake_latent.shape[1], fast.cond.rep_drop_prob)
        with torch.no_grad():
            m.x_embedder.load_state_dict(fast.x_embedder.state_dict())
            m.t1.load_state_dict(fast.cond.t_embedder[0].state_dict())
            m.t2.load_state_dict(fast.cond.t_embedder[2].state_dict())
            m.rep_embedder.load_state_dict(fast.cond.rep_embedder.state_dict())
            m.fake_latent.copy_(fast.cond.fake_latent)
            W, b = fast.adaLN_modulation[1].weight, fast.adaLN_modulation[1].bias
            for i, (nb, fb) in enumerate(zip(m.blocks, fast.blocks)):
                nb.qkv.load_state_dict(fb.attn.qkv.state_dict())
                nb.proj.load_state_dict(fb.attn.proj.state_dict())
                nb.fc1.load_state_dict(fb.mlp[0].state_dict())
                nb.fc2.load_state_dict(fb.mlp[2].state_dict())
                nb.adaLN.weight.copy_(W[6 * i * d : 6 * (i + 1) * d])
                nb.adaLN.bias.copy_(b[6 * i * d : 6 * (i + 1) * d])
            m.final_adaLN.weight.copy_(W[6 * depth * d :])
            m.final_adaLN.bias.copy_(b[6 * depth * d :])
            m.final_linear.load_state_dict(fast.final_linear.state_dict())
        return m

    def forward(self, x: Tensor, t: Tensor, rep: Tensor) -> Tensor:
        n = x.shape[0]
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        if self.training and self.rep_drop_prob > 0:
            drop = torch.rand(n, device=x.device) < self.rep_drop_prob
            rep = torch.where(drop[:, None], self.fake_latent, rep)
        c = self.t2(F.silu(self.t1(timestep_embedding(t, 256)))) + self.rep_embedder(rep)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=1)
        h = self.final_linear(self.norm_final(h) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        p, g, ch = self.p, self.grid, self.c
        return h.view(n, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(n, ch, g * p, g * p)


def _step_timer(model: nn.Module, amp: bool, batch: dict[str, Tensor]):
    from rcg.diffusion import Diffusion, make_betas

    diffusion = Diffusion(make_betas("linear", 1000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.training_loss(model, batch["z"], {"rep": batch["rep"]}, t=batch["t"], noise=batch["noise"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    return step


def bench_rep_source(batch: int, rounds: int) -> None:
    """Cache lookup vs the default encoder on a batch of 28 px crops (the rep_source default)."""
    from rcg.config import preset_config
    from rcg.encoders.vit import RepEncoder, spec_from_config

    cfg = preset_config("default")
    enc = RepEncoder(spec_from_config(cfg.encoder, cfg.data.channels))
    images = torch.rand(batch, 1, cfg.data.image_size, cfg.data.image_size)
    table = torch.randn(120000, 256)
    index = {(f"train-{i:06d}", v): 2 * i + v for i in range(60000) for v in (0, 1)}
    keys = [f"train-{i:06d}" for i in torch.randint(0, 60000, (batch,)).tolist()]
    flips = torch.rand(batch) < 0.5

    def cache() -> float:
        t0 = time.perf_counter()
        rows = [index[(k, int(f))] for k, f in zip(keys, flips.tolist())]
        table[torch.as_tensor(rows)]
        return time.perf_counter() - t0

    def encoder() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            enc(images)
        return time.perf_counter() - t0

    encoder(), cache()
    tc = statistics.median(cache() for _ in range(rounds))
    te = statistics.median(encoder() for _ in range(rounds))
    print(f"rep source per batch of {batch}: cache {tc * 1e3:.2f} ms, encoder on the fly {te * 1e3:.1f} ms "
          f"({te / tc:.0f}x slower); the cache is exact for flip-only augmentation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit_fmnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from rcg.generators import build_generator

    fast = build_generator(args.arch, input_size=args.size, in_channels=args.channels, condition="rep")
    naive = NaiveDiT.from_fast(fast)
    fast.train(), naive.train()
    n_params = sum(p.numel() for p in fast.parameters())
    b = args.batch
    batch = {"z": torch.randn(b, args.channels, args.size, args.size), "rep": torch.randn(b, 256),
             "t": torch.randint(0, 1000, (b,)), "noise": torch.randn(b, args.channels, args.size, args.size)}
    steps = {"rcg (SDPA, fused adaLN, bf16)": _step_timer(fast, True, batch),
             "rcg without bf16 (fp32)": _step_timer(fast, False, batch),
             "straightforward (fp32)": _step_timer(naive, False, batch)}
    for s in steps.values():  # warm-up
        s(), s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):  # interleaved, so load changes from other processes hit both alike
        for k, s in steps.items():
            times[k].append(s())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DiT {args.arch}: {n_params / 1e6:.2f}M params, {fast.grid ** 2} tokens, batch {b}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved steps (shared CPU: expect noise)")
    for k, v in med.items():
        print(f"  {k:32s} {v * 1e3:8.1f} ms/step  {b / v:7.1f} img/s")
    bench_rep_source(b, args.rounds)
    # The precision train_generator uses is the faster one on this machine (rcg.precision: bf16
    # unless fp32 is clearly faster), so that is rcg's side of the ratio.
    from rcg.precision import MARGIN

    bf16 = med["rcg without bf16 (fp32)"] * MARGIN >= med["rcg (SDPA, fused adaLN, bf16)"]
    ours = "rcg (SDPA, fused adaLN, bf16)" if bf16 else "rcg without bf16 (fp32)"
    paired = sorted(a / b for a, b in zip(times["straightforward (fp32)"], times[ours]))
    print(f"rcg trains in {'bf16' if bf16 else 'fp32'} here; paired ratios over {args.rounds} rounds: "
          f"min {paired[0]:.2f}, median {statistics.median(paired):.2f}, max {paired[-1]:.2f}")
    ratio = med["straightforward (fp32)"] / med[ours]
    print(f"speed ratio rcg / straightforward DiT training step: {ratio:.2f}")


if __name__ == "__main__":
    main()
