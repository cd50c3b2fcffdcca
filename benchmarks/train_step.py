"""Speed and memory of one training step, sharded (as train.py runs it) against a plain jit.

  python benchmarks/train_step.py [--configs=demo,base,big] [--batch_tokens=base=256,big=128]
                                  [--seq_len=32] [--runs=7] [--steps=1]
  python benchmarks/train_step.py --batch_tokens=25000 --seq_len=64   # on a GPU/TPU
  python benchmarks/train_step.py --configs=big --profile_dir=/tmp/trace   # then a trace
  python benchmarks/train_step.py --sections=ema --configs=demo --runs=9   # EMA's cost

Prints one JSON object on stdout (progress and JAX warnings go to stderr). For each model
config (demo = configs/demo.py, base/big = configs/wmt14_ende.py:base/big) on a synthetic batch
of a fixed shape [rows, seq_len] (random token ids, one pair per row, no padding; rows =
batch_tokens // seq_len, rounded up to a multiple of the device count):

* 'sharded': the project's step exactly as transformer/train.py builds it: train_step.setup and
  jit_sharded_step (in/out shardings over sharding.make_mesh(), donate_argnums=0), the state created
  already sharded by a jit with out_shardings.
* 'plain': the same make_train_step function under a bare jax.jit (no mesh, no shardings, no
  donation), state created by a bare jit on the default device.

Both use the real optimizer (schedule.make_optimizer) and the config's dtypes (model.dtype
'auto' is bfloat16 on GPU/TPU, float32 on CPU). After compiling and one warm-up step each, the
two are timed in the same process, interleaved (the order alternates run by run), each run
`--steps` steps ended by block_until_ready. Reported: median step time, the ratio
sharded/plain of the medians and the median of the per-run ratios, tokens per second (source +
target, as train.py logs them), FLOPs per step (model_stats.training_flops on the actual
shapes), MFU where model_stats.peak_flops() knows the device, XLA's compiled memory analysis per
variant, and the peak memory of the config's process. Each config runs in a subprocess of its
own so that peak memory is per config.

`--sections=ema` (alone or with `steps`, the section above) measures instead what a moving
average of the weights (train.ema_decay) costs a step: the sharded step of each config with
train.ema_decay 0 and 0.9999, compiled, warmed up and timed interleaved in one process, `--runs`
runs of `--steps` steps each; reported per config: the median step time of each, the ratio of
the medians (with / without) and the median of the per-run ratios, and the state's bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from transformer import config as config_lib  # noqa: E402
from transformer import model_stats, profiler, sharding  # noqa: E402
from transformer import train_step as train_step_lib  # noqa: E402
from transformer.model import resolve_dtype  # noqa: E402

CONFIGS = {
    'demo': 'configs/demo.py',
    'base': 'configs/wmt14_ende.py:base',
    'big': 'configs/wmt14_ende.py:big',
}
# Tokens per side per step, sized for a 2-core CPU (a few minutes for all three configs).
# On an accelerator pass --batch_tokens=25000 (the paper's batch).
CPU_BATCH_TOKENS = {'demo': 2048, 'base': 256, 'big': 128}
VARIANTS = ('sharded', 'plain')
# Diagnostic, on request (--variants=sharded,plain,sharded_nodonate): train.py's shardings
# without donate_argnums, to separate the cost of donation from that of the shardings.
EXTRA_VARIANTS = ('sharded_nodonate',)


def load_config(name: str):
    """The ml_collections config of `name` (a key of CONFIGS, or FILE[:ARG])."""
    return config_lib.load_file(str(ROOT / CONFIGS.get(name, name)))


def synthetic_batch(vocab_size: int, rows: int, seq_len: int, seed: int = 0) -> dict:
    """Random token ids [rows, seq_len], one (source, target) pair filling each row."""
    rng = np.random.default_rng(seed)
    ids = lambda: rng.integers(3, vocab_size, (rows, seq_len), dtype=np.int32)
    ones = np.ones((rows, seq_len), np.int32)
    position = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    return {'inputs': ids(), 'targets': ids(), 'inputs_segmentation': ones,
            'targets_segmentation': ones.copy(), 'inputs_position': position,
            'targets_position': position.copy()}


def build_steps(config, variants=VARIANTS):
    """{variant: (jitted step, its initial state, batch sharding or None)} and the mesh.

    'sharded' is exactly what transformer/train.py runs (train_step.setup and
    jit_sharded_step); 'plain' jits the same step function with no mesh, shardings or
    donation; 'sharded_nodonate' is the sharded step without donation (a diagnostic).
    """
    t = config.train
    mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)
    s = train_step_lib.setup(config, mesh)
    sharded_init = lambda: jax.jit(s.init_state, out_shardings=s.state_shardings)()
    out = {'mesh': dict(mesh.shape)}
    if 'sharded' in variants:
        out['sharded'] = (train_step_lib.jit_sharded_step(s), sharded_init(), s.batch_sharding)
    if 'sharded_nodonate' in variants:
        out['sharded_nodonate'] = (
            jax.jit(s.step_fn, in_shardings=(s.state_shardings, s.batch_sharding),
                    out_shardings=(s.state_shardings, s.replicated)),
            sharded_init(), s.batch_sharding)
    if 'plain' in variants:
        out['plain'] = (jax.jit(s.step_fn), jax.jit(s.init_state)(), None)
    return out


def _compile(jitted, state, batch) -> tuple[float, dict | None]:
    """Compiles the step ahead of time (the jit call then reuses it): (seconds, XLA's memory
    analysis of the compiled step in bytes, None where the backend gives none)."""
    start = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional information
        analysis = None
    if analysis is None:
        return seconds, None
    fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
              'temp_size_in_bytes', 'generated_code_size_in_bytes')
    return seconds, {f.replace('_in_bytes', '_bytes'): int(getattr(analysis, f))
                     for f in fields if hasattr(analysis, f)}


def peak_memory() -> tuple[int, str]:
    """(bytes, source): the device's peak_bytes_in_use where it reports one, else max RSS."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'device memory_stats()[peak_bytes_in_use]'
    # Linux reports ru_maxrss in KiB.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(rss), ('process max RSS (resource.getrusage): runtime, compilation and every '
                      'variant\'s state')


def measure(name: str, batch_tokens: int, seq_len: int, runs: int, steps: int,
            variants=VARIANTS, log=lambda s: print(s, file=sys.stderr, flush=True),
            profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Times `variants` of the train step of config `name`; see the module docstring. With
    `profile_dir`, then traces `profile_steps` steps of the first variant into
    PROFILE_DIR/NAME (profiler.StepTracer, as train.profile_steps does)."""
    config = load_config(name)
    n_dev = jax.device_count()
    rows = max(1, batch_tokens // seq_len)
    rows = -(-rows // n_dev) * n_dev  # the batch is split by rows over every device
    if seq_len > config.model.max_position:
        raise ValueError(f'--seq_len={seq_len} exceeds model.max_position='
                         f'{config.model.max_position}')
    host_batch = synthetic_batch(config.vocab_size, rows, seq_len)
    built = build_steps(config, variants)
    fns, states, batches, compile_s, first_s, memory = {}, {}, {}, {}, {}, {}
    for v in variants:
        fn, state, batch_sharding = built[v]
        if batch_sharding is not None:  # as train.py puts each batch on the mesh
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, x)
                     for k, x in host_batch.items()}
        else:
            batch = {k: jax.device_put(x) for k, x in host_batch.items()}
        log(f'[{name}] {v}: compiling')
        compile_s[v], memory[v] = _compile(fn, state, batch)
        start = time.perf_counter()
        state, m = fn(state, batch)  # first step (allocations, thread pools)
        jax.block_until_ready((state, m))
        first_s[v] = time.perf_counter() - start
        state, m = fn(state, batch)  # one warm step
        jax.block_until_ready((state, m))
        if not np.isfinite(float(m['loss'])):
            raise RuntimeError(f'{name} {v}: non-finite loss {m["loss"]}')
        fns[v], states[v], batches[v] = fn, state, batch
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}  # process CPU time (all threads): less sensitive to load
    for r in range(runs):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for v in order:
            state = states[v]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                state, m = fns[v](state, batches[v])
            jax.block_until_ready((state, m))
            times[v].append((time.perf_counter() - start) / steps)
            cpu[v].append((time.process_time() - start_cpu) / steps)
            states[v] = state
        log(f'[{name}] run {r + 1}/{runs}: ' +
            ', '.join(f'{v} {times[v][-1]:.4f} s' for v in variants))

    if profile_dir:
        v = variants[0]
        tracer = profiler.StepTracer((0, profile_steps), os.path.join(profile_dir, name))
        state = states[v]
        for i in range(1, profile_steps + 1):
            with tracer.step(i):
                state, _ = fns[v](state, batches[v])
            tracer.after(i, state)
        states[v] = state
        log(f'[{name}] traced {profile_steps} {v} steps into {tracer.directory}')

    m = config.model
    flops_per_step = model_stats.training_flops(m, config.vocab_size, rows, seq_len, seq_len)
    tokens_per_step = 2 * rows * seq_len  # source + target, as train.py logs tokens_per_second
    peak = model_stats.peak_flops()
    out = {
        'config': CONFIGS.get(name, name),
        'parameters': model_stats.count_parameters(config)['total'],
        'dtype': jnp.dtype(resolve_dtype(m.dtype)).name,
        'param_dtype': m.param_dtype,
        'batch': {'rows': rows, 'seq_len': seq_len, 'tokens_per_side': rows * seq_len,
                  'tokens_per_step': tokens_per_step},
        'mesh': built['mesh'],
        'flops_per_step': flops_per_step,
    }
    for v in variants:
        med = statistics.median(times[v])
        devices = n_dev if v.startswith('sharded') else 1
        out[v] = {
            'step_time_s': med,
            'step_time_s_runs': [round(x, 6) for x in times[v]],
            'cpu_time_s': statistics.median(cpu[v]),
            'cpu_time_s_runs': [round(x, 6) for x in cpu[v]],
            'tokens_per_second': tokens_per_step / med,
            'target_tokens_per_second': rows * seq_len / med,
            'flops_per_second': flops_per_step / med,
            'mfu': flops_per_step / med / (peak * devices) if peak else None,
            'compile_s': round(compile_s[v], 3),
            'first_step_s': round(first_s[v], 3),
            'xla_memory': memory[v],
        }
    if {'sharded', 'plain'} <= set(variants):
        out['sharded_over_plain'] = out['sharded']['step_time_s'] / out['plain']['step_time_s']
        out['sharded_over_plain_paired_median'] = statistics.median(
            s / p for s, p in zip(times['sharded'], times['plain']))
        out['sharded_over_plain_cpu_time'] = (out['sharded']['cpu_time_s'] /
                                              out['plain']['cpu_time_s'])
    if {'sharded_nodonate', 'plain'} <= set(variants):
        out['sharded_nodonate_over_plain'] = (out['sharded_nodonate']['step_time_s'] /
                                              out['plain']['step_time_s'])
    out['peak_memory_bytes'], out['peak_memory_source'] = peak_memory()
    if profile_dir:
        out['profile'] = os.path.join(profile_dir, name)
    return out


def ema_cost(name: str, batch_tokens: int, seq_len: int, runs: int, steps: int,
             decay: float = 0.9999, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Step time with and without train.ema_decay (see the module docstring)."""
    n_dev = jax.device_count()
    rows = -(-max(1, batch_tokens // seq_len) // n_dev) * n_dev
    variants = {'without': 0.0, 'with': decay}
    fns, states, batches = {}, {}, {}
    for v, d in variants.items():
        config = load_config(name)
        config.train.ema_decay = d
        s = train_step_lib.setup(config, sharding.make_mesh(config.train.mesh_data,
                                                            config.train.mesh_fsdp))
        batch = {k: jax.make_array_from_process_local_data(s.batch_sharding, x)
                 for k, x in synthetic_batch(config.vocab_size, rows, seq_len).items()}
        fn = train_step_lib.jit_sharded_step(s)
        state = jax.jit(s.init_state, out_shardings=s.state_shardings)()
        log(f'[{name}] ema {v}: compiling')
        for _ in range(2):  # compilation, then a warm step
            state, m = fn(state, batch)
            jax.block_until_ready((state, m))
        fns[v], states[v], batches[v] = fn, state, batch
    times = {v: [] for v in variants}
    for r in range(runs):
        for v in (variants if r % 2 == 0 else tuple(reversed(variants))):
            state = states[v]
            start = time.perf_counter()
            for _ in range(steps):
                state, m = fns[v](state, batches[v])
            jax.block_until_ready((state, m))
            times[v].append((time.perf_counter() - start) / steps)
            states[v] = state
        log(f'[{name}] ema run {r + 1}/{runs}: ' +
            ', '.join(f'{v} {times[v][-1]:.4f} s' for v in variants))
    state_bytes = {v: sum(x.nbytes for x in jax.tree.leaves(states[v])) for v in variants}
    return {
        'config': CONFIGS.get(name, name), 'ema_decay': decay,
        'batch': {'rows': rows, 'seq_len': seq_len},
        'step_time_s': {v: statistics.median(times[v]) for v in variants},
        'step_time_s_runs': {v: [round(x, 6) for x in times[v]] for v in variants},
        'with_over_without': statistics.median(times['with']) / statistics.median(
            times['without']),
        'with_over_without_paired_median': statistics.median(
            a / b for a, b in zip(times['with'], times['without'])),
        'state_bytes': state_bytes,
    }


def environment() -> dict:
    import flax
    dev = jax.devices()[0]
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'jax_version': jax.__version__, 'flax_version': flax.__version__,
        'optax_version': optax.__version__,
        'backend': jax.default_backend(), 'device_kind': dev.device_kind,
        'device_count': jax.device_count(), 'process_count': jax.process_count(),
        'peak_flops_per_device': model_stats.peak_flops(),
        'machine': f'{platform.machine()}, {os.cpu_count()} cpus, '
                   f'python {platform.python_version()}',
    }


def _per_config(value: str, names, default: dict | None, flag: str, strict=True) -> dict:
    """'25000' -> the same for every config; 'base=512,big=256' -> per config (rest: default)."""
    if '=' not in value:
        return {n: int(value) for n in names}
    out = dict(default or {})
    for item in value.split(','):
        key, _, number = item.partition('=')
        if key not in names and strict:
            raise SystemExit(f'error: {flag}: {key!r} is not one of --configs ({",".join(names)})')
        out[key] = int(number)
    missing = [n for n in names if n not in out]
    if missing:
        raise SystemExit(f'error: {flag} gives no value for {",".join(missing)}')
    return out


def demo_input_wait(steps: int) -> dict:
    """The demo trained by `python -m transformer.train` for `steps` steps in a temporary work
    directory: train/input_wait_fraction (time the loop waited for its next batch / wall time)
    of every logged window but the first (compilation), and their median."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, '-m', 'transformer.train', '--config=configs/demo.py',
                   f'--workdir={workdir}', f'--config.train.steps={steps}',
                   '--config.train.eval_every_steps=100000',
                   '--config.train.checkpoint_every_steps=100000']
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            windows = [json.loads(line) for line in f]
    fractions = [w['train/input_wait_fraction'] for w in windows
                 if 'train/input_wait_fraction' in w][1:]
    return {'config': 'configs/demo.py', 'steps': steps,
            'input_wait_fraction': statistics.median(fractions),
            'input_wait_fraction_windows': [round(x, 5) for x in fractions]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', default=','.join(CONFIGS),
                        help='comma-separated: demo, base, big (or FILE:ARG)')
    parser.add_argument('--batch_tokens', default=None,
                        help='tokens per side per step: one number for all configs, or '
                        'NAME=N,... (default on CPU: ' +
                        ','.join(f'{k}={v}' for k, v in CPU_BATCH_TOKENS.items()) +
                        '; on GPU/TPU: 25000)')
    parser.add_argument('--seq_len', default='32',
                        help='sequence length of both sides: one number, or NAME=N,...')
    parser.add_argument('--runs', type=int, default=7, help='timed runs per variant')
    parser.add_argument('--steps', type=int, default=1, help='steps per timed run')
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--input_wait_steps', type=int, default=300,
                        help='train the demo this many steps and report input_wait_fraction '
                        '(0: skip)')
    parser.add_argument('--in_process', action='store_true',
                        help='run every config in this process (peak memory is then cumulative)')
    parser.add_argument('--profile_dir', default=None,
                        help='after timing, trace --profile_steps steps of the first variant '
                        'of each config into DIR/CONFIG (TensorBoard profile plugin, Perfetto)')
    parser.add_argument('--profile_steps', type=int, default=3)
    parser.add_argument('--sections', default='steps',
                        help='comma-separated: steps (sharded against plain), ema (the cost '
                        'of train.ema_decay, in this process)')
    parser.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.configs.split(',')
    sections = args.sections.split(',')
    if not set(sections) <= {'steps', 'ema'} or not sections:
        parser.error(f'--sections={args.sections}: valid: steps, ema')
    if 'ema' in sections:  # measured in this process (no child per config)
        args.in_process = True
        if 'steps' not in sections:
            args.input_wait_steps = 0
    variants = tuple(args.variants.split(','))
    unknown = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
    if unknown:
        parser.error(f'--variants: unknown {",".join(unknown)}; valid: '
                     f'{",".join(VARIANTS + EXTRA_VARIANTS)}')

    if args._child or args.in_process:
        # Defaults need the backend; the parent never starts one (on a GPU it would hold the
        # memory that its children need).
        if args.batch_tokens is None:
            args.batch_tokens = '25000' if jax.default_backend() != 'cpu' else ','.join(
                f'{n}={CPU_BATCH_TOKENS.get(n, 512)}' for n in names)
        strict = not args._child  # a child sees the whole flag but runs one config
        batch_tokens = _per_config(args.batch_tokens, names, CPU_BATCH_TOKENS, '--batch_tokens',
                                   strict)
        seq_lens = _per_config(args.seq_len, names, None, '--seq_len', strict)
    else:  # check the flags before starting any child
        if args.batch_tokens is not None:
            _per_config(args.batch_tokens, names, CPU_BATCH_TOKENS, '--batch_tokens')
        _per_config(args.seq_len, names, None, '--seq_len')

    if args._child:  # one config in this process: its JSON on stdout
        n = args._child
        print(json.dumps({'environment': environment(), 'result': measure(
            n, batch_tokens[n], seq_lens[n], args.runs, args.steps, variants,
            profile_dir=args.profile_dir, profile_steps=args.profile_steps)}))
        return

    env, results = None, {}
    for n in names if 'steps' in sections else ():
        if args.in_process:
            results[n] = measure(n, batch_tokens[n], seq_lens[n], args.runs, args.steps, variants,
                                 profile_dir=args.profile_dir, profile_steps=args.profile_steps)
            env = environment()
            continue
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f'--_child={n}',
               f'--configs={n}', f'--seq_len={args.seq_len}', f'--runs={args.runs}',
               f'--steps={args.steps}', f'--variants={args.variants}',
               f'--profile_steps={args.profile_steps}']
        if args.profile_dir:
            cmd.append(f'--profile_dir={os.path.abspath(args.profile_dir)}')
        if args.batch_tokens is not None:
            cmd.append(f'--batch_tokens={args.batch_tokens}')
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            results[n] = {'error': f'exit status {proc.returncode} (see stderr)'}
            continue
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        env = env or child['environment']
        results[n] = child['result']
    settings = {'configs': names, 'runs': args.runs, 'steps': args.steps,
                'variants': list(variants),
                'batch_tokens_per_side': {n: r['batch']['tokens_per_side']
                                          for n, r in results.items() if 'batch' in r},
                'seq_len': {n: r['batch']['seq_len'] for n, r in results.items() if 'batch' in r}}
    if args.input_wait_steps:
        results['demo_input_wait'] = demo_input_wait(args.input_wait_steps)
    extra = {}
    if 'ema' in sections:
        extra['ema'] = {n: ema_cost(n, batch_tokens[n], seq_lens[n], args.runs, args.steps)
                        for n in names}
        env = env or environment()
    print(json.dumps({'benchmark': 'train_step', **(env or {}), 'settings': settings,
                      'configs': results, **extra}))


if __name__ == '__main__':
    main()
