"""End to end: train the demo (runlocal) in a temporary work directory, then evaluate,
average, translate and attention through their command lines, and the decoding helpers they
share in process."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from conftest import error_line, run_program

from transformer import data, decode, errors
from transformer import workdir as workdir_lib
from transformer.model import create_model


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp('demo')
    run_program('train', '--config=configs/demo.py:runlocal', f'--workdir={path}',
        '--config.train.steps=10', '--config.train.checkpoint_every_steps=5',
        '--config.train.eval_every_steps=100', '--config.train.log_every_steps=5')
    return path


def test_evaluate_writes_hypotheses_and_scores(workdir):
    # On 8 devices: the batch is split over them.
    proc = run_program('evaluate', f'--workdir={workdir}', '--average=2', '--beam_size=2',
                       devices=8)
    result = json.loads(proc.stdout)
    config = workdir_lib.load_config(str(workdir))
    sources, _ = data.load_text(config, 'test')
    assert result['sentences'] == len(sources)
    assert result['steps'] == [5, 10] and result['checkpoints_averaged'] == 2
    for key in ('sacrebleu', 'sacrebleu_signature', 'tokenized_bleu', 'chrf',
                'sacrebleu_lowercase', 'decode_seconds', 'sentences_per_second',
                'tokens_per_second'):
        assert key in result
    assert 'tok:13a' in result['sacrebleu_signature']
    hyp = pathlib.Path(result['hypotheses_file'])
    assert hyp.name == 'test_step10_avg2_beam2_alpha0.6.hyp'
    assert hyp.read_text(encoding='utf-8').count('\n') == len(sources)
    stored = json.loads(hyp.with_suffix('.json').read_text())
    assert stored['sacrebleu'] == result['sacrebleu']
    assert result['devices'].endswith('8 cpu device(s)')


def test_average_writes_the_mean(workdir):
    proc = run_program('average', f'--workdir={workdir}', '--last=2')
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result['steps'] == [5, 10]
    assert os.path.isdir(result['averaged'])
    error = error_line(run_program('average', f'--workdir={workdir}', '--last=9', check=False))
    assert 'last 9' in error


def test_translate_lines_empty_lines_and_truncation(workdir):
    text = 'zofu kabemi\n\n   \ntolarin zepa kabemi\n' + 'zofu ' * 400 + '\nlast line'
    proc = run_program('translate', f'--workdir={workdir}', '--average=1', '--beam_size=2',
               stdin=text.encode())
    out = proc.stdout.decode('utf-8').split('\n')
    assert out[-1] == '' and len(out) - 1 == 6  # one line out per line in
    assert out[1] == '' and out[2] == ''
    assert 'line 5' in proc.stderr.decode() and 'truncated' in proc.stderr.decode()


def test_translate_refuses_non_utf8_with_its_line_number(workdir):
    proc = run_program('translate', f'--workdir={workdir}', '--average=1',
               stdin=b'fine\nalso fine\nbad \xff\xfe byte\n', check=False)
    assert proc.returncode == errors.EXIT_BAD_INPUT
    assert 'line 3' in error_line(proc) and 'UTF-8' in error_line(proc)


def test_attention_plot(workdir, tmp_path):
    out = tmp_path / 'attention.png'
    proc = run_program('attention', f'--workdir={workdir}', '--text=zofu kabemi tolarin',
               f'--out={out}', '--average=1', '--beam_size=1')
    assert out.stat().st_size > 10_000
    assert json.loads(proc.stdout.decode().strip().splitlines()[-1])['out'] == str(out)


def test_workdir_without_checkpoint_is_refused(workdir, tmp_path):
    empty = tmp_path / 'untrained'
    empty.mkdir()
    shutil.copy(workdir / 'config.json', empty / 'config.json')
    shutil.copy(workdir / 'vocab.model', empty / 'vocab.model')
    for module in ('evaluate', 'translate'):
        proc = run_program(module, f'--workdir={empty}', stdin=b'x\n', check=False)
        assert proc.returncode == errors.EXIT_BAD_INPUT, module
        assert 'checkpoint' in error_line(proc)
    proc = run_program('evaluate', f'--workdir={tmp_path / "missing"}', check=False)
    assert proc.returncode == errors.EXIT_BAD_INPUT and 'does not exist' in error_line(proc)


# -- in process: order is kept (a random model, whose outputs differ by sentence) ------------


def random_model(workdir):
    config = workdir_lib.load_config(str(workdir))
    return create_model(config, seed=3), config, workdir_lib.load_vocabulary(str(workdir))


def test_translator_keeps_order_and_matches_one_by_one(workdir):
    model, config, tokenizer = random_model(workdir)
    settings = dict(beam_size=2, alpha=0.6, max_extra_length=4)
    translator = decode.Translator(model, config, tokenizer, settings, batch_sentences=4,
                                   devices=jax.devices()[:1])
    sources, _ = data.load_text(config, 'test')
    lines = [(i + 1, s) for i, s in enumerate(sources[:6])]
    lines.insert(2, (99, ''))
    batched = translator(lines)  # sorted by length, decoded in two batches, put back in order
    # The same sentences in another order and other batches give the same translations.
    reverse = translator(lines[::-1])[::-1]
    assert batched == reverse
    assert batched[2] == ''
    assert len(set(batched)) > 2, 'the random model translates everything alike'


def test_evaluate_translates_every_sentence_in_order(workdir):
    model, config, tokenizer = random_model(workdir)
    settings = dict(beam_size=2, alpha=0.6, max_extra_length=3)
    sources, _ = data.load_text(config, 'test')
    n = len(sources)
    decoder = decode.make_decoder(model, config, settings, n, devices=jax.devices()[:1])
    hypotheses, stats = decode.translate_split(decoder, config, tokenizer, 'test', n)
    assert sorted(hypotheses) == list(range(n))
    assert stats['generated_tokens'] > 0 and len(set(hypotheses.values())) > 2
    # The longest sentence alone (the same compiled shape) gets the same translation.
    ids = [tokenizer.encode(s) + [decode.EOS_ID] for s in sources]
    longest = max(range(n), key=lambda i: len(ids[i]))
    tokens, _ = decoder(np.asarray([ids[longest]]))
    assert hypotheses[longest] == tokenizer.decode(tokens[0].tolist())
    assert len(decoder.shapes_compiled) == 1
