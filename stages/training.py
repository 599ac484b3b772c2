"""What pre-training and fine-tuning share: a query model's forward and losses, the learning-rate schedule,
distributed set-up, checkpoints, metrics logs and the finite-loss check."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from stages.code_version import code_version
from stages.settings import LoopConfig, Schedule  # noqa: F401 (Schedule: its users import it from here too)

log = logging.getLogger(__name__)


def config_dict(cfg) -> dict:
    """A run's dataclass config as plain values (paths as strings), for the checkpoint's 'args'."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def forward_losses(model, images: torch.Tensor, targets: list[dict], device: str, prompt_fn=None):
    """A query model's forward (bf16 autocast on CUDA) and its losses, in float32: (stages, losses,
    assignments). `model` may be wrapped in DistributedDataParallel (the forward must go through it)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        stages, _ = model(images, prompt_fn=prompt_fn)
    stages = [{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in stages]
    core = model.module if isinstance(model, DistributedDataParallel) else model
    losses, assignments = core.losses(stages, targets)
    return stages, losses, assignments


@contextlib.contextmanager
def step_rng(seed: int, step: int, rank: int, device: str):
    """Inside, the global RNGs (CPU and the training GPU) start from a state fixed by (seed, step, rank), and
    they are restored on exit: randomness inside a model's forward and losses (Mask2Former's point
    sampling) is then the same in a resumed run as in an uninterrupted one."""
    devices = []
    if device.startswith("cuda"):
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
        yield


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


def read_checkpoint(path: Path, option: str, map_location: str = "cpu", mmap: bool = False) -> dict:
    """A checkpoint dict written by `sp pretrain` or `sp finetune` (its 'kind' says which); anything else is a
    ValueError naming the option and the file. mmap: tensors stay on disk until used (reading settings only)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean: not a checkpoint we can read
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{option} {path} is not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict) or "kind" not in state:
        raise ValueError(f"{option} {path} is not a checkpoint of `sp pretrain` or `sp finetune` (a bare state "
                         "dict or another tool's file: backbone weights go to --backbone-weights)")
    return state


# Settings a resumed run may change: where and how it runs, not what it computes. `epochs` may grow: the
# schedule and the data order do not depend on it, so a longer resumed run equals a longer run. A store may
# move: pre-training compares its settings hash instead. Other paths are compared as given.
RESUMABLE_CHANGES = {"out", "resume", "overwrite", "epochs", "workers", "device", "log_every", "checkpoint_every",
                     "keep_every", "eval_every", "eval_at", "skip_bad", "decode_images", "store"}
# settings added after runs were saved without them: such a run trained with the value given here
SETTINGS_ADDED_LATER = {"min_mask_area": 0.0, "init_reset": ()}
RUN_FILES = ("last.pth", "final.pth", "best.pth", "metrics.jsonl", "curve.png", "eval.json", "skipped.json", "tb")


def _run_files(out: Path) -> list[Path]:
    """The files of a run that `train_loop` (and fine-tuning) write into its folder."""
    if not out.is_dir():
        return []
    return sorted([out / name for name in RUN_FILES if (out / name).exists()] + list(out.glob("epoch_*.pth"))
                  + list(out.glob("*.pth.tmp")))


def prepare_run_folder(loop: LoopConfig, kind: str, settings: dict, main: bool = True) -> None:
    """`check_run_folder` in every process, then a barrier under torchrun: the main process writes its first
    record only once every process has checked the folder, so that no process finds that record and refuses
    the folder as another run's."""
    check_run_folder(loop, kind, settings, main)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_run_folder(loop: LoopConfig, kind: str, settings: dict, main: bool = True) -> None:
    """Refuse an output folder that holds another run, before anything is written into it.

    An empty or new folder is used as it is. One holding a run is continued with `resume` when that run has the
    same kind and settings (see RESUMABLE_CHANGES), replaced with `overwrite` (only the run's own files are
    deleted), and refused otherwise, naming what differs. kind: the checkpoint kind, e.g. 'sp-finetune';
    main: whether this process deletes (every process checks, one deletes)."""
    out = Path(loop.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    found = _run_files(out)
    if not found:
        return
    last = out / "last.pth"
    if loop.resume and not last.exists():
        return  # stopped before its first checkpoint: train_loop starts over
    reason = "it holds a run already (" + ", ".join(p.name for p in found[:4]) + ")"
    if loop.resume:
        state = read_checkpoint(last, "--resume", mmap=True)
        old = state.get("args", {})
        old = {**{k: v for k, v in SETTINGS_ADDED_LATER.items() if k in settings}, **old}
        differ = sorted(k for k in old.keys() | settings.keys() if k not in RESUMABLE_CHANGES
                        and old.get(k) != settings.get(k))
        if state["kind"] != kind:
            reason = f"it holds a {state['kind']} run, not a {kind} one"
        elif differ:
            reason = "it holds a run with other settings (" + ", ".join(
                f"{k}: run={old.get(k)!r} now={settings.get(k)!r}" for k in differ[:5]) + ")"
        elif state.get("epoch", 0) > loop.epochs:
            reason = f"its last.pth is at epoch {state['epoch']}, past --epochs {loop.epochs}"
        else:
            return
    if not loop.overwrite:
        hint = "use another --out, or --overwrite to replace it" if loop.resume else \
            "pass --resume to continue it, --overwrite to replace it, or use another --out"
        raise ValueError(f"--out {out}: {reason}; {hint}")
    if not main:
        return
    log.warning("--overwrite: deleting the run in %s (%s)", out, reason)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash while saving never leaves a truncated checkpoint behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def link_checkpoint(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link, a copy where links are not possible), without
    a second copy on disk; safe because checkpoints are replaced, never rewritten in place."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop before a NaN or inf reaches the weights, naming the step and the loss term."""
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v).all()}
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

    def has_epoch_end(self, epoch: int, step: int) -> bool:
        """Whether the log holds the record of the end of `epoch` (what `on_epoch_end` returned, e.g. its
        evaluation), the epoch having ended at `step`: a record of that step and epoch that is no event (start,
        resume) and no training record (those carry the epoch being trained, one less). False where this
        process does not log."""
        if not self.enabled or not self.path.exists():
            return False
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return any(r.get("step") == step and r.get("epoch") == epoch and "event" not in r for r in records)



class EpochSampler(Sampler):
    """A permutation fixed by (seed, epoch), split across ranks, that can start part-way through an epoch:
    a resumed run skips exactly the batches it had already trained on."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return math.ceil(self.size / (self.batch_size * self.world_size))

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        per_rank = self.batches_per_epoch() * self.batch_size
        order = order.repeat(math.ceil(per_rank * self.world_size / self.size))[:per_rank * self.world_size]
        mine = order[self.rank::self.world_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self):
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


def train_loop(loop: LoopConfig, dist: Dist, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
               dataset, collate: Callable, loss_fn: Callable[[dict, int], dict[str, torch.Tensor]],
               extra_state: dict, check_resume: Callable[[dict], None] | None = None,
               on_epoch_end: Callable[[int], dict] | None = None, manual_sync: list[torch.nn.Module] = ()) -> Path:
    """The shared training loop: deterministic epoch sampler, lr schedule, finite-loss check, clipping,
    metrics, checkpoints (`last.pth` every epoch and every `checkpoint_every` steps, `epoch_NNN.pth` every
    `keep_every` epochs) and exact resume from `last.pth`. Returns the path of `final.pth`.

    modules: saved and restored by name; loss_fn(batch, step) → named losses; on_epoch_end(epoch) → metrics
    to log (e.g. evaluation), {} when there is nothing to log; manual_sync: modules outside DDP whose gradients
    are averaged by hand.

    An epoch's checkpoint is saved before its on_epoch_end (an evaluation may link it as best.pth). A run
    stopped in between (killed during the evaluation) calls on_epoch_end for that epoch again on resume, before
    it trains on, when the log has no record of it: the learning curve has no hole and the last epoch's
    evaluation is not skipped. on_epoch_end must therefore bear being called again for an epoch whose call
    logged nothing (processes other than the main one, which keeps no log, always call it again).
    """
    loop.out.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    sampler = EpochSampler(len(dataset), loop.batch_size, loop.seed, dist.rank, dist.world_size)
    epoch, step, start_batch = 0, 0, 0
    last = loop.out / "last.pth"
    if loop.resume and last.exists():
        state = read_checkpoint(last, "--resume", map_location=dist.device)
        if check_resume is not None:
            check_resume(state)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, start_batch = state["epoch"], state["step"], state["batch_in_epoch"]
        log.info("resumed from %s at epoch %d, step %d", last, epoch, step)
    elif loop.resume:
        log.warning("--resume: no %s yet, starting from scratch", last)
    metrics = MetricsLog(loop.out, enabled=dist.main)
    metrics.truncate_after(step)
    # marks where the run started or continued, with the code it runs: a resumed run's wall time leaves out the
    # pause (stages/report.run_minutes) and a table does not average seeds of different code unawares
    metrics.write({"step": step, "epoch": epoch, "event": "resume" if step else "start", "code_version": code_version()})

    def end_epoch(epoch_: int) -> None:
        record = on_epoch_end(epoch_) if on_epoch_end is not None else {}
        if record:
            metrics.write({"step": step, "epoch": epoch_, **record})

    def checkpoint(epoch_: int, batch_in_epoch: int):
        if not dist.main:
            return
        state = {**{n: m.state_dict() for n, m in modules.items()}, "optimizer": optimizer.state_dict(),
                 "epoch": epoch_, "step": step, "batch_in_epoch": batch_in_epoch, "code_version": code_version(),
                 **extra_state}
        save_checkpoint(last, state)
        if batch_in_epoch == 0 and loop.keep_every and epoch_ % loop.keep_every == 0:
            link_checkpoint(last, loop.out / f"epoch_{epoch_:03d}.pth")

    if on_epoch_end is not None and epoch > 0 and start_batch == 0 and not metrics.has_epoch_end(epoch, step):
        log.info("the run stopped after the checkpoint of epoch %d, before its end was logged: ending it now", epoch)
        end_epoch(epoch)
    per_epoch = sampler.batches_per_epoch()
    bar = tqdm(total=loop.epochs * per_epoch, initial=step, unit="step", desc=f"{loop.out.parent.name}/{loop.out.name}",
               disable=not dist.main)
    while epoch < loop.epochs:
        sampler.set_epoch(epoch, start_batch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=loop.batch_size, sampler=sampler, num_workers=loop.workers,
                            collate_fn=collate)
        for module in modules.values():
            module.train()
        tick, dropped, small = time.perf_counter(), 0, 0
        for batch_in_epoch, batch in enumerate(loader, start=start_batch):
            dropped += batch.get("dropped_targets", 0)
            small += batch.get("small_masks", 0)
            set_lr(optimizer, loop.schedule.factor(step, epoch))
            with step_rng(loop.seed, step, dist.rank, dist.device):
                losses = loss_fn(batch, step)
            check_finite(losses, step)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for module in manual_sync if dist.world_size > 1 else ():
                for p in module.parameters():
                    if p.grad is not None:
                        dist_all_reduce_mean(p.grad, dist.world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, loop.clip_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % loop.log_every == 0 or batch_in_epoch + 1 == per_epoch:
                rate = loop.batch_size * dist.world_size * (batch_in_epoch + 1 - start_batch) / (time.perf_counter() - tick)
                value = float(loss.detach())
                metrics.write({"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": value,
                               "grad_norm": float(grad_norm), "img_per_s": rate, "cpu_s": time.process_time(),
                               **{k: float(v.detach()) for k, v in losses.items()}})
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.2f}")
            if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                checkpoint(epoch, batch_in_epoch + 1)
        if dropped:
            log.info("epoch %d: %d object(s) with no pixel left at the training resolution were left out of the "
                     "targets", epoch + 1, dropped)
            metrics.write({"step": step, "epoch": epoch, "dropped_targets": dropped})
        if small:
            log.info("epoch %d: %d pseudo mask(s) under --min-mask-area were left out", epoch + 1, small)
            metrics.write({"step": step, "epoch": epoch, "small_masks": small})
        epoch, start_batch = epoch + 1, 0
        checkpoint(epoch, 0)
        end_epoch(epoch)
    bar.close()
    final = loop.out / "final.pth"
    if dist.main:
        link_checkpoint(last, final)
        log.info("training done: %s", final)
    return final


def dist_all_reduce_mean(tensor: torch.Tensor, world_size: int) -> None:
    torch.distributed.all_reduce(tensor)
    tensor /= world_size
