"""Cached representations in Parquet: the file between `encode` and the training stages.

Schema (one row per sample and view; docs/design.md):
  key   string                       the sample's WebDataset key
  label int64, nullable              class index, null for unlabelled sources
  view  string                       "orig" or "flip" (horizontal flip of the same image)
  rep   fixed_size_list<float32>[D]  the standardised encoder representation (D = 256)

Rows are sorted by key, `orig` before `flip` (rcg.stages.encode.canonical_order), so the file does
not depend on how many loader workers or ranks wrote it.

Floats use byte-stream-split encoding with zstd and no dictionary: representations are
high-entropy, so dictionaries only cost time, while byte-stream-split lets zstd find the shared
exponent bytes.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rcg.io import PipelineError, atomic_path
from rcg.views import VIEWS, ViewCache


def schema(rep_dim: int = 256) -> pa.Schema:
    """The Parquet schema of a features file."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("label", pa.int64()),
            ("view", pa.string()),
            ("rep", pa.list_(pa.float32(), rep_dim)),
        ]
    )


@dataclass
class Features:
    """Representations read back for training: `reps[i]` belongs to `keys[i]`, `views[i]`."""

    keys: list[str]
    labels: torch.Tensor  # int64 [N]; -1 where the source had no label
    views: list[str]
    reps: torch.Tensor  # float32 [N, D]

    def __len__(self) -> int:
        return len(self.keys)

    def select_view(self, view: str) -> Features:
        idx = [i for i, v in enumerate(self.views) if v == view]
        t = torch.as_tensor(idx, dtype=torch.long)
        return Features(
            [self.keys[i] for i in idx], self.labels[t], [view] * len(idx), self.reps[t]
        )

    @property
    def labelled(self) -> bool:
        return bool(len(self)) and bool((self.labels >= 0).all())


def to_table(keys: list[str], labels: list[int | None], views: list[str], reps: np.ndarray) -> pa.Table:
    """Build a features table; `reps` is float32 [N, D]."""
    reps = np.ascontiguousarray(reps, dtype=np.float32)
    n, d = reps.shape
    flat = pa.array(reps.reshape(-1), type=pa.float32())
    rep_col = pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(labels, pa.int64()), pa.array(views, pa.string()), rep_col],
        schema=schema(d),
    )


def write_features(path: str | Path, tables: list[pa.Table], row_group_size: int = 8192) -> None:
    """Write feature tables to one Parquet file atomically (temp file, then rename)."""
    if not tables:
        raise PipelineError(f"{path}: no representations to write")
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(
            tmp,
            tables[0].schema,
            compression="zstd",
            use_dictionary=False,
            use_byte_stream_split=["rep.list.element"],
        )
        try:
            for t in tables:
                writer.write_table(t, row_group_size=row_group_size)
        finally:
            writer.close()


def read_features(path: str | Path, view: str | None = None) -> Features:
    """Read a features file memory-mapped; `reps` shares memory with Arrow's buffer (no copy)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: features file not found (run `rcg encode` first)")
    table = pq.read_table(path, memory_map=True)
    if view is not None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        table = table.filter(pa.compute.equal(table["view"], view))
    rep_col = table["rep"].combine_chunks()
    d = rep_col.type.list_size
    values = rep_col.values.to_numpy(zero_copy_only=True)
    with warnings.catch_warnings():
        # The buffer is a read-only memory map; torch warns because it cannot enforce that. Training
        # only reads reps (batches are gathered by index into new tensors), so sharing is safe.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        reps = torch.from_numpy(values.reshape(len(table), d)) if len(table) else torch.zeros(0, d)
    labels = table["label"].to_numpy(zero_copy_only=False)
    labels = np.where(np.isnan(labels.astype(float)), -1, labels).astype(np.int64)
    return Features(
        keys=table["key"].to_pylist(),
        labels=torch.from_numpy(labels),
        views=table["view"].to_pylist(),
        reps=reps,
    )


class RepCache(ViewCache):
    """The encode stage's reps indexed by (key, view), for training on cached representations.

    Exact when the only augmentation is a horizontal flip: the cache holds both views of the same
    decoded image (the author's later MAR caches the same way). `lookup(keys, flipped)` gathers the
    rows of a batch; view 1 is the flipped image (rcg.views.ViewCache).
    """

    def __init__(self, path: str | Path) -> None:
        feats = read_features(path)
        super().__init__(feats.keys, feats.views, feats.reps, path, "rep", "rerun `rcg encode`")
        self.reps = feats.reps

    def verify(self, cached: torch.Tensor, encoder: torch.nn.Module, images: torch.Tensor) -> float:
        """Max |cached - encoder(images)|; a stale or inexact cache is an error."""
        with torch.no_grad():
            fresh = encoder(images).float()
        err = float((fresh - cached.to(fresh.device)).abs().max())
        # Reps are standardised (unit std); 0.05 allows for bf16 autocast in the encode stage.
        if err > 0.05:
            raise PipelineError(
                f"{self.path}: cached representations differ from the encoder's by up to {err:.3f}; the cache "
                "is stale or the augmentation is not flip-only. Rerun `rcg encode` or set "
                "train_generator.rep_source=encoder"
            )
        return err


@torch.inference_mode()
def encode_split(
    encoder: torch.nn.Module, data_cfg: Any, split: str, device: torch.device, batch_size: int = 512,
    num_workers: int = 0, progress: bool = True,
) -> pa.Table:
    """Representations of every sample of `split` this rank reads, both views (orig, flip), as one table."""
    from tqdm import tqdm

    from rcg.data.loader import make_loader

    loader = make_loader(data_cfg, split, "once", batch_size=batch_size, num_workers=num_workers)
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


def read_reps(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows (both views) of a features file as in-memory tensors (reps [N, D], labels [N]),
    copied out of the memory map; a file without rows is an error."""
    f = read_features(path)
    if len(f) == 0:
        raise PipelineError(f"{path}: no representations in this file")
    return f.reps.clone().contiguous(), f.labels.clone()
