"""What a training step costs before it runs: XLA's count of its FLOPs and bytes accessed,
and the time to build, trace and lower it; prints one JSON object.

    python benchmarks/step_cost.py [--runs=5]

Both figures are deterministic enough to compare across changes (they do not time the step):

* `small`: the compiled step of 2 + 2 layers, d_model 256, d_ff 1024, 4 heads, vocabulary
  8000, a batch of 64 x 32 tokens per side without padding, float32, P_drop, attention and
  ReLU dropout all 0.1 (the setting where the project was compared with Flax's WMT example:
  73.5 GFLOP and 4.84 GB accessed for the example). The layer loop is unrolled for this count
  (model.scan_layers=False) since XLA counts a loop's body once. Reported for both dropout
  random-bit generators (train.dropout_rng_impl: 'rbg', the default, and 'threefry2x32').
* `base_trace`: building the state layout, tracing and lowering the base model's step
  (config to StableHLO, before XLA compiles it) in a fresh process, median of --runs
  processes; with the layers scanned (the default) and unrolled.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from transformer import config as config_lib  # noqa: E402
from transformer import sharding, train_step  # noqa: E402


def small_config(rng_impl: str):
    c = config_lib.base_config()
    c.vocab_size = 8000
    c.model.update(num_encoder_layers=2, num_decoder_layers=2, d_model=256, d_ff=1024,
                   num_heads=4, d_k=64, d_v=64, dropout_rate=0.1, attention_dropout_rate=0.1,
                   relu_dropout_rate=0.1, dtype='float32', scan_layers='False')
    c.train.dropout_rng_impl = rng_impl
    return c


def lowered(config, rows: int, length: int):
    """The step of `config` on one device, lowered for a [rows, length] batch."""
    s = train_step.setup(config, sharding.make_mesh(devices=jax.devices()[:1]))
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         s.abstract_state, s.state_shardings)
    batch = train_step.abstract_batch(config, rows, length, s.batch_sharding)
    return train_step.jit_sharded_step(s).trace(state, batch).lower()


def xla_cost(rng_impl: str) -> dict:
    analysis = lowered(small_config(rng_impl), 64, 32).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {'flops': analysis['flops'], 'bytes_accessed': analysis['bytes accessed']}


def trace_seconds(scan: bool) -> float:
    """In this (fresh) process: config to lowered step, seconds."""
    c = config_lib.base_config()
    c.model.update(dtype='float32', scan_layers=str(scan))
    start = time.perf_counter()
    lowered(c, 8, 32)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--_trace', choices=('scan', 'unrolled'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._trace:  # one measurement in this fresh process
        print(trace_seconds(args._trace == 'scan'))
        return
    out = {'benchmark': 'step_cost', 'jax_version': jax.__version__,
           'backend': jax.default_backend(),
           'small': {impl: xla_cost(impl) for impl in ('rbg', 'threefry2x32')},
           'base_trace': {}}
    for variant in ('scan', 'unrolled'):
        runs = []
        for _ in range(args.runs):
            proc = subprocess.run([sys.executable, __file__, f'--_trace={variant}'],
                                  capture_output=True, text=True, check=True)
            runs.append(float(proc.stdout.strip().splitlines()[-1]))
        out['base_trace'][variant] = {'seconds': statistics.median(runs),
                                      'runs': [round(r, 3) for r in runs]}
    print(json.dumps(out))


if __name__ == '__main__':
    main()
