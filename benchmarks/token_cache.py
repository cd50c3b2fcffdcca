"""What building the token cache costs before the first step, at WMT14 scale; prints ONE JSON.

    python benchmarks/token_cache.py [--fraction=0.01] [--vocab_size=37000]

`train` tokenizes the whole training set once into the work directory's token cache
(`data._build_cache`: SentencePiece's encode_batch in chunks of `data.CHUNK` pairs, the ids
written as they come, then offsets, lengths and sha256 checksums). This runs that very
function on synthetic text of WMT14's shape (pseudo-words of a Zipf-distributed lexicon,
about 23 words per sentence, as WMT14's English side), for EN-DE (4,508,785 pairs) and EN-FR
(40,836,876 pairs, TFDS wmt14_translate/fr-en: 81.7 M sentences, both sides), at
`--fraction` of their size, extrapolated linearly (tokenizing is per sentence; the build's
memory grows by 24 bytes a pair: int64 offsets and int32 lengths of each side). Each build
runs in a fresh forked process, with 1 thread and with every core this process may use
(`tokenizer.usable_cores`, its CPU affinity), so that its peak memory (ru_maxrss) and CPU
time are its own (CPU seconds over wall seconds below the thread count: a busy host).
The vocabulary is trained once (BPE on a sample of the text, `--vocab_size` asked), with 1
thread and with all, and timed at that sample's size (not extrapolated: the paper-scale
trainer reads `data.vocab_sample_sentences`).
"""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import versus_flax as vf  # noqa: E402 - the benchmarks' shared JSON header

from transformer import data  # noqa: E402
from transformer import tokenizer as tokenizer_lib  # noqa: E402

CORPORA = {'wmt14_ende': 4_508_785, 'wmt14_enfr': 40_836_876}  # training pairs (TFDS)
BYTES_PER_PAIR = 2 * (8 + 4)  # what the build holds per pair: offsets and lengths, both sides
POOL = 20_000  # distinct sentences per side, cycled through (generating them is not timed)


def lexicon(rng, size: int = 50_000) -> list[str]:
    """Pronounceable pseudo-words, 2-12 letters, most frequent first."""
    onsets, vowels = list('bcdfghjklmnprstvwz') + ['sch', 'st', 'tr', 'br'], list('aeiou')
    words = set()
    while len(words) < size:
        syllables = rng.integers(1, 5)
        words.add(''.join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words, key=lambda w: (len(w), w))


def sentences(rng, words: list[str], count: int) -> list[str]:
    """`count` sentences of Zipf-distributed words, lognormal lengths of mean about 23."""
    lengths = np.clip(rng.lognormal(3.0, 0.5, count), 1, 120).astype(int)
    ranks = np.minimum(rng.zipf(1.1, int(lengths.sum())) - 1, len(words) - 1)
    out, at = [], 0
    for n in lengths:
        chosen = [words[r] for r in ranks[at:at + n]]
        chosen[0] = chosen[0].capitalize()
        out.append(' '.join(chosen) + '.')
        at += n
    return out


class CycledPairs:
    """`pairs` pairs of text, cycling through a pool (what data._build_cache reads)."""

    def __init__(self, sources: list[str], targets: list[str], pairs: int, name: str):
        self._sources, self._targets, self._pairs, self.name = sources, targets, pairs, name

    def __len__(self) -> int:
        return self._pairs

    def get(self, ids) -> tuple[list[str], list[str]]:
        return ([self._sources[i % len(self._sources)] for i in ids],
                [self._targets[i % len(self._targets)] for i in ids])


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def build_in_child(proto: bytes, pairs: CycledPairs, threads: int) -> dict:
    """data._build_cache in a forked process on `threads` threads: seconds and memory."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, report, exit
        os.close(read)
        tokenizer = tokenizer_lib.Tokenizer(proto, threads=threads)
        before = _rss_bytes()
        with tempfile.TemporaryDirectory() as cache_dir:
            start = time.perf_counter()
            data._build_cache(tokenizer, pairs, cache_dir, os.path.join(cache_dir, 'train'))
            seconds = time.perf_counter() - start
            tokens = sum(os.path.getsize(os.path.join(cache_dir, 'train', f'{s}_tokens.bin'))
                         for s in ('source', 'target')) // 2  # uint16 ids
        usage = resource.getrusage(resource.RUSAGE_SELF)
        os.write(write, json.dumps({'seconds': seconds, 'rss_before': before,
                                    'peak': usage.ru_maxrss * 1024, 'tokens': tokens,
                                    'cpu': usage.ru_utime + usage.ru_stime}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--fraction', type=float, default=0.01)
    parser.add_argument('--vocab_size', type=int, default=37000)
    parser.add_argument('--vocab_sample', type=int, default=20_000, help='sentences per side')
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    words = lexicon(rng)
    sources, targets = sentences(rng, words, POOL), sentences(rng, words, POOL)
    cores = tokenizer_lib.usable_cores()
    thread_counts = sorted({1, cores})
    result = {'usable_cores': cores,
              'fraction': args.fraction, 'chunk_pairs': data.CHUNK,
              'text': {'words_per_sentence': round(float(np.mean(
                  [s.count(' ') + 1 for s in sources])), 1),
                  'characters_per_sentence': round(float(np.mean([len(s) for s in sources])), 1),
                  'distinct_sentences_per_side': POOL},
              'extrapolation': 'seconds and the build\'s memory growth scale linearly with the '
                               f'pairs (the growth minus {BYTES_PER_PAIR} B a pair is constant)'}
    sample = sources[:args.vocab_sample] + targets[:args.vocab_sample]
    vocab = {'sentences': len(sample)}
    for threads in thread_counts:
        start = time.perf_counter()
        proto = tokenizer_lib.train(sample, args.vocab_size, threads=threads)
        vocab[f'seconds_{threads}_threads'] = round(time.perf_counter() - start, 2)
        log(f'vocabulary on {threads} thread(s): {vocab[f"seconds_{threads}_threads"]} s')
    vocab['pieces'] = tokenizer_lib.Tokenizer(proto).vocab_size
    result['vocabulary_training'] = vocab
    for corpus, full in CORPORA.items():
        pairs = max(data.CHUNK, int(full * args.fraction))
        split = CycledPairs(sources, targets, pairs, f'synthetic {corpus}')
        row = {'pairs_full': full, 'sentences_full': 2 * full, 'pairs_measured': pairs}
        for threads in thread_counts:
            m = build_in_child(proto, split, threads)
            rate = 2 * pairs / m['seconds']
            growth = max(0, m['peak'] - m['rss_before'])
            row[f'{threads}_threads'] = {
                'seconds': round(m['seconds'], 2),
                'sentences_per_second': round(rate),
                # below the thread count: the threads did not all get a core (a busy host)
                'cpu_seconds_over_wall': round(m['cpu'] / m['seconds'], 2),
                'tokens_per_sentence': round(m['tokens'] / pairs, 1),
                'peak_rss_mib': round(m['peak'] / 2**20),
                'build_growth_mib': round(growth / 2**20, 1),
                'seconds_full': round(2 * full / rate),
                'minutes_full': round(2 * full / rate / 60, 1),
                'build_growth_full_mib': round(
                    (growth + BYTES_PER_PAIR * (full - pairs)) / 2**20),
            }
            log(f'{corpus} at {pairs} pairs on {threads} thread(s): {row[f"{threads}_threads"]}')
        if len(thread_counts) > 1:
            row['speedup_all_cores_over_1'] = round(
                row[f'{cores}_threads']['sentences_per_second']
                / row['1_threads']['sentences_per_second'], 2)
        result[corpus] = row
    # the header last: it starts JAX's backend, whose threads a fork must not copy
    print(json.dumps({**vf.header('tokenize', load_before), **result}, indent=2))


if __name__ == '__main__':
    main()
