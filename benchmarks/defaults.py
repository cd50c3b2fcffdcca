"""The speed-related defaults, each chosen by measured time: every value of each option timed
side by side on the same step, interleaved, paired.

    python benchmarks/defaults.py [--sizes=small,base] [--options=...] [--runs=7] [--steps=2]

Options (config field: values, the default first):
  dropout_rng_impl   train.dropout_rng_impl: threefry2x32, rbg (the random bits of dropout)
  scan_layers        model.scan_layers: True, False (the layer stacks in a lax.scan, or
                     unrolled; training and teacher-forced passes)
  attention_impl     model.attention_impl on CPU: auto (jax.nn.dot_product_attention, its
                     'xla' implementation on a CPU), explicit (multi_head_attention's own
                     softmax formula, the path attention dropout takes)
  donation           the training state donated to the step: on, off
  remat              model.remat: none, block (rematerialisation: memory for compute)

Each option is timed on our training step exactly as `transformer/train.py` builds it
(train_step.setup, jit_sharded_step, compiled ahead of time; benchmarks/versus_flax.py's
our_train) on the sizes of benchmarks/versus_flax.py (small: 2 + 2 layers, d_model 256, 64 x 32
tokens; base: the paper's base, 16 x 64 tokens), our default dropout sites, float32 on CPU.
Decoding runs its layers one by one (model.py's decode_step: measured in versus_flax.py).
Per option and size: the median step time and process CPU time of each value, the paired
ratio default / value of each round (> 1: the value is faster than the default) with median,
min and max, compile time, and which value is faster. Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import jax
import versus_flax as vf

from transformer import sharding
from transformer import train_step as train_step_lib

OPTIONS = {
    'dropout_rng_impl': ('train.dropout_rng_impl', ['threefry2x32', 'rbg']),
    'scan_layers': ('model.scan_layers', ['True', 'False']),
    'attention_impl': ('model.attention_impl', ['auto', 'explicit']),
    'donation': ('donation', ['on', 'off']),
    'remat': ('model.remat', ['none', 'block']),
}
SHAPES = {'small': (64, 32), 'base': (16, 64)}


def build(size: str, field: str, value):
    """The training step of `size` with `field` set to `value`: (fn(state) -> state, state)."""
    config = vf.our_config(vf.SIZES[size], same_work=False)
    rows, length = SHAPES[size]
    batch = vf.synthetic_batch(rows, length, vf.SIZES[size]['vocab'])
    if field == 'donation':
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        setup = train_step_lib.setup(config, mesh)
        step = train_step_lib.CompiledSteps(
            train_step_lib.jit_sharded_step(setup, donate=value == 'on'))
        state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
        device_batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
                        for k, v in batch.items()}
        return (lambda s: step(s, device_batch)[0]), state
    else:
        group, name = field.split('.')
        config[group][name] = value
    fn, state = vf.our_train(config, batch)
    return (lambda s: fn(s)[0]), state


def measure(size: str, option: str, runs: int, steps: int, log) -> dict:
    field, values = OPTIONS[option]
    built, compile_s = {}, {}
    for value in values:
        start = time.perf_counter()
        fn, state = build(size, field, value)
        state = jax.block_until_ready(fn(state))
        compile_s[str(value)] = round(time.perf_counter() - start, 2)
        built[str(value)] = [fn, jax.block_until_ready(fn(state))]
    wall = {v: [] for v in built}
    cpu = {v: [] for v in built}
    names = list(built)
    for r in range(runs):
        for v in (names if r % 2 == 0 else names[::-1]):
            fn, state = built[v]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                state = fn(state)
            jax.block_until_ready(state)
            built[v][1] = state
            wall[v].append((time.perf_counter() - start) / steps)
            cpu[v].append((time.process_time() - start_cpu) / steps)
        log(f'[{size} {option}] run {r + 1}/{runs}: ' +
            ', '.join(f'{v} {wall[v][-1]:.4f} s' for v in names))
    default = names[0]
    out = {'field': field, 'default': default, 'compile_and_first_step_s': compile_s}
    for v in names:
        out[v] = {'step_s': statistics.median(wall[v]), 'cpu_s': statistics.median(cpu[v])}
    for v in names[1:]:
        paired = [d / x for d, x in zip(wall[default], wall[v])]
        out[f'{default}_over_{v}'] = {'median': statistics.median(paired), 'min': min(paired),
                                      'max': max(paired)}
    out['faster'] = min(names, key=lambda v: out[v]['step_s'])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='small,base')
    parser.add_argument('--options', default=','.join(OPTIONS))
    parser.add_argument('--runs', type=int, default=7)
    parser.add_argument('--steps', type=int, default=2)
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    results = {size: {option: measure(size, option, args.runs, args.steps, log)
                      for option in args.options.split(',')}
               for size in args.sizes.split(',')}
    print(json.dumps({
        **vf.header('defaults', load_before),
        'runs': args.runs, 'steps_per_run': args.steps, 'results': results,
    }, indent=1))


if __name__ == '__main__':
    main()
