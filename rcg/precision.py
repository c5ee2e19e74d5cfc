"""Mixed precision chosen by measurement: bf16 autocast only where it is faster on this machine.

Whether bf16 autocast speeds training up depends on the hardware (CPUs with AVX512-BF16 or AMX,
recent GPUs) and on the model: small attention models can run slower in bf16 than in fp32. So a
training stage that allows mixed precision (`amp: true`) times a few forward and backward passes of
its own model on its first batch in both precisions and keeps the faster one. The decision is cached
per machine, model and batch shape (`$RCG_CACHE_DIR`, default `~/.cache/rcg/precision.json`), so
reruns on one machine make the same choice, and a resumed run keeps the one its checkpoint records.
bf16 is kept unless fp32 is clearly faster (`MARGIN`), which keeps the choice stable on a noisy,
shared machine. The probe leaves no trace: model state, gradients and every RNG stream are restored.
`RCG_PRECISION=bf16` (or `fp32`) skips the measurement, e.g. to reproduce a run of another machine
bit for bit (every metrics file of a training stage records the precision it ran in).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rcg.io import write_json

log = logging.getLogger(__name__)

MARGIN = 1.10  # fp32 is chosen only when it is this much faster than bf16
WARMUP, PROBE_STEPS = 2, 5  # passes per precision: untimed (kernel set-up), then timed


def cache_path() -> Path:
    return Path(os.environ.get("RCG_CACHE_DIR", Path.home() / ".cache" / "rcg")) / "precision.json"


def machine() -> str:
    """What the measurement holds for: the device (GPU name and TF32, or CPU model and threads) and torch."""
    if torch.cuda.is_available():
        # fp32's speed on a GPU depends on TF32 (dist.tf32), so the choice is kept per setting
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
        dev = torch.cuda.get_device_name() + (" tf32" if tf32 else "")
    else:
        cpu = platform.processor() or platform.machine()
        try:
            names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")]
            cpu = names[0] if names else cpu
        except OSError:
            pass
        dev = f"{cpu} x{torch.get_num_threads()} threads"
    return f"{dev} | torch {torch.__version__}"


def _signature(batch: Any) -> str:
    """Shapes and dtypes of the tensors in a batch (nested tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return f"{tuple(batch.shape)}:{str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "{" + ",".join(f"{k}={_signature(v)}" for k, v in sorted(batch.items())) + "}"
    if isinstance(batch, (list, tuple)):
        return "(" + ",".join(_signature(v) for v in batch) + ")"
    return type(batch).__name__


def _pass(model: nn.Module, loss: Callable[..., torch.Tensor], batch: Any, step: int, bf16: bool,
          device: torch.device) -> float:
    """Wall seconds of one forward + backward pass."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        out = loss(model, batch, step)
    out.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def probe(model: nn.Module, loss: Callable[..., torch.Tensor], batch: Any, step: int, device: torch.device,
          generators: dict[str, torch.Generator] | None = None) -> dict[str, float]:
    """The fastest of `PROBE_STEPS` passes in each precision, interleaved (the minimum is the estimate
    least disturbed by other work on a shared machine); restores the model's state, its gradients
    and the RNG streams afterwards."""
    from rcg.training import rng_state, set_rng_state

    state = copy.deepcopy(model.state_dict())  # forward passes may update buffers (BN, MoCo's keys)
    rng = rng_state(generators)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(WARMUP + PROBE_STEPS):
        for bf16 in (True, False):
            t = _pass(model, loss, batch, step, bf16, device)
            if i >= WARMUP:
                times[bf16].append(t)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    set_rng_state(rng, generators)
    return {"bf16": min(times[True]), "fp32": min(times[False])}


def choose_bf16(name: str, model: nn.Module, loss: Callable[..., torch.Tensor], batch: Any, step: int,
                device: torch.device, distributed: bool = False, is_main: bool = True,
                generators: dict[str, torch.Generator] | None = None) -> bool:
    """Whether this model trains faster under bf16 autocast on this machine (module docstring).
    Under torchrun every rank follows rank 0's decision."""
    forced = os.environ.get("RCG_PRECISION", "").strip().lower()
    if forced in ("bf16", "fp32"):
        log.info("%s: %s (RCG_PRECISION)", name, "bf16 autocast" if forced == "bf16" else "fp32")
        return forced == "bf16"
    if forced:
        raise ValueError(f"RCG_PRECISION must be bf16 or fp32, got {forced!r}")
    key = f"{machine()} | {name} | {type(model).__name__} {sum(p.numel() for p in model.parameters())} | " \
          f"{_signature(batch)}"
    path = cache_path()
    cache: dict[str, Any] = {}
    if is_main and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("%s: unreadable precision cache, measuring again", path)
    decision = [cache.get(key)]
    if distributed:
        dist.broadcast_object_list(decision, src=0)
    cached = decision[0] is not None
    if not cached:
        seconds = probe(model, loss, batch, step, device, generators)
        bf16 = seconds["fp32"] * MARGIN >= seconds["bf16"]
        decision = [{"bf16": bf16, **{f"{k}_seconds": round(v, 4) for k, v in seconds.items()}}]
        if distributed:
            dist.broadcast_object_list(decision, src=0)
        if is_main:
            cache[key] = decision[0]
            try:
                write_json(path, cache)
            except OSError as e:
                log.warning("%s: cannot cache the precision choice (%s)", path, e)
    d = decision[0]
    log.info("%s: %s (measured on this machine: bf16 %.1f ms, fp32 %.1f ms per pass%s)", name,
             "bf16 autocast" if d["bf16"] else "fp32", 1e3 * d["bf16_seconds"], 1e3 * d["fp32_seconds"],
             ", from the cache" if cached else "")
    return bool(d["bf16"])
