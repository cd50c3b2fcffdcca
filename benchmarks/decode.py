"""Decoding speed: sentences/s and tokens/s for greedy and beam 4 at several batch sizes, and
the time of one decoding step against the step index (it must stay flat: a step attends over a
fixed-size key/value cache and never re-runs the prefix).

    python benchmarks/decode.py [--preset=small|base] [--batch_sizes=1,8,32] [--source_length=24]

Prints ONE JSON object. The model has random parameters (speed does not depend on training); a
random model rarely emits EOS, so every sentence runs to its maximum length, source length + 50
(the paper's setting): the worst case for early stopping, and the same work for every run.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import config as config_lib
from transformer import decode
from transformer.model import create_model

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
    x[:, -1] = decode.EOS_ID
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


def throughput(model, batch_sizes, source_length, max_extra, repeats):
    graphdef, params = nnx.split(model)
    rows = []
    for beam in (1, 4):
        for batch in batch_sizes:
            x = jnp.asarray(random_sources(batch, source_length, model.vocab_size, seed=batch))
            result = {}

            def run(x=x, beam=beam, result=result):
                result['out'] = decode.search(graphdef, params, x, beam_size=beam, alpha=0.6,
                                              max_extra_length=max_extra)
                return result['out']

            seconds = time_call(run, repeats)
            tokens, _, steps = result['out']
            generated = int(np.sum(decode.hypothesis_lengths(tokens)))
            rows.append({'search': 'greedy' if beam == 1 else f'beam{beam}', 'batch': batch,
                         'seconds': seconds, 'steps': int(steps),
                         'sentences_per_second': batch / seconds,
                         'tokens_per_second': generated / seconds,
                         'ms_per_step': 1000 * seconds / max(int(steps), 1)})
    return rows


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
    segmentation = (x != decode.PAD_ID).astype(jnp.int32)

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
            result['out'] = decode.search(graphdef, params, x, beam_size=beam, alpha=0.6,
                                          max_extra_length=extra, early_stop=False)
            return result['out']

        seconds = time_call(run, repeats)
        timings.append((int(result['out'][2]), seconds))
    ranges = []
    for (s0, t0), (s1, t1) in zip(timings, timings[1:]):
        ranges.append({'steps': f'{s0}-{s1}', 'ms_per_step': 1000 * (t1 - t0) / (s1 - s0)})
    return {'loops': [{'steps': s, 'seconds': t} for s, t in timings], 'marginal': ranges}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='small', choices=sorted(PRESETS))
    parser.add_argument('--batch_sizes', default='1,8,32')
    parser.add_argument('--source_length', type=int, default=24)
    parser.add_argument('--max_extra_length', type=int, default=50)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    config = make_config(args.preset)
    model = create_model(config)
    batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cache_length = 256
    result = {
        'benchmark': 'decode',
        'device': f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.node()})',
        'model': {'preset': args.preset, 'parameters': parameters,
                  **{k: config.model[k] for k in ('num_encoder_layers', 'num_decoder_layers',
                                                   'd_model', 'd_ff', 'num_heads')},
                  'vocab_size': config.vocab_size, 'dtype': jnp.dtype(model.dtype).name},
        'source_length': args.source_length,
        'max_extra_length': args.max_extra_length,
        'note': 'random parameters: every sentence runs to source length + max_extra_length '
                'tokens; seconds are medians after a compiling warm-up call',
        'throughput': throughput(model, batch_sizes, args.source_length,
                                 args.max_extra_length, args.repeats),
        'decode_step_ms_by_index': {
            'rows': 32, 'cache_length': cache_length,
            'ms_per_step_by_index_range': step_time_by_index(
                model, 32, args.source_length, cache_length, [0, 64, 128, 192, 240], 16,
                max(args.repeats, 5))},
        'beam4_marginal_step_time': marginal_step_time(
            model, batch=8, beam=4, source_width=64, extra=16, lengths=[8, 24, 40, 64],
            repeats=args.repeats),
    }
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
