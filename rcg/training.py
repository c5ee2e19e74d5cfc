"""The one training loop every trained model of the pipeline goes through.

The MoCo v3 encoder, the RDM (paper section 3.2), the image generators (section 3.3) and the
evaluation network all train with `fit`: a stage supplies its model, its optimiser (`adamw`), an
iterator of ready batches and a `loss(model, batch, step)`; the loop does the rest, the same way for
all of them: torchrun/DDP wrapping, bf16 autocast, gradient accumulation, gradient clipping, a
non-finite-loss check, EMA, one learning-rate schedule (`lr_at`), the loss averaged over steps and
all-reduced over ranks before it is logged, a progress bar, MLflow step metrics, the training curve
as a file DVC plots (rcg.metrics.plots), and resumable checkpoints. On CUDA it also takes TF32
matmuls and an optional `torch.compile` of the model (`setup_distributed`); on CPU neither applies.

Resume is exact: a checkpoint holds the model, EMA, optimiser, every RNG stream (torch, numpy,
python, and the stage's own generators) and the step, and the stage's data iterator is rebuilt at
that step (`data(start)`). On CPU a run that is interrupted and resumed ends with the same weights,
bit for bit, as one that is not (tests/test_training.py). Checkpoints hold only tensors and plain
Python values and are read with `weights_only=True`, so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcg.io import PipelineError, atomic_path, weights_only_reason
from rcg.metrics.plots import Curve, CurveTracker

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "rcg-checkpoint-2"


# --------------------------------------------------------------------------------------------------
# torchrun / DDP
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool = False  # `fit` trains through torch.compile(model) (dist.compile)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(tf32: bool = True, compile: bool = False) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (NCCL on GPU, gloo on CPU).

    On CUDA, `tf32` (dist.tf32) lets fp32 matmuls and convolutions use TF32 tensor cores
    (`use_tf32`); `compile` (dist.compile) makes `fit` train through torch.compile. Neither changes
    anything on CPU, except that `compile` compiles there too when asked.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        use_tf32(tf32)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device, compile)


def use_tf32(enabled: bool) -> None:
    """TF32 for CUDA fp32 matmuls (cuBLAS) and convolutions (cuDNN): ~10 mantissa bits instead of
    23, several times the fp32 throughput on Ampere and later GPUs. The parts of a step outside bf16
    autocast (fp32 runs, the EMA, the optimiser) are what it speeds up. The legacy `allow_tf32` flags
    are set, not the newer `fp32_precision` ones: torch refuses to read one kind after the other was
    set, and libraries (diffusers) read the legacy ones. CUDA-only flags: CPU maths is untouched."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


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
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (for state dicts and EMA)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets `seed + rank`, as the reference does."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def adamw(params: Any, lr: float, *, device: torch.device, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.01, cpu_fused: bool = False) -> torch.optim.AdamW:
    """AdamW (the optimiser of every recipe) for parameters on `device`: the fused single-kernel
    update on CUDA; on CPU the fused one only where the recipe asks (`cpu_fused`, where it measured
    faster), else torch's default per-tensor loop, so each recipe's CPU run stays what it was."""
    fused = True if device.type == "cuda" or cpu_fused else None
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision: bf16 autocast on CPU and GPU (bf16 needs no GradScaler)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Schedule and EMA
# --------------------------------------------------------------------------------------------------

Decay = Literal["constant", "cosine", "linear"]


def lr_at(step: int, total: int, base: float, warmup: int = 0, decay: Decay = "constant",
          decay_frac: float = 0.0) -> float:
    """The learning rate at optimiser step `step` (0-based) of `total`, for peak rate `base`.

    Linear warm-up over `warmup` steps, then one of: `constant` (the reference RDM and DiT),
    `cosine` (a half cosine to zero over the remaining steps: MoCo v3), or `linear` (constant, then
    a linear decay to zero over the last `decay_frac` of the steps). A pure function of the step, so
    a resumed run continues on the same schedule.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    if decay == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    decay_steps = round(decay_frac * total) if decay == "linear" else 0
    if decay_steps > 0 and step >= total - decay_steps:
        return base * min(1.0, (total - step) / decay_steps)
    return base


class EMA:
    """Exponential moving average of a model's weights (the reference's LitEma; DiT's update_ema).

    With `warmup=True` the decay at update n is min(decay, (1 + n) / (10 + n)), so early averages
    are not dominated by the random initialisation; the reference RDM does this, DiT does not.
    The floating-point tensors are updated in one fused `_foreach_lerp_` (the same arithmetic as a
    lerp per tensor, without a Python loop over them every step).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self._source: nn.Module | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def _tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(EMA floats, model floats, EMA others, model others), matched by name, cached per model."""
        if self._pairs is None or self._source is not model:
            src = model.state_dict(keep_vars=True)
            pairs: tuple[list[Tensor], ...] = ([], [], [], [])
            for name, ema_t in self.model.state_dict(keep_vars=True).items():
                k = 0 if ema_t.dtype.is_floating_point else 2
                pairs[k].append(ema_t)
                pairs[k + 1].append(src[name])
            self._pairs, self._source = pairs, model  # type: ignore[assignment]
        return self._pairs  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_f, src_f, ema_o, src_o = self._tensors(unwrap(model))
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        for e, t in zip(ema_o, src_o):
            e.copy_(t)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self._pairs = None


# --------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain values only, read with weights_only=True
# --------------------------------------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG stream a training step may draw from, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` captured (the stage's generators by name)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    for k, g in (generators or {}).items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file as a dict, loaded without unpickling code; a clear error otherwise."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code, EOFError/RuntimeError for damage
        raise PipelineError(
            f"{path}: not a checkpoint this project can read safely ({weights_only_reason(e)}); "
            "delete it to start over"
        ) from None


class Checkpointer:
    """Resumable training state in `<dir>/checkpoint-last.pt`, written atomically.

    `fingerprint` (a hash of what makes a checkpoint incompatible: settings and inputs) guards against
    resuming a run whose settings or data have since changed: such a checkpoint is ignored, with a
    log line saying so. The training clock is kept across runs: every save records `train_seconds`,
    the wall time of all runs that trained this checkpoint, so a run resumed at its end still
    reports the whole training.
    """

    def __init__(self, directory: str | Path, fingerprint: str = "", name: str = "checkpoint-last.pt") -> None:
        self.path = Path(directory) / name
        self.fingerprint = fingerprint
        self.seconds_before = 0.0  # training wall time of the earlier runs, set by `load`
        self._started = time.perf_counter()
        self._stopped: float | None = None

    def start_clock(self, training: bool = True) -> None:
        """Start this run's clock, or keep it at 0 when there is nothing left to train."""
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
        """Write `state` atomically; `final` (the run's last step) stops the clock first."""
        if final:
            self.stop_clock()
        state = {**state, "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
                 "train_seconds": self.train_seconds}
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write a kill cut short
            stale.unlink(missing_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The saved state, or None when there is none or it belongs to other settings."""
        if not self.path.exists():
            return None
        state = read_checkpoint(self.path, map_location)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            log.warning("%s was written by another version of this project; starting over", self.path)
            return None
        if state.get("fingerprint", "") != self.fingerprint:
            log.warning("%s was written with other settings or data; starting over", self.path)
            return None
        self.seconds_before = float(state.get("train_seconds", 0.0))
        return state


def fingerprint(*objs: Any) -> str:
    """A short stable hash of config objects (dataclasses or plain data), for `Checkpointer`."""
    import dataclasses
    import hashlib
    import json

    plain = [dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in objs]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

Loss = Callable[[nn.Module, Any, int], Tensor]  # (model, batch, step) -> scalar loss
Data = Callable[[int], Iterator[Any]]  # start step -> ready batches from that step on


@dataclass
class LoopSpec:
    """How one model trains: everything the loop needs besides the model, its data and its loss."""

    name: str  # names the run in the progress bar, log lines and errors, e.g. "train_rdm (uncond)"
    steps: int  # optimiser steps in all; raising it resumes a finished run
    lr: float  # base (peak) learning rate
    checkpoint_dir: str | Path
    fingerprint: str  # what a checkpoint must match to be resumed (settings and inputs, not `steps`)
    batch_size: int = 0  # global samples per step, for the images/s figure (0: not reported)
    # Micro-batches per optimiser step (gradient accumulation): each step averages the gradients of
    # this many batches of `data`, so per-GPU batch x GPUs x accum_steps is the global batch. 1: one
    # batch per step, the plain path. A checkpoint resumes only with the accum_steps it was written with.
    accum_steps: int = 1
    warmup_steps: int = 0
    decay: Decay = "constant"
    decay_frac: float = 0.0  # `linear` decay: the share of steps at the end over which lr falls to 0
    grad_clip: float = 0.0  # max global grad norm; 0: no clipping
    amp: bool = True  # bf16 autocast around the loss, where it measures faster here (rcg.precision)
    ema_decay: float = 0.0  # 0: no EMA
    ema_warmup: bool = True
    log_every: int = 100
    ckpt_every: int = 1000
    metric_prefix: str = ""  # MLflow metric names: <prefix>loss, <prefix>lr, ...
    config_key: str = ""  # the params block named in hints, e.g. "train_rdm"


@dataclass
class Trained:
    """What `fit` returns: the trained model (unwrapped), its EMA copy and a summary for metrics."""

    model: nn.Module
    ema: nn.Module | None
    summary: dict[str, Any] = field(default_factory=dict)


class _Run:
    """The mutable state of one `fit` call (kept out of `fit` so each piece stays short)."""

    def __init__(self, spec: LoopSpec, model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo,
                 generators: dict[str, torch.Generator] | None, curve_file: str | Path | None = None) -> None:
        self.spec, self.model, self.opt, self.info = spec, model, opt, info
        self.generators = generators or {}
        self.ema = EMA(model, spec.ema_decay, warmup=spec.ema_warmup) if spec.ema_decay > 0 else None
        # A step's data position depends on accum_steps, so a checkpoint records it in its fingerprint
        # (not for 1: checkpoints written before accumulation existed stay resumable).
        accum = f"/accum{spec.accum_steps}" if spec.accum_steps != 1 else ""
        self.ckpt = Checkpointer(spec.checkpoint_dir, spec.fingerprint + accum)
        self.ddp: nn.Module = model  # the DDP wrapper in `fit` (for no_sync), else the model
        self.step = self.start = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        self.loss_count = 0
        self.last_loss = float("nan")
        self.rng: dict[str, Any] | None = None
        self.bf16: bool | None = None  # the precision this run trains in (a resumed run keeps its own)
        self.curve = Curve(curve_file) if curve_file is not None and info.is_main else None

    def resume(self) -> None:
        """Load the checkpoint's tensors (the RNG streams are restored later, see `fit`) and start the
        curve file at the checkpoint's step (empty without one)."""
        state = self.ckpt.load(self.info.device)
        if state is not None and int(state["step"]) > self.spec.steps:
            log.warning("%s: %s is at step %d, past the %d steps asked for; starting over",
                        self.spec.name, self.ckpt.path, state["step"], self.spec.steps)
            self.ckpt.seconds_before = 0.0
            state = None
        if self.curve is not None:  # the checkpoint's rows (an older version's has none: the curve starts there)
            rows, step = (state.get("curve", []), int(state["step"])) if state is not None else ([], 0)
            self.curve.restart(rows, step)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = self.start = int(state["step"])
        self.loss_sum.fill_(float(state["loss_sum"]))
        self.loss_count, self.last_loss = int(state["loss_count"]), float(state["last_loss"])
        self.rng = state["rng"]
        self.bf16 = state.get("bf16")
        log.info("%s: resuming from %s at step %d", self.spec.name, self.ckpt.path, self.step)

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "loss_sum": float(self.loss_sum), "loss_count": self.loss_count, "last_loss": self.last_loss,
                 "rng": rng_state(self.generators), "bf16": self.bf16,
                 "curve": [] if self.curve is None else self.curve.rows}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        self.ckpt.save(state, final=self.step == self.spec.steps)

    def check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            key = f"{self.spec.config_key}.lr" if self.spec.config_key else "the learning rate"
            raise PipelineError(
                f"{self.spec.name}: the loss became {value} before step {self.step} (last finite mean "
                f"{self.last_loss:.4g}); nothing was saved from this point; lower {key} or check the inputs"
            )

    def mean_loss(self) -> float:
        """The mean loss since the last log line, averaged over every rank."""
        total = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64,
                                                         device=self.loss_sum.device)])
        if self.info.distributed:
            dist.all_reduce(total)
        value = float(total[0] / total[1]) if float(total[1]) > 0 else float("nan")
        self.loss_sum.zero_()
        self.loss_count = 0
        return value


def _train_step(run: _Run, model: nn.Module, loss_fn: Loss, micro: list[Any]) -> None:
    """One optimiser step over `micro` (spec.accum_steps batches): lr, autocast loss, backward of
    each batch's loss / accum_steps (DDP all-reduces the gradients after the last one only), clipping,
    update, EMA. With one batch this is the plain step, unchanged bit for bit."""
    spec = run.spec
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, spec.steps, spec.lr, spec.warmup_steps, spec.decay, spec.decay_frac)
    run.opt.zero_grad(set_to_none=True)
    n, losses = len(micro), []
    for i, batch in enumerate(micro):
        sync = i == n - 1 or not isinstance(run.ddp, nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else run.ddp.no_sync():
            with autocast(run.info.device, bool(run.bf16)):
                loss = loss_fn(model, batch, run.step)
            (loss if n == 1 else loss / n).backward()
        losses.append(loss.detach())
    if spec.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    run.opt.step()
    if run.ema is not None:
        run.ema.update(run.model)
    run.loss_sum += losses[0].double() if n == 1 else torch.stack(losses).double().mean()
    run.loss_count += 1
    run.step += 1


def _log(run: _Run, tracker: Any, bar: Any, extras: Callable[[int], dict[str, float]] | None) -> None:
    """Every `log_every` steps: the all-reduced mean loss to the bar, the log, the curve file and MLflow."""
    run.last_loss = loss = run.mean_loss()
    run.check_finite(loss)
    spec = run.spec
    values = {"loss": loss, "lr": run.opt.param_groups[0]["lr"]}
    seconds = run.ckpt.seconds_this_run
    if spec.batch_size and seconds > 0:
        values["images_per_s"] = (run.step - run.start) * spec.batch_size / seconds
    if extras is not None:
        values.update(extras(run.step))
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", **({"img_s": f"{values['images_per_s']:.0f}"}
                                               if "images_per_s" in values else {}))
    if run.curve is not None:
        run.curve.add(run.step, values)
    if tracker is not None:
        tracker.log_metrics({f"{spec.metric_prefix}{k}": v for k, v in values.items()}, step=run.step)


def fit(
    spec: LoopSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Loss,
    data: Data,
    info: DistInfo,
    tracker: Any = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    extras: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[int, nn.Module | None], None] | None = None,
) -> Trained:
    """Train `model` for `spec.steps` optimiser steps, resuming from its checkpoint if there is one.

    `data(start)` returns an iterator of ready batches from batch `start` on (anything the stage's
    `loss` takes); each step takes `spec.accum_steps` of them, so a run resumed at step k asks for
    batch k x accum_steps. It is called before the RNG streams are restored, so whatever it draws at
    start (a DataLoader's base seed) is drawn the same way in a fresh and in a resumed run. `generators`
    are the stage's own RNG streams, saved and restored with the global ones. `extras(step)` adds
    values to each log line; `on_step(step, ema_model)` runs after every step on rank 0 (e.g. for
    sample grids). A `CurveTracker` as `tracker` also gets the run's curve file (`Curve`). With
    `info.compile` the steps run through torch.compile (`compiled`); checkpoints, the EMA and the
    returned model are the bare module, with its own state-dict names.
    """
    curve_file, tracker = (tracker.path, tracker.tracker) if isinstance(tracker, CurveTracker) else (None, tracker)
    run = _Run(spec, model, optimizer, info, generators, curve_file)
    run.resume()
    ddp = run.ddp = wrap_ddp(model, info)
    step_model = compiled(ddp) if info.compile else ddp
    batches = data(run.step * spec.accum_steps) if run.step < spec.steps else iter(())
    if run.rng is not None:
        set_rng_state(run.rng, run.generators)
    first = _precision(run, model, loss, batches) if run.step < spec.steps else None
    bar = None
    if info.is_main and run.step < spec.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, initial=run.step, desc=spec.name, unit="step", dynamic_ncols=True)
    run.ckpt.start_clock(training=run.step < spec.steps)
    cpu0 = time.process_time()
    ddp.train()
    while run.step < spec.steps:
        micro = [first if first is not None else next(batches)] + [next(batches) for _ in range(spec.accum_steps - 1)]
        first = None
        _train_step(run, step_model, loss, micro)
        if bar is not None:
            bar.update(1)
        if run.step % spec.log_every == 0 or run.step == spec.steps:
            _log(run, tracker, bar, extras)
        if info.is_main and (run.step % spec.ckpt_every == 0 or run.step == spec.steps):
            run.check_finite(float(run.loss_sum))
            run.save()
        if on_step is not None and info.is_main:
            on_step(run.step, None if run.ema is None else run.ema.model)
    if bar is not None:
        bar.close()
    del batches  # stops DataLoader workers before the stage goes on
    return Trained(unwrap(ddp), None if run.ema is None else run.ema.model, _summary(run, cpu0))


def compiled(module: nn.Module) -> nn.Module:
    """`module` wrapped by torch.compile (dist.compile) for the training steps. A wrapper, not an
    in-place compile: the bare module (checkpoints, EMA, what `fit` returns) keeps its state-dict
    names and runs eagerly wherever it is used after training."""
    return torch.compile(module)


def _precision(run: _Run, model: nn.Module, loss: Loss, batches: Iterator[Any]) -> Any:
    """Decide bf16 or fp32 for this run (rcg.precision) unless the spec or a checkpoint fixed it;
    returns the first batch when the decision needed it, so that it is trained on, not lost."""
    if not run.spec.amp:
        run.bf16 = False
    if run.bf16 is not None:
        return None
    from rcg.precision import choose_bf16

    first = next(batches)
    info = run.info
    run.bf16 = choose_bf16(run.spec.name, model, loss, first, run.step, info.device, info.distributed, info.is_main,
                           run.generators)
    return first


def _summary(run: _Run, cpu0: float) -> dict[str, Any]:
    """What every training stage reports about its run (metrics files, MLflow)."""
    seconds = run.ckpt.stop_clock()
    trained = run.step - run.start
    return {
        "steps": run.step,
        "resumed_from": run.start or None,
        "steps_this_run": trained,
        "train_seconds_total": round(run.ckpt.train_seconds, 2),  # every run of this checkpoint
        "train_seconds_this_run": round(seconds, 2),
        # CPU seconds of this process (its threads, not loader workers): on a shared machine this,
        # not the wall time, shows what a run costs.
        "train_cpu_seconds_this_run": round(time.process_time() - cpu0, 1),
        "images_per_s": round(trained * run.spec.batch_size / seconds, 1) if trained and run.spec.batch_size else None,
        "final_loss": run.last_loss if math.isfinite(run.last_loss) else None,
        "precision": None if run.bf16 is None else ("bf16" if run.bf16 else "fp32"),
    }
