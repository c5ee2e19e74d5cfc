"""Classification Accuracy Score (Ravuri & Vinyals 2019): how well generated class-conditional
images stand in for real ones as training data.

A classifier of the evaluation network's architecture (rcg.metrics.evalnet, built from the kwargs
in evalnet.json) is trained from scratch on a class-conditional mode's generated images, each
labelled with the class it was asked for (for `cluster`: its cluster's majority class of train
labels, rcg.metrics.evaluation.cluster_targets), then tested on every labelled image of the real val
split. FD rewards images that look right; CAS also asks that they carry their class, with the
variety a classifier needs to generalise from them. Beside it: the same training on as many real
train images (the score a perfect generator would get at this budget) and the evaluation network's
own test accuracy (real data, its longer training).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rcg.config import DataConfig, EvaluateConfig
from rcg.io import PipelineError
from rcg.metrics.evalnet import EvalNet, load_evalnet, val_accuracy

log = logging.getLogger(__name__)

WEIGHT_DECAY = 1e-4  # the evaluation classifier's own (evalnet.weight_decay)


def train_classifier(images: Tensor, labels: Tensor, arch: dict[str, Any], *, steps: int, batch_size: int,
                     lr: float, seed: int, device: torch.device | str = "cpu", name: str = "CAS") -> EvalNet:
    """An EvalNet of `arch` trained on uint8 images [N, C, H, W] with class labels [N] through the
    shared loop (rcg.training.fit): AdamW, half-cosine lr decay, batches drawn with replacement from
    `seed` (its init too), fp32; eval mode. A throw-away model: its checkpoint goes to a temporary
    folder, so nothing resumes it."""
    from rcg.training import DistInfo, LoopSpec, adamw, fit

    if len(images) != len(labels) or len(images) == 0:
        raise PipelineError(f"CAS: {len(images)} images for {len(labels)} labels")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the init from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        model = EvalNet(**arch).to(device)
    opt = adamw(model.parameters(), lr, weight_decay=WEIGHT_DECAY, device=device)
    g = torch.Generator().manual_seed(seed)

    def data(start: int) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            idx = torch.randint(len(images), (batch_size,), generator=g)
            yield images[idx].to(device).float() / 255.0, labels[idx].to(device)

    def loss(net: torch.nn.Module, batch: tuple[Tensor, Tensor], step: int) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1])

    with tempfile.TemporaryDirectory(prefix="rcg-cas-") as tmp:
        spec = LoopSpec(name=name, steps=steps, lr=lr, checkpoint_dir=tmp, fingerprint=f"cas/{seed}",
                        batch_size=batch_size, decay="cosine", amp=False, log_every=steps, ckpt_every=steps,
                        config_key="evaluate")
        trained = fit(spec, model, opt, loss, data, DistInfo(0, 1, 0, device), generators={"cas": g})
    return trained.model.eval()


def real_train_set(data: DataConfig, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` labelled train images (shard order) as uint8 [n, C, H, W] and their labels."""
    from rcg.data.loader import make_loader

    images, labels, have = [], [], 0
    for batch in make_loader(data, "train", "once", batch_size=500):
        keep = batch["label"] >= 0
        x = (batch["image"][keep] * 255).round().clamp(0, 255).to(torch.uint8)[: n - have]
        images.append(x)
        labels.append(batch["label"][keep][: len(x)])
        have += len(x)
        if have >= n:
            break
    if have == 0:
        raise PipelineError(f"{data.shards_dir}/train: no labelled images for CAS's real-data baseline")
    return torch.cat(images), torch.cat(labels)


def cas_table(sets: dict[str, tuple[Tensor, Tensor]], ev: EvaluateConfig, data: DataConfig,
              evalnet_weights: str | Path, classes: list[str]) -> dict[str, Any]:
    """CAS of each mode's (images, classes) in `sets`, tested on the real val split, beside the same
    training on real train images and the evaluation network's test accuracy (module docstring)."""
    from rcg.generation import default_device

    _, meta = load_evalnet(evalnet_weights)
    arch = {**meta["kwargs"], "num_classes": len(classes)}
    device = default_device()
    t0 = time.perf_counter()

    def score(images: Tensor, labels: Tensor, name: str) -> float:
        model = train_classifier(images, labels, arch, steps=ev.cas_steps, batch_size=ev.cas_batch_size,
                                 lr=ev.cas_lr, seed=ev.seed, device=device, name=f"CAS ({name})")
        return float(val_accuracy(model, data, classes, device)["overall"])

    modes = {mode: score(x, y, mode) for mode, (x, y) in sets.items()}
    n = max(len(x) for x, _ in sets.values())
    real = score(*real_train_set(data, n), "real")
    table = {"images": n, "steps": ev.cas_steps, "batch_size": ev.cas_batch_size, "test": f"{data.shards_dir}/val",
             "modes": modes, "real_same_budget": real, "real_evalnet": meta.get("test_accuracy"),
             "seconds": round(time.perf_counter() - t0, 1)}
    log.info("CAS (%d images, %d steps): %s; real images %.4f, evalnet %s", n, ev.cas_steps,
             {m: round(a, 4) for m, a in modes.items()}, real, table["real_evalnet"])
    return table
