"""kill -9 at random points of every training stage, then a rerun: the same weights, bit for bit.

Each stage's CLI (`python -m rcg.cli <stage> --preset tiny`) runs in a subprocess that is SIGKILLed
several times: once half-way through a checkpoint write (tests/killpoint.py), then at seeded random
steps read off its progress bar (plus a random few milliseconds, so some kills land inside a write
too); every rerun resumes from the last checkpoint the kill left. The final model file must equal an
uninterrupted run's byte for byte (the shared loop restores every RNG stream and replays the data
position), and after every kill the checkpoint must be a whole one: the old or the new, never torn.
tests/test_training.py checks clean in-process interruptions; this module checks real kills.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rcg.training import read_checkpoint
from tests.conftest import ROOT
from tests.generator_workspace import build

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Stage:
    args: list[str]  # the rcg command line (with `--preset tiny` after it)
    steps: int  # optimiser steps, as the progress bar counts them
    model: str  # the model file the runs must agree on
    checkpoint: str  # the checkpoint the kills interrupt


STAGES = {
    "train_rdm": Stage(["train-rdm", "--set", "train_rdm.steps=400", "--set", "train_rdm.ckpt_every=7",
                        "--set", "train_rdm.class_cond=false"], 400,
                       "models/rdm/rdm.safetensors", "checkpoints/train_rdm/uncond/checkpoint-last.pt"),
    # Two loader workers: their augmentation RNG must be replayed too.
    "encoder": Stage(["encoder", "--set", "encoder.epochs=25", "--set", "encoder.ckpt_every=7",
                      "--set", "data.num_workers=2"], 100,
                     "models/encoder/encoder.safetensors", "checkpoints/encoder/checkpoint-last.pt"),
    "train_generator": Stage(["train-generator", "--condition", "rep", "--set", "train_generator.steps=60",
                              "--set", "train_generator.ckpt_every=7"], 60,
                             "models/generator/rep/generator.safetensors",
                             "checkpoints/train_generator/rep/checkpoint-last.pt"),
    "evalnet": Stage(["evalnet", "--set", "evalnet.epochs=25", "--set", "evalnet.ckpt_every=7"], 100,
                     "models/evalnet/evalnet.safetensors", "checkpoints/evalnet/checkpoint-last.pt"),
}


@pytest.fixture(scope="module")
def inputs(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards, an encoder and its features, built once by the real stages."""
    return build(tiny_workspace, tmp_path_factory.mktemp("kill"), rdm=False)


def _workspace(inputs: Path, root: Path, stage: str) -> Path:
    (root / "data").mkdir(parents=True)
    for rel in ("data/shards", "data/features") + (() if stage == "encoder" else ("models/encoder",)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(inputs / rel)
    return root


def _command(stage: Stage, *killpoint: str) -> list[str]:
    args = [*stage.args, "--preset", "tiny"]
    if killpoint:
        return [sys.executable, "-m", "tests.killpoint", *killpoint, "--", *args]
    return [sys.executable, "-m", "rcg.cli", *args]


def _kill_at(cmd: list[str], cwd: Path, total: int, step: int, delay: float) -> tuple[int, int, str]:
    """Run `cmd`; SIGKILL it `delay` s after its progress bar shows `step` of `total`. Returns the exit
    status, the last step the bar showed and the end of its output."""
    bar = re.compile(rb"\| *(\d+)/%d \[" % total)
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail, seen = b"", -1
    try:
        while seen < step:
            chunk = os.read(proc.stderr.fileno(), 1 << 16)
            if not chunk:
                break  # it ended before the step: the exit status says how
            tail = (tail + chunk)[-(1 << 16):]
            seen = max([seen] + [int(s) for s in bar.findall(tail)])
        else:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait(timeout=600)
        proc.stderr.close()
    return rc, seen, tail.decode(errors="replace")[-3000:]


def _landing(root: Path, stage: Stage) -> str:
    """Where the kill left the run: the checkpoint's step (it must be readable: old or new, not
    torn) and whether a checkpoint write was cut off (its temporary file is left beside it)."""
    path = root / stage.checkpoint
    step = int(read_checkpoint(path)["step"]) if path.exists() else 0
    torn = len(list(path.parent.glob(f".{path.name}.*.tmp")))
    return f"checkpoint at step {step}" + (f", {torn} cut-off write(s) beside it" if torn else "")


def _kill_and_resume(inputs: Path, tmp_path: Path, name: str, seed: int, kills: int = 3) -> list[str]:
    stage = STAGES[name]
    whole = _workspace(inputs, tmp_path / "whole", name)
    r = subprocess.run(_command(stage), cwd=whole, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    root = _workspace(inputs, tmp_path / "killed", name)
    report = []
    # First a kill inside a checkpoint write: half of the second checkpoint's bytes are on disk.
    r = subprocess.run(_command(stage, "--mid-save", "2"), cwd=root, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    report.append(f"inside the 2nd checkpoint write: {_landing(root, stage)}")
    assert _landing(root, stage).startswith("checkpoint at step 7, 1 cut-off write")
    rng = random.Random(seed)
    for step in sorted(rng.sample(range(10, stage.steps - 5), kills)):
        delay = rng.uniform(0.0, 0.05)
        rc, seen, tail = _kill_at(_command(stage), root, stage.steps, step, delay)
        assert rc == -signal.SIGKILL, f"not killed (exit status {rc}, last step {seen}):\n{tail}"
        report.append(f"at step {seen} (+{delay * 1000:.0f} ms): {_landing(root, stage)}")
    assert not (root / stage.model).exists()  # every kill landed before the end of training
    r = subprocess.run(_command(stage), cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert (root / stage.model).read_bytes() == (whole / stage.model).read_bytes(), "\n".join(report)
    print(f"\n{name}: {len(report)} kills, then resumed to the same weights:\n  " + "\n  ".join(report))
    return report


def test_train_rdm_killed_at_random_points_resumes_to_the_same_weights(inputs: Path, tmp_path: Path) -> None:
    _kill_and_resume(inputs, tmp_path, "train_rdm", seed=0)


@pytest.mark.slow  # about a minute each on 2 cores
@pytest.mark.parametrize("name,seed", [("encoder", 1), ("train_generator", 2), ("evalnet", 3)])
def test_stage_killed_at_random_points_resumes_to_the_same_weights(inputs: Path, tmp_path: Path, name: str,
                                                                   seed: int) -> None:
    _kill_and_resume(inputs, tmp_path, name, seed)
