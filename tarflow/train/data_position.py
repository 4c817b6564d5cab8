"""Where each Ray Train worker stands in its data, and how the workers stay in step: an epoch's rows from the
saved position on (`epoch_rows`), micro-batches epoch after epoch with the position kept at the first row not
trained on (`stream_batches`), and `LockstepBatches`, which starts the next epoch on every worker together.

Why resume is exact: each worker's share comes in a fixed order (the files in order, Ray Data's split with
preserve_order, a local shuffle seeded by seed + epoch), the position saved in a checkpoint counts the rows of
the epoch already trained on, and a resumed worker skips exactly that many before its first batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tarflow.train.common import TrainState
    from tarflow.train.core import Task, TrainConfig


def epoch_rows(shard, task: Task, cfg: TrainConfig, state: TrainState):
    """(position, table) of this worker's current epoch, from the saved position on: rows consumed before a
    checkpoint are skipped (the order is the same on every run)."""
    skip, pos = state.samples_seen, 0
    shuffle = {"local_shuffle_buffer_size": cfg.shuffle_buffer, "local_shuffle_seed": cfg.seed + state.epoch} \
        if cfg.shuffle_buffer else {}
    for table in shard.iter_batches(batch_size=task.read_rows, batch_format="pyarrow", drop_last=task.drop_last,
                                    prefetch_batches=2, **shuffle):
        n = len(table)
        if skip >= n:
            skip -= n
        else:
            yield pos + skip, table.slice(skip)
            skip = 0
        pos += n


def stream_batches(shards: dict, task: Task, state: TrainState):
    """Micro-batches epoch after epoch; None at each epoch's end (see LockstepBatches). Keeps the state's data
    position at the first row not trained on yet."""
    while True:
        for batch, resume_at in task.batches(task.epoch_rows(shards, state), state.epoch):
            state.samples_seen = resume_at
            yield batch
        yield None  # this worker's epoch is over; the next one starts when every worker got here
        state.epoch += 1
        state.samples_seen = 0


class LockstepBatches:
    """Micro-batches that keep the workers in step across epochs.

    Workers can have different numbers of micro-batches per epoch (packing, skipped rows), and Ray Data starts
    a new epoch of a split dataset only when every worker asks for it; a worker that runs out first would wait
    there while the others wait for it in the gradient all-reduce. So each micro-batch, the workers agree
    whether any of them still has data: if none has, all start the next epoch together; if some have, those
    without train a no-op batch (None) until all are done. The next batch is fetched only when it is about to
    be trained, so the recorded data position never runs ahead of training.
    """

    _UNFETCHED = object()

    def __init__(self, gen, device):
        self.gen, self.device, self.cur = gen, device, self._UNFETCHED

    def _any(self, flag: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        t = torch.tensor([int(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def next(self):
        idle_epochs = 0
        while True:
            if self.cur is self._UNFETCHED:
                self.cur = next(self.gen)
            if self._any(self.cur is not None):
                break
            idle_epochs += 1  # every worker is at its epoch's end: all begin the next epoch
            if idle_epochs > 2:
                raise RuntimeError("no trainable row in the data: every row was skipped (see the skipped_* "
                                   "metrics) or a worker's share holds no full batch (lower the batch size or "
                                   "--num-workers, or add data)")
            self.cur = self._UNFETCHED
        batch = self.cur
        if batch is not None:
            self.cur = self._UNFETCHED
        return batch
