"""This process's micro-batches of every step, read lane by lane (`data.EpochOrder`) and collated on a thread.

    batches = RankBatches(reader, seed=0, shuffle=True, batch_size=8, grad_accum=1, rank=0, world_size=1, pad_id=0)
    for step, micro_batches in zip(range(start, total), batches.iter_steps(start, total)): ...

Reading follows the rows this process trains, not the size of the run:
- Each of this process's lanes (batch_size · grad_accum of them) holds only the block (= row group, by default) its
  current row comes from; the block is decoded when the lane reaches it and dropped when it moves on. Rows decoded
  ÷ rows trained ≈ 1 for any number of processes (a block cut between two lanes is decoded by both: at most G
  blocks per epoch).
- Shards are opened through the `RunReader`: at most `max_open_files` at once, none decoded row group kept there
  (`cache_row_groups=0`: the lanes keep what they need). Each shard is checked when this process first reads it.
- Memory budget per process, in decoded rows:
      batch_size · grad_accum · (block_rows + 2 · row-group rows − 2)      (the lanes' current blocks; with the
      default block_rows = the writer's row-group size and aligned row groups this is batch_size · grad_accum ·
      block_rows)
    + (prefetch_steps + 2) · batch_size · grad_accum                       (collated micro-batches: queued, being
                                                                            built, and the step training on one)
  plus at most `max_open_files` open Parquet files (footers only). Independent of the number of shards and rows.
- `iter_steps(start, stop)` decodes and collates on a background thread, `prefetch_steps` steps ahead of the
  training loop, from any step: a resumed run starts exactly where it stopped, mid-epoch included.

Why not a library: mosaicml/streaming has the same ideas (shards assigned per node, block shuffles, an order that
survives a change of node count) but reads its own MDS format, so the run would have to be converted (a second
copy of terabytes); WebDataset streams tar shards sequentially with no exact mid-epoch resume; torchdata's
`StatefulDataLoader` saves a loader's position, but here the position is already the optimizer step, because the
order is a pure function of it. What is left is small: the lane arithmetic (`data.EpochOrder`), one thread and a
bounded queue.

In the short last step of an epoch (the leftover rows), a micro-batch whose lanes are all exhausted is a single
padding row with no trained position: every process still runs the same forward/backward passes (DDP stays in
step), and the loss, normalised by the global count of trained positions, is exactly that of the real rows.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import numpy as np

from storage import SequenceLabels, mode_of
from storage.run_reader import RunReader

from .batch import collate_labels, with_kl_target_weights
from .data import BLOCK_ROWS, EpochOrder, slot_lanes, steps_per_epoch


class _Lane:
    """A lane's current stream block, decoded (rows in stored order)."""

    __slots__ = ("block", "rows")

    def __init__(self):
        self.block = -1
        self.rows: list[SequenceLabels] | None = None


class RankBatches:
    """The micro-batches of process `rank` of `world_size` (see the module docstring). `reader` is used by the
    loader's thread only while `iter_steps` runs; do not read from it elsewhere meanwhile."""

    def __init__(
        self,
        reader: RunReader,
        *,
        seed: int,
        shuffle: bool,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        pad_id: int,
        block_rows: int = BLOCK_ROWS,
        prefetch_steps: int = 2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.reader = reader
        self.seed, self.shuffle, self.block_rows = seed, shuffle, block_rows
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size
        self.pad_id, self.prefetch_steps = pad_id, max(1, prefetch_steps)
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = steps_per_epoch(len(reader), self.global_batch)
        self.capture = reader.spec.capture
        self._order: EpochOrder | None = None
        self._lanes: dict[int, _Lane] = {}
        self.rows_trained = 0  # real rows handed out (for the loader benchmark)
        self.thread_cpu_s = 0.0  # CPU time the loader thread spent reading and collating (for the benchmark)

    def epoch_order(self, epoch: int) -> EpochOrder:
        return EpochOrder(
            self.reader.shard_rows,
            seed=self.seed,
            epoch=epoch,
            global_batch=self.global_batch,
            shuffle=self.shuffle,
            block_rows=self.block_rows,
        )

    def _lane_order(self, epoch: int) -> EpochOrder:
        """The order the lanes read (loader thread only)."""
        if self._order is None or self._order.epoch != epoch:
            self._order = self.epoch_order(epoch)
            self._lanes = {}  # a new epoch: every lane starts on a new block
        return self._order

    def step_rows(self, step: int) -> list[np.ndarray]:
        """Global row indices of this process's micro-batches at optimizer step `step` (no shard is read; safe to
        call while `iter_steps` runs)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return [order.rows(self._lanes_of(j), s) for j in range(self.grad_accum)]

    def _lanes_of(self, micro: int) -> range:
        return slot_lanes(micro, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size)

    def _row(self, order: EpochOrder, lane: int, s: int) -> SequenceLabels | None:
        if s >= order.lane_len[lane]:
            return None
        p = int(order.lane_start[lane]) + s
        b = order.block_of(p)
        st = self._lanes.setdefault(lane, _Lane())
        if st.block != b:
            st.rows = None  # drop the old block before decoding the next one
            shard, offset = self.reader.locate(int(order.block_start[b]))
            st.rows = self.reader.rows_of_shard(shard, offset, offset + int(order.block_len[b]))
            st.block = b
        return st.rows[int(order.block_perm(b)[p - order.stream_start[b]])]

    def _dummy(self) -> SequenceLabels:
        """A row with no trained position (two padding tokens), for a micro-batch whose lanes are exhausted."""
        k = self.reader.spec.k
        sampled = mode_of(self.capture).target != "logprobs"
        return SequenceLabels(
            sample_id=-1,
            input_ids=np.full(2, self.pad_id, dtype=np.int32),
            label_mask=np.zeros(1, dtype=bool),
            topk_ids=np.zeros((0, k), dtype=np.int32),
            topk_logprobs=np.zeros((0, k), dtype=np.float32),
            tail_logprob=np.zeros(0, dtype=np.float32),
            sample_counts=np.zeros((0, k), dtype=np.uint16) if sampled else None,
        )

    def step_batches(self, step: int) -> list[dict]:
        """This process's `grad_accum` collated micro-batches of optimizer step `step`, on the calling thread."""
        epoch, s = divmod(step, self.steps_per_epoch)
        order = self._lane_order(epoch)
        out = []
        for j in range(self.grad_accum):
            rows = [r for lane in self._lanes_of(j) if (r := self._row(order, lane, s)) is not None]
            self.rows_trained += len(rows)
            batch = collate_labels(rows or [self._dummy()], pad_id=self.pad_id)
            out.append(with_kl_target_weights(batch, self.capture))
        return out

    def resident_rows(self) -> int:
        """Decoded rows the lanes hold now (the memory budget's first term)."""
        return sum(len(lane.rows) for lane in self._lanes.values() if lane.rows is not None)

    def iter_steps(self, start: int, stop: int) -> Iterator[list[dict]]:
        """Steps start .. stop-1, decoded and collated on a background thread `prefetch_steps` ahead. An error on
        the thread (a corrupt shard, no file descriptor left) is raised here, at the step that needed it.
        Closing the iterator early (break, exception) stops the thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_steps)
        stop_event = threading.Event()

        def put(item) -> bool:
            while not stop_event.is_set():
                try:
                    q.put(item, timeout=0.5)  # wakes to notice a consumer that has gone away
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for step in range(start, stop):
                    t0 = time.thread_time()
                    batches = self.step_batches(step)
                    self.thread_cpu_s += time.thread_time() - t0
                    if not put(("batch", batches)):
                        return
                put(("end", None))
            except BaseException as e:  # handed to the training loop, raised there
                put(("error", e))

        thread = threading.Thread(target=work, name=f"label-anneal-loader-rank{self.rank}", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                if kind == "end":
                    return
                yield item
        finally:
            stop_event.set()
            thread.join()


__all__ = ["RankBatches"]
