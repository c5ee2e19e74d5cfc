"""Writing a source to WebDataset shards plus a manifest (DESIGN.md, stage `shard`).

Layout: `<out>/<split>/<split>-%06d.tar` and `<out>/manifest.json`. Samples carry `.png`/`.jpg`
(original bytes where possible) and `.cls` when labelled. Shard k holds the usable images among
input items [k * shard_size, (k + 1) * shard_size), so shards are written in parallel, one per
worker process, and a shard may hold fewer samples when some files were skipped. Every shard is written to a temporary
file and renamed, and the manifest is written last, so an interrupted run never leaves a set of
shards that looks complete; tar headers carry fixed owner and mtime, so the same input always gives
byte-identical shards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from rcg.data.images import Skip, prepare
from rcg.data.sources import Item, Source
from rcg.io import PipelineError, atomic_path, get_logger, write_json

log = get_logger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _ShardJob:
    """Input chunk `index` of a split: its usable items become `<split>-<index>.tar`."""

    split_dir: Path
    split: str
    index: int
    items: list[Item]
    min_size: int
    verify: str


@dataclass
class _ShardResult:
    name: str | None  # None when every item of the chunk was skipped (no shard written)
    written: int
    skipped: list[dict[str, str]]
    converted: list[dict[str, str]]


def _write_shard(job: _ShardJob) -> _ShardResult:
    """Prepare one chunk of items and write its shard (temp file, then rename).

    Shards are cut by *input* position, not by output count, so workers need no coordination: each
    writes its own shard, and the result is the same whatever the number of workers.
    """
    path = job.split_dir / f"{job.split}-{job.index:06d}.tar"
    skipped, converted, written = [], [], 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Fixed owner and mtime make the tar bytes depend on the samples only.
        writer = wds.TarWriter(f, user="rcg", group="rcg", mtime=0, encoder=False)
        try:
            for item in job.items:
                res = prepare(item, job.min_size, job.verify)
                if isinstance(res, Skip):
                    skipped.append({"path": res.path, "reason": res.reason})
                    continue
                sample = {"__key__": res.key, res.ext: res.data}
                if res.label is not None:
                    sample["cls"] = str(res.label).encode()
                writer.write(sample)
                written += 1
                if res.converted:
                    converted.append({"key": res.key, "reason": res.converted})
        finally:
            try:
                writer.close()
            except (OSError, ValueError):
                pass  # the original error (e.g. disk full) is the one to report
    if written == 0:
        path.unlink()
    return _ShardResult(path.name if written else None, written, skipped, converted)


def _write_split(
    split: str, items: list[Item], out_dir: Path, shard_size: int, min_size: int, workers: int,
    verify: str,
) -> dict[str, Any]:
    split_dir = out_dir / split
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"{split_dir}: cannot create output folder: {e}") from e
    jobs = [
        _ShardJob(split_dir, split, k, items[i : i + shard_size], min_size, verify)
        for k, i in enumerate(range(0, len(items), shard_size))
    ]
    results: list[_ShardResult] = []
    bar = tqdm(total=len(items), desc=f"shard {split}", unit="img", mininterval=1.0)
    try:
        if workers <= 1 or len(jobs) == 1:
            stream = map(_write_shard, jobs)
            for r in stream:
                results.append(r)
                bar.update(r.written + len(r.skipped))
        else:
            # fork keeps start-up cheap; imap keeps results in shard order.
            with mp.get_context("fork").Pool(workers) as pool:
                for r in pool.imap(_write_shard, jobs):
                    results.append(r)
                    bar.update(r.written + len(r.skipped))
    except OSError as e:
        raise PipelineError(f"{split_dir}: writing shards failed: {e}") from e
    finally:
        bar.close()
    # Remove shards a previous run left behind, so the folder holds exactly this run's shards.
    names = [r.name for r in results if r.name]
    for old in split_dir.glob(f"{split}-*.tar"):
        if old.name not in names:
            old.unlink()
    return {
        "written": sum(r.written for r in results),
        "skipped": sum(len(r.skipped) for r in results),
        "converted": sum(len(r.converted) for r in results),
        "shards": names,
        "_skipped": [s for r in results for s in r.skipped],
        "_converted": [c for r in results for c in r.converted],
    }


def write_shards(
    source: Source, out_dir: str | Path, shard_size: int, min_size: int, workers: int,
    verify: str = "structure",
) -> dict[str, Any]:
    """Shard every split of `source` into `out_dir` and write `manifest.json`; returns the manifest."""
    out_dir = Path(out_dir)
    if shard_size <= 0:
        raise PipelineError(f"shard.shard_size must be positive, got {shard_size}")
    manifest_path = out_dir / "manifest.json"
    # The old manifest goes first: while shards are being rewritten the folder is not "complete".
    manifest_path.unlink(missing_ok=True)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source.description,
        "fingerprint": source.fingerprint,
        "classes": source.classes,
        "labelled": bool(source.classes),
        "splits": {},
        "skipped": [],
        "converted": [],
    }
    workers = max(1, min(workers, os.cpu_count() or 1))
    for split, items in source.splits.items():
        info = _write_split(split, items, out_dir, shard_size, min_size, workers, verify)
        manifest["skipped"].extend({"split": split, **s} for s in info.pop("_skipped"))
        manifest["converted"].extend({"split": split, **c} for c in info.pop("_converted"))
        manifest["splits"][split] = info
        log.info("%s: %d written, %d skipped -> %s", split, info["written"], info["skipped"], out_dir / split)
    if sum(s["written"] for s in manifest["splits"].values()) == 0:
        raise PipelineError(f"{source.description}: no usable images (all {len(manifest['skipped'])} skipped)")
    if "train" not in manifest["splits"] or manifest["splits"]["train"]["written"] == 0:
        raise PipelineError(f"{source.description}: no usable training images")
    for s in manifest["skipped"][:20]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if len(manifest["skipped"]) > 20:
        log.warning("... and %d more skips (see %s)", len(manifest["skipped"]) - 20, manifest_path)
    write_json(manifest_path, manifest)
    return manifest
