"""Stop a training stage after a given number of optimiser steps, as a kill would.

`interrupt_after(monkeypatch, n)` makes the n-th call of the shared loop's step raise `Interrupted`
after the step ran (its checkpoint, if any, is already written only when the loop got that far), so
a test can run a stage, stop it mid-way, rerun it and compare with an uninterrupted run.
"""

from __future__ import annotations

import pytest

import rcg.training as training


class Interrupted(Exception):
    """Raised in place of a kill -9 at a chosen step."""


def interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    real = training._train_step
    calls = [0]

    def step(run, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - the loop's private signature
        calls[0] += 1
        if calls[0] > steps:
            raise Interrupted(f"interrupted before step {run.step + 1}")
        real(run, *args, **kwargs)

    monkeypatch.setattr(training, "_train_step", step)
