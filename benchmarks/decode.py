"""Decoding speed: sentences/s and tokens/s of greedy decoding, beam 4, beam 4 with a 4-best
list, sampling and a 2-model ensemble (beam 4) at several batch sizes; a limited decode (the
in-training BLEU's and `evaluate --limit`'s quick look) against a full one; and the time of one
decoding step against the step index (it must stay flat: a step attends over a fixed-size
key/value cache and never re-runs the prefix).

    python benchmarks/decode.py [--preset=small|base] [--batch_sizes=8,32,128]
        [--source_length=16] [--max_extra_length=16] [--repeats=3]
        [--sections=throughput,limit[,step_index,marginal,constraints,alignment]]
        [--workdir=DIR]  # a trained demo, for the alignment section

Prints ONE JSON object. The models have random parameters (speed does not depend on
training); a random model rarely emits EOS, so every sentence runs to its maximum length,
source length + max_extra_length: the worst case for early stopping, and the same work for
every search, so that the searches compare. The defaults (16 + 16 = 32 steps a sentence) keep
the run to about two minutes on a 2-core CPU; `--source_length=24 --max_extra_length=50` is the
paper's + 50 on the sources of the 2026-11-25 figures.

`constraints` times beam 4 and sampling with a forced target prefix and with
--no_repeat_ngram_size against the same search without them (interleaved). `alignment`
measures, on a trained demo work directory (`--workdir`, configs/demo.py), the alignment error
rate of each decoder layer's alignments of the test references against the synthetic task's
true alignment and a diagonal baseline's, and the cost of the alignment pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import alignment, batching, host_decode, saved_runs, search, synthetic
from transformer import config as config_lib
from transformer.model import create_model
from transformer.tokenizer import EOS_ID, PAD_ID

PRESETS = {
    # A CPU-sized model: 3 + 3 layers, d_model 256, vocabulary 8000.
    'small': dict(model=dict(num_encoder_layers=3, num_decoder_layers=3, d_model=256, d_ff=1024,
                             num_heads=4, d_k=64, d_v=64), vocab_size=8000),
    # The paper's base model with its 37000-token shared vocabulary.
    'base': dict(model={}, vocab_size=37000),
}


def make_config(preset: str):
    c = config_lib.base_config()
    c.model.update(PRESETS[preset]['model'])
    c.vocab_size = PRESETS[preset]['vocab_size']
    return c


def random_sources(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    x[:, -1] = EOS_ID
    return x


def _block(tree):
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready') else a, tree)
    return tree


def time_call(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up (compilation) call."""
    _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# The searches of the throughput table: (name, function of (models, inputs, max_extra)).
def _beam(beam, nbest=1):
    def run(models, x, extra):
        graphdefs, params = search.split(models)
        return search.search(graphdefs, params, x, beam_size=beam, alpha=0.6,
                             max_extra_length=extra, nbest=nbest)
    return run


def _sample(models, x, extra):
    graphdefs, params = search.split(models)
    return search.sample(graphdefs, params, x, np.arange(x.shape[0]), seed=0, top_p=0.9,
                         max_extra_length=extra)


SEARCHES = {'greedy': (1, _beam(1)), 'beam4': (1, _beam(4)), 'beam4_nbest4': (1, _beam(4, 4)),
            'sample_top_p0.9': (1, _sample), 'ensemble2_beam4': (2, _beam(4))}


def interleaved(calls: dict, repeats: int, warm_up: bool = True) -> dict:
    """Median seconds of each of `calls` (name -> function) after a warm-up (compiling) call
    of each, the repeats interleaved (a, b, c, a, b, c, ...) so that a change in the machine's
    load hits every call alike."""
    for fn in calls.values() if warm_up else ():
        _block(fn())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def throughput(models, batch_sizes, source_length, max_extra, repeats):
    """One row per search and batch size; `models` holds two models (the ensemble's). The
    searches of one batch size are timed interleaved."""
    rows = []
    for batch in batch_sizes:
        x = jnp.asarray(random_sources(batch, source_length, models[0].vocab_size, seed=batch))
        found = {}

        def call(name, members, run_search, x=x, found=found):
            def run():
                found[name] = run_search(models[:members], x, max_extra)
                return found[name]
            return run

        seconds = interleaved({name: call(name, members, run_search)
                               for name, (members, run_search) in SEARCHES.items()}, repeats)
        for name in SEARCHES:
            # Tokens of the best (first) hypothesis of each sentence, so that searches compare.
            generated = int(np.sum(search.hypothesis_lengths(found[name].tokens[:, 0])))
            steps = int(found[name].steps)
            rows.append({'search': name, 'batch': batch, 'seconds': seconds[name],
                         'steps': steps, 'sentences_per_second': batch / seconds[name],
                         'tokens_per_second': generated / seconds[name],
                         'ms_per_step': 1000 * seconds[name] / max(steps, 1)})
    return rows


def ensemble_cost(rows) -> dict:
    """Seconds of the 2-model ensemble over one model's (beam 4), per batch size."""
    seconds = {(r['search'], r['batch']): r['seconds'] for r in rows}
    return {str(b): seconds[('ensemble2_beam4', b)] / seconds[('beam4', b)]
            for (name, b) in seconds if name == 'beam4'}


class _Ids:
    """A stand-in tokenizer: the benchmark's sentences are token ids, not text."""

    @staticmethod
    def decode(ids):
        return ' '.join(map(str, ids))


def synthetic_split(sentences: int, vocab: int, seed: int = 0) -> batching.EncodedSplit:
    """Random sentences with a realistic spread of lengths (3-80 tokens, mostly 10-40)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(22), 0.5, sentences).astype(int), 3, 80)
    ids = [rng.integers(3, vocab, n).tolist() + [EOS_ID] for n in lengths]
    none = np.zeros(sentences, bool)
    return batching.EncodedSplit('synthetic', [''] * sentences, [''] * sentences, ids, ids,
                                 none, none)


def _old_limited_decode(decoder, config, split, batch_sentences, limit):
    """How a limit was applied before: every length-sorted batch holding one of the first
    `limit` sentences was decoded whole."""
    for batch in batching.eval_batches(split, config.data, batch_sentences):
        keep = (batch['index'] >= 0) & (batch['index'] < limit)
        if keep.any():
            rows = batch['index'] >= 0
            decoder(batch['inputs'][rows], batch['index'][rows])


def limited_decode(model, config, sentences, batch_sentences, limits, max_extra, repeats):
    """Greedy decoding of a whole split against decoding its first N sentences (chosen, then
    batched), and against the old way of limiting; medians of `repeats`, interleaved, after a
    warm-up call of each (which compiles its shapes)."""
    split = synthetic_split(sentences, model.vocab_size)
    settings = host_decode.Settings(beam_size=1, max_extra_length=max_extra)
    decoder = host_decode.make_decoder(model, config, settings, batch_sentences,
                                       devices=jax.devices()[:1])

    def full():
        host_decode.translate_split(decoder, config, _Ids, split, batch_sentences)

    calls = {'full': full}
    for limit in limits:
        calls[f'limit{limit}'] = functools.partial(
            host_decode.translate_split, decoder, config, _Ids, split, batch_sentences, limit=limit)
        calls[f'before{limit}'] = functools.partial(
            _old_limited_decode, decoder, config, split, batch_sentences, limit)
    batches = {}
    for name, fn in calls.items():  # the warm-up: batches decoded by one call of each
        before = decoder.batches
        fn()
        batches[name] = decoder.batches - before
    seconds = interleaved(calls, repeats, warm_up=False)
    out = {'sentences': sentences, 'batch_sentences': batch_sentences, 'search': 'greedy',
           'full': {'seconds': seconds['full'], 'batches': batches['full']}, 'limited': []}
    for limit in limits:
        new, old = f'limit{limit}', f'before{limit}'
        out['limited'].append({
            'limit': limit, 'seconds': seconds[new], 'batches': batches[new],
            'fraction_of_full_time': seconds[new] / seconds['full'],
            'fraction_of_sentences': limit / sentences,
            'before': {'seconds': seconds[old], 'batches': batches[old],
                       'fraction_of_full_time': seconds[old] / seconds['full']}})
    return out


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(3,))
def _steps_from(graphdef, params, tokens, cache, start, count, segmentation):
    """`count` decode_step calls at indices start, start + 1, ... inside one compiled loop.

    The cache is donated and updated in place, as in the real search loop.
    """
    model = nnx.merge(graphdef, params)
    cross = cache['cross']

    def body(i, carry):
        tokens, self_cache = carry
        logits, new = model.decode_step(tokens, start + i, {'self': self_cache, 'cross': cross},
                                        segmentation)
        return jnp.argmax(logits, -1).astype(jnp.int32), new['self']

    tokens, self_cache = jax.lax.fori_loop(0, count, body, (tokens, cache['self']))
    return tokens, {'self': self_cache, 'cross': cross}


def step_time_by_index(model, rows, source_length, cache_length, starts, count, repeats):
    """ms per decode_step for `rows` hypotheses, in loops of `count` steps from each start.

    The cache has `cache_length` positions; one compilation serves every start index.
    """
    graphdef, params = nnx.split(model)
    x = jnp.asarray(random_sources(rows, source_length, model.vocab_size))
    segmentation = (x != PAD_ID).astype(jnp.int32)

    @jax.jit
    def init(params, x):
        m = nnx.merge(graphdef, params)
        return m.init_cache(m.encode(x), cache_length)

    state = {'tokens': jnp.full((rows,), 5, jnp.int32), 'cache': init(params, x)}
    out = {}
    for start in starts:
        def run(start=start):
            state['tokens'], state['cache'] = _steps_from(
                graphdef, params, state['tokens'], state['cache'], jnp.int32(start), count,
                segmentation)
            return state['tokens']
        out[f'{start}-{start + count - 1}'] = 1000 * time_call(run, repeats) / count
    return out


def marginal_step_time(model, batch, beam, source_width, extra, lengths, repeats):
    """Whole beam searches whose loops run different numbers of steps over the same arrays.

    Sources padded to one width and early stopping off: a sentence of n real tokens runs
    n + extra steps, so the difference in time between lengths is the cost of the extra steps
    alone. Returns ms per step between consecutive step counts.
    """
    graphdef, params = nnx.split(model)
    timings = []
    for n in lengths:
        x = np.zeros((batch, source_width), np.int32)
        x[:, :n] = random_sources(batch, n, model.vocab_size, seed=n)
        x = jnp.asarray(x)
        result = {}

        def run(x=x, result=result):
            result['out'] = search.search((graphdef,), (params,), x, beam_size=beam,
                                          alpha=0.6, max_extra_length=extra, early_stop=False)
            return result['out']

        seconds = time_call(run, repeats)
        timings.append((int(result['out'].steps), seconds))
    ranges = []
    for (s0, t0), (s1, t1) in zip(timings, timings[1:]):
        ranges.append({'steps': f'{s0}-{s1}', 'ms_per_step': 1000 * (t1 - t0) / (s1 - s0)})
    return {'loops': [{'steps': s, 'seconds': t} for s, t in timings], 'marginal': ranges}


def constraint_cost(model, batch, source_length, max_extra, repeats) -> list[dict]:
    """Seconds of beam 4 and of sampling without constraints, with an 8-token target prefix
    and with no repeated 2- and 4-grams, timed interleaved (one row per search)."""
    x = jnp.asarray(random_sources(batch, source_length, model.vocab_size, seed=7))
    prefix = jnp.asarray(random_sources(batch, 8, model.vocab_size, seed=8))
    prefix = prefix.at[:, -1].set(prefix[:, 0])  # no EOS in a prefix
    graphdefs, params = search.split(model)
    variants = {'none': {}, 'prefix8': dict(prefix=prefix),
                'no_repeat_2': dict(no_repeat_ngram_size=2),
                'no_repeat_4': dict(no_repeat_ngram_size=4)}
    calls = {}
    for name, extra in variants.items():
        calls[('beam4', name)] = functools.partial(
            search.search, graphdefs, params, x, beam_size=4, alpha=0.6,
            max_extra_length=max_extra, **extra)
        calls[('sample_top_p0.9', name)] = functools.partial(
            search.sample, graphdefs, params, x, np.arange(batch), seed=0, top_p=0.9,
            max_extra_length=max_extra, **extra)
    seconds = interleaved(calls, repeats)
    return [{'search': s, 'constraint': c, 'batch': batch, 'seconds': t,
             'over_unconstrained': t / seconds[(s, 'none')]} for (s, c), t in seconds.items()]


def alignment_quality(workdir: str, sentences: int, repeats: int) -> dict:
    """AER of each decoder layer's alignments of the first `sentences` test references
    (teacher-forced) against synthetic.alignments, the diagonal baseline's, and the seconds of
    the alignment pass against beam 4's on the same batch."""
    model, config, tokenizer, steps = saved_runs.load_model(workdir)
    sources, targets = synthetic.generate(config, 'test')
    truth = [set(a) for a in synthetic.alignments(config, 'test')[:sentences]]
    sources, targets = sources[:sentences], targets[:sentences]
    src = [tokenizer.encode(s) + [EOS_ID] for s in sources]
    tgt = [tokenizer.encode(t) + [EOS_ID] for t in targets]

    def pad(rows):
        width = max(len(r) for r in rows)
        return jnp.asarray([r + [PAD_ID] * (width - len(r)) for r in rows], jnp.int32)

    graphdefs, params = search.split(model)
    x, y = pad(src), pad(tgt)
    layers = {}
    for layer in range(config.model.num_decoder_layers):
        attention = np.asarray(alignment.cross_attention(graphdefs, params, x, y, layer))
        found = [set(alignment.hard_alignment(attention[i], tokenizer.pieces(src[i][:-1]),
                                              tokenizer.pieces(tgt[i][:-1])))
                 for i in range(sentences)]
        layers[str(layer)] = round(alignment.alignment_error_rate(found, truth), 4)
    diagonal = [alignment.diagonal(len(s.split()), len(t.split()))
                for s, t in zip(sources, targets)]
    seconds = interleaved({
        'alignment_pass': lambda: alignment.cross_attention(graphdefs, params, x, y, 0),
        'beam4': lambda: search.search(graphdefs, params, x, beam_size=4, alpha=0.6,
                                       max_extra_length=50)}, repeats)
    return {'workdir': workdir, 'steps': steps, 'sentences': sentences,
            'aer_by_decoder_layer': layers,
            'default_layer': alignment.resolve_layer(None, config.model.num_decoder_layers),
            'aer_diagonal': round(alignment.alignment_error_rate(diagonal, truth), 4),
            'seconds': seconds,
            'alignment_pass_over_beam4': seconds['alignment_pass'] / seconds['beam4']}


SECTIONS = ('throughput', 'limit', 'step_index', 'marginal', 'constraints', 'alignment')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='small', choices=sorted(PRESETS))
    parser.add_argument('--batch_sizes', default='8,32,128')
    parser.add_argument('--source_length', type=int, default=16)
    parser.add_argument('--max_extra_length', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--limit_sentences', type=int, default=256,
                        help='sentences of the split that the limited decode is measured on')
    parser.add_argument('--limits', default='64')
    parser.add_argument('--sections', default='throughput,limit',
                        help=f'any of {",".join(SECTIONS)}')
    parser.add_argument('--workdir', default=None,
                        help='a trained configs/demo.py work directory (alignment section)')
    parser.add_argument('--alignment_sentences', type=int, default=200)
    args = parser.parse_args()
    sections = args.sections.split(',')
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f'unknown sections {sorted(unknown)}; valid: {", ".join(SECTIONS)}')
    if 'alignment' in sections and not args.workdir:
        parser.error('the alignment section needs --workdir=a trained configs/demo.py run')

    config = make_config(args.preset)
    models = [create_model(config, seed=0), create_model(config, seed=1)]
    model = models[0]
    batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cache_length = 256
    load = os.getloadavg()
    result = {
        'benchmark': 'decode',
        'device': f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.node()})',
        'load_average_at_start': [round(x, 2) for x in load],
        'model': {'preset': args.preset, 'parameters': parameters,
                  **{k: config.model[k] for k in ('num_encoder_layers', 'num_decoder_layers',
                                                   'd_model', 'd_ff', 'num_heads')},
                  'vocab_size': config.vocab_size, 'dtype': jnp.dtype(model.dtype).name},
        'source_length': args.source_length,
        'max_extra_length': args.max_extra_length,
        'note': 'random parameters: every sentence runs to source length + max_extra_length '
                'tokens; seconds are medians after a compiling warm-up call; tokens_per_second '
                'counts the best hypothesis of each sentence; sampling draws one sample per '
                'sentence at temperature 1 with top-p 0.9',
    }
    if 'throughput' in sections:
        rows = throughput(models, batch_sizes, args.source_length, args.max_extra_length,
                          args.repeats)
        result['throughput'] = rows
        result['ensemble2_seconds_over_one_model'] = ensemble_cost(rows)
    if 'limit' in sections:
        result['limited_decode'] = limited_decode(
            model, config, args.limit_sentences, 32, [int(n) for n in args.limits.split(',')],
            args.max_extra_length, args.repeats)
    if 'step_index' in sections:
        result['decode_step_ms_by_index'] = {
            'rows': 32, 'cache_length': cache_length,
            'ms_per_step_by_index_range': step_time_by_index(
                model, 32, args.source_length, cache_length, [0, 64, 128, 192, 240], 16,
                max(args.repeats, 5))}
    if 'marginal' in sections:
        result['beam4_marginal_step_time'] = marginal_step_time(
            model, batch=8, beam=4, source_width=64, extra=16, lengths=[8, 24, 40, 64],
            repeats=args.repeats)
    if 'constraints' in sections:
        result['constraints'] = constraint_cost(model, 32, args.source_length,
                                                args.max_extra_length, args.repeats)
    if 'alignment' in sections:
        result['alignment'] = alignment_quality(args.workdir, args.alignment_sentences,
                                                args.repeats)
    result['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
