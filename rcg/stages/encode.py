"""`rcg encode`: every sample and its horizontal flip -> representation, cached in Parquet.

The reference recomputes the frozen encoder on every training step; here, as in the author's later
MAR (`main_cache.py`), it runs once: data/features/{train,val}.parquet hold one row per sample and
view (`orig`, `flip`), checked against the shard manifest so that every sample appears exactly once
per view. data/features/summary.json describes the train representations: Wang & Isola's
uniformity (paper section 4.1.2 / REFERENCE.md section 10) and the Frechet-distance noise floor
between two random halves, computed with torch-fidelity's own Frechet functions.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from rcg.config import Config
from rcg.data.loader import make_loader, read_manifest
from rcg.encoders.vit import RepEncoder, load_encoder
from rcg.features import VIEWS, to_table, write_features
from rcg.io import PipelineError, get_logger, write_json
from rcg.tracking import stage_run
from rcg.training import cleanup_distributed, setup_distributed

log = get_logger(__name__)

SPLITS = ("train", "val")


@torch.inference_mode()
def encode_split(
    encoder: RepEncoder, cfg: Config, split: str, device: torch.device, progress: bool = True
) -> pa.Table:
    """Representations of every sample of `split` this rank reads, both views, as one table."""
    loader = make_loader(cfg.data, split, "once", batch_size=cfg.encode.batch_size,
                         num_workers=cfg.encode.num_workers)
    tables = []
    for batch in tqdm(loader, desc=f"encode {split}", unit="batch", disable=not progress):
        x = batch["image"].to(device, non_blocking=True)
        reps = encoder(torch.cat([x, x.flip(-1)]))  # (2B, D): both views in one forward
        n = len(x)
        labels = [int(v) if v >= 0 else None for v in batch["label"].tolist()]
        tables.append(
            to_table(batch["key"] * 2, labels * 2, [VIEWS[0]] * n + [VIEWS[1]] * n, reps.float().cpu().numpy())
        )
    if not tables:
        return to_table([], [], [], np.zeros((0, encoder.rep_dim), np.float32))
    return pa.concat_tables(tables).combine_chunks()


def check_exactly_once(table: pa.Table, expected: int, split: str) -> None:
    """Every sample of the manifest's split appears exactly once in each view: no duplicate, none missing."""
    keys = table["key"].to_pylist()
    views = table["view"].to_pylist()
    problems = []
    for view in VIEWS:
        counts = collections.Counter(k for k, v in zip(keys, views) if v == view)
        dupes = [k for k, c in counts.items() if c > 1]
        if dupes:
            problems.append(f"{len(dupes)} duplicate keys in view {view!r} (e.g. {', '.join(dupes[:5])})")
        if len(counts) != expected:
            problems.append(f"view {view!r} has {len(counts)} distinct samples, manifest says {expected}")
    if set(views) - set(VIEWS):
        problems.append(f"unknown views {sorted(set(views) - set(VIEWS))}")
    orig = {k for k, v in zip(keys, views) if v == "orig"}
    flip = {k for k, v in zip(keys, views) if v == "flip"}
    if orig != flip:
        problems.append(f"{len(orig ^ flip)} keys lack one of the two views")
    if problems:
        raise PipelineError(f"features for split {split!r} do not match the shard manifest: " + "; ".join(problems))


def canonical_order(table: pa.Table) -> pa.Table:
    """Rows by key, `orig` before `flip`. Loader workers and DDP ranks each interleave batches in
    their own way; sorted, the file is the same however many of them read the shards."""
    return table.sort_by([("key", "ascending"), ("view", "descending")])


def write_split(table: pa.Table, expected: int, split: str, path: Path) -> pa.Table:
    """Check a split's table against the manifest count and write it in canonical order; returns
    the table as written."""
    check_exactly_once(table, expected, split)
    table = canonical_order(table)
    write_features(path, [table])
    return table


def uniformity(reps: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020) uniformity loss log E[exp(-t ||x - y||^2)] over distinct pairs of L2-normalised reps."""
    z = torch.nn.functional.normalize(reps.double(), dim=1)
    n = len(z)
    if n < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, 2048):
        sq = torch.cdist(z[i : i + 2048], z).pow(2)  # (chunk, n)
        e = torch.exp(-t * sq)
        rows = torch.arange(i, min(i + 2048, n))
        e[rows - i, rows] = 0.0  # exclude self-pairs
        total += e.sum()
    return float(torch.log(total / (n * (n - 1))))


def frechet_noise_floor(reps: torch.Tensor, seed: int = 0) -> float:
    """Frechet distance between two random halves of `reps` (torch-fidelity's own formulas)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(reps), generator=g)
    half = len(reps) // 2
    a = fid_features_to_statistics(reps[perm[:half]].double())
    b = fid_features_to_statistics(reps[perm[half : 2 * half]].double())
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def summarize(train: pa.Table, counts: dict[str, dict[str, int]], uniformity_samples: int) -> dict[str, Any]:
    """summary.json: counts, uniformity and the Frechet noise floor of the train `orig` reps."""
    orig = train.filter(pa.compute.equal(train["view"], "orig"))
    col = orig["rep"].combine_chunks()
    reps = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(len(orig), col.type.list_size).copy())
    g = torch.Generator().manual_seed(0)
    sub = reps[torch.randperm(len(reps), generator=g)[:uniformity_samples]] if len(reps) else reps
    return {
        "count": sum(c["rows"] for c in counts.values()),
        "splits": counts,
        "rep_dim": int(col.type.list_size),
        "uniformity": uniformity(sub) if len(sub) > 1 else None,
        "uniformity_samples": len(sub),
        "fd_noise_floor": frechet_noise_floor(reps) if len(reps) >= 4 else None,
        "rep_mean_norm": float(reps.norm(dim=1).mean()) if len(reps) else None,
    }


def _gather_parts(table: pa.Table, out_dir: Path, split: str, rank: int, world: int) -> pa.Table | None:
    """Under torchrun each rank encodes its shards; rank 0 collects the parts through the file system."""
    part = out_dir / f".{split}.part{rank}.parquet"
    pq.write_table(table, part)
    dist.barrier()
    if rank != 0:
        return None
    paths = [out_dir / f".{split}.part{r}.parquet" for r in range(world)]
    merged = pa.concat_tables([pq.read_table(p) for p in paths]).combine_chunks()
    for p in paths:
        p.unlink()
    return merged


def run(cfg: Config, **options: Any) -> None:
    """Encode train and val shards to Parquet and write summary.json."""
    del options
    info = setup_distributed()
    out_dir = Path(cfg.encode.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(cfg.data.shards_dir)
        encoder = load_encoder(cfg.encoder.out_dir, info.device)
        with stage_run(cfg, "encode", rank=info.rank) as tracker:
            counts: dict[str, dict[str, int]] = {}
            train_table = None
            for split in SPLITS:
                expected = int(manifest.get("splits", {}).get(split, {}).get("written", 0))
                t0 = time.perf_counter()
                if expected:
                    table = encode_split(encoder, cfg, split, info.device, progress=info.is_main)
                else:
                    log.info("split %s has no samples in the manifest; writing an empty file", split)
                    table = to_table([], [], [], np.zeros((0, encoder.rep_dim), np.float32))
                if info.distributed:
                    table = _gather_parts(table, out_dir, split, info.rank, info.world_size)
                    if table is None:
                        continue
                path = out_dir / f"{split}.parquet"
                table = write_split(table, expected, split, path)
                secs = time.perf_counter() - t0
                counts[split] = {"samples": expected, "rows": table.num_rows}
                log.info("%s: %d samples x 2 views -> %s (%.1fs, %.0f images/s)", split, expected, path,
                         secs, expected / max(secs, 1e-9))
                tracker.log_metrics({f"{split}_rows": table.num_rows, f"{split}_images_per_s": expected / max(secs, 1e-9)})
                if split == "train":
                    train_table = table
            if info.is_main:
                assert train_table is not None
                summary = summarize(train_table, counts, cfg.encode.uniformity_samples)
                write_json(out_dir / "summary.json", summary)
                tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
                tracker.log_artifact(out_dir / "summary.json")
                log.info("summary: uniformity %s, fd_noise_floor %s -> %s", summary["uniformity"],
                         summary["fd_noise_floor"], out_dir / "summary.json")
    finally:
        cleanup_distributed()
