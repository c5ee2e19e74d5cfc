"""Writing a source to WebDataset shards plus a manifest (DESIGN.md, stage `shard`).

Layout: `<out>/<split>/<split>-%06d.tar` and `<out>/manifest.json`. Samples carry `.png`/`.jpg`
(original bytes where possible) and `.cls` when labelled. Every shard is written to a temporary
file and renamed, and the manifest is written last, so an interrupted run never leaves a set of
shards that looks complete; tar headers carry fixed owner and mtime, so the same input always gives
byte-identical shards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from rcg.data.images import Prepared, Skip, prepare
from rcg.data.sources import Item, Source
from rcg.io import PipelineError, atomic_path, get_logger, write_json

log = get_logger(__name__)
FORMAT_VERSION = 1


def _prepared_stream(items: list[Item], min_size: int, workers: int) -> Iterator[Prepared | Skip]:
    """Prepare items in order; parallel (ordered imap) when it pays."""
    fn = partial(prepare, min_size=min_size)
    if workers <= 1 or len(items) < 256:
        yield from map(fn, items)
        return
    # fork keeps start-up cheap; ordered imap keeps the output deterministic.
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=64)


class _ShardSink:
    """Rolls samples into `<split>-%06d.tar` files of `shard_size`, each written via temp + rename."""

    def __init__(self, split_dir: Path, split: str, shard_size: int) -> None:
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.paths: list[Path] = []
        self._ctx: Any = None
        self._file: Any = None
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.shard_size:
            self.close()
            path = self.split_dir / f"{self.split}-{len(self.paths):06d}.tar"
            self.paths.append(path)
            self._ctx = atomic_path(path)
            self._file = open(self._ctx.__enter__(), "wb")
            # Fixed owner and mtime make the tar bytes depend on the samples only.
            self._writer = wds.TarWriter(self._file, user="rcg", group="rcg", mtime=0, encoder=False)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def close(self) -> None:
        """Finish the current shard and rename it into place."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._ctx.__exit__(None, None, None)
            self._writer = self._file = self._ctx = None

    def abort(self, exc: BaseException) -> None:
        """Drop the shard being written (its temp file is removed; no partial .tar appears)."""
        if self._ctx is not None:
            for close in (self._writer.close, self._file.close):
                try:
                    close()
                except (OSError, ValueError):
                    pass  # the disk may be full; the temp file is removed below either way
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            self._writer = self._file = self._ctx = None


def _write_split(
    split: str, items: list[Item], out_dir: Path, shard_size: int, min_size: int, workers: int
) -> dict[str, Any]:
    split_dir = out_dir / split
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"{split_dir}: cannot create output folder: {e}") from e
    written, skipped, converted = 0, [], []
    seen: set[str] = set()
    sink = _ShardSink(split_dir, split, shard_size)
    try:
        for res in tqdm(_prepared_stream(items, min_size, workers), total=len(items),
                        desc=f"shard {split}", unit="img", mininterval=1.0):
            if isinstance(res, Skip):
                skipped.append({"path": res.path, "reason": res.reason})
                continue
            if res.key in seen:
                skipped.append({"path": res.key, "reason": "duplicate key (same name, other extension)"})
                continue
            seen.add(res.key)
            sample = {"__key__": res.key, res.ext: res.data}
            if res.label is not None:
                sample["cls"] = str(res.label).encode()
            sink.write(sample)
            written += 1
            if res.converted:
                converted.append({"key": res.key, "reason": res.converted})
        sink.close()
    except OSError as e:
        sink.abort(e)
        raise PipelineError(f"{split_dir}: writing shards failed: {e}") from e
    except BaseException as e:
        sink.abort(e)
        raise
    # Remove shards a previous, larger run left behind, so the folder holds exactly this run.
    keep = {p.name for p in sink.paths}
    for old in split_dir.glob(f"{split}-*.tar"):
        if old.name not in keep:
            old.unlink()
    return {
        "written": written,
        "skipped": len(skipped),
        "converted": len(converted),
        "shards": [p.name for p in sink.paths],
        "_skipped": skipped,
        "_converted": converted,
    }


def write_shards(
    source: Source, out_dir: str | Path, shard_size: int, min_size: int, workers: int
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
        info = _write_split(split, items, out_dir, shard_size, min_size, workers)
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
