"""Side by side with Flax's own WMT example: its model and its steps beside ours, at equal work.

    git clone --depth=1 https://github.com/google/flax /tmp/flax      # any recent checkout
    python benchmarks/versus_flax.py --flax_dir=/tmp/flax [--runs=7] [--parts=train_small,...]
    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/versus_flax.py ...   # both on tcmalloc

Reads `examples/wmt/models.py`, `train.py` (`train_step`, `predict_step`, `initialize_cache`)
and `decode.py` from the checkout given (never copied into this repository; its TensorFlow,
clu and input-pipeline imports are stood in for while train.py is imported, as none of them is
used by those functions), and runs them as the example does (`jax.pmap` over one device, its
TrainState with optax.adamw, weight decay 0) beside ours as `transformer/train.py` runs it
(train_step.setup, jit_sharded_step, compiled ahead of time per shape) and as `evaluate`
decodes (search.search), in one process, one CPU device.

Equal work: the same sizes, vocabulary, batch (random token ids, one pair per row, no padding)
and dtype (float32 on CPU); label smoothing 0.1; the example's dropout sites and rates
(embeddings, attention probabilities, attention outputs, the ReLU hidden layer, the
feed-forward output: all 0.1) with our `model.norm=pre` (the example is pre-LN); no biases in
the attention projections on both sides. `ours_default` is our step as configured by default
(post-LN, dropout on sub-layer outputs and embeddings only): not the same work, shown for
what a user of the defaults gets. Decoding: beam 4, alpha 0.6, random parameters, so no
sentence ends early; both decode source length + 50 tokens (the example's EOS id set out of
the vocabulary, ours runs to its maximum length).

Each part compiles every variant and warms it up, then runs --runs rounds; a round times
each variant once (--steps steps, or one decoding call), in an order that alternates round by
round, so that load from other processes hits them alike. Reported per part: per variant the
median wall time and process CPU time, and per variant the paired ratio flax / ours of each
round (> 1: ours is faster) with its median, min and max; the load average before and after.
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax
import jax.numpy as jnp
import numpy as np

from transformer import allocator, search, sharding
from transformer import config as config_lib
from transformer import train_step as train_step_lib
from transformer.model import create_model

SIZES = {
    # The small model of issue 20's table: 2 + 2 layers, d_model 256, 4 heads, vocabulary 8000.
    'small': dict(layers=2, d_model=256, d_ff=1024, heads=4, vocab=8000),
    # The paper's base model with its shared vocabulary of 37000.
    'base': dict(layers=6, d_model=512, d_ff=2048, heads=8, vocab=37000),
}
PARTS = {
    'train_small': dict(kind='train', size='small', rows=64, length=32),
    'train_base': dict(kind='train', size='base', rows=16, length=64),
    'decode8': dict(kind='decode', size='small', rows=8, length=24),
    'decode32': dict(kind='decode', size='small', rows=32, length=24),
}
DROPOUT = 0.1
LABEL_SMOOTHING = 0.1
MAX_EXTRA = 50  # decoded tokens beyond the source length (section 6.1)


# -- Flax's example --------------------------------------------------------------------------


class _StandIn(types.ModuleType):
    """A module whose every attribute is another stand-in (train.py names tf.data.Dataset in
    annotations of functions that are not run here)."""

    def __getattr__(self, name: str):
        if name.startswith('__'):
            raise AttributeError(name)
        return _StandIn(f'{self.__name__}.{name}')


def import_flax_example(flax_dir: str) -> types.SimpleNamespace:
    """models, train and decode of examples/wmt, imported from the checkout."""
    wmt = pathlib.Path(flax_dir) / 'examples' / 'wmt'
    if not (wmt / 'train.py').exists():
        sys.exit(f'error: {wmt}/train.py not found: --flax_dir must be a checkout of '
                 'github.com/google/flax')
    sys.path.insert(0, str(wmt))
    # What train.py imports for real, imported before the stand-ins exist (flax.io asks
    # importlib whether TensorFlow is installed).
    for name in ('flax.jax_utils', 'flax.training.checkpoints', 'flax.training.common_utils',
                 'flax.training.dynamic_scale', 'flax.training.train_state', 'optax',
                 'orbax.checkpoint'):
        importlib.import_module(name)
    stand_ins = {name: _StandIn(name) for name in (
        'tensorflow', 'clu', 'clu.metric_writers', 'clu.periodic_actions', 'input_pipeline')}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        models = importlib.import_module('models')
        decode = importlib.import_module('decode')
        train = importlib.import_module('train')
    finally:  # nothing else in this process should see the stand-ins
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(models=models, decode=decode, train=train, path=str(wmt))


def flax_config(ex, size: dict, **kw):
    import flax.linen as nn
    return ex.models.TransformerConfig(
        vocab_size=size['vocab'], output_vocab_size=size['vocab'], share_embeddings=True,
        logits_via_embedding=True, dtype=jnp.float32, emb_dim=size['d_model'],
        num_heads=size['heads'], num_layers=size['layers'], qkv_dim=size['d_model'],
        mlp_dim=size['d_ff'], max_len=256, dropout_rate=DROPOUT,
        attention_dropout_rate=DROPOUT, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), **kw)


def flax_train(ex, size: dict, batch: dict):
    """The example's p_train_step, state and device batch, as its train_and_evaluate makes
    them (one device)."""
    import optax
    from flax import jax_utils
    config = flax_config(ex, size, deterministic=False, decode=False)
    lr = ex.train.create_learning_rate_schedule(learning_rate=0.002, warmup_steps=1000)
    model = ex.models.Transformer(config.replace(deterministic=True))
    shape = batch['inputs'].shape
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones(shape, jnp.float32),
                                    jnp.ones(shape, jnp.float32))
    state = ex.train.TrainState.create(
        apply_fn=model.apply, params=variables['params'],
        tx=optax.adamw(learning_rate=lr, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0),
        dynamic_scale=None)
    state = jax_utils.replicate(state)
    step = jax.pmap(functools.partial(ex.train.train_step, config=config, learning_rate_fn=lr,
                                      label_smoothing=LABEL_SMOOTHING),
                    axis_name='batch', donate_argnums=(0,))
    device_batch = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    rngs = jax.random.split(jax.random.key(1), 1)
    return lambda s: step(s, device_batch, dropout_rng=rngs), state


def flax_decode(ex, size: dict, inputs: np.ndarray):
    """The example's p_pred_step on `inputs`, decoding len + MAX_EXTRA tokens (EOS made
    impossible: random parameters would end sentences at random)."""
    config = flax_config(ex, size, deterministic=True, decode=True)
    model = ex.models.Transformer(config.replace(decode=False))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones(inputs.shape, jnp.float32),
                                    jnp.ones(inputs.shape, jnp.float32))
    max_len = inputs.shape[1] + 1 + MAX_EXTRA  # ours: source + EOS + 50
    init_cache = jax.pmap(functools.partial(ex.train.initialize_cache, max_decode_len=max_len,
                                            config=config), axis_name='batch')
    step = jax.pmap(functools.partial(ex.train.predict_step, config=config, beam_size=4),
                    axis_name='batch', static_broadcasted_argnums=(3, 4))
    from flax import jax_utils
    params = jax_utils.replicate(variables['params'])
    device_inputs = jnp.asarray(inputs)[None]
    cache = init_cache(device_inputs)
    return lambda _: step(device_inputs, params, cache, -1, max_len), None


# -- ours --------------------------------------------------------------------------------------


def our_config(size: dict, same_work: bool):
    c = config_lib.base_config()
    c.vocab_size = size['vocab']
    c.model.update(num_encoder_layers=size['layers'], num_decoder_layers=size['layers'],
                   d_model=size['d_model'], d_ff=size['d_ff'], num_heads=size['heads'],
                   d_k=size['d_model'] // size['heads'], d_v=size['d_model'] // size['heads'],
                   dropout_rate=DROPOUT, max_position=256, dtype='float32')
    c.train.label_smoothing = LABEL_SMOOTHING
    if same_work:  # the example's sites: attention probabilities, the ReLU layer; pre-LN
        c.model.update(norm='pre', attention_dropout_rate=DROPOUT, relu_dropout_rate=DROPOUT)
    return c


def our_train(config, batch: dict):
    """Our step exactly as train.py builds and runs it, on a one-device mesh."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    setup = train_step_lib.setup(config, mesh)
    step = train_step_lib.CompiledSteps(train_step_lib.jit_sharded_step(setup))
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    device_batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
                    for k, v in batch.items()}
    return lambda s: step(s, device_batch), state


def our_decode(config, inputs: np.ndarray):
    graphdefs, params = search.split(create_model(config))
    with_eos = np.concatenate([inputs, np.ones((inputs.shape[0], 1), np.int32)], axis=1)
    x = jnp.asarray(with_eos)
    return lambda _: search.search(graphdefs, params, x, beam_size=4, alpha=0.6,
                                   max_extra_length=MAX_EXTRA), None


# -- timing --------------------------------------------------------------------------------------


def synthetic_batch(rows: int, length: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = lambda: rng.integers(3, vocab, size=(rows, length)).astype(np.int32)
    ones = np.ones((rows, length), np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    return dict(inputs=tokens(), targets=tokens(), inputs_segmentation=ones,
                targets_segmentation=ones.copy(), inputs_position=positions,
                targets_position=positions.copy())


def _block(out):
    jax.block_until_ready(out)
    return out


def run_part(name: str, part: dict, ex, runs: int, steps: int, log) -> dict:
    size = SIZES[part['size']]
    if part['kind'] == 'train':
        batch = synthetic_batch(part['rows'], part['length'], size['vocab'])
        built = {'flax': flax_train(ex, size, batch),
                 'ours': our_train(our_config(size, True), batch),
                 'ours_default': our_train(our_config(size, False), batch)}
        per_run = steps
    else:
        inputs = synthetic_batch(part['rows'], part['length'], size['vocab'])['inputs']
        built = {'flax': flax_decode(ex, size, inputs),
                 'ours': our_decode(our_config(size, True), inputs)}
        per_run = 1
    fns = {v: fn for v, (fn, _) in built.items()}
    states = {v: state for v, (_, state) in built.items()}
    compile_s = {}
    for v, fn in fns.items():  # compile, then one warm-up call
        start = time.perf_counter()
        out = _block(fn(states[v]))
        compile_s[v] = time.perf_counter() - start
        if part['kind'] == 'train':
            states[v] = out[0]
        out = _block(fn(states[v]))
        if part['kind'] == 'train':
            states[v] = out[0]
        elif v == 'ours':
            decode_steps = int(out.steps)
    wall = {v: [] for v in fns}
    cpu = {v: [] for v in fns}
    variants = list(fns)
    for r in range(runs):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(per_run):
                out = fns[v](states[v])
                if part['kind'] == 'train':
                    states[v] = out[0]
            _block(out)
            wall[v].append((time.perf_counter() - start) / per_run)
            cpu[v].append((time.process_time() - start_cpu) / per_run)
        log(f'[{name}] run {r + 1}/{runs}: ' + ', '.join(f'{v} {wall[v][-1]:.4f} s'
                                                         for v in variants))
    out = {'part': part, 'sizes': size, 'compile_and_first_call_s': compile_s}
    for v in variants:
        out[v] = {'wall_s': statistics.median(wall[v]), 'wall_s_runs': wall[v],
                  'cpu_s': statistics.median(cpu[v]), 'cpu_s_runs': cpu[v]}
    for v in variants:
        if v == 'flax':
            continue
        paired = [f / o for f, o in zip(wall['flax'], wall[v])]
        paired_cpu = [f / o for f, o in zip(cpu['flax'], cpu[v])]
        out[f'flax_over_{v}'] = {
            'median': statistics.median(paired), 'min': min(paired), 'max': max(paired),
            'cpu_median': statistics.median(paired_cpu)}
    if part['kind'] == 'train':
        out['target_tokens_per_step'] = part['rows'] * part['length']
    else:
        out['decode_steps_ours'] = decode_steps
        out['decode_steps_flax'] = part['length'] + 1 + MAX_EXTRA - 1
        out['sentences_per_second'] = {v: part['rows'] / out[v]['wall_s'] for v in variants}
    return out


def header(benchmark: str, load_before) -> dict:
    """What every JSON of these side-by-side benchmarks starts with: when, where, on what."""
    return {
        'benchmark': benchmark,
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
        'jax_version': jax.__version__, 'backend': jax.default_backend(),
        'allocator': allocator.in_use(),
        'load_average_before': load_before, 'load_average_after': os.getloadavg(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--flax_dir', required=True,
                        help='a checkout of github.com/google/flax (examples/wmt is read)')
    parser.add_argument('--parts', default=','.join(PARTS))
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--steps', type=int, default=3, help='training steps per timed run')
    args = parser.parse_args()
    parts = args.parts.split(',')
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f'--parts: unknown {",".join(unknown)}; valid: {",".join(PARTS)}')
    ex = import_flax_example(args.flax_dir)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    results = {}
    for name in parts:
        results[name] = run_part(name, PARTS[name], ex, args.runs, args.steps, log)
    print(json.dumps({
        **header('versus_flax', load_before), 'flax_example': ex.path,
        'runs': args.runs, 'steps_per_run': args.steps,
        'parts': results,
    }, indent=1))


if __name__ == '__main__':
    main()
