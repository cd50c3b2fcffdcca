"""`python -m transformer.average --workdir=DIR --last=K`: checkpoint averaging (section 6.1).

The paper decodes with the mean of the parameters of the last 5 (base) or 20 (big)
checkpoints, written at 10-minute intervals. This writes that mean to DIR/averaged and prints
where and which steps. (`evaluate` and `translate` average on the fly with --average=K; this
command is for keeping or shipping the averaged model.)
"""

from __future__ import annotations

import json

from absl import flags

from transformer import checkpoint, cli



def define_flags():
    """Defined only when run as a program, so that importing this module defines no flags."""
    flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
    flags.DEFINE_integer('last', None, 'Average the last K checkpoints (default: the '
                         'config\'s decode.average_last).')


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    workdir, last = flags.FLAGS.workdir, flags.FLAGS.last
    if not workdir:
        raise cli.UsageError('--workdir is required')
    config = cli.load_workdir_config(workdir)
    last = last if last is not None else config.decode.average_last
    if last < 1:
        raise cli.UsageError(f'--last={last} must be >= 1')
    params, steps = checkpoint.average_last(workdir, last, config)
    path = checkpoint.save_averaged(workdir, params, steps)
    print(json.dumps({'averaged': path, 'steps': steps}))


if __name__ == '__main__':
    define_flags()
    cli.run(main)
