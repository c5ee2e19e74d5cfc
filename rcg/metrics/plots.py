"""Training curves as files DVC plots: one TSV per training run, written by the shared loop.

`rcg.training.fit` writes every log step's values (step, loss, lr, images/s and the stage's extras
such as MoCo's momentum) to the run's curve file, whether MLflow tracking is on or off, and MLflow
gets the same values. The files are stage outputs (metrics/curves/*.tsv), and dvc.yaml's top-level
`plots` draws them as line charts against `step`, so `dvc plots show` renders the training curves
of the workspace and `dvc plots diff <experiment>` overlays experiments. (Sample grids and the
interpolation strips are images, rcg.sampling.save_grid.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcg.io import atomic_path

COLUMNS = ("step", "loss", "lr")  # in every curve, first; then images_per_s and the stage's extras


class Curve:
    """One training run's step metrics as a TSV file: the DVC plot of its training curve.

    One row per log step, the whole file rewritten atomically at each one, so a kill never leaves
    half a row. DVC deletes a stage's outputs before it reruns the stage, so the rows also travel
    in the loop's checkpoint: a resumed run writes back the rows up to its resume step and appends
    after them, and the curve of an interrupted run holds every log step exactly once. A curve
    without rows (a model the stage did not train) is the header alone.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []

    def restart(self, rows: list[dict[str, float]], step: int) -> None:
        """Start from `rows` up to `step` (a checkpoint's; none for a fresh run) and write the file."""
        self.rows = [dict(r) for r in rows if r["step"] <= step]
        self.write()

    def add(self, step: int, values: dict[str, float]) -> None:
        """Append the row of log step `step` and write the file."""
        self.rows.append({"step": step, **values})
        self.write()

    def write(self) -> None:
        columns = list(COLUMNS)
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        lines = ["\t".join(columns), *("\t".join(_cell(row.get(c)) for c in columns) for row in self.rows)]
        with atomic_path(self.path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")


def _cell(value: float | None) -> str:
    """A TSV cell: the step as an integer, values to 7 significant digits, nothing when missing."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.7g}"


class CurveTracker:
    """A stage's tracker together with the file its training curve goes to.

    A stage passes it as the `tracker` of its training code (which hands it on to `fit`): `fit`
    writes the curve file and logs the same step metrics to `tracker`; everything else the training
    code asks of it (sample grids as artifacts, ...) goes to `tracker` unchanged.
    """

    def __init__(self, tracker: Any, path: str | Path) -> None:
        self.tracker, self.path = tracker, Path(path)

    def __getattr__(self, name: str) -> Any:
        if name in ("tracker", "path"):  # not set yet (an instance being copied): no endless recursion
            raise AttributeError(name)
        return getattr(self.tracker, name)
