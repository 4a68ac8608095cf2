"""The run's global data plan, and each worker's one input stream over it.

The plan (:class:`GlobalPlan`) decides which examples every step trains on:
the global batch at step ``s`` of epoch ``e`` is a pure function of
``(data.seed, e, s)`` and the training examples' lengths — never of how
many workers or replicas share it::

    epoch e ─► permutation seeded by (seed, e) ─► drop n mod B (random, new each epoch)
            ─► [bucketing] length-sorted pools ─► global batches of B ─► batch order seeded by (seed, e)
            ─► each batch's width: its longest review, rounded up to bucket_width

A topology (:class:`Share`) only says who trains which rows: global replica
``k`` of ``R`` trains rows ``[k*B/R, (k+1)*B/R)`` of every global batch, and a
worker with ``L`` local replicas takes their ``L`` consecutive slices as one
block. Every slice is padded to its global batch's width, so a review's
input never depends on which replica trains it, and no replica waits on a
wider one. Every global batch is full (the ``n mod B`` examples an epoch
leaves out are drawn anew each epoch): every replica gets exactly ``B/R``
rows at every step, so no kernel ever sees an empty batch and the loss of a
step is the mean over its global batch whatever the topology.

The stream (:func:`stream`) is one ``tf.data`` pipeline per run: this
worker's block of every global batch from ``(epoch, step)`` to the end of
the last epoch. No iterator is built or torn down at an epoch's end (a
distributed dataset's per-device iterators are autotuned whatever the
options say, and deleting one waited up to ~20 s per epoch for tf.data's
tuning thread, docs/BENCHMARKS.md); a resume enters the stream at its
``(epoch, step)``. The training step splits each block among the local
replicas in the graph (:func:`replica_rows`).

What backs the stream is anything with the examples' ``lengths`` and a
``gather(indices)`` of token rows and labels (:class:`Examples`): in one
process, every review tokenized in memory
(:class:`imdb_dist.data.pipeline.Encoded`); in a Ray worker, the token store
(:class:`imdb_dist.data.store.TokenStore`), which reads only the rows asked
for, so a worker fetches and holds its share of each batch, never the corpus.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import tensorflow as tf

from imdb_dist.data.pipeline import pre_pad

# Bump whenever the plan's function changes. report.json records it: a run
# resumed under another version would train other batches from its step on.
PLAN_VERSION = 2

# Tokens sorted together when bucketing (pool of max_len-wide rows): 16,384
# reviews at 400 tokens, 52 MB of int64 ids; bounded in tokens so a large
# max_len does not grow the pool's memory.
_POOL_TOKENS = 16384 * 400
# Batches gathered in parallel, and ready batches kept, ahead of the step.
_BATCHES_IN_FLIGHT = 4
# Rows a worker reads at once, ahead of the step: a window of its next batches, so a remote store
# coalesces rows that lie close into few requests (imdb_dist.data.store.TokenStore.rows). Counted in
# a worker's rows, not in batches, so one worker of two reads half the windows one worker alone reads.
_WINDOW_ROWS = 2048


class Examples(Protocol):
    """Random access to the training examples by global index: the seam a larger-than-memory reader plugs into."""

    lengths: np.ndarray  # [n] tokens per example

    def gather(self, index: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor]:
        """Token rows (ragged int64) and int32 labels of the examples at ``index``."""
        ...


def pool_size(batch_size: int, max_len: int) -> int:
    """Examples sorted together when bucketing: whole global batches, about 16k reviews' worth at 400 tokens."""
    return max(1, _POOL_TOKENS // (max_len * batch_size)) * batch_size


@dataclasses.dataclass(frozen=True)
class GlobalPlan:
    """Which examples every step of every epoch trains on, and how wide each step's batch is.

    Attributes:
        lengths: tokens per training example, by global index.
        batch_size: the global batch, ``train.batch_size``.
        seed: ``data.seed``.
        max_len: the widest batch (``data.max_len``).
        min_len: the narrowest batch (the model's conv + pool window).
        bucket_width: batches are as wide as their longest review rounded up
            to a multiple of this (length bucketing); None: all ``max_len`` wide.
    """

    lengths: np.ndarray
    batch_size: int
    seed: int
    max_len: int
    min_len: int = 1
    bucket_width: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return len(self.lengths) // self.batch_size

    def batches(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s global batches, ``[steps_per_epoch, batch_size]`` example indices, in step order.

        Each example is in at most one batch; the ``n mod batch_size`` left
        out are the permutation's last, so different ones each epoch. With
        bucketing, each pool of permuted examples is sorted by length
        (stably) and cut into batches, so a batch holds reviews of similar
        length; the batches are then served in a seeded random order.
        """
        steps, size = self.steps_per_epoch, self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: steps * size]
        if self.bucket_width is None:
            return order.reshape(steps, size)
        pool = pool_size(size, self.max_len)
        chunks = [order[start : start + pool] for start in range(0, len(order), pool)]
        ordered = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")] for chunk in chunks])
        return ordered.reshape(steps, size)[rng.permutation(steps)]

    def widths(self, batches: np.ndarray) -> np.ndarray:
        """How wide each global batch of ``batches`` (``[steps, batch_size]``) is padded, ``[steps]`` int32.

        Bucketed: the longest review rounded up to a multiple of
        ``bucket_width``, never narrower than ``min_len`` nor wider than
        ``max_len``; rounding keeps the number of distinct shapes small
        (each new shape costs the CPU kernels a setup).
        """
        if self.bucket_width is None or len(batches) == 0:
            return np.full(len(batches), self.max_len, dtype=np.int32)
        longest = self.lengths[batches].max(axis=1)
        rounded = -(-longest // self.bucket_width) * self.bucket_width
        return np.clip(rounded, self.min_len, self.max_len).astype(np.int32)

    def run_batches(self, epochs: int, start: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Every global batch from ``start`` = ``(epoch, step)`` to the end of epoch ``epochs - 1``, in order."""
        epoch, step = start
        if epoch >= epochs:
            return np.zeros((0, self.batch_size), dtype=np.int64)
        return np.concatenate([self.batches(e) for e in range(epoch, epochs)])[step:]


@dataclasses.dataclass(frozen=True)
class Share:
    """Which rows of every global batch one worker trains: the slices of its local replicas.

    Global replica ``k`` (``replica_id_in_sync_group``: worker ``w``'s
    local replica ``j`` is ``w * local + j``, as tf.distribute numbers them)
    trains rows ``[k * b, (k + 1) * b)``, ``b = batch_size / replicas``.
    """

    replicas: int  # in sync, all workers
    workers: int = 1
    worker: int = 0

    def __post_init__(self) -> None:
        if self.replicas % self.workers or not 0 <= self.worker < self.workers:
            raise ValueError(
                f"{self.replicas} replicas do not divide among {self.workers} workers (worker {self.worker})"
            )

    @property
    def local_replicas(self) -> int:
        return self.replicas // self.workers

    def rows(self, batch_size: int) -> slice:
        """This worker's block of a global batch of ``batch_size`` rows."""
        if batch_size % self.replicas:
            raise ValueError(f"global batch {batch_size} does not divide among {self.replicas} replicas")
        block = batch_size // self.replicas * self.local_replicas
        return slice(self.worker * block, (self.worker + 1) * block)


def replica_rows(block: tf.Tensor, local_replica: int, local_replicas: int) -> tf.Tensor:
    """Local replica ``local_replica``'s slice of a worker's block (rows split evenly, in order)."""
    per_replica = tf.shape(block)[0] // local_replicas
    return block[local_replica * per_replica : (local_replica + 1) * per_replica]


def worker_batches(
    plan: GlobalPlan, share: Share, *, epochs: int, start: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """This worker's rows of every global batch from ``start`` on, and each global batch's width."""
    batches = plan.run_batches(epochs, start)
    return batches[:, share.rows(plan.batch_size)], plan.widths(batches)


def stream(
    examples: Examples, plan: GlobalPlan, share: Share, *, epochs: int, start: tuple[int, int] = (0, 0)
) -> tf.data.Dataset:
    """The run's one input stream for this worker: ``(token_ids [rows, width], labels [rows])`` per step.

    From ``start`` = ``(epoch, step)`` to the end of epoch ``epochs - 1``;
    every row pre-padded to its global batch's width.
    """
    index, widths = worker_batches(plan, share, epochs=epochs, start=start)
    rows = index.shape[1]

    def gather(window: tf.Tensor, window_widths: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor, tf.Tensor]:
        # One read for the window's batches; each batch then pads to its own width.
        tokens, labels = examples.gather(tf.reshape(window, [-1]))
        return (tf.RaggedTensor.from_uniform_row_length(tokens, rows), tf.reshape(labels, [-1, rows]),
                window_widths)

    def pad(tokens: tf.RaggedTensor, labels: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        dense = tokens.to_tensor(default_value=0, shape=[None, None])
        dense = tf.pad(dense, [[0, 0], [0, width - tf.shape(dense)[1]]])
        return pre_pad(dense), labels

    # Fixed parallelism, no autotuning: a gather is far cheaper than a step,
    # and a few batches in flight keep any device fed; nothing to tune.
    options = tf.data.Options()
    options.autotune.enabled = False
    window = max(1, _WINDOW_ROWS // rows)
    dataset = tf.data.Dataset.from_tensor_slices((index.astype(np.int64), widths)).batch(window)
    # The next window is read while this one's batches are stepped through.
    dataset = dataset.map(gather, num_parallel_calls=2).prefetch(1).unbatch()
    return dataset.map(pad, num_parallel_calls=_BATCHES_IN_FLIGHT).prefetch(_BATCHES_IN_FLIGHT).with_options(options)


def padded_blocks(batches: tf.data.Dataset, batch_size: int, share: Share) -> tf.data.Dataset:
    """This worker's ``(token_ids, labels, weights)`` block of each of ``batches``, padded to ``batch_size`` rows.

    For evaluation, where the examples do not fill a last global batch:
    it is filled with rows of padding tokens of weight 0, so every replica
    gets a slice of the same shape, never an empty one (what a GPU kernel
    does with a batch of 0 rows is nowhere promised), and the weights keep
    the padding out of every mean. Training needs no padding: its global
    batches are full by construction (:class:`GlobalPlan`).
    """
    rows = share.rows(batch_size)

    def pad(tokens: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        real = tf.shape(tokens)[0]
        missing = batch_size - real
        weights = tf.concat([tf.ones([real]), tf.zeros([missing])], axis=0)
        tokens = tf.pad(tokens, [[0, missing], [0, 0]])
        labels = tf.pad(labels, [[0, missing]])
        return tokens[rows], labels[rows], weights[rows]

    return batches.map(pad)
