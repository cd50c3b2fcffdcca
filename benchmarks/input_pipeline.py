"""Speed and padding of the training input pipeline alone, on real text; prints one JSON object.

  python benchmarks/input_pipeline.py [--batch_tokens=25000] [--runs=5] [--batches=20]

Uses ../shared/data (Multi30k and the WMT EN-DE sample) as local parallel text. For each
corpus: BPE vocabulary training time, the time to tokenize the training set once into the
cached token arrays (`tokenize_seconds`, and `tokenize_tokens_per_second`), and for 'bucket'
and 'pack' batching the real (non-padding) source + target tokens per second one process's
iterator produces (median of --runs runs of --batches batches, epoch re-plans included) and
the real-token fraction over one epoch (of the full batches, and of all batches including
the epoch's partial last one).

The speed is set against what one host of 8 H100s would consume training base
(`H100X8_BASE_TOKENS_PER_SECOND`: about 6 M source + target tokens/s, the upper end of the
estimate in the project's issue: NVIDIA's big model does about 82k tokens/s on one A100,
base about 3x that, an H100 2-3x an A100): `over_8xh100` must stay above 1, with room, since
the iterator runs in a background thread of every process.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from transformer import batching as batching_lib  # noqa: E402
from transformer import config as config_lib  # noqa: E402
from transformer import data  # noqa: E402
from transformer import vocabulary as vocabulary_lib  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
CORPORA = {  # name: (train prefix, default vocabulary size)
    'multi30k': (DATA / 'multi30k' / 'train', 8000),
    'wmt_ende_sample': (DATA / 'wmt_ende_sample' / 'train.tok', 37000),
}


def _real_tokens(batch):
    return int((batch['inputs_segmentation'] > 0).sum() + (batch['targets_segmentation'] > 0).sum())


# Source + target tokens per second that 8 H100s training base would consume (see above).
H100X8_BASE_TOKENS_PER_SECOND = 6e6


def bench_corpus(prefix, vocab_size, args):
    c = config_lib.base_config()
    c.vocab_size = vocab_size
    c.data.update(source='local', train=str(prefix), batch_tokens=args.batch_tokens,
                  max_length=args.max_length, bucket_step=args.bucket_step,
                  bucket_growth=args.bucket_growth)
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        tok = vocabulary_lib.load_or_train(c, workdir, lambda: data.vocab_text(c))
        out['vocab_train_seconds'] = round(time.perf_counter() - start, 3)
        out['vocab_pieces'] = tok.vocab_size
        start = time.perf_counter()
        split = data.tokenized_train(c, tok, cache_dir=os.path.join(workdir, 'cache'),
                                     vocab_fingerprint=vocabulary_lib.stored_fingerprint(workdir))
        out['tokenize_seconds'] = round(time.perf_counter() - start, 3)
        tokens = int(sum(split.lengths[side].sum() for side in ('source', 'target')))
        out['tokenize_tokens_per_second'] = round(tokens / out['tokenize_seconds'])
        for batching in ('bucket', 'pack'):
            c.data.batching = batching
            start = time.perf_counter()
            it = batching_lib.TrainIterator(split, c.data)
            init = time.perf_counter() - start
            # Real-token fraction over one epoch: of the batches with every row in use (what a
            # large corpus sees), and of all batches, including the epoch's partial last batch,
            # whose empty rows weigh a lot when an epoch has only a dozen batches.
            real, total = np.zeros(2), np.zeros(2)
            shapes = set()
            while True:
                batch = next(it)
                if it.get_state()['epoch'] != 0:
                    break
                full = bool((batch['inputs_segmentation'] > 0).any(axis=1).all())
                for k in ((0, 1) if full else (1,)):
                    real[k] += _real_tokens(batch)
                    total[k] += 2 * batch['inputs'].size
                shapes.add(batch['inputs'].shape)
            speeds = []
            for _ in range(args.runs):
                start, tokens = time.perf_counter(), 0
                for _ in range(args.batches):
                    tokens += _real_tokens(next(it))
                speeds.append(tokens / (time.perf_counter() - start))
            out[batching] = dict(
                tokens_per_second=round(statistics.median(speeds)),
                over_8xh100=round(statistics.median(speeds) / H100X8_BASE_TOKENS_PER_SECOND, 2),
                tokens_per_second_runs=[round(s) for s in speeds],
                real_token_fraction=round(real[0] / total[0], 4),
                real_token_fraction_whole_epoch=round(real[1] / total[1], 4),
                batch_shapes_in_epoch=len(shapes),
                iterator_init_seconds=round(init, 3),
            )
        out['stats'] = it.stats
        out['at_scale'] = _fraction_at_scale(c, tok, prefix, workdir, args.scale)
    return out


def _fraction_at_scale(c, tok, prefix, workdir, scale):
    """Real-token fractions over one epoch of the corpus repeated `scale` times: the same
    length distribution with WMT-like epochs of thousands of batches, where partial batches
    at the epoch's end stop mattering."""
    big = os.path.join(workdir, 'scaled')
    for lang in ('en', 'de'):
        text = pathlib.Path(f'{prefix}.{lang}').read_text(encoding='utf-8')
        pathlib.Path(f'{big}.{lang}').write_text(text * scale, encoding='utf-8')
    c.data.train = big
    out = dict(scale=scale)
    for batching in ('bucket', 'pack'):
        c.data.batching = batching
        it = batching_lib.TrainIterator(data.tokenized_train(c, tok), c.data)
        real = total = 0
        while True:
            batch = next(it)
            if it.get_state()['epoch'] != 0:
                break
            real += _real_tokens(batch)
            total += 2 * batch['inputs'].size
        out[f'{batching}_real_token_fraction'] = round(real / total, 4)
    c.data.train = str(prefix)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch_tokens', type=int, default=25_000)
    parser.add_argument('--max_length', type=int, default=256)
    defaults = config_lib.base_config().data
    parser.add_argument('--bucket_step', type=int, default=defaults.bucket_step)
    parser.add_argument('--bucket_growth', type=float, default=defaults.bucket_growth)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--batches', type=int, default=20)
    parser.add_argument('--corpora', default=','.join(CORPORA))
    parser.add_argument('--scale', type=int, default=20,
                        help='corpus repetitions for the at-scale padding measurement')
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    result = dict(benchmark='input_pipeline',
                  machine=f'{platform.machine()}, {os.cpu_count()} cpus',
                  settings=vars(args), corpora={})
    for name in args.corpora.split(','):
        prefix, vocab_size = CORPORA[name]
        if not pathlib.Path(f'{prefix}.en').exists():
            result['corpora'][name] = f'skipped: {prefix}.en not present'
            continue
        result['corpora'][name] = bench_corpus(prefix, vocab_size, args)
    speeds = {f'{name}/{how}': corpus[how]['tokens_per_second']
              for name, corpus in result['corpora'].items() if isinstance(corpus, dict)
              for how in ('bucket', 'pack')}
    result['h100x8_base_tokens_per_second'] = H100X8_BASE_TOKENS_PER_SECOND
    result['slowest_tokens_per_second'] = min(speeds.values()) if speeds else None
    result['at_least_10M_tokens_per_second'] = bool(speeds) and min(speeds.values()) >= 10e6
    print(json.dumps(result, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))


if __name__ == '__main__':
    main()
