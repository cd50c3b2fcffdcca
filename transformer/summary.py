"""`python -m transformer.summary --config=FILE:ARG [--json] [--memory [--devices=N]]`.

Parameters, FLOPs per token and the memory of parameters and Adam state come from
`jax.eval_shape` and arithmetic (model_stats.py): nothing is allocated, so the big models can
be inspected on a laptop.

`--memory` plans memory for a run on this machine's devices or N simulated CPU devices (for
a TPU slice or a GPU node, `python -m transformer.preflight --target=...` compiles for it): it
compiles the real training step (the one train runs,
sharded over the config's mesh: train.mesh_data x train.mesh_fsdp) for N devices at the
config's batch (data.batch_tokens per side, in rows of the longest bucket, the worst case) and
reports XLA's per-device analysis of it beside the analytic parameter + Adam figure. With
`--devices=N` the devices are N simulated CPU devices (compiled for the CPU: the figures are
a plan, an accelerator's own compiler lays memory out somewhat differently); without it, this
machine's devices.
"""

from __future__ import annotations

import json

import jax
from absl import flags

from transformer import cli, plan, sharding
from transformer.errors import UsageError
from transformer.model_stats import summarize

_CONFIG = cli.define_config_flag()
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'Source and target length for the FLOP count '
                                '(default: data.max_length).')
_MEMORY = flags.DEFINE_bool('memory', False, 'Compile the training step and report its memory '
                            'per device.')
_DEVICES = flags.DEFINE_integer('devices', None, 'With --memory: plan for N simulated CPU '
                                'devices (default: this machine\'s devices).')


def memory(config) -> dict:
    """The compiled step's memory per device, the batch it was planned for, and the mesh."""
    t = config.train
    mesh = sharding.make_mesh(t.mesh_data, t.mesh_fsdp)
    batch = plan.largest_batch(config, mesh.size)
    compiled, _ = plan.compile_train_step(config, mesh, batch['rows'], batch['length'])
    summary = summarize(config)
    shards = t.mesh_fsdp  # parameters and Adam moments are split over the fsdp axis
    return {'devices': mesh.size, 'platform': jax.devices()[0].platform,
            'mesh': dict(mesh.shape), 'remat': config.model.remat,
            'batch': {k: batch[k] for k in ('rows', 'length', 'tokens_per_side',
                                            'grad_accum_steps')},
            'per_device_bytes': plan.memory(compiled),
            'analytic_state_bytes_per_device': summary['memory_bytes']['total'] / shards}


def _format(s: dict) -> str:
    p, mem = s['parameters'], s['memory_bytes']
    gib = 1024 ** 3
    lines = [
        f"model       {', '.join(f'{k}={v}' for k, v in s['model'].items())}, "
        f"vocab={s['vocab_size']}",
        f"parameters  total {p['total']:,}  embedding {p['embedding']:,}  "
        f"non-embedding {p['non_embedding']:,}",
        f"FLOPs/token forward {s['forward_flops_per_token']:.4g}  "
        f"training {s['training_flops_per_token']:.4g}  (source = target = {s['seq_len']} tokens)",
        f"memory      parameters {mem['parameters'] / gib:.3f} GiB  "
        f"optimizer {mem['optimizer_state'] / gib:.3f} GiB  total {mem['total'] / gib:.3f} GiB",
    ]
    return '\n'.join(lines)


def _format_memory(m: dict) -> str:
    gib = 1024 ** 3
    b, p = m['batch'], m['per_device_bytes']
    return (f"memory plan {m['devices']} {m['platform']} device(s), mesh {m['mesh']}, remat "
            f"{m['remat']}, batch {b['rows']} x {b['length']} tokens per side\n"
            f"  per device: peak {p['peak'] / gib:.2f} GiB = arguments {p['argument'] / gib:.2f}"
            f" + outputs {p['output'] / gib:.2f} - donated {p['alias'] / gib:.2f} + temporaries "
            f"{p['temp'] / gib:.2f}; parameters + Adam (analytic) "
            f"{m['analytic_state_bytes_per_device'] / gib:.2f} GiB")


def main():
    if _DEVICES.value is not None:
        if not _MEMORY.value:
            raise UsageError('--devices goes with --memory')
        if _DEVICES.value < 1:
            raise UsageError(f'--devices={_DEVICES.value} must be >= 1')
        jax.config.update('jax_platforms', 'cpu')
        jax.config.update('jax_num_cpu_devices', _DEVICES.value)
    config = cli.checked_config(_CONFIG)
    s = summarize(config, _SEQ_LEN.value)
    if _MEMORY.value:
        s['memory_plan'] = memory(config)
    text = _format(s) + ('\n' + _format_memory(s['memory_plan']) if _MEMORY.value else '')
    print(json.dumps(s, indent=2) if _JSON.value else text)


if __name__ == '__main__':
    cli.run(main)
