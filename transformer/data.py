"""Parallel text: TFDS WMT14, local files or the synthetic task, and the tokenized training set.

A *source* gives random access to the (source, target) sentence pairs of one split, oriented
config.source_lang -> config.target_lang (never inferred from a dataset's key order). Splits
for evaluation are read whole and never filtered (`load_text`). The training split is tokenized
once (`tokenized_train`) into flat token arrays cached in the work directory; batches are
planned from the lengths and read from the token arrays (batching.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from transformer import errors, synthetic, tfds_source
from transformer import workdir as workdir_lib
from transformer.errors import DataError
from transformer.tokenizer import Tokenizer

SPLITS = ('train', 'validation', 'test')
# Pairs are read and tokenized in chunks of this many (bounded memory, batched SentencePiece).
CHUNK = 8192


# -- sources: random access to the sentence pairs of a split -----------------------------------


class _ListPairs:
    """Pairs held as two Python lists (local files, synthetic task)."""

    def __init__(self, sources: list[str], targets: list[str], name: str):
        self.sources, self.targets, self.name = sources, targets, name

    def __len__(self) -> int:
        return len(self.sources)

    def get(self, ids: Sequence[int]) -> tuple[list[str], list[str]]:
        return [self.sources[i] for i in ids], [self.targets[i] for i in ids]


def read_lines(path: str) -> list[str]:
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


def pairs(config, split: str, files: str = ''):
    """Random-access pairs of `split`, oriented source_lang -> target_lang; with `files` (a
    path prefix), the local files PREFIX.<source_lang> and PREFIX.<target_lang> instead.

    The result has `len()`, `get(ids) -> (sources, targets)` and a `name` for messages.
    """
    if split not in SPLITS:
        raise DataError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
    d, src_lang, tgt_lang = config.data, config.source_lang, config.target_lang
    if files:
        return _local_pairs(files, src_lang, tgt_lang)
    if d.source == 'synthetic':
        return _ListPairs(*synthetic.generate(config, split), name=f'synthetic {split}')
    if d.source == 'local':
        if not d[split]:
            raise DataError(f'config.data.{split} is not set (a path prefix; files are '
                            f'PREFIX.{src_lang} and PREFIX.{tgt_lang})')
        return _local_pairs(d[split], src_lang, tgt_lang)
    if d.source == 'tfds':
        return tfds_source.split_pairs(config, split)
    raise DataError(f'data.source={d.source!r}; valid: tfds, local, synthetic')


def _local_pairs(prefix: str, src_lang: str, tgt_lang: str) -> _ListPairs:
    """The parallel text PREFIX.<src_lang> / PREFIX.<tgt_lang>, line by line."""
    src_path, tgt_path = f'{prefix}.{src_lang}', f'{prefix}.{tgt_lang}'
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise DataError(f'{src_path} has {len(sources)} lines but {tgt_path} has '
                        f'{len(targets)}')
    if not sources:
        raise DataError(f'{src_path} and {tgt_path} are empty')
    return _ListPairs(sources, targets, name=prefix)


def load_text(config, split: str, files: str = '') -> tuple[list[str], list[str]]:
    """Raw source sentences and references of `split` (or of the local `files`, a path
    prefix), in file order, never filtered."""
    split_pairs = pairs(config, split, files)
    sources, targets = [], []
    for start in range(0, len(split_pairs), CHUNK):
        s, t = split_pairs.get(range(start, min(start + CHUNK, len(split_pairs))))
        sources += s
        targets += t
    return sources, targets


def vocab_text(config) -> Iterator[str]:
    """A seeded sample of data.vocab_sample_sentences training pairs, both sides (for BPE)."""
    train = pairs(config, 'train')
    n = len(train)
    k = min(n, config.data.vocab_sample_sentences)
    rng = np.random.default_rng([config.data.seed, 1])
    ids = np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)
    for start in range(0, k, CHUNK):
        sources, targets = train.get(ids[start:start + CHUNK])
        for text in sources + targets:
            if text.strip():
                yield text.strip()


# -- the tokenized training set -------------------------------------------------------------------


def encode_pairs(tokenizer: Tokenizer, sources: list[str], targets: list[str]):
    """Token ids (no EOS) of stripped pairs."""
    return (tokenizer.encode_batch([s.strip() for s in sources]),
            tokenizer.encode_batch([t.strip() for t in targets]))


class TokenizedSplit:
    """Every pair of a split as token ids, in flat arrays (memory-mapped when cached).

    Side `s` ('source' or 'target') of pair i is `tokens[s][offsets[s][i]:offsets[s][i + 1]]`
    (without EOS); `lengths[s][i]` is its length with EOS, 0 for an empty side.
    `fingerprint` identifies a cached split's content.
    """

    def __init__(self, name: str, tokens: dict, offsets: dict, lengths: dict,
                 fingerprint: str | None = None):
        self.name, self.tokens, self.offsets, self.lengths = name, tokens, offsets, lengths
        self.fingerprint = fingerprint  # the cache's content checksum (None: not cached)

    def __len__(self) -> int:
        return len(self.lengths['source'])

    def ids(self, side: str, i: int) -> list[int]:
        """The ids of one side of pair i, without EOS."""
        o = self.offsets[side]
        return self.tokens[side][o[i]:o[i + 1]].tolist()


_SIDES = ('source', 'target')


def _tokenize(tokenizer: Tokenizer, split_pairs, write) -> tuple[dict, dict]:
    """Tokenizes every pair chunk by chunk, handing each side's ids to `write(side, array)`;
    returns (offsets, lengths) per side."""
    n = len(split_pairs)
    dtype = token_dtype(tokenizer.vocab_size)
    offsets = {s: np.zeros(n + 1, np.int64) for s in _SIDES}
    lengths = {s: np.zeros(n, np.int32) for s in _SIDES}
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        texts = split_pairs.get(range(start, stop))
        for side, side_texts, side_ids in zip(_SIDES, texts, encode_pairs(tokenizer, *texts)):
            counts = np.fromiter((len(x) for x in side_ids), np.int64, len(side_ids))
            offsets[side][start + 1:stop + 1] = offsets[side][start] + np.cumsum(counts)
            empty = np.fromiter((not t.strip() for t in side_texts), bool, len(side_texts))
            lengths[side][start:stop] = np.where(empty, 0, counts + 1)
            write(side, np.fromiter((t for x in side_ids for t in x), dtype, int(counts.sum())))
    return offsets, lengths


def token_dtype(vocab_size: int):
    """The narrowest unsigned integer type that holds every id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _in_memory(tokenizer: Tokenizer, split_pairs) -> TokenizedSplit:
    chunks = {s: [] for s in _SIDES}
    offsets, lengths = _tokenize(tokenizer, split_pairs,
                                 lambda side, ids: chunks[side].append(ids))
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {s: np.concatenate(chunks[s]) if chunks[s] else np.zeros(0, dtype) for s in _SIDES}
    return TokenizedSplit(split_pairs.name, tokens, offsets, lengths)


def _cache_key(config, split_pairs, vocab_fingerprint: str) -> str:
    """Changes whenever the text or the vocabulary could have changed."""
    d = config.data
    ident = [d.source, config.source_lang, config.target_lang, len(split_pairs),
             vocab_fingerprint]
    if d.source == 'tfds':
        ident += [d.tfds_name, d.tfds_data_dir]
    elif d.source == 'local':
        for lang in (config.source_lang, config.target_lang):
            st = os.stat(f'{d.train}.{lang}')
            ident += [os.path.abspath(f'{d.train}.{lang}'), st.st_size, st.st_mtime_ns]
    else:  # synthetic: the text is a function of these
        ident += [d.seed, d.synthetic_train_size, d.synthetic_min_words, d.synthetic_max_words]
    return hashlib.sha256(repr(ident).encode()).hexdigest()[:16]


def _cache_files() -> list[str]:
    """The files of a cached split besides CACHE_META."""
    return [f'{s}_{part}' for s in _SIDES
            for part in ('tokens.bin', 'offsets.npy', 'lengths.npy')]


_HASH_CHUNK = 8 << 20  # bytes hashed at a time (bounded memory at any size)


def _file_record(file: str) -> dict:
    """{'bytes': size, 'sha256': digest} of `file`, streamed."""
    digest = hashlib.sha256()
    with open(file, 'rb') as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b''):
            digest.update(chunk)
    return {'bytes': os.path.getsize(file), 'sha256': digest.hexdigest()}


def _content_sha256(files: dict) -> str:
    """One fingerprint of a cache's content: what a checkpoint's data position refers to."""
    return hashlib.sha256(json.dumps({name: files[name]['sha256'] for name in sorted(files)})
                          .encode()).hexdigest()


def cache_problem(directory: str, checksums: bool = True) -> str | None:
    """What is wrong with the cached split in `directory` (None: nothing), checked against
    the sizes and sha256 checksums its CACHE_META records; `checksums=False` checks the sizes
    only (cheap). Streaming the checksums reads the cache once: about 0.7 GB at WMT14 scale
    (benchmarks/cache_check.py)."""
    meta_file = os.path.join(directory, workdir_lib.CACHE_META)
    if not os.path.isfile(meta_file):
        return f'has no {workdir_lib.CACHE_META}'
    try:
        with open(meta_file) as f:
            recorded = json.load(f)['files']
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'has an unreadable {workdir_lib.CACHE_META} ({errors.reason(e)})'
    for name in _cache_files():
        file = os.path.join(directory, name)
        if name not in recorded:
            return f'has no checksum of {name}'
        if not os.path.isfile(file):
            return f'has no {name}'
        size = os.path.getsize(file)
        if size != recorded[name]['bytes']:
            return f'has {name} of {size} bytes, not the {recorded[name]["bytes"]} recorded'
        if checksums and _file_record(file)['sha256'] != recorded[name]['sha256']:
            return f'has {name} with other contents than recorded (its sha256 differs)'
    return None


def _load_cached(directory: str, name: str) -> TokenizedSplit:
    with open(os.path.join(directory, workdir_lib.CACHE_META)) as f:
        meta = json.load(f)
    tokens, offsets, lengths = {}, {}, {}
    for s in _SIDES:
        offsets[s] = np.load(os.path.join(directory, f'{s}_offsets.npy'))
        lengths[s] = np.load(os.path.join(directory, f'{s}_lengths.npy'))
        file = os.path.join(directory, f'{s}_tokens.bin')
        count = int(offsets[s][-1])
        # np.memmap refuses an empty file; a side can be all empty only in odd test corpora.
        tokens[s] = (np.memmap(file, np.dtype(meta['dtype']), 'r', shape=(count,)) if count
                     else np.zeros(0, np.dtype(meta['dtype'])))
    return TokenizedSplit(name, tokens, offsets, lengths, fingerprint=meta['sha256'])


def _build_cache(tokenizer: Tokenizer, train, cache_dir: str, directory: str) -> None:
    """Tokenizes `train` into `directory`, written under a temporary name and renamed when
    complete (a killed run never leaves half a cache under the real name)."""
    def writing():
        return errors.writing('the token cache', directory)

    with writing():
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=workdir_lib.CACHE_TMP_PREFIX)
    try:
        def written(name, mode='wb'):
            # the first error is the one raised, never the close's after it (errors.closing)
            with writing():
                handle = open(os.path.join(tmp, name), mode)  # noqa: SIM115 - closed below
            return errors.closing(handle, 'the token cache', directory)

        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(written(f'{s}_tokens.bin')) for s in _SIDES}

            def write(side, ids):
                with writing():
                    files[side].write(ids.tobytes())

            offsets, lengths = _tokenize(tokenizer, train, write)
        for s in _SIDES:
            with written(f'{s}_offsets.npy') as f:
                np.save(f, offsets[s])
            with written(f'{s}_lengths.npy') as f:
                np.save(f, lengths[s])
        with writing():
            records = {name: _file_record(os.path.join(tmp, name)) for name in _cache_files()}
        with written(workdir_lib.CACHE_META, 'w') as f:
            json.dump({'dtype': np.dtype(token_dtype(tokenizer.vocab_size)).name,
                       'pairs': len(train), 'name': train.name, 'files': records,
                       'sha256': _content_sha256(records)}, f)
        with writing():
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                os.rename(tmp, directory)
            except OSError:  # another process finished the same cache first
                if not os.path.isdir(directory):
                    raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def tokenized_train(config, tokenizer: Tokenizer, *, cache_dir: str | None = None,
                    vocab_fingerprint: str | None = None, rebuild: bool = True) -> TokenizedSplit:
    """The training split as token ids, tokenized once.

    With `cache_dir` and the vocabulary's fingerprint, the ids are stored there (a directory
    per text and vocabulary, written under a temporary name and renamed when complete, so a
    killed run never leaves half a cache) and memory-mapped by later runs and processes. A
    cache found is checked against its recorded sizes and checksums first: one that differs
    is built again, with one warning (it is derived data). `rebuild=False` (the processes of a
    multi-process run other than process 0, which checked it just before) checks the sizes
    only and refuses a cache that differs, deleting nothing. The split's `fingerprint` is the
    cache's content checksum (None in memory).
    """
    train = pairs(config, 'train')
    if cache_dir is None or vocab_fingerprint is None:
        return _in_memory(tokenizer, train)
    directory = os.path.join(cache_dir,
                             workdir_lib.cache_name(_cache_key(config, train, vocab_fingerprint)))
    if os.path.isdir(directory):
        problem = cache_problem(directory, checksums=rebuild)
        if problem and not rebuild:
            raise DataError(f'the token cache {directory} {problem}, as this process sees it '
                            '(process 0 checked it): is the work directory the same on every '
                            'process?')
        if problem:
            errors.warn(f'the token cache {directory} {problem}: building it again (it is made '
                        'from the training text)')
            shutil.rmtree(directory)
    if not os.path.isdir(directory):
        _build_cache(tokenizer, train, cache_dir, directory)
    return _load_cached(directory, train.name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
