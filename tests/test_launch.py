"""rcg.launch: training stages re-executed under torchrun (single node, multi-node command lines)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def test_torchrun_command_lines() -> None:
    from rcg.launch import torchrun_command

    one = torchrun_command(4, ["train-generator", "--condition", "rep"])
    assert one[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone"]
    assert one[-5:] == ["-m", "rcg.cli", "train-generator", "--condition", "rep"]
    multi = torchrun_command(8, ["train-rdm"], nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    assert "--nnodes=2" in multi and "--node_rank=1" in multi and "--rdzv_endpoint=node0:29500" in multi
    with pytest.raises(Exception, match="rdzv_endpoint"):
        torchrun_command(8, ["train-rdm"], nnodes=2)


def test_relaunch_runs_every_rank_under_torchrun(tmp_path: Path, monkeypatch) -> None:
    """nproc 2 -> a real torchrun with 2 workers; nproc 1 or inside torchrun -> no relaunch."""
    from rcg.launch import maybe_relaunch

    for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    assert maybe_relaunch(1, ["x"], execv=lambda *a: calls.append(a)) is False and not calls
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert maybe_relaunch(0, ["x"], execv=lambda *a: calls.append(a)) is False and not calls  # auto, no GPU
    (tmp_path / "probe.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path('rank%s-of-%s' % (os.environ['RANK'], os.environ['WORLD_SIZE'])).touch()\n"
        "from rcg.launch import maybe_relaunch\n"
        "assert maybe_relaunch(2, [], execv=None) is False  # already under torchrun\n"
    )

    def run(path: str, cmd: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=120, capture_output=True)

    assert maybe_relaunch(2, [], module="probe", execv=run) is True
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
