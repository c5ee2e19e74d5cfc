"""`rcg encode`: every sample and its horizontal flip -> representation, cached in Parquet.

The reference recomputes the frozen encoder on every training step; here, as in the author's later
MAR, it runs once: data/features/{train,val}.parquet hold one row per sample and view (`orig`,
`flip`), checked against the shard manifest so that every sample appears exactly once per view
(rcg.features). data/features/summary.json describes the train representations
(rcg.metrics.representations: uniformity and the Frechet noise floor).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from rcg.config import Config
from rcg.data.loader import read_manifest
from rcg.encoders.vit import load_encoder
from rcg.features import encode_split, to_table, write_split
from rcg.io import atomic_dir, write_json
from rcg.metrics.representations import summarize
from rcg.tracking import stage_run
from rcg.training import cleanup_distributed, setup_distributed

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def _gather_parts(table: pa.Table, out_dir: Path, split: str, rank: int, world: int) -> pa.Table | None:
    """Under torchrun each rank encodes its shards; rank 0 collects the parts through the file system."""
    part = out_dir / f".{split}.part{rank}.parquet"
    out_dir.mkdir(parents=True, exist_ok=True)
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
    info = setup_distributed(cfg.dist.tf32)
    out_dir = Path(cfg.encode.out_dir)
    try:
        manifest = read_manifest(cfg.data.shards_dir)
        encoder = load_encoder(cfg.encoder.out_dir, info.device)
        # Both splits and the summary are one set: written beside out_dir, swapped in at the end.
        with stage_run(cfg, "encode", rank=info.rank) as tracker, atomic_dir(out_dir, enabled=info.is_main) as tmp:
            counts: dict[str, dict[str, int]] = {}
            tables: dict[str, pa.Table] = {}
            for split in SPLITS:
                expected = int(manifest.get("splits", {}).get(split, {}).get("written", 0))
                t0 = time.perf_counter()
                if expected:
                    table = encode_split(encoder, cfg.data, split, info.device, cfg.encode.batch_size,
                                         cfg.encode.num_workers, progress=info.is_main)
                else:
                    log.info("split %s has no samples in the manifest; writing an empty file", split)
                    table = to_table([], [], [], np.zeros((0, encoder.rep_dim), np.float32))
                if info.distributed:
                    table = _gather_parts(table, out_dir, split, info.rank, info.world_size)
                    if table is None:
                        continue
                tables[split] = write_split(table, expected, split, tmp / f"{split}.parquet")
                rate = expected / max(time.perf_counter() - t0, 1e-9)
                counts[split] = {"samples": expected, "rows": tables[split].num_rows}
                log.info("%s: %d samples x 2 views -> %s (%.0f images/s)", split, expected,
                         out_dir / f"{split}.parquet", rate)
                tracker.log_metrics({f"{split}_rows": tables[split].num_rows, f"{split}_images_per_s": rate})
            if info.is_main:
                summary = summarize(tables["train"], counts, cfg.encode.uniformity_samples)
                write_json(tmp / "summary.json", summary)
                tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
                tracker.log_artifact(tmp / "summary.json")
                log.info("summary: uniformity %s, fd_noise_floor %s -> %s", summary["uniformity"],
                         summary["fd_noise_floor"], out_dir / "summary.json")
    finally:
        cleanup_distributed()
