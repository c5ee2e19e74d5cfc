"""Cached representations in Parquet: the file between `encode` and the training stages.

Schema (one row per sample and view; DESIGN.md):
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

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rcg.io import PipelineError, atomic_path

VIEWS = ("orig", "flip")


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
