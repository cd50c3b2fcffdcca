"""The pre-flight table: base and big compiled for TPU slices and GPU nodes without the hardware,
with and without remat, per chip; prints one JSON object and merges it into --out.

    python benchmarks/preflight.py [--configs=base,big] [--targets=tpu:v5e:2x4,...]
        [--remat=none,block] [--out=benchmarks/results/2026-12-02-preflight.json]

Each point is `python -m transformer.preflight --config=configs/wmt14_ende.py:NAME
--target=T --config.model.remat=R --json` in a process of its own (libtpu loads in one process
at a time), run one after the other; a point already in --out is not run again, so the table
grows over several calls (TPU targets need libtpu installed, GPU targets the CUDA plugin: run
the GPU points with the Python of an environment that has `.[cuda]`). Points that add
overrides: `--extra='tpu:v5e:16x16:train.mesh_fsdp=256'` (TARGET:FIELD=VALUE,...).
The beam search is compiled with remat none only (remat changes nothing in decoding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ('tpu:v5e:2x4', 'tpu:v4:2x2x2', 'tpu:v5p:2x2x2', 'tpu:v5e:16x16', 'gpu:h100',
           'gpu:h100x8', 'gpu:a100', 'gpu:h200')


def point(config: str, target: str, remat: str, overrides: list[str]) -> dict:
    command = [sys.executable, '-m', 'transformer.preflight',
               f'--config=configs/wmt14_ende.py:{config}', f'--target={target}',
               f'--config.model.remat={remat}', '--json',
               *(f'--config.{o}' for o in overrides)]
    if remat != 'none':
        command.append('--nosearch')
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1], 'seconds': seconds}
    return {**json.loads(proc.stdout), 'compile_and_plan_seconds': seconds}


def key(config: str, target: str, remat: str, overrides: list[str]) -> str:
    return ' '.join([config, target, f'remat={remat}', *overrides])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', default='base,big')
    parser.add_argument('--targets', default=','.join(TARGETS))
    parser.add_argument('--remat', default='none,block')
    parser.add_argument('--extra', action='append', default=[],
                        help='TARGET:FIELD=VALUE[,FIELD=VALUE]: one more point per config')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/'
                                             '2026-12-02-preflight.json'))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {
        'benchmark': 'preflight', 'points': {}}
    table.update(date=datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y-%m-%d %H:%M UTC'), machine=f'{platform.machine()}, {os.cpu_count()} CPUs (the '
        'compiling host; no TPU or GPU)')
    runs = [(t, [], r) for t in args.targets.split(',') for r in args.remat.split(',')]
    for extra in args.extra:
        target, _, fields = extra.rpartition(':')
        runs.append((target, fields.split(','), 'none'))
    for config in args.configs.split(','):
        for target, overrides, remat in runs:
            name = key(config, target, remat, overrides)
            if name in table['points'] and 'error' not in table['points'][name]:
                continue
            result = point(config, target, remat, overrides)
            table['points'][name] = result
            summary = result.get('error') or (
                f"total {result['train_step']['per_device_bytes']['total'] / 2 ** 30:.2f} GiB,"
                f" fits {result['train_step']['fits']}")
            print(f'{name}: {summary} ({result.get("compile_and_plan_seconds")} s)',
                  file=sys.stderr, flush=True)
            out.write_text(json.dumps(table, indent=1) + '\n')  # a point at a time
    print(json.dumps(table))


if __name__ == '__main__':
    main()
