"""The representation diffusion model (RDM): a residual MLP denoiser over 256-d representations.

The reference's `SimpleMLP` (docs/paper.md#rdm-network): input projection, a sinusoidal timestep embedding of
the network width followed by a 2-layer MLP, residual blocks LN-SiLU-Linear with the time (and class)
embedding added in the middle, zero-initialised output layers, and an LN-SiLU-zero-Linear head. The
class-conditional RDM (paper section 4.3) adds a learned class embedding to every block the same way.

Differences from the reference, all deliberate:
- the input is a plain [B, D] tensor (the reference squeezes a [B, D, 1, 1] "image", which breaks at B=1);
- the class embedding lives inside the network, so the EMA covers it too (the reference keeps its
  `ClassEmbedder` outside the EMA);
- the unconditional RDM has no class table at all (the reference computes an unused 1-class embedding).

This module also holds its training recipe (`train_rdm`, through the shared loop), the artifact
format (`models/rdm/rdm{,_class}.{safetensors,json}`), `load_rdm` and `sample_reps`, which the
image-generation pipeline calls.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcg.config import RDMConfig
from rcg.diffusion import Diffusion, ddim_sample, diffusion_meta
from rcg.io import PipelineError, atomic_path, read_json, write_json
from rcg.layers import lookup_arch, timestep_embedding, zero_module
from rcg.training import DistInfo, LoopSpec, adamw, autocast, fingerprint, fit

log = logging.getLogger(__name__)

# Named sizes (width = model_channels = bottleneck_channels in the reference; depth = num_res_blocks).
# `paper` is the reference's 12 x 1536 (~63M parameters); the others keep CPU presets fast.
RDM_ARCHS: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, time_embed_dim=32, class_embed_dim=32),  # tests: trains in seconds
    "small": dict(width=512, depth=4, time_embed_dim=256, class_embed_dim=256),  # ~2.6M: Fashion-MNIST on CPU
    "base": dict(width=1024, depth=8, time_embed_dim=256, class_embed_dim=512),  # ~19M: mid-size datasets
    "paper": dict(width=1536, depth=12, time_embed_dim=256, class_embed_dim=512),  # docs/paper.md#rdm-network
}


class ResBlock(nn.Module):
    """x + Linear0(SiLU(LN(Linear(SiLU(LN(x))) + emb_proj(SiLU(emb)) [+ ctx_proj(SiLU(ctx))])))."""

    def __init__(self, width: int, emb_dim: int, context_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, width))
        self.context_layers = (
            nn.Sequential(nn.SiLU(), nn.Linear(context_dim, width)) if context_dim else None
        )
        self.out_layers = nn.Sequential(
            nn.LayerNorm(width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.in_layers(x)  # (B, W)
        h = h + self.emb_layers(emb)  # additive time conditioning
        if self.context_layers is not None and context is not None:
            h = h + self.context_layers(context)  # additive class conditioning
        return x + self.out_layers(h)  # (B, W); RDMNet zero-inits the last Linear: identity at first


class RDMNet(nn.Module):
    """The RDM denoiser `SimpleMLP` (docs/paper.md#rdm-network): (x_t [B, D], t [B], y [B]?) ->
    x0-hat [B, D]."""

    def __init__(
        self,
        rep_dim: int = 256,
        width: int = 1536,
        depth: int = 12,
        time_embed_dim: int = 256,
        num_classes: int = 0,
        class_embed_dim: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.rep_dim, self.width, self.num_classes = rep_dim, width, num_classes
        self.input_proj = nn.Linear(rep_dim, width)
        # The sinusoid has the network width (1536 in the reference), projected to time_embed_dim.
        self.time_embed = nn.Sequential(
            nn.Linear(width, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.class_embed = nn.Embedding(num_classes, class_embed_dim) if num_classes > 0 else None
        ctx = class_embed_dim if num_classes > 0 else 0
        self.blocks = nn.ModuleList(
            [ResBlock(width, time_embed_dim, ctx, dropout) for _ in range(depth)]
        )
        self.out = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.SiLU(), nn.Linear(width, rep_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's init (docs/paper.md#rdm-network): every block's output Linear and the head's last
        Linear are zero, so each block starts as the identity and the untrained RDM predicts x0 = 0;
        every other layer keeps PyTorch's default init, drawn as the layers are constructed."""
        for block in self.blocks:
            zero_module(block.out_layers[-1])
        zero_module(self.out[-1])

    @property
    def class_cond(self) -> bool:
        return self.class_embed is not None

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.width))  # (B, E)
        context = None
        if self.class_embed is not None:
            if y is None:
                raise ValueError("the class-conditional RDM needs class labels y")
            context = self.class_embed(y.long())  # (B, C)
        h = self.input_proj(x)  # (B, W)
        for block in self.blocks:
            h = block(h, emb, context)  # (B, W)
        return self.out(h)  # (B, D)


def build_rdm(arch: str, rep_dim: int = 256, num_classes: int = 0) -> RDMNet:
    """An RDM of a named size (`RDM_ARCHS`); num_classes > 0 makes it class-conditional."""
    size = lookup_arch(RDM_ARCHS, arch, "RDM size", key="train_rdm.arch")
    return RDMNet(rep_dim=rep_dim, num_classes=num_classes, **size)


# --------------------------------------------------------------------------------------------------
# Artifacts: models/rdm/<name>.safetensors + <name>.json
# --------------------------------------------------------------------------------------------------


def artifact_name(class_cond: bool) -> str:
    """`rdm` for the unconditional RDM, `rdm_class` for the class-conditional one."""
    return "rdm_class" if class_cond else "rdm"


def save_rdm(model: RDMNet, meta: dict[str, Any], out_dir: str | Path, name: str) -> Path:
    """Write `<out_dir>/<name>.safetensors` (weights) and `<name>.json` (everything to rebuild it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / f"{name}.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "rcg-rdm"})
    write_json(out / f"{name}.json", meta)
    return out / f"{name}.safetensors"


@dataclass
class RDMBundle:
    """A trained RDM ready to sample: EMA network (eval mode), its diffusion and its metadata."""

    model: RDMNet
    diffusion: Diffusion
    meta: dict[str, Any]

    @property
    def class_cond(self) -> bool:
        return self.model.class_cond

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def rep_dim(self) -> int:
        return self.model.rep_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def make_meta(
    model: RDMNet,
    arch: str,
    diffusion_cfg: dict[str, Any],
    sampling: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON beside the weights: architecture kwargs, diffusion settings, sampling defaults."""
    return {
        "format": "rcg-rdm",
        "arch": arch,
        "model": {
            "rep_dim": model.rep_dim,
            "num_classes": model.num_classes,
            **RDM_ARCHS[arch],
        },
        "diffusion": diffusion_cfg,
        "sampling": sampling,
        **(extra or {}),
    }


def bundle_from(model: RDMNet, meta: dict[str, Any]) -> RDMBundle:
    """Wrap an in-memory network with its metadata (what `load_rdm` returns, without the files)."""
    return RDMBundle(model.eval(), Diffusion.from_meta(meta["diffusion"]), meta)


def load_rdm(
    model_dir: str | Path = "models/rdm", class_cond: bool = False, device: str | torch.device = "cpu"
) -> RDMBundle:
    """Load `rdm` (or `rdm_class` with class_cond=True) from `model_dir` for sampling."""
    from safetensors.torch import load_file

    name = artifact_name(class_cond)
    wpath, jpath = Path(model_dir) / f"{name}.safetensors", Path(model_dir) / f"{name}.json"
    if not wpath.exists() or not jpath.exists():
        what = "class-conditional RDM (needs labelled features and train_rdm.class_cond)" if class_cond else "RDM"
        raise PipelineError(f"{wpath}: no trained {what} here (run `rcg train-rdm` first)")
    meta = read_json(jpath)
    try:
        m = meta["model"]
        model = RDMNet(
            rep_dim=m["rep_dim"], width=m["width"], depth=m["depth"], time_embed_dim=m["time_embed_dim"],
            num_classes=m["num_classes"], class_embed_dim=m["class_embed_dim"],
        )
        bundle = bundle_from(model, meta)
    except KeyError as e:
        raise PipelineError(f"{jpath}: missing key {e}") from None
    model.load_state_dict(load_file(str(wpath)), strict=True)
    model.to(device).requires_grad_(False)
    return bundle


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sample_reps(
    bundle: RDMBundle,
    n: int,
    class_ids: Tensor | int | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    temperature: float | None = None,
    progress: bool = False,
    amp: bool | None = None,
) -> Tensor:
    """Draw n representations [n, D] (float32, CPU) from the RDM with DDIM (docs/paper.md#rdm-sampling).

    Defaults (steps, eta, temperature, amp = bf16 autocast) come from the bundle's metadata (the
    reference: 250 steps, eta 1, temperature 1, fp32). `class_ids` (one per sample, or one int for all) selects classes for the
    class-conditional RDM; if it is omitted there, classes are drawn uniformly at random. Samples are
    not re-standardised (as in the reference). The result depends on (seed, batch_size).
    """
    sampling = bundle.meta.get("sampling", {})
    steps = int(steps if steps is not None else sampling.get("steps", 250))
    eta = float(eta if eta is not None else sampling.get("eta", 1.0))
    temperature = float(temperature if temperature is not None else sampling.get("temperature", 1.0))
    amp = bool(amp if amp is not None else sampling.get("amp", False))
    g = torch.Generator().manual_seed(seed)
    if class_ids is not None:
        if not bundle.class_cond:
            raise PipelineError("class ids given, but this RDM is unconditional (load_rdm(class_cond=True))")
        ids = torch.as_tensor(class_ids, dtype=torch.long).flatten()
        ids = ids.expand(n).clone() if ids.numel() == 1 else ids
        if ids.numel() != n:
            raise ValueError(f"class_ids has {ids.numel()} entries for n={n} samples")
        if ids.min() < 0 or ids.max() >= bundle.num_classes:
            raise PipelineError(f"class ids must be in [0, {bundle.num_classes}), got {ids.min()}..{ids.max()}")
    elif bundle.class_cond:
        ids = torch.randint(0, bundle.num_classes, (n,), generator=g)
    else:
        ids = None
    device = bundle.device

    def model(x: Tensor, t: Tensor, **kw: Tensor) -> Tensor:
        with autocast(device, amp):  # the DDIM update itself stays in fp32
            return bundle.model(x, t, **kw).float()

    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        kwargs = {"y": ids[start : start + b].to(device)} if ids is not None else None
        x = ddim_sample(
            model, bundle.diffusion, (b, bundle.rep_dim), steps, eta=eta,
            temperature=temperature, model_kwargs=kwargs, generator=g, device=device,
            progress=progress,
        )
        out.append(x.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, bundle.rep_dim)


# --------------------------------------------------------------------------------------------------
# Training (through the shared loop, rcg.training.fit)
# --------------------------------------------------------------------------------------------------

# Settings that change what is learned (not `steps`: raising it continues a finished run).
_TRAINING_KEYS = ("arch", "timesteps", "beta_schedule", "linear_start", "linear_end", "parameterization",
                  "timestep_power", "batch_size", "lr", "lr_decay_frac", "weight_decay", "ema_decay", "amp", "seed")


def schedule(rc: RDMConfig) -> dict[str, Any]:
    """The RDM's diffusion process as its JSON describes it (paper section 3.2: 1000 steps, x0)."""
    return diffusion_meta(rc.beta_schedule, rc.timesteps, rc.linear_start, rc.linear_end, rc.parameterization)


def index_batches(n: int, batch: int, info: DistInfo, seed: int, start: int) -> Iterator[torch.Tensor]:
    """This rank's row indices for every step from `start`: a fresh permutation per epoch, cut into
    global batches, each rank taking its slice (DistributedSampler semantics, drop_last). Step k's
    batch is a pure function of (seed, k), so a resumed run sees exactly the batches it would have."""
    per_rank, per_epoch = batch // info.world_size, n // batch
    epoch_now, perm = -1, torch.empty(0, dtype=torch.long)
    for step in itertools.count(start):
        epoch, pos = divmod(step, per_epoch)
        if epoch != epoch_now:
            epoch_now, perm = epoch, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        first = pos * batch + info.rank * per_rank
        yield perm[first : first + per_rank]


def train_rdm(rc: RDMConfig, reps: torch.Tensor, labels: torch.Tensor | None, num_classes: int,
              info: DistInfo, tracker: Any = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one RDM on representations [N, D] (paper section 3.2: the simple diffusion MSE, AdamW,
    EMA with warm-up), class-conditional when `labels` are given (section 4.4); returns its EMA
    network and the loop's summary. Resumes from and writes rc.checkpoint_dir/{uncond,class}."""
    name = artifact_name(labels is not None)
    n, dim = reps.shape
    batch = rc.batch_size
    if batch % info.world_size:
        raise PipelineError(f"train_rdm.batch_size {batch} is not divisible by the {info.world_size} ranks")
    if n < batch:
        log.warning("%s: only %d reps for a global batch of %d; using batch %d", name, n, batch, n)
        batch = max(info.world_size, n - n % info.world_size)
    torch.manual_seed(rc.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    net = build_rdm(rc.arch, dim, num_classes if labels is not None else 0).to(info.device)
    diffusion = Diffusion.from_meta(schedule(rc))
    # fused AdamW: the same update in one kernel (several times faster than the per-tensor loop on CPU)
    opt = adamw(net.parameters(), rc.lr, weight_decay=rc.weight_decay, device=info.device, cpu_fused=True)
    data_id = [n, dim, num_classes, float(reps[:: max(1, n // 1000)].double().sum())]
    spec = LoopSpec(
        name=f"train_rdm ({name})", steps=rc.steps, lr=rc.lr, batch_size=batch, decay="linear",
        decay_frac=rc.lr_decay_frac, amp=rc.amp, ema_decay=rc.ema_decay, log_every=rc.log_every,
        ckpt_every=rc.ckpt_every, metric_prefix=f"{name}/", config_key="train_rdm",
        checkpoint_dir=Path(rc.checkpoint_dir) / ("class" if labels is not None else "uncond"),
        fingerprint=fingerprint({k: getattr(rc, k) for k in _TRAINING_KEYS}, name, data_id),
    )
    # This rank's noise and timesteps: a stream of its own, saved in the checkpoints.
    g = torch.Generator().manual_seed(hash((rc.seed, info.rank, 0)) % 2**63)
    reps_dev = reps.to(info.device)
    labels_dev = labels.to(info.device) if labels is not None else None

    def data(start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx in index_batches(n, batch, info, rc.seed, start):
            idx = idx.to(info.device)
            x0 = reps_dev[idx]  # (b, D)
            t = diffusion.sample_t(idx.numel(), info.device, g, power=rc.timestep_power)
            noise = torch.randn(x0.shape, generator=g).to(info.device)
            yield x0, t, noise, (labels_dev[idx] if labels_dev is not None else None)

    def loss(model: torch.nn.Module, b: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x0, t, noise, y = b
        return diffusion.training_loss(model, x0, {"y": y} if y is not None else None, t=t, noise=noise)

    log.info("%s: %s, %d reps of dim %d, global batch %d on %d rank(s), %d steps",
             name, rc.arch, n, dim, batch, info.world_size, rc.steps)
    trained = fit(spec, net, opt, loss, data, info, tracker, generators={"noise": g})
    return trained.ema, trained.summary


def save_trained(rc: RDMConfig, net: nn.Module, name: str, summary: dict[str, Any], n_reps: int,
                 device: torch.device, out_dir: Path, features: Path) -> RDMBundle:
    """Write a trained RDM (`train_rdm`'s EMA network) to <out_dir>/<name>.* with the sampler settings
    every later use of it reads (rc.sample_steps, eta, temperature, amp) and its training facts;
    returns it ready to sample on `device`."""
    meta = make_meta(
        net, rc.arch, schedule(rc),
        {"steps": rc.sample_steps, "eta": rc.eta, "temperature": rc.temperature, "amp": rc.amp},
        {"trained_steps": summary["steps"], "ema_decay": rc.ema_decay,
         "features": str(features), "num_train_reps": n_reps},
    )
    save_rdm(net.cpu(), meta, out_dir, name)
    log.info("%s: EMA weights written to %s", name, Path(rc.out_dir) / f"{name}.safetensors")
    return bundle_from(net.to(device), meta)
