"""`python -m transformer.report` on runs made here: a finished one, an unfinished one, and a
directory that is not a run."""

import json
import signal

import pytest
from conftest import load_config, program_env, run_program, run_train

from transformer import model_stats, paper

TINY = ['--config.train.steps=4', '--config.train.checkpoint_every_steps=2',
        '--config.train.eval_every_steps=2']
# The miniature Table 3's rows, made smaller still, on the demo's synthetic task.
MINI = [*TINY, '--config.data.source=synthetic', '--config.source_lang=src',
        '--config.target_lang=tgt', '--config.vocab_size=200', '--config.model.d_model=32',
        '--config.model.d_ff=64', '--config.model.d_k=8', '--config.model.d_v=8',
        '--config.data.batch_tokens=512', '--config.data.synthetic_train_size=500',
        '--config.data.synthetic_eval_size=16']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    # Finished runs of the miniature's base and C1 (1 + 1 layers); C1 evaluated on the
    # validation split as Table 3 is.
    for row in ('base', 'C1'):
        run_train(root / row, *MINI, config=f'configs/table3_mini.py:{row}')
    run_program('evaluate', f'--workdir={root / "C1"}', '--split=validation', '--average=1',
                '--beam_size=2')
    # An unfinished run: killed while saving step 3 of 4, so checkpoint 2 is its newest. Not
    # killed after step 3 with a checkpoint every 2 steps: step 2's asynchronous save could
    # still be in flight then (seen once on a loaded machine); a save first waits for the one
    # before it, so here checkpoint 2 is complete.
    killed = run_train(root / 'demo', *TINY, '--config.train.checkpoint_every_steps=1',
                       check=False, env=program_env(TRANSFORMER_FAULT='in-save:3'))
    assert killed.returncode == -signal.SIGKILL
    (root / 'notes').mkdir()
    (root / 'notes' / 'readme.txt').write_text('not a run')
    return root


def metrics(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_report_table_and_plot(runs, tmp_path):
    out, plot = tmp_path / 'report.md', tmp_path / 'report.png'
    proc = run_program('report', str(runs), f'--out={out}', f'--plot={plot}', text=True)
    assert proc.stdout == out.read_text()
    assert plot.stat().st_size > 10_000
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ')
            for line in proc.stdout.splitlines() if line.startswith('| ') and '---' not in line}
    c1, demo = rows['C1'], rows['demo']
    header = rows['run']
    col = {name.strip('| '): i for i, name in enumerate(header)}
    # The finished row: its row name, what it changes, its parameters, steps, status, and the
    # last validation perplexity and BLEU of its own files; the paper's Table 3 row beside.
    assert c1[col['row']] == 'C1' and c1[col['status']] == 'finished'
    assert c1[col['differs from base']] == 'N_enc 1, N_dec 1'
    assert rows['base'][col['differs from base']] == '-'
    config = load_config('table3_mini', 'C1')
    config.vocab_size = 200
    config.model.update(d_model=32, d_ff=64, d_k=8, d_v=8)
    params = model_stats.count_parameters(config)['total']
    assert c1[col['params']] == f'{params / 1e6:.1f}M'
    assert c1[col['steps (planned)']].startswith('4 (4 or 8 min)')
    last_eval = [r for r in metrics(runs / 'C1') if 'eval/perplexity' in r][-1]
    assert c1[col['val PPL']] == f'{last_eval["eval/perplexity"]:.2f}'
    evaluated = json.loads(next((runs / 'C1' / 'eval').glob('validation_*.json')).read_text())
    assert c1[col['val BLEU']] == f'{evaluated["tokenized_bleu"]:.2f}'
    ppl, bleu, millions = paper.TABLE3['C1']
    assert c1[col['paper PPL']] == f'{ppl:.2f}' and c1[col['paper BLEU']] == f'{bleu:.1f}'
    assert c1[col['paper params']] == f'{millions}M'
    # The unfinished run: 2 of 4 steps, no paper row, no evaluation.
    assert demo[col['status']] == 'unfinished' and demo[col['steps (planned)']] == '2 (4)'
    assert demo[col['row']] == '-' and demo[col['paper PPL']] == '-'
    assert demo[col['val BLEU']] == '-'
    assert '- notes: no config.json: not a work directory made by transformer.train' in proc.stdout


def test_report_refuses_a_directory_without_runs(tmp_path):
    proc = run_program('report', str(tmp_path), check=False, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f'no run under {tmp_path}')
