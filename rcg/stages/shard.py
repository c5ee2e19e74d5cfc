"""`rcg shard`: an image source -> WebDataset shards + manifest.json (docs/design.md, stage `shard`)."""

from __future__ import annotations

import logging

from rcg.config import Config
from rcg.data import sources
from rcg.data.shards import write_shards
from rcg.io import PipelineError
from rcg.tracking import stage_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> None:
    c = cfg.shard
    if c.source == "fashion_mnist":
        source = sources.fashion_mnist(c.fashion_mnist_dir, c.max_per_split)
    else:
        if not c.folder.strip():  # an empty path would mean the working folder: never what is meant
            raise PipelineError("shard.folder is empty: set it to the image folder to shard (source: folder)")
        source = sources.image_folder(c.folder, c.val_fraction, c.max_per_split, c.val_min_count)
    counts = {s: len(items) for s, items in source.splits.items()}
    log.info("source %s: %s candidate files, fingerprint %s, val split %s",
             source.description, counts, source.fingerprint, source.val_split)
    with stage_run(cfg, "shard") as tracker:
        manifest = write_shards(
            source, cfg.data.shards_dir, c.shard_size, c.min_size, c.workers, c.verify, c.max_file_bytes, c.max_pixels
        )
        tracker.log_metrics(
            {f"{s}_{k}": v[k] for s, v in manifest["splits"].items() for k in ("written", "skipped")}
        )
        tracker.log_artifact(f"{cfg.data.shards_dir}/manifest.json")
    log.info("wrote %s/manifest.json", cfg.data.shards_dir)
