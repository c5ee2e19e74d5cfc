"""`rcg shard`: an image source -> WebDataset shards + manifest.json (DESIGN.md, stage `shard`)."""

from __future__ import annotations

from rcg.config import Config
from rcg.data import sources
from rcg.data.shards import write_shards
from rcg.io import get_logger
from rcg.tracking import stage_run

log = get_logger(__name__)


def run(cfg: Config) -> None:
    c = cfg.shard
    if c.source == "fashion_mnist":
        source = sources.fashion_mnist(c.fashion_mnist_dir, c.max_per_split)
    else:
        source = sources.image_folder(c.folder, c.val_fraction, c.max_per_split)
    counts = {s: len(items) for s, items in source.splits.items()}
    log.info("source %s: %s candidate files, fingerprint %s", source.description, counts, source.fingerprint)
    with stage_run(cfg, "shard") as tracker:
        manifest = write_shards(source, c.out_dir, c.shard_size, c.min_size, c.workers, c.verify)
        tracker.log_metrics(
            {f"{s}_{k}": v[k] for s, v in manifest["splits"].items() for k in ("written", "skipped")}
        )
        tracker.log_artifact(f"{c.out_dir}/manifest.json")
    log.info("wrote %s/manifest.json", c.out_dir)
