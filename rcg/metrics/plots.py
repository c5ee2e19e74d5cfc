"""Pictures the evaluate stage writes under plots/: sample grids, interpolation strips, curves.

Grids show the first images of each generation mode (DESIGN.md's table, one picture per row);
strips show images generated from linear interpolations between two representations (paper
Fig. 7; REFERENCE.md section 8, issue #20); curves plot every per-step series found in the metrics
files of the training stages. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from rcg.io import atomic_path, get_logger

log = get_logger(__name__)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Images in [0, 1] [N, C, H, W] -> one PNG grid (square-ish unless `nrow` is given)."""
    path = Path(path)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    with atomic_path(path) as tmp:
        save_image(images.float().clamp(0, 1), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")
    return path


def _series(obj: Any, prefix: str = "") -> dict[str, list[tuple[float, float]]]:
    """Per-step series inside a metrics JSON: lists of records holding `step` and numeric values."""
    out: dict[str, list[tuple[float, float]]] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_series(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and all(isinstance(r, dict) and "step" in r for r in obj):
        keys = {k for r in obj for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        for k in sorted(keys):
            pts = [(float(r["step"]), float(r[k])) for r in obj if isinstance(r.get(k), (int, float))]
            if len(pts) > 1:
                out[f"{prefix}{k}"] = pts
    return out


def training_curves(metrics_dir: str | Path, out_dir: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """One PNG per metrics file under `metrics_dir` that holds per-step series; returns the files.

    Stages record curves as lists of {"step": ..., "<name>": ...} records (JSON), or as CSV/TSV
    tables with a `step` column (DVC plots' format); files without such series are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for f in sorted(Path(metrics_dir).glob("*")):
        if f.name in skip or f.suffix not in (".json", ".csv", ".tsv"):
            continue
        try:
            series = _series(json.loads(f.read_text())) if f.suffix == ".json" else _table_series(f)
        except (ValueError, OSError) as e:
            log.warning("curves: cannot read %s (%s); skipped", f, e)
            continue
        if not series:
            continue
        fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), squeeze=False)
        for ax, (name, pts) in zip(axes[:, 0], series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
            ax.set_title(f"{f.stem}: {name}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        out = Path(out_dir) / f"curves_{f.stem}.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def _table_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows or "step" not in rows[0]:
        return {}
    records = []
    for r in rows:
        rec: dict[str, float] = {}
        for k, v in r.items():
            try:
                rec[k] = float(v)
            except (TypeError, ValueError):
                pass
        if "step" in rec:
            records.append(rec)
    return _series(records)
