"""Multi30k English->German end to end: train a small Transformer, evaluate on test2016.

    python benchmarks/multi30k.py [--workdir=/tmp/multi30k] [--minutes=50] [--dry_run]
                                  [-- --config.model.d_model=512 ...]

Uses configs/local.py (the paper's base model family on local text) with overrides for a small
model that suits 29,000 training pairs: 3 + 3 layers, d_model 256, d_ff 1024, 4 heads, a shared
BPE vocabulary of 8000, P_drop 0.1, label smoothing 0.1, about 2048 tokens per batch (packed),
beam 4 and alpha 0.6 at test time, and the last 5 checkpoints averaged.

Training is bounded by wall time, not steps: after --minutes the benchmark sends SIGTERM,
which makes train finish its step, save and exit 0 (the inverse-square-root schedule does not
depend on the run length). Checkpoints are written every --checkpoint_minutes, so the last 5
averaged span the end of the run, like the paper's 10-minute checkpoints. Everything else
is the paper's (post-LN, Adam 0.9/0.98, the inverse-square-root schedule). Data:
../shared/data/multi30k (train, val, test2016).

Prints ONE JSON object: cased sacreBLEU (with signature), lowercased sacreBLEU (how Multi30k
results are usually given; published tiny Transformers reach about 41 on EN-DE test2016,
tokenized and lowercased), the paper-style tokenized BLEU, chrF, wall times, and the exact
commands. Arguments after `--` are passed to train as extra overrides. It is a long run (about
an hour on a few CPU cores with the defaults); --dry_run prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / 'shared' / 'data' / 'multi30k'


def train_command(workdir: str, data: pathlib.Path, checkpoint_minutes: float,
                  extra: list[str]) -> list[str]:
    return [
        sys.executable, '-m', 'transformer.train', '--config=configs/local.py:base',
        f'--workdir={workdir}',
        '--config.source_lang=en', '--config.target_lang=de',
        f'--config.data.train={data / "train"}',
        f'--config.data.validation={data / "val"}',
        f'--config.data.test={data / "test2016"}',
        '--config.vocab_size=8000',
        '--config.data.batch_tokens=2048', '--config.data.batching=pack',
        '--config.data.max_length=128',
        '--config.model.num_encoder_layers=3', '--config.model.num_decoder_layers=3',
        '--config.model.d_model=256', '--config.model.d_ff=1024',
        '--config.model.num_heads=4', '--config.model.d_k=64', '--config.model.d_v=64',
        '--config.model.dropout_rate=0.1',
        '--config.train.steps=1000000',  # stopped by time (SIGTERM), see the docstring
        '--config.train.warmup_steps=500', '--config.train.learning_rate_scale=0.5',
        '--config.train.checkpoint_every_steps=1000000',
        f'--config.train.checkpoint_every_minutes={checkpoint_minutes}',
        '--config.train.eval_every_steps=500', '--config.train.log_every_steps=50',
        '--config.train.keep_checkpoints=5', '--config.decode.average_last=5',
        *extra,
    ]


def evaluate_command(workdir: str) -> list[str]:
    return [sys.executable, '-m', 'transformer.evaluate', f'--workdir={workdir}',
            '--split=test', '--average=5', '--beam_size=4', '--alpha=0.6']


def main():
    argv = sys.argv[1:]
    extra = []
    if '--' in argv:
        extra = argv[argv.index('--') + 1:]
        argv = argv[:argv.index('--')]
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', default='/tmp/multi30k_ende')
    parser.add_argument('--data', default=str(DATA))
    parser.add_argument('--minutes', type=float, default=50.0, help='training wall time')
    parser.add_argument('--checkpoint_minutes', type=float, default=3.0)
    parser.add_argument('--dry_run', action='store_true')
    args = parser.parse_args(argv)

    data = pathlib.Path(args.data)
    train = train_command(args.workdir, data, args.checkpoint_minutes, extra)
    evaluate = evaluate_command(args.workdir)
    commands = {'train': shlex.join(train) + f'  # SIGTERM after {args.minutes:g} minutes',
                'evaluate': shlex.join(evaluate)}
    if args.dry_run:
        print(json.dumps({'commands': commands}, indent=1))
        return
    if not (data / 'train.en').exists():
        sys.exit(f'error: {data}/train.en not found (Multi30k lives in ../shared/data)')

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    start = time.time()
    proc = subprocess.Popen(train, cwd=REPO, env=env, stdout=sys.stderr)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # finish the step, save, exit 0
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f'error: training exited with status {proc.returncode}')
    train_seconds = time.time() - start
    start = time.time()
    proc = subprocess.run(evaluate, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE)
    evaluate_seconds = time.time() - start
    result = json.loads(proc.stdout)
    print(json.dumps({
        'benchmark': 'multi30k_en_de_test2016',
        'sacrebleu': result['sacrebleu'],
        'sacrebleu_signature': result['sacrebleu_signature'],
        'sacrebleu_lowercase': result['sacrebleu_lowercase'],
        'tokenized_bleu': result['tokenized_bleu'],
        'chrf': result['chrf'],
        'sentences': result['sentences'],
        'checkpoint_steps': result['steps'],
        'train_minutes_requested': args.minutes,
        'train_wall_seconds': train_seconds,
        'evaluate_wall_seconds': evaluate_seconds,
        'decode_seconds': result['decode_seconds'],
        'devices': result['devices'],
        'commands': commands,
    }, indent=1))


if __name__ == '__main__':
    main()
