"""Training curves (rcg.metrics.plots) and headline metrics files (rcg.metrics.headline).

The shared loop writes each run's step metrics to its curve file, MLflow or not; the rows travel in
the checkpoint, so the curve of an interrupted and resumed run has every log step exactly once, with
the values of an uninterrupted run. (The DVC side, `dvc plots show` over the real stages, is in
tests/test_pipeline.py.)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from rcg.metrics.headline import headline, write_metrics
from rcg.metrics.plots import Curve, CurveTracker
from rcg.training import DistInfo, LoopSpec, fit
from tests.interrupt import Interrupted, interrupt_after

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


class Recorder:
    """A stand-in for the stage's MLflow tracker: what the loop logged, and what else was asked."""

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_artifact(self, path: str) -> None:
        self.artifacts.append(path)


def _run(ckpt_dir: Path, tracker: object, steps: int = 10) -> None:
    """A toy model through `fit`: log every 2 steps, checkpoint every 3, the momentum-like extra."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spec = LoopSpec(name="toy", steps=steps, lr=1e-2, checkpoint_dir=ckpt_dir, fingerprint="toy", batch_size=8,
                    warmup_steps=2, decay="cosine", log_every=2, ckpt_every=3, amp=False, metric_prefix="toy/")
    g = torch.Generator().manual_seed(1)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                x = torch.randn(8, 4, generator=g)
                yield x, x.sum(1, keepdim=True)
        return batches()

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    fit(spec, model, opt, loss, data, CPU, tracker, generators={"data": g},
        extras=lambda step: {"momentum": 1.0 - 0.5 / (1 + step)})


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_the_loop_writes_the_curve_and_logs_the_same_values(tmp_path: Path) -> None:
    rec = Recorder()
    _run(tmp_path / "ck", CurveTracker(rec, tmp_path / "curves" / "toy.tsv"))
    rows = _rows(tmp_path / "curves" / "toy.tsv")
    assert list(rows[0]) == ["step", "loss", "lr", "images_per_s", "momentum"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10]
    # MLflow gets the same step metrics, under the stage's prefix
    assert [s for s, _ in rec.logged] == [2, 4, 6, 8, 10]
    for row, (_, metrics) in zip(rows, rec.logged):
        assert set(metrics) == {"toy/loss", "toy/lr", "toy/images_per_s", "toy/momentum"}
        for key in ("loss", "lr", "images_per_s", "momentum"):
            assert float(row[key]) == pytest.approx(metrics[f"toy/{key}"], rel=1e-6)
    assert not list((tmp_path / "curves").glob(".*.tmp")), "a temporary file was left beside the curve"


@pytest.mark.parametrize("deleted", [True, False], ids=["outputs-deleted", "curve-left"])
def test_an_interrupted_and_resumed_run_has_every_row_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           deleted: bool) -> None:
    _run(tmp_path / "whole", CurveTracker(None, tmp_path / "whole.tsv"))  # tracking off: the curve all the same
    curve = tmp_path / "split.tsv"
    with monkeypatch.context() as m:  # killed after step 5: rows 2 and 4 written, the checkpoint is at 3
        interrupt_after(m, 5)
        with pytest.raises(Interrupted):
            _run(tmp_path / "split", CurveTracker(None, curve))
    assert [r["step"] for r in _rows(curve)] == ["2", "4"]
    if deleted:  # as DVC does with a stage's outputs before it runs the stage again
        curve.unlink()
    _run(tmp_path / "split", CurveTracker(None, curve))
    whole, split = _rows(tmp_path / "whole.tsv"), _rows(curve)
    assert [r["step"] for r in split] == ["2", "4", "6", "8", "10"]
    # the resumed run trains bit for bit as the uninterrupted one: the same losses and rates
    assert [(r["loss"], r["lr"], r["momentum"]) for r in split] == [(r["loss"], r["lr"], r["momentum"]) for r in whole]


def test_a_finished_run_rewrites_its_whole_curve_and_a_fresh_one_starts_empty(tmp_path: Path) -> None:
    curve = tmp_path / "toy.tsv"
    _run(tmp_path / "ck", CurveTracker(None, curve))
    first = curve.read_text()
    curve.unlink()
    _run(tmp_path / "ck", CurveTracker(None, curve))  # resumed at its end: trains nothing
    assert curve.read_text() == first
    _run(tmp_path / "ck", CurveTracker(None, curve), steps=4)  # fewer steps than the checkpoint: starts over
    assert [r["step"] for r in _rows(curve)] == ["2", "4"]


def test_a_curve_without_rows_is_its_header(tmp_path: Path) -> None:
    curve = Curve(tmp_path / "metrics" / "none.tsv")  # a model the stage did not train
    curve.write()
    assert curve.path.read_text() == "step\tloss\tlr\n"


def test_the_curve_tracker_hands_everything_else_to_the_stage_tracker(tmp_path: Path) -> None:
    rec = Recorder()
    wrapped = CurveTracker(rec, tmp_path / "c.tsv")
    wrapped.log_artifact("samples.png")
    assert rec.artifacts == ["samples.png"]
    with pytest.raises(AttributeError):
        wrapped.no_such_method  # noqa: B018 - an attribute the stage's tracker does not have either


def test_headline_keeps_the_named_numbers_nested_and_skips_what_is_missing(tmp_path: Path) -> None:
    record = {"fd_train": 0.5, "fd_train_std": 0.1, "train_steps": 40,
              "class_cond": {"fd_per_class_train": 2.3, "per_class": {"0": {"fd_train": 2.0}}}}
    keys = ("fd_train", "fd_val", "train_steps", "class_cond.fd_per_class_train", "class_cond.skipped")
    assert headline(record, keys) == {"fd_train": 0.5, "train_steps": 40, "class_cond": {"fd_per_class_train": 2.3}}
    assert headline({"class_cond": {"skipped": "no labels"}}, keys) == {"class_cond": {"skipped": "no labels"}}
    top = write_metrics(record, tmp_path / "m.json", tmp_path / "details" / "m.json", keys)
    assert json.loads((tmp_path / "details" / "m.json").read_text()) == record
    assert json.loads((tmp_path / "m.json").read_text()) == top
