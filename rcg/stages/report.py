"""`rcg report`: print the evaluation table of metrics/details/eval.json (rcg.metrics.report) as Markdown."""

from __future__ import annotations

from pathlib import Path

from rcg.config import Config
from rcg.io import read_json
from rcg.metrics.report import format_report


def run(cfg: Config, **options: object) -> None:
    """Print the report of metrics/details/eval.json (with metrics/evalnet.json and
    metrics/details/rdm.json when present) to stdout."""
    results = read_json(cfg.evaluate.details_file)
    evalnet_path, rdm_path = Path(cfg.evalnet.metrics_file), Path(cfg.train_rdm.details_file)
    print(format_report(results, read_json(evalnet_path) if evalnet_path.exists() else None,
                        read_json(rdm_path) if rdm_path.exists() else None))
