"""The network whose features score generated images when Inception weights are unavailable.

No Inception weights can be downloaded here, so the pipeline trains its own extractor on the train
split and uses its penultimate features the way FID uses Inception's pool features (Heusel et al.
2017). Its Frechet distance is named `fd` under the extractor's name, never FID. Two kinds:

- `classifier` (extractor `evalnet`), when the shards carry labels: a small CNN trained to classify;
  its softmax also gives IS (Salimans et al. 2016) and class accuracy of class-conditional samples.
- `contrastive` (extractor `evalnet-ssl`), when they do not: the same CNN trained without labels by
  SimCLR (Chen et al. 2020: two augmented views, NT-Xent over the batch). A self-supervised feature
  space is a sound judge (Stein et al. 2023 rank generators with DINOv2 features), and this one is
  independent of the encoder that conditions the generator: another architecture (a CNN, not a ViT),
  another objective and seed. Scoring in the conditioning encoder's own space would reward a
  generator for matching its condition. Without classes there is no IS and no class accuracy.

Artifacts: `<dir>/evalnet.safetensors` (weights) + `<dir>/evalnet.json` (architecture kwargs, kind,
class names, test accuracy), as for every model of the pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rcg.io import PipelineError, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

NAME = "evalnet"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv-BN-ReLU, then 2x2 max-pool: one conv per stage keeps a training step cheap on CPU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class EvalNet(nn.Module):
    """Small CNN classifier: two conv stages, then a fully connected feature layer.

    `features(x)` is the penultimate layer (input of the classifier head): what FD, KID and
    precision/recall are computed on. `forward(x)` returns the class logits (for IS and accuracy).
    Inputs are images in [0, 1], [B, in_channels, image_size, image_size] (`prepare_input` maps
    other shapes); normalisation happens inside.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            width=width,
            feature_dim=feature_dim,
        )
        self.body = nn.Sequential(_block(in_channels, width), _block(width, 2 * width))
        side = image_size // 4  # two 2x2 max-pools
        self.fc = nn.Sequential(  # keeps the spatial layout (a global pool loses ~2 points here)
            nn.Flatten(),
            nn.Linear(2 * width * side * side, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None  # none: contrastive

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5  # [0, 1] -> [-1, 1]            (B, C, S, S)
        h = self.body(x)  # (B, 2w, S/4, S/4)
        return self.fc(h)  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise PipelineError("this evaluation network was trained without labels: it has no class logits")
        return self.head(self.features(x))  # (B, num_classes)

    @property
    def kind(self) -> str:
        """`classifier` (trained on labels) or `contrastive` (trained without them)."""
        return "classifier" if self.head is not None else "contrastive"


def save_evalnet(model: EvalNet, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `evalnet.safetensors` + `evalnet.json` atomically; returns the weights path."""
    out_dir = Path(out_dir)
    weights = out_dir / f"{NAME}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    meta = {
        "arch": "EvalNet",
        "kind": model.kind,
        "kwargs": model.kwargs,
        "input_range": [0.0, 1.0],
        **(extra or {}),
    }
    write_json(out_dir / f"{NAME}.json", meta)
    return weights


def load_evalnet(weights_path: str | Path) -> tuple[EvalNet, dict[str, Any]]:
    """Rebuild the network from `<dir>/evalnet.safetensors` and the JSON beside it (eval mode)."""
    weights_path = Path(weights_path)
    meta_path = weights_path.with_suffix(".json")
    if not weights_path.exists():
        raise PipelineError(f"{weights_path}: no evaluation network (run `rcg evalnet` first)")
    meta = read_json(meta_path)
    if meta.get("arch") != "EvalNet" or "kwargs" not in meta:
        raise PipelineError(f"{meta_path}: not an EvalNet description (arch={meta.get('arch')!r})")
    model = EvalNet(**meta["kwargs"])
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{weights_path}: weights do not match {meta_path}: {e}") from None
    return model.eval().requires_grad_(False), meta


def prepare_input(x: torch.Tensor, in_channels: int, image_size: int) -> torch.Tensor:
    """Images in [0, 1] of any channel count and size -> what the classifier was trained on.

    RGB -> gray uses the channel mean (torch-fidelity hands grayscale as three equal channels, so
    this is exact for them); gray -> RGB repeats; other sizes are resized bilinearly (antialiased).
    """
    if x.shape[1] != in_channels:
        if in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, in_channels, -1, -1)
        else:
            raise ValueError(f"cannot map {x.shape[1]} channels to {in_channels}")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x


@torch.no_grad()
def classify(model: EvalNet, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted class per image (images float in [0, 1], [N, C, H, W]) -> int64 [N]."""
    device = next(model.parameters()).device
    preds = []
    for chunk in images.split(batch_size):
        x = prepare_input(
            chunk.to(device).float(), model.kwargs["in_channels"], model.kwargs["image_size"]
        )
        preds.append(model(x).argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def class_accuracy(
    preds: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> dict[str, Any]:
    """Share of samples classified as the class they were asked for: overall and per class."""
    hit = (preds == targets).float()
    per_class = {}
    for c, name in enumerate(class_names):
        mask = targets == c
        if mask.any():
            per_class[name] = float(hit[mask].mean())
    return {"overall": float(hit.mean()) if len(hit) else float("nan"), "per_class": per_class}


@torch.no_grad()
def val_accuracy(model: EvalNet, data_cfg: Any, classes: list[str], device: torch.device) -> dict[str, Any]:
    """Top-1 accuracy on every labelled val sample (split across ranks, counts summed)."""
    import torch.distributed as dist

    from rcg.data.loader import make_loader

    model.eval()
    preds, targets = [], []
    for batch in make_loader(data_cfg, "val", "once", batch_size=500):
        keep = batch["label"] >= 0
        if keep.any():
            preds.append(model(batch["image"][keep].to(device)).argmax(1).cpu())
            targets.append(batch["label"][keep])
    p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if dist.is_initialized():  # per-class hit and total counts from every rank
        counts = torch.zeros(2, len(classes), dtype=torch.float64)
        counts[0].index_add_(0, t, (p == t).double())
        counts[1].index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
        dist.all_reduce(counts)
        per_class = {c: float(counts[0, i] / counts[1, i]) for i, c in enumerate(classes) if counts[1, i]}
        return {"overall": float(counts[0].sum() / counts[1].sum()), "per_class": per_class}
    if len(t) == 0:
        raise PipelineError(f"{data_cfg.shards_dir}/val: no labelled val samples to test the classifier on")
    return class_accuracy(p, t, classes)


def train_evalnet(ec: Any, data_cfg: Any, num_classes: int, n_train: int, resume_id: str, info: Any,
                  tracker: Any = None) -> tuple[EvalNet, dict[str, Any]]:
    """Train the classifier on the labelled train split through the shared loop: AdamW, warm-up then
    a half cosine, resumable (`resume_id`: what a checkpoint must match), runnable under torchrun.
    `ec` is the evalnet config block; returns the trained network and the loop's summary."""
    from rcg.data.loader import make_loader
    from rcg.training import LoopSpec, adamw, fit, seed_everything

    total = max(1, math.ceil(ec.epochs * n_train / (ec.batch_size * info.world_size)))
    seed_everything(ec.seed, info.rank)
    model = EvalNet(in_channels=data_cfg.channels, image_size=data_cfg.image_size, num_classes=num_classes,
                    width=ec.width, feature_dim=ec.feature_dim).to(info.device)
    opt = adamw(model.parameters(), ec.lr, weight_decay=ec.weight_decay, device=info.device)
    spec = LoopSpec(
        name="evalnet", steps=total, lr=ec.lr, warmup_steps=min(100, total // 10), decay="cosine", amp=False,
        batch_size=ec.batch_size * info.world_size, log_every=ec.log_every, ckpt_every=ec.ckpt_every,
        config_key="evalnet", checkpoint_dir=ec.checkpoint_dir, fingerprint=resume_id,
    )

    def labelled(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = batch["label"] >= 0  # unlabelled samples cannot teach a classifier
        return batch["image"][keep].to(info.device), batch["label"][keep].to(info.device)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(make_loader(data_cfg, "train", "train", ec.batch_size, seed=ec.seed, skip_batches=start))
        return (labelled(b) for b in batches)

    def loss(net: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return F.cross_entropy(net(b[0]), b[1], label_smoothing=ec.label_smoothing)

    log.info("evalnet: %d params, %d steps of %d (%.2f epochs of %d images)",
             sum(p.numel() for p in model.parameters()), total, ec.batch_size, ec.epochs, n_train)
    trained = fit(spec, model, opt, loss, data, info, tracker)
    return trained.model, trained.summary


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, against the other 2B - 2
    views of the batch as negatives (cosine similarity / temperature, cross-entropy)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))  # an image's view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class Contrastive(nn.Module):
    """EvalNet plus SimCLR's projection head (discarded after training, as in SimCLR)."""

    def __init__(self, net: EvalNet, proj_dim: int = 64) -> None:
        super().__init__()
        d = net.kwargs["feature_dim"]
        self.net = net
        self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net.features(x))  # (B, proj_dim)


def train_contrastive(ec: Any, data_cfg: Any, n_train: int, resume_id: str, info: Any,
                      tracker: Any = None) -> tuple[EvalNet, dict[str, Any]]:
    """Train EvalNet without labels by SimCLR on the train split (module docstring), through the
    shared loop with the classifier's schedule; returns the network (no head) and the summary."""
    from rcg.data.loader import make_loader
    from rcg.encoders.augment import augment, two_view_recipes
    from rcg.training import LoopSpec, adamw, fit, seed_everything

    total = max(1, math.ceil(ec.epochs * n_train / (ec.batch_size * info.world_size)))
    seed_everything(ec.seed, info.rank)
    net = EvalNet(in_channels=data_cfg.channels, image_size=data_cfg.image_size, num_classes=0,
                  width=ec.width, feature_dim=ec.feature_dim)
    model = Contrastive(net).to(info.device)
    opt = adamw(model.parameters(), ec.lr, weight_decay=ec.weight_decay, device=info.device)
    spec = LoopSpec(
        name="evalnet (contrastive)", steps=total, lr=ec.lr, warmup_steps=min(100, total // 10), decay="cosine",
        amp=False, batch_size=ec.batch_size * info.world_size, log_every=ec.log_every, ckpt_every=ec.ckpt_every,
        config_key="evalnet", checkpoint_dir=ec.checkpoint_dir, fingerprint=resume_id,
    )
    # SimCLR's views: strong crops and colour changes; the CNN sees them at the data's own size.
    v1, v2 = two_view_recipes(ec.ssl_crop_min_scale, 0.5, 0.1, 0.4, blur_sigma=(0.1, 1.0))
    size = data_cfg.image_size

    def views(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].to(info.device)
        return augment(x, size, v1), augment(x, size, v2)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(make_loader(data_cfg, "train", "train", ec.batch_size, seed=ec.seed, skip_batches=start))
        return (views(b) for b in batches)

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return nt_xent(m(b[0]), m(b[1]), ec.ssl_temperature)

    log.info("evalnet (contrastive, no labels): %d steps of %d images", total, ec.batch_size)
    trained = fit(spec, model, opt, loss, data, info, tracker)
    return trained.model.net, trained.summary
