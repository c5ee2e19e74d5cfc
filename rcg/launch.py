"""Multi-GPU launch: re-execute a training stage under `torchrun` when the config asks for N processes.

torchrun / DDP is the distributed engine of every training stage (docs/design.md); nothing
home-made replaces it. `rcg train-generator` run by DVC is a single process; when more than one
process per node is wanted, the CLI calls `maybe_relaunch` first, which replaces the process by
`torchrun --standalone --nproc_per_node N -m rcg.cli <same arguments>`. Inside torchrun every rank
sees LOCAL_RANK / WORLD_SIZE and rcg.training.setup_distributed does the rest. DVC still sees one
command with one exit code, so `dvc repro` and the Prefect flow need no change.

Multi-node runs are started by the cluster's launcher on every node (see README, Orchestration):
`torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m rcg.cli ...`;
`torchrun_command(..., nnodes=2, node_rank=R, rdzv_endpoint=...)` builds exactly that line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from rcg.io import PipelineError

log = logging.getLogger(__name__)

# Set by torchrun in every worker: their presence means "already launched, do not launch again".
TORCHRUN_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def under_torchrun() -> bool:
    """Whether this process is a torchrun worker."""
    return any(k in os.environ for k in TORCHRUN_ENV)


def resolve_nproc(nproc: int | str) -> int:
    """`nproc` as a number: an int >= 1; "auto" or 0 = one process per visible GPU (1 without GPUs)."""
    if nproc in ("auto", 0):
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(nproc)
    except (TypeError, ValueError):
        raise PipelineError(f"nproc: expected an integer or 'auto', got {nproc!r}") from None
    if n < 1:
        raise PipelineError(f"nproc: expected at least 1, got {n}")
    return n


def torchrun_command(
    nproc: int,
    args: Sequence[str],
    *,
    module: str = "rcg.cli",
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "rcg",
) -> list[str]:
    """The torchrun command line running `python -m <module> <args>` on `nproc` processes per node.

    One node: `--standalone` (a local rendezvous on a free port). Several nodes: a c10d rendezvous
    at `rdzv_endpoint` (host:port of node 0), the same command on every node with its `node_rank`.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise PipelineError("multi-node torchrun needs rdzv_endpoint (host:port of node 0)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return cmd + ["-m", module, *args]


def maybe_relaunch(
    nproc: int | str,
    args: Sequence[str],
    *,
    module: str = "rcg.cli",
    execv: Callable[[str, list[str]], object] = os.execv,
) -> bool:
    """Replace this process by torchrun with `nproc` workers, unless one process is enough.

    Returns False (the caller goes on in this process) when nproc resolves to 1 or when already
    running under torchrun; otherwise it does not return (`execv` replaces the process; tests pass
    their own `execv`, and then True is returned).
    """
    n = resolve_nproc(nproc)
    if n <= 1 or under_torchrun():
        return False
    cmd = torchrun_command(n, args, module=module)
    log.info("relaunching under torchrun with %d processes: %s", n, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    execv(cmd[0], cmd)
    return True
