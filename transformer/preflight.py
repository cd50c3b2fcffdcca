"""`python -m transformer.preflight --config=FILE:ARG --target=TARGET [--json] [--no_search]`.

Plans a launch from any host, before renting the chips: compiles the exact training step
`train` runs (and the beam search `evaluate` runs) for the target's devices without the
hardware, and prints per chip what the compiler says: parameters, optimizer state, the batch,
activations and temporaries, generated code, XLA's peak and the total against the chip's
memory; the global batch; the collectives by kind and bytes; the FLOPs of a step and its time
at 30 % and 50 % model FLOPs utilisation. Targets (targets.py): tpu:v5e:2x4, tpu:v4:2x2x2,
tpu:v5p:2x2x2, tpu:v5e:16x16, gpu:h100, gpu:h100x8, gpu:a100, gpu:h200, cpu:8, ...
TPU targets need libtpu (`pip install -e '.[tpu]'`), GPU targets the CUDA plugin
(`pip install -e '.[cuda]'`); neither needs the chip.
"""

from __future__ import annotations

import json

from absl import flags

from transformer import cli, plan, sharding, targets
from transformer.errors import UsageError

_CONFIG = cli.define_config_flag()
_TARGET = flags.DEFINE_string('target', None, 'What to plan for: tpu:GEN:TOPOLOGY, '
                              'gpu:MODEL[xN] or cpu:N (see targets.py).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_SEARCH = flags.DEFINE_bool('search', True, 'Also compile the beam search (--nosearch: not).')

GIB = 1024 ** 3


def _gib(n) -> str:
    return f'{n / GIB:.2f} GiB' if abs(n) >= GIB / 10 else f'{n / 1024 ** 2:.1f} MiB'


def _seconds(s: float) -> str:
    return f'{s * 1000:.0f} ms' if s < 10 else f'{s:.1f} s'


def format_plan(p: dict) -> str:
    """The plan as the table the program prints."""
    t, b = p['train_step'], p['batch']
    mem = t['per_device_bytes']
    chip = t['chip_memory_bytes']
    verdict = ('' if chip is None else
               f" of {_gib(chip)}: {'fits' if t['fits'] else 'DOES NOT FIT'}"
               f" ({_gib(chip - mem['total'])} {'left' if t['fits'] else 'short'})")
    lines = [
        f"target      {p['target']}: {p['devices']} x {p['device_kind']}, mesh {p['mesh']}",
        f"settings    {', '.join(f'{k}={v}' for k, v in p['settings'].items())}",
        f"batch       {b['rows']} rows x {b['length']} tokens = {b['tokens_per_side']:,} "
        f"tokens a side (the longest bucket; {b['ratio_to_batch_tokens']}x data.batch_tokens)",
        'train step, per chip:',
        f"  parameters {_gib(mem['parameters'])}, optimizer state {_gib(mem['optimizer_state'])}"
        f", batch {_gib(mem['batch'])}",
        f"  activations and temporaries {_gib(mem['temporaries'])}, generated code "
        f"{_gib(mem['generated_code'])}",
        f"  XLA's peak {_gib(mem['xla_peak'])}; total {_gib(mem['total'])}{verdict}",
        '  collectives: ' + ('; '.join(
            f"{k} {v['count']} x ({_gib(v['bytes'])}: "
            f"{', '.join(f'{d} {_gib(n)}' for d, n in v['bytes_by_dtype'].items())}; largest "
            f"{', '.join(v['largest'])})" for k, v in t['collectives'].items()) or 'none'),
        f"  FLOPs {t['flops']:.4g} a step (analytic); XLA's: "
        + (f"{t['xla_flops']:.4g}" if t['xla_flops'] else t['xla_flops_note']),
    ]
    if 'step_seconds' in p:
        s, r = p['step_seconds'], p['tokens_per_second']
        lines.append(f"  step time {_seconds(s['mfu_30'])} at 30 % MFU, {_seconds(s['mfu_50'])}"
                     f" at 50 % ({r['mfu_30']:,.0f} / {r['mfu_50']:,.0f} target tokens/s)")
    if p.get('batch_warning'):
        lines.append(f"warning: {p['batch_warning']}")
    if 'beam_search' in p:
        s = p['beam_search']
        m = s['memory_analysis']
        fits = '' if s['fits'] is None else (': fits' if s['fits'] else ': DOES NOT FIT')
        lines.append(f"beam search (beam {s['beam_size']}, {s['sentences']} sentences of "
                     f"{s['source_length']} tokens, outputs up to {s['output_bound']}), per "
                     f"chip: total {_gib(m['total'])}{fits}")
    return '\n'.join(lines)


def main():
    if not _TARGET.value:
        raise UsageError('--target is required, e.g. --target=tpu:v5e:2x4 (see '
                         f'{", ".join(targets.EXAMPLES)})')
    target = targets.parse(_TARGET.value)
    targets.prepare_host(target)
    config = cli.checked_config(_CONFIG)
    devices = targets.devices(target)
    t = config.train
    try:
        mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp, devices=devices)
    except ValueError as e:
        raise UsageError(f'{e} of --target={target.name}') from None
    p = {'target': target.name,
         **plan.train_plan(config, mesh, target.chip.memory_bytes, target.chip.peak_flops,
                           with_search=_SEARCH.value)}
    print(json.dumps(p, indent=2) if _JSON.value else format_plan(p))


if __name__ == '__main__':
    cli.run(main)
