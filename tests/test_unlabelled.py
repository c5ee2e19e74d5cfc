"""Unlabelled images in, a generator out: `dvc exp run` on a flat folder of photographs, no labels.

The folder is built from scikit-image's bundled photographs: random crops of several sizes, PNG and
JPEG, one subfolder, no class structure. Only the source settings change from the tiny preset (the
folder, its colour channels, and an empty encoder normalisation, which the pipeline then measures).
Every stage must run; what needs labels must be skipped with its reason recorded: the label
baseline, the class-conditional RDM, the class modes of the evaluation table, IS and the kNN check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def photo_folder(root: Path, n: int = 160, seed: int = 0) -> Path:
    """`n` crops of real photographs (various sizes, PNG and JPEG, one subfolder), no labels."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "more").mkdir()
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(48, min(img.shape[:2])))
        y, x = (int(rng.integers(0, img.shape[k] - side + 1)) for k in (0, 1))
        crop = Image.fromarray(img[y : y + side, x : x + side])
        folder = root / "more" if i % 4 == 0 else root
        if i % 2:
            crop.save(folder / f"photo_{i:03d}.jpg", quality=90)
        else:
            crop.save(folder / f"photo_{i:03d}.png")
    return root


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("unlabelled")
    images = photo_folder(tmp / "photos")
    repo = tmp / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"]):
        _run(cmd, repo, env)
    _run(["rcg", "params", "--preset", "tiny", "--set", "shard.source=folder", "--set", f"shard.folder={images}",
          "--set", "data.channels=3", "--set", "encoder.mean=[]", "--set", "encoder.std=[]",
          "--set", "tracking.enabled=true", "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
          "--set", f"tracking.artifact_dir={tmp}/mlartifacts"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "a folder of unlabelled photographs"], repo, env)
    _run(dvc + ["exp", "run"], repo, env)
    (repo / "report.md").write_text(_run(["rcg", "report"], repo, env).stdout)
    return repo


def _json(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


def test_every_stage_runs_and_a_generator_comes_out(unlabelled_run: Path) -> None:
    repo = unlabelled_run
    manifest = _json(repo, "data/shards/manifest.json")
    assert manifest["classes"] == [] and manifest["val_split"]["method"] == "hash"
    assert manifest["splits"]["val"]["written"] >= 30 and manifest["splits"]["train"]["written"] >= 100
    assert (repo / "models/rdm/rdm.safetensors").exists()
    assert (repo / "models/generator/rep/generator.safetensors").exists()
    assert (repo / "models/generator/none/generator.safetensors").exists()
    encoder = _json(repo, "models/encoder/encoder.json")
    assert len(encoder["spec"]["mean"]) == 3 and _json(repo, "metrics/details/encoder.json")["normalisation"]["measured"]
    for mode in ("uncond", "rcg", "rcg_cfg", "oracle", "cluster", "hypersphere", "contrastive"):
        row = _json(repo, "metrics/details/eval.json")["modes"][mode]
        assert np.isfinite(row["fd"]) and "is" not in row, (mode, row)
    for name in ("samples_rcg", "samples_uncond", "interpolation"):
        assert (repo / "plots" / f"{name}.png").stat().st_size > 0
    promote = _json(repo, "metrics/promote.json")
    assert promote["version"] == "1" and promote["promoted"], promote


def test_what_needs_labels_is_skipped_with_its_reason(unlabelled_run: Path) -> None:
    repo = unlabelled_run
    ev = _json(repo, "metrics/details/eval.json")
    assert ev["extractor"] == "evalnet-ssl" and "without labels" in ev["fd_is"] and "not FID" in ev["fd_is"]
    assert set(ev["skipped"]) == {"label", "rcg_class", "is", "cas"} and not set(ev["skipped"]) & set(ev["modes"])
    assert "no class labels" in ev["skipped"]["label"] and "no labels" in ev["skipped"]["cas"]
    # Cluster labels need no labels: k from the image count (round(sqrt(n / 100)), at least 2).
    clusters = _json(repo, "models/generator/cluster/clusters.json")
    assert clusters["k"] == 2 and clusters["majority_class"] is None and "cluster" in ev["modes"]
    assert "no classes" in _json(repo, "metrics/generator_label.json")["skipped"]
    assert (repo / "models/generator/label/skipped.json").exists()
    assert "no class labels" in _json(repo, "metrics/rdm.json")["class_cond"]["skipped"]
    assert not (repo / "models/rdm/rdm_class.safetensors").exists()
    assert _json(repo, "metrics/details/evalnet.json")["kind"] == "contrastive"
    assert _json(repo, "metrics/encoder.json")["knn_top1"] is None
    report = (repo / "report.md").read_text()
    assert "Not measured on these data" in report and "`label`: " in report and "fd (evalnet-ssl)" in report
