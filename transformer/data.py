"""Input pipeline: parallel text from TFDS, local files or the synthetic task, in batches.

Training batches follow section 5.1: "Sentence pairs were batched together by approximate
sequence length. Each training batch contained a set of sentence pairs containing
approximately 25000 source tokens and 25000 target tokens." (config.data.batch_tokens).

How it works, and why:

* A length index (source and target token counts of every training pair) is built once; the
  text itself is read and tokenized again lazily, batch by batch, so a 4.5M-pair corpus never
  sits tokenized in memory.
* Each epoch has a *plan*: the global batches in order, each a list of rows, each row a list
  of example ids. The plan is a pure function of (data.seed, epoch, lengths, batching
  settings), so every process computes the same one and takes its own slice of rows. That keeps
  the batch shape the same on all processes at every step (a length bucket chosen on one host
  must be the one chosen on every host), reads on each host only its own examples, and makes
  the iterator state two integers: exact resume, mid-epoch too.
* 'bucket': pairs grouped by the longer side's length, rounded up to a bucket boundary
  (`bucket_boundaries`); each bucket has a fixed row count, so jit compiles one shape per
  bucket (21 shapes for max_length 256 with the defaults).
  'pack': several pairs per row of data.max_length tokens (first-fit), one fixed shape.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np

from transformer import synthetic
from transformer.tokenizer import EOS_ID, PAD_ID, Tokenizer

SPLITS = ('train', 'validation', 'test')
# Pairs are read and tokenized in chunks of this many (bounded memory, batched SentencePiece).
_CHUNK = 8192
# Open rows that first-fit packing tries before closing the oldest one.
_PACK_OPEN_ROWS = 16


class DataError(ValueError):
    """Bad input data; the message is one line naming the file, split or field."""


# ----------------------------------------------------------------------------------------------
# Raw text: random access to (source, target) sentence pairs of one split.
# ----------------------------------------------------------------------------------------------


class _ListPairs:
    """Pairs held as two Python lists (local files, synthetic task)."""

    def __init__(self, sources: list[str], targets: list[str], name: str):
        self.sources, self.targets, self.name = sources, targets, name

    def __len__(self) -> int:
        return len(self.sources)

    def get(self, ids: Sequence[int]) -> tuple[list[str], list[str]]:
        return [self.sources[i] for i in ids], [self.targets[i] for i in ids]


class _TfdsPairs:
    """Pairs read on demand from a TFDS ArrayRecord data source (no TensorFlow needed)."""

    def __init__(self, source, src_lang: str, tgt_lang: str, name: str):
        self.source, self.src_lang, self.tgt_lang, self.name = source, src_lang, tgt_lang, name

    def __len__(self) -> int:
        return len(self.source)

    def get(self, ids: Sequence[int]) -> tuple[list[str], list[str]]:
        ids = [int(i) for i in ids]
        getitems = getattr(self.source, '__getitems__', None)  # batched reads where offered
        records = getitems(ids) if getitems else [self.source[i] for i in ids]
        return ([_to_str(r[self.src_lang]) for r in records],
                [_to_str(r[self.tgt_lang]) for r in records])


def _to_str(x) -> str:
    return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 file without their line ends; one-line DataError when unreadable."""
    if not os.path.isfile(path):
        raise DataError(f'missing file {path}')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = data.count(b'\n', 0, e.start) + 1
        raise DataError(f'{path}:{line}: line is not valid UTF-8') from None
    # Split on '\n' only: str.splitlines() would also split on U+2028, U+0085 etc., which occur
    # inside WMT sentences and would misalign the two sides.
    lines = text.split('\n')
    if lines[-1] == '':
        lines.pop()
    return [line[:-1] if line.endswith('\r') else line for line in lines]


@functools.lru_cache(maxsize=4)
def _tfds_builder(name: str, data_dir: str, manual_dir: str):
    import tensorflow_datasets as tfds  # heavy import, only for data.source == 'tfds'
    builder = tfds.builder(name, data_dir=data_dir or None)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    return builder


def _pairs(config, split: str):
    """Random-access pairs of `split`, oriented source_lang -> target_lang."""
    if split not in SPLITS:
        raise DataError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
    d, src_lang, tgt_lang = config.data, config.source_lang, config.target_lang
    if d.source == 'synthetic':
        return _ListPairs(*synthetic.generate(config, split), name=f'synthetic {split}')
    if d.source == 'local':
        prefix = d[split]
        if not prefix:
            raise DataError(f'config.data.{split} is not set (a path prefix; files are '
                            f'PREFIX.{src_lang} and PREFIX.{tgt_lang})')
        src_path, tgt_path = f'{prefix}.{src_lang}', f'{prefix}.{tgt_lang}'
        sources, targets = _read_lines(src_path), _read_lines(tgt_path)
        if len(sources) != len(targets):
            raise DataError(f'{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}')
        if not sources:
            raise DataError(f'{src_path} and {tgt_path} are empty')
        return _ListPairs(sources, targets, name=prefix)
    if d.source == 'tfds':
        builder = _tfds_builder(d.tfds_name, d.tfds_data_dir, d.manual_dir)
        languages = sorted(builder.info.features.keys())
        for field, lang in (('source_lang', src_lang), ('target_lang', tgt_lang)):
            if lang not in languages:
                raise DataError(f'config.{field}={lang!r} is not in {d.tfds_name} '
                                f'(languages: {", ".join(languages)})')
        try:
            source = builder.as_data_source(split)
        except (KeyError, ValueError) as e:
            raise DataError(f'{d.tfds_name} has no split {split!r}: {e}') from None
        if len(source) == 0:
            raise DataError(f'{d.tfds_name} split {split!r} is empty')
        return _TfdsPairs(source, src_lang, tgt_lang, name=f'{d.tfds_name}:{split}')
    raise DataError(f'data.source={d.source!r}; valid: tfds, local, synthetic')


def load_text(config, split: str) -> tuple[list[str], list[str]]:
    """Raw source sentences and references of `split`, in file order, never filtered."""
    pairs = _pairs(config, split)
    sources, targets = [], []
    for start in range(0, len(pairs), _CHUNK):
        s, t = pairs.get(range(start, min(start + _CHUNK, len(pairs))))
        sources += s
        targets += t
    return sources, targets


def vocab_text(config) -> Iterator[str]:
    """A seeded sample of data.vocab_sample_sentences training pairs, both sides (for BPE)."""
    pairs = _pairs(config, 'train')
    n = len(pairs)
    k = min(n, config.data.vocab_sample_sentences)
    rng = np.random.default_rng([config.data.seed, 1])
    ids = np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)
    for start in range(0, k, _CHUNK):
        sources, targets = pairs.get(ids[start:start + _CHUNK])
        for text in sources + targets:
            if text.strip():
                yield text.strip()


# ----------------------------------------------------------------------------------------------
# Length index and the per-epoch batch plan.
# ----------------------------------------------------------------------------------------------


def _encode_pairs(tokenizer: Tokenizer, sources: list[str], targets: list[str]):
    """Token ids (no EOS) of stripped pairs."""
    return (tokenizer.encode_batch([s.strip() for s in sources]),
            tokenizer.encode_batch([t.strip() for t in targets]))


def _length_index(tokenizer: Tokenizer, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Token counts incl. EOS of both sides of every pair; 0 marks an empty side."""
    src_len = np.zeros(len(pairs), np.int32)
    tgt_len = np.zeros(len(pairs), np.int32)
    for start in range(0, len(pairs), _CHUNK):
        stop = min(start + _CHUNK, len(pairs))
        sources, targets = pairs.get(range(start, stop))
        src_ids, tgt_ids = _encode_pairs(tokenizer, sources, targets)
        src_len[start:stop] = [len(x) + 1 if s.strip() else 0 for x, s in zip(src_ids, sources)]
        tgt_len[start:stop] = [len(x) + 1 if t.strip() else 0 for x, t in zip(tgt_ids, targets)]
    return src_len, tgt_len


def _cached_length_index(config, tokenizer: Tokenizer, pairs):
    """_length_index, stored next to the vocabulary when it has a workdir (WMT: minutes saved)."""
    if tokenizer.path is None or config.data.source == 'synthetic':
        return _length_index(tokenizer, pairs)
    d = config.data
    ident = [d.source, config.source_lang, config.target_lang, len(pairs)]
    if d.source == 'tfds':
        ident += [d.tfds_name, d.tfds_data_dir]
    else:
        for lang in (config.source_lang, config.target_lang):
            st = os.stat(f'{d.train}.{lang}')
            ident += [os.path.abspath(f'{d.train}.{lang}'), st.st_size, st.st_mtime_ns]
    with open(os.path.join(tokenizer.path, 'vocab.model'), 'rb') as f:
        ident.append(hashlib.sha256(f.read()).hexdigest())
    key = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    path = os.path.join(tokenizer.path, f'lengths-train-{key}.npz')
    if os.path.exists(path):
        with np.load(path) as z:
            return z['src_len'], z['tgt_len']
    src_len, tgt_len = _length_index(tokenizer, pairs)
    tmp = f'{path}.tmp-{os.getpid()}.npz'
    np.savez(tmp, src_len=src_len, tgt_len=tgt_len)
    os.replace(tmp, path)
    return src_len, tgt_len


def _round_rows(rows: int, multiple: int) -> int:
    """`rows` rounded down to a multiple of `multiple`, at least one multiple."""
    return max(multiple, rows // multiple * multiple)


class _Plan:
    """The global batches of one epoch, stored flat.

    Batch b has length `lengths[b]` and global rows `row_start[b] .. row_start[b+1]`; row r holds
    the example ids `examples[ex_start[r]:ex_start[r+1]]` (none for a padding row).
    """

    def __init__(self, batches: list[tuple[int, list[list[int]]]]):
        self.lengths = np.array([length for length, _ in batches], np.int32)
        rows = [row for _, batch_rows in batches for row in batch_rows]
        self.row_start = np.cumsum([0] + [len(r) for _, r in batches])
        self.ex_start = np.cumsum([0] + [len(row) for row in rows])
        self.examples = np.array([e for row in rows for e in row], np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, b: int, first: int, count: int) -> list[np.ndarray]:
        """Example ids of rows first..first+count of batch b."""
        r0 = self.row_start[b] + first
        return [self.examples[self.ex_start[r]:self.ex_start[r + 1]] for r in range(r0, r0 + count)]


def _chunk_rows(rows: list[list[int]], per_batch: int) -> list[list[list[int]]]:
    """Groups rows into batches of `per_batch`, padding the last with empty rows."""
    batches = [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    if batches:
        batches[-1] = batches[-1] + [[]] * (per_batch - len(batches[-1]))
    return batches


def bucket_boundaries(data) -> np.ndarray:
    """Row lengths of the buckets, ascending: multiples of data.bucket_step, each at least
    data.bucket_growth times the previous one (finely spaced where sentences are common, fewer
    shapes for jit), the last one >= data.max_length."""
    step, growth = data.bucket_step, data.bucket_growth
    if step < 1 or growth < 1.0:
        raise DataError(f'data.bucket_step={step} must be >= 1 and data.bucket_growth={growth} >= 1')
    last = -(-data.max_length // step) * step
    bounds = [step]
    while bounds[-1] < last:
        grown = -(-int(np.ceil(bounds[-1] * growth)) // step) * step
        bounds.append(min(last, max(bounds[-1] + step, grown)))
    return np.array(bounds)


def bucket_length(longest, data) -> np.ndarray:
    """The bucket (row length) of pairs whose longer side has `longest` tokens."""
    bounds = bucket_boundaries(data)
    return bounds[np.minimum(np.searchsorted(bounds, longest), len(bounds) - 1)]


def _bucket_plan(rng, ids, src_len, tgt_len, data, multiple) -> _Plan:
    """Shuffled pairs grouped by length bucket, one pair per row, batches shuffled."""
    ids = rng.permutation(ids)
    buckets = bucket_length(np.maximum(src_len[ids], tgt_len[ids]), data)
    batches, pending = [], []
    for length in np.unique(buckets):
        per_batch = _round_rows(data.batch_tokens // int(length), multiple)
        # Rows a shorter bucket could not fill a batch with fit here; carrying them up leaves
        # a single partial batch per epoch instead of one per bucket.
        rows = pending + [[int(e)] for e in ids[buckets == length]]
        full = len(rows) // per_batch * per_batch
        batches += [(int(length), rows[i:i + per_batch]) for i in range(0, full, per_batch)]
        pending = rows[full:]
    if pending:
        batches += [(int(length), _chunk_rows(pending, per_batch)[0])]
    order = rng.permutation(len(batches))
    return _Plan([batches[i] for i in order])


def _pack_plan(rng, ids, src_len, tgt_len, data, multiple) -> _Plan:
    """Shuffled pairs packed first-fit into rows of data.max_length tokens on both sides."""
    ids = rng.permutation(ids)
    cap = data.max_length
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
    per_batch = _round_rows(data.batch_tokens // cap, multiple)
    return _Plan([(cap, b) for b in _chunk_rows(rows, per_batch)])


# ----------------------------------------------------------------------------------------------
# The training iterator.
# ----------------------------------------------------------------------------------------------


class TrainIterator:
    """Endless, reshuffled-per-epoch, checkpointable batches of this process's rows.

    `stats` holds the filtering counts; `get_state()` / `set_state()` give exact resume.
    """

    def __init__(self, config, tokenizer: Tokenizer, process_index: int = 0,
                 process_count: int = 1, rows_multiple: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index={process_index} not in [0, {process_count})')
        self._data = config.data
        self._tokenizer = tokenizer
        self._pairs = _pairs(config, 'train')
        self._process_index, self._process_count = process_index, process_count
        self._multiple = rows_multiple * process_count
        src_len, tgt_len = _cached_length_index(config, tokenizer, self._pairs)
        empty = (src_len == 0) | (tgt_len == 0)
        too_long = ~empty & (np.maximum(src_len, tgt_len) > self._data.max_length)
        self._ids = np.flatnonzero(~empty & ~too_long)
        self._src_len, self._tgt_len = src_len, tgt_len
        self.stats = dict(pairs=len(self._pairs), kept=len(self._ids),
                          dropped_empty=int(empty.sum()), dropped_too_long=int(too_long.sum()),
                          kept_source_tokens=int(src_len[self._ids].sum()),
                          kept_target_tokens=int(tgt_len[self._ids].sum()))
        logging.info('Training data %s: %s', self._pairs.name, self.stats)
        if not len(self._ids):
            raise DataError(f'no training pair of {self._pairs.name} is non-empty and fits '
                            f'data.max_length={self._data.max_length}')
        self._epoch, self._batch = 0, 0
        self._plan, self._plan_epoch = None, -1

    def _epoch_plan(self, epoch: int) -> _Plan:
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self._data.seed, 2, epoch])
            make = _pack_plan if self._data.batching == 'pack' else _bucket_plan
            self._plan = make(rng, self._ids, self._src_len, self._tgt_len, self._data, self._multiple)
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
        global_rows = plan.row_start[b + 1] - plan.row_start[b]
        local_rows = global_rows // self._process_count
        rows = plan.rows(b, self._process_index * local_rows, local_rows)
        return self._materialize(rows, int(plan.lengths[b]))

    def _materialize(self, rows: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
        """Reads and tokenizes the pairs of `rows` into packed [rows, length] arrays."""
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        sources, targets = self._pairs.get(flat)
        src_ids, tgt_ids = _encode_pairs(self._tokenizer, sources, targets)
        batch = {k: np.zeros((len(rows), length), np.int32) for k in (
            'inputs', 'targets', 'inputs_segmentation', 'targets_segmentation',
            'inputs_position', 'targets_position')}
        k = 0
        for r, row in enumerate(rows):
            offsets = {'inputs': 0, 'targets': 0}
            for segment in range(1, len(row) + 1):
                for name, ids in (('inputs', src_ids[k]), ('targets', tgt_ids[k])):
                    ids = ids + [EOS_ID]
                    o, n = offsets[name], len(ids)
                    if o + n > length:  # the index promised this fits; a changed vocabulary would not
                        raise DataError(f'pair {row[segment - 1]} no longer fits its row; stale length index?')
                    batch[name][r, o:o + n] = ids
                    batch[f'{name}_segmentation'][r, o:o + n] = segment
                    batch[f'{name}_position'][r, o:o + n] = np.arange(n)
                    offsets[name] = o + n
                k += 1
        return batch

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


def make_train_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1, rows_multiple: int = 1) -> TrainIterator:
    """The training batches of this process (see the module docstring).

    Each batch is a dict of np.int32 arrays [local_rows, length]: inputs, targets (EOS appended),
    *_segmentation (1, 2, ... per pair in a row, 0 on padding) and *_position (0-based within
    the pair). The global batch (all processes' rows, in process order) has a multiple of
    rows_multiple * process_count rows and about data.batch_tokens tokens on its longer side.
    """
    return TrainIterator(config, tokenizer, process_index, process_count, rows_multiple)


# ----------------------------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------------------------


def eval_batches(config, tokenizer: Tokenizer, split: str, batch_sentences: int, *,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every sentence of `split` exactly once (across processes), unfiltered, sorted by length.

    Yields dicts with `inputs`, `targets` [batch_sentences, L] (EOS appended, PAD-padded, L a
    bucket length, the same on every process) and `index` [batch_sentences], the
    row in load_text's lists (-1 for padding rows). Sides longer than model.max_position - 1
    tokens are truncated (counted and logged), never dropped.
    """
    sources, targets = load_text(config, split)
    src_ids, tgt_ids = _encode_pairs(tokenizer, sources, targets)
    limit = config.model.max_position - 1
    truncated = sum(len(x) > limit for x in src_ids) + sum(len(x) > limit for x in tgt_ids)
    if truncated:
        logging.warning('%s: truncated %d sides longer than %d tokens', split, truncated, limit)
    src_ids = [x[:limit] + [EOS_ID] for x in src_ids]
    tgt_ids = [x[:limit] + [EOS_ID] for x in tgt_ids]
    order = np.argsort([len(x) for x in src_ids], kind='stable')
    per_step = batch_sentences * process_count
    for start in range(0, len(order), per_step):
        group = order[start:start + per_step]
        longest = max(max(len(src_ids[i]), len(tgt_ids[i])) for i in group)
        # Past the buckets (long test sentences are kept): round up to a multiple of bucket_step.
        length = max(int(bucket_length(longest, config.data)),
                     -(-longest // config.data.bucket_step) * config.data.bucket_step)
        mine = group[process_index * batch_sentences:(process_index + 1) * batch_sentences]
        batch = dict(inputs=np.full((batch_sentences, length), PAD_ID, np.int32),
                     targets=np.full((batch_sentences, length), PAD_ID, np.int32),
                     index=np.full((batch_sentences,), -1, np.int32))
        for r, i in enumerate(mine):
            batch['inputs'][r, :len(src_ids[i])] = src_ids[i]
            batch['targets'][r, :len(tgt_ids[i])] = tgt_ids[i]
            batch['index'][r] = i
        yield batch
