"""Code digests (rcg.provenance): a stage's digest covers every rcg module it runs, ignores comments
and docstrings, and dvc.yaml makes each stage depend on its digest instead of on .py paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcg import cli, provenance

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_stages() -> dict[str, dict]:
    """{dvc.yaml stage: its body} for every stage but `code` (foreach stages: their `do`)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items() if name != "code"}


def _stage_module(body: dict) -> str:
    """The rcg.stages module a dvc.yaml stage runs, as rcg/cli.py maps its `rcg <command>`."""
    words = body["cmd"].split()
    assert words[0] == "rcg", body["cmd"]
    return cli.STAGES[words[1]][0]


def _dep_paths(body: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in body.get("deps", [])]


def test_dvc_yaml_stages_depend_on_their_digest_not_on_code() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert next(iter(stages)) == "code"
    code = stages["code"]
    assert _dep_paths(code) == ["rcg"]
    names = list(_pipeline_stages())
    assert code["cmd"].split()[:2] == ["rcg", "code"] and code["cmd"].split()[2:] == names
    outs = {next(iter(o)): o[next(iter(o))] for o in code["outs"]}
    assert outs == {f"{provenance.DIGEST_DIR}/{n}.txt": {"cache": False} for n in names}
    for name, body in _pipeline_stages().items():
        assert _stage_module(body) == name  # the digest file is named after the stage module
        deps = _dep_paths(body)
        assert f"{provenance.DIGEST_DIR}/{name}.txt" in deps, name
        assert not [d for d in deps if d == "rcg" or d.startswith("rcg/")], f"{name} lists code paths"


def test_every_stage_digest_covers_the_modules_it_imports() -> None:
    """Import each stage (as `rcg <stage>` does) in a fresh interpreter: every rcg module loaded
    must be in the stage's digest list, which also holds lazily imported ones."""
    graph = provenance.import_graph(provenance.module_index(ROOT / "rcg"))
    script = (
        "import importlib, json, sys\n"
        "for m in ('rcg.cli', 'rcg.launch', 'rcg.stages.' + sys.argv[1]):\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'rcg' or m.startswith('rcg.'))))\n"
    )
    modules = {name: _stage_module(body) for name, body in _pipeline_stages().items()}
    procs = {  # side by side: each one imports torch
        name: subprocess.Popen([sys.executable, "-c", script, module], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, module in modules.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        loaded = set(json.loads(out))
        listed = set(provenance.stage_modules(modules[name], graph))
        assert f"rcg.stages.{modules[name]}" in loaded
        assert loaded <= listed, f"{name}: imported but not in its digest: {sorted(loaded - listed)}"


def test_comment_edits_keep_digests_and_code_edits_change_exactly_the_importers(tmp_path: Path) -> None:
    pkg = tmp_path / "rcg"
    shutil.copytree(ROOT / "rcg", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    stages = list(_pipeline_stages())
    before = provenance.stage_digests(stages, pkg)

    rdm = pkg / "rdm.py"
    source = rdm.read_text()
    # Comments, the module docstring and a function docstring change; the code does not.
    edited = '"""A rewritten module docstring."""\n# a new comment\n' + source.split('"""', 2)[2].lstrip("\n")
    edited = edited.replace("\n    \"\"\"", "\n    \"\"\"Reworded. ", 1)
    assert edited != source
    rdm.write_text(edited + "\n# trailing comment\n")
    assert provenance.stage_digests(stages, pkg) == before

    rdm.write_text(edited + "\n_PROBE = 1\n")  # a real code change
    after = provenance.stage_digests(stages, pkg)
    changed = {s for s in stages if after[s] != before[s]}
    graph = provenance.import_graph(provenance.module_index(pkg))
    importers = {s for s in stages if "rcg.rdm" in provenance.stage_modules(s, graph)}
    assert changed == importers
    assert "train_rdm" in changed and "shard" not in changed


def test_static_analysis_follows_lazy_relative_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "rcg"
    files = {
        "__init__.py": "",
        "cli.py": "import argparse\nfrom rcg import io\n",
        "launch.py": "from .io import x\n",
        "io.py": "x = 1\n",
        "stages/__init__.py": "",
        "stages/a.py": "def run():\n    from ..metrics import frechet\n    import rcg.sub.deep as d\n",
        "stages/b.py": "from rcg.unused import y\n",
        "metrics/__init__.py": "from . import helpers\n",
        "metrics/frechet.py": "",
        "metrics/helpers.py": "",
        "sub/__init__.py": "",
        "sub/deep.py": "import numpy\n",
        "unused.py": "y = 2\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = provenance.import_graph(provenance.module_index(pkg))
    assert provenance.stage_modules("a", graph) == [
        "rcg", "rcg.cli", "rcg.io", "rcg.launch", "rcg.metrics", "rcg.metrics.frechet",
        "rcg.metrics.helpers", "rcg.stages", "rcg.stages.a", "rcg.sub", "rcg.sub.deep",
    ]
    with pytest.raises(FileNotFoundError, match="rcg.stages.nope"):
        provenance.stage_modules("nope", graph)


def test_rcg_code_writes_one_digest_per_stage(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "rcg", tmp_path / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "code", "shard", "train_rdm"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / provenance.DIGEST_DIR / "train_rdm.txt").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    modules = [ln.split()[0] for ln in lines[:-1]]
    assert "rcg.rdm" in modules and "rcg.cli" in modules and "rcg.launch" in modules
    assert lines[-1].startswith("total ") and (tmp_path / provenance.DIGEST_DIR / "shard.txt").exists()
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "code", "nope"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "rcg.stages.nope" in r.stderr
