"""`rcg evaluate`: every generation mode scored with torch-fidelity (paper section 4, Table 9a).

The protocol (modes, floor, class accuracy, figures) is rcg.metrics.evaluation's (paper section
4); this stage loads the trained generators from their folders, runs it, and writes
metrics/eval.json and plots/ (sample grids, Fig. 7's interpolation strips, training curves), all
logged to MLflow: the table as a table (`eval_table.json`), the figures as images, and the headline
numbers (each mode's fd, precision, recall, and the floor's) as metrics of the pipeline run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rcg.config import Config
from rcg.io import atomic_dir, write_json
from rcg.metrics.evaluation import ModeGenerators, ModeSampler, evaluate_modes
from rcg.metrics.extractors import INCEPTION
from rcg.sampling import save_grid
from rcg.tracking import Tracker, stage_run

log = logging.getLogger(__name__)

HEADLINE = ("fd", "precision", "recall")  # per mode and for the floor: the pipeline run's metrics
TABLE_FILE = "eval_table.json"  # the evaluation table in the evaluate run (mlflow.log_table)


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation table (metrics/eval.json) one row per mode, then the floor; a skipped mode is
    a row with its reason. The columns say which extractor `fd` is measured with."""
    from rcg.metrics.report import LABELS

    rows: list[dict[str, Any]] = []
    for mode, row in results["modes"].items():
        rows.append({"mode": mode, "what": LABELS.get(mode, mode), **row})
    for mode, why in results.get("skipped", {}).items():
        if mode in LABELS:
            rows.append({"mode": mode, "what": LABELS[mode], "skipped": why})
    rows.append({"mode": "floor", "what": f"{results['n_samples']} real train images: the best a mode can reach",
                 **results["floor"]})
    first = ["mode", "what", "fd", "precision", "recall", "is", "class_accuracy"]
    columns = [c for c in first if any(c in r for r in rows)]
    columns += [c for r in rows for c in r if c not in columns and c != "skipped"]
    columns += ["skipped"] if any("skipped" in r for r in rows) else []
    return [{**{c: r.get(c) for c in columns}, "extractor": results["extractor"]} for r in rows]


def headline(results: dict[str, Any]) -> dict[str, float]:
    """`<mode>.fd`, `<mode>.precision`, `<mode>.recall` and the same for `floor`."""
    rows = {**results["modes"], "floor": results["floor"]}
    return {f"{mode}.{k}": float(row[k]) for mode, row in rows.items() for k in HEADLINE if row.get(k) is not None}


def evaluate(cfg: Config, generators: ModeSampler, tracker: Tracker | None = None) -> dict[str, Any]:
    """Score every configured mode with `generators`; write metrics/eval.json and plots/; return the table."""
    ev, tracker = cfg.evaluate, tracker or Tracker(False)
    t0 = time.perf_counter()
    out = evaluate_modes(generators, ev, cfg.data, evalnet_weights=Path(cfg.evalnet.out_dir) / "evalnet.safetensors",
                         features_dir=cfg.encode.out_dir)
    results = out.results
    tags = {"extractor": results["extractor"], "fd_is": results["fd_is"],
            "fd_is_fid": str(results["extractor"] == INCEPTION)}
    tracker.set_tags(tags)
    tracker.log_metrics({f"floor.{k}": v for k, v in results["floor"].items()})
    for mode, row in results["modes"].items():
        tracker.log_metrics({f"{mode}.{k}": v for k, v in row.items()})
    tracker.log_table(table_rows(results), TABLE_FILE)
    tracker.log_pipeline(headline(results), tags)
    plots = Path(ev.plots_dir)
    with atomic_dir(plots, after=[ev.metrics_file]) as tmp:  # the figures and the table: one set
        for name, (images, nrow) in out.figures.items():
            tracker.log_artifact(save_grid(images, tmp / f"{name}.png", nrow=nrow), "plots")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(ev.metrics_file, results)
    for name in out.figures:  # as images too: the run's image view shows them
        tracker.log_image(plots / f"{name}.png", name, step=0)
    tracker.log_metrics({"seconds": results["seconds"]})
    tracker.log_artifact(ev.metrics_file)
    log.info("evaluate: wrote %s and %s/ in %.0f s", ev.metrics_file, plots, results["seconds"])
    return results


def run(cfg: Config, **options: object) -> None:
    """The stage: the trained generators (models/generator/*, models/rdm) through `evaluate`."""
    with stage_run(cfg, "evaluate") as tracker:
        evaluate(cfg, ModeGenerators(cfg.train_generator.out_dir, cfg.train_rdm.out_dir), tracker)
