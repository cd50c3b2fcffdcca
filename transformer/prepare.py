"""`python -m transformer.prepare --config=FILE:ARG [--config.data.tfds_data_dir=DIR]`.

Prepares a config's data once, saying what it does. For TFDS datasets (the WMT14 configs):
what will be downloaded and how big, where it goes and the disk it needs, TFDS's own progress,
and at the end the size of each split; no TensorFlow is needed (see tfds_source.py). A failed
or hopeless download ends with one line naming the URL and the manual route (the file name to
put in `data.manual_dir`), exit status 2; run the command again to go on (finished downloads
are kept, half-finished files are removed, a half-finished preparation is never taken for a
finished one). Local files are checked (UTF-8, equal line counts) and counted; the synthetic
task needs nothing.

`train` prepares the data by itself in a single-process run; a multi-process run (a pod, a
SLURM job) needs it prepared first, once, into a data directory every process reads (see the
README, "Multi-host").
"""

from __future__ import annotations

from transformer import cli, data, tfds_source

_CONFIG = cli.define_config_flag()


def main():
    config = cli.checked_config(_CONFIG)
    d = config.data
    if d.source == 'tfds':
        b = tfds_source.prepare(d, say=cli.say)
        for line in tfds_source.split_sizes(b):
            cli.say(f'  {line}')
        for split in tfds_source.EVAL_SPLITS:
            if split in b.info.splits and tfds_source.official_order(b, split) is not None:
                cli.say(f'  {split}: read in the order of its source files (official order)')
        return
    if d.source == 'synthetic':
        cli.say('data.source=synthetic: generated on the fly from the config, nothing to '
                'prepare')
    for split in data.SPLITS:
        if d.source == 'local' and not d[split]:
            cli.say(f'  {split}: not configured (config.data.{split})')
            continue
        pairs = data.pairs(config, split)  # reads and checks the files (UTF-8, line counts)
        cli.say(f'  {split}: {len(pairs):,} pairs ({pairs.name})')


if __name__ == '__main__':
    cli.run(main)
