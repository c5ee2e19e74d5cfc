"""End to end: the real dvc.yaml, every stage, on the tiny preset, as a user runs it.

The project's dvc.yaml, params.yaml and library are copied into a fresh git + DVC repository; the
preset is switched with `rcg params --preset tiny`, then `dvc exp run` runs every stage. Every
`outs` and `metrics` path of every stage must exist afterwards, and a second `dvc status` must find
nothing stale. Then: a comment edit in the library reruns only the `code` digest stage, and
`dvc exp run -S train_rdm.lr=...` (no `++`: params.yaml holds every key) reruns the RDM and what
reads it, with `dvc params diff` showing the value that ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rcg import config
from tests.mlflow_view import EVERY_STAGE, check_pipeline_run

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _expected_outputs(dvc_yaml: dict, params: dict) -> list[str]:
    """Every out, metric and plot path of dvc.yaml, its `${key}` paths resolved from params.yaml."""

    def resolve(path: str, item: str | None = None) -> str:
        def value(m: re.Match) -> str:
            if m.group(1) == "item":
                return str(item)
            node: object = params
            for part in m.group(1).split("."):
                node = node[part]  # type: ignore[index]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, path)

    paths = []
    for stage in dvc_yaml["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                paths += [resolve(path, it) for it in stage.get("foreach", [None])]
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
        "PYTHONPATH": str(repo),  # the stages run the copied library, the one the digests hash
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)

    _run(["rcg", "params", "--preset", "tiny"], repo, env)
    _run(["git", "commit", "-qam", "tiny preset"], repo, env)
    _run(dvc + ["exp", "run"], repo, env)

    assert config.load(repo / "params.yaml").preset == "tiny"
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    missing = [p for p in _expected_outputs(stages, yaml.safe_load((repo / "params.yaml").read_text()))
               if not (repo / p).exists()]
    assert not missing, f"stage outputs missing after dvc exp run: {missing}"
    status = _run(dvc + ["status"], repo, env).stdout
    assert "changed" not in status, status
    check_pipeline_run(repo, EVERY_STAGE)  # what MLflow shows of it (tests/mlflow_view.py)

    # A comment-only edit: only the digest stage is stale, and rerunning it leaves all up to date.
    rdm = repo / "rcg" / "rdm.py"
    rdm.write_text(rdm.read_text() + "\n# a comment edit\n")
    status = _run(dvc + ["status", "--json"], repo, env).stdout
    assert list(json.loads(status)) == ["code"], status
    ran = _run(dvc + ["repro"], repo, env).stdout
    assert "Running stage 'code'" in ran and ran.count("Running stage") == 1, ran
    assert json.loads(_run(dvc + ["status", "--json"], repo, env).stdout) == {}

    # One value changed the DVC way: train_rdm and what reads its model rerun, nothing else.
    lr = config.load(repo / "params.yaml").train_rdm.lr
    ran = _run(dvc + ["exp", "run", "-S", f"train_rdm.lr={lr / 2}"], repo, env).stdout
    reran = set(re.findall(r"Running stage '([^']+)'", ran))
    assert reran == {"train_rdm", "evaluate", "promote"}, ran
    diff = json.loads(_run(dvc + ["params", "diff", "--json"], repo, env).stdout)
    assert list(diff) == ["params.yaml"] and list(diff["params.yaml"]) == ["train_rdm.lr"], diff
    change = diff["params.yaml"]["train_rdm.lr"]
    assert (change["old"], change["new"]) == (lr, lr / 2)
    assert config.load(repo / "params.yaml").train_rdm.lr == lr / 2
    check_pipeline_run(repo, {"train_rdm", "evaluate", "promote"})  # a second pipeline run
