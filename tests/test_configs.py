"""Configs of the paper and the `summary` command line."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import hand_count, load_config

from transformer import config as config_lib
from transformer import model as model_lib
from transformer import run_config
from transformer.errors import UsageError
from transformer.model_stats import count_parameters, forward_flops

TABLE3_ROWS = ['base', 'A1', 'A2', 'A3', 'A4', 'B1', 'B2', 'C1', 'C2', 'C3', 'C4', 'C5', 'C6',
               'C7', 'D1', 'D2', 'D3', 'D4', 'E', 'big']


def load(repo_root, name, arg=None):
    del repo_root  # conftest knows where the configs are
    return load_config(name, arg)


def test_every_config_builds_and_validates(repo_root):
    for name, args in [('wmt14_ende', ['base', 'big', 'base,runlocal']),
                       ('wmt14_enfr', ['base', 'big']), ('local', ['base', 'big']),
                       ('demo', [None, 'runlocal']), ('table3', TABLE3_ROWS),
                       ('table3_mini', TABLE3_ROWS + ['C5,runlocal'])]:
        for arg in args:
            c = load(repo_root, name, arg)
            config_lib.validate(c)
            assert c.source_lang != c.target_lang


def test_paper_settings(repo_root):
    ende_big = load(repo_root, 'wmt14_ende', 'big')
    m = ende_big.model
    assert (m.d_model, m.num_heads, m.dropout_rate) == (1024, 16, 0.3)
    assert ende_big.train.steps == 300_000 and ende_big.decode.average_last == 20
    assert load(repo_root, 'wmt14_enfr', 'big').model.dropout_rate == 0.1  # section 6.1
    base = load(repo_root, 'wmt14_ende', 'base')
    assert (base.train.adam_b1, base.train.adam_b2, base.train.adam_eps) == (0.9, 0.98, 1e-9)
    assert base.train.warmup_steps == 4000 and base.train.label_smoothing == 0.1
    d = base.decode
    assert (d.beam_size, d.length_penalty, d.max_extra_length) == (4, 0.6, 50)
    assert base.data.batch_tokens == 25_000 and base.vocab_size == 37000
    assert load(repo_root, 'wmt14_enfr', 'base').vocab_size == 32000


@pytest.mark.parametrize('row', TABLE3_ROWS)
def test_table3_rows_count_as_the_architecture(repo_root, row):
    c = load(repo_root, 'table3', row)
    m = c.model
    expected = hand_count(c.vocab_size, m.num_encoder_layers, m.num_decoder_layers, m.d_model,
                          m.d_ff, m.num_heads, m.d_k, m.d_v)
    if m.positional == 'learned':
        expected += m.max_position * m.d_model
    assert count_parameters(c)['total'] == expected
    assert c.train.label_smoothing == {'D3': 0.0, 'D4': 0.2}.get(row, 0.1)


def test_flop_count_matches_xla():
    c = config_lib.shrink(config_lib.base_config())
    c.vocab_size = 64
    c.model.scan_layers = 'False'  # XLA counts a loop's body once
    m = model_lib.create_model(c)
    src = jnp.ones((1, 12), jnp.int32)
    tgt = jnp.ones((1, 10), jnp.int32)
    compiled = jax.jit(lambda m, x, y: m(x, y)).lower(m, src, tgt).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    ours = forward_flops(c.model, c.vocab_size, 12, 10)['total']
    # XLA also counts softmax, layer norm and the elementwise work; matmuls dominate.
    assert ours <= analysis['flops'] <= 1.3 * ours


def run_cli(repo_root, *args):
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    return subprocess.run([sys.executable, '-m', 'transformer.summary', *args], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_summary_json(repo_root):
    r = run_cli(repo_root, '--config=configs/wmt14_ende.py:big', '--json')
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s['parameters']['total'] == 214_171_648
    assert s['training_flops_per_token'] == 3 * s['forward_flops_per_token']
    assert s['memory_bytes']['total'] == 214_171_648 * 4 * 3


def test_summary_memory_plan_compiles_the_step_for_n_devices(repo_root):
    plans = {}
    for fsdp in (1, 2):
        r = run_cli(repo_root, '--config=configs/demo.py:runlocal', '--memory', '--devices=2',
                    '--json', f'--config.train.mesh_fsdp={fsdp}')
        assert r.returncode == 0, r.stderr
        plans[fsdp] = json.loads(r.stdout)['memory_plan']
    p = plans[1]
    assert p['devices'] == 2 and p['mesh'] == {'data': 2, 'fsdp': 1}
    assert p['batch'] == {'rows': 16, 'length': 64, 'tokens_per_side': 1024,
                          'grad_accum_steps': 1}  # runlocal: 1024 tokens in rows of 64
    b = p['per_device_bytes']
    assert b['peak'] == b['argument'] + b['output'] - b['alias'] + b['temp'] > 0
    assert b['alias'] > 0  # the state is donated
    # Sharding parameters and Adam state over 2 devices halves (about) their share.
    assert plans[2]['per_device_bytes']['argument'] < 0.7 * b['argument']
    assert plans[2]['analytic_state_bytes_per_device'] == p['analytic_state_bytes_per_device'] / 2


@pytest.mark.parametrize('args,needle', [
    (['--config=configs/table3.py:Z9'], "unknown config argument 'Z9'; valid: base, A1"),
    (['--config=configs/table3.py:A1', '--config.model.nope=1'],
     "unknown config field 'model.nope'"),
    (['--config=configs/table3.py:A1', '--config.model.num_heads=7'],
     'not divisible by model.num_heads=7'),
    (['--config=configs/missing.py'], "config file 'configs/missing.py' does not exist"),
    (['--config=configs/demo.py', '--config.model.d_model=abc'], 'd_model=abc'),
])
def test_bad_config_input_is_one_line_and_exit_2(repo_root, args, needle):
    r = run_cli(repo_root, *args)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert 'Traceback' not in r.stderr


def _row_changes(name, row):
    """{field: +1 or -1 (or the new value)} of what a Table 3 row changes from its base."""
    base, changed = load_config(name, 'base'), load_config(name, row)
    fields = [f for f in config_lib.differences(base, changed)
              if f.startswith('model.') or f == 'train.label_smoothing']

    def get(c, field):
        group, key = field.split('.')
        return c[group][key]

    return {f: (get(changed, f) > get(base, f)) - (get(changed, f) < get(base, f))
            if isinstance(get(base, f), (int, float)) else get(changed, f) for f in fields}


@pytest.mark.parametrize('row', TABLE3_ROWS)
def test_miniature_table3_rows_change_what_the_papers_rows_change(row):
    # The same fields, each moved in the same direction (bigger, smaller, or to the same
    # choice), from the miniature base as from the paper's.
    assert _row_changes('table3_mini', row) == _row_changes('table3', row)


def test_a_config_stored_before_a_field_existed_reads_as_it_was_trained(tmp_path):
    """Runs stored before model.attention_bias existed had biases in every projection: read
    back, they say so (and resuming them under the new default is refused by name)."""
    old = config_lib.base_config().to_dict()
    del old['model']['attention_bias'], old['train']['profile_steps']
    (tmp_path / 'config.json').write_text(json.dumps(old))
    stored = run_config.load_config(str(tmp_path))
    assert stored.model.attention_bias is True and stored.train.profile_steps == ''
    assert config_lib.differences(stored, config_lib.base_config()) == ['model.attention_bias']


def test_evals_follow_the_train_fields_and_a_bad_entry_is_named(tmp_path):
    """config.evals by default: the validation loss every train.eval_every_steps, the greedy
    BLEU of train.eval_bleu_sentences sentences when > 0; entries added by a config file take
    their type's defaults; a bad entry is one line naming its field."""
    c = config_lib.base_config()
    c.train.eval_every_steps = 7
    assert config_lib.evals(c) == {
        'loss': dict(type='loss', every=7, split='validation', prefix='eval/', files='')}
    c.train.eval_bleu_sentences = 20
    assert config_lib.evals(c)['bleu'] == dict(type='bleu', every=7, split='validation',
                                               prefix='eval/', files='', sentences=20,
                                               beam_size=1)
    c.evals.beam = dict(type='bleu', beam_size=4, sentences=100, every=50)
    c.evals.news = dict(type='loss', split='test')
    c.evals.second = dict(type='loss', files='/data/newstest2012')  # a second validation set
    config_lib.validate(c)
    entries = config_lib.evals(c)
    assert list(entries) == ['beam', 'bleu', 'loss', 'news', 'second']  # the order they run in
    assert [config_lib.eval_keys(e)[0] for e in entries.values()] == [
        'beam4_bleu', 'greedy_bleu', 'nll', 'nll', 'nll']
    assert entries['news']['prefix'] == 'test/' and entries['news']['every'] == 7
    assert entries['second']['prefix'] == 'second/'
    for name, entry, needle in [
            ('x', dict(type='rouge'), "evals.x.type='rouge'; valid: loss, bleu"),
            ('x', dict(type='loss', beam_size=4), 'evals.x.beam_size: a loss evaluator has no'),
            ('x', dict(type='bleu', every=-1), 'evals.x.every=-1 must be an integer >= 0'),
            ('x', dict(type='bleu', beam_size=0), 'evals.x.beam_size=0 must be an integer >= 1'),
            ('x', dict(type='loss', split='train'), "evals.x.split='train'; valid: validation"),
            ('x', dict(type='loss', prefix='test'), "evals.x.prefix='test' must be a name"),
            ('x', dict(type='loss', files=3), 'evals.x.files=3 must be a path prefix'),
            ('x', dict(type='loss', split='test'), 'evals.news and evals.x both write the row '
                                                   'test/nll: give evals.x another prefix')]:
        bad = config_lib.base_config()
        bad.evals.news = dict(type='loss', split='test')
        bad.evals[name] = entry
        with pytest.raises(UsageError, match=re.escape(needle)):
            config_lib.validate(bad)
    stops = config_lib.base_config()
    stops.train.update(early_stop_patience=2, early_stop_metric='bleu')
    with pytest.raises(UsageError, match='early_stop_metric=bleu needs train.eval_bleu_sentences'):
        config_lib.validate(stops)
    stops.train.early_stop_metric = 'loss'
    stops.evals.loss.split = 'test'
    with pytest.raises(UsageError, match='follows the row eval/nll, which no entry'):
        config_lib.validate(stops)
    # A config stored before config.evals existed reads back with the default entries; a
    # resumed run may change what it evaluates, and how often.
    old = config_lib.base_config().to_dict()
    del old['evals']
    (tmp_path / 'config.json').write_text(json.dumps(old))
    stored = run_config.load_config(str(tmp_path))
    assert config_lib.differences(stored, config_lib.base_config()) == []
    assert config_lib.differences(stored, c, ignore=config_lib.RESUMABLE_CHANGES) == []
