"""k-nearest-neighbour accuracy of representations: the check that they carry the semantics.

The standard SSL protocol (Wu et al. 2018, used by DINO): cosine similarity on L2-normalised
features, the k most similar training samples vote for their class with weight exp(sim / T).
`knn_report` applies it to the encoder's 256-d representation (the one RCG conditions on), to its
backbone's CLS feature, to a random initialisation of the same network and to raw pixels, so the
number says what pretraining added. Labels are used only here, never for training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from rcg.config import DataConfig
from rcg.encoders.moco import init_patch_embed
from rcg.encoders.vit import RepEncoder, build_vit, standardize
from rcg.io import PipelineError

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of weighted cosine kNN of `query` against `train` (features [N, D])."""
    if len(train) == 0 or len(query) == 0:
        raise ValueError("kNN needs at least one training and one query sample")
    train = F.normalize(train.float().flatten(1), dim=1)
    query = F.normalize(query.float().flatten(1), dim=1)
    n_classes = int(max(train_labels.max(), query_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for i in range(0, len(query), chunk):
        sim = query[i : i + chunk] @ train.t()  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), n_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[i : i + chunk]).sum())
    return correct / len(query)



def labelled_images(data_cfg: DataConfig, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All images of a split as uint8 (exact for 8-bit sources) with labels; None if unlabelled.

    A capped sample (`limit`) comes from the shuffled stream, since shards may be in class order.
    A cap at or above the split's size reads the whole split once: the shuffled stream repeats
    forever, so it would hand over `limit` random crops of the same few images.
    """
    from rcg.data.loader import make_loader, read_manifest

    try:
        if limit and limit >= int(read_manifest(data_cfg.shards_dir)["splits"].get(split, {}).get("written", 0)):
            limit = 0
        loader = make_loader(data_cfg, split, "train" if limit else "once", batch_size=512)
        images, labels, n = [], [], 0
        for batch in loader:
            images.append((batch["image"] * 255).round().to(torch.uint8))
            labels.append(batch["label"])
            n += len(batch["label"])
            if limit and n >= limit:
                break
    except PipelineError as e:
        log.warning("kNN check skipped: %s", e)
        return None
    if not images:
        return None
    x, y = torch.cat(images), torch.cat(labels)
    if limit:
        x, y = x[:limit], y[:limit]
    if (y < 0).any():
        log.info("kNN check skipped: the %s split has unlabelled samples", split)
        return None
    return x, y


@torch.inference_mode()
def _reps(encoder: RepEncoder, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised representations and CLS features of uint8 images, in one pass."""
    reps, cls = [], []
    for i in range(0, len(images), batch):
        h = encoder.features(images[i : i + batch].float() / 255)  # (B, D) CLS after the final norm
        cls.append(h)
        reps.append(standardize(encoder.vit.head(h)))  # (B, rep_dim), as RepEncoder.forward
    return torch.cat(reps), torch.cat(cls)


def knn_report(encoder: RepEncoder, data_cfg: DataConfig, k: int = 20, max_train: int = 0,
               seed: int = 0) -> dict[str, Any]:
    """kNN top-1 of the encoder's representation, its CLS feature, a random init of it, and pixels.

    Every value is None (with a log line saying why) when the shards carry no labels.
    """
    train = labelled_images(data_cfg, "train", max_train)
    val = labelled_images(data_cfg, "val") if train is not None else None
    if train is None or val is None:
        return {"knn_top1": None, "knn_top1_random_init": None, "knn_top1_pixels": None,
                "knn_skipped": "the shards carry no class labels (or no val split)"}
    (xt, yt), (xv, yv) = train, val
    log.info("kNN check (k=%d) on %d train / %d val images", k, len(xt), len(xv))
    out: dict[str, Any] = {"knn_k": k, "knn_train_samples": len(xt), "knn_val_samples": len(xv)}
    (rt, ct), (rv, cv) = _reps(encoder, xt), _reps(encoder, xv)
    out["knn_top1"] = knn_top1(rt, yt, rv, yv, k=k)
    out["knn_top1_cls"] = knn_top1(ct, yt, cv, yv, k=k)  # the backbone feature, before the projector
    torch.manual_seed(seed)
    random_init = build_vit(encoder.spec)
    if encoder.spec.head == "mocov3":
        init_patch_embed(random_init, freeze=False)
    rnd = RepEncoder(encoder.spec, random_init)
    out["knn_top1_random_init"] = knn_top1(_reps(rnd, xt)[0], yt, _reps(rnd, xv)[0], yv, k=k)
    out["knn_top1_pixels"] = knn_top1(xt.float() / 255, yt, xv.float() / 255, yv, k=k)
    log.info("kNN top-1: encoder %.4f (CLS %.4f), random init %.4f, pixels %.4f", out["knn_top1"],
             out["knn_top1_cls"], out["knn_top1_random_init"], out["knn_top1_pixels"])
    return out
