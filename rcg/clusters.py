"""k-means cluster labels of the train representations: paper Table 9a's fourth condition.

Table 9a conditions MAGE-B on k-means cluster labels of MoCo v3 representations (FID 6.60, worse
than real labels' 5.83 and RDM representations' 5.07). Here the `cluster` generator is the label
baseline's network with the cluster id in the class label's place (`num_classes = k`).

The clustering is deterministic: k-means++ seeding (Arthur & Vassilvitskii 2007) from a seeded
generator, then Lloyd iterations in float64 up to a fixed count (stopping early only at a fixed
point, where further iterations would change nothing). It runs on the original view of every train
image (rcg.features), so an image and its flip share one id, as they share a class label.

Saved beside the generator (`save_clusters`): `clusters.safetensors` (centroids [k, D] and the
assignment of every train image, in the order of the original-view rows of train.parquet) and
`clusters.json` (k and how it was chosen, the per-cluster counts evaluate draws ids with, and, when
the images are labelled, each cluster's majority class and the clusters' purity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcg.features import read_features
from rcg.io import PipelineError, atomic_path, file_digest, read_json, write_json

WEIGHTS, META = "clusters.safetensors", "clusters.json"
_CHUNK = 65536  # rows per distance block: bounds memory at ImageNet scale (1.28M x 1000 clusters)


def default_k(num_classes: int, n: int) -> int:
    """k for `train_generator.clusters: 0`: the number of classes when the images are labelled (the
    label baseline's count, as Table 9a compares them), else round(sqrt(n / 100)), at least 2: more
    clusters as the data grow, while each keeps on average sqrt(100 n) >= 100 images to learn its
    embedding from (60k images: 24 clusters; ImageNet's 1.28M: 113)."""
    if num_classes > 1:
        return num_classes
    return max(2, round(math.sqrt(n / 100)))


def _nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """(index of the nearest centroid [N], squared distance to it [N]), in blocks of rows."""
    c2 = (centroids * centroids).sum(1)
    idx, dist = [], []
    for chunk in x.split(_CHUNK):
        c = chunk.to(centroids.dtype)
        d = (c * c).sum(1, keepdim=True) - 2 * c @ centroids.t() + c2  # (b, k)
        m = d.min(dim=1)
        idx.append(m.indices)
        dist.append(m.values.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability proportional to
    the squared distance to the nearest centre so far; float64 [k, D]."""
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=g)].double()
    _, d2 = _nearest(x, centres)
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)  # all points equal: any will do
        pick = torch.multinomial(weights.cpu(), 1, generator=g).to(x.device)
        centres = torch.cat([centres, x[pick].double()])
        _, d_new = _nearest(x, centres[-1:])
        d2 = torch.minimum(d2, d_new)
    return centres


def lloyd(x: Tensor, centres: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations from `centres` [k, D] (float64), at most `iters`, stopping at a fixed point:
    (centres, assignment [N], squared distances [N]). A cluster left empty takes the point farthest
    from its centroid, so no cluster is lost while the data have points to give it."""
    k = centres.shape[0]
    assign, d2 = _nearest(x, centres)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x.double())
        for c in torch.nonzero(counts == 0).flatten().tolist():  # re-seed empty clusters, one at a time
            far = int(d2.argmax())
            sums[c], counts[c], d2[far] = x[far].double(), 1, 0.0
        centres = sums / counts[:, None].double()
        new, d2 = _nearest(x, centres)
        if torch.equal(new, assign):
            break  # a fixed point: more iterations would change nothing
        assign = new
    return centres, assign, d2


def kmeans(x: Tensor, k: int, iters: int, seed: int) -> tuple[Tensor, Tensor, float]:
    """Deterministic k-means of rows [N, D]: k-means++ seeding from `seed`, then `lloyd`; returns
    (centroids float32 [k, D], assignment int64 [N], mean squared distance to the assigned centroid)."""
    if not 1 <= k <= x.shape[0]:
        raise PipelineError(f"k-means: {k} clusters for {x.shape[0]} points (train_generator.clusters)")
    centres, assign, d2 = lloyd(x, kmeans_pp(x, k, torch.Generator().manual_seed(seed)), iters)
    return centres.float(), assign, float(d2.mean())


@dataclass
class Clusters:
    """A fitted clustering of the train images (module docstring)."""

    centroids: Tensor  # float32 [k, D]
    keys: list[str]  # train sample keys, one per image
    assignment: Tensor  # int64 [N]: the cluster of keys[i]
    meta: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def ids(self, keys: list[str]) -> Tensor:
        """The cluster ids [B] of train samples by key; a PipelineError names an unknown key."""
        if not self._index:
            self._index = {key: i for i, key in enumerate(self.keys)}
        try:
            return self.assignment[torch.as_tensor([self._index[key] for key in keys], dtype=torch.long)]
        except KeyError as e:
            raise PipelineError(f"no cluster for train sample {e.args[0]} (rerun `rcg encode`)") from None


def label_summary(assignment: Tensor, labels: Tensor, k: int) -> dict[str, Any]:
    """Each cluster's majority class (ties: the lower class; None for an empty cluster) and the
    clusters' purity: the share of images whose class is their cluster's majority class."""
    num_classes = int(labels.max()) + 1
    table = torch.zeros(k, num_classes, dtype=torch.long)
    table.index_put_((assignment, labels), torch.ones_like(labels), accumulate=True)
    majority = [int(row.argmax()) if int(row.sum()) else None for row in table]
    return {"majority_class": majority, "purity": float(table.max(dim=1).values.sum()) / max(1, len(labels))}


def fit_clusters(train_features: str | Path, k: int, iters: int, seed: int,
                 device: torch.device | str = "cpu") -> Clusters:
    """k-means of the original view of every train image in `train_features` (k = 0: `default_k`),
    with the facts `clusters.json` records."""
    feats = read_features(train_features, view="orig")
    if len(feats) < 2:
        raise PipelineError(f"{train_features}: {len(feats)} train representations; k-means needs at least 2")
    labelled = feats.labelled
    num_classes = int(feats.labels.max()) + 1 if labelled else 0
    chosen = k or default_k(num_classes, len(feats))
    centroids, assign, inertia = kmeans(feats.reps.to(device), chosen, iters, seed)
    assign = assign.cpu()
    meta: dict[str, Any] = {
        "k": chosen, "k_rule": "train_generator.clusters" if k else
        ("the number of classes" if num_classes > 1 else "round(sqrt(n / 100)), at least 2"),
        "iters": iters, "seed": seed, "n": len(feats), "mean_sq_distance": inertia,
        "counts": torch.bincount(assign, minlength=chosen).tolist(),
        "features": str(train_features), "features_digest": file_digest(train_features),
        "majority_class": None, "purity": None,
    }
    if labelled:
        meta.update(label_summary(assign, feats.labels, chosen))
    return Clusters(centroids.cpu(), list(feats.keys), assign, meta)


def save_clusters(clusters: Clusters, out_dir: str | Path) -> None:
    """Write `clusters.safetensors` (centroids, assignment) and `clusters.json` (the meta) to `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"centroids": clusters.centroids.contiguous(), "assignment": clusters.assignment.contiguous()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "rcg-clusters"})
    write_json(out / META, clusters.meta)


def read_cluster_meta(model_dir: str | Path) -> dict[str, Any]:
    """`clusters.json` of a `cluster` generator folder; a PipelineError names a missing file."""
    path = Path(model_dir) / META
    if not path.exists():
        raise PipelineError(f"{path}: no cluster record (run `rcg train-generator --condition cluster`)")
    meta = read_json(path)
    if not meta.get("counts"):
        raise PipelineError(f"{path}: no per-cluster counts")
    return meta
