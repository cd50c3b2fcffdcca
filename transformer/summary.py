"""`python -m transformer.summary --config=FILE:ARG [--json]`: parameters, FLOPs, memory.

Everything comes from `jax.eval_shape` and arithmetic (see model_stats.py): nothing is
allocated, so the big models can be inspected on a laptop.
"""

from __future__ import annotations

import json

from absl import flags

from transformer import cli
from transformer.model_stats import summarize

_CONFIG = cli.define_config_flag()
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'Source and target length for the FLOP count '
                                '(default: data.max_length).')


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


def main():
    config = cli.checked_config(_CONFIG)
    s = summarize(config, _SEQ_LEN.value)
    print(json.dumps(s, indent=2) if _JSON.value else _format(s))


if __name__ == '__main__':
    cli.run(main)
