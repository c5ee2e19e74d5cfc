"""What every training stage shares: torchrun/DDP set-up, seeding, EMA, resumable checkpoints.

The encoder (MoCo v3), the RDM and the image generator all train through these pieces, so resume,
EMA and distributed behaviour are the same everywhere. Launch any stage under `torchrun` unchanged:
`setup_distributed` reads the environment torchrun sets and does nothing without it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rcg.io import atomic_path, get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def cleanup_distributed() -> None:
    """Tear down the process group if `setup_distributed` made one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP-wrap `model` when running under torchrun with more than one process."""
    if not info.distributed:
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (for state dicts and EMA)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets `seed + rank` as in the reference."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision: bf16 autocast on CPU and GPU (bf16 needs no GradScaler)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_factor(step: int, total: int, warmup_steps: int = 0, decay_frac: float = 0.0) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based) of `total`.

    Linear warm-up over `warmup_steps`, then constant (the reference's RDM and DiT), then, when
    `decay_frac` > 0, a linear decay to zero over the last `decay_frac` of the steps. The factor is a
    function of the step alone, so a resumed run continues on the same schedule.
    """
    f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = round(decay_frac * total)
    if decay_steps > 0 and step >= total - decay_steps:
        f = min(f, (total - step) / decay_steps)
    return f


class EMA:
    """Exponential moving average of a model's weights (REFERENCE.md 2.3, LitEma).

    With `warmup=True` the decay at update n is min(decay, (1 + n) / (10 + n)), so early averages
    are not dominated by the random initialisation; the reference RDM does this, DiT does not.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = unwrap(model).state_dict()
        for name, ema_t in self.model.state_dict().items():
            t = src[name]
            if ema_t.dtype.is_floating_point:
                ema_t.lerp_(t.detach(), 1.0 - d)
            else:
                ema_t.copy_(t)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


class Checkpointer:
    """Resumable training state in `<dir>/checkpoint-last.pt`, written atomically.

    Holds whatever the stage passes (model, EMA, optimiser, step, RNG states); `load` returns None
    when there is nothing to resume, so a stage calls it unconditionally at start-up. The
    `fingerprint` (e.g. a hash of the stage's config block) guards against resuming a run whose
    settings have since changed: such a checkpoint is ignored, with a log line saying so.

    It also keeps the training clock across runs: every save records `train_seconds`, the wall
    time of all runs that trained this checkpoint, so a run resumed at (or near) its end still
    reports the whole training. A stage calls `start_clock` where its training loop starts and
    saves its last step with `final=True`, which stops the clock first, so that the checkpoint and
    the metrics report the same time (not the loader's shutdown or the writing of outputs). A run
    that trains nothing (resumed at its last step, to rewrite outputs) says so to `start_clock`
    and adds no time.
    """

    def __init__(
        self, directory: str | Path, fingerprint: str = "", name: str = "checkpoint-last.pt"
    ) -> None:
        self.path = Path(directory) / name
        self.fingerprint = fingerprint
        self.seconds_before = 0.0  # training wall time of the earlier runs, set by `load`
        self._started = time.perf_counter()
        self._stopped: float | None = None

    def start_clock(self, training: bool = True) -> None:
        """Mark the start of this run's training: `seconds_this_run` counts from here, or stays
        0 when `training` is False (nothing left to train)."""
        now = time.perf_counter()
        self._started, self._stopped = now, (None if training else now)

    def stop_clock(self) -> float:
        """Freeze this run's clock (the first call wins) and return `seconds_this_run`."""
        if self._stopped is None:
            self._stopped = time.perf_counter()
        return self.seconds_this_run

    @property
    def seconds_this_run(self) -> float:
        end = time.perf_counter() if self._stopped is None else self._stopped
        return end - self._started

    @property
    def train_seconds(self) -> float:
        """Training wall time of every run of this checkpoint: the earlier ones plus this one."""
        return self.seconds_before + self.seconds_this_run

    def save(self, state: dict[str, Any], final: bool = False) -> None:
        """Write `state` atomically; `final` (the run's last step) stops the clock before."""
        if final:
            self.stop_clock()
        state = dict(state)
        state["fingerprint"] = self.fingerprint
        state["train_seconds"] = self.train_seconds
        state["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location=map_location, weights_only=False)
        except Exception as e:  # a truncated file cannot come from atomic writes, but say so clearly
            raise RuntimeError(f"{self.path}: cannot read checkpoint ({e}); delete it to start over") from e
        if state.get("fingerprint", "") != self.fingerprint:
            log.warning("%s was written with other settings; starting over", self.path)
            return None
        self.seconds_before = float(state.get("train_seconds", 0.0))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        log.info("resuming from %s (step %s)", self.path, state.get("step"))
        return state


def fingerprint(*objs: Any) -> str:
    """A short stable hash of config objects (dataclasses or plain data), for `Checkpointer`."""
    import dataclasses
    import hashlib
    import json

    plain = [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in objs]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Let rank 0 do something (e.g. write a file) before the other ranks read it."""
    if info.distributed and not info.is_main:
        dist.barrier()
    yield
    if info.distributed and info.is_main:
        dist.barrier()
