"""Shared test set-up: offline, CPU-only, quiet telemetry, and a tiny Fashion-MNIST workspace.

`tiny_workspace` is a session-wide project folder (params.yaml with the tiny preset's values) whose
shards were built by the real shard stage from the Debian Fashion-MNIST files; tests that need
shards chdir into a copy-free view of it with `in_workspace`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}.items():
    os.environ[_k] = _v
# Per-machine caches (the bf16/fp32 choice of rcg.precision) go to a folder of this test session.
os.environ["RCG_CACHE_DIR"] = tempfile.mkdtemp(prefix="rcg-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def tiny_params(**blocks: dict) -> str:
    """A params.yaml text as `rcg params --preset tiny` writes it, with the given block overrides.

    The overrides are merged unchecked (a block may even be replaced by a non-mapping), so tests
    can hand the loader bad values too.
    """
    from rcg import config

    values: dict = config.params_values(config.preset_config("tiny"))
    for name, block in blocks.items():
        merged = {**values[name], **block} if isinstance(block, dict) and name in values else block
        values[name] = merged
    return config.render_params(values, "tiny", "tests.conftest.tiny_params")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (modules with small tensors opt in with `usefixtures`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with tiny-preset Fashion-MNIST shards, built once per test session."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{FMNIST_DIR}: Fashion-MNIST missing; `make test` installs dataset-fashion-mnist")
    ws = tmp_path_factory.mktemp("tiny")
    (ws / "params.yaml").write_text(tiny_params())
    from rcg import config
    from rcg.stages import shard

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        shard.run(config.load("params.yaml"))
    finally:
        os.chdir(cwd)
    return ws


@pytest.fixture
def in_workspace(tiny_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder sharing the session's shards (symlinked), as the working directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(tiny_workspace / "data" / "shards")
    shutil.copy(tiny_workspace / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the Prefect tests last.

    Prefect's in-process test server leaves the interpreter in a state where DataLoader workers
    forked afterwards exit with code 1 when they shut down (seen with prefect 3.8.8); the stages
    never meet this, because DVC and Prefect run them as separate processes.
    """
    items.sort(key=lambda item: getattr(item.module, "__name__", "").endswith("test_flows"))
