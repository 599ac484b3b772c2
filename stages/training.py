"""What pre-training and fine-tuning share: the learning-rate schedule, distributed set-up, checkpoints,
metrics logs and the finite-loss check."""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Linear warm-up from lr × warmup_ratio over `warmup_steps`, then × gamma at each epoch in `lr_steps`."""

    warmup_steps: int = 1000
    lr_steps: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    warmup_ratio: float = 0.001

    def factor(self, step: int, epoch: int) -> float:
        decay = self.gamma ** sum(epoch >= e for e in self.lr_steps)
        if step < self.warmup_steps:
            return decay * (self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_steps)
        return decay


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU;
    each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=dist.get_rank(), world_size=world, device=device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash while saving never leaves a truncated checkpoint behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop before a NaN or inf reaches the weights, naming the step and the loss term."""
    bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v).all()}
    if bad:
        terms = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise FloatingPointError(f"non-finite loss at step {step}: {terms}; the last checkpoint is unchanged "
                                 "(lower --lr, check the data, or resume from it)")


class MetricsLog:
    """A plain `metrics.jsonl` (one JSON object per record) plus TensorBoard scalars when tensorboard is
    installed. Only the main process writes."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                log.debug("tensorboard is not installed: writing metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, record.get("step", 0))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the log reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

