"""`rcg evaluate`: every generation mode scored with torch-fidelity (paper section 4, Table 9a).

The protocol (modes, floor, class accuracy, figures) is rcg.metrics.evaluation's (paper section
4); this stage loads the trained generators from their folders, runs it, and writes
metrics/eval.json (the headline), metrics/details/eval.json (the table) and plots/ (sample grids, Fig. 7's interpolation strips, training curves), all
logged to MLflow: the table as a table (`eval_table.json`), the figures as images, and the headline
numbers (each mode's fd, precision, recall, and the floor's) as metrics of the pipeline run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rcg.config import Config
from rcg.io import atomic_dir
from rcg.metrics.evaluation import ModeGenerators, ModeSampler, evaluate_modes
from rcg.metrics.extractors import INCEPTION
from rcg.metrics.headline import evaluation_keys, write_metrics
from rcg.metrics.report import headline_metrics, table_rows
from rcg.sampling import save_grid
from rcg.tracking import Tracker, stage_run

log = logging.getLogger(__name__)

def evaluate(cfg: Config, generators: ModeSampler, tracker: Tracker | None = None) -> dict[str, Any]:
    """Score every configured mode with `generators`; write the metrics files and plots/; return the table."""
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
    if "cas" in results:  # each mode's CAS is in its row; the real-data baseline here
        tracker.log_metrics({"cas.real_same_budget": results["cas"]["real_same_budget"]})
    tracker.log_table(table_rows(results), "eval_table.json")  # MLflow's table view of the run
    tracker.log_pipeline(headline_metrics(results), tags)  # the pipeline run's own metrics
    plots = Path(ev.plots_dir)
    with atomic_dir(plots, after=[ev.metrics_file, ev.details_file]) as tmp:  # the figures and the table: one set
        for name, (images, nrow) in out.figures.items():
            tracker.log_artifact(save_grid(images, tmp / f"{name}.png", nrow=nrow), "plots")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_metrics(results, ev.metrics_file, ev.details_file, evaluation_keys(results))
    for name in out.figures:  # as images too: the run's image view shows them
        tracker.log_image(plots / f"{name}.png", name, step=0)
    tracker.log_metrics({"seconds": results["seconds"]})
    tracker.log_artifact(ev.details_file)
    log.info("evaluate: wrote %s, %s and %s/ in %.0f s", ev.metrics_file, ev.details_file, plots, results["seconds"])
    return results


def run(cfg: Config, **options: object) -> None:
    """The stage: the trained generators (models/generator/*, models/rdm) through `evaluate`."""
    with stage_run(cfg, "evaluate") as tracker:
        evaluate(cfg, ModeGenerators(cfg.train_generator.out_dir, cfg.train_rdm.out_dir), tracker)
