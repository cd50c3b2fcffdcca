"""A run planned before it runs: the real training step and beam search compiled for a mesh
of any devices (this host's, or a TPU slice's or GPU node's without the hardware, targets.py),
and what the compiler says of them: memory per device, the collectives, FLOPs.

Nothing is allocated: the state and the batches are abstract arrays laid out as `train` lays
them out (train_step.setup), so a laptop plans a pod.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp

from transformer import batching, search, sharding
from transformer import train_step as train_step_lib
from transformer.model import abstract_model, resolved
from transformer.model_stats import forward_flops, training_flops

# -- the batch ----------------------------------------------------------------------------------


def largest_batch(config, devices: int, processes: int = 1) -> dict:
    """The global batch of the longest bucket (the worst case for memory), as the training
    iterator makes it: rows are a multiple of devices x grad_accum_steps (x processes), at
    least one multiple, so on many devices a batch can hold far more tokens than
    data.batch_tokens (every device gets at least one row)."""
    d, t = config.data, config.train
    length = int(batching.bucket_boundaries(d)[-1]) if d.batching == 'bucket' else d.max_length
    multiple = devices * t.grad_accum_steps * processes
    rows = batching.rows_per_batch(d.batch_tokens, length, multiple)
    return {'rows': rows, 'length': length, 'tokens_per_side': rows * length,
            'ratio_to_batch_tokens': round(rows * length / d.batch_tokens, 3),
            'grad_accum_steps': t.grad_accum_steps}


def batch_warning(config, devices: int, processes: int = 1, tolerance: float = 0.1) -> str | None:
    """One line when the longest bucket's batch is off data.batch_tokens by more than
    `tolerance` on this many devices, with the device counts that keep it close; else None."""
    b = largest_batch(config, devices, processes)
    if abs(b['ratio_to_batch_tokens'] - 1) <= tolerance:
        return None
    fitting = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
               if abs(largest_batch(config, n, 1)['ratio_to_batch_tokens'] - 1) <= tolerance]
    accum = config.train.grad_accum_steps
    return (f'the batches of the {b["length"]}-token bucket hold {b["rows"]} rows = '
            f'{b["tokens_per_side"]:,} tokens a side, {b["ratio_to_batch_tokens"]}x '
            f'data.batch_tokens={config.data.batch_tokens:,}: rows are a multiple of the '
            f'{devices * processes} devices x {accum} accumulation step(s); device counts that '
            f'keep it within {tolerance:.0%}: {fitting or "none"} (or set data.batch_tokens '
            'to what you mean to train with)')


# -- compiling ----------------------------------------------------------------------------------


def abstract(tree, shardings):
    """Abstract arrays (shape, dtype, sharding) of `tree` laid out by `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def compile_train_step(config, mesh, rows: int, length: int):
    """(the compiled training step train runs, its Setup) for a [rows, length] batch."""
    s = train_step_lib.setup(config, mesh)
    batch = train_step_lib.abstract_batch(config, rows, length, s.batch_sharding)
    compiled = train_step_lib.jit_sharded_step(s).lower(
        abstract(s.abstract_state, s.state_shardings), batch).compile()
    return compiled, s


def decode_batch(config, devices: int) -> dict:
    """The beam search's batch as `evaluate` runs it: decode.batch_sentences rounded up to the
    devices, sources of the longest bucket."""
    length = int(batching.bucket_boundaries(config.data)[-1])
    return {'sentences': batching.round_up(config.decode.batch_sentences, devices),
            'source_length': length,
            'output_bound': search.output_bound(length, config.decode.max_extra_length,
                                                config.model.max_position)}


def compile_beam_search(config, mesh, sentences: int, source_length: int):
    """The beam search `evaluate` runs (decode settings of the config), compiled for `mesh`:
    rows split over every device, parameters replicated (host_decode.Decoder's layout)."""
    config = resolved(config, mesh.devices.flat[0].platform)
    graphdef, state = abstract_model(config)
    params = abstract(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
    inputs = jax.ShapeDtypeStruct((sentences, source_length), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    d = config.decode
    return search.lower_search((graphdef,), (params,), inputs, beam_size=d.beam_size,
                               alpha=d.length_penalty,
                               max_extra_length=d.max_extra_length).compile()


# -- what the compiler says ---------------------------------------------------------------------


def shard_bytes(tree) -> int:
    """Bytes of `tree`'s abstract arrays on one device (the largest shard of each)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * jnp.dtype(a.dtype).itemsize
    return total


def memory(compiled) -> dict:
    """XLA's memory analysis of one device, in bytes. 'peak' is arguments + outputs - aliased
    (the donated state is updated in place) + temporaries; 'total' adds the generated code,
    which is on the device too."""
    m = compiled.memory_analysis()
    out = {name: int(getattr(m, f'{name}_size_in_bytes')) for name in
           ('argument', 'output', 'alias', 'temp', 'generated_code')}
    out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
    out['total'] = out['peak'] + out['generated_code']
    return out


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute',
               'all-to-all')
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
             'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_ARRAY = re.compile(r'\b(pred|bf16|[suf]\d+)\[([\d,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z\-]*)\((.*)$')
_CALLEES = re.compile(r'\b(?:calls|true_computation|false_computation|async_computation)='
                      r'%?([\w.\-]+)')


def _arrays(text: str) -> list[tuple[str, int]]:
    return [(f'{dtype}[{dims}]', math.prod(int(d) for d in dims.split(',') if d)
             * _ITEMSIZE.get(dtype, 4)) for dtype, dims in _ARRAY.findall(text)]


def collectives(hlo: str) -> dict:
    """The collectives a device runs in one call of a compiled program (its HLO text), by
    kind: how many, and the bytes of their results on one device (in all, and by dtype), with
    the three largest arrays.

    Each collective counts once per run: those inside a loop (the scanned layers, gradient
    accumulation) times its trip count, read from XLA's known_trip_count or, failing that,
    from the loop's condition (the one integer constant it compares with). Asynchronous
    pairs (-start / -done) count once.
    """
    computations, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
        elif line.strip() == '}':
            current = None
        else:
            computations[current].append(line)

    calls, found = collections.defaultdict(list), collections.defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            result, op, rest = m.groups()
            if op == 'while':
                body = re.search(r'body=%?([\w.\-]+)', rest).group(1)
                calls[name].append((body, _trip_count(rest, computations)))
            calls[name] += [(c, 1) for c in _CALLEES.findall(rest)]
            branches = re.search(r'branch_computations=\{([^}]*)\}', rest)
            if branches:
                calls[name] += [(c.strip().lstrip('%'), 1) for c in branches.group(1).split(',')]
            kind = op[:-len('-done')] if op.endswith('-done') else op
            if kind in COLLECTIVES and not op.endswith('-start'):
                found[name].append((kind, _arrays(result)))

    out = {k: {'count': 0, 'bytes': 0, 'by_dtype': collections.Counter(),
               'arrays': collections.Counter()} for k in COLLECTIVES}

    def visit(name, times, depth=0):
        if depth > 50:  # a malformed or recursive text: stop rather than loop
            return
        for kind, arrays in found.get(name, ()):
            out[kind]['count'] += times
            for array, size in arrays:
                out[kind]['bytes'] += times * size
                out[kind]['by_dtype'][array.split('[')[0]] += times * size
                out[kind]['arrays'][array] += times
        for callee, n in calls.get(name, ()):
            visit(callee, times * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return {k: {'count': v['count'], 'bytes': v['bytes'], 'bytes_by_dtype': dict(v['by_dtype']),
                'largest': [a for a, _ in sorted(v['arrays'].items(), key=lambda kv: -_arrays(
                    kv[0])[0][1])[:3]]}
            for k, v in out.items() if v['count']}


def _trip_count(rest: str, computations: dict) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known:
        return int(known.group(1))
    condition = re.search(r'condition=%?([\w.\-]+)', rest)
    constants = set()
    for line in computations.get(condition.group(1) if condition else '', ()):
        constants |= {int(c) for c in re.findall(r's32\[\] constant\((\d+)\)', line)}
    return constants.pop() if len(constants) == 1 else 1


def xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled program (None where it has none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have no cost analysis
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost['flops']) if cost and 'flops' in cost else None


# -- the whole plan -----------------------------------------------------------------------------


def train_plan(config, mesh, chip_memory: int | None = None, peak_flops: float | None = None,
               with_search: bool = True) -> dict:
    """Everything the pre-flight reports of the training step (and the beam search) of
    `config` on `mesh`: per device memory, collectives and FLOPs, the global batch, and the
    step time at 30 % and 50 % model FLOPs utilisation where the chip's peak is known."""
    devices = mesh.size
    platform = mesh.devices.flat[0].platform
    config_on = resolved(config, platform)
    batch = largest_batch(config, devices)
    compiled, s = compile_train_step(config, mesh, batch['rows'], batch['length'])
    state = abstract(s.abstract_state, s.state_shardings)
    mem = memory(compiled)
    m = config_on.model
    per_device = {
        'parameters': shard_bytes(state['params']),
        'optimizer_state': shard_bytes(state['opt_state']),
        'batch': mem['argument'] - shard_bytes(state),
        'temporaries': mem['temp'],  # activations kept for the backward pass, and the rest
        'generated_code': mem['generated_code'],
        'xla_peak': mem['peak'],
        'total': mem['total'],
    }
    flops = training_flops(m, config.vocab_size, batch['rows'], batch['length'], batch['length'])
    counted = xla_flops(compiled)  # of one device's share of the partitioned program
    undercounted = m.scan_layers or config.train.grad_accum_steps > 1
    plan = {
        'devices': devices, 'platform': platform, 'device_kind': mesh.devices.flat[0].device_kind,
        'mesh': dict(mesh.shape),
        'settings': {k: m[k] for k in ('dtype', 'attention_impl', 'scan_layers', 'remat')},
        'batch': batch,
        'batch_warning': batch_warning(config, devices),
        'train_step': {
            'per_device_bytes': per_device,
            'memory_analysis': mem,
            'chip_memory_bytes': chip_memory,
            'fits': None if not chip_memory else per_device['total'] <= chip_memory,
            'collectives': collectives(compiled.as_text()),
            'flops': flops,
            # XLA counts a loop's body once: its figure undercounts scanned layers.
            'xla_flops': None if undercounted or counted is None else counted * devices,
            'xla_flops_note': ('not given: XLA counts a scanned loop body once' if undercounted
                               else 'XLA cost analysis'),
        },
    }
    if peak_flops:
        plan['step_seconds'] = {f'mfu_{int(u * 100)}': flops / (devices * peak_flops * u)
                                for u in (0.3, 0.5)}
        plan['tokens_per_second'] = {k: batch['tokens_per_side'] / v
                                     for k, v in plan['step_seconds'].items()}
    if with_search:
        db = decode_batch(config, devices)
        searched = compile_beam_search(config, mesh, db['sentences'], db['source_length'])
        mem = memory(searched)
        f = forward_flops(m, config.vocab_size, db['source_length'], db['output_bound'])
        plan['beam_search'] = {
            **db, 'beam_size': config.decode.beam_size, 'memory_analysis': mem,
            'fits': None if not chip_memory else mem['total'] <= chip_memory,
            'collectives': collectives(searched.as_text()),
            # Teacher-forced FLOPs of beam x sentences outputs of the bound's length: what the
            # cached steps do, less the attention over the cache's unused tail.
            'flops_bound': f['total'] * db['sentences'] * config.decode.beam_size,
        }
    return plan

