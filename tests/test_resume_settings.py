"""A changed setting never resumes a checkpoint silently, as a user meets it through DVC.

The project is copied into a fresh git + DVC repository (as tests/test_pipeline.py does) with the
tiny preset (train_rdm: 40 steps, a checkpoint every 20), and `dvc exp run train_rdm` runs the RDM
and its upstream stages. Then, one `-S` at a time:
  - `train_rdm.steps=20`: the checkpoint (step 40) is past the steps asked for: started over;
  - `train_rdm.lr=...`: the settings changed: started over (not resumed at its end);
  - `train_rdm.steps=60`: only the length changed: resumed from step 20.
Each time both RDMs (unconditional and class-conditional) and metrics/rdm.json describe the model
on disk.

Marked slow (four `dvc exp run`s, about 70 s): the default run keeps the same rules in process
(tests/test_training.py: fewer steps start over; tests/test_rdm.py: a checkpoint of other settings
is not loaded, more steps resume); this module checks them as DVC users meet them (`make test-all`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcg import config

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"uncond": "rdm", "class": "rdm_class"}  # checkpoint folder -> model file name


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def _checkpoint(repo: Path, variant: str) -> dict:
    return torch.load(repo / "checkpoints" / "train_rdm" / variant / "checkpoint-last.pt", weights_only=False)


def _state(repo: Path) -> dict[str, dict]:
    """Per RDM: the checkpoint's step and fingerprint, and the written model's weights and steps."""
    out = {}
    for variant, name in VARIANTS.items():
        ck = _checkpoint(repo, variant)
        meta = json.loads((repo / "models" / "rdm" / f"{name}.json").read_text())
        out[variant] = {"step": ck["step"], "fingerprint": ck["fingerprint"], "model_steps": meta["trained_steps"],
                        "weights": load_file(repo / "models" / "rdm" / f"{name}.safetensors")}
    return out


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics" / "rdm.json").read_text())


@pytest.mark.slow
def test_changed_settings_start_over_and_more_steps_resume(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    _run(["rcg", "params", "--preset", "tiny"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny preset"], repo, env)

    _run(dvc + ["exp", "run", "train_rdm"], repo, env)
    first = _state(repo)
    assert _metrics(repo)["train_steps"] == 40
    assert all(s["step"] == s["model_steps"] == 40 for s in first.values())

    # Fewer steps than the checkpoint holds: started over, not the 40-step model relabelled.
    out = _run(dvc + ["exp", "run", "train_rdm", "-S", "train_rdm.steps=20"], repo, env)
    assert out.count("past the 20 steps asked for; starting over") == 2, out[-3000:]
    short = _state(repo)
    assert _metrics(repo)["train_steps"] == 20
    for v in VARIANTS:
        assert short[v]["step"] == short[v]["model_steps"] == 20
        assert not _same_weights(short[v]["weights"], first[v]["weights"])

    # Another learning rate at the same length: the step-20 checkpoint must not be taken as done.
    lr = config.load(repo / "params.yaml").train_rdm.lr
    out = _run(dvc + ["exp", "run", "train_rdm", "-S", f"train_rdm.lr={lr / 2}"], repo, env)
    assert out.count("written with other settings or data; starting over") == 2, out[-3000:]
    assert "resuming from" not in out, out[-3000:]
    other_lr = _state(repo)
    assert _metrics(repo)["train_steps"] == 20
    for v in VARIANTS:
        assert other_lr[v]["step"] == other_lr[v]["model_steps"] == 20
        assert other_lr[v]["fingerprint"] != short[v]["fingerprint"]
        assert not _same_weights(other_lr[v]["weights"], short[v]["weights"])

    # Only more steps: the same run goes on from its step-20 checkpoint.
    out = _run(dvc + ["exp", "run", "train_rdm", "-S", "train_rdm.steps=60"], repo, env)
    assert out.count("at step 20") == 2 and "starting over" not in out, out[-3000:]
    longer = _state(repo)
    assert _metrics(repo)["train_steps"] == 60
    for v in VARIANTS:
        assert longer[v]["step"] == longer[v]["model_steps"] == 60
        assert longer[v]["fingerprint"] == other_lr[v]["fingerprint"]
