"""Training speed with the system's malloc against tcmalloc (transformer/allocator.py).

    python benchmarks/allocator.py [--config=configs/table3_mini.py:base] [--steps=60]
                                   [--repeats=3]

Runs `python -m transformer.train` on the config for --steps steps in a fresh work directory,
--repeats times with each allocator, alternating (system malloc via TRANSFORMER_TCMALLOC=0,
tcmalloc as the programs pick it when installed), and reads the step times the run logs itself
(metrics.jsonl's train/step_time, the first logged window dropped: it holds the compilation).
Prints ONE JSON object: per allocator the median step time of each run and their median,
steps per second, the ratio system/tcmalloc of the medians (>1: tcmalloc is faster) and the
median of the per-pair ratios. The default config reads Multi30k from ../shared/data; pass
--config=configs/demo.py for a machine without it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformer import allocator  # noqa: E402


def run(config: str, steps: int, log_every: int, env: dict) -> float:
    """Median logged step time of one short training run, compilation window excluded."""
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([sys.executable, '-m', 'transformer.train', f'--config={config}',
                        f'--workdir={workdir}', f'--config.train.steps={steps}',
                        f'--config.train.log_every_steps={log_every}',
                        f'--config.train.eval_every_steps={10 * steps}',
                        f'--config.train.checkpoint_every_steps={10 * steps}'],
                       cwd=REPO, env=env, check=True, stdout=sys.stderr, stderr=sys.stderr)
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            times = [r['train/step_time'] for r in map(json.loads, f) if 'train/step_time' in r]
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/table3_mini.py:base')
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--log_every', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    library = allocator.find_tcmalloc()
    if library is None:
        sys.exit('error: tcmalloc is not installed (apt-get install libtcmalloc-minimal4)')

    base_env = dict(os.environ, PYTHONPATH=str(REPO))
    base_env.pop('LD_PRELOAD', None)
    envs = {'system': dict(base_env, TRANSFORMER_TCMALLOC='0'), 'tcmalloc': base_env}
    times = {name: [] for name in envs}
    for repeat in range(args.repeats):
        order = list(envs) if repeat % 2 == 0 else list(envs)[::-1]
        for name in order:
            times[name].append(run(args.config, args.steps, args.log_every, envs[name]))
            print(f'repeat {repeat} {name}: {times[name][-1]:.4f} s/step', file=sys.stderr)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        'benchmark': 'allocator',
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
        'config': args.config,
        'steps_per_run': args.steps,
        'tcmalloc': library,
        'step_seconds': times,
        'median_step_seconds': medians,
        'steps_per_second': {name: 1.0 / m for name, m in medians.items()},
        'speedup_tcmalloc': medians['system'] / medians['tcmalloc'],
        'speedup_tcmalloc_paired_median': statistics.median(
            s / t for s, t in zip(times['system'], times['tcmalloc'])),
    }, indent=1))


if __name__ == '__main__':
    main()
