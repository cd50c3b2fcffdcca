"""`python -m transformer.report RUNS_DIR [--out=report.md] [--plot=report.png]`.

Reads every work directory under RUNS_DIR (its stored config, metrics.jsonl, checkpoints and
eval/*.json) and prints the table the paper prints, one row per run: the hyperparameters that
differ from the base run, parameters, steps done and planned, training time, validation
perplexity per word-piece and validation BLEU (beam search, no checkpoint averaging, as
Table 3), test BLEU where evaluated, and the paper's own figures beside them (Table 3 for its
rows, Table 2's newstest2014 BLEU for base and big). BLEU is the paper's tokenized BLEU, the one
comparable with its tables (sacreBLEU is in each run's eval JSON). Unfinished runs say so;
directories that are not runs are listed as skipped with the reason. The plot shows the
validation perplexity of every run against steps, and BLEU against parameters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from absl import flags

from transformer import checkpoint, checkpoint_info, cli, paper, plots, run_config
from transformer import config as config_lib
from transformer import workdir as workdir_lib
from transformer.errors import UsageError
from transformer.model_stats import count_parameters

_OUT = flags.DEFINE_string('out', None, 'Also write the table (Markdown) to this file.')
_PLOT = flags.DEFINE_string('plot', None, 'Draw the curves and BLEU against parameters (PNG).')

# (label, config field) of what a row may change, in the paper's notation.
HYPERPARAMETERS = (
    ('N_enc', 'model.num_encoder_layers'), ('N_dec', 'model.num_decoder_layers'),
    ('d_model', 'model.d_model'), ('d_ff', 'model.d_ff'), ('h', 'model.num_heads'),
    ('d_k', 'model.d_k'), ('d_v', 'model.d_v'), ('P_drop', 'model.dropout_rate'),
    ('eps_ls', 'train.label_smoothing'), ('PE', 'model.positional'), ('norm', 'model.norm'),
)


@dataclass
class Run:
    """What the report shows of one work directory."""
    name: str
    config: object
    row: str
    parameters: int
    steps: int  # of the newest checkpoint (0 before the first)
    planned_steps: int
    max_minutes: float
    train_seconds: float | None
    finished: bool
    perplexity_curve: list = field(default_factory=list)  # [(step, perplexity)]
    validation: dict | None = None  # the eval JSON of beam search, no averaging
    test: dict | None = None

    @property
    def validation_perplexity(self) -> float | None:
        return self.perplexity_curve[-1][1] if self.perplexity_curve else None


def _get(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        node = node[part]
    return node


def _read_metrics(workdir: str) -> list[dict]:
    file = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    if not os.path.exists(file):
        return []
    records = []
    with open(file) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return records


def _newest_eval(workdir: str, split: str, single_checkpoint: bool) -> dict | None:
    """The eval JSON of `split` with the newest checkpoint, of a whole split (no --limit);
    with `single_checkpoint`, only evaluations of one checkpoint (none averaged)."""
    directory = workdir_lib.path(workdir, workdir_lib.EVAL_DIR)
    if not os.path.isdir(directory):
        return None
    found = []
    for name in os.listdir(directory):
        if not (name.startswith(f'{split}_') and name.endswith('.json')):
            continue
        with open(os.path.join(directory, name)) as f:
            result = json.load(f)
        if 'ensemble' in result:  # several models: not this run's own score
            continue
        if single_checkpoint and result.get('checkpoints_averaged', 1) != 1:
            continue
        if result.get('limit') is not None or '_first' in name:  # not the split's score
            continue
        found.append(result)
    return max(found, key=lambda r: r['steps'][-1]) if found else None


def read_run(workdir: str) -> Run:
    """The Run of `workdir`; UsageError (the reason to skip it) if it is not a run."""
    if not os.path.exists(workdir_lib.path(workdir, workdir_lib.CONFIG_FILE)):
        raise UsageError('no config.json: not a work directory made by transformer.train')
    try:
        config = run_config.load_config(workdir)
        parameters = count_parameters(config)['total']
    except Exception as e:  # noqa: BLE001 - any unreadable run is skipped with its reason
        raise UsageError(f'config.json cannot be read: {e}') from None
    steps = checkpoint.steps_in(workdir)
    info = checkpoint_info.parse(checkpoint.read_info(
        workdir_lib.path(workdir, workdir_lib.CHECKPOINTS_DIR), steps[-1]) if steps else {})
    done = steps[-1] if steps else 0
    t = config.train
    seconds = info.train_seconds
    out_of_time = t.get('max_minutes', 0) > 0 and seconds is not None and (
        seconds >= 60 * t.max_minutes - 1)
    curve = [(r['step'], r['eval/perplexity']) for r in _read_metrics(workdir)
             if 'eval/perplexity' in r and r['step'] <= done]
    return Run(name=os.path.basename(os.path.normpath(workdir)), config=config,
               row=config.get('row', ''), parameters=parameters, steps=done,
               planned_steps=t.steps, max_minutes=t.get('max_minutes', 0.0),
               train_seconds=seconds, finished=done >= t.steps or out_of_time,
               perplexity_curve=curve,
               validation=_newest_eval(workdir, 'validation', single_checkpoint=True),
               test=_newest_eval(workdir, 'test', single_checkpoint=False))


def read_runs(runs_dir: str) -> tuple[list[Run], list[tuple[str, str]]]:
    """(runs in the paper's row order, then by name; [(directory, why it was skipped)])."""
    if not os.path.isdir(runs_dir):
        raise UsageError(f'{runs_dir} is not a directory')
    runs, skipped = [], []
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        if not os.path.isdir(path):
            continue
        try:
            runs.append(read_run(path))
        except UsageError as e:
            skipped.append((name, str(e)))
    order = {row: i for i, row in enumerate(paper.ROWS)}
    runs.sort(key=lambda r: (order.get(r.row, len(order)), r.name))
    return runs, skipped


def differences(run: Run, reference) -> str:
    """The hyperparameters of `run` that differ from `reference`, in the paper's notation."""
    changed = []
    for label, dotted in HYPERPARAMETERS:
        mine, theirs = _get(run.config, dotted), _get(reference, dotted)
        if mine != theirs:
            changed.append(f'{label} {mine}')
    return ', '.join(changed) or '-'


def _number(value, fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return '-'
    minutes = seconds / 60
    return f'{minutes:.1f} min' if minutes < 120 else f'{minutes / 60:.1f} h'


def table(runs: list[Run], skipped: list[tuple[str, str]]) -> str:
    """The report as Markdown."""
    base = next((r.config for r in runs if r.row == 'base'), config_lib.base_config())
    lines = [
        '| run | row | differs from base | params | steps (planned) | train time | status '
        '| val PPL | val BLEU | test BLEU | paper PPL | paper BLEU | paper params '
        '| paper test BLEU |',
        '|' + '---|' * 14,
    ]
    for r in runs:
        ppl, bleu, millions = paper.TABLE3.get(r.row, (None, None, None))
        pair = (r.config.source_lang, r.config.target_lang)
        test_paper = paper.TABLE2.get(pair, {}).get(r.row)
        planned = f'{r.planned_steps:,}'
        if r.max_minutes:
            planned += f' or {r.max_minutes:g} min'
        test = None
        if r.test is not None:
            test = f'{r.test["tokenized_bleu"]:.2f}'
            if r.test['checkpoints_averaged'] > 1:
                test += f' (avg {r.test["checkpoints_averaged"]})'
        status = 'finished' if r.finished else ('not started' if not r.steps else 'unfinished')
        lines.append(' | '.join([
            f'| {r.name}', r.row or '-', differences(r, base), f'{r.parameters / 1e6:.1f}M',
            f'{r.steps:,} ({planned})', _duration(r.train_seconds), status,
            _number(r.validation_perplexity, '.2f'),
            _number(r.validation and r.validation['tokenized_bleu'], '.2f'), test or '-',
            _number(ppl, '.2f'), _number(bleu, '.1f'),
            '-' if millions is None else f'{millions}M', _number(test_paper, '.1f')]) + ' |')
    if skipped:
        lines += ['', 'Skipped:'] + [f'- {name}: {why}' for name, why in skipped]
    return '\n'.join(lines) + '\n'


RUNS: list[str] = []  # the positional argument, filled by cli.run


def main():
    if len(RUNS) != 1:
        raise UsageError('give one RUNS_DIR: python -m transformer.report RUNS_DIR '
                         '[--out=report.md] [--plot=report.png]')
    runs, skipped = read_runs(RUNS[0])
    if not runs:
        raise UsageError(f'no run under {RUNS[0]}'
                         + (f' (skipped: {", ".join(n for n, _ in skipped)})' if skipped else ''))
    text = table(runs, skipped)
    print(text, end='')
    if _OUT.value:
        workdir_lib.atomic_write(_OUT.value, text.encode(), 'the report')
    if _PLOT.value:
        if not _PLOT.value.lower().endswith('.png'):
            raise UsageError(f'--plot={_PLOT.value!r} must name a .png file')
        plots.runs_figure(
            {r.name: r.perplexity_curve for r in runs},
            {r.name: (r.parameters, r.validation['tokenized_bleu'])
             for r in runs if r.validation is not None}, _PLOT.value)


if __name__ == '__main__':
    cli.run(main, positional=RUNS)
