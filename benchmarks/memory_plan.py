"""Memory per device of the real training step of base and big at the paper's batch, on 1 and
8 devices, data-parallel or fully sharded (fsdp), with and without rematerialisation; prints
one JSON object.

    python benchmarks/memory_plan.py [--configs=base,big] [--dtype=bfloat16]

Each point is `python -m transformer.summary --config=... --memory --devices=N --json` (the
step compiled for N simulated CPU devices, XLA's memory analysis), run in a subprocess of its
own. The batch is data.batch_tokens = 25000 tokens per side in rows of the longest bucket
(256 tokens), the worst case for attention's memory. Compute in bfloat16 as on an
accelerator, parameters and Adam state in float32.
"""

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'base': 'configs/wmt14_ende.py:base', 'big': 'configs/wmt14_ende.py:big'}
# (devices, mesh_fsdp): one device; 8 devices data-parallel; 8 devices fully sharded.
LAYOUTS = ((1, 1), (8, 1), (8, 8))


def plan(config: str, devices: int, fsdp: int, remat: str, dtype: str) -> dict:
    command = [sys.executable, '-m', 'transformer.summary', f'--config={config}', '--memory',
               f'--devices={devices}', '--json', f'--config.train.mesh_fsdp={fsdp}',
               f'--config.model.remat={remat}', f'--config.model.dtype={dtype}']
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {'error': proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout)['memory_plan']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', default='base,big')
    parser.add_argument('--dtype', default='bfloat16')
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(','):
        for devices, fsdp in LAYOUTS:
            for remat in ('none', 'block'):
                result = plan(CONFIGS[name], devices, fsdp, remat, args.dtype)
                print(f'{name} devices={devices} fsdp={fsdp} remat={remat}: '
                      f'{result.get("per_device_bytes", result)}', file=sys.stderr, flush=True)
                rows.append({'config': name, 'devices': devices, 'mesh_fsdp': fsdp,
                             'remat': remat, **result})
    print(json.dumps({'benchmark': 'memory_plan', 'dtype': args.dtype, 'plans': rows}))


if __name__ == '__main__':
    main()
