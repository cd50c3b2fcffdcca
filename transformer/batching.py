"""Batches: the length-bucket ladder, the per-epoch batch plan, the training iterator, the
background producer that keeps it ahead of the device, and evaluation batches.

Training batches follow section 5.1: "Sentence pairs were batched together by approximate
sequence length. Each training batch contained a set of sentence pairs containing
approximately 25000 source tokens and 25000 target tokens." (config.data.batch_tokens).

How it works, and why:

* The training set is tokenized once (`data.tokenized_train`); batches are assembled from its
  flat token arrays with a few vectorised numpy operations, never by tokenizing again.
* Each epoch has a *plan*: the global batches in order, each a list of rows, each row a list
  of example ids. The plan is a pure function of (data.seed, epoch, lengths, batching
  settings), so every process computes the same one and takes its own slice of rows. That keeps
  the batch shape the same on all processes at every step (a length bucket chosen on one host
  must be the one chosen on every host), reads on each host only its own examples, and makes
  the iterator state two integers: exact resume, mid-epoch too. (This is why the input
  pipeline is plain seeded numpy rather than grain.)
* 'bucket': pairs grouped by the longer side's length, rounded up to a bucket boundary
  (`ladder`); each bucket has a fixed row count, so jit compiles one shape per bucket (21
  shapes for max_length 256 with the defaults). Decoding pads source lengths to the same ladder.
  'pack': several pairs per row of data.max_length tokens (first-fit), one fixed shape.
* `Prefetcher` runs the iterator in a background thread a few batches ahead and puts each
  batch on the devices there, so the training loop never waits for the host.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging

from transformer import data, errors
from transformer.data import DataError, TokenizedSplit
from transformer.tokenizer import EOS_ID, PAD_ID, Tokenizer

BATCH_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation',
              'inputs_position', 'targets_position')
# Open rows that first-fit packing tries before closing the oldest one.
_PACK_OPEN_ROWS = 16


def fit_sentences(ids: list[list[int]], max_position: int, where: str):
    """Each sentence's ids cut to the max_position - 1 tokens a model of `max_position` reads
    before its EOS (positions count from 0) and ended with EOS, and a mask of the ones cut; one
    warning naming `where` when any was. Evaluation splits are never filtered, so this is how
    every program reports truncation (splits, lines, the attention plot)."""
    limit = max_position - 1
    cut = np.fromiter((len(x) > limit for x in ids), bool, len(ids))
    if cut.any():
        longest = max(len(x) for x in ids)
        what = f'{int(cut.sum())} of {len(ids)} sentences' if len(ids) > 1 else 'the sentence'
        errors.warn(f'{where}: {what} longer than {limit} tokens (up to {longest}) truncated to '
                    f'the first {limit} (model.max_position={max_position} with EOS)')
    return [x[:limit] + [EOS_ID] for x in ids], cut


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- the length ladder ---------------------------------------------------------------------------


def ladder(step: int, growth: float, top: int) -> np.ndarray:
    """Row lengths of the buckets, ascending: multiples of `step`, each at least `growth` times
    the previous one (finely spaced where sentences are common, few shapes for jit), the last
    one `top` rounded up to a multiple of `step`."""
    if step < 1 or growth < 1.0:
        raise DataError(f'data.bucket_step={step} must be >= 1 and data.bucket_growth={growth} '
                        '>= 1')
    last = round_up(top, step)
    bounds = [step]
    while bounds[-1] < last:
        grown = round_up(int(np.ceil(bounds[-1] * growth)), step)
        bounds.append(min(last, max(bounds[-1] + step, grown)))
    return np.array(bounds)


def bucket_boundaries(data_config) -> np.ndarray:
    """The training buckets: the ladder up to data.max_length."""
    return ladder(data_config.bucket_step, data_config.bucket_growth, data_config.max_length)


def padded_length(longest, step: int, growth: float, top: int) -> np.ndarray:
    """The row length of sequences whose longest has `longest` tokens: the smallest length of
    the ladder up to `top` that holds them; past the ladder, `longest` rounded up to a multiple
    of `step` (long test sentences are kept, never dropped)."""
    bounds = ladder(step, growth, top)
    longest = np.asarray(longest)
    i = np.searchsorted(bounds, longest)
    return np.where(i < len(bounds), bounds[np.minimum(i, len(bounds) - 1)],
                    -(-longest // step) * step)


def bucket_length(longest, data_config) -> np.ndarray:
    """The bucket (row length) of pairs whose longer side has `longest` tokens."""
    return padded_length(longest, data_config.bucket_step, data_config.bucket_growth,
                         data_config.max_length)


# -- the per-epoch plan ------------------------------------------------------------------------


def _round_rows(rows: int, multiple: int) -> int:
    """`rows` rounded down to a multiple of `multiple`, at least one multiple."""
    return max(multiple, rows // multiple * multiple)


def rows_per_batch(batch_tokens: int, length: int, multiple: int) -> int:
    """Rows of a bucket's global batches: about `batch_tokens` tokens in rows of `length`,
    a multiple of `multiple` (devices x accumulation steps x processes), at least one."""
    return _round_rows(batch_tokens // int(length), multiple)


class _Plan:
    """The global batches of one epoch, stored flat.

    Batch b has length `lengths[b]` and global rows `row_start[b] .. row_start[b+1]`; row r holds
    the example ids `examples[ex_start[r]:ex_start[r+1]]` (none for a padding row).
    """

    def __init__(self, batches: list[tuple[int, list[list[int]]]]):
        """`batches`: (length, rows), each row a list of example ids."""
        rows = [row for _, batch_rows in batches for row in batch_rows]
        self._set([length for length, _ in batches], [len(r) for _, r in batches],
                  [len(row) for row in rows], [e for row in rows for e in row])

    @classmethod
    def one_per_row(cls, batches: list[tuple[int, np.ndarray]]) -> _Plan:
        """`batches`: (length, example id of each row, -1 for a padding row)."""
        plan = cls.__new__(cls)
        rows = np.concatenate([ids for _, ids in batches]) if batches else np.zeros(0, int)
        plan._set([length for length, _ in batches], [len(ids) for _, ids in batches],
                  (rows >= 0).astype(np.int64), rows[rows >= 0])
        return plan

    def _set(self, lengths, rows_per_batch, examples_per_row, examples):
        self.lengths = np.asarray(lengths, np.int32)
        self.row_start = np.concatenate([[0], np.cumsum(rows_per_batch, dtype=np.int64)])
        self.ex_start = np.concatenate([[0], np.cumsum(examples_per_row, dtype=np.int64)])
        self.examples = np.asarray(examples, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, b: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(example ids, the row 0..count-1 of each) of rows first..first+count of batch b."""
        r0 = self.row_start[b] + first
        starts = self.ex_start[r0:r0 + count + 1]
        examples = self.examples[starts[0]:starts[-1]]
        return examples, np.repeat(np.arange(count), np.diff(starts))


def _chunk_rows(rows: list[list[int]], per_batch: int) -> list[list[list[int]]]:
    """Groups rows into batches of `per_batch`, padding the last with empty rows."""
    batches = [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    if batches:
        batches[-1] = batches[-1] + [[]] * (per_batch - len(batches[-1]))
    return batches


def _bucket_plan(rng, ids, src_len, tgt_len, data_config, multiple) -> _Plan:
    """Shuffled pairs grouped by length bucket, one pair per row, batches shuffled."""
    ids = rng.permutation(ids)
    buckets = bucket_length(np.maximum(src_len[ids], tgt_len[ids]), data_config)
    batches, pending = [], ids[:0]
    for length in np.unique(buckets):
        per_batch = rows_per_batch(data_config.batch_tokens, length, multiple)
        # Rows a shorter bucket could not fill a batch with fit here; carrying them up leaves
        # a single partial batch per epoch instead of one per bucket.
        rows = np.concatenate([pending, ids[buckets == length]])
        full = len(rows) // per_batch * per_batch
        batches += [(int(length), rows[i:i + per_batch]) for i in range(0, full, per_batch)]
        pending = rows[full:]
    if len(pending):
        padding = np.full(per_batch - len(pending), -1, ids.dtype)
        batches += [(int(length), np.concatenate([pending, padding]))]
    order = rng.permutation(len(batches))
    return _Plan.one_per_row([batches[i] for i in order])


def _pack_plan(rng, ids, src_len, tgt_len, data_config, multiple) -> _Plan:
    """Shuffled pairs packed first-fit into rows of data.max_length tokens on both sides."""
    ids = rng.permutation(ids)
    cap = data_config.max_length
    rows, open_rows = [], []  # open rows: [src_used, tgt_used, ids]
    for e, s, t in zip(ids.tolist(), src_len[ids].tolist(), tgt_len[ids].tolist()):
        for row in open_rows:
            if row[0] + s <= cap and row[1] + t <= cap:
                row[0] += s
                row[1] += t
                row[2].append(e)
                break
        else:
            if len(open_rows) == _PACK_OPEN_ROWS:
                rows.append(open_rows.pop(0)[2])
            open_rows.append([s, t, [e]])
    rows += [row[2] for row in open_rows]
    per_batch = _round_rows(data_config.batch_tokens // cap, multiple)
    return _Plan([(cap, b) for b in _chunk_rows(rows, per_batch)])


# -- assembling a batch from the token arrays ------------------------------------------------


def _assemble(split: TokenizedSplit, examples: np.ndarray, row_of: np.ndarray, rows: int,
              length: int) -> dict[str, np.ndarray]:
    """Packs the pairs `examples` (in row order; `row_of` their rows) into [rows, length] arrays.

    Each pair is one segment of its row (1, 2, ... in order), EOS appended, positions from 0.
    """
    batch = {k: np.zeros((rows, length), np.int32) for k in BATCH_KEYS}
    if not len(examples):
        return batch
    index = np.arange(len(examples))
    first = np.maximum.accumulate(np.where(np.r_[True, row_of[1:] != row_of[:-1]], index, 0))
    segment = index - first + 1  # 1, 2, ... within each row
    for side, name in (('source', 'inputs'), ('target', 'targets')):
        lengths = split.lengths[side][examples].astype(np.int64)  # EOS included
        ends = np.cumsum(lengths)
        starts = ends - lengths
        column = starts - starts[first]  # where each pair starts within its row
        if (column + lengths > length).any():
            raise DataError(f'{split.name}: a pair does not fit its row; stale token cache?')
        position = np.arange(ends[-1]) - np.repeat(starts, lengths)
        r = np.repeat(row_of, lengths)
        c = np.repeat(column, lengths) + position
        is_eos = position == np.repeat(lengths - 1, lengths)
        tokens = split.tokens[side]
        where = np.repeat(split.offsets[side][examples], lengths) + position
        where = np.minimum(where[~is_eos], len(tokens) - 1)  # EOS is not in the arrays
        values = np.full(len(position), EOS_ID, np.int32)
        values[~is_eos] = tokens[where]
        batch[name][r, c] = values
        batch[f'{name}_segmentation'][r, c] = np.repeat(segment, lengths)
        batch[f'{name}_position'][r, c] = position
    return batch


# -- the training iterator ---------------------------------------------------------------------


class TrainIterator:
    """Endless, reshuffled-per-epoch, checkpointable batches of this process's rows.

    Each batch is a dict of np.int32 arrays [local_rows, length] (BATCH_KEYS): inputs, targets
    (EOS appended), *_segmentation (1, 2, ... per pair in a row, 0 on padding) and *_position
    (0-based within the pair). The global batch (all processes' rows, in process order) has a
    multiple of rows_multiple * process_count rows and about data.batch_tokens tokens on its
    longer side. `stats` holds the filtering counts; `get_state()` / `set_state()` give exact
    resume.
    """

    def __init__(self, split: TokenizedSplit, data_config, *, process_index: int = 0,
                 process_count: int = 1, rows_multiple: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index={process_index} not in [0, {process_count})')
        self._split, self._data = split, data_config
        self._process_index, self._process_count = process_index, process_count
        self._multiple = rows_multiple * process_count
        src_len, tgt_len = split.lengths['source'], split.lengths['target']
        empty = (src_len == 0) | (tgt_len == 0)
        too_long = ~empty & (np.maximum(src_len, tgt_len) > data_config.max_length)
        self._ids = np.flatnonzero(~empty & ~too_long)
        self._src_len, self._tgt_len = src_len, tgt_len
        self.stats = dict(pairs=len(split), kept=len(self._ids),
                          dropped_empty=int(empty.sum()), dropped_too_long=int(too_long.sum()),
                          kept_source_tokens=int(src_len[self._ids].sum()),
                          kept_target_tokens=int(tgt_len[self._ids].sum()))
        logging.info('Training data %s: %s', split.name, self.stats)
        if not len(self._ids):
            raise DataError(f'no training pair of {split.name} is non-empty and fits '
                            f'data.max_length={data_config.max_length}')
        self._epoch, self._batch = 0, 0
        self._plan, self._plan_epoch = None, -1

    def _epoch_plan(self, epoch: int) -> _Plan:
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self._data.seed, 2, epoch])
            make = _pack_plan if self._data.batching == 'pack' else _bucket_plan
            self._plan = make(rng, self._ids, self._src_len, self._tgt_len, self._data,
                              self._multiple)
            self._plan_epoch = epoch
        return self._plan

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._epoch_plan(self._epoch)
        if self._batch >= len(plan):
            self._epoch, self._batch = self._epoch + 1, 0
            plan = self._epoch_plan(self._epoch)
        b = self._batch
        self._batch += 1
        local_rows = (plan.row_start[b + 1] - plan.row_start[b]) // self._process_count
        examples, row_of = plan.rows(b, self._process_index * local_rows, local_rows)
        return _assemble(self._split, examples, row_of, local_rows, int(plan.lengths[b]))

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is batch `batch` of epoch `epoch`."""
        return dict(epoch=self._epoch, batch=self._batch, kept=len(self._ids),
                    seed=int(self._data.seed), batching=self._data.batching)

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` of an iterator over the same data and settings."""
        for key, mine in (('kept', len(self._ids)), ('seed', int(self._data.seed)),
                          ('batching', self._data.batching)):
            if state.get(key) != mine:
                raise ValueError(f'data iterator state is for {key}={state.get(key)!r}, '
                                 f'this run has {key}={mine!r}')
        self._epoch, self._batch = int(state['epoch']), int(state['batch'])


# -- evaluation batches --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """A split for evaluation, read and tokenized once: the raw sentences and references in file
    order (never filtered) and their token ids, each side truncated by fit_sentences and ended
    with EOS; `*_truncated` mark the sides that were cut."""

    name: str
    sources: list[str]
    references: list[str]
    source_ids: list[list[int]]
    target_ids: list[list[int]]
    source_truncated: np.ndarray
    target_truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.sources)


def encode_split(config, tokenizer: Tokenizer, split: str,
                 limit: int | None = None, files: str = '') -> EncodedSplit:
    """`split` (or the local `files`, a path prefix, named by their base name) read and
    tokenized once (its first `limit` sentences only, if given); the truncated sides are
    counted and logged once."""
    sources, references = data.load_text(config, split, files)
    if files:
        split = os.path.basename(files.rstrip('/')) or files
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    src_ids, tgt_ids = data.encode_pairs(tokenizer, sources, references)
    max_position = config.model.max_position
    src_ids, src_cut = fit_sentences(src_ids, max_position, f'{split} sources')
    tgt_ids, tgt_cut = fit_sentences(tgt_ids, max_position, f'{split} references')
    return EncodedSplit(split, sources, references, src_ids, tgt_ids, src_cut, tgt_cut)


def eval_batches(split: EncodedSplit, data_config, batch_sentences: int, *,
                 indices: Iterable[int] | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The sentences `indices` of `split` (default: all) exactly once across processes, sorted
    by source length.

    Yields dicts with `inputs`, `targets` [batch_sentences, L] (PAD-padded, L the bucket of the
    longer side, the same on every process) and `index` [batch_sentences], the sentence's
    index in the split (-1 for padding rows).
    """
    src_ids, tgt_ids = split.source_ids, split.target_ids
    chosen = np.arange(len(split)) if indices is None else np.fromiter(indices, np.int64)
    order = chosen[np.argsort([len(src_ids[i]) for i in chosen], kind='stable')]
    per_step = batch_sentences * process_count
    for start in range(0, len(order), per_step):
        group = order[start:start + per_step]
        longest = max(max(len(src_ids[i]), len(tgt_ids[i])) for i in group)
        length = int(bucket_length(longest, data_config))
        mine = group[process_index * batch_sentences:(process_index + 1) * batch_sentences]
        batch = dict(inputs=np.full((batch_sentences, length), PAD_ID, np.int32),
                     targets=np.full((batch_sentences, length), PAD_ID, np.int32),
                     index=np.full((batch_sentences,), -1, np.int32))
        for r, i in enumerate(mine):
            batch['inputs'][r, :len(src_ids[i])] = src_ids[i]
            batch['targets'][r, :len(tgt_ids[i])] = tgt_ids[i]
            batch['index'][r] = i
        yield batch


# -- the background producer -----------------------------------------------------------------


class Prefetcher:
    """Runs a checkpointable iterator in a background thread, up to `depth` batches ahead.

    Each item is (place(batch), state): `state` is the iterator's `get_state()` right after
    that batch, so a checkpoint taken after consuming an item resumes after it, however far
    ahead the thread has read. `place` (e.g. putting the batch on the devices) runs in the
    thread too. An exception in the thread is raised by the `next()` that reaches it.
    """

    _DONE = object()

    def __init__(self, iterator, depth: int = 2, place: Callable | None = None):
        self._iterator, self._place = iterator, place or (lambda batch: batch)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='batch-producer', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                item = (self._place(batch), self._iterator.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer
            self._queue.put((self._DONE, e))

    def __iter__(self):
        return self

    def __next__(self):
        item, state = self._queue.get()
        if item is self._DONE:
            raise state
        return item, state

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is making) and drops what it made."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
