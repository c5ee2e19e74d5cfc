"""Training curves for plots/: the per-step metrics the training stages logged to MLflow.

The stages' metrics files hold end-of-run summaries; the per-step series (loss, lr, ...) live in
their MLflow runs, so the curves are read back from there: the latest finished run of each
training stage (one per generator condition). With tracking off there is nothing to plot.
(Sample grids and interpolation strips use rcg.sampling.save_grid.) Files are written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rcg.config import TrackingConfig
from rcg.io import atomic_path

log = logging.getLogger(__name__)

TRAINING_STAGES = ("encoder", "train_rdm", "train_generator", "evalnet")
Series = dict[str, list[tuple[float, float]]]


def plot_series(series: Series, title: str, path: str | Path) -> Path:
    """One panel per series (value against step) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), squeeze=False)
    for ax, (name, pts) in zip(axes[:, 0], series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def mlflow_curves(tracking: TrackingConfig, out_dir: str | Path) -> list[Path]:
    """`plots/curves_<stage>[_<condition>].png` for the latest run of every training stage."""
    if not tracking.enabled:
        log.info("curves: tracking is off, no training curves to plot")
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    exps = [e.experiment_id for e in client.search_experiments()
            if e.name.startswith(f"{tracking.experiment_prefix}-")]
    written: list[Path] = []
    for stage in TRAINING_STAGES if exps else ():
        runs = client.search_runs(
            exps, filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=50,
        )
        seen: set[str] = set()
        for run in runs:
            cond = run.data.tags.get("condition", "")
            if cond in seen:
                continue  # an older run of the same stage and condition
            series: Series = {}
            for key in sorted(run.data.metrics):
                hist = client.get_metric_history(run.info.run_id, key)
                if len(hist) > 1:
                    series[key] = sorted((float(m.step), float(m.value)) for m in hist)
            if series:  # a run resumed at its end logs no curve: fall back to the run that trained
                seen.add(cond)
                name = f"{stage}_{cond}" if cond else stage
                written.append(plot_series(series, name, Path(out_dir) / f"curves_{name}.png"))
    log.info("curves: %d plots from MLflow (%s)", len(written), tracking.uri)
    return written
