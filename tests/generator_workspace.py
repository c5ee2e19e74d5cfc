"""A tiny project with everything the generator tests need: shards, encoder, features, RDMs.

Built once per test module by the real stages (tiny preset): `encoder` (a few MoCo v3 steps),
`encode` (the orig/flip cache), `train-rdm` (unconditional and class-conditional).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rcg import config


@contextmanager
def chdir(path: Path) -> Iterator[Path]:
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(cwd)


def build(tiny_workspace: Path, root: Path, rdm: bool = True) -> Path:
    """Populate `root` (shards symlinked from the session workspace) and return it."""
    import torch

    from rcg.stages import encode, encoder, train_rdm

    # Module-scoped fixtures run before function-scoped ones (e.g. a one-thread fixture); on a
    # busy 2-core machine two threads are many times slower than one.
    torch.set_num_threads(1)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "shards").symlink_to(tiny_workspace / "data" / "shards")
    shutil.copy(tiny_workspace / "params.yaml", root / "params.yaml")
    with chdir(root):
        cfg = config.load("params.yaml")
        encoder.run(cfg)
        encode.run(cfg)
        if rdm:
            train_rdm.run(cfg)
    return root


def load_cfg(**overrides: object) -> config.Config:
    """params.yaml of the current directory with dotted `--set`-style overrides."""
    items = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return config.load("params.yaml", config.parse_set(items))
