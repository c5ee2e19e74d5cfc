"""`rcg report`: print the evaluation table of metrics/details/eval.json (rcg.metrics.report) as Markdown."""

from __future__ import annotations

from pathlib import Path

from rcg.config import Config
from rcg.io import read_json
from rcg.metrics.report import format_report


def run(cfg: Config, **options: object) -> None:
    """Print the report of metrics/details/eval.json (and metrics/evalnet.json when present) to stdout."""
    results = read_json(cfg.evaluate.details_file)
    evalnet_path = Path(cfg.evalnet.metrics_file)
    print(format_report(results, read_json(evalnet_path) if evalnet_path.exists() else None))
