"""End to end: the real dvc.yaml, every stage, on the tiny preset, through `dvc exp run -S`.

The project's dvc.yaml, params.yaml and library are copied into a fresh git + DVC repository; the
preset is switched with `dvc exp run -S preset=tiny`, exactly as a user would. Every `outs` and
`metrics` path of every stage must exist afterwards, and a second run must find nothing stale.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _expected_outputs(dvc_yaml: dict) -> list[str]:
    paths = []
    for name, stage in dvc_yaml["stages"].items():
        items = stage.get("foreach")
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if items is None:
                    paths.append(path)
                else:
                    paths += [path.replace("${item}", str(it)) for it in items]
    return paths


def test_every_stage_end_to_end_with_dvc(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)

    _run(dvc + ["exp", "run", "-S", "preset=tiny"], repo, env)

    assert yaml.safe_load((repo / "params.yaml").read_text())["preset"] == "tiny"
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    missing = [p for p in _expected_outputs(stages) if not (repo / p).exists()]
    assert not missing, f"stage outputs missing after dvc exp run: {missing}"
    status = _run(dvc + ["status"], repo, env).stdout
    assert "changed" not in status, status
