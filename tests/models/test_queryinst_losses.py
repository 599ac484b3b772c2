"""QueryInst's losses in a distributed run: every process divides its sums by the matched count averaged over
the processes (the reference's reduce_mean), not by its own."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.queryinst_losses import queryinst_losses


def _inputs(num_targets: int, g: torch.Generator) -> tuple[list[dict], list[dict]]:
    """One image, 4 random proposals (logits, boxes, 28x28 mask logits) and ``num_targets`` box-shaped objects."""
    xy = torch.rand(4, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + 8 + 20 * torch.rand(4, 2, generator=g)], 1)
    stage = dict(logits=torch.randn(1, 4, 3, generator=g), boxes=boxes[None],
                 masks=torch.randn(1, 4, 28, 28, generator=g), queries=torch.zeros(1, 4, 8))
    gt_xy = torch.rand(num_targets, 2, generator=g) * 30
    gt_boxes = torch.cat([gt_xy, gt_xy + 10 + 20 * torch.rand(num_targets, 2, generator=g)], 1).round()
    full = torch.zeros(num_targets, 64, 64, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(full, gt_boxes.long().tolist()):
        m[y1:y2, x1:x2] = True
    target = dict(labels=torch.randint(0, 3, (num_targets,), generator=g), boxes=gt_boxes, full_masks=full)
    return [stage, stage], [target]


def _losses_in_process(rank: int, init_file: str, inputs: list, out: str) -> None:
    """One rank of a two-process gloo group: its losses, saved for the test to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    losses, _ = queryinst_losses(*inputs[rank])
    torch.save(losses, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_distributed_processes_divide_every_term_by_the_mean_matched_count(tmp_path):
    """Ranks with 1 and 3 objects both divide by 2: after DDP averages the gradients, every matched object of
    the global batch weighs the same in the class, box and mask terms of every stage."""
    g = torch.Generator().manual_seed(0)
    inputs = [_inputs(1, g), _inputs(3, g)]
    mp.spawn(_losses_in_process, args=(str(tmp_path / "init"), inputs, str(tmp_path)), nprocs=2)
    for rank, local_count in enumerate((1, 3)):
        alone, _ = queryinst_losses(*inputs[rank])  # one process: divided by its own count
        got = torch.load(tmp_path / f"{rank}.pt")
        assert set(got) == {f"s{s}_{t}" for s in range(2) for t in ("cls", "l1", "giou", "dice")}
        for key, value in alone.items():
            assert value > 0, key
            torch.testing.assert_close(got[key], value * local_count / 2, msg=key)
