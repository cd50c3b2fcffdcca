"""`python -m transformer.average --workdir=DIR --last=K`: checkpoint averaging (section 6.1).

The paper decodes with the mean of the parameters of the last 5 (base) or 20 (big)
checkpoints, written at 10-minute intervals. This writes that mean to DIR/averaged and prints
where and which steps. (`evaluate` and `translate` average on the fly with --average=K; this
command is for keeping or shipping the averaged model.) Of a run that keeps a moving average
of its weights (train.ema_decay), the checkpoints' moving averages are averaged, or their raw
parameters with --raw_weights.
"""

from __future__ import annotations

import json

from absl import flags

from transformer import cli, run_config, saved_runs
from transformer.errors import UsageError

_WORKDIR = cli.define_workdir_flag()
_LAST = flags.DEFINE_integer('last', None, 'Average the last K checkpoints (default: the '
                             'config\'s decode.average_last).')
_RAW_WEIGHTS = cli.define_raw_weights_flag()


def main():
    config = run_config.load_config(_WORKDIR.value)
    last = _LAST.value if _LAST.value is not None else config.decode.average_last
    if last < 1:
        raise UsageError(f'--last={last} must be >= 1')
    params, steps = saved_runs.average_last(_WORKDIR.value, last, config,
                                            raw_weights=_RAW_WEIGHTS.value)
    path = saved_runs.save_averaged(_WORKDIR.value, params, steps)
    print(json.dumps({'averaged': path, 'steps': steps}))


if __name__ == '__main__':
    cli.run(main)
