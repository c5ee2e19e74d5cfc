"""The domain classifier that scores generated images when Inception weights are unavailable.

docs/design.md, "The embedded default": no Inception weights can be downloaded here, so the default
pipeline trains a small CNN on the labelled train split and uses its penultimate features the way
FID uses Inception's pool features (Heusel et al. 2017), and its softmax the way IS uses Inception's
(Salimans et al. 2016). Its Frechet distance is named `fd` under extractor `evalnet`, never FID.
It also measures class-conditional quality: how often a sample asked to be class c is classified c.

Artifacts: `<dir>/evalnet.safetensors` (weights) + `<dir>/evalnet.json` (architecture kwargs,
preprocessing, class names, test accuracy), as for every model of the pipeline.
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
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5  # [0, 1] -> [-1, 1]            (B, C, S, S)
        h = self.body(x)  # (B, 2w, S/4, S/4)
        return self.fc(h)  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


def save_evalnet(model: EvalNet, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `evalnet.safetensors` + `evalnet.json` atomically; returns the weights path."""
    out_dir = Path(out_dir)
    weights = out_dir / f"{NAME}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    meta = {
        "arch": "EvalNet",
        "kwargs": model.kwargs,
        "input_range": [0.0, 1.0],
        **(extra or {}),
    }
    write_json(out_dir / f"{NAME}.json", meta)
    return weights


def load_evalnet(weights_path: str | Path) -> tuple[EvalNet, dict[str, Any]]:
    """Rebuild the classifier from `<dir>/evalnet.safetensors` and the JSON beside it (eval mode)."""
    weights_path = Path(weights_path)
    meta_path = weights_path.with_suffix(".json")
    if not weights_path.exists():
        raise PipelineError(f"{weights_path}: no evaluation classifier (run `rcg evalnet` first)")
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
    from rcg.training import LoopSpec, fit, seed_everything

    total = max(1, math.ceil(ec.epochs * n_train / (ec.batch_size * info.world_size)))
    seed_everything(ec.seed, info.rank)
    model = EvalNet(in_channels=data_cfg.channels, image_size=data_cfg.image_size, num_classes=num_classes,
                    width=ec.width, feature_dim=ec.feature_dim).to(info.device)
    opt = torch.optim.AdamW(model.parameters(), lr=ec.lr, weight_decay=ec.weight_decay)
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
