"""The pre-flight table: base and big compiled for TPU slices and GPU nodes without the hardware,
with and without remat, per chip; prints one JSON object and merges it into --out.

    python benchmarks/preflight.py [--configs=base,big] [--targets=tpu:v5e:2x4,...]
        [--remat=none,block] [--out=benchmarks/results/2026-12-03-preflight.json]

Each point is `python -m transformer.preflight --config=configs/wmt14_ende.py:NAME
--target=T --config.model.remat=R --json` in a process of its own (libtpu loads in one process
at a time), run one after the other; a point already in --out is not run again, so the table
grows over several calls (TPU targets need libtpu installed, GPU targets the CUDA plugin: run
the GPU points with the Python of an environment that has `.[cuda]`). Points that add
overrides: `--extra='tpu:v5e:16x16:train.mesh_fsdp=256'` (TARGET:FIELD=VALUE,...).
The beam search is compiled with remat none only (remat changes nothing in decoding), and
not at all with --no_search.
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


def point(config: str, target: str, remat: str, overrides: list[str], search: bool) -> dict:
    command = [sys.executable, '-m', 'transformer.preflight',
               f'--config=configs/wmt14_ende.py:{config}', f'--target={target}',
               f'--config.model.remat={remat}', '--json',
               *(f'--config.{o}' for o in overrides)]
    if remat != 'none' or not search:
        command.append('--nosearch')
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1], 'seconds': seconds}
    return {**json.loads(proc.stdout), 'compile_and_plan_seconds': seconds}


def key(config: str, target: str, remat: str, overrides: list[str]) -> str:
    return ' '.join([config, target, f'remat={remat}', *overrides])


def label(name: str) -> str:
    """A point's model column: the config and its overrides (target and remat have columns)."""
    config, _, _, *overrides = name.split()
    return ' '.join([config, *overrides])


def markdown(table: dict) -> str:
    """The README's table of a results file: a row per point."""
    gib = 2 ** 30
    rows = ['| model | target | mesh | remat | batch rows x length | params + Adam | '
            'activations, temporaries | code | total per chip | of | fits | beam search | '
            'collectives per step | step at 30 % / 50 % MFU |', '|' + '---|' * 14]
    for name, p in table['points'].items():
        if 'error' in p:
            rows.append(f'| {name} | error: {p["error"]} |')
            continue
        t = p['train_step']
        m = t['per_device_bytes']
        def dtypes(v):  # those that carry more than 1 % of a kind's bytes
            return '/'.join(sorted(d for d, n in v['bytes_by_dtype'].items()
                                   if n > v['bytes'] / 100))

        coll = ', '.join(f"{k} {v['bytes'] / gib:.2f} GiB ({dtypes(v)})"
                         for k, v in t['collectives'].items()
                         if v['bytes'] > 2 ** 20) or 'none'
        search = p.get('beam_search', {}).get('memory_analysis', {}).get('total')
        steps = p.get('step_seconds', {})
        rows.append(
            f"| {label(name)} | {p['target']} | "
            f"{'x'.join(f'{k} {v}' for k, v in p['mesh'].items() if v > 1) or '1 device'} | "
            f"{p['settings']['remat']} | {p['batch']['rows']} x {p['batch']['length']} | "
            f"{(m['parameters'] + m['optimizer_state']) / gib:.2f} | "
            f"{m['temporaries'] / gib:.2f} | {m['generated_code'] / gib:.2f} | "
            f"**{m['total'] / gib:.2f} GiB** | {t['chip_memory_bytes'] / gib:.0f} | "
            f"{'yes' if t['fits'] else 'NO'} | "
            f"{f'{search / gib:.2f} GiB' if search else '-'} | {coll} | "
            + (f"{steps['mfu_30'] * 1000:.0f} / {steps['mfu_50'] * 1000:.0f} ms |"
               if steps else '- |'))
    return '\n'.join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', default='base,big')
    parser.add_argument('--targets', default=','.join(TARGETS))
    parser.add_argument('--remat', default='none,block')
    parser.add_argument('--extra', action='append', default=[],
                        help='TARGET:FIELD=VALUE[,FIELD=VALUE]: one more point per config')
    parser.add_argument('--markdown', action='store_true',
                        help='print --out as the README\'s table and run nothing')
    parser.add_argument('--no_search', action='store_true',
                        help='compile no beam search (an unrolled TPU one takes minutes)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/'
                                             '2026-12-03-preflight.json'))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {
        'benchmark': 'preflight', 'points': {}}
    if args.markdown:
        print(markdown(table))
        return
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
            result = point(config, target, remat, overrides, not args.no_search)
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
